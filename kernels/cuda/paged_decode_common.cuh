// Pieces shared by the decode attention kernels of kernels/cuda/paged_decode.cu, the tensor-core
// kernel (kernels/cuda/paged_decode_mma.cu) and the fused form's prologue / epilogue
// (kernels/cuda/paged_decode_fold.cuh): the launch arguments, the split rule, the cp.async wrappers
// and block prologue of the pipelined and tensor-core kernels, unpacking, the online-softmax
// rescale and the log-sum-exp merge of the splits. Included by paged_decode.cu and
// paged_decode_mma.cu only.
#pragma once

#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/spin_wait.cuh"
#include "kernels/kv_layout.h"

namespace phishard::paged_decode {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kLanesPerKey = 8;                        // one group = 8 lanes = one key at a time
constexpr int kGroups = kWarps * (32 / kLanesPerKey);  // 16 key groups per block
constexpr int kUnroll = 2;                             // keys per group in one stage
constexpr int kStep = kGroups * kUnroll;               // 32 keys per block stage
// Splits start on multiples of this many keys (whole stages, whole blocks of 16).
constexpr int kKeysPerIter = 64;
// Query heads of one KV head a block of the tensor-core kernel serves (the mma's N).
constexpr int kMmaHeadsPerBlock = 8;

// Lanes a key of the pipelined kernel: 8 where the head's 16-byte slices fill them (head dim a
// multiple of 64), else 4 — at head dim 80 a lane of 8 holds slices j and j + 8 of 10, so 6 of
// every 16 slice computations were on zeros; with 4 lanes (slices j, j + 4, j + 8: 12 for 10) the
// loop issues ~20 % fewer instructions a key: b128-b256 ctx512-1024 x0.964-0.978 at Phi-2's shape
// (perf-log 2026-11-30 10:29-10:33); at head dim 64 (Phi-1.5) 4 lanes lost (x1.085 at ctx128).
constexpr int PipeLanesPerKey(int head_dim) { return (head_dim / 8) % 8 == 0 ? 8 : 4; }

// The pipelined kernel's online softmax moves a group's reference max only when a score passes it
// by more than this (log2 units: a weight stays <= 256 against it), skipping the rescale of the
// sum and output for most keys: b128-b256 ctx512-1024 x0.983-0.985 at Phi-2's shape, b256
// ctx1024 x0.988 at Phi-1.5's (perf-log 2026-11-30 10:40).
constexpr float kRescaleSlack = 8.0f;

template <int HD>
struct Head {
  static constexpr int kChunks = HD / 8;                                        // 16-byte slices
  static constexpr int kPerLane = (kChunks + kLanesPerKey - 1) / kLanesPerKey;  // 1 or 2
};

struct Args {
  const void* q;
  // [num_blocks, num_kv_heads, block_size, HD] each, device (kernels/kv_layout.h): the
  // block_size x HD keys of one (block, KV head) are one contiguous run.
  const void* k_cache;
  const void* v_cache;
  void* out;
  float* partial_o;   // [num_seqs, num_heads, max_splits, HD]
  float* partial_ml;  // [num_seqs, num_heads, max_splits, 2] (max, sum) in log2 units
  const int32_t* context_lens;
  const int32_t* block_tables;
  const int32_t* step_info;
  int num_seqs;
  int max_blocks;
  int num_blocks;
  int block_size;
  int num_heads;
  int num_kv_heads;
  int group;        // num_heads / num_kv_heads
  int block_elems;  // KvBlockElems(block_size, num_kv_heads, HD): one cache block, all KV heads
  int q_stride;
  int max_splits;
  int target_blocks;
  int head_chunks;     // pipelined kernel: query-head chunks of kMaxHeadsPerBlock per KV head
  int blocks_per_seq;  // blocks of one split of one sequence (the grid's x extent)
  float scale_log2;
  // Fused form (PagedDecodeCudaPlan::fold_rotary, register-staged kernel only): q is the qkv
  // row [q | k | v] of each sequence; positions / slots of the new token (device), the caches
  // written at slots[s] (the same arrays as k_cache / v_cache), RotaryKvWriteParams' rotation.
  const int32_t* positions;
  const int64_t* slots;
  void* k_cache_w;
  void* v_cache_w;
  int64_t num_slots;
  int rotary_dim;
  float theta;
  // PagedDecodeCudaPlan::merge_counters (register-staged kernel): device int32 [num_seqs,
  // num_heads], zero between launches; null: PagedDecodeMergeKernel merges the splits.
  int32_t* merge_counters;
  // PagedDecodeCudaPlan::trigger_dependents_early (register-staged kernel).
  bool trigger_early;
  // PagedDecodeCudaPlan::qkv_ready / heads_done (register-staged fused kernel; null: off).
  const int32_t* qkv_ready;
  int qkv_ready_target;
  int32_t* heads_done;
  int preload_stages;  // PagedDecodeCudaPlan::preload_stages (0-2)
  // PagedDecodeCudaPlan::timeline (benchmarks; null: off).
  uint64_t* timeline;
  int timeline_blocks;
};

// PagedDecodeCudaPlan::timeline: thread 0 stamps event e of its block's row.
__device__ __forceinline__ void AttnStamp(const Args& a, int e) {
  if (a.timeline == nullptr || threadIdx.x != 0) return;
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (b < a.timeline_blocks) a.timeline[b * kPagedDecodeTimelineEvents + e] = cuda::GlobalTimerNs();
}

// PagedDecodeCudaPlan::qkv_ready: thread 0 spins (acquire) until *ready >= target, then the block
// barrier hands that to every thread (cuda::SpinUntilAtLeast: a trap after ~10 s, not a hang).
__device__ __forceinline__ void WaitQkvReady(const int32_t* ready, int target) {
  if (threadIdx.x == 0) cuda::SpinUntilAtLeast(ready, target);
  __syncthreads();
}

// PagedDecodeCudaPlan::heads_done: after a (sequence, head)'s output is stored by this block (every
// thread calls it): the barrier orders every thread's stores before thread 0's fence and count.
__device__ __forceinline__ void CountHeadDone(int32_t* heads_done) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(heads_done, 1);
  }
}

