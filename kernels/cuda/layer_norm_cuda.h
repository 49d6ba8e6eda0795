// CUDA entry point of LayerNorm (kernels/layer_norm.h). Device pointers; kF32, kF16, kBF16.
// Statistics in float32 (two passes: mean, then the mean of squared deviations, which avoids the
// cancellation of E[x^2] - E[x]^2); y may equal x.
#pragma once

#include "kernels/device.h"
#include "kernels/layer_norm.h"

namespace phishard {

KernelStatus LayerNormCuda(const LayerNormParams& p, cudaStream_t stream);

}  // namespace phishard
