// CUDA entry point of the row-wise log-softmax (kernels/log_softmax.h). Device pointers; input
// kF32, kF16 or kBF16, output float32; y may equal x when the input is float32.
#pragma once

#include "kernels/device.h"
#include "kernels/log_softmax.h"

namespace phishard {

KernelStatus LogSoftmaxCuda(const LogSoftmaxParams& p, cudaStream_t stream);

}  // namespace phishard
