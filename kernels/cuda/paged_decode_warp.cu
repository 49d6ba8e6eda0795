// Decode attention with one warp per (query head, sequence, split) (PagedDecodeVariant::
// kWarpPerHead): no shared memory and no block barrier. The register-staged and pipelined kernels
// give a query head a block of 4 warps and merge the warps through shared memory at the end; at
// short contexts (b256 ctx128: 128 keys a head) that fixed work — the block prologue, the
// cross-warp merge, the barriers — is a large part of each block's time (the pipelined kernel's
// launch there ran at 0.77 of the copy bandwidth, issue-bound: perf-log 2026-11-30 09:05, 12:58).
// Here a warp walks all of its split's keys itself and merges its lane groups by shuffles.
//
// Block = kWarps warps = kWarps consecutive query heads of one sequence (their K/V runs are
// adjacent in the cache: kernels/kv_layout.h); grid (ceil(num_heads / kWarps), num_seqs,
// max_splits), the split rule of paged_decode_common.cuh with blocks_per_seq = the grid's x.
// Inside a warp: groups of kLpk lanes (PipeLanesPerKey: 4 at head dims whose 16-byte slices do not
// fill 8 lanes, else 8), each lane holding slices cl, cl + kLpk, ... of the head; a warp stage is
// 8 keys (one or two a group), its K/V loaded straight into registers one stage ahead (a ring of
// kWarpDepth register stages). Online softmax per group in log2 units with the
// pipelined kernel's lazy rescale (kRescaleSlack); the groups are merged at the end, then the warp
// writes its head's output row (one split) or its partial for PagedDecodeMergeKernel. Same math as
// the other kernels up to float rounding (kernels/cuda/paged_decode_cuda.h).
#include <cstdint>

#include "kernels/cuda/attention_dispatch.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_decode_common.cuh"
#include "kernels/kv_layout.h"

namespace phishard {
namespace paged_decode {
namespace {

// Register stages of the ring: 2 (one stage of loads in flight while one computes; at head dim
// 80 117-126 registers, 4 blocks = 16 warps an SM). 3 stages (152 registers, 3 blocks an SM) lost
// at b256 and b192 ctx512 (x1.03-1.05 against 2) and won only at 128-row short steps
// (perf-log 2026-11-30 14:57 / 15:03).
constexpr int kWarpDepth = 2;

template <typename T, int HD, bool kBlock16, int kLpk>
__global__ void __launch_bounds__(kThreads, 4) PagedDecodeWarpKernel(const Args a) {
  constexpr int kDepth = kWarpDepth;
  constexpr int C = HD / 8;                   // 16-byte slices of a head
  constexpr int kPL = (C + kLpk - 1) / kLpk;  // slices a lane
  constexpr int kGw = 32 / kLpk;              // key groups a warp
  constexpr int kStageKeys = 8;               // keys a warp stage
  constexpr int kU = kStageKeys / kGw;        // keys a group a stage
  static_assert(kLpk == 4 || kLpk == 8, "groups of 4 or 8 lanes");
  static_assert(kKeysPerIter % kStageKeys == 0, "splits start on whole stages");
  static_assert(kDepth >= 2, "at least one stage in flight");
  if (a.trigger_early) asm volatile("griddepcontrol.launch_dependents;" :::);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int h = blockIdx.x * kWarps + warp;
  const int s = blockIdx.y;
  const int sp = blockIdx.z;
  if (h >= a.num_heads) return;  // warp-uniform; nothing below synchronises the block
  const int ctx = a.context_lens[s];
  T* out_row = static_cast<T*>(a.out) + (static_cast<size_t>(s) * a.num_heads + h) * HD;
  if (ctx <= 0) {  // padding row
    if (sp == 0) {
      for (int d = lane; d < HD; d += 32) out_row[d] = cuda::FromFloat<T>(0.0f);
    }
    return;
  }
  int splits = 1;
  const int split_len = SplitLen(a, ctx, &splits);
  if (sp >= splits) return;
  const int k_begin = sp * split_len;
  const int k_end = min(ctx, k_begin + split_len);
  const int pitch = a.step_info ? a.step_info[1] : a.max_blocks;
  const int32_t* table = a.block_tables + static_cast<size_t>(s) * pitch;
  const int grp = lane / kLpk;
  const int cl = lane % kLpk;
  const int kvh = h / a.group;
  const int bs = kBlock16 ? 16 : a.block_size;
  // kBlock16: a stage (8 keys from a multiple of 8) lies in one 16-key block; key u of this group
  // is row (k_it & 8) + grp + kGw u of it, at a fixed offset from the block's start.
  int64_t row_off[kU];
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    row_off[u] = kBlock16 ? KvOffset(0, grp + kGw * u, kvh, 16, a.num_kv_heads, HD) : 0;
  }

  // q (pre-scaled to log2 units): this lane's slices.
  float q[kPL][8];
  float acc[kPL][8];
  {
    const T* q_row = static_cast<const T*>(a.q) + static_cast<size_t>(s) * a.q_stride + h * HD;
    LoadQSlices<T, HD, kLpk, kPL>(q_row, cl, a.scale_log2, true, q);
#pragma unroll
    for (int i = 0; i < kPL; ++i) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;
    }
  }
  float m = -INFINITY, l = 0.0f;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);

