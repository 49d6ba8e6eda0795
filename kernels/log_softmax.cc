#include "kernels/log_softmax.h"

#include <algorithm>
#include <cmath>

namespace phishard {

KernelStatus LogSoftmaxCpu(const LogSoftmaxParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.rows < 0 || p.cols <= 0) return KernelStatus::kInvalidShape;
  if (p.rows == 0) return KernelStatus::kOk;
  if (!p.x || !p.y) return KernelStatus::kNullPointer;
  const auto* x = static_cast<const float*>(p.x);
  for (int r = 0; r < p.rows; ++r) {
    const float* xr = x + static_cast<size_t>(r) * p.cols;
    float* yr = p.y + static_cast<size_t>(r) * p.cols;
    const float max = *std::max_element(xr, xr + p.cols);
    // Sum in double: over a 51200-entry vocabulary a float sum would lose ~1e-5 relative.
    double sum = 0.0;
    for (int i = 0; i < p.cols; ++i) sum += std::exp(static_cast<double>(xr[i]) - max);
    const float log_sum = static_cast<float>(std::log(sum));
    for (int i = 0; i < p.cols; ++i) yr[i] = (xr[i] - max) - log_sum;
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
