// Row-wise log-softmax: y[r, i] = x[r, i] - max_r - log(sum_i exp(x[r, i] - max_r)).
// The output is always float32 (log-probabilities feed sampling and the logprobs the router sees).
#pragma once

#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct LogSoftmaxParams {
  const void* x = nullptr;  // [rows, cols] row-major, dtype
  float* y = nullptr;       // [rows, cols] row-major, float32; may equal x when dtype is kF32
  int rows = 0;
  int cols = 0;
  DataType dtype = DataType::kF32;
};

// Host memory, kF32 input only.
KernelStatus LogSoftmaxCpu(const LogSoftmaxParams& p);

}  // namespace phishard
