// The closed head-dim dispatch of the attention kernels (paged_attention.cu, paged_decode.cu and
// the prefill kernels through paged_attention_prefill.cuh). Included by kernels/cuda/*.cu only.
#pragma once

#include <type_traits>

#include "kernels/kernel_status.h"

namespace phishard::cuda {

// Calls f(std::integral_constant<int, HD>{}) for the head dims the attention kernels are built
// for: 32, 64, 80. Any other head dim is kInvalidShape.
template <typename F>
KernelStatus DispatchAttentionHeadDim(int head_dim, F&& f) {
  switch (head_dim) {
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 80:
      return f(std::integral_constant<int, 80>{});
    default:
      return KernelStatus::kInvalidShape;
  }
}

}  // namespace phishard::cuda
