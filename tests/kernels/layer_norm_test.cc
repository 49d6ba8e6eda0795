#include "kernels/layer_norm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using testing_util::Poisoned;
using testing_util::RandomVector;

// Naive two-pass LayerNorm in double.
std::vector<double> NaiveLayerNorm(const std::vector<float>& x, const std::vector<float>& w,
                                   const std::vector<float>& b, int rows, int cols, double eps) {
  std::vector<double> y(x.size());
  for (int r = 0; r < rows; ++r) {
    double mean = 0.0, var = 0.0;
    for (int i = 0; i < cols; ++i) mean += x[r * cols + i];
    mean /= cols;
    for (int i = 0; i < cols; ++i) var += (x[r * cols + i] - mean) * (x[r * cols + i] - mean);
    var /= cols;
    for (int i = 0; i < cols; ++i) {
      y[r * cols + i] = (x[r * cols + i] - mean) / std::sqrt(var + eps) * w[i] + b[i];
    }
  }
  return y;
}

// Tolerance: the statistics are exact to double precision, so the error is the float32 rounding of
// mean and 1/std (1 ulp each) and of three float ops per element: a few u relative to |ref|, plus
// the rounding of the mean (ulp(3) ~ 2.4e-7 for the offset inputs below) amplified by 1/std ~ 1.7.
// 1e-5 * (1 + |ref|) covers that with ~10x margin; a missing bias, weight or centring is O(1) off.
TEST(LayerNorm, MatchesNaiveDoubleReference) {
  for (int cols : {1, 7, 64, 80, 256, 2560}) {
    for (int rows : {1, 3, 17}) {
      SCOPED_TRACE(testing::Message() << "rows=" << rows << " cols=" << cols);
      // Offset inputs (mean ~3) exercise the centring.
      const std::vector<float> x = RandomVector(static_cast<size_t>(rows) * cols, cols, 2.0f, 4.0f);
      const std::vector<float> w = RandomVector(cols, cols + 1, 0.5f, 1.5f);
      const std::vector<float> b = RandomVector(cols, cols + 2);
      std::vector<float> y = Poisoned(x.size());
      LayerNormParams p{.x = x.data(),
                        .weight = w.data(),
                        .bias = b.data(),
                        .y = y.data(),
                        .rows = rows,
                        .cols = cols,
                        .eps = 1e-5f};
      ASSERT_EQ(LayerNormCpu(p), KernelStatus::kOk);
      const std::vector<double> ref = NaiveLayerNorm(x, w, b, rows, cols, 1e-5);
      for (size_t i = 0; i < y.size(); ++i) {
        ASSERT_NEAR(y[i], ref[i], 1e-5 * (1.0 + std::fabs(ref[i]))) << "at " << i;
      }
      // In place gives the same bits.
      std::vector<float> inplace = x;
      p.x = inplace.data();
      p.y = inplace.data();
      ASSERT_EQ(LayerNormCpu(p), KernelStatus::kOk);
      ASSERT_EQ(inplace, y);
    }
  }
}

// With a tiny variance eps dominates: a wrong eps would be far off here.
TEST(LayerNorm, UsesEps) {
  const int cols = 16;
  std::vector<float> x(cols);
  for (int i = 0; i < cols; ++i) x[i] = 1.0f + 1e-3f * (i % 2 ? 1 : -1);  // var = 1e-6
  const std::vector<float> w(cols, 1.0f), b(cols, 0.0f);
  std::vector<float> y(cols);
  LayerNormParams p{.x = x.data(),
                    .weight = w.data(),
                    .bias = b.data(),
                    .y = y.data(),
                    .rows = 1,
                    .cols = cols,
                    .eps = 1e-5f};
  ASSERT_EQ(LayerNormCpu(p), KernelStatus::kOk);
  const std::vector<double> ref = NaiveLayerNorm(x, w, b, 1, cols, 1e-5);
  for (int i = 0; i < cols; ++i) EXPECT_NEAR(y[i], ref[i], 1e-4 * std::fabs(ref[i]));
  EXPECT_LT(std::fabs(y[0]), 0.5);  // without eps it would be ~1
}

// The residual fold (LayerNormParams::fold_delta): x += delta (row stride ld_fold) is written back,
// and y is the LayerNorm of the new x, against the naive double reference on x + delta computed
// here (tolerance as MatchesNaiveDoubleReference: the add is one exact-to-float32 op either way).
TEST(LayerNorm, FoldAddsDeltaThenNormalises) {
  const int rows = 5, cols = 80, ld = 96;
  std::vector<float> x = RandomVector(static_cast<size_t>(rows) * cols, 11, 2.0f, 4.0f);
  const std::vector<float> w = RandomVector(cols, 12, 0.5f, 1.5f);
  const std::vector<float> b = RandomVector(cols, 13);
  const std::vector<float> delta = RandomVector(static_cast<size_t>(rows) * ld, 14, -0.5f, 0.5f);
  std::vector<float> want_x = x;
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) want_x[r * cols + c] += delta[r * ld + c];
  }
  std::vector<float> y = Poisoned(x.size());
  LayerNormParams p{.x = x.data(),
                    .weight = w.data(),
                    .bias = b.data(),
                    .y = y.data(),
                    .rows = rows,
                    .cols = cols,
                    .eps = 1e-5f,
                    .fold_delta = delta.data(),
                    .ld_fold = ld};
  ASSERT_EQ(LayerNormCpu(p), KernelStatus::kOk);
  EXPECT_EQ(x, want_x);
  const std::vector<double> ref = NaiveLayerNorm(want_x, w, b, rows, cols, 1e-5);
  for (size_t i = 0; i < y.size(); ++i) {
    ASSERT_NEAR(y[i], ref[i], 1e-5 * (1.0 + std::fabs(ref[i]))) << "at " << i;
  }
  p.y = x.data();  // in place would read the folded x for y too: refused
  EXPECT_EQ(LayerNormCpu(p), KernelStatus::kInvalidShape);
  p.y = y.data();
  p.ld_fold = cols - 1;
  EXPECT_EQ(LayerNormCpu(p), KernelStatus::kInvalidShape);
}

TEST(LayerNorm, RejectsBadParams) {
  std::vector<float> buf(8, 1.0f);
  LayerNormParams p{.x = buf.data(),
                    .weight = buf.data(),
                    .bias = nullptr,
                    .y = buf.data(),
                    .rows = 1,
                    .cols = 8};
  EXPECT_EQ(LayerNormCpu(p), KernelStatus::kNullPointer);
  p.bias = buf.data();
  p.cols = 0;
  EXPECT_EQ(LayerNormCpu(p), KernelStatus::kInvalidShape);
  p.cols = 8;
  p.dtype = DataType::kBF16;
  EXPECT_EQ(LayerNormCpu(p), KernelStatus::kUnsupportedDtype);
}

}  // namespace
}  // namespace phishard
