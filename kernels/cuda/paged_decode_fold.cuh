// The fused form of the register-staged decode attention kernel (PagedDecodeCudaPlan::fold_rotary
// and merge_counters, kernels/cuda/paged_decode_cuda.h): the rotary + new K/V write before the
// attention and the split merge after it, done inside the attention launch with the same float
// operations as RotaryKvWriteCuda and PagedDecodeMergeKernel (so the same bits). Included by
// kernels/cuda/paged_decode.cu only.
#pragma once

#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_decode_common.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/kv_layout.h"

namespace phishard::paged_decode {

// One block's new-token rows in shared memory, dtype T: its query head rotated, and (block whose
// split holds the new key) that key's K head rotated and its V head as it is.
template <typename T, int HD>
struct alignas(16) FoldSmem {
  static_assert(HD % 8 == 0 && HD <= kThreads, "16-byte slices, one thread an element");
  T q[HD];
  T k[HD];
  T v[HD];
};

// Block (split, s, h), before it uses q or the new key. Threads d < HD take element d of query
// head h in the qkv row of sequence s ([q: num_heads | k: nKV | v: nKV] x HD, device) and, when
// `with_new`, of the K and V heads of KV head h / group: dims below rotary_dim rotate as
// RotaryKvWriteKernel rotates them (cos / sin of positions[s], rounded once to T), the rest are
// copied; all into `sm`. After the barrier the block of the group's first query head stores the
// new K and V heads at cache slot slots[s], KV head kvh (KvSlotOffset; exactly one writer per
// (sequence, KV head); a slot outside [0, num_slots) is not written, as RotaryKvWriteCuda). No
// block of the launch reads those cache elements: the blocks holding the new key take it from
// `sm` (PagedDecodeKernel's `patch`). block_size: a.block_size, as a literal 16 where the caller
// knows it (the slot's division is then a shift, not a 64-bit division).
template <typename T, int HD>
__device__ __forceinline__ void FoldPrologue(const Args& a, int s, int h, bool with_new,
                                             int block_size, FoldSmem<T, HD>& sm) {
  const int d = threadIdx.x;
  const int kvh = h / a.group;
  const bool writer = with_new && h % a.group == 0;
  const int64_t slot = writer ? a.slots[s] : -1;  // loaded now: overlaps the loads below
  if (d < HD) {
    const T* row = static_cast<const T*>(a.q) + static_cast<size_t>(s) * a.q_stride;
    const T* qh = row + static_cast<size_t>(h) * HD;
    const T* kh = row + static_cast<size_t>(a.num_heads + kvh) * HD;
    const T* vh = kh + static_cast<size_t>(a.num_kv_heads) * HD;  // V heads follow the K heads
    T qo = qh[d];
    T ko = with_new ? kh[d] : qo;
    if (d < a.rotary_dim) {
      const int half = a.rotary_dim / 2;
      const bool first = d < half;
      const int j = first ? d : d - half;
      float c, sn;
      cuda::RopeCosSin(a.positions[s], j, a.rotary_dim, a.theta, &c, &sn);
      qo = cuda::RopeRotate<T>(cuda::ToFloat(qh[j]), cuda::ToFloat(qh[j + half]), c, sn, first);
      if (with_new) {
        ko = cuda::RopeRotate<T>(cuda::ToFloat(kh[j]), cuda::ToFloat(kh[j + half]), c, sn, first);
      }
    }
    sm.q[d] = qo;
    if (with_new) {
      sm.k[d] = ko;
      sm.v[d] = vh[d];
    }
  }
  // The slot's row of KV head kvh: HD contiguous elements (kernels/kv_layout.h); -1: no store.
  // Worked out before the barrier, while the loads above are in flight.
  const int64_t off = slot >= 0 && slot < a.num_slots
                          ? KvSlotOffset(slot, kvh, block_size, a.num_kv_heads, HD)
                          : -1;
  __syncthreads();
  if (off >= 0) {
    constexpr int kChunks = HD / 8;
    for (int c = threadIdx.x; c < 2 * kChunks; c += kThreads) {
      const bool is_v = c >= kChunks;
      const int j = is_v ? c - kChunks : c;
      T* dst = static_cast<T*>(is_v ? a.v_cache_w : a.k_cache_w) + off + 8 * j;
      *reinterpret_cast<uint4*>(dst) = reinterpret_cast<const uint4*>(is_v ? sm.v : sm.k)[j];
    }
  }
}

// After the block stored its split's partial (output and (max, sum)): counts split done for
// (s, h); the last of the `splits` blocks to finish merges them all (MergeSplits, the code of
// PagedDecodeMergeKernel) and sets the counter back to zero, so the next launch (a graph replay)
// starts from zero. The fence before the count makes this block's partial visible to the block
// that merges; that block reads the partials through L2. Called by every thread of the block.
template <typename T, int HD>
__device__ __forceinline__ void MergeIfLast(const Args& a, int s, int h, int splits) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* counter = a.merge_counters + static_cast<size_t>(s) * a.num_heads + h;
    const int done = atomicAdd(counter, 1) + 1;
    s_last = done == splits;
    if (done == splits) atomicExch(counter, 0);
  }
  __syncthreads();
  if (s_last) {
    __threadfence();
    MergeSplits<T, HD>(a, s, h, splits, threadIdx.x, kThreads);
  }
}

}  // namespace phishard::paged_decode
