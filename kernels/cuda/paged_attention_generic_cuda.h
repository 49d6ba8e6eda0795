// The paged attention for any head dim up to kPagedAttentionGenericMaxHeadDim (kernels/cuda/
// paged_attention_generic.cu): what PagedAttentionCuda and PagedDecodeCuda run for head dims
// their tuned kernels are not built for. Correct for every shape, not fast (one warp a query row
// and head, keys one by one).
#pragma once

#include <cuda_runtime.h>

#include "kernels/kernel_status.h"
#include "kernels/paged_attention.h"

namespace phishard {

inline constexpr int kPagedAttentionGenericMaxHeadDim = 256;

// kernels/paged_attention.h's semantics for p (dtype kF16 / kBF16; cu_q_lens may be null when
// every sequence has one query row, num_tokens == num_seqs). store_new_k / store_new_v as
// PagedAttentionCudaPlan's: null, or p.k_cache / p.v_cache, the new rows' K / V then taken from
// q's fused rows (q_stride covering q | k | v) and stored before the attention reads them.
// step_info as PagedDecodeCudaPlan's (decode graphs, no store): device int32[2] or null, [0] the
// live rows (rows from it on are padding and get zeros), [1] the block tables' row pitch (it
// replaces p.max_blocks_per_seq).
KernelStatus PagedAttentionGenericCuda(const PagedAttentionParams& p, void* store_new_k,
                                       void* store_new_v, const int32_t* step_info,
                                       cudaStream_t stream);

}  // namespace phishard
