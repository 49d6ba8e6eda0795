// Internal to kernels/cuda/paged_attention*.cu: the prefill (tensor-core, FlashAttention-2 style)
// half of PagedAttentionCuda, after the entry point has validated the params.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_attention_cuda.h"

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

// Calls run(std::integral_constant<int, HD>, cuda::TypeTag<T>) for the head dims the prefill
// kernels are built for (32, 64, 80) and T = __half / __nv_bfloat16 from p.dtype; another head dim
// is kInvalidShape, another dtype kUnsupportedDtype.
template <typename F>
KernelStatus DispatchPrefillHeadDim(const PagedAttentionParams& p, F&& run) {
  return cuda::DispatchHalfTypes(p.dtype, [&](auto type_tag) {
    switch (p.head_dim) {
      case 32:
        return run(std::integral_constant<int, 32>{}, type_tag);
      case 64:
        return run(std::integral_constant<int, 64>{}, type_tag);
      case 80:
        return run(std::integral_constant<int, 80>{}, type_tag);
      default:
        return KernelStatus::kInvalidShape;
    }
  });
}

}  // namespace phishard
