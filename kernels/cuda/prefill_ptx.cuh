// Internal to the prefill attention kernels (paged_attention_prefill*.cu): the PTX wrappers both
// the mma.sync and the wgmma kernel use (cp.async gathers, float -> 16-bit packing; their exp2 is
// cuda::Exp2Ftz).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace phishard {
namespace prefill_ptx {

// ---- PTX wrappers (sm_80+) ----------------------------------------------------------------------
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; with valid == false it reads nothing and writes
// 16 zero bytes (src-size 0), which is how keys past the end and bad block ids become zero K/V.
// No "memory" clobber: the block-table loads feeding several copies may then all be in flight at
// once; the copies stay ordered against the commit/wait/ldmatrix asm (all volatile).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
// CpAsync16 through L1 (.ca): a warp whose lanes each copy 16 bytes of a different row reads
// half of each 32-byte sector; with .ca the other half, copied by the next instruction, comes
// from L1 instead of a second L2 request.
__device__ __forceinline__ void CpAsync16Ca(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
// Waits until at most N of this thread's most recent cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two floats to one 32-bit word of two 16-bit elements, `lo` in the low half (lower column).
template <typename T>
__device__ __forceinline__ uint32_t PackFloat2(float lo, float hi) {
  uint32_t w;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&w, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&w, &v, 4);
  }
  return w;
}

}  // namespace prefill_ptx
}  // namespace phishard
