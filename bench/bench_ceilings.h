// phishard_bench's hardware ceilings, measured on the device in the same run (copy bandwidth and a
// big cuBLASLt GEMM's rate), and the decode step's big kernels timed alone (bench_ceilings.cc).
// CUDA builds only.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <functional>

#include "absl/status/status.h"
#include "kernels/device.h"
#include "nlohmann/json.hpp"

#define BENCH_CHECK(cond, what)                                    \
  do {                                                             \
    if (!(cond)) {                                                 \
      std::fprintf(stderr, "phishard_bench: %s failed\n", (what)); \
      std::exit(1);                                                \
    }                                                              \
  } while (0)

#define BENCH_OK(expr)                                                                 \
  do {                                                                                 \
    const absl::Status _st = (expr);                                                   \
    if (!_st.ok()) {                                                                   \
      std::fprintf(stderr, "phishard_bench: %s: %s\n", #expr, _st.ToString().c_str()); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

namespace phishard::bench {

// The two ceilings, measured on this device now.
struct Ceilings {
  double copy_bytes_per_s = 0;  // device-to-device copy, bytes read + written per second
  double gemm_flops = 0;        // bf16 cuBLASLt GEMM, float32 accumulation, random data
};

// Device-event milliseconds of one `body` (which enqueues on `stream`), averaged over `reps`
// back-to-back runs after one warm-up run.
float TimeMs(cudaStream_t stream, int reps, const std::function<void()>& body);

// Copy bandwidth (2 GiB each way) and an 8192^3 bf16 GEMM's rate.
Ceilings MeasureCeilings();

// The decode step's big kernels alone (Phi-2's linear layers at m = 1, 4, 8 through the GEMV
// kernel and cuBLASLt; the decode attention at a few shapes and every variant): one JSON row per
// kernel, also printed.
nlohmann::json KernelTimes(const Ceilings& ceil);

}  // namespace phishard::bench
