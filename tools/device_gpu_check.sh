#!/usr/bin/env bash
# The one script run on the GPU machine (device tool, kind nvidia-h200): every GPU test, the demo
# model through `phishard generate --device cuda`, a Phi-2-shaped timing of prefill and decode,
# and compute-sanitizer on small cases if time is left. Logs go to $OUT (at most 8 files come
# back); a short table is printed last.
#
# Here, before the call (build for Hopper, bundle the binaries with their non-CUDA libraries):
#   cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a
#   cmake --build build-cuda --target phishard cuda_ops_test cuda_attention_test cuda_model_test \
#     cuda_phi2_bench_test -j2
#   ../shared/tools/device-bundle .device-bundle build-cuda/bin/phishard build-cuda/tests/cuda_*_test
#   strip --strip-unneeded .device-bundle/bin/* .device-bundle/lib/*
#   (cd .device-bundle && tar -czf bundle.tgz bin lib env.sh && rm -rf bin lib env.sh)
# (packed: the bundle is ~72 MB, over the 64 MiB a call may carry; OpenBLAS alone is 35 MB.)
# Then: run(command="bash tools/device_gpu_check.sh", carry=[".device-bundle"], timeout_s=360).
set -u
OUT=${OUT:-/tmp/phishard-gpu-check}
mkdir -p "$OUT"
BUDGET=${PHISHARD_CHECK_BUDGET_S:-330}  # stop starting new steps after this many seconds
START=$(date +%s)
ROOT=$(pwd)

# The test binaries carry absolute paths of the build machine (PHISHARD_MODELS, the golden
# fixtures): make that path point at this copy of the repository.
BUILD_ROOT=/work/main
if [ "$ROOT" != "$BUILD_ROOT" ] && [ ! -e "$BUILD_ROOT" ]; then
  mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT"
fi

if [ -f .device-bundle/bundle.tgz ] && [ ! -d .device-bundle/bin ]; then
  tar -xzf .device-bundle/bundle.tgz -C .device-bundle
fi
# shellcheck disable=SC1091
source .device-bundle/env.sh
B=.device-bundle/bin
{
  echo "== $(date -u +%FT%TZ) repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  uname -r
  ldd $B/cuda_ops_test | grep -E "cublas|cudart|not found" || true
  df -h /dev/shm /tmp 2>/dev/null | tail -n +1
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

SUMMARY="$OUT/summary.txt"
printf "%-28s %4s %8s  %s\n" step rc seconds result > "$SUMMARY"

# step NAME TIMEOUT_S LOG COMMAND... : runs unless the budget is spent; records rc, time, the
# gtest verdict line.
step() {
  local name=$1 tmo=$2 log=$3
  shift 3
  local now
  now=$(date +%s)
  if (( now - START + 10 > BUDGET )); then
    printf "%-28s %4s %8s  %s\n" "$name" "-" "-" "skipped (budget)" >> "$SUMMARY"
    return
  fi
  echo "===== $name: $*" >> "$OUT/$log"
  local t0 rc t1 verdict
  t0=$(date +%s.%N)
  timeout "$tmo" "$@" >> "$OUT/$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  # This step's own gtest totals (the log is shared by several steps: only lines after the marker).
  verdict=$(awk -v m="===== $name: " 'index($0, m) == 1 {on = 1; next} on' "$OUT/$log" |
    awk '/^\[  PASSED  \] [0-9]+ test/ {p = $4} /^\[  FAILED  \] [0-9]+ test/ {f = $4}
         /^\[  SKIPPED \] [0-9]+ test/ {k = $4}
         END {if (p != "" || f != "" || k != "") printf "passed %d, failed %d, skipped %d", p, f, k}')
  [ $rc -eq 124 ] && verdict="TIMEOUT after ${tmo}s; $verdict"
  printf "%-28s %4d %8.1f  %s\n" "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "${verdict:0:120}" \
    >> "$SUMMARY"
  echo "----- $name rc=$rc" >> "$OUT/$log"
}

step ops 90 ops.log $B/cuda_ops_test
step attention 90 attention.log $B/cuda_attention_test
step model 120 model.log $B/cuda_model_test

PROMPT=$'def fibonacci(n):\n'
step generate-cuda 30 generate.log $B/phishard generate --model models/tiny-phi-code --device cuda \
  --prompt "$PROMPT" --max-new-tokens 48 --ignore-eos --json
step generate-cuda-fp16 30 generate.log $B/phishard generate --model models/tiny-phi-code \
  --device cuda --dtype float16 --prompt "$PROMPT" --max-new-tokens 48 --ignore-eos --json
step generate-cpu 30 generate.log $B/phishard generate --model models/tiny-phi-code --device cpu \
  --prompt "$PROMPT" --max-new-tokens 48 --ignore-eos --json

BENCH_DIR=/tmp
if [ -d /dev/shm ] && [ "$(df -k --output=avail /dev/shm | tail -1)" -gt 8000000 ]; then
  BENCH_DIR=/dev/shm
fi
export PHISHARD_GPU_BENCH=1 PHISHARD_BENCH_DIR=$BENCH_DIR
step phi2-bench 150 bench.log $B/cuda_phi2_bench_test
unset PHISHARD_GPU_BENCH
rm -rf "$BENCH_DIR"/phishard-phi2-L* 2>/dev/null

if command -v compute-sanitizer > /dev/null; then
  step memcheck-attention 60 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/cuda_attention_test --gtest_filter='*Sanitizer*'
  step racecheck-attention 60 sanitizer.log compute-sanitizer --tool racecheck \
    --error-exitcode 9 $B/cuda_attention_test --gtest_filter='*Sanitizer*'
  step memcheck-model 60 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/cuda_model_test --gtest_filter='CudaVsCpu.TinyPhiCodeBf16'
else
  printf "%-28s %4s %8s  %s\n" sanitizer - - "compute-sanitizer not found" >> "$SUMMARY"
fi

echo
echo "== generate (ids/text, then timing line)"
grep -E '^\{|prefill' "$OUT/generate.log" | cut -c1-200
echo "== bench table"
sed -n '/phi-2 shaped/,$p' "$OUT/bench.log" 2>/dev/null | head -20
grep -hE "decode vs prefill|GELU epilogue|^attention (prefill|decode)|one layer" "$OUT"/*.log | head -14
echo "== failures (first 30 lines)"
grep -hE "Failure|FAILED|error:|Expected|Which is|rel [0-9]" "$OUT"/ops.log "$OUT"/attention.log \
  "$OUT"/model.log 2>/dev/null | head -30
echo "== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