// The split rule of the header; returns split_len, *splits the non-empty splits (ctx >= 1).
__device__ __forceinline__ int SplitLen(const Args& a, int ctx, int* splits) {
  const int live = max(a.step_info ? a.step_info[0] : a.num_seqs, 1);
  const int per_split_blocks = live * a.blocks_per_seq;
  const int want = max(1, (a.target_blocks + per_split_blocks - 1) / per_split_blocks);
  const int n = max(1, min(min(want, a.max_splits), (ctx + kKeysPerIter - 1) / kKeysPerIter));
  const int per = (ctx + n - 1) / n;
  const int len = (per + kKeysPerIter - 1) / kKeysPerIter * kKeysPerIter;
  *splits = (ctx + len - 1) / len;
  return len;
}

// cp.async for the pipelined and tensor-core kernels' shared-memory rings (sm_80+).
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy bypassing L1; bytes == 0 reads nothing and writes zeros.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's most recent cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// What one block of the pipelined and tensor-core kernels serves. Their grid is (num_kv_heads x
// a.head_chunks, num_seqs, max_splits): block (hb, s, sp) takes query heads h0 .. h0 + nhb - 1, the
// (hb % a.head_chunks)-th chunk of kHeadsPerBlock of KV head kvh's group, over the keys
// [k_begin, k_end) of split sp of sequence s.
template <typename T>
struct BlockWork {
  int s;
  int sp;
  int kvh;
  int nhb;      // query heads of this block, 1 .. kHeadsPerBlock
  int h0;       // the first of them
  int splits;   // non-empty splits of sequence s (SplitLen), sp < splits
  int k_begin;  // keys of split sp, k_begin < k_end <= context_lens[s]
  int k_end;
  T* out;                // [nhb, HD] device: out[s, h0 ...], the block's output rows
  const int32_t* table;  // device: sequence s's block table row (step_info[1] or max_blocks long)
};

// The prologue of the pipelined and tensor-core kernels (blocks of kThreads): fills *w and returns
// true, or returns false (the same in every thread of the block) for a block with no keys to read:
// a padding row (context_lens[s] <= 0; split 0 writes zeros to the block's output rows) or a split
// past the sequence's last.
template <typename T, int HD, int kHeadsPerBlock>
__device__ __forceinline__ bool BlockPrologue(const Args& a, BlockWork<T>* w) {
  const int hb = blockIdx.x;
  const int s = blockIdx.y;
  const int sp = blockIdx.z;
  const int kvh = hb / a.head_chunks;
  const int g0 = (hb - kvh * a.head_chunks) * kHeadsPerBlock;
  const int nhb = min(kHeadsPerBlock, a.group - g0);
  const int h0 = kvh * a.group + g0;
  const int ctx = a.context_lens[s];
  T* out_base = static_cast<T*>(a.out) + (static_cast<size_t>(s) * a.num_heads + h0) * HD;
  if (ctx <= 0) {  // padding row
    if (sp == 0) {
      for (int d = threadIdx.x; d < nhb * HD; d += kThreads) out_base[d] = cuda::FromFloat<T>(0.f);
    }
    return false;
  }
  int splits = 1;
  const int split_len = SplitLen(a, ctx, &splits);
  if (sp >= splits) return false;
  const int k_begin = sp * split_len;
  const int k_end = min(ctx, k_begin + split_len);
  const int pitch = a.step_info ? a.step_info[1] : a.max_blocks;
  const int32_t* table = a.block_tables + static_cast<size_t>(s) * pitch;
  *w = BlockWork<T>{s, sp, kvh, nhb, h0, splits, k_begin, k_end, out_base, table};
  return true;
}

