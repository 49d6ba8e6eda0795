#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for the overlapped tensor-parallel prefill (issue #6,
# model/cuda_phi_tp_overlap.cc): the TP model test (world 2 vs 1 with the chunked prefill on,
# chunked vs whole on a 2 x 600-row prefill), the TP=1 vs TP=2 benchmark with the prefill chunk
# count swept (bench/tp_bench.cc --prefill-chunks), TP=2 with NCCL's CTA count capped, a repeat
# of the prefill rows for the spread,
# and the world-size-1 model and graph tests. Logs under $OUT; a summary prints last.
#
# Here, before the call (worktree wt-tp3, build dir build):
#   cmake --build build --target phishard_tp_bench cuda_tp_model_test cuda_model_test \
#     cuda_graph_test -j2
#   D=/work/main/.dev-tp3; rm -rf $D && /work/shared/tools/device-bundle $D \
#     build/bin/phishard_tp_bench build/tests/{cuda_tp_model,cuda_model,cuda_graph}_test
#   strip --strip-unneeded $D/bin/* $D/lib/*; cp tools/device_tp_overlap_check.sh $D/check.sh
#   (cd $D && tar -czf bundle.tgz bin lib env.sh && rm -rf bin lib env.sh)
# Then: run(command="bash .dev-tp3/check.sh", carry=[".dev-tp3"], kind="nvidia-h200-x2")
set -u
OUT=${OUT:-/tmp/phishard-tp-overlap-check}
mkdir -p "$OUT"
BUDGET=${PHISHARD_CHECK_BUDGET_S:-170}
CHUNKS=${PHISHARD_CHECK_CHUNKS:-1,2,3,4}
START=$(date +%s)
ROOT=$(pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Test binaries carry the source path they were built from (models, golden fixtures).
if [ ! -e /work/wt-tp3 ]; then mkdir -p /work && ln -s "$ROOT" /work/wt-tp3; fi
BUNDLE=.dev-tp3
if [ -f $BUNDLE/bundle.tgz ] && [ ! -d $BUNDLE/bin ]; then tar -xzf $BUNDLE/bundle.tgz -C $BUNDLE; fi
# shellcheck disable=SC1091
source $BUNDLE/env.sh
B=$BUNDLE/bin
{
  echo "== $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm --format=csv
  nvidia-smi topo -m 2>/dev/null | head -4
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

SUMMARY="$OUT/summary.txt"
# shellcheck source=tools/device_step.sh
source "$ROOT/tools/device_step.sh"
step_summary_header

step tp-model-test 90 tests.log $B/cuda_tp_model_test
step tp-bench 80 bench.log $B/phishard_tp_bench --tp 1,2 --batches 1,32,128 --context 1024 \
  --prefills 1x2048,8x2048 --prefill-chunks "$CHUNKS" --prefill-min-rows 512 \
  --json "$OUT/tp_bench.json"
# NCCL's CTA count: fewer CTAs leave more SMs to the GEMMs the chunked all-reduces run beside.
for ctas in ${PHISHARD_CHECK_CTAS:-4 8 16}; do
  step "tp2-ctas-$ctas" 30 bench.log env NCCL_MAX_CTAS=$ctas NCCL_MIN_CTAS=1 $B/phishard_tp_bench \
    --tp 2 --batches 1,128 --context 1024 --prefills 1x2048 --prefill-chunks 1,2 \
    --prefill-min-rows 512 --json "$OUT/tp_bench_ctas$ctas.json"
done
step tp-bench-again 40 bench.log $B/phishard_tp_bench --tp 1,2 --batches 1,128 --context 1024 \
  --prefills 1x2048 --prefill-chunks 1,2,3 --prefill-min-rows 512 \
  --json "$OUT/tp_bench_again.json"
step model-test 40 tests.log $B/cuda_model_test
step graph-test 40 tests.log $B/cuda_graph_test

echo "== failures (first 30 lines)"
grep -hE "Failure|FAILED|error:|Expected|Which is|rank [0-9]:|failed" "$OUT/tests.log" 2>/dev/null |
  head -30
echo "== tp model test notes"
grep -hE "world 2:|chunked vs whole|exited .* after" "$OUT/tests.log" | head -20
echo "== bench"
grep -E "^(TP=|case|decode|prefill|=====)" "$OUT/bench.log" | head -60
echo "== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
