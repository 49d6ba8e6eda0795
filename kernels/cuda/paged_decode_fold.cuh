// The fused form of the register-staged decode attention kernel (PagedDecodeCudaPlan::fold_rotary
// and merge_counters, kernels/cuda/paged_decode_cuda.h): the rotary + new K/V write before the
// attention and the split merge after it, done inside the attention launch with the same float
// operations as RotaryKvWriteCuda and PagedDecodeMergeKernel (so the same bits), and the host check
// of the fused launch's rotary parameters (CheckFoldedRotary). Included by
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

// The new token's elements one thread of block (split, s, h) needs, loaded by FoldLoad at the
// kernel's start (before the context length, the block table and the K/V stages, so their L2
// latency overlaps those loads instead of following them; perf-log 2026-11-30 02:24-02:59): element
// d = threadIdx.x < HD of query head h, K head and V head h / group of the qkv row of sequence s
// ([q: num_heads | k: nKV | v: nKV] x HD, device), and for d < rotary_dim the rotation partners
// (element j and j + half), the position and, for every thread, the new token's cache slot. Loaded
// for every block (160 bytes a head from L2): which block stores or uses the new K/V is known only
// after the context length.
template <typename T>
struct FoldIn {
  T q, q1, q2, k, k1, k2, v;
  int pos;
  int64_t slot;
};

template <typename T, int HD>
__device__ __forceinline__ FoldIn<T> FoldLoad(const Args& a, int s, int h) {
  FoldIn<T> in{};
  const int d = threadIdx.x;
  in.slot = a.slots[s];
  if (d < HD) {
    const int kvh = h / a.group;
    const T* row = static_cast<const T*>(a.q) + static_cast<size_t>(s) * a.q_stride;
    const T* qh = row + static_cast<size_t>(h) * HD;
    const T* kh = row + static_cast<size_t>(a.num_heads + kvh) * HD;
    const T* vh = kh + static_cast<size_t>(a.num_kv_heads) * HD;  // V heads follow the K heads
    in.q = qh[d];
    in.k = kh[d];
    in.v = vh[d];
    if (d < a.rotary_dim) {
      const int half = a.rotary_dim / 2;
      const int j = d < half ? d : d - half;
      in.pos = a.positions[s];
      in.q1 = qh[j];
      in.q2 = qh[j + half];
      in.k1 = kh[j];
      in.k2 = kh[j + half];
    }
  }
  return in;
}

// Block (split, s, h), before it uses q or the new key, from FoldLoad's elements `in`. FoldRotate:
// threads d < HD take element d of query head h and, when `with_new`, of the K and V heads of KV
// head h / group: dims below rotary_dim rotate as RotaryKvWriteKernel rotates them (cos / sin of
// positions[s], rounded once to T), the rest are copied; all into `sm`. FoldStoreNew: after the
// barrier (which also publishes `sm` to the block) the block of the group's first query head stores
// the new K and V heads at cache slot slots[s], KV head kvh (KvSlotOffset; exactly one writer per
// (sequence, KV head); a slot outside [0, num_slots) is not written, as RotaryKvWriteCuda). No
// block of the launch reads those cache elements: the blocks holding the new key take it from
// `sm` (PagedDecodeKernel's `patch`). block_size: a.block_size, as a literal 16 where the caller
// knows it (the slot's division is then a shift, not a 64-bit division).
template <typename T, int HD>
__device__ __forceinline__ void FoldRotate(const Args& a, const FoldIn<T>& in, bool with_new,
                                           FoldSmem<T, HD>& sm) {
  const int d = threadIdx.x;
  if (d < HD) {
    T qo = in.q;
    T ko = with_new ? in.k : qo;
    if (d < a.rotary_dim) {
      const int half = a.rotary_dim / 2;
      const bool first = d < half;
      const int j = first ? d : d - half;
      float c, sn;
      cuda::RopeCosSin(in.pos, j, a.rotary_dim, a.theta, &c, &sn);
      qo = cuda::RopeRotate<T>(cuda::ToFloat(in.q1), cuda::ToFloat(in.q2), c, sn, first);
      if (with_new) {
        ko = cuda::RopeRotate<T>(cuda::ToFloat(in.k1), cuda::ToFloat(in.k2), c, sn, first);
      }
    }
    sm.q[d] = qo;
    if (with_new) {
      sm.k[d] = ko;
      sm.v[d] = in.v;
    }
  }
}

