// Fills device memory with pseudo-random values uniform in [center - spread, center + spread),
// rounded to the element type: random model weights made on the device (benchmarks of
// checkpoint-free Phi shapes) without a host pass over gigabytes. Element i depends only on
// (seed, i) through a counter-based hash (splitmix64), so a fill is reproducible and independent
// of the launch shape.
#pragma once

#include <cstdint>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct RandomFillParams {
  void* data = nullptr;  // [count] device, dtype
  int64_t count = 0;
  float center = 0.0f;
  float spread = 1.0f;
  uint64_t seed = 0;
  DataType dtype = DataType::kF32;
};

// The value element i receives, before rounding to dtype (host reference).
float RandomFillValue(const RandomFillParams& p, int64_t i);

KernelStatus RandomFillCuda(const RandomFillParams& p, cudaStream_t stream);

}  // namespace phishard
