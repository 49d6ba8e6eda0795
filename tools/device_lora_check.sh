#!/usr/bin/env bash
# One device call (kind nvidia-h200) for the CUDA multi-LoRA work: the grouped SGMV kernel test,
# the LoRA model tests (peft goldens, mixed batches graphs on/off, 100 load/offload cycles, KV
# sizing), the Phi-2 LoRA benchmark (64 different rank-16 adapters at decode batch 64, 8 at
# prefill 8x512, against base-only), the base-model regression tests, then memcheck/racecheck.
# Logs under $OUT; a short summary prints last. ~26 s of script on an H200 (docs/perf-log.md,
# "multi-LoRA on CUDA, run 2").
#
# Here, before the call (the run tool sends /work/main's checkout; .dev-lora is ignored there):
#   cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPHISHARD_CUDA=ON \
#     -DCMAKE_CUDA_ARCHITECTURES=90a
#   cmake --build build --target phishard_bench cuda_sgmv_test cuda_lora_model_test \
#     cuda_model_test cuda_graph_test -j2
#   D=/work/main/.dev-lora; rm -rf $D && mkdir -p $D
#   ../shared/tools/device-bundle $D build/bin/phishard_bench \
#     build/tests/cuda_{sgmv,lora_model,model,graph}_test
#   strip --strip-unneeded $D/bin/* $D/lib/*
#   (cd $D && tar -czf bundle.tgz bin lib env.sh && rm -rf bin lib env.sh)
# Then: run(command="BUDGET_S=200 bash tools/device_lora_check.sh", carry=[".dev-lora"],
#           timeout_s=230)
# The test binaries look for fixtures under the worktree they were built in (PHISHARD_MODELS):
# set SRC_ROOT to that path (default /work/wt-lora); it is linked to the checkout here.
set -u
OUT=${OUT:-/tmp/lora-check}
mkdir -p "$OUT"
BUDGET=${BUDGET_S:-225}
START=$(date +%s)
ROOT=$(pwd)
SRC_ROOT=${SRC_ROOT:-/work/wt-lora}
if [ "$SRC_ROOT" != "$ROOT" ] && [ ! -e "$SRC_ROOT" ]; then
  mkdir -p "$(dirname "$SRC_ROOT")" && ln -s "$ROOT" "$SRC_ROOT"
fi
BUNDLE=.dev-lora
if [ -f $BUNDLE/bundle.tgz ] && [ ! -d $BUNDLE/bin ]; then tar -xzf $BUNDLE/bundle.tgz -C $BUNDLE; fi
source $BUNDLE/env.sh
B=$BUNDLE/bin
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
step() {  # step NAME TIMEOUT LOG CMD...
  local name=$1 tmo=$2 log=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 10 )); then echo "$name skipped (budget)" >> "$SUMMARY"; return; fi
  (( tmo > left )) && tmo=$left
  echo "===== $name: $*" >> "$OUT/$log"
  local t0=$(date +%s)
  timeout "$tmo" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  local v=$(awk -v m="===== $name: " 'index($0,m)==1{on=1;next} on' "$OUT/$log" | grep -E "^\[  (PASSED|FAILED) \]|ERROR SUMMARY" | tr '\n' ' ')
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s $v" >> "$SUMMARY"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.log" 2>&1
step sgmv-test 40 tests.log $B/cuda_sgmv_test
step lora-model-test 70 tests.log $B/cuda_lora_model_test
step lora-bench 80 bench.log $B/phishard_bench --lora-only --lora-rank 16 --lora-batch 64 \
  --lora-context 1024 --lora-prefill 8x512 --steps 10 --gemv-sweep 0 --json "$OUT/bench.json"
step model-test 60 tests.log $B/cuda_model_test
step graph-test 50 tests.log $B/cuda_graph_test --gtest_filter=*Bit*:*Padding*
if command -v compute-sanitizer > /dev/null; then
  step memcheck-sgmv 40 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/cuda_sgmv_test --gtest_filter='*Swept*'
  step memcheck-lora-model 60 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/cuda_lora_model_test --gtest_filter='*Golden*:*Mixed*'
  step racecheck-sgmv 40 sanitizer.log compute-sanitizer --tool racecheck --error-exitcode 9 \
    $B/cuda_sgmv_test --gtest_filter='*Swept*'
fi
echo "== failures"
grep -hE "Failure|FAILED|error|Expected|Which is|differ|must" "$OUT/tests.log" | head -40
echo "== notes"
grep -hE "cuda lora vs peft|100 load|worst" "$OUT/tests.log" | head
echo "== bench"
grep -vE "^kernel " "$OUT/bench.log" | tail -25
echo "== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
