// Internal to kernels/cuda/paged_attention*.cu: the prefill (tensor-core, FlashAttention-2 style)
// half of PagedAttentionCuda, after the entry point has validated the params.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "kernels/cuda/attention_dispatch.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_attention_cuda.h"
#include "kernels/kv_layout.h"

namespace phishard {

// Launches the prefill kernel. Requires what PagedAttentionCuda checks; adds: scale finite and
// non-zero, out 4-byte aligned (kInvalidShape otherwise).
KernelStatus LaunchPagedAttentionPrefill(const PagedAttentionParams& p,
                                         const PagedAttentionCudaPlan& plan, int q_stride,
                                         cudaStream_t stream);

// The Hopper (wgmma) prefill kernel, paged_attention_prefill_wgmma.cu (where
// PagedAttentionPrefillWgmmaAvailable()). Same contract as LaunchPagedAttentionPrefill
// (kInvalidShape when not available); block_shift is log2(block_size) for a power of two, else -1.
KernelStatus LaunchPagedAttentionPrefillWgmma(const PagedAttentionParams& p,
                                              const PagedAttentionCudaPlan& plan, int q_stride,
                                              int block_shift, cudaStream_t stream);
// The warp-specialised Hopper kernel, paged_attention_prefill_wgmma_ws.cu (PrefillTiling::kWgmmaWs;
// same contract, and it also runs the fused new-K/V store of PagedAttentionCudaPlan::store_new_k).
KernelStatus LaunchPagedAttentionPrefillWgmmaWs(const PagedAttentionParams& p,
                                                const PagedAttentionCudaPlan& plan, int q_stride,
                                                int block_shift, cudaStream_t stream);

// The fused new-K/V store of the prefill kernels (PagedAttentionCudaPlan::store_new_k): the
// query tile's `rows` new tokens (query rows tile0.. of the sequence starting at token q_begin, key
// positions pos0..) of KV head kvh, read from their q rows at columns a.new_k_col / a.new_v_col +
// kvh * HD and written to a.store_k / a.store_v at their cache slots (layout
// [num_blocks, num_kv_heads, block_size, HD], kernels/kv_layout.h), 16 bytes (8 elements) an
// item, items first, first + kThreads, ... (the caller's threads 0 .. kThreads - 1 each call it).
// Item i = (row i / (HD / 8), chunk i % (HD / 8)): consecutive items of one block are consecutive
// 16 bytes of its (block, kvh) run, so a warp's stores cover 512 contiguous bytes there.
// Each thread issues all loads of kStoreBatch items (block-table entries by slot_of(key, &in_blk)
// and the K/V chunks, independent of each other) before their stores: one L2 round trip a batch.
// Block ids outside [0, a.num_blocks) are skipped. Args: the kernel's arguments (q, q_stride,
// new_k_col, new_v_col, store_k, store_v, block_size, num_blocks, num_kv_heads).
template <typename T, int HD, int kThreads, typename Args, typename SlotOf>
__device__ __forceinline__ void StoreNewKvRows(const Args& a, SlotOf&& slot_of, int first, int rows,
                                               int kvh, int pos0, int q_begin, int tile0) {
  constexpr int kChunks = HD / 8;  // 16-byte chunks per row
  constexpr int kStoreBatch = 4;
  const int items = rows * kChunks;
  for (int i0 = first; i0 < items; i0 += kStoreBatch * kThreads) {
    uint4 kv[kStoreBatch], vv[kStoreBatch];
    int blk[kStoreBatch], in_blk[kStoreBatch], col[kStoreBatch];  // col: dim of the chunk
#pragma unroll
    for (int b = 0; b < kStoreBatch; ++b) {
      const int i = i0 + b * kThreads;
      blk[b] = -1;
      in_blk[b] = col[b] = 0;
      if (i < items) {
        const int r = i / kChunks;
        col[b] = (i - r * kChunks) * 8;
        blk[b] = slot_of(pos0 + r, &in_blk[b]);
        const T* src =
            a.q + static_cast<size_t>(q_begin + tile0 + r) * a.q_stride + kvh * HD + col[b];
        kv[b] = *reinterpret_cast<const uint4*>(src + a.new_k_col);
        vv[b] = *reinterpret_cast<const uint4*>(src + a.new_v_col);
      }
    }
#pragma unroll
    for (int b = 0; b < kStoreBatch; ++b) {
      if (blk[b] < 0 || blk[b] >= a.num_blocks) continue;  // also: no item
      const int64_t dst =
          KvOffset(blk[b], in_blk[b], kvh, a.block_size, a.num_kv_heads, HD) + col[b];
      *reinterpret_cast<uint4*>(a.store_k + dst) = kv[b];
      *reinterpret_cast<uint4*>(a.store_v + dst) = vv[b];
    }
  }
}

// Calls run(std::integral_constant<int, HD>, cuda::TypeTag<T>) for the head dims of `dims`
// (cuda::AttentionHeadDims: 16, 32, 64, 80, 96, 128; the wgmma kernels pass cuda::WgmmaHeadDims)
// and T = __half / __nv_bfloat16 from p.dtype; another head dim is kInvalidShape, another dtype
// kUnsupportedDtype.
template <typename F, typename Dims = cuda::AttentionHeadDims>
KernelStatus DispatchPrefillHeadDim(const PagedAttentionParams& p, F&& run, Dims dims = {}) {
  return cuda::DispatchHalfTypes(p.dtype, [&](auto type_tag) {
    return cuda::DispatchHeadDim(dims, p.head_dim,
                                 [&](auto hd_tag) { return run(hd_tag, type_tag); });
  });
}

}  // namespace phishard
