#include "kernels/greedy_pick.h"

#include <cmath>
#include <limits>

namespace phishard {

KernelStatus GreedyPickCpu(const GreedyPickParams& p) {
  if (KernelStatus st = GreedyPickCheck(p); st != KernelStatus::kOk) return st;
  const auto at = [&](int r, int c) {
    return p.logits[(c / p.part_cols) * p.part_stride + r * p.row_stride + c % p.part_cols];
  };
  for (int r = 0; r < p.rows; ++r) {
    // Argmax: first index of the largest non-NaN entry, 0 when all are NaN.
    int32_t best = 0;
    float best_score = -std::numeric_limits<float>::infinity();
    bool found = false;
    float max = -std::numeric_limits<float>::infinity();  // over finite entries only
    for (int c = 0; c < p.cols; ++c) {
      const float s = at(r, c);
      if (std::isnan(s)) continue;
      if (!found || s > best_score) {
        best = c;
        best_score = s;
        found = true;
      }
      if (std::isfinite(s) && s > max) max = s;
    }
    double lse = -std::numeric_limits<double>::infinity();
    if (std::isfinite(max)) {
      double sum = 0.0;
      for (int c = 0; c < p.cols; ++c) {
        const float s = at(r, c);
        if (std::isfinite(s)) sum += std::exp(static_cast<double>(s) - max);
      }
      lse = max + std::log(sum);
    }
    p.out[r].id = best;
    p.out[r].logprob = static_cast<float>(at(r, best) - lse);
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
