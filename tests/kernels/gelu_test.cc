#include "kernels/gelu.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using testing_util::NaiveGeluErf;
using testing_util::NaiveGeluTanh;
using testing_util::RandomVector;

// The CPU reference against the double formulas on a [rows, cols] window of a [rows, ld] buffer.
// Tolerance: tanh / erf in float are within a few ulps, 1 + t loses a few ulps of 1 as t -> -1
// (cancellation), scaled by 0.5 |x|, and the products add a few roundings of |gelu(x)| <= |x|: 4
// float32 ulps of |x| plus 1e-7 absolute cover it. The padding columns must keep their bits.
TEST(GeluInPlaceCpu, MatchesDoubleFormulasAndKeepsPadding) {
  const int rows = 7, cols = 33, ld = 40;
  for (GemmEpilogue act : {GemmEpilogue::kGeluTanh, GemmEpilogue::kGeluErf}) {
    std::vector<float> y = RandomVector(static_cast<size_t>(rows) * ld, 5, -8.0f, 8.0f);
    y[0] = 0.0f;
    y[1] = -30.0f;  // saturates to -0
    y[2] = 30.0f;   // saturates to x
    const std::vector<float> x = y;
    ASSERT_EQ(GeluInPlaceCpu({.y = y.data(),
                              .rows = rows,
                              .cols = cols,
                              .ld = ld,
                              .act = act,
                              .dtype = DataType::kF32}),
              KernelStatus::kOk);
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < ld; ++c) {
        const size_t i = static_cast<size_t>(r) * ld + c;
        if (c >= cols) {
          EXPECT_EQ(y[i], x[i]) << "padding at " << r << "," << c;
          continue;
        }
        const double ref =
            act == GemmEpilogue::kGeluTanh ? NaiveGeluTanh(x[i]) : NaiveGeluErf(x[i]);
        EXPECT_NEAR(y[i], ref, 4 * std::fabs(x[i]) * 1.2e-7 + 1e-7)
            << r << "," << c << " x " << x[i];
      }
    }
  }
}

TEST(GeluInPlaceCpu, RejectsBadParams) {
  std::vector<float> y(16, 1.0f);
  const GeluInPlaceParams ok{.y = y.data(), .rows = 2, .cols = 8, .dtype = DataType::kF32};
  EXPECT_EQ(GeluInPlaceCpu(ok), KernelStatus::kOk);
  GeluInPlaceParams p = ok;
  p.ld = 4;  // < cols
  EXPECT_EQ(GeluInPlaceCpu(p), KernelStatus::kInvalidShape);
  p = ok;
  p.act = GemmEpilogue::kNone;
  EXPECT_EQ(GeluInPlaceCpu(p), KernelStatus::kInvalidShape);
  p = ok;
  p.rows = -1;
  EXPECT_EQ(GeluInPlaceCpu(p), KernelStatus::kInvalidShape);
  p = ok;
  p.dtype = DataType::kBF16;
  EXPECT_EQ(GeluInPlaceCpu(p), KernelStatus::kUnsupportedDtype);
  p = ok;
  p.y = nullptr;
  EXPECT_EQ(GeluInPlaceCpu(p), KernelStatus::kNullPointer);
  p.rows = 0;  // nothing to do, no pointer needed
  EXPECT_EQ(GeluInPlaceCpu(p), KernelStatus::kOk);
}

}  // namespace
}  // namespace phishard
