#include "kernels/gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using testing_util::kF32Unit;
using testing_util::NaiveGeluErf;
using testing_util::NaiveGeluTanh;
using testing_util::Poisoned;
using testing_util::RandomVector;

struct Shape {
  int m, n, k;
};

class GemmTest : public ::testing::TestWithParam<Shape> {};

// Runs every epilogue / bias / accumulate combination on one shape against a double reference
// (with accumulate the activation applies to y_old + x·wᵀ + b).
// Tolerance: the classic float32 dot-product bound |err| <= (k + 2) u * sum_k |x_k w_k| (+ |b|,
// + |y_old| when accumulating), u = 2^-24, one extra u for the final rounding; GELU multiplies the
// pre-activation error by |gelu'| <= 1.13 and adds a few ulp of its own, so we allow 2x that bound
// plus 1e-6 absolute for the tanh/erf evaluation in float.
TEST_P(GemmTest, MatchesNaiveDoubleReference) {
  const Shape s = GetParam();
  const std::vector<float> x = RandomVector(static_cast<size_t>(s.m) * s.k, 1 + s.m);
  const std::vector<float> w = RandomVector(static_cast<size_t>(s.n) * s.k, 2 + s.n);
  const std::vector<float> bias = RandomVector(s.n, 3 + s.k);
  const std::vector<float> y_old = RandomVector(static_cast<size_t>(s.m) * s.n, 4);

  for (GemmEpilogue epi : {GemmEpilogue::kNone, GemmEpilogue::kGeluTanh, GemmEpilogue::kGeluErf}) {
    for (bool with_bias : {false, true}) {
      for (bool accumulate : {false, true}) {
        SCOPED_TRACE(testing::Message() << "m=" << s.m << " n=" << s.n << " k=" << s.k
                                        << " epi=" << static_cast<int>(epi) << " bias=" << with_bias
                                        << " acc=" << accumulate);
        std::vector<float> y = accumulate ? y_old : Poisoned(y_old.size());
        GemmParams p;
        p.x = x.data();
        p.w = w.data();
        p.bias = with_bias ? bias.data() : nullptr;
        p.y = y.data();
        p.m = s.m;
        p.n = s.n;
        p.k = s.k;
        p.accumulate = accumulate;
        p.epilogue = epi;
        ASSERT_EQ(GemmCpu(p), KernelStatus::kOk);
        for (int i = 0; i < s.m; ++i) {
          for (int j = 0; j < s.n; ++j) {
            double ref = 0.0, mag = 0.0;
            for (int kk = 0; kk < s.k; ++kk) {
              const double prod = static_cast<double>(x[i * s.k + kk]) * w[j * s.k + kk];
              ref += prod;
              mag += std::fabs(prod);
            }
            if (with_bias) {
              ref += bias[j];
              mag += std::fabs(bias[j]);
            }
            if (accumulate) {
              ref += y_old[i * s.n + j];
              mag += std::fabs(y_old[i * s.n + j]);
            }
            if (epi == GemmEpilogue::kGeluTanh) ref = NaiveGeluTanh(ref);
            if (epi == GemmEpilogue::kGeluErf) ref = NaiveGeluErf(ref);
            const double tol = 2.0 * (s.k + 3) * kF32Unit * mag + 1e-6;
            ASSERT_NEAR(y[i * s.n + j], ref, tol) << "at (" << i << ", " << j << ")";
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmTest,
                         ::testing::Values(Shape{1, 1, 1}, Shape{1, 64, 80}, Shape{3, 5, 7},
                                           Shape{15, 33, 64}, Shape{16, 80, 256},
                                           Shape{17, 240, 80}, Shape{40, 257, 129}));

// x, w and y as column windows of wider buffers: the columns outside the window stay untouched
// (w's window starts at column 2 of rows of ldw = 10, as one adapter's columns of a
// concatenated LoRA B; the NaN columns around it must never be read).
TEST(GemmStrided, ReadsAndWritesColumnWindows) {
  const int m = 5, n = 6, k = 7, ldx = 11, ldy = 9, ldw = 10, w0 = 2;
  const std::vector<float> x = RandomVector(static_cast<size_t>(m) * ldx, 7);
  std::vector<float> w = RandomVector(static_cast<size_t>(n) * ldw, 8);
  for (int j = 0; j < n; ++j) {
    for (int c = 0; c < ldw; ++c) {
      if (c < w0 || c >= w0 + k) w[j * ldw + c] = NAN;
    }
  }
  std::vector<float> y = Poisoned(static_cast<size_t>(m) * ldy);
  GemmParams p{.x = x.data(),
               .w = w.data() + w0,
               .y = y.data(),
               .m = m,
               .n = n,
               .k = k,
               .ldx = ldx,
               .ldy = ldy,
               .ldw = ldw};
  ASSERT_EQ(GemmCpu(p), KernelStatus::kOk);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < ldy; ++j) {
      if (j >= n) {
        EXPECT_TRUE(std::isnan(y[i * ldy + j])) << "wrote outside the window at " << i << "," << j;
        continue;
      }
      double ref = 0.0, mag = 0.0;
      for (int kk = 0; kk < k; ++kk) {
        ref += static_cast<double>(x[i * ldx + kk]) * w[j * ldw + w0 + kk];
        mag += std::fabs(static_cast<double>(x[i * ldx + kk]) * w[j * ldw + w0 + kk]);
      }
      EXPECT_NEAR(y[i * ldy + j], ref, (k + 2) * kF32Unit * mag + 1e-7);
    }
  }
}

// Strided batch: three products over windows of one buffer each (x rows and y rows stacked,
// w columns side by side as LoRA's per-adapter B), against a double reference per item.
TEST(GemmStrided, BatchedItemsUseTheirStrides) {
  const int m = 4, n = 5, k = 6, batch = 3, ldx = 8, ldy = 7, ldw = batch * k;
  const std::vector<float> x = RandomVector(static_cast<size_t>(batch) * m * ldx, 9);
  const std::vector<float> w = RandomVector(static_cast<size_t>(n) * ldw, 10);
  const std::vector<float> y0 = RandomVector(static_cast<size_t>(batch) * m * ldy, 11);
  std::vector<float> y = y0;
  GemmParams p{.x = x.data(),
               .w = w.data(),
               .y = y.data(),
               .m = m,
               .n = n,
               .k = k,
               .ldx = ldx,
               .ldy = ldy,
               .ldw = ldw,
               .accumulate = true,
               .batch = batch,
               .batch_stride_x = m * ldx,
               .batch_stride_w = k,
               .batch_stride_y = m * ldy};
  ASSERT_EQ(GemmCpu(p), KernelStatus::kOk);
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < ldy; ++j) {
        const size_t at = static_cast<size_t>(b * m + i) * ldy + j;
        double ref = y0[at], mag = std::fabs(ref);
        for (int kk = 0; kk < k && j < n; ++kk) {
          const double term =
              static_cast<double>(x[(b * m + i) * ldx + kk]) * w[j * ldw + b * k + kk];
          ref += term;
          mag += std::fabs(term);
        }
        // float32 sum of k + 1 terms (outside the n columns: untouched, exact).
        EXPECT_NEAR(y[at], ref, (k + 2) * kF32Unit * mag + 1e-7) << b << "," << i << "," << j;
      }
    }
  }
  p.bias = w.data();  // no bias with a batch
  EXPECT_EQ(GemmCpu(p), KernelStatus::kInvalidShape);
}

