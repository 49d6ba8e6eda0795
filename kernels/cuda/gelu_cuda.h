// In-place GELU on a [rows, cols] window (row stride ld) of 16-bit activations, float32 math, one
// rounding. The model uses it after fc1 when a LoRA delta must be added between the projection
// and the activation (spec §7.4), so cuBLASLt's GELU epilogue cannot be used. The CPU reference
// is GeluTanh / GeluErf of kernels/gemm.h applied element by element.
#pragma once

#include <cstdint>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/gemm.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct GeluInPlaceParams {
  void* y = nullptr;  // [rows, ld] device, dtype
  int rows = 0;
  int cols = 0;
  int ld = 0;                                  // 0 means cols
  GemmEpilogue act = GemmEpilogue::kGeluTanh;  // kGeluTanh or kGeluErf
  DataType dtype = DataType::kBF16;
};

// kInvalidShape for negative sizes, ld < cols or act kNone; rows == 0 launches nothing.
KernelStatus GeluInPlaceCuda(const GeluInPlaceParams& p, cudaStream_t stream);

}  // namespace phishard
