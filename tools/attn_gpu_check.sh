#!/usr/bin/env bash
# One device call for the prefill attention kernel (device tool, kind nvidia-h200): the attention
# tests (every tiling vs the CPU reference, twice each), compute-sanitizer on the small cases, the
# kernel benchmark beside PyTorch SDPA (FlashAttention / cuDNN / memory-efficient) on the same
# GPU, the SASS instruction mix of the main kernel, then the model tests and the Phi-2-shaped
# step timings if time is left. Logs go to $OUT; one table is printed last.
#
# Here, before the call:
#   cmake -S . -B build-attn -G Ninja -DCMAKE_BUILD_TYPE=Release -DPHISHARD_CUDA=ON \
#     -DCMAKE_CUDA_ARCHITECTURES=90a
#   cmake --build build-attn --target cuda_attention_test cuda_attention_bench_test \
#     cuda_model_test cuda_phi2_bench_test -j2
#   rm -rf .attn-bundle && ../shared/tools/device-bundle .attn-bundle build-attn/tests/cuda_*_test
#   strip --strip-unneeded .attn-bundle/bin/* .attn-bundle/lib/*
#   (cd .attn-bundle && tar -czf bundle.tgz bin lib env.sh && rm -rf bin lib env.sh)
#   echo /work/main > .attn-bundle/src_root   # the -S path of that build (default /work/main)
#   echo /.attn-bundle/ >> .git/info/exclude   # once
# Then: run(command="bash tools/attn_gpu_check.sh", carry=[".attn-bundle"], timeout_s=270).
set -u
OUT=${OUT:-/tmp/phishard-attn-check}
mkdir -p "$OUT"
BUDGET=${PHISHARD_CHECK_BUDGET_S:-245}  # stop starting new steps after this many seconds
START=$(date +%s)
ROOT=$(pwd)

if [ -f .attn-bundle/bundle.tgz ] && [ ! -d .attn-bundle/bin ]; then
  tar -xzf .attn-bundle/bundle.tgz -C .attn-bundle
fi
# The test binaries carry absolute paths of the source tree they were built from (PHISHARD_MODELS,
# golden fixtures): .attn-bundle/src_root names it (default /work/main); point it at this copy.
SRC_ROOT=$(cat .attn-bundle/src_root 2>/dev/null || echo /work/main)
if [ ! -e "$SRC_ROOT/models" ]; then
  mkdir -p "$(dirname "$SRC_ROOT")" && ln -sfn "$ROOT" "$SRC_ROOT"
