#!/usr/bin/env bash
# The decode stream (PHISHARD_DECODE_STREAM=1, model/cuda_phi_stream.cc) through everything that
# runs 1-row decode steps, on one GPU: every single-GPU test binary of the bundle with the stream
# on wherever a test leaves the option to the environment (cuda_model_test's HF goldens included),
# the gRPC integration suite against `serve --device cuda` with it on, then b1 steps with it on and
# off (phishard_bench). Not under compute-sanitizer: it serialises kernels, and the stream's
# attention must run beside it (memcheck of the default path: tools/device_final_check.sh).
# Here, before the call: tools/device_final_bundle.sh. Then:
#   run(command="OUT=$OUT bash tools/device_stream_check.sh", carry=[".dev-final"],
#       kind="nvidia-h200", timeout_s=400)
set -u
OUT=${OUT:-/tmp/phishard-stream-check}
mkdir -p "$OUT"
BUDGET=${PHISHARD_CHECK_BUDGET_S:-330}
START=$(date +%s)
ROOT=$(pwd)
# shellcheck source=tools/device_step.sh
source "$ROOT/tools/device_step.sh"
unpack_final_bundle  # D, B; phishard in build-h11/bin
step_summary_header
export PHISHARD_DECODE_STREAM=1
for t in $(single_gpu_tests); do
  step "$t" 90 gpu_tests.log "$B/$t"
done
run_cuda_integration
for on in 1 0; do
  PHISHARD_DECODE_STREAM=$on step "bench stream=$on" 60 bench.log $B/phishard_bench --batches 1,2 \
    --contexts 128,1024,2048 --prefills "" --gemv-sweep 0 --steps 40
done
cat "$OUT/summary.txt"
grep -E "decode (graph|greedy) b(1|2) " "$OUT/bench.log"
