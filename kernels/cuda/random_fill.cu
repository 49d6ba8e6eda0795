#include <algorithm>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/random_fill_cuda.h"

namespace phishard {
namespace {

__host__ __device__ inline float UniformAt(uint64_t seed, int64_t i, float center, float spread) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i) + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
  return center + spread * (2.0f * u - 1.0f);
}

template <typename T>
__global__ void RandomFillKernel(T* data, int64_t count, float center, float spread,
                                 uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    data[i] = cuda::FromFloat<T>(UniformAt(seed, i, center, spread));
  }
}

}  // namespace

float RandomFillValue(const RandomFillParams& p, int64_t i) {
  return UniformAt(p.seed, i, p.center, p.spread);
}

KernelStatus RandomFillCuda(const RandomFillParams& p, cudaStream_t stream) {
  if (p.count < 0) return KernelStatus::kInvalidShape;
  if (p.count == 0) return KernelStatus::kOk;
  if (p.data == nullptr) return KernelStatus::kNullPointer;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int blocks = static_cast<int>(std::min<int64_t>((p.count + 255) / 256, 16384));
    RandomFillKernel<T>
        <<<blocks, 256, 0, stream>>>(static_cast<T*>(p.data), p.count, p.center, p.spread, p.seed);
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