fi
# shellcheck disable=SC1091
source .attn-bundle/env.sh
B=.attn-bundle/bin
{
  echo "== $(date -u +%FT%TZ) repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

SUMMARY="$OUT/summary.txt"
printf "%-24s %4s %8s  %s\n" step rc seconds result > "$SUMMARY"

# step NAME TIMEOUT_S LOG COMMAND... : runs unless the budget is spent; records rc, time and the
# step's own gtest totals.
step() {
  local name=$1 tmo=$2 log=$3
  shift 3
  if (( $(date +%s) - START + 10 > BUDGET )); then
    printf "%-24s %4s %8s  %s\n" "$name" "-" "-" "skipped (budget)" >> "$SUMMARY"
    return
  fi
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
  printf "%-24s %4d %8.1f  %s\n" "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "${verdict:0:110}" \
    >> "$SUMMARY"
}

step attention-tests 100 attention.log $B/cuda_attention_test
export PHISHARD_GPU_BENCH=1
step attention-bench 60 bench.log $B/cuda_attention_bench_test
step sdpa-bench 90 bench.log env PYTHONUNBUFFERED=1 python3 tools/attn_bench.py
if command -v compute-sanitizer > /dev/null; then
  step memcheck 60 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/cuda_attention_test --gtest_filter='*Sanitizer*'
  step racecheck 90 sanitizer.log compute-sanitizer --tool racecheck --error-exitcode 9 \
    $B/cuda_attention_test --gtest_filter='*Sanitizer*'
fi
if command -v ncu > /dev/null; then
  # One launch of kQ128 at 4096 x 32 heads x 80 (the first launch of that shape), one of
  # kQ128Warps8 at 1024 (demangled names read `PrefillMmaKernel<__nv_bfloat16, (int)80, ...>`).
  step ncu 60 ncu.log env PHISHARD_ATTN_BENCH_SHAPES=h32d80_s4096 ncu --clock-control none \
    --kernel-name regex:PrefillMmaKernel --launch-count 1 --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section LaunchStats --section SourceCounters \
    $B/cuda_attention_bench_test
  step ncu-w8 60 ncu.log env PHISHARD_ATTN_BENCH_SHAPES=h32d80_s1024 ncu --clock-control none \
    --kernel-name-base demangled --kernel-name 'regex:PrefillMmaKernel<[^,]*, \(int\)80, \(int\)8,' \
    --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    --section Occupancy $B/cuda_attention_bench_test
fi
if command -v cuobjdump > /dev/null; then
  # Instruction mix of the bf16 head_dim 80, 4 warps x 32 rows, 64-key kernel (into ncu.log:
  # at most 8 files come back).
  cuobjdump -sass $B/cuda_attention_test 2>/dev/null |
    awk '/Function : / {on = /PrefillMmaKernelI13__nv_bfloat16Li80ELi4ELi2ELi64E/} on' \
    > /tmp/attn_sass.txt
  {
    echo "===== SASS mix: $(grep -c 'Function :' /tmp/attn_sass.txt) function(s)"
    grep -oE '^ +/\*[0-9a-f]{4}\*/ +(@!?U?P[0-9T] +)?[A-Z][A-Z0-9_.]+' /tmp/attn_sass.txt |
      awk '{print $NF}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -25
  } > /tmp/attn_sass_mix.txt
  cat /tmp/attn_sass_mix.txt >> "$OUT/ncu.log"
fi
step model-tests 120 model.log $B/cuda_model_test
BENCH_DIR=/tmp
if [ -d /dev/shm ] && [ "$(df -k --output=avail /dev/shm | tail -1)" -gt 8000000 ]; then
  BENCH_DIR=/dev/shm
fi
export PHISHARD_BENCH_DIR=$BENCH_DIR
step phi2-bench 120 model.log $B/cuda_phi2_bench_test
rm -rf "$BENCH_DIR"/phishard-phi2-L* 2>/dev/null
# The kernel timings once more (run-to-run spread: a difference smaller than this is noise).
step attention-bench-2 60 bench2.log $B/cuda_attention_bench_test

echo "== SASS mix (PrefillMmaKernel bf16 hd80 q128)"
head -16 /tmp/attn_sass_mix.txt 2>/dev/null | tr '\n' ' '
echo
echo "== phi-2 steps"
grep -hE "prefill 1 x|attention prefill|decode 1 seq" "$OUT/model.log" 2>/dev/null | head -8
echo "== failures (first 25 lines)"
grep -hE "Failure|FAILED|error:|Which is|max_abs|differ" "$OUT"/attention.log "$OUT"/bench.log \
  "$OUT"/model.log 2>/dev/null | head -25
cat > /tmp/attn_table.py <<'PY'
import re, sys
rows, impls = {}, []
for line in open(sys.argv[1]):
    m = re.match(r"RESULT impl=(\S+) shape=(\S+) (?:ms=(\S+) tflops=(\S+))?", line)
    if not m:
        continue
    impl, shape, ms, tf = m.groups()
    if impl not in impls:
        impls.append(impl)
    rows.setdefault(shape, {})[impl] = f"{float(ms):.3f} ({float(tf):.0f})" if ms else "n/a"
print("shape".ljust(20) + "".join(i.replace("phishard-", "").ljust(15) for i in impls))
for shape, r in rows.items():
    print(shape.ljust(20) + "".join(r.get(i, "-").ljust(15) for i in impls))
PY
echo "== attention prefill: ms (TFLOP/s)"
python3 /tmp/attn_table.py "$OUT/bench.log" 2>/dev/null
echo "== again (spread)"
python3 /tmp/attn_table.py "$OUT/bench2.log" 2>/dev/null
echo "== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
