// SgmvDecodeFusedCuda (kernels/cuda/sgmv_fused.cu), the fused shrink + expand of decode steps,
// and its delta-only form + SgmvFoldCuda (the LoRA beside mode, model/cuda_lora_beside.cc), on
// the cases and data of cuda_sgmv_test.cc (tests/gpu/sgmv_test_data.h) against a naive double
// reference and the CPU reference (kernels/sgmv.h); the tolerance of each check is stated above
// it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "tests/gpu/sgmv_test_data.h"

namespace phishard {
namespace {

using gpu_test::Decode;
using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;
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

// SgmvDecodeFusedCuda (kernels/cuda/sgmv_fused.cu) on the same data, with every module of rank
// above kSgmvFusedMaxRank removed from the table (not adapted): without an activation ops 0, 1
// and 3 each with their own term and op 2 with two terms (its own, and op 3's input and entry
// through B's first 64 rows), against the naive double reference and SgmvFusedCpu; with GELU
// tanh / erf op 1 alone with base tiles (rows -> GELU(y0)). Tolerance: each t_k carries float32
// summation error <= 1e-5 x Σ|x a| (as the shrink above) and the expand's float32 sum 1e-5 x
// Σ|scale t b|, so |y - ref| <= 1e-5 x (|y0| + Σ_k |scale b_k| (|t_k| + Σ|x a|_k)), GELU scales
// that by <= 1.13 (+1e-6 of tanhf / erff), plus one rounding of y (unit x |ref|).
// Returns the bytes of every op's y after the launch (empty on a failed launch), so that launch
// shapes (col_blocks) can be compared bit for bit.
// via_fold: the same result through the delta-only form (SgmvFusedOp::delta into NaN-poisoned
// float32 buffers, row strides out and out + 3 so both store paths run) and SgmvFoldCuda.
std::vector<std::vector<char>> RunDecodeFused(const Case& c, DataType dt, GemmEpilogue act,
                                              int col_blocks = 0, bool via_fold = false) {
  SCOPED_TRACE(c.name + " " + DataTypeName(dt) + " act " + std::to_string(static_cast<int>(act)) +
               " col_blocks " + std::to_string(col_blocks) + (via_fold ? " via fold" : ""));
  std::vector<std::vector<char>> result;
  Data d = MakeData(c, dt, 31);
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
  auto rank_of = [](int slot, int o) {
    return slot >= 0 && slot < kSlots && kRanks[slot][o] <= kSgmvFusedMaxRank ? kRanks[slot][o] : 0;
  };
  std::vector<SgmvWeight> table_dev = d.table_dev, table_cpu = d.table_cpu;
  for (int e = 0; e < kSlots * kOps; ++e) {
    if (rank_of(e / kOps, e % kOps) == 0) table_dev[e] = table_cpu[e] = SgmvWeight{};
  }
  const int32_t count = static_cast<int32_t>(d.tiles.size());
  const DeviceStep dev = UploadStep(d, table_dev, c.extra_tiles);
  SgmvTableRef ref = dev.ref;
  ref.max_rank = kSgmvFusedMaxRank;
  std::vector<int> row_slot;
  std::vector<bool> in_tile;
  RowSlots(d, &row_slot, &in_tile);
  // Op o's terms: (input op, entry op).
  std::vector<std::vector<int>> op_terms = {{0}, {1}, {2, 3}, {3}};
  const std::vector<int> ops = with_act ? std::vector<int>{1} : std::vector<int>{0, 1, 2, 3};
  OpOutputs ys = MakeOpOutputs(d, dt, 80);
  SgmvFusedParams fp;
  for (int o : ops) {
    SgmvFusedOp& op = fp.ops[fp.num_ops++];
    op.y = ys.ydev[o].get();
    op.ldy = d.ops[o].ldy;
    op.out = d.ops[o].out;
    op.num_terms = static_cast<int>(op_terms[o].size());
    for (int k = 0; k < op.num_terms; ++k) {
      const int src = op_terms[o][k];
      op.terms[k] = {
          .x = d.dev[src].get(), .ldx = d.ops[src].ldx, .in = d.ops[src].in, .entry = src};
    }
  }
  fp.ref = ref;
  fp.dtype = dt;
  fp.col_blocks = col_blocks;
  std::vector<DeviceBuffer> deltas;
  if (via_fold) {
    SgmvFusedParams dp = fp;
    SgmvFoldParams fold;
    for (int i = 0; i < fp.num_ops; ++i) {
      const int o = ops[i];
      const int ldd = d.ops[o].out + (o % 2 == 1 ? 3 : 0);
      deltas.push_back(
          DeviceBuffer::From(std::vector<float>(static_cast<size_t>(d.rows) * ldd + 1, kNaN)));
      dp.ops[i].y = nullptr;
      dp.ops[i].delta = deltas.back().as<float>();
      dp.ops[i].ld_delta = ldd;
      fold.ops[fold.num_ops++] = {.y = fp.ops[i].y,
                                  .ldy = fp.ops[i].ldy,
                                  .out = fp.ops[i].out,
                                  .delta = deltas.back().as<float>(),
                                  .ld_delta = ldd};
    }
    fold.ref = ref;
    fold.dtype = dt;
    EXPECT_EQ(SgmvDecodeFusedCuda(dp, GemmEpilogue::kNone, nullptr), KernelStatus::kOk);
    EXPECT_EQ(SgmvFoldCuda(fold, act, nullptr), KernelStatus::kOk);
  } else {
    EXPECT_EQ(SgmvDecodeFusedCuda(fp, act, nullptr), KernelStatus::kOk);
  }
  if (::testing::Test::HasFailure()) return result;
  gpu_test::ExpectDeviceClean(nullptr);
  std::vector<std::vector<float>> ycpu = ys.y0;
  if (!with_act) {
    SgmvFusedParams cp = fp;
    for (int o : ops) {
      cp.ops[o].y = ycpu[o].data();
      for (int k = 0; k < cp.ops[o].num_terms; ++k)
        cp.ops[o].terms[k].x = d.x[op_terms[o][k]].data();
    }
    cp.ref = MakeRef(d, table_cpu.data(), d.tiles.data(), &count, count);
    cp.ref.max_rank = kSgmvFusedMaxRank;
    cp.dtype = DataType::kF32;
    EXPECT_EQ(SgmvFusedCpu(cp), KernelStatus::kOk);
  }
  const double unit = StorageUnit(dt);
  const size_t esz = DataTypeSize(dt);
  for (int o : ops) {
    const std::vector<char> bytes = ys.ydev[o].DownloadBytes();
    result.push_back(bytes);
    const std::vector<float> yg = Decode(bytes, dt);
    const OpShape& s = d.ops[o];
    int bad = 0;
    for (int i = 0; i < d.rows && bad < 10; ++i) {
      const int slot = row_slot[i];
      // Per term: its rank, t (double) and Σ|x a| per rank column.
      struct T {
        int src = 0, e = 0, r = 0;
        std::vector<double> t, sxa;
      };
      std::vector<T> ts;
      for (int src : op_terms[o]) {
        T t;
        t.src = src;
        t.e = slot >= 0 ? slot * kOps + src : 0;
        t.r = rank_of(slot, src);
        const OpShape& xs = d.ops[src];
        for (int k = 0; k < t.r; ++k) {
          double acc = 0, mag = 0;
          for (int q = 0; q < xs.in; ++q) {
            const double v = static_cast<double>(d.x[src][static_cast<size_t>(i) * xs.ldx + q]) *
                             d.a[t.e][static_cast<size_t>(k) * xs.in + q];
            acc += v;
            mag += std::fabs(v);
          }
          t.t.push_back(acc);
          t.sxa.push_back(mag);
        }
        if (t.r > 0) ts.push_back(std::move(t));
      }
      for (int j = 0; j < s.ldy && bad < 10; ++j) {
        const size_t at = static_cast<size_t>(i) * s.ldy + j;
        if (j >= s.out || !in_tile[i] || (ts.empty() && !with_act)) {  // untouched: bit for bit
          if (std::memcmp(bytes.data() + at * esz, ys.y0_bytes[o].data() + at * esz, esz) != 0 ||
              (!with_act && std::memcmp(&ycpu[o][at], &ys.y0[o][at], sizeof(float)) != 0)) {
            ++bad;
            ADD_FAILURE() << "op " << o << " y[" << i << "][" << j << "] changed but must not";
          }
          continue;
        }
        double delta = 0, err = 0;
        for (const T& t : ts) {
          const double scale = d.scales[t.e];
          for (int k = 0; k < t.r; ++k) {
            const double b = d.b[t.e][static_cast<size_t>(j) * t.r + k];
            delta += scale * t.t[k] * b;
            err += std::fabs(scale * b) * (std::fabs(t.t[k]) + t.sxa[k]);
          }
        }
        double want = ys.y0[o][at] + delta;
        double tol = 1e-5 * (std::fabs(ys.y0[o][at]) + err);
        const double cpu_tol = tol + 1e-6;
        if (act == GemmEpilogue::kGeluTanh) {
          want = testing_util::NaiveGeluTanh(want);
          tol = 1.13 * tol + 1e-6;
        } else if (act == GemmEpilogue::kGeluErf) {
          want = testing_util::NaiveGeluErf(want);
          tol = 1.13 * tol + 1e-6;
        }
        tol += unit * std::fabs(want) + 1e-30;
        if (!(std::fabs(yg[at] - want) <= tol) ||
            (!with_act && !(std::fabs(ycpu[o][at] - want) <= cpu_tol))) {
          ++bad;
          ADD_FAILURE() << "op " << o << " y[" << i << "][" << j << "]: cuda " << yg[at] << " cpu "
                        << ycpu[o][at] << " want " << want << " tol " << tol;
        }
      }
    }
  }
  return result;
}

// col_blocks changes only the launch shape (each column block recomputes its row's t in the same
// order): 3 column blocks per op (where the automatic choice gives 1 or 2) write the same bytes.
TEST(CudaSgmvDecodeFused, MatchesNaiveReferenceWithAndWithoutGelu) {
  PHI_REQUIRE_GPU();
  for (DataType dt : {DataType::kBF16, DataType::kF16, DataType::kF32}) {
    for (const Case& c : kCases) {
      const auto automatic = RunDecodeFused(c, dt, GemmEpilogue::kNone, 0);
      const auto three = RunDecodeFused(c, dt, GemmEpilogue::kNone, 3);
      EXPECT_TRUE(automatic == three) << c.name << " " << DataTypeName(dt);
    }
    for (const Case& c : kCases) {
      if (c.bad_slot_tile) continue;  // its tile overlaps a base row's tile: tiles are disjoint
      RunDecodeFused(c, dt, GemmEpilogue::kGeluTanh);
      RunDecodeFused(c, dt, GemmEpilogue::kGeluErf);
    }
  }
}

// The beside mode's pair (model/cuda_lora_beside.cc): the delta-only form then SgmvFoldCuda give
// the fused launch's bytes, with and without GELU, on every dtype (both also pass the naive
// reference inside RunDecodeFused).
TEST(CudaSgmvDecodeFused, DeltaThenFoldEqualsFusedBitForBit) {
  PHI_REQUIRE_GPU();
  for (DataType dt : {DataType::kBF16, DataType::kF16, DataType::kF32}) {
    for (const Case& c : kCases) {
      const auto fused = RunDecodeFused(c, dt, GemmEpilogue::kNone);
      const auto folded = RunDecodeFused(c, dt, GemmEpilogue::kNone, 0, /*via_fold=*/true);
      EXPECT_TRUE(!fused.empty() && fused == folded) << c.name << " " << DataTypeName(dt);
      if (c.bad_slot_tile) continue;  // its tile overlaps a base row's tile: tiles are disjoint
      for (GemmEpilogue act : {GemmEpilogue::kGeluTanh, GemmEpilogue::kGeluErf}) {
        const auto f = RunDecodeFused(c, dt, act);
        const auto g = RunDecodeFused(c, dt, act, 0, /*via_fold=*/true);
        EXPECT_TRUE(!f.empty() && f == g) << c.name << " " << DataTypeName(dt) << " GELU";
      }
    }
  }
}

}  // namespace
}  // namespace phishard
