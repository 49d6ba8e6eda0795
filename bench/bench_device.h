// Device helpers the CUDA benchmark programs share (phishard_kernel_bench's kernel_bench.cc and
// sustain.cc): an allocation and a random fill that end the program with a message naming the
// program when they fail. CUDA builds only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "kernels/cuda/random_fill_cuda.h"
#include "kernels/device.h"

namespace phishard::bench {

inline void DieUnless(bool ok, const char* prog, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "%s: %s failed\n", prog, what);
    std::exit(1);
  }
}

// `bytes` of device memory (never freed by the benches: they run once and exit).
inline void* DeviceAllocOrDie(size_t bytes, const char* prog) {
  void* p = nullptr;
  DieUnless(DeviceMalloc(&p, bytes) == 0, prog, "DeviceMalloc");
  return p;
}

// `count` elements of `t` uniform in [-spread, spread) from `seed` (RandomFillCuda), on `s`.
inline void RandomFillOrDie(void* p, size_t count, uint64_t seed, DataType t, cudaStream_t s,
                            const char* prog, float spread = 1.0f) {
  DieUnless(RandomFillCuda({.data = p,
                            .count = static_cast<int64_t>(count),
                            .spread = spread,
                            .seed = seed,
                            .dtype = t},
                           s) == KernelStatus::kOk,
            prog, "RandomFill");
}

}  // namespace phishard::bench
