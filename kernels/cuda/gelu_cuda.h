// CUDA entry point of the in-place GELU (kernels/gelu.h). Device pointer; kF32, kF16, kBF16.
// float32 math with the same formulas as GeluTanh / GeluErf (tanhf / erff), one rounding.
// Windows whose columns, row stride and pointer allow it are read and written 16 bytes a thread;
// others one element a thread.
#pragma once

#include "kernels/device.h"
#include "kernels/gelu.h"

namespace phishard {

// kInvalidShape for negative sizes, ld < cols or act kNone; rows == 0 launches nothing.
KernelStatus GeluInPlaceCuda(const GeluInPlaceParams& p, cudaStream_t stream);

}  // namespace phishard
