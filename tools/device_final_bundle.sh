#!/usr/bin/env bash
# Builds and packs the bundle tools/device_final_check.sh carries to the device machine (run here,
# on the build machine, from the repository root of /work/main; CUDA build dir build-h11, sm_90a):
# phishard, phishard_bench, phishard_tp_bench, phishard_kernel_bench, phishard_graph_probe, every
# tests/gpu test binary but the *_bench_test timing tables (except cuda_attention_bench_test,
# which the check runs), and the integration tests the check runs against `serve --device cuda`;
# their gRPC / protobuf / abseil libraries (../shared/tools/device-bundle), stripped, in one xz
# tarball.
# xz's dictionary must be large (640 MiB) so the test binaries' shared static code folds: ~25 MB
# against ~40 MB with the default window, which with the tracked tree passes the 64 MiB a device
# call may carry.
#   tools/device_final_bundle.sh [BUILD_DIR] [OUT_DIR]     (defaults build-h11, .dev-final)
# FINAL_NO_TP=1 leaves the tensor-parallel binaries out (the NCCL / all-reduce / TP model tests,
# tp_launch_test, phishard_tp_bench; the check skips their steps): 31.5 MB instead of 32.6 MB at
# session 31, when the tracked tree (34 MB) and the whole bundle no longer fit a call's 64 MiB.
# The TP steps then run on their own (tools/device_tp_check.sh, perf-log 2026-12-01 02:16).
set -euo pipefail
BUILD=${1:-build-h11}
D=${2:-.dev-final}
BUNDLER=${DEVICE_BUNDLE:-../shared/tools/device-bundle}
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPHISHARD_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
    -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache
fi
GPU_TESTS=$(find tests/gpu -maxdepth 1 -name '*_test.cc' ! -name '*_bench_test.cc' -printf '%f\n' | sed 's/\.cc$//' | sort)
TP_BINS="nccl_communicator_test custom_all_reduce_test copy_engine_all_reduce_test cuda_tp_model_test"
if [ "${FINAL_NO_TP:-0}" = 1 ]; then
  for t in $TP_BINS; do GPU_TESTS=$(echo "$GPU_TESTS" | grep -vx "$t"); done
fi
# The one timing table the check runs (issue #4's prefill attention kernel line beside SDPA).
GPU_TESTS="$GPU_TESTS cuda_attention_bench_test"
# shellcheck source=tools/device_step.sh
source "$(dirname "$0")/device_step.sh"  # CUDA_INTEGRATION_TESTS
INTEGRATION="$CUDA_INTEGRATION_TESTS"
[ "${FINAL_NO_TP:-0}" = 1 ] || INTEGRATION="$INTEGRATION tp_launch_test"
# shellcheck disable=SC2086
cmake --build "$BUILD" --target phishard phishard_bench phishard_tp_bench phishard_kernel_bench \
  phishard_graph_probe $GPU_TESTS $INTEGRATION -j"${JOBS:-2}"
rm -rf "$D"
TESTS=()
for t in $GPU_TESTS $INTEGRATION; do TESTS+=("$BUILD/tests/$t"); done
"$BUNDLER" "$D" "$BUILD/bin/phishard" "$BUILD/bin/phishard_bench" "$BUILD/bin/phishard_tp_bench" \
  "$BUILD/bin/phishard_kernel_bench" "$BUILD/bin/phishard_graph_probe" "${TESTS[@]}"
[ "${FINAL_NO_TP:-0}" = 1 ] && rm -f "$D/bin/phishard_tp_bench"
strip --strip-unneeded "$D"/bin/* "$D"/lib/* 2> /dev/null || true
# What the binaries were built from (the device copy's git metadata can lag the working tree):
# the commit, and how many tracked files differed from it.
{ git rev-parse --short HEAD; echo "tracked files changed: $(git status --short -uno | wc -l)"; } \
  > "$D/build_commit.txt"
(cd "$D" && XZ_OPT='--lzma2=preset=9,dict=640MiB -T1' tar -cJf bundle.txz bin lib env.sh \
  build_commit.txt && rm -rf bin lib env.sh build_commit.txt)
ls -l "$D/bundle.txz"
