#!/usr/bin/env bash
# The whole test suite: installs dependencies (idempotent), builds everything (CUDA code too when
# nvcc exists), runs every test that needs no GPU. `--gpu` runs only the GPU-labelled tests (on a
# machine with a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
if [[ "${1:-}" == "--gpu" ]]; then
  ctest --test-dir "${BUILD_DIR:-build}" -L gpu --output-on-failure
else
  ctest --test-dir "${BUILD_DIR:-build}" -LE gpu --output-on-failure -j"${JOBS:-2}"
fi
