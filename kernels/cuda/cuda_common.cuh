// Shared device helpers for the CUDA ops: element conversions, warp/block reductions, the closed
// dtype dispatch and launch-error mapping. Included by kernels/cuda/*.cu only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard::cuda {

// ---- element conversions (storage type <-> float32 compute) ----
__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two packed 16-bit elements (one 32-bit word) to float2.
template <typename T>
__device__ __forceinline__ float2 Word2ToFloat2(uint32_t w);
template <>
__device__ __forceinline__ float2 Word2ToFloat2<__half>(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, 4);
  return __half22float2(h);
}
// bf16 is the high half of an fp32: a shift and a mask (2 integer ops a pair; __bfloat1622float2
// compiles to PRMT + two shifts), the same floats. The decode attention's inner loops unpack every
// K and V element this way (with Exp2Ftz: x0.985 at b256 ctx1024, perf-log 2026-11-30 11:33).
template <>
__device__ __forceinline__ float2 Word2ToFloat2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

// 2^x by one MUFU.EX2 (relative error ~2^-22) with denormal results flushed to zero (exp2f adds
// a range fix for them, ~4 instructions); -inf gives +0. For softmax weights against a reference
// max (the prefill attention kernels, the pipelined decode attention), where a weight under
// 2^-126 of the reference does not change a bf16 / fp16 output.
__device__ __forceinline__ float Exp2Ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- reductions ----
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum/max for blockDim.x a multiple of 32 (<= 1024). `scratch` holds 32 floats of
// shared memory; the call starts with a barrier so the same scratch can be reused back to back.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = WarpSum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : 0.0f;
  return WarpSum(v);
}
__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = WarpMax(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : -INFINITY;
  return WarpMax(v);
}

// ---- closed dtype dispatch ----
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the 16-bit storage types; any other dtype is kUnsupportedDtype.
template <typename F>
KernelStatus DispatchHalfTypes(DataType dtype, F&& f) {
  switch (dtype) {
    case DataType::kF16:
      return f(TypeTag<__half>{});
    case DataType::kBF16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      return KernelStatus::kUnsupportedDtype;
  }
}
// Same, float32 included (element-wise ops where f32 costs nothing extra).
template <typename F>
KernelStatus DispatchAllTypes(DataType dtype, F&& f) {
  switch (dtype) {
    case DataType::kF32:
      return f(TypeTag<float>{});
    case DataType::kF16:
      return f(TypeTag<__half>{});
    case DataType::kBF16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return KernelStatus::kUnsupportedDtype;
}

// Loads each kernel's module now (cudaFuncGetAttributes) instead of at its first launch, which
// under CUDA's lazy module loading stalls the launching thread while the GPU runs other work
// (kernels/cuda/copy_engine_all_reduce_cuda.h says when that matters). kDeviceError when one
// does not load.
template <typename... Kernels>
KernelStatus LoadKernels(Kernels... kernels) {
  cudaFuncAttributes attr;
  const bool ok = ((cudaFuncGetAttributes(&attr, kernels) == cudaSuccess) && ...);
  return ok ? KernelStatus::kOk : KernelStatus::kDeviceError;
}

// After a launch: a configuration or launch failure is kDeviceError (the caller reads the text
// with DeviceErrorString(DeviceGetLastError()) if it wants it; we leave it in place by peeking).
inline KernelStatus LaunchStatus() {
  return cudaPeekAtLastError() == cudaSuccess ? KernelStatus::kOk : KernelStatus::kDeviceError;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch (Hopper PDL)
// when `programmatic`: it may start while the kernel before it in the stream finishes, so it must
// call cudaGridDependencySynchronize() (griddepcontrol.wait) before reading that kernel's output.
// kDeviceError when the launch is refused, then LaunchStatus().
template <typename... KernelArgs, typename... Args>
KernelStatus LaunchMaybeProgrammatic(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                                     size_t smem, cudaStream_t stream, bool programmatic,
                                     Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = programmatic ? 1 : 0;
  if (cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...) != cudaSuccess) {
    return KernelStatus::kDeviceError;
  }
  return LaunchStatus();
}

// The same, always programmatic, no dynamic shared memory.
template <typename... KernelArgs, typename... Args>
KernelStatus LaunchProgrammatic(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                                cudaStream_t stream, Args&&... args) {
  return LaunchMaybeProgrammatic(kernel, grid, block, 0, stream, true, std::forward<Args>(args)...);
}

inline int CeilDiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace phishard::cuda