template <typename T>
__device__ __forceinline__ void Unpack8(uint4 v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = cuda::Word2ToFloat2<T>(w[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// Merges (m_o, l_o, acc_o) into (m, l, acc): log2-domain online-softmax states.
__device__ __forceinline__ void Rescale(float m, float m_new, float* factor) {
  *factor = m == -INFINITY ? 0.0f : exp2f(m - m_new);
}

// This lane's 16-byte slices cl, cl + kLanes, ... of a query head row (device), in float and
// pre-scaled to log2 units (the softmax runs on exp2); slices past the head, and every slice when
// !load, are zeros. The decode kernels' common prologue.
template <typename T, int HD, int kLanes, int kPL>
__device__ __forceinline__ void LoadQSlices(const T* q_row, int cl, float scale_log2, bool load,
                                            float (&q)[kPL][8]) {
#pragma unroll
  for (int i = 0; i < kPL; ++i) {
    const int j = cl + kLanes * i;
    if (load && j < HD / 8) {
      Unpack8<T>(*reinterpret_cast<const uint4*>(q_row + 8 * j), q[i]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[i][e] *= scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[i][e] = 0.0f;
    }
  }
}

// This lane's 16-byte slices cl, cl + kLanes, ... of one key's K and V rows (device, starting at
// element `base` of each cache); zeros past the head and when !in_range (a masked key, a block id
// outside the pool). The register-staged and one-warp-a-head kernels' key load.
template <typename T, int HD, int kLanes, int kPL>
__device__ __forceinline__ void LoadKvSlices(const T* k_cache, const T* v_cache, int64_t base,
                                             int cl, bool in_range, uint4 (&k)[kPL],
                                             uint4 (&v)[kPL]) {
#pragma unroll
  for (int i = 0; i < kPL; ++i) {
    const int j = cl + kLanes * i;
    k[i] = make_uint4(0, 0, 0, 0);
    v[i] = make_uint4(0, 0, 0, 0);
    if (in_range && j < HD / 8) {
      k[i] = __ldg(reinterpret_cast<const uint4*>(k_cache + base) + j);
      v[i] = __ldg(reinterpret_cast<const uint4*>(v_cache + base) + j);
    }
  }
}

// q · k over this lane's slices (float32, slice by slice, element by element): one lane's part of
// a score, summed over the key's lanes by the caller.
template <typename T, int kPL>
__device__ __forceinline__ float DotSlices(const float (&q)[kPL][8], const uint4 (&k)[kPL]) {
  float d = 0.0f;
#pragma unroll
  for (int i = 0; i < kPL; ++i) {
    float kf[8];
    Unpack8<T>(k[i], kf);
#pragma unroll
    for (int e = 0; e < 8; ++e) d = fmaf(q[i][e], kf[e], d);
  }
  return d;
}

// Merges the online-softmax states (log2-domain max m, sum l, unnormalised output acc over a
// lane's kPL 16-byte slices) of a warp's lane groups of kLanes lanes — lanes cl, cl + kLanes, ...
// hold the same slices — by shuffles; afterwards every group holds the warp's state. The decode
// kernels' common epilogue (whole warps).
template <int kLanes, int kPL>
__device__ __forceinline__ void MergeLaneGroups(float& m, float& l, float (&acc)[kPL][8]) {
#pragma unroll
  for (int off = kLanes; off < 32; off *= 2) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, off);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, off);
    const float m_new = fmaxf(m, m_o);
    float fa, fb;
    Rescale(m, m_new, &fa);
    Rescale(m_o, m_new, &fb);
    l = l * fa + l_o * fb;
#pragma unroll
    for (int i = 0; i < kPL; ++i) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float o = __shfl_xor_sync(0xffffffffu, acc[i][e], off);
        acc[i][e] = acc[i][e] * fa + o * fb;
      }
    }
    m = m_new;
  }
}

