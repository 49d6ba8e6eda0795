#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/log_softmax_cuda.h"

namespace phishard {
namespace {

constexpr int kThreads = 1024;

// One block per row, three passes over the row (max, sum of exp, write); the row (<= 200 KB for
// a 51200 vocabulary) stays in L2 between passes. The sum uses expf, not exp2f of a prescaled
// value, so the result matches the float32 reference to a few ulp.
template <typename T>
__global__ void __launch_bounds__(kThreads) LogSoftmaxKernel(const T* x, float* y, int cols) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  float* yr = y + row * cols;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < cols; i += kThreads) mx = fmaxf(mx, cuda::ToFloat(xr[i]));
  mx = cuda::BlockMax(mx, scratch);
  float sum = 0.0f;
  for (int i = threadIdx.x; i < cols; i += kThreads) sum += expf(cuda::ToFloat(xr[i]) - mx);
  const float lse = mx + logf(cuda::BlockSum(sum, scratch));
  // All reads of x happened before the barrier in BlockSum, so y may alias x (float32 input).
  for (int i = threadIdx.x; i < cols; i += kThreads) yr[i] = cuda::ToFloat(xr[i]) - lse;
}

}  // namespace

KernelStatus LogSoftmaxCuda(const LogSoftmaxParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols <= 0) return KernelStatus::kInvalidShape;
  if (p.rows == 0) return KernelStatus::kOk;
  if (!p.x || !p.y) return KernelStatus::kNullPointer;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    LogSoftmaxKernel<T><<<p.rows, kThreads, 0, stream>>>(static_cast<const T*>(p.x), p.y, p.cols);
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
