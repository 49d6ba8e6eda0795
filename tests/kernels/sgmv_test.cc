#include "kernels/sgmv.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <ostream>
#include <string>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using testing_util::kF32Unit;
using testing_util::Poisoned;
using testing_util::RandomVector;

// One sweep case: segment lengths (0 = empty segment) with a rank per segment (0 = no adapter:
// null pointers, the rows must keep their base output), over x/y that are column windows of wider
// buffers when x_pad / y_pad > 0.
struct Case {
  std::string name;
  int in, out;
  std::vector<int> seg_lens;
  std::vector<int> ranks;
  int lead_rows = 0;  // rows before the first segment (not covered by any segment)
  int x_pad = 0, y_pad = 0;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class SgmvTest : public ::testing::TestWithParam<Case> {};

// Tolerance. t is a float32 dot product over `in` terms: |t - t_ref| <= (in + 1) u Σ|x A|. The
// expand adds scale · Σ_k t_k B_jk to y in float32: its own rounding is <= (r + 2) u of
// |y_old| + |scale| Σ|t_k B_jk|, and t's error reaches y multiplied by |scale| Σ_k |B_jk|. Bounding
// |t_k| by Σ|x A| makes one magnitude `mag` = |y_old| + |scale| Σ_k (Σ_i |x_i A_ki|) |B_jk| and
// tol = 2 (in + r + 4) u mag: twice the first-order bound, far below any indexing bug (which moves
// an element by O(mag)).
TEST_P(SgmvTest, MatchesNaiveDoubleReference) {
  const Case& c = GetParam();
  const int S = static_cast<int>(c.seg_lens.size());
  ASSERT_EQ(c.ranks.size(), c.seg_lens.size());
  std::vector<int32_t> starts = {c.lead_rows};
  for (int len : c.seg_lens) starts.push_back(starts.back() + len);
  const int num_rows = starts.back() + 3;  // 3 trailing rows outside every segment
  const int ldx = c.in + c.x_pad, ldy = c.out + c.y_pad;
  const int max_rank = std::max(1, *std::max_element(c.ranks.begin(), c.ranks.end()));
  const int ldt = max_rank + 1;

  const std::vector<float> x = RandomVector(static_cast<size_t>(num_rows) * ldx, 11 + c.in);
  const std::vector<float> y_old = RandomVector(static_cast<size_t>(num_rows) * ldy, 12 + c.out);
  std::vector<std::vector<float>> a(S), b(S);
  std::vector<const void*> a_ptrs(S, nullptr), b_ptrs(S, nullptr);
  std::vector<float> scales(S);
  for (int s = 0; s < S; ++s) {
    scales[s] = 0.5f + 0.75f * s;
    if (c.ranks[s] == 0) continue;
    a[s] = RandomVector(static_cast<size_t>(c.ranks[s]) * c.in, 100 + s);
    b[s] = RandomVector(static_cast<size_t>(c.out) * c.ranks[s], 200 + s);
    a_ptrs[s] = a[s].data();
    b_ptrs[s] = b[s].data();
  }

  std::vector<float> t = Poisoned(static_cast<size_t>(num_rows) * ldt);
  SgmvShrinkParams sp;
  sp.x = x.data();
  sp.t = t.data();
  sp.seg_starts = starts.data();
  sp.a = a_ptrs.data();
  sp.ranks = c.ranks.data();
  sp.num_segments = S;
  sp.num_rows = num_rows;
  sp.in = c.in;
  sp.ldx = ldx;
  sp.ldt = ldt;
  ASSERT_EQ(SgmvShrinkCpu(sp), KernelStatus::kOk);

  std::vector<float> y = y_old;
  SgmvExpandParams ep;
  ep.t = t.data();
  ep.y = y.data();
  ep.seg_starts = starts.data();
  ep.b = b_ptrs.data();
  ep.ranks = c.ranks.data();
  ep.scales = scales.data();
  ep.num_segments = S;
  ep.num_rows = num_rows;
  ep.out = c.out;
  ep.ldy = ldy;
  ep.ldt = ldt;
  ASSERT_EQ(SgmvExpandCpu(ep), KernelStatus::kOk);

  std::vector<int> seg_of_row(num_rows, -1);
  for (int s = 0; s < S; ++s) {
    for (int i = starts[s]; i < starts[s + 1]; ++i) seg_of_row[i] = s;
  }
  for (int i = 0; i < num_rows; ++i) {
    const int s = seg_of_row[i];
    const bool adapted = s >= 0 && c.ranks[s] > 0;
    // Columns of the padding window and rows without an adapter must be bitwise untouched.
    for (int j = 0; j < ldy; ++j) {
      if (adapted && j < c.out) continue;
      ASSERT_EQ(std::memcmp(&y[i * ldy + j], &y_old[i * ldy + j], sizeof(float)), 0)
          << c.name << ": untouched element (" << i << ", " << j << ") changed";
    }
    if (!adapted) continue;
    const int r = c.ranks[s];
    std::vector<double> t_ref(r), t_mag(r);
    for (int k = 0; k < r; ++k) {
      for (int q = 0; q < c.in; ++q) {
        const double prod = static_cast<double>(x[i * ldx + q]) * a[s][k * c.in + q];
        t_ref[k] += prod;
        t_mag[k] += std::fabs(prod);
      }
      ASSERT_NEAR(t[i * ldt + k], t_ref[k], 2.0 * (c.in + 1) * kF32Unit * t_mag[k] + 1e-30)
          << c.name << ": t(" << i << ", " << k << ")";
    }
    for (int j = 0; j < c.out; ++j) {
      double delta = 0.0, mag = 0.0;
      for (int k = 0; k < r; ++k) {
        delta += t_ref[k] * b[s][j * r + k];
        mag += t_mag[k] * std::fabs(b[s][j * r + k]);
      }
      const double ref = y_old[i * ldy + j] + scales[s] * delta;
      mag = std::fabs(y_old[i * ldy + j]) + std::fabs(scales[s]) * mag;
      ASSERT_NEAR(y[i * ldy + j], ref, 2.0 * (c.in + r + 4) * kF32Unit * mag)
          << c.name << ": y(" << i << ", " << j << ") segment " << s << " rank " << r;
    }
  }
}

// One case a line.
// clang-format off
INSTANTIATE_TEST_SUITE_P(
    Shapes, SgmvTest,
    ::testing::Values(
        Case{"one_segment_r4", 256, 256, {17}, {4}},
        Case{"one_token_r64", 1024, 256, {1}, {64}},
        Case{"decode_rows_mixed_ranks", 256, 768, {1, 1, 1, 1, 1}, {8, 0, 16, 4, 64}},
        Case{"empty_segments", 80, 160, {0, 5, 0, 0, 9, 0}, {8, 16, 32, 4, 8, 64}},
        Case{"base_between_adapters", 320, 96, {7, 13, 2}, {16, 0, 32}, /*lead_rows=*/4},
        Case{"qkv_window", 256, 256, {3, 40, 1}, {8, 4, 64}, 0, /*x_pad=*/0, /*y_pad=*/512},
        Case{"odd_sizes_strided_x", 65, 129, {31, 33}, {5, 63}, 2, /*x_pad=*/7, /*y_pad=*/3},
        Case{"all_base", 64, 64, {4, 4}, {0, 0}}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });
// clang-format on

TEST(SgmvErrors, BadTablesAreRejectedWithoutWriting) {
  const int in = 8, out = 8, rows = 4, r = 2;
  std::vector<float> x = RandomVector(rows * in, 1), y(rows * out, 0.0f), t(rows * r, 0.0f);
  std::vector<float> a = RandomVector(r * in, 2), bm = RandomVector(out * r, 3);
  const void* a_ptr = a.data();
  const void* b_ptr = bm.data();
  std::vector<int32_t> starts = {0, 4}, ranks = {r};
  SgmvShrinkParams sp;
  sp.x = x.data();
  sp.t = t.data();
  sp.seg_starts = starts.data();
  sp.a = &a_ptr;
  sp.ranks = ranks.data();
  sp.num_segments = 1;
  sp.num_rows = rows;
  sp.in = in;
  sp.ldt = r;
  ASSERT_EQ(SgmvShrinkCpu(sp), KernelStatus::kOk);

  SgmvShrinkParams bad = sp;
  std::vector<int32_t> past_end = {0, 5};
  bad.seg_starts = past_end.data();
  EXPECT_EQ(SgmvShrinkCpu(bad), KernelStatus::kInvalidShape);
  std::vector<int32_t> decreasing = {3, 1};
  bad.seg_starts = decreasing.data();
  EXPECT_EQ(SgmvShrinkCpu(bad), KernelStatus::kInvalidShape);
  bad = sp;
  std::vector<int32_t> too_big_rank = {r + 1};
  bad.ranks = too_big_rank.data();
  EXPECT_EQ(SgmvShrinkCpu(bad), KernelStatus::kInvalidShape);
  bad = sp;
  bad.ldx = in - 1;
  EXPECT_EQ(SgmvShrinkCpu(bad), KernelStatus::kInvalidShape);
  bad = sp;
  bad.a = nullptr;
  EXPECT_EQ(SgmvShrinkCpu(bad), KernelStatus::kNullPointer);
  bad = sp;
  bad.x = nullptr;
  EXPECT_EQ(SgmvShrinkCpu(bad), KernelStatus::kNullPointer);
  bad = sp;
  bad.dtype = DataType::kBF16;
  EXPECT_EQ(SgmvShrinkCpu(bad), KernelStatus::kUnsupportedDtype);
  bad = sp;
  bad.num_segments = 0;  // nothing to do is fine, even with no tables
  bad.seg_starts = nullptr;
  bad.a = nullptr;
  EXPECT_EQ(SgmvShrinkCpu(bad), KernelStatus::kOk);

  SgmvExpandParams ep;
  ep.t = t.data();
  ep.y = y.data();
  ep.seg_starts = starts.data();
  ep.b = &b_ptr;
  ep.ranks = ranks.data();
  ep.num_segments = 1;
  ep.num_rows = rows;
  ep.out = out;
  ep.ldt = r;
  const std::vector<float> y_before = y;
  SgmvExpandParams ebad = ep;
  ebad.ldy = out - 1;
  EXPECT_EQ(SgmvExpandCpu(ebad), KernelStatus::kInvalidShape);
  ebad = ep;
  ebad.seg_starts = past_end.data();
  EXPECT_EQ(SgmvExpandCpu(ebad), KernelStatus::kInvalidShape);
  ebad = ep;
  ebad.y = nullptr;
  EXPECT_EQ(SgmvExpandCpu(ebad), KernelStatus::kNullPointer);
  ebad = ep;
  ebad.dtype = DataType::kF16;
  EXPECT_EQ(SgmvExpandCpu(ebad), KernelStatus::kUnsupportedDtype);
  EXPECT_EQ(y, y_before) << "a rejected call wrote into y";
  // Null scales mean 1: y = t · Bᵀ exactly as a plain product.
  ASSERT_EQ(SgmvExpandCpu(ep), KernelStatus::kOk);
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < out; ++j) {
      double ref = 0.0;
      for (int k = 0; k < r; ++k) ref += static_cast<double>(t[i * r + k]) * bm[j * r + k];
      EXPECT_NEAR(y[i * out + j], ref, 1e-5);
    }
  }
}

