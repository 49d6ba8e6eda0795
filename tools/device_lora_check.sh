#!/usr/bin/env bash
# One device call for the CUDA multi-LoRA work (kind nvidia-h200-x2: GPU 0 for the one-GPU steps,
# both for the TP=2 test; on nvidia-h200 the TP steps skip): the SGMV kernel tests (grouped and
# decode expand), the GEMM-form helpers (gather, mask, accumulate + GELU), the LoRA model tests
# (peft goldens and mixed batches through the SGMV kernels and through the GEMM form, graphs on and
# off, 100 load/offload cycles, KV sizing), the Phi-2 LoRA benchmark (64 different rank-16 adapters
# at decode batch 64, 8 at prefill 8x512, against base-only; again with the GEMM form off), the
# base-model regression tests, the TP=2 vs TP=1 test with adapters (SGMV and GEMM form), then
# memcheck. Logs under $OUT; a short summary prints last (docs/perf-log.md, "multi-LoRA on CUDA,
# runs 3-4").
#
# Here, before the call (the run tool sends /work/main's checkout; .dev-lora is ignored there):
#   cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPHISHARD_CUDA=ON \
#     -DCMAKE_CUDA_ARCHITECTURES=90a
#   cmake --build build --target phishard_bench cuda_sgmv_test cuda_lora_gemm_test \
#     cuda_lora_model_test cuda_model_test cuda_graph_test cuda_ops_test cuda_tp_model_test -j2
#   D=/work/main/.dev-lora; rm -rf $D && mkdir -p $D
#   ../shared/tools/device-bundle $D build/bin/phishard_bench \
#     build/tests/cuda_{sgmv,lora_gemm,lora_model,model,graph,ops,tp_model}_test
#   strip --strip-unneeded $D/bin/* $D/lib/*
#   (cd $D && tar -czf bundle.tgz bin lib env.sh && rm -rf bin lib env.sh)
#   cp tools/device_lora_check.sh $D/check.sh
# Then: run(command="BUDGET_S=100 bash .dev-lora/check.sh", carry=[".dev-lora"], timeout_s=130,
#           kind="nvidia-h200-x2")
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
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.log" 2>&1
G0="env CUDA_VISIBLE_DEVICES=0"
LM=$B/cuda_lora_model_test
TP=$B/cuda_tp_model_test
step sgmv-test 30 tests.log $G0 $B/cuda_sgmv_test
step lora-gemm-test 20 tests.log $G0 $B/cuda_lora_gemm_test
step lora-model-test 40 tests.log $G0 $LM
# The GEMM form's precision switches (model/cuda_lora.h): T split into hi + lo, and fc1's GELU
# as a separate kernel instead of cuBLASLt's epilogue.
step lora-model-split-t 20 tests.log $G0 PHISHARD_LORA_GEMM_SPLIT_T=1 $LM --gtest_filter='*GemmForm*'
step lora-model-unfused-gelu 20 tests.log $G0 PHISHARD_LORA_GEMM_FUSED_GELU=0 $LM \
  --gtest_filter='*GemmForm*'
step lora-model-sgmv-shrink 20 tests.log $G0 PHISHARD_LORA_GEMM_SGMV_SHRINK=1 $LM \
  --gtest_filter='*GemmForm*'
step lora-model-sgmv-shrink-split-t 20 tests.log $G0 PHISHARD_LORA_GEMM_SGMV_SHRINK=1 \
  PHISHARD_LORA_GEMM_SPLIT_T=1 $LM --gtest_filter='*GemmForm*'
step lora-bench 40 bench.log $G0 $B/phishard_bench --lora-only --lora-rank 16 --lora-batch 64 \
  --lora-context 1024 --lora-prefill 8x512 --steps 10 --gemv-sweep 0 --json "$OUT/bench.json"
step tp-model-test 30 tests.log $TP --gtest_filter=*TwoRanks*
step tp-model-test-sgmv 30 tests.log env PHISHARD_LORA_GEMM_MIN_ROWS=0 $TP --gtest_filter=*TwoRanks*
step tp-model-test-split-t 30 tests.log env PHISHARD_LORA_GEMM_SPLIT_T=1 $TP \
  --gtest_filter=*TwoRanks*
# Prefill variants (decode at batch 8 only, so that 8 adapters are made, not 64).
for v in SPLIT_T SGMV_SHRINK SGMV_SHRINK+SPLIT_T; do
  envs=""
  for f in ${v//+/ }; do envs="$envs PHISHARD_LORA_GEMM_$f=1"; done
  step "lora-bench-$v" 20 bench.log env CUDA_VISIBLE_DEVICES=0 $envs $B/phishard_bench \
    --lora-only --lora-rank 16 --lora-batch 8 --lora-context 1024 --lora-prefill 8x512 \
    --steps 10 --gemv-sweep 0
done
step model-test 30 tests.log $G0 $B/cuda_model_test
step graph-test 30 tests.log $G0 $B/cuda_graph_test --gtest_filter=*Bit*:*Padding*
if command -v compute-sanitizer > /dev/null; then
  step memcheck-lora-gemm 30 sanitizer.log $G0 compute-sanitizer --tool memcheck \
    --error-exitcode 9 $B/cuda_lora_gemm_test
  step memcheck-lora-model 30 sanitizer.log $G0 PHISHARD_LORA_GEMM_SPLIT_T=1 \
    PHISHARD_LORA_GEMM_SGMV_SHRINK=1 compute-sanitizer --tool memcheck --error-exitcode 9 $LM \
    --gtest_filter='*GemmForm*'
fi
echo "== failures"
grep -hE "^=====|Failure|FAILED  \\]|Expected|Which is|differ|must" "$OUT/tests.log" | head -40
echo "== notes"
grep -hE "=====|cuda lora vs peft|100 load|GELU epilogue|world 2 vs 1|: max.d. / scale" "$OUT/tests.log" | grep -vE "phi-(gqa|mha)|tiny-phi-code  " | head -90
echo "== bench"
grep -vE "^kernel " "$OUT/bench.log" | grep -E "prefill|base|->|=====" | head -50
echo "== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
