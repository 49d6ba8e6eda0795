// Device helpers shared by the two GEMV kernels (gemv.cu: one warp a column, weights through
// registers; gemv_bulk.cu: weight tiles through a shared-memory ring). Included by those only.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gelu_math.cuh"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/gemm.h"

namespace phishard::cuda {

// Weights are read once per step: skip L1 so x stays there.
__device__ __forceinline__ uint4 LoadStreaming(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

template <typename T>
__device__ __forceinline__ float Dot8(uint4 a, uint4 b, float acc) {
  const uint32_t aw[4] = {a.x, a.y, a.z, a.w};
  const uint32_t bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = cuda::Word2ToFloat2<T>(aw[i]);
    const float2 fb = cuda::Word2ToFloat2<T>(bw[i]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
  return acc;
}

__device__ __forceinline__ float Activate(float v, int epilogue) {
  if (epilogue == static_cast<int>(GemmEpilogue::kGeluTanh)) return GeluTanh(v);
  if (epilogue == static_cast<int>(GemmEpilogue::kGeluErf)) return GeluErf(v);
  return v;
}

// f(std::integral_constant<int, m>{}) for 1 <= m <= kGemvMaxRows (the kernels' row count is a
// template parameter); kInvalidShape for any other m.
template <typename F>
KernelStatus DispatchGemvRows(int m, F&& f) {
  static_assert(kGemvMaxRows == 8, "one case a row count");
  switch (m) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 6:
      return f(std::integral_constant<int, 6>{});
    case 7:
      return f(std::integral_constant<int, 7>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    default:
      return KernelStatus::kInvalidShape;
  }
}

}  // namespace phishard::cuda