TEST(GemmErrors, RejectsBadParams) {
  std::vector<float> buf(64, 0.0f);
  GemmParams ok{.x = buf.data(), .w = buf.data(), .y = buf.data() + 32, .m = 2, .n = 2, .k = 2};
  GemmParams p = ok;
  p.dtype = DataType::kBF16;
  EXPECT_EQ(GemmCpu(p), KernelStatus::kUnsupportedDtype);
  p = ok;
  p.k = 0;
  EXPECT_EQ(GemmCpu(p), KernelStatus::kInvalidShape);
  p = ok;
  p.ldx = 1;
  EXPECT_EQ(GemmCpu(p), KernelStatus::kInvalidShape);
  p = ok;
  p.ldw = 1;
  EXPECT_EQ(GemmCpu(p), KernelStatus::kInvalidShape);
  p = ok;
  p.w = nullptr;
  EXPECT_EQ(GemmCpu(p), KernelStatus::kNullPointer);
  p = ok;
  p.m = 0;  // an empty batch is fine and touches nothing
  p.y = nullptr;
  EXPECT_EQ(GemmCpu(p), KernelStatus::kOk);
}

TEST(GeluScalar, TanhAndErfVariantsDiffer) {
  // The two GELUs must not be silently swapped: they differ by ~1e-4 around |x| = 2.
  EXPECT_NEAR(GeluTanh(2.0f), NaiveGeluTanh(2.0), 1e-6);
  EXPECT_NEAR(GeluErf(2.0f), NaiveGeluErf(2.0), 1e-6);
  EXPECT_GT(std::fabs(GeluTanh(2.0f) - GeluErf(2.0f)), 1e-5);
}

}  // namespace
}  // namespace phishard
