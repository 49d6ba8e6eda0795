// SgmvGroupedShrinkCuda / SgmvGroupedExpandCuda / SgmvDecodeExpandCuda (kernels/cuda/sgmv_cuda.h;
// SgmvDecodeFusedCuda in cuda_sgmv_fused_test.cc, on the same cases: tests/gpu/sgmv_test_data.h)
// against a naive double-accumulation reference, and the CPU reference (kernels/sgmv.h) against
// the same naive one, on identical inputs: x, A, B and y are rounded to the device dtype first, so
// only the summation order and expand's one final rounding of y remain.
//
// Shapes swept: decode-like tiles of one row (every row its own adapter), prefill-like segments
// cut into 16-row tiles (odd lengths 1, 5, 17, 33), base rows between segments (in no tile),
// ranks 3 (scalar paths), 8, 16, 64, 128 in one launch, widths 64 / 80 / 1000 / 2560 / 10240 (fc2's
// K, with ranks 64 and 128) with x and y
// as column windows of wider buffers, fp32 / fp16 / bf16, a grid of more tiles than the device
// count says, tiles of an out-of-range slot and entries with null matrices.
//
// Poisoning: t is NaN before shrink and must stay NaN wherever no tile / rank column is written;
// expand's t is NaN outside each tile's rank window, so reading past a rank shows; y elements
// expand must not touch (base rows, padding columns, modules the slot does not adapt) are
// compared bit for bit with what was there.
//
// Tolerances: shrink accumulates `in` float32 products, so |t - ref| <= 1e-5 x Σ|x_k a_k| (n u
// with n <= 10240 is 6e-4 worst case; the observed sqrt(n) u growth, ~6e-6 at n = 10240, is
// below it and the kernels sum in blocks, which grows slower still; an indexing error is O(1)).
// Expand adds a float32 sum of <= 2 x 128 terms and rounds once to the storage type: |y - ref| <=
// unit x |ref| + 1e-5 x (|y0| + Σ|scale t b|); on the tensor-core path (16-bit, full 16-row tiles)
// t is rounded to the storage type first, so the last term grows to unit x Σ|scale t b|. An
// indexing error moves y by O(Σ|scale t b|).
//
// Paths covered: 1-row tiles take the few-rows shrink (in, ldx multiples of 8), full 16-row tiles
// with a full rank group and 16-aligned widths the WMMA shrink, the rest (in = 1000 with ldx =
// 1008, ranks 3 and 8, partial tiles of 3-15 rows) the per-warp shrink; expand's WMMA path
// takes full tiles of ranks 16 / 64 / 128 on out = 1000's first three column blocks, the scalar
// path everything else.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/sgmv_cuda.h"
#include "kernels/sgmv.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/sgmv_test_data.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::Decode;
using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using sgmv_test::Case;
using sgmv_test::Data;
using sgmv_test::DeviceStep;
using sgmv_test::kCases;
using sgmv_test::kMaxRank;
using sgmv_test::kNaN;
using sgmv_test::kOps;
using sgmv_test::kRanks;
using sgmv_test::kSlots;
using sgmv_test::MakeData;
using sgmv_test::MakeOpOutputs;
using sgmv_test::MakeRef;
using sgmv_test::OpOutputs;
using sgmv_test::OpShape;
using sgmv_test::RowSlots;
using sgmv_test::Run;
using sgmv_test::StorageUnit;
using sgmv_test::UploadStep;
using testing_util::RandomVector;

// Naive double references. t_ref[row][op window col] (NaN where not written), and expand.
std::vector<double> NaiveShrink(const Data& d, int ldt) {
  std::vector<double> t(static_cast<size_t>(d.rows) * ldt, NAN);
  for (const SgmvTile& tile : d.tiles) {
    if (tile.slot < 0 || tile.slot >= kSlots) continue;
    for (int o = 0; o < kOps; ++o) {
      const int e = tile.slot * kOps + o, r = kRanks[tile.slot][o];
      for (int i = tile.begin; i < tile.end; ++i) {
        for (int j = 0; j < r; ++j) {
          double acc = 0;
          for (int k = 0; k < d.ops[o].in; ++k) {
            acc += static_cast<double>(d.x[o][static_cast<size_t>(i) * d.ops[o].ldx + k]) *
                   d.a[e][static_cast<size_t>(j) * d.ops[o].in + k];
          }
          t[static_cast<size_t>(i) * ldt + o * kMaxRank + j] = acc;
        }
      }
    }
  }
  return t;
}

