# Sourced by the device check scripts (tools/device_*_check.sh): `step`, one budgeted, logged,
# summarised step of a device call. The caller sets OUT (log folder), BUDGET (seconds for the
# whole script) and START (its `date +%s`), then calls step_summary_header once.
#
#   step NAME TIMEOUT_S LOG COMMAND...
# runs COMMAND with at most TIMEOUT_S seconds (less when the budget has less left; skipped when
# under 10 s are left), appends its output to $OUT/LOG under a "===== NAME: COMMAND" header, and
# adds a line to $OUT/summary.txt: exit status, seconds, and a verdict read from its output
# (gtest's PASSED / FAILED / SKIPPED counts, a line starting with SERVED), TIMEOUT on status 124.
# shellcheck shell=bash

# The bundle tools/device_final_bundle.sh packed (.dev-final, carried to the device): unpacked,
# its env.sh sourced, phishard where the tests look for it (build-h11/bin; the test binaries carry
# /work/main paths, so /work/main points here when the copy lives elsewhere). Needs ROOT (the
# repository root); sets D (the bundle folder) and B (its binaries).
unpack_final_bundle() {
  if [ "$ROOT" != /work/main ] && [ ! -e /work/main ]; then mkdir -p /work && ln -s "$ROOT" /work/main; fi
  D=.dev-final
  python3 -c "import tarfile; tarfile.open('$D/bundle.txz').extractall('$D')"
  # shellcheck disable=SC1091
  source $D/env.sh
  B=$D/bin
  mkdir -p build-h11/bin && cp $B/phishard build-h11/bin/phishard &&
    ln -sf phishard build-h11/bin/lorax-server
}

# The gRPC integration suite the checks run against `serve --device cuda` (the bundle's
# integration tests but tp_launch_test).
CUDA_INTEGRATION_TESTS="serve_router_flow_test serve_process_test serve_bad_input_test
  serve_reflection_test metrics_process_test faults_test serve_adapters_test grpcurl_docs_test
  health_states_test serve_limits_test serve_churn_test"

# The bundle's single-GPU test binaries (in $B): every *_test but the integration tests, the
# *_bench_test timing tables and the two-GPU ones.
single_gpu_tests() {
  find "$B" -maxdepth 1 -name '*_test' -printf '%f\n' | sort |
    grep -vE '^(serve_|metrics_|faults_|grpcurl_|health_|tp_launch_)' | grep -v '_bench_test$' |
    grep -vE '^(nccl_communicator|custom_all_reduce|copy_engine_all_reduce|cuda_tp_model)_test$'
}

# Each test of CUDA_INTEGRATION_TESTS against `serve --device cuda` (a step each).
run_cuda_integration() {
  local t
  for t in $CUDA_INTEGRATION_TESTS; do
    PHISHARD_TEST_DEVICE=cuda step "cuda:$t" 80 integration.log "$B/$t"
  done
}

step_summary_header() {
  printf "%-30s %4s %7s  %s\n" step rc seconds result > "$OUT/summary.txt"
}

step() {
  local name=$1 tmo=$2 log=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 10)); then
    printf "%-30s %4s %7s  %s\n" "$name" - - "skipped (budget)" >> "$OUT/summary.txt"
    return
  fi
  ((tmo > left)) && tmo=$left
  echo "===== $name: $*" >> "$OUT/$log"
  local t0 t1 rc verdict
  t0=$(date +%s.%N)
  timeout -k 5 "$tmo" "$@" >> "$OUT/$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  verdict=$(awk -v m="===== $name: " 'index($0, m) == 1 {on = 1; next} /^===== / {on = 0} on' \
    "$OUT/$log" | awk '/^\[  PASSED  \] [0-9]+ test/ {p = $4} /^\[  FAILED  \] [0-9]+ test/ {f = $4}
      /^\[  SKIPPED \] [0-9]+ test/ {k = $4} /^SERVED/ {s = $0}
      END {if (p != "" || f != "" || k != "") printf "passed %d, failed %d, skipped %d ", p, f, k;
           if (s != "") printf "%s", s}')
  [ $rc -eq 124 ] && verdict="TIMEOUT ${tmo}s; $verdict"
  printf "%-30s %4d %7.1f  %s\n" "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "$verdict" \
    >> "$OUT/summary.txt"
}
