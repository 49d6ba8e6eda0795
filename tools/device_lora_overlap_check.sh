#!/usr/bin/env bash
# One device call (kind nvidia-h200) for the LoRA shrink overlap (model/cuda_lora.h: the decode /
# SGMV shrinks forked onto a side stream beside the base qkv and dense + fc2 GEMMs): the SGMV and
# GEMM-form kernel tests, the LoRA model tests (peft goldens, mixed batches vs each request alone
# and the CPU, overlap on vs off bit-identical, graphs on and off), the Phi-2 LoRA benchmark with
# the overlap on and off (PHISHARD_LORA_OVERLAP=0), the base-model and graph regression tests, then
# memcheck of the overlap test. Logs under $OUT; a short summary prints last.
#
# Here, before the call (the run tool sends /work/main's checkout; .dev-lora is ignored there):
#   cmake --build build --target phishard_bench cuda_sgmv_test cuda_lora_gemm_test \
#     cuda_lora_model_test cuda_model_test cuda_graph_test -j2
#   D=/work/main/.dev-lora; rm -rf $D && mkdir -p $D
#   ../shared/tools/device-bundle $D build/bin/phishard_bench \
#     build/tests/cuda_{sgmv,lora_gemm,lora_model,model,graph}_test
#   strip --strip-unneeded $D/bin/* $D/lib/*
#   (cd $D && tar -czf bundle.tgz bin lib env.sh && rm -rf bin lib env.sh)
#   cp tools/device_lora_overlap_check.sh $D/check.sh
# Then: run(command="BUDGET_S=170 bash .dev-lora/check.sh", carry=[".dev-lora"], timeout_s=200,
#           kind="nvidia-h200")
# The test binaries look for fixtures under the worktree they were built in (PHISHARD_MODELS):
# set SRC_ROOT to that path (default /work/wt-lora); it is linked to the checkout here.
set -u
OUT=${OUT:-/tmp/lora-check}
mkdir -p "$OUT"
BUDGET=${BUDGET_S:-170}
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
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.log" 2>&1
BENCH="$B/phishard_bench --lora-only --lora-rank 16 --lora-batch 64 --lora-context 1024 \
  --lora-prefill 8x512 --steps 10 --gemv-sweep 0"
step sgmv-test 25 tests.log $B/cuda_sgmv_test
step lora-model-test 45 tests.log $B/cuda_lora_model_test
step lora-gemm-test 15 tests.log $B/cuda_lora_gemm_test
step lora-bench 30 bench.log $BENCH --json "$OUT/bench.json"
step lora-bench-no-overlap 30 bench.log env PHISHARD_LORA_OVERLAP=0 $BENCH
step model-test 25 tests.log $B/cuda_model_test
step graph-test 25 tests.log $B/cuda_graph_test --gtest_filter=*Bit*:*Padding*
if command -v compute-sanitizer > /dev/null; then
  step memcheck-overlap 25 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/cuda_lora_model_test --gtest_filter='*BitIdentical*'
fi
echo "== failures"
grep -hE "^=====|Failure|FAILED  \\]|Expected|Which is|differ|must" "$OUT/tests.log" | head -40
echo "== notes"
grep -hE "=====|cuda lora vs peft|100 load|: max.d. / scale" "$OUT/tests.log" | grep -vE "phi-(gqa|mha)|tiny-phi-code  " | head -60
echo "== bench"
grep -vE "^kernel " "$OUT/bench.log" | grep -E "prefill|base|->|=====|lora|decode" | head -60
echo "== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
