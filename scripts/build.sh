#!/usr/bin/env bash
# Configures and builds phishard into build/ (Release). CUDA sources are compiled whenever nvcc
# exists (PHISHARD_CUDA=OFF in the environment switches them off). Extra args go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
CUDA_FLAG=()
[[ -n "${PHISHARD_CUDA:-}" ]] && CUDA_FLAG=(-DPHISHARD_CUDA="${PHISHARD_CUDA}")
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release "${CUDA_FLAG[@]}" "$@"
fi
cmake --build "$BUILD_DIR" -j"${JOBS:-$(nproc)}"
