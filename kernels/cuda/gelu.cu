#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gelu_math.cuh"
#include "kernels/cuda/gelu_cuda.h"

namespace phishard {
namespace {

template <bool kTanh>
__device__ __forceinline__ float Gelu(float x) {
  return kTanh ? cuda::GeluTanh(x) : cuda::GeluErf(x);
}

// Grid-stride over the window's 16-byte vectors (kVec elements each, vec_cols a row, row stride
// ld_vec vectors); thread i owns vector i (row-major in the window). For contiguous rows the host
// passes the whole window as one row (vec_cols = total).
template <typename T, bool kTanh>
__global__ void GeluVecKernel(uint4* y, int64_t vec_cols, int64_t ld_vec, int64_t total) {
  constexpr int kVec = 16 / sizeof(T);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / vec_cols;
    uint4* p = y + r * ld_vec + (i - r * vec_cols);
    uint4 v = *p;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) e[k] = cuda::FromFloat<T>(Gelu<kTanh>(cuda::ToFloat(e[k])));
    *p = v;
  }
}

// Any window: grid-stride over its rows x cols elements; thread i owns element i.
template <typename T, bool kTanh>
__global__ void GeluKernel(T* y, int rows, int cols, int ld) {
  const int64_t total = static_cast<int64_t>(rows) * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols;
    T* p = y + r * ld + (i - r * cols);
    *p = cuda::FromFloat<T>(Gelu<kTanh>(cuda::ToFloat(*p)));
  }
}

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

}  // namespace

KernelStatus GeluInPlaceCuda(const GeluInPlaceParams& p, cudaStream_t stream) {
  const int ld = p.ld == 0 ? p.cols : p.ld;
  if (p.rows < 0 || p.cols <= 0 || ld < p.cols || p.act == GemmEpilogue::kNone) {
    return KernelStatus::kInvalidShape;
  }
  if (p.rows == 0) return KernelStatus::kOk;
  if (p.y == nullptr) return KernelStatus::kNullPointer;
  const bool is_tanh = p.act == GemmEpilogue::kGeluTanh;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    T* y = static_cast<T*>(p.y);
    if (p.cols % kVec == 0 && ld % kVec == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0) {
      const int64_t total = static_cast<int64_t>(p.rows) * (p.cols / kVec);
      const int64_t vec_cols = ld == p.cols ? total : p.cols / kVec;
      const int blocks = static_cast<int>(std::min((total + kThreads - 1) / kThreads, kMaxBlocks));
      auto* v = reinterpret_cast<uint4*>(y);
      if (is_tanh) {
        GeluVecKernel<T, true><<<blocks, kThreads, 0, stream>>>(v, vec_cols, ld / kVec, total);
      } else {
        GeluVecKernel<T, false><<<blocks, kThreads, 0, stream>>>(v, vec_cols, ld / kVec, total);
      }
      return cuda::LaunchStatus();
    }
    const int64_t total = static_cast<int64_t>(p.rows) * p.cols;
    const int blocks = static_cast<int>(std::min((total + kThreads - 1) / kThreads, kMaxBlocks));
    if (is_tanh) {
      GeluKernel<T, true><<<blocks, kThreads, 0, stream>>>(y, p.rows, p.cols, ld);
    } else {
      GeluKernel<T, false><<<blocks, kThreads, 0, stream>>>(y, p.rows, p.cols, ld);
    }
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
