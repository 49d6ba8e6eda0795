// The closed head-dim dispatch of the attention kernels (paged_attention.cu, paged_decode.cu and
// the prefill kernels through paged_attention_prefill.cuh). Included by kernels/cuda/*.cu only.
#pragma once

#include <type_traits>

#include "kernels/kernel_status.h"

namespace phishard::cuda {

// A closed set of head dims, each instantiated by the kernels dispatched over it.
template <int... kDims>
struct HeadDims {
  static constexpr bool Contains(int head_dim) { return ((head_dim == kDims) || ...); }
};

// The head dims of the decode kernels and the mma.sync prefill kernels: Phi-1.5 (64), Phi-2 (80),
// the tiny test checkpoints (16, 32) and larger custom ones (96, 128). Multiples of 16: the
// prefill's m16n8k16 steps over the head dim (which excludes 8); at most 128: the decode kernels'
// lanes hold at most two 16-byte slices of a head and the fused prologue one element a thread.
using AttentionHeadDims = HeadDims<16, 32, 64, 80, 96, 128>;
// The Hopper wgmma prefill kernels (paged_attention_prefill_wgmma*.cu): the m64nHDk16 P·V
// instructions they are written for.
using WgmmaHeadDims = HeadDims<32, 64, 80>;

// Calls f(std::integral_constant<int, HD>{}) for head_dim in `Dims`; any other head dim is
// kInvalidShape.
template <int... kDims, typename F>
KernelStatus DispatchHeadDim(HeadDims<kDims...>, int head_dim, F&& f) {
  KernelStatus st = KernelStatus::kInvalidShape;
  (void)((head_dim == kDims ? (st = f(std::integral_constant<int, kDims>{}), true) : false) || ...);
  return st;
}

// DispatchHeadDim over AttentionHeadDims.
template <typename F>
KernelStatus DispatchAttentionHeadDim(int head_dim, F&& f) {
  return DispatchHeadDim(AttentionHeadDims{}, head_dim, static_cast<F&&>(f));
}

}  // namespace phishard::cuda