double ShrinkBound(const Data& d, int o, int e, int row, int j) {
  double s = 0;
  for (int k = 0; k < d.ops[o].in; ++k) {
    s += std::fabs(static_cast<double>(d.x[o][static_cast<size_t>(row) * d.ops[o].ldx + k]) *
                   d.a[e][static_cast<size_t>(j) * d.ops[o].in + k]);
  }
  return 1e-5 * s + 1e-30;
}

void RunCase(const Case& c, DataType dt) {
  SCOPED_TRACE(c.name + " " + DataTypeName(dt));
  Data d = MakeData(c, dt, 11);
  const int ldt = kOps * kMaxRank + 5;
  const int32_t count = static_cast<int32_t>(d.tiles.size());
  const DeviceStep dev = UploadStep(d, d.table_dev, c.extra_tiles);
  const SgmvTableRef& ref = dev.ref;

  // ---- shrink ----
  DeviceBuffer t(static_cast<size_t>(d.rows) * ldt * sizeof(float));
  t.Poison();
  SgmvGroupedShrinkParams sp;
  for (int o = 0; o < kOps; ++o) {
    sp.ops[o] = {.x = d.dev[o].get(),
                 .ldx = d.ops[o].ldx,
                 .in = d.ops[o].in,
                 .t_col = o * kMaxRank,
                 .entry = o};
  }
  sp.num_ops = kOps;
  sp.t = t.as<float>();
  sp.ldt = ldt;
  sp.ref = ref;
  sp.dtype = dt;
  ASSERT_EQ(SgmvGroupedShrinkCuda(sp, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  const std::vector<double> want = NaiveShrink(d, ldt);
  std::vector<float> got(want.size());
  {
    std::vector<char> bytes = t.DownloadBytes();
    std::memcpy(got.data(), bytes.data(), bytes.size());
  }
  // The CPU reference on the same inputs (float32 operands: the rounded values).
  std::vector<float> cpu_t(want.size(), kNaN);
  {
    SgmvGroupedShrinkParams cp = sp;
    for (int o = 0; o < kOps; ++o) cp.ops[o].x = d.x[o].data();
    cp.t = cpu_t.data();
    cp.ref = MakeRef(d, d.table_cpu.data(), d.tiles.data(), &count, count);
    cp.dtype = DataType::kF32;
    ASSERT_EQ(SgmvGroupedShrinkCpu(cp), KernelStatus::kOk);
  }
  int bad = 0;
  for (int i = 0; i < d.rows && bad < 10; ++i) {
    for (int col = 0; col < ldt && bad < 10; ++col) {
      const size_t at = static_cast<size_t>(i) * ldt + col;
      if (std::isnan(want[at])) {
        if (!std::isnan(got[at]) || !std::isnan(cpu_t[at])) {
          ++bad;
          ADD_FAILURE() << "t[" << i << "][" << col << "] written but must stay NaN: cuda "
                        << got[at] << " cpu " << cpu_t[at];
        }
        continue;
      }
      int slot = -1;
      for (const SgmvTile& tile : d.tiles) {
        if (i >= tile.begin && i < tile.end && tile.slot < kSlots) slot = tile.slot;
      }
      const int o = col / kMaxRank, j = col % kMaxRank;
      const double tol = ShrinkBound(d, o, slot * kOps + o, i, j);
      if (!(std::fabs(got[at] - want[at]) <= tol) || !(std::fabs(cpu_t[at] - want[at]) <= tol)) {
        ++bad;
        ADD_FAILURE() << "t[" << i << "][" << col << "]: cuda " << got[at] << " cpu " << cpu_t[at]
                      << " want " << want[at] << " tol " << tol;
      }
    }
  }

  // ---- expand: ops 0 and 1 into their own y, op 2's y gets two terms (t windows 2 and 0) ----
  std::vector<float> tin = RandomVector(static_cast<size_t>(d.rows) * ldt, 99, -2.0f, 2.0f);
  for (size_t i = 0; i < tin.size(); ++i) {
    if (std::isnan(want[i])) tin[i] = kNaN;  // only each tile's rank windows hold numbers
  }
  DeviceBuffer tdev = DeviceBuffer::From(tin);
  OpOutputs ys = MakeOpOutputs(d, dt, 50);
  SgmvGroupedExpandParams ep;
  for (int o = 0; o < kOps; ++o) {
    ep.ops[o].y = ys.ydev[o].get();
    ep.ops[o].ldy = d.ops[o].ldy;
    ep.ops[o].out = d.ops[o].out;
    ep.ops[o].terms[0] = {o * kMaxRank, o};
  }
  // Op 2 adds its delta twice (two terms, same window and entry): the terms must be summed
  // in float32 before the one rounding of y.
  ep.ops[2].num_terms = 2;
  ep.ops[2].terms[1] = {2 * kMaxRank, 2};
  ep.num_ops = kOps;
  ep.t = tdev.as<float>();
  ep.ldt = ldt;
  ep.ref = ref;
  ep.dtype = dt;
  ASSERT_EQ(SgmvGroupedExpandCuda(ep, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  // CPU reference on float copies of y0.
  std::vector<std::vector<float>> ycpu = ys.y0;
  {
    SgmvGroupedExpandParams cp = ep;
    for (int o = 0; o < kOps; ++o) cp.ops[o].y = ycpu[o].data();
    cp.t = tin.data();
    cp.ref = MakeRef(d, d.table_cpu.data(), d.tiles.data(), &count, count);
    cp.dtype = DataType::kF32;
    ASSERT_EQ(SgmvGroupedExpandCpu(cp), KernelStatus::kOk);
  }
  const double unit = StorageUnit(dt);
  for (int o = 0; o < kOps; ++o) {
    const std::vector<char> bytes = ys.ydev[o].DownloadBytes();
    const std::vector<float> yg = Decode(bytes, dt);
    const OpShape& s = d.ops[o];
    bad = 0;
    for (int i = 0; i < d.rows && bad < 10; ++i) {
      int slot = -1;
      for (const SgmvTile& tile : d.tiles) {
        if (i >= tile.begin && i < tile.end && tile.slot < kSlots) slot = tile.slot;
      }
      const int r = slot >= 0 ? kRanks[slot][o] : 0;
      for (int j = 0; j < s.ldy && bad < 10; ++j) {
        const size_t at = static_cast<size_t>(i) * s.ldy + j;
        const size_t esz = DataTypeSize(dt);
        if (r == 0 || j >= s.out) {  // untouched: bit for bit
          if (std::memcmp(bytes.data() + at * esz, ys.y0_bytes[o].data() + at * esz, esz) != 0) {
            ++bad;
            ADD_FAILURE() << "op " << o << " y[" << i << "][" << j << "] changed but must not";
          }
          continue;
        }
        const int e = slot * kOps + o;
        double delta = 0, mag = 0;
        for (int k = 0; k < r; ++k) {
          const double term =
              static_cast<double>(tin[static_cast<size_t>(i) * ldt + o * kMaxRank + k]) *
              d.b[e][static_cast<size_t>(j) * r + k];
          delta += term;
          mag += std::fabs(term);
        }
        const int terms = o == 2 ? 2 : 1;
        const double want_y = ys.y0[o][at] + terms * d.scales[e] * delta;
        // 16-bit full tiles run on tensor cores with t rounded to the storage type: its
        // relative rounding (<= unit / 2) reaches every term.
        const double t_round = dt == DataType::kF32 ? 1e-5 : unit;
        const double tol = unit * std::fabs(want_y) + 1e-5 * std::fabs(ys.y0[o][at]) +
                           t_round * terms * d.scales[e] * mag + 1e-30;
        if (!(std::fabs(yg[at] - want_y) <= tol) ||
            !(std::fabs(ycpu[o][at] - want_y) <=
              1e-5 * (std::fabs(ys.y0[o][at]) + terms * d.scales[e] * mag) + 1e-6)) {
          ++bad;
          ADD_FAILURE() << "op " << o << " y[" << i << "][" << j << "]: cuda " << yg[at] << " cpu "
                        << ycpu[o][at] << " want " << want_y << " tol " << tol;
        }
      }
    }
  }
}

TEST(CudaSgmvGrouped, MatchesNaiveReferenceOnSweptShapes) {
  PHI_REQUIRE_GPU();
  for (DataType dt : {DataType::kBF16, DataType::kF16, DataType::kF32}) {
    for (const Case& c : kCases) RunCase(c, dt);
  }
}

// SgmvDecodeExpandCuda (kernels/cuda/sgmv_decode.cu) on the same data as the grouped expand:
// without an activation, ops 0-2 as above (op 2 with two terms); with GELU tanh / erf, op 1 alone
// (out 1000: a partial 1,024-column block) and tiles for the base rows too (slot -1), whose rows
// must become GELU(y0) while rows in no tile stay bit for bit. Tolerances: the delta is summed in
// float32 (1e-5 x (|y0| + Σ|scale t b|), as above; t is not rounded on this path), GELU scales
// that error by |gelu'| <= 1.13 and adds ~1e-6 of tanhf / erff, then one rounding of y
// (unit x |result|).
void RunDecodeExpand(const Case& c, DataType dt, GemmEpilogue act) {
  SCOPED_TRACE(c.name + " " + DataTypeName(dt) + " act " + std::to_string(static_cast<int>(act)));
  Data d = MakeData(c, dt, 23);
  const bool with_act = act != GemmEpilogue::kNone;
  if (with_act) {  // tiles for the base runs, at most 16 rows each
    int row = 0;
    for (const Run& r : c.runs) {
      if (r.slot < 0) {
        for (int b = row; b < row + r.rows; b += kSgmvTileRows) {
          d.tiles.push_back({-1, b, std::min(row + r.rows, b + kSgmvTileRows), 0});
        }
      }
      row += r.rows;
    }
  }
  const int ldt = kOps * kMaxRank + 5;
  const DeviceStep dev = UploadStep(d, d.table_dev, c.extra_tiles);
  const SgmvTableRef& ref = dev.ref;
  // t: numbers inside each adapter tile's rank windows, NaN elsewhere.
  std::vector<float> tin = RandomVector(static_cast<size_t>(d.rows) * ldt, 77, -2.0f, 2.0f);
  std::vector<int> row_slot;
  std::vector<bool> in_tile;
  RowSlots(d, &row_slot, &in_tile);
  for (int i = 0; i < d.rows; ++i) {
    for (int col = 0; col < ldt; ++col) {
      const int o = col / kMaxRank, k = col % kMaxRank;
      if (row_slot[i] < 0 || o >= kOps || k >= kRanks[row_slot[i]][o]) {
        tin[static_cast<size_t>(i) * ldt + col] = kNaN;
      }
    }
  }
  DeviceBuffer tdev = DeviceBuffer::From(tin);
  const std::vector<int> ops = with_act ? std::vector<int>{1} : std::vector<int>{0, 1, 2};
  OpOutputs ys = MakeOpOutputs(d, dt, 60);
  SgmvGroupedExpandParams ep;
  for (int o : ops) {
    SgmvExpandOp& op = ep.ops[ep.num_ops++];
    op.y = ys.ydev[o].get();
    op.ldy = d.ops[o].ldy;
    op.out = d.ops[o].out;
    op.terms[0] = {o * kMaxRank, o};
    if (o == 2) {
      op.num_terms = 2;
      op.terms[1] = {2 * kMaxRank, 2};
    }
  }
  ep.t = tdev.as<float>();
  ep.ldt = ldt;
  ep.ref = ref;
  ep.dtype = dt;
  ASSERT_EQ(SgmvDecodeExpandCuda(ep, act, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  const double unit = StorageUnit(dt);
  for (int o : ops) {
    const std::vector<char> bytes = ys.ydev[o].DownloadBytes();
    const std::vector<float> yg = Decode(bytes, dt);
    const OpShape& s = d.ops[o];
    const size_t esz = DataTypeSize(dt);
    int bad = 0;
    for (int i = 0; i < d.rows && bad < 10; ++i) {
      const int slot = row_slot[i];
      const int r = slot >= 0 ? kRanks[slot][o] : 0;
      for (int j = 0; j < s.ldy && bad < 10; ++j) {
        const size_t at = static_cast<size_t>(i) * s.ldy + j;
        if (j >= s.out || !in_tile[i] || (r == 0 && !with_act)) {  // untouched: bit for bit
          if (std::memcmp(bytes.data() + at * esz, ys.y0_bytes[o].data() + at * esz, esz) != 0) {
            ++bad;
            ADD_FAILURE() << "op " << o << " y[" << i << "][" << j << "] changed but must not";
          }
          continue;
        }
        double delta = 0, mag = 0;
        const int e = slot >= 0 ? slot * kOps + o : 0;
        for (int k = 0; k < r; ++k) {
          const double term =
              static_cast<double>(tin[static_cast<size_t>(i) * ldt + o * kMaxRank + k]) *
              d.b[e][static_cast<size_t>(j) * r + k];
          delta += term;
          mag += std::fabs(term);
        }
        const int terms = o == 2 ? 2 : 1;
        const double scale = r > 0 ? d.scales[e] : 0.0;
        double want = ys.y0[o][at] + terms * scale * delta;
        double tol = 1e-5 * (std::fabs(ys.y0[o][at]) + terms * scale * mag);
        if (act == GemmEpilogue::kGeluTanh) {
          want = testing_util::NaiveGeluTanh(want);
          tol = 1.13 * tol + 1e-6;
        } else if (act == GemmEpilogue::kGeluErf) {
          want = testing_util::NaiveGeluErf(want);
          tol = 1.13 * tol + 1e-6;
        }
        tol += unit * std::fabs(want) + 1e-30;
        if (!(std::fabs(yg[at] - want) <= tol)) {
          ++bad;
          ADD_FAILURE() << "op " << o << " y[" << i << "][" << j << "]: cuda " << yg[at] << " want "
                        << want << " tol " << tol;
        }
      }
    }
  }
}

TEST(CudaSgmvDecodeExpand, MatchesNaiveReferenceWithAndWithoutGelu) {
  PHI_REQUIRE_GPU();
  for (DataType dt : {DataType::kBF16, DataType::kF16, DataType::kF32}) {
    for (const Case& c : kCases) RunDecodeExpand(c, dt, GemmEpilogue::kNone);
    for (const Case& c : kCases) {
      if (c.bad_slot_tile) continue;  // its tile overlaps a base row's tile: tiles are disjoint
      RunDecodeExpand(c, dt, GemmEpilogue::kGeluTanh);
      RunDecodeExpand(c, dt, GemmEpilogue::kGeluErf);
    }
  }
}

TEST(CudaSgmvGrouped, RejectsBadShapesAndLaunchesNothingWhenEmpty) {
  PHI_REQUIRE_GPU();
  SgmvGroupedShrinkParams sp;
  sp.num_ops = 1;
  sp.ops[0] = {.x = nullptr, .ldx = 0, .in = 64, .t_col = 0, .entry = 0};
  sp.ldt = 16;
  sp.ref.max_rank = 32;  // t_col + max_rank > ldt
  sp.ref.max_tiles = 4;
  sp.ref.num_rows = 4;
  sp.dtype = DataType::kBF16;
  EXPECT_EQ(SgmvGroupedShrinkCuda(sp, nullptr), KernelStatus::kInvalidShape);
  sp.ref.max_rank = 16;
  EXPECT_EQ(SgmvGroupedShrinkCuda(sp, nullptr), KernelStatus::kNullPointer);
  sp.ref.max_tiles = 0;  // nothing to do: no pointer is needed
  EXPECT_EQ(SgmvGroupedShrinkCuda(sp, nullptr), KernelStatus::kOk);
  sp.ref.max_tiles = 4;
  sp.ref.max_rank = kSgmvCudaMaxRank + 16;
  sp.ldt = kSgmvCudaMaxRank + 16;
  EXPECT_EQ(SgmvGroupedShrinkCuda(sp, nullptr), KernelStatus::kInvalidShape);
  sp.dtype = static_cast<DataType>(99);
  EXPECT_EQ(SgmvGroupedShrinkCuda(sp, nullptr), KernelStatus::kUnsupportedDtype);
  SgmvGroupedExpandParams ep;
  ep.num_ops = 1;
  ep.ops[0].out = 8;
  ep.ops[0].num_terms = 3;
  ep.ldt = 16;
  ep.ref.max_rank = 16;
  ep.ref.max_tiles = 1;
  ep.ref.num_rows = 1;
  ep.dtype = DataType::kBF16;
  EXPECT_EQ(SgmvGroupedExpandCuda(ep, nullptr), KernelStatus::kInvalidShape);
  EXPECT_EQ(SgmvDecodeExpandCuda(ep, GemmEpilogue::kNone, nullptr), KernelStatus::kInvalidShape);
  ep.ops[0].num_terms = 1;
  EXPECT_EQ(SgmvDecodeExpandCuda(ep, GemmEpilogue::kNone, nullptr), KernelStatus::kNullPointer);
  ep.num_ops = 2;  // an activation is for one op
  ep.ops[1] = ep.ops[0];
  EXPECT_EQ(SgmvDecodeExpandCuda(ep, GemmEpilogue::kGeluTanh, nullptr),
            KernelStatus::kInvalidShape);
  SgmvFusedParams fp;
  fp.num_ops = 1;
  fp.ops[0].out = 8;
  fp.ops[0].terms[0] = {.x = nullptr, .ldx = 0, .in = 16, .entry = 0};
  fp.ref.max_rank = kSgmvFusedMaxRank + 8;  // above the shared-memory t
  fp.ref.max_tiles = 1;
  fp.ref.num_rows = 1;
  fp.dtype = DataType::kBF16;
  EXPECT_EQ(SgmvDecodeFusedCuda(fp, GemmEpilogue::kNone, nullptr), KernelStatus::kInvalidShape);
  fp.ref.max_rank = 16;
  EXPECT_EQ(SgmvDecodeFusedCuda(fp, GemmEpilogue::kNone, nullptr), KernelStatus::kNullPointer);
  fp.ops[0].terms[0].ldx = 8;  // ldx < in
  EXPECT_EQ(SgmvDecodeFusedCuda(fp, GemmEpilogue::kNone, nullptr), KernelStatus::kInvalidShape);
  fp.ops[0].terms[0].ldx = 0;
  fp.num_ops = 2;  // an activation is for one op
  fp.ops[1] = fp.ops[0];
  EXPECT_EQ(SgmvDecodeFusedCuda(fp, GemmEpilogue::kGeluErf, nullptr), KernelStatus::kInvalidShape);
  fp.ref.max_tiles = 0;  // nothing to do: no pointer is needed
  EXPECT_EQ(SgmvDecodeFusedCuda(fp, GemmEpilogue::kNone, nullptr), KernelStatus::kOk);
  fp.ref.max_tiles = 1;
  fp.num_ops = 1;
  fp.ops[0].delta = reinterpret_cast<float*>(16);  // delta-only: the fold applies the activation
  EXPECT_EQ(SgmvDecodeFusedCuda(fp, GemmEpilogue::kGeluTanh, nullptr), KernelStatus::kInvalidShape);
  fp.ops[0].ld_delta = 4;  // < out
  EXPECT_EQ(SgmvDecodeFusedCuda(fp, GemmEpilogue::kNone, nullptr), KernelStatus::kInvalidShape);
  SgmvFoldParams fold;
  fold.num_ops = 1;
  fold.ops[0] = {.y = nullptr, .ldy = 0, .out = 8, .delta = nullptr, .ld_delta = 0};
  fold.ref.max_tiles = 1;
  fold.ref.num_rows = 1;
  fold.dtype = DataType::kBF16;
  EXPECT_EQ(SgmvFoldCuda(fold, GemmEpilogue::kNone, nullptr), KernelStatus::kNullPointer);
  fold.ops[0].ldy = 4;  // < out
  EXPECT_EQ(SgmvFoldCuda(fold, GemmEpilogue::kNone, nullptr), KernelStatus::kInvalidShape);
  fold.ops[0].ldy = 0;
  EXPECT_EQ(SgmvFoldCuda(fold, static_cast<GemmEpilogue>(7), nullptr), KernelStatus::kInvalidShape);
  fold.ref.max_tiles = 0;  // nothing to do
  EXPECT_EQ(SgmvFoldCuda(fold, GemmEpilogue::kNone, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
}

}  // namespace
}  // namespace phishard
