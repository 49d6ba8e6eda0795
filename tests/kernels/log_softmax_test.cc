#include "kernels/log_softmax.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using testing_util::Poisoned;
using testing_util::RandomVector;

// Tolerance: (x - max) is exact or off by 1 ulp, log(sum) is computed in double and rounded once,
// and one float subtraction follows, so the error is a few ulp of |result| (<= ~4 u |ref|) plus
// 1 ulp of the largest logit; 4e-7 * (|ref| + max|x|) + 1e-7 covers it.
TEST(LogSoftmax, MatchesNaiveDoubleReference) {
  for (int cols : {1, 2, 17, 512, 4095, 51200}) {
    const int rows = 3;
    // Logits up to +-30 like a real model's, one row shifted by +1000 (overflow without max-shift).
    std::vector<float> x = RandomVector(static_cast<size_t>(rows) * cols, cols, -30.0f, 30.0f);
    for (int i = 0; i < cols; ++i) x[2 * cols + i] += 1000.0f;
    std::vector<float> y = Poisoned(x.size());
    LogSoftmaxParams p{.x = x.data(), .y = y.data(), .rows = rows, .cols = cols};
    ASSERT_EQ(LogSoftmaxCpu(p), KernelStatus::kOk);
    for (int r = 0; r < rows; ++r) {
      const float* xr = x.data() + r * cols;
      double m = *std::max_element(xr, xr + cols), s = 0.0;
      for (int i = 0; i < cols; ++i) s += std::exp(static_cast<double>(xr[i]) - m);
      double prob_sum = 0.0;
      for (int i = 0; i < cols; ++i) {
        const double ref = xr[i] - m - std::log(s);
        const double tol = 4e-7 * (std::fabs(ref) + std::fabs(m)) + 1e-7;
        ASSERT_NEAR(y[r * cols + i], ref, tol) << "cols=" << cols << " row " << r << " i " << i;
        prob_sum += std::exp(static_cast<double>(y[r * cols + i]));
      }
      EXPECT_NEAR(prob_sum, 1.0, 1e-4);
    }
  }
}

TEST(LogSoftmax, RejectsBadParams) {
  std::vector<float> buf(4);
  LogSoftmaxParams p{.x = buf.data(), .y = nullptr, .rows = 1, .cols = 4};
  EXPECT_EQ(LogSoftmaxCpu(p), KernelStatus::kNullPointer);
  p.y = buf.data();
  p.cols = 0;
  EXPECT_EQ(LogSoftmaxCpu(p), KernelStatus::kInvalidShape);
  p.cols = 4;
  p.dtype = DataType::kF16;
  EXPECT_EQ(LogSoftmaxCpu(p), KernelStatus::kUnsupportedDtype);
}

}  // namespace
}  // namespace phishard
