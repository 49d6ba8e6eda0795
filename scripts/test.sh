#!/usr/bin/env bash
# The whole test suite: installs dependencies (idempotent), builds everything (CUDA code too when
# nvcc exists), runs every test that needs no GPU. `--gpu` runs only the GPU-labelled tests and the
# gRPC integration suite against `phishard serve --device cuda` (PHISHARD_TEST_DEVICE=cuda; on a
# machine with a GPU; tp_launch_test is left out: tensor parallelism runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
if [[ "${1:-}" == "--gpu" ]]; then
  ctest --test-dir "${BUILD_DIR:-build}" -L gpu --output-on-failure
  PHISHARD_TEST_DEVICE=cuda ctest --test-dir "${BUILD_DIR:-build}" -L integration \
    -E tp_launch_test --output-on-failure
else
  ctest --test-dir "${BUILD_DIR:-build}" -LE gpu --output-on-failure -j"${JOBS:-2}"
fi
