// phishard_kernel_bench's sustained mode (bench/sustain.cc): one kernel back to back for seconds,
// timed in windows, beside the GPU's energy counter, power and SM clock (NVML, read through
// dlopen of the driver's libnvidia-ml.so.1; the numbers are left out where it is missing), so a
// kernel's speed at the 700 W power cap and its energy per byte can be compared with the copy's.
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <string>

namespace phishard::bench {

struct SustainOptions {
  double ms = 3000;            // how long each kernel runs back to back
  double window_ms = 100;      // one printed line per window
  double idle_ms = 400;        // idle before each kernel (the clock recovers: first window = burst)
  int seqs = 256, ctx = 1024;  // the decode attention's shape (head dim 80, bf16)
  int heads = 32;              // its query (= KV) heads: 32 Phi-2's
  bool print_windows = true;
  // SustainCases: only the cases whose name contains one of these comma-separated parts ("": all)
  std::string only;
};

// Runs `launch` back to back for o.ms; `bytes` is what one launch moves (reads + writes) in DRAM.
// Prints one line a window (µs a launch, GB/s, watts, SM MHz, joules per GB) and a summary line
// "sustain-summary NAME ..." (first window; after the first 0.3 s: mean µs a launch, mean power and
// clock, energy per GB). `ref_gbps` (0: none): the burst copy bandwidth, for an "of copy" column.
struct SustainResult {
  double first_us = 0, late_us = 0, late_gbps = 0, late_watts = 0, late_mhz = 0, late_j_per_gb = 0;
};
SustainResult SustainKernel(const std::string& name, double bytes, const SustainOptions& o,
                            double ref_gbps, cudaStream_t s, const std::function<void()>& launch);

// The sustained cases: the 2 GiB device copy, the same bytes through SM kernels (copy, read, read
// + FMA: bench/sustain_kernels.h), the decode attention at (o.seqs, o.ctx) in each
// PagedDecodeVariant, the attention taken apart ("mix" cases, SmAttnMix: its access pattern, then
// its dot product, softmax and shared-memory staging one at a time; the pipelined kernel under a
// random block table), and the decode step's fc1 + GELU GEMM at M = o.seqs (cold weights).
void SustainCases(cudaStream_t s, const SustainOptions& o);

}  // namespace phishard::bench
