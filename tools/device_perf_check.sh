#!/usr/bin/env bash
# The perf helper's device check (docs/perf-log.md, "perf helper" runs 1-2): GPU tests named in
# PRE_TESTS / POST_TESTS, the gRPC integration suite against `phishard serve --device cuda`
# (PHISHARD_TEST_DEVICE=cuda; every integration binary but tp_launch_test), bench/run_all.sh when
# phishard_bench is bundled, compute-sanitizer memcheck of cuda_graph_test --gtest_filter=$MEMCHECK.
#
# Here, before the call (the test binaries have /work/wt-perf compiled in; use your worktree's
# name in the `ln -s` below and in D):
#   cmake --build build --target phishard phishard_bench cuda_graph_test cuda_model_test \
#     cuda_ops_test serve_router_flow_test serve_process_test serve_bad_input_test \
#     serve_reflection_test metrics_process_test faults_test serve_adapters_test -j2
#   /work/shared/tools/device-bundle /work/main/.dev-perf build/bin/phishard ... (the above)
#   cd /work/main/.dev-perf && strip --strip-unneeded bin/* lib/* &&
#     tar -cJf bundle.txz bin lib env.sh && rm -rf bin lib env.sh   # xz: gz was over 64 MiB
#   cp tools/device_perf_check.sh /work/main/.dev-perf/check.sh
# Then: run(command="PRE_TESTS=cuda_graph_test POST_TESTS='cuda_model_test cuda_ops_test' \
#   MEMCHECK='Shapes/CudaGemvTest.*' BUDGET_S=235 bash .dev-perf/check.sh", carry=[".dev-perf"],
#   timeout_s=265)
set -u
OUT=${OUT:-/tmp/perf-check}
mkdir -p "$OUT"
BUDGET=${BUDGET_S:-200}
START=$(date +%s)
ROOT=$(pwd)
mkdir -p /work && [ -e /work/wt-perf ] || ln -s "$ROOT" /work/wt-perf
D=.dev-perf
python3 -c "import tarfile; tarfile.open('$D/bundle.txz').extractall('$D')"
# shellcheck disable=SC1091
source $D/env.sh
export NCCL_NVLS_ENABLE=0
# The integration tests start /work/wt-perf/build/bin/phishard (compiled-in PHISHARD_BIN).
mkdir -p build/bin && cp $D/bin/phishard build/bin/phishard && ln -sf phishard build/bin/lorax-server
B=$D/bin
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } > "$OUT/env.log" 2>&1
SUMMARY="$OUT/summary.txt"
printf "%-26s %4s %7s  %s\n" step rc seconds result > "$SUMMARY"
step() {  # step NAME TIMEOUT_S LOG COMMAND...
  local name=$1 tmo=$2 log=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 10 )); then printf "%-26s %4s %7s  %s\n" "$name" - - "skipped (budget)" >> "$SUMMARY"; return; fi
  (( tmo > left )) && tmo=$left
  echo "===== $name: $*" >> "$OUT/$log"
  local t0=$(date +%s.%N)
  timeout "$tmo" "$@" >> "$OUT/$log" 2>&1
  local rc=$? t1=$(date +%s.%N)
  local verdict
  verdict=$(awk -v m="===== $name: " 'index($0, m) == 1 {on = 1; next} /^===== / {on = 0} on' "$OUT/$log" |
    awk '/^\[  PASSED  \] [0-9]+ test/ {p = $4} /^\[  FAILED  \] [0-9]+ test/ {f = $4}
         /^\[  SKIPPED \] [0-9]+ test/ {k = $4}
         END {if (p != "" || f != "" || k != "") printf "passed %d, failed %d, skipped %d", p, f, k}')
  [ $rc -eq 124 ] && verdict="TIMEOUT ${tmo}s; $verdict"
  printf "%-26s %4d %7.1f  %s\n" "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "$verdict" >> "$SUMMARY"
}
for t in ${PRE_TESTS:-}; do step "$t" 90 gpu_tests.log $B/$t; done
export PHISHARD_TEST_DEVICE=cuda
for t in serve_router_flow_test serve_process_test serve_bad_input_test serve_reflection_test \
         metrics_process_test faults_test serve_adapters_test; do
  step "cuda:$t" 80 integration.log $B/$t
done
unset PHISHARD_TEST_DEVICE
if [ -x $B/phishard_bench ]; then
  BENCH_TIMEOUT_S=${BENCH_S:-70} PEER_TIMEOUT_S=${PEER_S:-60} step run_all 140 run_all.log \
    bash bench/run_all.sh --bin $B/phishard_bench --out "$OUT"
fi
for t in ${POST_TESTS:-}; do step "$t" 90 gpu_tests.log $B/$t; done
if [ -n "${MEMCHECK:-}" ] && command -v compute-sanitizer > /dev/null; then
  step memcheck-gemv 60 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/cuda_graph_test --gtest_filter="$MEMCHECK"
fi
echo "== failures"
grep -hE "Failure|FAILED|Expected|Which is|parts from|the CUDA shard says|ERROR SUMMARY" "$OUT"/integration.log "$OUT"/gpu_tests.log "$OUT"/sanitizer.log 2>/dev/null | head -40
echo "== linear kernels (us, of copy bw)"
[ -f "$OUT/bench.json" ] && python3 -c "
import json; d = json.load(open('$OUT/bench.json'))
for k in d['kernels']:
    if 'm' in k: print(f\"{k['op']:<24} m={k['m']} {k['us']:8.1f} us {k['of_copy_bw']:.2f}\")
"
echo "== decode variants"
[ -f "$OUT/run_all.log" ] && grep -E "^decode .* b[1248] ctx1024" "$OUT/run_all.log" | head -40
echo "== bench"
[ -f "$OUT/run_all.log" ] && sed -n '/TB\/s, bf16 GEMM/,$p' "$OUT/run_all.log" | tail -12
echo "== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
