// The GELU formulas every CUDA kernel applies in float32 (the CPU reference is kernels/gelu.h):
// one definition, so that the elementwise op, the GEMV / SGMV / LoRA epilogues and the persistent
// decode kernel give the same value for the same input.
#pragma once

#include <cuda_runtime.h>

namespace phishard::cuda {

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), HF "gelu_new" / "gelu_pytorch_tanh".
__device__ __forceinline__ float GeluTanh(float x) {
  return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// 0.5 x (1 + erf(x / sqrt(2))), HF "gelu".
__device__ __forceinline__ float GeluErf(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

// kAct: 0 none, 1 GELU tanh, 2 GELU erf.
template <int kAct>
__device__ __forceinline__ float GeluAct(float x) {
  if constexpr (kAct == 1) {
    return GeluTanh(x);
  } else if constexpr (kAct == 2) {
    return GeluErf(x);
  } else {
    return x;
  }
}

}  // namespace phishard::cuda
