// Linear layer GEMM with an optional fused epilogue:
//   y[M, N] = act(x[M, K] · w[N, K]^T + bias[N])            (accumulate = false)
//   y[M, N] = act(y[M, N] + x[M, K] · w[N, K]^T + bias[N])  (accumulate = true)
// `w` is in the Hugging Face nn.Linear layout [out, in]. Leading dimensions allow reading x from,
// and writing y into, a column window of a wider row-major buffer.
#pragma once

#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

enum class GemmEpilogue {
  kNone,
  kGeluTanh,  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))   (HF gelu_new)
  kGeluErf,   // 0.5 x (1 + erf(x / sqrt(2)))                       (torch exact GELU)
};

struct GemmParams {
  const void* x = nullptr;     // [m, k] row-major, row stride ldx (>= k; 0 means k), dtype
  const void* w = nullptr;     // [n, k] row-major (dense), dtype
  const void* bias = nullptr;  // [n] dtype, or null for no bias
  void* y = nullptr;           // [m, n] row-major, row stride ldy (>= n; 0 means n), dtype
  int m = 0;
  int n = 0;
  int k = 0;
  int ldx = 0;
  int ldy = 0;
  bool accumulate = false;  // y += ... instead of y = ...
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  DataType dtype = DataType::kF32;
};

// Host memory, kF32 only, through OpenBLAS cblas_sgemm. y must not overlap x or w.
KernelStatus GemmCpu(const GemmParams& p);

// The activations applied by the epilogues, float32 (shared with tests and other ops).
float GeluTanh(float x);
float GeluErf(float x);

}  // namespace phishard
