// LayerNorm over the last dimension with affine weight and bias:
//   y[r, :] = (x[r, :] - mean_r) / sqrt(var_r + eps) * weight + bias
// mean/var (biased, as torch.nn.LayerNorm) are computed in float32 or wider whatever the dtype.
#pragma once

#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct LayerNormParams {
  const void* x = nullptr;       // [rows, cols] row-major, dtype
  const void* weight = nullptr;  // [cols], dtype
  const void* bias = nullptr;    // [cols], dtype
  void* y = nullptr;             // [rows, cols] row-major, dtype; may equal x (in place)
  int rows = 0;
  int cols = 0;
  float eps = 1e-5f;
  DataType dtype = DataType::kF32;
};

// Host memory, kF32 only.
KernelStatus LayerNormCpu(const LayerNormParams& p);

}  // namespace phishard
