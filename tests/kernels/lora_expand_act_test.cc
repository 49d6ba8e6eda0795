// LoraExpandActCpu (kernels/lora_expand_act.h), the reference of the CUDA kernel, on a hand-made
// step whose answer is worked out below: exact small integers and halves, so the comparison is
// exact (EXPECT_FLOAT_EQ) except after the GELU, which is checked against GeluTanh of the exact
// pre-activation (the same float function, so also exact).
#include "kernels/lora_expand_act.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace phishard {
namespace {

TEST(LoraExpandActCpu, AddsEachSegmentsOwnWindowThenActivates) {
  const float nan = std::nanf("");
  // y [4 rows, ldy 3], n = 2: column 2 is padding, row 2 is in no segment.
  std::vector<float> y = {1, 2, nan, 3, 4, nan, nan, nan, nan, -1, 0.5f, nan};
  // t [4, ldt 10], t_col 1: row 0 and 1 use k = 8 terms of columns 1 .. 8, row 3 none.
  std::vector<float> t(40, nan);
  for (int k = 0; k < 8; ++k) {
    t[0 * 10 + 1 + k] = k == 0 ? 1.0f : 0.0f;  // row 0: only term 0
    t[1 * 10 + 1 + k] = 0.5f;                  // row 1: every term, one half
  }
  // b [2, ldb 10], segment 0 at b_col 2: b[c][2 + k] = c + 1 + k.
  std::vector<float> b(20, nan);
  for (int c = 0; c < 2; ++c) {
    for (int k = 0; k < 8; ++k) b[c * 10 + 2 + k] = static_cast<float>(c + 1 + k);
  }
  LoraExpandActParams p;
  p.y = y.data();
  p.ldy = 3;
  p.n = 2;
  p.t = t.data();
  p.ldt = 10;
  p.t_col = 1;
  p.b = b.data();
  p.ldb = 10;
  p.segments[0] = {0, 2, 2, 8};
  p.segments[1] = {3, 1, 0, 0};  // act only
  p.num_segments = 2;
  p.dtype = DataType::kF32;
  ASSERT_EQ(LoraExpandActCpu(p), KernelStatus::kOk);
  // Row 0: y + t[0] b[c][2] = y + (c + 1). Row 1: y + 0.5 Σ_k (c + 1 + k) = y + 0.5 (8 c + 36).
  EXPECT_FLOAT_EQ(y[0], 2.0f);
  EXPECT_FLOAT_EQ(y[1], 4.0f);
  EXPECT_FLOAT_EQ(y[3], 3.0f + 18.0f);
  EXPECT_FLOAT_EQ(y[4], 4.0f + 22.0f);
  EXPECT_FLOAT_EQ(y[9], -1.0f);
  EXPECT_FLOAT_EQ(y[10], 0.5f);
  for (int e : {2, 5, 6, 7, 8, 11}) EXPECT_TRUE(std::isnan(y[e])) << e;

  std::vector<float> z = {1, 2, nan, 3, 4, nan, nan, nan, nan, -1, 0.5f, nan};
  p.y = z.data();
  p.act = GemmEpilogue::kGeluTanh;
  ASSERT_EQ(LoraExpandActCpu(p), KernelStatus::kOk);
  EXPECT_FLOAT_EQ(z[3], GeluTanh(21.0f));
  EXPECT_FLOAT_EQ(z[9], GeluTanh(-1.0f));
  EXPECT_TRUE(std::isnan(z[6]));
}

TEST(LoraExpandActCpu, RejectsBadShapes) {
  std::vector<float> y(16), t(16), b(16);
  LoraExpandActParams p;
  p.y = y.data();
  p.t = t.data();
  p.b = b.data();
  p.n = 4;
  p.ldy = 4;
  p.ldt = 8;
  p.ldb = 8;
  p.segments[0] = {0, 2, 0, 8};
  p.num_segments = 1;
  p.dtype = DataType::kF32;
  EXPECT_EQ(LoraExpandActCpu(p), KernelStatus::kOk);
  LoraExpandActParams q = p;
  q.segments[0].k = 4;
  EXPECT_EQ(LoraExpandActCpu(q), KernelStatus::kInvalidShape);
  q = p;
  q.t_col = 2;  // window past ldt
  EXPECT_EQ(LoraExpandActCpu(q), KernelStatus::kInvalidShape);
  q = p;
  q.b = nullptr;
  EXPECT_EQ(LoraExpandActCpu(q), KernelStatus::kNullPointer);
  q = p;
  q.dtype = DataType::kBF16;
  EXPECT_EQ(LoraExpandActCpu(q), KernelStatus::kUnsupportedDtype);
}

}  // namespace
}  // namespace phishard
