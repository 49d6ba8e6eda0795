#include <algorithm>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gelu_cuda.h"

namespace phishard {
namespace {

// Grid-stride over the rows x cols elements; thread i owns element i (row-major in the window).
template <typename T, bool kTanh>
__global__ void GeluKernel(T* y, int rows, int cols, int ld) {
  const int64_t total = static_cast<int64_t>(rows) * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols;
    T* p = y + r * ld + (i - r * cols);
    const float x = cuda::ToFloat(*p);
    float g;
    if constexpr (kTanh) {
      g = 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    } else {
      g = 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    }
    *p = cuda::FromFloat<T>(g);
  }
}

}  // namespace

KernelStatus GeluInPlaceCuda(const GeluInPlaceParams& p, cudaStream_t stream) {
  const int ld = p.ld == 0 ? p.cols : p.ld;
  if (p.rows < 0 || p.cols <= 0 || ld < p.cols || p.act == GemmEpilogue::kNone) {
    return KernelStatus::kInvalidShape;
  }
  if (p.rows == 0) return KernelStatus::kOk;
  if (p.y == nullptr) return KernelStatus::kNullPointer;
  const int64_t total = static_cast<int64_t>(p.rows) * p.cols;
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 65536));
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* y = static_cast<T*>(p.y);
    if (p.act == GemmEpilogue::kGeluTanh) {
      GeluKernel<T, true><<<blocks, 256, 0, stream>>>(y, p.rows, p.cols, ld);
    } else {
      GeluKernel<T, false><<<blocks, 256, 0, stream>>>(y, p.rows, p.cols, ld);
    }
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
