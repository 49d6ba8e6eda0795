#!/usr/bin/env bash
# One device call for CUDA tensor parallelism (issues #6 and #9) on nvidia-h200-x2 or -x4: the
# NCCL communicator and TP model tests, the TP=1 vs TP=N benchmark (bench/tp_bench.cc), and a
# served check: `phishard launch --num-shard N --device cuda` driven by the router-style client
# (`phishard client generate`, each generation reported once) against a world-size-1 `serve`,
# on tiny-phi-code and (with PHISHARD_TP_PHI2=1) a Phi-2-shaped random checkpoint written here.
# Logs under $OUT; a summary prints last.
#
# Here, before the call (worktree wt-tp, build dir build):
#   cmake --build build --target phishard phishard_tp_bench cuda_tp_model_test \
#     nccl_communicator_test cuda_model_test [cuda_lora_model_test cuda_graph_test] -j2
#   D=/work/main/.dev-tp; rm -rf $D && /work/shared/tools/device-bundle $D build/bin/phishard \
#     build/bin/phishard_tp_bench build/tests/{cuda_tp_model,nccl_communicator,cuda_model}_test \
#     [build/tests/cuda_lora_model_test build/tests/cuda_graph_test]
#   strip --strip-unneeded $D/bin/* $D/lib/*; cp tools/device_tp_check.sh $D/
#   (cd $D && tar -czf bundle.tgz bin lib env.sh && rm -rf bin lib env.sh)
# Then: run(command="bash .dev-tp/device_tp_check.sh 2", carry=[".dev-tp"], kind=...-x2)
set -u
WORLD=${1:-2}
OUT=${OUT:-/tmp/phishard-tp-check}
mkdir -p "$OUT"
BUDGET=${PHISHARD_CHECK_BUDGET_S:-270}
START=$(date +%s)
ROOT=$(pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Test binaries carry the source path they were built from (models, golden fixtures).
if [ ! -e /work/wt-tp ]; then mkdir -p /work && ln -s "$ROOT" /work/wt-tp; fi
BUNDLE=.dev-tp
if [ -f $BUNDLE/bundle.tgz ] && [ ! -d $BUNDLE/bin ]; then tar -xzf $BUNDLE/bundle.tgz -C $BUNDLE; fi
# shellcheck disable=SC1091
source $BUNDLE/env.sh
B=$BUNDLE/bin
{
  echo "== $(date -u +%FT%TZ) world $WORLD"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvidia-smi topo -m 2>/dev/null | head -8
  ldd $B/phishard | grep -E "nccl|cudart|not found" || true
  nproc
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

SUMMARY="$OUT/summary.txt"
# shellcheck source=tools/device_step.sh
source "$ROOT/tools/device_step.sh"
step_summary_header

# shellcheck source=tools/device_tp_served.sh
source "$ROOT/tools/device_tp_served.sh"

export -f served
export B ROOT OUT
step nccl-test 60 tests.log $B/nccl_communicator_test
step tp-model-test 120 tests.log $B/cuda_tp_model_test
TP_LIST=1,2
[ "$WORLD" -ge 4 ] && TP_LIST=1,2,4
step tp-bench 150 bench.log $B/phishard_tp_bench --tp $TP_LIST --batches 1,32,128 --context 1024 \
  --prefills 1x2048,8x2048 --json "$OUT/tp_bench.json"
if [ "${PHISHARD_TP_NCCL_SWEEP:-0}" = 1 ]; then
  # NCCL protocol/channel choices for the per-layer all-reduce sizes (TP=2 only).
  for v in NCCL_PROTO=LL NCCL_PROTO=LL128 NCCL_PROTO=Simple NCCL_MIN_NCHANNELS=32; do
    echo "== $v" >> "$OUT/bench.log"
    step "sweep-$v" 25 bench.log env "$v" $B/phishard_tp_bench --tp 2 --batches 1,32,128 \
      --context 1024 --prefills 1x2048
  done
fi
step served-tiny 75 served.log bash -c 'served "$@"' _ "$ROOT/models/tiny-phi-code" tiny "$WORLD"
if [ "${PHISHARD_TP_PHI2:-0}" = 1 ]; then
  step write-phi2 60 served.log $B/phishard_tp_bench --write-checkpoint /tmp/phi2-random \
    --tokenizer-dir "$ROOT/testdata/tokenizers/phi-2"
  step served-phi2 120 served.log bash -c 'served "$@"' _ /tmp/phi2-random phi2 "$WORLD"
fi
step model-test 60 tests.log $B/cuda_model_test
# World-size-1 regressions of the other CUDA tests, when bundled.
for t in cuda_lora_model_test cuda_graph_test; do
  [ -x $B/$t ] && step "${t%_test}" 90 tests.log $B/$t
done
if [ "${PHISHARD_TP_BENCH_AGAIN:-0}" = 1 ]; then  # run-to-run spread of the TP=1/TP=2 table
  step tp-bench-again 60 bench.log $B/phishard_tp_bench --tp 1,2 --batches 1,32,128 \
    --context 1024 --prefills 1x2048,8x2048 --json "$OUT/tp_bench_again.json"
fi

echo "== failures (first 30 lines)"
grep -hE "Failure|FAILED|error:|Expected|Which is|rank [0-9]:|failed" "$OUT/tests.log" 2>/dev/null |
  head -30
echo "== tp model test notes"
grep -hE "world 2 vs 1|exited .* after" "$OUT/tests.log" | head -12
echo "== bench"
grep -E "^(TP=|case|decode|prefill|== NCCL)" "$OUT/bench.log" | head -60
echo "== served"
grep -hE "^SERVED|^  \{" "$OUT/served.log" | cut -c1-300 | head -20
echo "== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
