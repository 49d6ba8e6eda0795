// Device-side helpers of the two-rank peer-to-peer collectives (custom_all_reduce.cu,
// copy_engine_all_reduce.cu): system-scope release/acquire on 32-bit flags that the peer GPU
// writes over NVLink, the bounded wait for a peer's flag, and the two-rank sum of packed elements.
#pragma once

#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/custom_all_reduce_cuda.h"
#include "kernels/cuda/spin_wait.cuh"  // GlobalTimerNs

namespace phishard::cuda {

__device__ __forceinline__ void StoreReleaseSys(uint32_t* addr, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t LoadAcquireSys(const uint32_t* addr) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(addr) : "memory");
  return v;
}

// One thread: spins until `*flag` reaches `epoch` (cyclic: (int32)(flag - epoch) >= 0, so a peer
// already a call ahead releases it too). Returns kCustomAllReduceOk, or kCustomAllReduceAborted
// when *abort_flag (device memory) turned nonzero, or kCustomAllReduceTimedOut after timeout_ns.
// Both checks read only device memory and the SM's timer: nothing in the loop may take long once
// the flag is there (a read of mapped host memory here once cost ~100 us a wait, perf-log 00:47).
__device__ __forceinline__ int WaitPeerFlag(const uint32_t* flag, uint32_t epoch,
                                            const int* abort_flag, uint64_t timeout_ns) {
  const uint64_t start = GlobalTimerNs();
  for (uint32_t it = 0;; ++it) {
    if (static_cast<int32_t>(LoadAcquireSys(flag) - epoch) >= 0) return kCustomAllReduceOk;
    if ((it & 15) == 15) {
      if (*static_cast<const volatile int*>(abort_flag) != 0) return kCustomAllReduceAborted;
      if (GlobalTimerNs() - start > timeout_ns) return kCustomAllReduceTimedOut;
    }
  }
}

// kVec elements of T moved as one (16-byte packs, or single elements).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Element-wise float(a) + float(b), rounded once to T: commutative, so both ranks of a pair get
// the same bits, and they are NCCL's two-rank sum.
template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> AddPack(const Pack<T, kVec>& a, const Pack<T, kVec>& b) {
  Pack<T, kVec> r;
#pragma unroll
  for (int k = 0; k < kVec; ++k) r.v[k] = FromFloat<T>(ToFloat(a.v[k]) + ToFloat(b.v[k]));
  return r;
}

}  // namespace phishard::cuda
