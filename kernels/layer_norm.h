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
  // Optional residual fold (LoRA decode steps, model/cuda_lora.h): when set, every row first
  // becomes x[r, :] = x[r, :] + fold_delta[r, :] in float32, rounded once to dtype and written
  // back into x (which must then not be y), and y is the LayerNorm of that new x. The same bits
  // as SgmvFold into x followed by a plain LayerNorm of x.
  const float* fold_delta = nullptr;  // [rows, ld_fold] row-major, float32
  int ld_fold = 0;                    // 0 means cols
  // CUDA: launch as a programmatic dependent (Hopper PDL) of the kernel before it, which may
  // write x (not weight / bias): the vector kernel of decode-sized steps without fold_delta loads
  // weight and bias, then waits for that kernel before reading x. Ignored elsewhere.
  bool programmatic_launch = false;
};

// Host memory, kF32 only. kInvalidShape when fold_delta is set and x == y or ld_fold < cols.
KernelStatus LayerNormCpu(const LayerNormParams& p);

}  // namespace phishard