  struct Stage {
    uint4 k[kU][kPL], v[kU][kPL];
    bool valid[kU];
  };
  // Keys k_it + grp + kGw u; past k_end masked, a block id outside [0, num_blocks) reads zeros.
  auto load = [&](Stage& st, int k_it) {
    [[maybe_unused]] int blk16 = 0;
    [[maybe_unused]] int64_t half = 0;
    if constexpr (kBlock16) {
      blk16 = table[k_it >> 4];  // k_it < k_end: an entry of the sequence
      half = (k_it & 8) ? int64_t{8} * HD : 0;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int key = k_it + grp + kGw * u;
      st.valid[u] = key < k_end;
      bool in_range = false;
      int64_t base = 0;
      if (st.valid[u]) {
        if constexpr (kBlock16) {
          in_range = blk16 >= 0 && blk16 < a.num_blocks;
          base = static_cast<int64_t>(blk16) * a.block_elems + row_off[u] + half;
        } else {
          const int blk = table[key / bs];
          in_range = blk >= 0 && blk < a.num_blocks;
          base = KvOffset(blk, key % bs, kvh, bs, a.num_kv_heads, HD);
        }
      }
      LoadKvSlices<T, HD, kLpk, kPL>(kc, vc, base, cl, in_range, st.k[u], st.v[u]);
    }
  };
  auto compute = [&](const Stage& st) {
    float sc[kU];
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float d = DotSlices<T, kPL>(q, st.k[u]);
#pragma unroll
      for (int off = 1; off < kLpk; off *= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
      sc[u] = st.valid[u] ? d : -INFINITY;
      m_new = fmaxf(m_new, sc[u]);
    }
    // Lazy rescale (kRescaleSlack), as the pipelined kernel.
    if (m_new > m + kRescaleSlack) {
      const float alpha = m == -INFINITY ? 0.0f : exp2f(m - m_new);
      l *= alpha;
#pragma unroll
      for (int i = 0; i < kPL; ++i) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] *= alpha;
      }
      m = m_new;
    }
    const float m_ref = m == -INFINITY ? 0.0f : m;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const float p = cuda::Exp2Ftz(sc[u] - m_ref);  // -inf -> 0
      l += p;
#pragma unroll
      for (int i = 0; i < kPL; ++i) {
        float vf[8];
        Unpack8<T>(st.v[u][i], vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(p, vf[e], acc[i][e]);
      }
    }
  };
  // A ring of kDepth register stages: kDepth - 1 stages of loads in flight while one computes
  // (the ring index is a compile-time constant in the unrolled inner loop: no local memory).
  Stage st[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth - 1; ++d) {
    if (k_begin + d * kStageKeys < k_end) load(st[d], k_begin + d * kStageKeys);
  }
  int k_it = k_begin;
  bool more = true;
  while (more) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      if (more) {
        const int ahead = k_it + (kDepth - 1) * kStageKeys;
        if (ahead < k_end) load(st[(d + kDepth - 1) % kDepth], ahead);
        compute(st[d]);
        k_it += kStageKeys;
        more = k_it < k_end;
      }
    }
  }
  asm volatile("griddepcontrol.launch_dependents;" :::);

  // The groups of the warp (lanes cl, cl + kLpk, ... hold the same slices).
  MergeLaneGroups<kLpk, kPL>(m, l, acc);
  if (lane >= kLpk) return;
  const float inv_l = 1.0f / l;
  const size_t idx = (static_cast<size_t>(s) * a.num_heads + h) * a.max_splits + sp;
#pragma unroll
  for (int i = 0; i < kPL; ++i) {
    const int j = cl + kLpk * i;
    if (j >= C) continue;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float o = acc[i][e] * inv_l;
      if (splits == 1) {
        out_row[8 * j + e] = cuda::FromFloat<T>(o);
      } else {
        a.partial_o[idx * HD + 8 * j + e] = o;
      }
    }
  }
  if (splits > 1 && lane == 0) {
    a.partial_ml[idx * 2] = m;
    a.partial_ml[idx * 2 + 1] = l;
  }
}

}  // namespace

KernelStatus LaunchPagedDecodeWarp(const Args& a, int head_dim, DataType dtype,
                                   cudaStream_t stream) {
  return cuda::DispatchAttentionHeadDim(head_dim, [&](auto hd_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    return cuda::DispatchHalfTypes(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      constexpr int kLpk = PipeLanesPerKey(HD);
      auto kernel = a.block_size == 16 ? PagedDecodeWarpKernel<T, HD, true, kLpk>
                                       : PagedDecodeWarpKernel<T, HD, false, kLpk>;
      kernel<<<dim3(a.blocks_per_seq, a.num_seqs, a.max_splits), kThreads, 0, stream>>>(a);
      return cuda::LaunchStatus();
    });
  });
}

}  // namespace paged_decode
}  // namespace phishard
