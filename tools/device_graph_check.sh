#!/usr/bin/env bash
# One device call (kind nvidia-h200) for the decode-graph work: the decode-path tests, the Phi-2
# benchmark against its hardware floor and the PyTorch peer (bench/run_all.sh), every other GPU
# test, then compute-sanitizer on the new kernels while time is left. Logs under $OUT (8 files);
# the comparison table and a summary print last.
#
# Here, before the call:
#   cmake -S . -B build-h11 -G Ninja -DCMAKE_BUILD_TYPE=Release -DPHISHARD_CUDA=ON \
#     -DCMAKE_CUDA_ARCHITECTURES=90a
#   cmake --build build-h11 --target phishard_bench cuda_graph_test cuda_ops_test \
#     cuda_attention_test cuda_model_test -j2
#   rm -rf .device-bundle-h11 && ../shared/tools/device-bundle .device-bundle-h11 \
#     build-h11/bin/phishard_bench build-h11/tests/cuda_{graph,ops,attention,model}_test
#   strip --strip-unneeded .device-bundle-h11/bin/* .device-bundle-h11/lib/*
#   (cd .device-bundle-h11 && tar -czf bundle.tgz bin lib env.sh && rm -rf bin lib env.sh)
# (.device-bundle-h11 is in .git/info/exclude.) Then:
#   run(command="bash tools/device_graph_check.sh", carry=[".device-bundle-h11"], timeout_s=270)
set -u
OUT=${OUT:-/tmp/phishard-graph-check}
mkdir -p "$OUT"
BUDGET=${PHISHARD_CHECK_BUDGET_S:-255}
START=$(date +%s)
ROOT=$(pwd)
# Test binaries carry the source path they were built from (models, golden fixtures): point it
# here. /tmp/h11-src is a snapshot tree used when the shared tree's server/ did not build.
for BUILD_ROOT in /work/main /tmp/h11-src; do
  if [ "$ROOT" != "$BUILD_ROOT" ] && [ ! -e "$BUILD_ROOT" ]; then
    mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT"
  fi
done
BUNDLE=.device-bundle-h11
if [ -f $BUNDLE/bundle.tgz ] && [ ! -d $BUNDLE/bin ]; then tar -xzf $BUNDLE/bundle.tgz -C $BUNDLE; fi
# shellcheck disable=SC1091
source $BUNDLE/env.sh
B=$BUNDLE/bin
{
  echo "== $(date -u +%FT%TZ) repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  ldd $B/phishard_bench | grep -E "cublas|cudart|not found" || true
  nproc; free -g | head -2
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

SUMMARY="$OUT/summary.txt"
printf "%-22s %4s %8s  %s\n" step rc seconds result > "$SUMMARY"
step() {  # step NAME TIMEOUT_S LOG COMMAND...
  local name=$1 tmo=$2 log=$3
  shift 3
  local now left
  now=$(date +%s)
  left=$(( BUDGET - (now - START) ))
  if (( left < 15 )); then
    printf "%-22s %4s %8s  %s\n" "$name" "-" "-" "skipped (budget)" >> "$SUMMARY"
    return
  fi
  (( tmo > left )) && tmo=$left
  echo "===== $name: $*" >> "$OUT/$log"
  local t0 rc t1 verdict
  t0=$(date +%s.%N)
  timeout "$tmo" "$@" >> "$OUT/$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  verdict=$(awk -v m="===== $name: " 'index($0, m) == 1 {on = 1; next} on' "$OUT/$log" |
    awk '/^\[  PASSED  \] [0-9]+ test/ {p = $4} /^\[  FAILED  \] [0-9]+ test/ {f = $4}
         /^\[  SKIPPED \] [0-9]+ test/ {k = $4} /ERROR SUMMARY/ {e = $0}
         END {if (p != "" || f != "" || k != "") printf "passed %d, failed %d, skipped %d ", p, f, k;
              if (e != "") printf "%s", e}')
  [ $rc -eq 124 ] && verdict="TIMEOUT after ${tmo}s; $verdict"
  printf "%-22s %4d %8.1f  %s\n" "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "${verdict:0:110}" \
    >> "$SUMMARY"
}

step graph-test 90 tests.log $B/cuda_graph_test
step model-test 90 tests.log $B/cuda_model_test
BENCH_TIMEOUT_S=70 PEER_TIMEOUT_S=60 step run_all 135 run_all.log \
  bash bench/run_all.sh --bin $B/phishard_bench --out "$OUT"
step ops-test 60 tests.log $B/cuda_ops_test
step attention-test 60 tests.log $B/cuda_attention_test
if command -v compute-sanitizer > /dev/null; then
  step memcheck-decode 60 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/cuda_graph_test --gtest_filter='*Sanitizer*:*ReplayIsBitIdenticalToEager/0'
  step racecheck-decode 60 sanitizer.log compute-sanitizer --tool racecheck --error-exitcode 9 \
    $B/cuda_graph_test --gtest_filter='*Sanitizer*'
fi

echo "== failures (first 30 lines)"
grep -hE "Failure|FAILED|error:|Expected|Which is|rel [0-9]|differs" "$OUT/tests.log" 2>/dev/null |
  head -30
echo "== graph test notes"
grep -hE "graphs, |decode graphs .* took" "$OUT/tests.log" | head -8
echo "== bench"
sed -n '/^step /,/^{/p' "$OUT/run_all.log" 2>/dev/null | grep -v '^{' | head -40
echo "== comparison"
sed -n '/TB\/s, bf16 GEMM/,$p' "$OUT/run_all.log" | tail -12
echo "== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
