// Internal to kernels/cuda/paged_attention*.cu: the prefill (tensor-core, FlashAttention-2 style)
// half of PagedAttentionCuda, after the entry point has validated the params.
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/paged_attention_cuda.h"

namespace phishard {

// The tiling a prefill launch of `p` under `plan` uses (plan.prefill_tiling unless kAuto).
PrefillTiling PagedAttentionPrefillTiling(const PagedAttentionParams& p,
                                          const PagedAttentionCudaPlan& plan);

// Launches the prefill kernel. Requires what PagedAttentionCuda checks; adds: scale finite and
// non-zero, out 4-byte aligned (kInvalidShape otherwise).
KernelStatus LaunchPagedAttentionPrefill(const PagedAttentionParams& p,
                                         const PagedAttentionCudaPlan& plan, int q_stride,
                                         cudaStream_t stream);

}  // namespace phishard
