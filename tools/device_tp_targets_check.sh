#!/usr/bin/env bash
# One nvidia-h200-x2 call for issue #6's targets (TP=2 decode b128 >= 1.6x TP=1, prefill 1x2048
# <= 0.6x TP=1): every TP GPU test, phishard_tp_bench TP=1 vs TP=2 (decode modes view / copy /
# greedy, the MLP-branch variants, prefill row chunks x all-reduce modes, the all-reduce share),
# a second bench process for the run-to-run spread, a served TP=2 `phishard launch --device cuda`
# with the default all-reduce against a TP=1 `serve` (router-style client, golden prompts), and
# an ncu per-kernel table of one b128 step without collectives at TP=1 and on rank 0 of TP=2.
# Logs under $OUT (8 files at most come back); a summary prints last.
#
# Here, before the call (worktree wt-tp6, build dir build):
#   cmake --build build --target phishard phishard_tp_bench cuda_tp_model_test \
#     nccl_communicator_test custom_all_reduce_test copy_engine_all_reduce_test -j2
#   D=/work/main/.dev-tp6; rm -rf $D && /work/shared/tools/device-bundle $D build/bin/phishard \
#     build/bin/phishard_tp_bench build/tests/{cuda_tp_model,nccl_communicator}_test \
#     build/tests/{custom,copy_engine}_all_reduce_test
#   strip --strip-unneeded $D/bin/* $D/lib/*
#   cp tools/device_tp_targets_check.sh tools/device_tp_served.sh tools/device_step.sh $D/
#   (cd $D && tar -cf - bin lib env.sh | xz -T1 -9 > bundle.txz && rm -rf bin lib env.sh)
# (xz -9: its 64 MiB window folds the six binaries' identical kernels: 17 MB against 61 MB of gzip,
# which with the tree would pass the 64 MiB a call carries).
# Then: run(command="bash .dev-tp6/device_tp_targets_check.sh", carry=[".dev-tp6"],
#           kind="nvidia-h200-x2", timeout_s=195)
# Environment: PHISHARD_CHECK_BUDGET_S (default 160), TP_NCU=0 leaves the ncu table out,
# TP_TESTS names the test binaries (without _test) to run, TP_BENCH_ARGS / TP_BENCH_AGAIN_ARGS
# replace the two bench invocations' case lists.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/phishard-tp-targets}
mkdir -p "$OUT"
BUDGET=${PHISHARD_CHECK_BUDGET_S:-160}
START=$(date +%s)
ROOT=$(pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Test binaries carry the source path they were built from (models, golden fixtures).
if [ ! -e /work/wt-tp6 ]; then mkdir -p /work && ln -s "$ROOT" /work/wt-tp6; fi
if [ -f "$HERE/bundle.txz" ] && [ ! -d "$HERE/bin" ]; then tar -xJf "$HERE/bundle.txz" -C "$HERE"; fi
# shellcheck disable=SC1091
source "$HERE/env.sh"
B=$HERE/bin
{
  echo "== $(date -u +%FT%TZ) $(git -C "$ROOT" log -1 --format=%h 2> /dev/null)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv
  nvidia-smi topo -m 2> /dev/null | head -4
  ldd "$B/phishard" | grep -E "nccl|cudart|not found" || true
} > "$OUT/tests.log" 2>&1
cat "$OUT/tests.log"

# shellcheck source=tools/device_step.sh
source "$HERE/device_step.sh"
# shellcheck source=tools/device_tp_served.sh
source "$HERE/device_tp_served.sh"
step_summary_header
export -f served
export B ROOT OUT

for t in ${TP_TESTS:-custom_all_reduce copy_engine_all_reduce nccl_communicator cuda_tp_model}; do
  step "$t" 60 tests.log "$B/${t}_test"
done

nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu --format=csv \
  -lms 500 > "$OUT/clocks.csv" 2> /dev/null &
SMI=$!
# Prefill row chunks 1-3 at 1x2048 too (min rows 496: up to 4 chunks of a 2,048-row step), each
# with the all-reduce modes (auto runs as custom at W=2 with peer access; copy only on chunked
# steps) and the sharded prefill forms off / on (--prefill-forms); decode in all three ways of
# taking the logits, at TP=2 with the MLP branch off (0) and in modes 2 / 3 / 4 (--mlp-tp).
# shellcheck disable=SC2206
BENCH_ARGS=(${TP_BENCH_ARGS:---tp 1,2 --batches 1,32,128 --context 1024 --decode-modes view,copy,greedy
  --mlp-tp 0,2,3,4 --prefills 1x2048,8x2048 --prefill-chunks 1,2,3 --prefill-min-rows 496
  --allreduce-modes custom,copy,nccl --prefill-forms 0,3})
step tp-bench 80 bench.log "$B/phishard_tp_bench" "${BENCH_ARGS[@]}" --json "$OUT/tp_bench.json"
kill "$SMI" 2> /dev/null

step served-tiny 50 served.log bash -c 'served "$@"' _ "$ROOT/models/tiny-phi-code" tiny 2

# shellcheck disable=SC2206
AGAIN_ARGS=(${TP_BENCH_AGAIN_ARGS:---tp 1,2 --batches 128 --context 1024 --decode-modes view,greedy
  --prefills 1x2048 --prefill-chunks 1,2 --prefill-min-rows 496 --allreduce-modes auto,copy
  --prefill-forms 0,1,2,3})
step tp-bench-again 30 bench.log "$B/phishard_tp_bench" "${AGAIN_ARGS[@]}"

if [ "${TP_NCU:-1}" = 1 ]; then
  NCU=/usr/local/cuda/bin/ncu
  command -v ncu > /dev/null && NCU=$(command -v ncu)
  # One rank's kernels of the b128 steps without collectives (NVTX ranges of tp_bench.cc).
  step ncu-b128 40 bench.log "$NCU" --clock-control none --metrics gpu__time_duration.sum \
    --log-file /tmp/ncu_b128.log --nvtx --nvtx-include "r0-b128-view-mlp-1-compute/" \
    --nvtx-include "r0-b128-view-mlp0-compute/" --export /tmp/ncu_b128 --force-overwrite \
    "$B/phishard_tp_bench" --tp 1,2 --batches 128 --context 1024 --decode-modes view --mlp-tp 0 \
    --prefills 1x128 --steps 2
  if [ -f /tmp/ncu_b128.ncu-rep ]; then
    "$NCU" --import /tmp/ncu_b128.ncu-rep --csv --page raw \
      2> /dev/null | gzip > "$OUT/ncu.csv.gz"
  fi
  tail -3 /tmp/ncu_b128.log >> "$OUT/bench.log"
fi

echo "== failures (first 30 lines)"
grep -hE "Failure|FAILED|error:|Expected|Which is|rank [0-9]:|failed" "$OUT/tests.log" \
  2> /dev/null | head -30
echo "== bench"
grep -E "^(TP=|case|decode|prefill|phishard_tp_bench)" "$OUT/bench.log" | head -120
echo "== served"
grep -hE "^SERVED|^  \{|^== TP" "$OUT/served.log" | cut -c1-300 | head -20
echo "== summary ($(($(date +%s) - START)) s)"
cat "$OUT/summary.txt"
