// In-place GELU on a [rows, cols] window (row stride ld) of activations: y = act(y), float32 math,
// one rounding to the storage type. The model runs it after fc1 where cuBLASLt's GELU epilogue is
// not used: a LoRA delta must be added between the projection and the activation (spec §7.4), or
// the prefill MLP fork takes the activation off the GEMM (CudaPhiModel::set_prefill_gelu_split).
#pragma once

#include "kernels/dtype.h"
#include "kernels/gemm.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct GeluInPlaceParams {
  void* y = nullptr;  // [rows, ld] row-major, dtype; columns [cols, ld) are left untouched
  int rows = 0;
  int cols = 0;
  int ld = 0;                                  // 0 means cols
  GemmEpilogue act = GemmEpilogue::kGeluTanh;  // kGeluTanh or kGeluErf
  DataType dtype = DataType::kBF16;
};

// Host memory, kF32 only: GeluTanh / GeluErf of kernels/gemm.h element by element. kInvalidShape
// for negative sizes, ld < cols or act kNone; rows == 0 does nothing.
KernelStatus GeluInPlaceCpu(const GeluInPlaceParams& p);

}  // namespace phishard