// The grouped, table-driven form against a naive double reference: tiles of several slots with a
// base gap, a tile past the count (never read), a slot outside the table, an entry without
// matrices, two ops sharing the tiles and an expand op of two terms. Same tolerance argument as
// above (in <= 40, r <= 5).
TEST(SgmvGrouped, MatchesNaiveDoubleReference) {
  constexpr int kRows = 12, kIn = 40, kOut = 24, kLdt = 16;
  const int ranks[2][2] = {{3, 5}, {4, 0}};  // [slot][entry]; 0 = entry without matrices
  std::vector<std::vector<float>> a(4), b(4);
  std::vector<SgmvWeight> table(4);
  for (int e = 0; e < 4; ++e) {
    const int r = ranks[e / 2][e % 2];
    if (r == 0) continue;
    a[e] = RandomVector(static_cast<size_t>(r) * kIn, 30 + e);
    b[e] = RandomVector(static_cast<size_t>(kOut) * r, 40 + e);
    table[e] = {a[e].data(), b[e].data(), r, 0.5f + e};
  }
  // Rows 0-4 slot 1, 5-6 base, 7-11 slot 0 (two tiles), then a tile past the count.
  const std::vector<SgmvTile> tiles = {
      {1, 0, 5, 0}, {7, 5, 7, 0}, {0, 7, 9, 0}, {0, 9, 12, 0}, {0, 5, 7, 0}};
  const int32_t count = 4;
  const std::vector<float> x = RandomVector(static_cast<size_t>(kRows) * kIn, 50);
  std::vector<float> t = Poisoned(static_cast<size_t>(kRows) * kLdt);
  SgmvTableRef ref{.table = table.data(),
                   .stride = 2,
                   .num_slots = 2,
                   .tiles = tiles.data(),
                   .num_tiles = &count,
                   .max_tiles = 5,
                   .num_rows = kRows,
                   .max_rank = 8};
  SgmvGroupedShrinkParams sp;
  sp.ops[0] = {.x = x.data(), .ldx = kIn, .in = kIn, .t_col = 0, .entry = 0};
  sp.ops[1] = {.x = x.data(), .ldx = kIn, .in = kIn, .t_col = 8, .entry = 1};
  sp.num_ops = 2;
  sp.t = t.data();
  sp.ldt = kLdt;
  sp.ref = ref;
  ASSERT_EQ(SgmvGroupedShrinkCpu(sp), KernelStatus::kOk);
  const std::vector<float> y0 = RandomVector(static_cast<size_t>(kRows) * kOut, 60);
  std::vector<float> y = y0;
  SgmvGroupedExpandParams ep;
  ep.ops[0].y = y.data();
  ep.ops[0].out = kOut;
  ep.ops[0].num_terms = 2;
  ep.ops[0].terms[0] = {0, 0};
  ep.ops[0].terms[1] = {8, 1};
  ep.num_ops = 1;
  ep.t = t.data();
  ep.ldt = kLdt;
  ep.ref = ref;
  ASSERT_EQ(SgmvGroupedExpandCpu(ep), KernelStatus::kOk);
  for (int i = 0; i < kRows; ++i) {
    const int slot = i < 5 ? 1 : (i < 7 ? -1 : 0);
    for (int c = 0; c < kLdt; ++c) {
      const int entry = c < 8 ? 0 : 1, k = c % 8;
      const int r = slot < 0 ? 0 : ranks[slot][entry];
      const float got = t[static_cast<size_t>(i) * kLdt + c];
      if (k >= r) {
        EXPECT_TRUE(std::isnan(got)) << "t[" << i << "][" << c << "] must stay unwritten";
        continue;
      }
      const int e = slot * 2 + entry;
      double want = 0, mag = 0;
      for (int q = 0; q < kIn; ++q) {
        want +=
            double{x[static_cast<size_t>(i) * kIn + q]} * a[e][static_cast<size_t>(k) * kIn + q];
        mag += std::fabs(double{x[static_cast<size_t>(i) * kIn + q]} *
                         a[e][static_cast<size_t>(k) * kIn + q]);
      }
      EXPECT_NEAR(got, want, 2 * (kIn + 4) * kF32Unit * mag) << "t[" << i << "][" << c << "]";
    }
    for (int j = 0; j < kOut; ++j) {
      const size_t at = static_cast<size_t>(i) * kOut + j;
      if (slot < 0) {
        EXPECT_EQ(y[at], y0[at]) << "base row " << i << " must keep its output";
        continue;
      }
      double want = y0[at], mag = std::fabs(y0[at]);
      for (int entry = 0; entry < 2; ++entry) {
        const int e = slot * 2 + entry, r = ranks[slot][entry];
        for (int k = 0; k < r; ++k) {
          const double term = double{table[e].scale} *
                              t[static_cast<size_t>(i) * kLdt + 8 * entry + k] *
                              b[e][static_cast<size_t>(j) * r + k];
          want += term;
          mag += std::fabs(term);
        }
      }
      EXPECT_NEAR(y[at], want, 2 * (kIn + 16) * kF32Unit * mag) << "y[" << i << "][" << j << "]";
    }
  }
}

