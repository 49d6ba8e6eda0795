// The SM's nanosecond timer (%globaltimer; the peer collectives' waits use it too), and the waits
// of kernels on another block's or kernel's progress through device memory (the decode stream,
// kernels/cuda/decode_stream.cu, and the decode attention beside it,
// kernels/cuda/paged_decode_common.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace phishard::cuda {

__device__ __forceinline__ int LoadAcquireGpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Spins (the calling thread) until done() returns true, a short sleep between rounds. For waits on
// work that is already running by construction (the decode stream and the attention beside it),
// so a wait past ~10 s is a bug: trap (a sticky device error the host reports) instead of a hang.
template <typename Done>
__device__ __forceinline__ void SpinUntil(Done&& done) {
  uint64_t start = 0;
  for (int n = 0; !done(); ++n) {
    __nanosleep(32);
    if ((n & 1023) == 1023) {
      const uint64_t now = GlobalTimerNs();
      if (start == 0) start = now;
      if (now - start > 10000000000ull) __trap();
    }
  }
}

// SpinUntil *p >= target, an acquire load each round.
__device__ __forceinline__ void SpinUntilAtLeast(const int* p, int target) {
  SpinUntil([&] { return LoadAcquireGpu(p) >= target; });
}

}  // namespace phishard::cuda