// out[s, h] = sum_i w_i o_i / sum_i w_i, w_i = l_i 2^(m_i - max m), over the `splits` partials of
// (s, h); thread `tid` of `nthreads` writes dims tid, tid + nthreads, ... Partials are read
// through L2 (__ldcg): in the fused form they were written by other blocks of the same launch.
// Both forms take the max, the sum of the weights (each w_i one rounded product) and each output
// over i = 0 .. splits - 1 in order, with the same operations, so PagedDecodeMergeKernel and the
// kernels that merge in their last block write the same bits.
// kBatched (the fused form's last block, where the merge is on the step's critical path): the
// loads are batched into two dependent L2 round trips instead of one (or a few) per split — lane i
// of every warp reads split i's (max, sum) and the warp shares them by shuffles, and a thread's
// first output dim's partials are requested together with them (every thread of the block calls
// it: whole warps; MergeIfLast's kFast form).
template <typename T, int HD, bool kBatched = false>
__device__ __forceinline__ void MergeSplits(const Args& a, int s, int h, int splits, int tid,
                                            int nthreads) {
  const size_t base = (static_cast<size_t>(s) * a.num_heads + h) * a.max_splits;
  const float* ml = a.partial_ml + base * 2;
  const float* po = a.partial_o + base * HD;
  T* out_row = static_cast<T*>(a.out) + (static_cast<size_t>(s) * a.num_heads + h) * HD;
  if constexpr (!kBatched) {
    float mm = -INFINITY;
    for (int i = 0; i < splits; ++i) mm = fmaxf(mm, __ldcg(ml + i * 2));
    float wsum = 0.0f;
    for (int i = 0; i < splits; ++i)
      wsum += __ldcg(ml + i * 2 + 1) * exp2f(__ldcg(ml + i * 2) - mm);
    for (int d = tid; d < HD; d += nthreads) {
      float o = 0.0f;
      for (int i = 0; i < splits; ++i) {
        const float w = __ldcg(ml + i * 2 + 1) * exp2f(__ldcg(ml + i * 2) - mm);
        o = fmaf(w, __ldcg(po + i * HD + d), o);
      }
      out_row[d] = cuda::FromFloat<T>(o / wsum);
    }
  } else {
    constexpr int kMax = kPagedDecodeMaxSplits;
    static_assert(kMax <= 32, "one split a lane");
    float o_i[kMax];  // the partials of this thread's first output dim
#pragma unroll
    for (int i = 0; i < kMax; ++i) {
      if (i < splits && tid < HD) o_i[i] = __ldcg(po + i * HD + tid);
    }
    const int lane = tid & 31;
    float m_l = -INFINITY, l_l = 0.0f;  // split `lane`'s (max, sum)
    if (lane < splits) {
      m_l = __ldcg(ml + lane * 2);
      l_l = __ldcg(ml + lane * 2 + 1);
    }
    float mm = -INFINITY;
    for (int i = 0; i < splits; ++i) mm = fmaxf(mm, __shfl_sync(0xffffffffu, m_l, i));
    const float e_l = exp2f(m_l - mm);
    float wsum = 0.0f;
    for (int i = 0; i < splits; ++i) {
      wsum += __shfl_sync(0xffffffffu, l_l, i) * __shfl_sync(0xffffffffu, e_l, i);
    }
    const float w_l = l_l * e_l;
    float w[kMax];
#pragma unroll
    for (int i = 0; i < kMax; ++i) w[i] = __shfl_sync(0xffffffffu, w_l, i);
    for (int d = tid; d < HD; d += nthreads) {
      if (d != tid) {
#pragma unroll
        for (int i = 0; i < kMax; ++i) {
          if (i < splits) o_i[i] = __ldcg(po + i * HD + d);
        }
      }
      float o = 0.0f;
#pragma unroll
      for (int i = 0; i < kMax; ++i) {
        if (i < splits) o = fmaf(w[i], o_i[i], o);
      }
      out_row[d] = cuda::FromFloat<T>(o / wsum);
    }
  }
}

// kernels/cuda/paged_decode_mma.cu (PagedDecodeVariant::kTensorCore): launches the tensor-core
// kernel on the grid (a.blocks_per_seq, a.num_seqs, a.max_splits), a.head_chunks chunks of
// kMmaHeadsPerBlock query heads per KV head. The split merge (several splits) is the caller's.
KernelStatus LaunchPagedDecodeMma(const Args& a, int head_dim, DataType dtype, cudaStream_t stream);
// kernels/cuda/paged_decode_warp.cu (PagedDecodeVariant::kWarpPerHead): one warp per (query head,
// sequence, split) on the grid (a.blocks_per_seq = ceil(num_heads / kWarps), a.num_seqs,
// a.max_splits). The split merge (several splits) is the caller's.
KernelStatus LaunchPagedDecodeWarp(const Args& a, int head_dim, DataType dtype,
                                   cudaStream_t stream);

}  // namespace phishard::paged_decode