template <typename T, int HD>
__device__ __forceinline__ void FoldStoreNew(const Args& a, const FoldIn<T>& in, int h,
                                             bool with_new, int block_size,
                                             const FoldSmem<T, HD>& sm) {
  const int kvh = h / a.group;
  const bool writer = with_new && h % a.group == 0;
  const int64_t slot = writer ? in.slot : -1;
  // The slot's row of KV head kvh: HD contiguous elements (kernels/kv_layout.h); -1: no store.
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
// starts from zero. Called by every thread of the block.
// Ordering: every thread fences its partial's stores before the count, and the block that counts
// last fences again before it reads the others' partials through L2. kFast (the fused form, where
// this is on the step's critical path): the CTA-barrier-then-one-thread pattern instead — the
// barrier orders every thread's stores before thread 0's count, an acq_rel atomic at GPU scope that
// publishes them (release, cumulative through the barrier) and, in the block that counts last,
// makes the other blocks' partials visible to it (acquire), handed to its threads by the second
// barrier — and MergeSplits' batched loads: together ~1.3 us less on the b1 launch's tail
// (perf-log 2026-11-30 02:24-02:59). The register-staged kernel's unfused launches keep the plain
// form (its register count; the batched merge's registers cost them 3-8 % at 32 rows).
template <typename T, int HD, bool kFast>
__device__ __forceinline__ void MergeIfLast(const Args& a, int s, int h, int splits) {
  __shared__ int s_last;
  if constexpr (!kFast) __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* counter = a.merge_counters + static_cast<size_t>(s) * a.num_heads + h;
    int32_t before;
    if constexpr (kFast) {
      asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;"
                   : "=r"(before)
                   : "l"(counter)
                   : "memory");
    } else {
      before = atomicAdd(counter, 1);
    }
    const bool last = before + 1 == splits;
    s_last = last;
    if (last) atomicExch(counter, 0);
  }
  __syncthreads();
  if (s_last) {
    if constexpr (!kFast) __threadfence();
    MergeSplits<T, HD, kFast>(a, s, h, splits, threadIdx.x, kThreads);
    if (a.heads_done != nullptr) CountHeadDone(a.heads_done);  // beside the decode stream
  }
}

// PagedDecodeCudaPlan::rotary against the attention's own parameters: the same qkv rows, caches
// and shapes (block_size included: the fused write addresses the cache by p.block_size, and
// RotaryKvWriteCuda's rule, num_slots a multiple of it), a plain write (no LoRA fold, no q / k
// LayerNorm, no RoPE scaling: the fused rotation has none of them), or kInvalidShape /
// kNullPointer. p.block_size >= 1 is
// checked before.
inline KernelStatus CheckFoldedRotary(const PagedAttentionParams& p, int q_stride,
                                      const RotaryKvWriteParams& r) {
  const int width = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim;
  const int r_stride = r.qkv_stride == 0 ? width : r.qkv_stride;
  if (r.qkv != p.q || r.k_cache != p.k_cache || r.v_cache != p.v_cache ||
      r.num_tokens != p.num_seqs || r.num_heads != p.num_heads ||
      r.num_kv_heads != p.num_kv_heads || r.head_dim != p.head_dim || r.dtype != p.dtype ||
      r.block_size != p.block_size || r_stride != q_stride || q_stride < width || !r.write_cache ||
      r.fold_delta != nullptr || r.q_norm_w != nullptr || r.rope_factor != 1.0f ||
      r.rotary_dim < 0 || r.rotary_dim > p.head_dim || r.rotary_dim % 2 != 0 || r.num_slots < 0 ||
      r.num_slots % p.block_size != 0) {
    return KernelStatus::kInvalidShape;
  }
  if (!r.positions || !r.slots) return KernelStatus::kNullPointer;
  return KernelStatus::kOk;
}

}  // namespace phishard::paged_decode
