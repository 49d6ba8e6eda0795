// Linear layer GEMM with an optional fused epilogue:
//   y[M, N] = act(x[M, K] · w[N, K]^T + bias[N])            (accumulate = false)
//   y[M, N] = act(y[M, N] + x[M, K] · w[N, K]^T + bias[N])  (accumulate = true)
// `w` is in the Hugging Face nn.Linear layout [out, in]. Leading dimensions allow reading x and w
// from, and writing y into, a column window of a wider row-major buffer.
#pragma once

#include <cstdint>

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
  const void* w = nullptr;     // [n, k] row-major, row stride ldw (>= k; 0 means k), dtype
  const void* bias = nullptr;  // [n] dtype, or null for no bias
  void* y = nullptr;           // [m, n] row-major, row stride ldy (>= n; 0 means n), dtype
  int m = 0;
  int n = 0;
  int k = 0;
  int ldx = 0;
  int ldy = 0;
  int ldw = 0;  // a column window of a wider w (e.g. one adapter's columns of a concatenated B)
  bool accumulate = false;  // y += ... instead of y = ...
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  DataType dtype = DataType::kF32;
  // Strided batch: `batch` independent products, item i reading x + i batch_stride_x and
  // w + i batch_stride_w and writing y + i batch_stride_y (elements; no bias when batch > 1).
  int batch = 1;
  int64_t batch_stride_x = 0;
  int64_t batch_stride_w = 0;
  int64_t batch_stride_y = 0;
  // CUDA (cuBLASLt) only: the SMs the algorithm choice should assume it has
  // (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET), for a GEMM meant to run beside another kernel that
  // holds the rest; 0: every SM of the device. No effect on the result's definition.
  int sm_count_target = 0;
};

// Host memory, kF32 only, through OpenBLAS cblas_sgemm. y must not overlap x or w.
KernelStatus GemmCpu(const GemmParams& p);

// The activations applied by the epilogues, float32 (shared with tests and other ops).
float GeluTanh(float x);
float GeluErf(float x);

}  // namespace phishard
