#!/usr/bin/env bash
# One device call (kind nvidia-h200) for the decode-attention / logits work: the decode-attention
# tests + compute-sanitizer, phishard_bench (the decode-attention kernels, Phi-2 steps at batch
# 1/32/256 and prefill 1x2048, once more at 16 layers for the per-layer slope), layer GEMMs at
# m = 256 and 2048, prefill attention beside PyTorch SDPA, the host-side token choice
# (phishard_chooser_bench), then the graph and model tests. Logs under $OUT; tables print last.
#
# Here, before the call (the binaries carry /work/wt-attn as their source root):
#   cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPHISHARD_CUDA=ON \
#     -DCMAKE_CUDA_ARCHITECTURES=90a
#   cmake --build build --target phishard_bench phishard_chooser_bench cuda_graph_test \
#     cuda_attention_test cuda_attention_bench_test cuda_model_test cuda_phi2_bench_test -j2
#   D=/work/main/.dev-attn; ../shared/tools/device-bundle $D build/bin/phishard_{,chooser_}bench \
#     build/tests/cuda_{graph,attention,attention_bench,model,phi2_bench}_test
#   strip --strip-unneeded $D/bin/* $D/lib/*; (cd $D && tar -czf bundle.tgz bin lib env.sh && \
#     rm -rf bin lib env.sh); cp tools/attn_decode_check.sh $D/check.sh
# Then: run(command="BUDGET_S=190 bash .dev-attn/check.sh", carry=[".dev-attn"], timeout_s=230).
set -u
OUT=${OUT:-/tmp/attn-check}
mkdir -p "$OUT"
BUDGET=${BUDGET_S:-200}
START=$(date +%s)
ROOT=$(pwd)
D=.dev-attn
if [ -f $D/bundle.tgz ] && [ ! -d $D/bin ]; then tar -xzf $D/bundle.tgz -C $D; fi
mkdir -p /work && [ -e /work/wt-attn ] || ln -s "$ROOT" /work/wt-attn
# shellcheck disable=SC1091
source $D/env.sh
B=$D/bin
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv > "$OUT/env.log" 2>&1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
step() {
  local name=$1 tmo=$2 log=$3
  shift 3
  if (( $(date +%s) - START + 5 > BUDGET )); then echo "$name skipped (budget)" >> "$SUMMARY"; return; fi
  echo "===== $name: $*" >> "$OUT/$log"
  local t0=$(date +%s) rc
  timeout "$tmo" "$@" >> "$OUT/$log" 2>&1
  rc=$?
  local v
  v=$(awk -v m="===== $name: " 'index($0, m) == 1 {on = 1; next} /^===== / {on = 0} on' "$OUT/$log" |
    grep -E "^\[  PASSED  \]|^\[  FAILED  \]|ERROR SUMMARY|RACECHECK SUMMARY" | tr '\n' ' ')
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s $v" >> "$SUMMARY"
}
step decode-tests 60 tests.log $B/cuda_graph_test --gtest_filter='CudaPagedDecode*'
if command -v compute-sanitizer > /dev/null; then
  step memcheck 30 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    $B/cuda_graph_test --gtest_filter='CudaPagedDecode.SmallCasesForSanitizer'
  step racecheck 30 sanitizer.log compute-sanitizer --tool racecheck --error-exitcode 9 \
    $B/cuda_graph_test --gtest_filter='CudaPagedDecode.SmallCasesForSanitizer'
fi
BENCH_DIR=/tmp
[ -d /dev/shm ] && BENCH_DIR=/dev/shm
export PHISHARD_BENCH_DIR=$BENCH_DIR
# Clocks and power once a second while the Phi-2 benches run (GEMM-heavy prefill: throttling?).
nvidia-smi dmon -s pc -d 1 > "$OUT/dmon.log" 2>&1 &
DMON=$!
step phi2-bench 75 bench.log $B/phishard_bench --json "$OUT/bench.json" --batches 1,32,256 \
  --contexts 1024,4096 --prefills 1x2048 --gemv-sweep false --steps 10
export PHISHARD_GPU_BENCH=1
step phi2-bench-16 40 bench16.log $B/phishard_bench --layers 16 --batches 256 --contexts 1024 \
  --prefills 1x2048 --gemv-sweep false --steps 10
step layer-gemms 20 bench.log $B/cuda_phi2_bench_test --gtest_filter='*LayerGemmTimes*'
step attention-tests 40 tests.log $B/cuda_attention_test
step attention-bench 30 attn.log env PHISHARD_ATTN_BENCH_SHAPES=h32d80_s2048,h32d80_s4096,h32d64_s2048 $B/cuda_attention_bench_test
step sdpa-bench 40 attn.log env PYTHONUNBUFFERED=1 python3 tools/attn_bench.py --shapes h32d80_s2048,h32d80_s4096,h32d64_s2048
unset PHISHARD_GPU_BENCH
step chooser 30 bench.log $B/phishard_chooser_bench --steps 3
step graph-tests 60 tests.log $B/cuda_graph_test --gtest_filter='-CudaPagedDecode*'
step model-tests 60 tests.log $B/cuda_model_test
echo "== kernels"; grep -E "^kernel paged_decode" "$OUT/bench.log"
echo "== steps"; grep -E "^(decode|prefill) " "$OUT/bench.log"
echo "== 16 layers"; grep -E "^(decode|prefill) " "$OUT/bench16.log"
echo "== gemm m 256 / 2048"; grep -E "gemm m +(256|2048)" "$OUT/bench.log"
echo "== dmon (power W, clocks MHz, 1 s)"; grep -v "^#" "$OUT/dmon.log" | head -30 | tr -s " " | paste -sd ";"
echo "== attention"; grep -hE "^RESULT" "$OUT/attn.log" | grep -E "s2048|s4096" | grep -v efficient
echo "== chooser"; grep -E "^chooser" "$OUT/bench.log"
echo "== failures"; grep -hE "Failure|FAILED|Which is|error" "$OUT"/tests.log "$OUT"/sanitizer.log 2>/dev/null | head -20
echo "== summary ($(( $(date +%s) - START )) s)"; cat "$SUMMARY"