// The beside mode's pair on the CPU (kernels/sgmv.h): the delta-only fused form writes the float32
// delta scale · (x Aᵀ) Bᵀ on adapted tile rows, -0.0f (signbit set) on tile rows without an
// adapter (a base tile, an entry without matrices), and leaves rows in no tile alone (NaN
// poison stays); SgmvFoldCpu then gives act(y + delta) on every tile row and leaves the others
// bit for bit. Tolerance: in = 12, r = 4 float32 terms, 2 (in + r + 4) u of the magnitudes as
// above; GELU's slope is < 1.13, plus float tanhf / erff (~1e-6).
TEST(SgmvFold, DeltaOnlyThenFoldMatchesNaiveReference) {
  constexpr int kRows = 5, kIn = 12, kOut = 10, kLdd = 11, kRank = 4;
  const std::vector<float> x = RandomVector(kRows * kIn, 41);
  const std::vector<float> a = RandomVector(kRank * kIn, 42), b = RandomVector(kOut * kRank, 43);
  const std::vector<float> y0 = RandomVector(kRows * kOut, 44, -3.0f, 3.0f);
  // Slot 0 adapts the entry, slot 1 has no matrices for it; tiles: rows 0-1 slot 0, row 2 base,
  // row 3 slot 1, row 4 in no tile.
  const std::vector<SgmvWeight> table = {{a.data(), b.data(), kRank, 0.75f}, {}};
  const std::vector<SgmvTile> tiles = {{0, 0, 2, 0}, {-1, 2, 3, 0}, {1, 3, 4, 0}};
  const int32_t count = 3;
  SgmvTableRef ref{.table = table.data(),
                   .stride = 1,
                   .num_slots = 2,
                   .tiles = tiles.data(),
                   .num_tiles = &count,
                   .max_tiles = 3,
                   .num_rows = kRows,
                   .max_rank = kRank};
  std::vector<float> delta(kRows * kLdd, testing_util::kNaN);
  SgmvFusedParams fp;
  fp.num_ops = 1;
  fp.ops[0].out = kOut;
  fp.ops[0].delta = delta.data();
  fp.ops[0].ld_delta = kLdd;
  fp.ops[0].terms[0] = {.x = x.data(), .ldx = kIn, .in = kIn, .entry = 0};
  fp.ref = ref;
  ASSERT_EQ(SgmvFusedCpu(fp), KernelStatus::kOk);
  std::vector<double> want(kRows * kOut, 0.0), mag(kRows * kOut, 0.0);
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < kOut; ++j) {
      for (int k = 0; k < kRank; ++k) {
        double t = 0, tm = 0;
        for (int q = 0; q < kIn; ++q) {
          t += static_cast<double>(x[i * kIn + q]) * a[k * kIn + q];
          tm += std::fabs(static_cast<double>(x[i * kIn + q]) * a[k * kIn + q]);
        }
        want[i * kOut + j] += 0.75 * t * b[j * kRank + k];
        mag[i * kOut + j] += 0.75 * tm * std::fabs(b[j * kRank + k]);
      }
    }
  }
  const double unit_tol = 2.0 * (kIn + kRank + 4) * kF32Unit;
  for (int i = 0; i < kRows; ++i) {
    for (int j = 0; j < kLdd; ++j) {
      const float d = delta[i * kLdd + j];
      if (i == 4 || j >= kOut) {
        EXPECT_TRUE(std::isnan(d)) << "delta[" << i << "][" << j << "] written";
      } else if (i >= 2) {
        EXPECT_TRUE(d == 0.0f && std::signbit(d)) << "delta[" << i << "][" << j << "] " << d;
      } else {
        EXPECT_NEAR(d, want[i * kOut + j], unit_tol * mag[i * kOut + j] + 1e-30);
      }
    }
  }
  for (GemmEpilogue act : {GemmEpilogue::kNone, GemmEpilogue::kGeluTanh, GemmEpilogue::kGeluErf}) {
    std::vector<float> y = y0;
    SgmvFoldParams fold;
    fold.num_ops = 1;
    fold.ops[0] = {
        .y = y.data(), .ldy = kOut, .out = kOut, .delta = delta.data(), .ld_delta = kLdd};
    fold.ref = ref;
    ASSERT_EQ(SgmvFoldCpu(fold, act), KernelStatus::kOk);
    for (int i = 0; i < kRows; ++i) {
      for (int j = 0; j < kOut; ++j) {
        const float got = y[i * kOut + j];
        if (i == 4) {  // in no tile: bit for bit
          EXPECT_EQ(std::memcmp(&got, &y0[i * kOut + j], sizeof(float)), 0);
          continue;
        }
        double v = y0[i * kOut + j] + want[i * kOut + j];
        double tol = unit_tol * (std::fabs(y0[i * kOut + j]) + mag[i * kOut + j]);
        if (act == GemmEpilogue::kGeluTanh) {
          v = testing_util::NaiveGeluTanh(v);
          tol = 1.13 * tol + 1e-6;
        } else if (act == GemmEpilogue::kGeluErf) {
          v = testing_util::NaiveGeluErf(v);
          tol = 1.13 * tol + 1e-6;
        }
        EXPECT_NEAR(got, v, tol + kF32Unit * std::fabs(v)) << "act " << static_cast<int>(act);
      }
    }
  }
  SgmvFoldParams bad;
  bad.num_ops = 1;
  bad.ops[0] = {.y = nullptr, .ldy = 0, .out = kOut, .delta = delta.data(), .ld_delta = 0};
  bad.ref = ref;
  EXPECT_EQ(SgmvFoldCpu(bad, GemmEpilogue::kNone), KernelStatus::kNullPointer);
  bad.ops[0].ld_delta = kOut - 1;
  EXPECT_EQ(SgmvFoldCpu(bad, GemmEpilogue::kNone), KernelStatus::kInvalidShape);
}

}  // namespace
}  // namespace phishard
