#include "kernels/layer_norm.h"

#include <cmath>

namespace phishard {

KernelStatus LayerNormCpu(const LayerNormParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.rows < 0 || p.cols <= 0) return KernelStatus::kInvalidShape;
  if (p.rows == 0) return KernelStatus::kOk;
  if (!p.x || !p.weight || !p.bias || !p.y) return KernelStatus::kNullPointer;
  if (p.fold_delta != nullptr && (p.x == p.y || (p.ld_fold != 0 && p.ld_fold < p.cols))) {
    return KernelStatus::kInvalidShape;
  }
  const auto* x = static_cast<const float*>(p.x);
  const auto* w = static_cast<const float*>(p.weight);
  const auto* b = static_cast<const float*>(p.bias);
  auto* y = static_cast<float*>(p.y);
  const int n = p.cols;
  for (int r = 0; r < p.rows; ++r) {
    const float* xr = x + static_cast<size_t>(r) * n;
    float* yr = y + static_cast<size_t>(r) * n;
    if (p.fold_delta != nullptr) {  // x += delta, written back (one float32 add = one rounding)
      float* xw = const_cast<float*>(xr);
      const float* d = p.fold_delta + static_cast<size_t>(r) * (p.ld_fold == 0 ? n : p.ld_fold);
      for (int i = 0; i < n; ++i) xw[i] += d[i];
    }
    // Two passes (mean, then centred variance) in double: no cancellation, and the result is
    // exactly the float32 statistics rounded once.
    double sum = 0.0;
    for (int i = 0; i < n; ++i) sum += xr[i];
    const double mean = sum / n;
    double sq = 0.0;
    for (int i = 0; i < n; ++i) {
      const double d = xr[i] - mean;
      sq += d * d;
    }
    const float inv_std = static_cast<float>(1.0 / std::sqrt(sq / n + static_cast<double>(p.eps)));
    const float mean_f = static_cast<float>(mean);
    for (int i = 0; i < n; ++i) yr[i] = (xr[i] - mean_f) * inv_std * w[i] + b[i];
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
