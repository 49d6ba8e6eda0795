// SgmvShrinkCuda / SgmvExpandCuda (kernels/cuda/sgmv_cuda.h) against the CPU reference
// (kernels/sgmv.h) on identical inputs: x, A, B and y are rounded to the device dtype first and
// the reference computes on those rounded values in float32, so only the device's own summation
// order and its one final rounding of y remain. Both kernels (kTiled, kPerRow) and kAuto run on
// every shape: prefill-like segments of many rows, decode-like segments of one row, empty
// segments, base segments (no adapter), rows outside every segment, odd widths, x / y as column
// windows of wider buffers, ranks 3..128 and a merged-adapter rank of 160.
//
// Poisoning: t is NaN before shrink and must stay NaN wherever the op must not write (columns
// >= r_s, skipped rows); the expand input t is NaN beyond each row's rank and on skipped rows, and
// x's / y's padding columns are NaN, so a kernel reading past a rank or a window edge leaves NaN
// in its output. Elements expand must not touch are compared bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <string>
#include <vector>

#include "kernels/cuda/sgmv_cuda.h"
#include "kernels/sgmv.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::Decode;
using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;

constexpr DataType kTypes[] = {DataType::kBF16, DataType::kF16, DataType::kF32};
constexpr SgmvCudaPath kPaths[] = {SgmvCudaPath::kTiled, SgmvCudaPath::kPerRow,
                                   SgmvCudaPath::kAuto};
constexpr float kNaN = testing_util::kNaN;
constexpr double kF32Unit = testing_util::kF32Unit;

const char* PathName(SgmvCudaPath p) {
  switch (p) {
    case SgmvCudaPath::kTiled:
      return "tiled";
    case SgmvCudaPath::kPerRow:
      return "per-row";
    case SgmvCudaPath::kAuto:
      return "auto";
  }
  return "?";
}

// Unit roundoff of the storage type: the one rounding of y's sum costs at most this, relative.
double StorageUnit(DataType t) {
  return t == DataType::kBF16 ? 1.0 / 256 : (t == DataType::kF16 ? 1.0 / 2048 : 0.0);
}

// Segment lengths (0 = empty segment) and a rank per segment: r > 0 an adapter of rank r, 0 a
// base segment (null A / B, rank 0), -1 a base segment whose rank field still says 8 (null
// pointers alone must skip it).
struct Case {
  std::string name;
  int in, out;
  std::vector<int> seg_lens;
  std::vector<int> ranks;
  int lead_rows = 0;  // rows before the first segment
  int tail_rows = 0;  // rows after the last one
  int x_pad = 0, y_pad = 0;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// Element `i` of a device image set to NaN (all-ones bits: NaN in f32, f16 and bf16).
void PoisonElement(std::vector<char>* bytes, size_t i, DataType t) {
  const size_t w = DataTypeSize(t);
  std::memset(bytes->data() + i * w, 0xFF, w);
}

bool SameBits(const std::vector<char>& a, const std::vector<char>& b, size_t i, DataType t) {
  const size_t w = DataTypeSize(t);
  return std::memcmp(a.data() + i * w, b.data() + i * w, w) == 0;
}

// Everything one case needs on the host and on the device.
struct Problem {
  int S = 0, num_rows = 0, ldx = 0, ldy = 0, ldt = 0;
  std::vector<int32_t> starts, ranks;
  std::vector<float> scales;
  std::vector<int> seg_of_row;  // -1 outside every segment
  std::vector<float> x;         // [num_rows, ldx], rounded to the dtype, padding NaN
  std::vector<std::vector<float>> a, b;
  std::vector<const void*> a_host, b_host;
  std::vector<char> x_dev_bytes;

  bool Adapted(int s) const { return s >= 0 && a_host[s] != nullptr && ranks[s] > 0; }
};

Problem MakeProblem(const Case& c, DataType t) {
  Problem p;
  p.S = static_cast<int>(c.seg_lens.size());
  p.starts = {c.lead_rows};
  for (int len : c.seg_lens) p.starts.push_back(p.starts.back() + len);
  p.num_rows = p.starts.back() + c.tail_rows;
  p.ldx = c.in + c.x_pad;
  p.ldy = c.out + c.y_pad;
  int max_rank = 1;
  for (int r : c.ranks) max_rank = std::max(max_rank, r);
  p.ldt = max_rank + 3;  // wider than every rank: the columns past each rank stay poisoned
  p.seg_of_row.assign(p.num_rows, -1);
  for (int s = 0; s < p.S; ++s) {
    for (int r = p.starts[s]; r < p.starts[s + 1]; ++r) p.seg_of_row[r] = s;
  }
  p.x = RandomVector(static_cast<size_t>(p.num_rows) * p.ldx, 101 + c.in);
  p.x_dev_bytes = Encode(p.x, t);
  for (int r = 0; r < p.num_rows; ++r) {
    for (int k = c.in; k < p.ldx; ++k) {
      p.x[static_cast<size_t>(r) * p.ldx + k] = kNaN;
      PoisonElement(&p.x_dev_bytes, static_cast<size_t>(r) * p.ldx + k, t);
    }
  }
  p.a.resize(p.S);
  p.b.resize(p.S);
  p.a_host.assign(p.S, nullptr);
  p.b_host.assign(p.S, nullptr);
  for (int s = 0; s < p.S; ++s) {
    p.scales.push_back(0.5f + 0.375f * static_cast<float>(s % 5));
    const int r = c.ranks[s];
    p.ranks.push_back(r < 0 ? 8 : r);
    if (r <= 0) continue;
    // A ~ U(-1, 1) / sqrt(in), B ~ U(-1, 1) / sqrt(r): t and the delta stay O(1), like y.
    p.a[s] = RandomVector(static_cast<size_t>(r) * c.in, 200 + s, -1, 1);
    p.b[s] = RandomVector(static_cast<size_t>(c.out) * r, 300 + s, -1, 1);
    for (float& v : p.a[s]) v /= std::sqrt(static_cast<float>(c.in));
    for (float& v : p.b[s]) v /= std::sqrt(static_cast<float>(r));
    p.a_host[s] = p.a[s].data();
    p.b_host[s] = p.b[s].data();
  }
  return p;
}

class CudaSgmv : public ::testing::TestWithParam<Case> {};

// Shrink output is float32 from identical inputs: both sides are dot products over `in` terms in
// float32, each within in · u · Σ|x_i A_ki| of the exact value, so 2 (in + 2) u Σ|x_i A_ki| per
// element. A wrong row, segment or column moves an element by O(Σ|x_i A_ki|).
TEST_P(CudaSgmv, ShrinkMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  const Case& c = GetParam();
  for (DataType dt : kTypes) {
    Problem p = MakeProblem(c, dt);
    std::vector<DeviceBuffer> d_a(p.S);
    std::vector<const void*> a_dev(p.S, nullptr);
    for (int s = 0; s < p.S; ++s) {
      if (p.a_host[s] == nullptr) continue;
      d_a[s] = DeviceBuffer::From(Encode(p.a[s], dt));  // rounds p.a[s] in place
      a_dev[s] = d_a[s].get();
    }
    DeviceBuffer d_x = DeviceBuffer::From(p.x_dev_bytes);
    DeviceBuffer d_starts = DeviceBuffer::From(p.starts);
    DeviceBuffer d_ranks = DeviceBuffer::From(p.ranks);
    DeviceBuffer d_a_table = DeviceBuffer::From(a_dev);

    std::vector<float> ref(static_cast<size_t>(p.num_rows) * p.ldt, kNaN);
    ASSERT_EQ(SgmvShrinkCpu({.x = p.x.data(),
                             .t = ref.data(),
                             .seg_starts = p.starts.data(),
                             .a = p.a_host.data(),
                             .ranks = p.ranks.data(),
                             .num_segments = p.S,
                             .num_rows = p.num_rows,
                             .in = c.in,
                             .ldx = p.ldx,
                             .ldt = p.ldt}),
              KernelStatus::kOk);
    for (SgmvCudaPath path : kPaths) {
      SCOPED_TRACE(testing::Message() << DataTypeName(dt) << " " << PathName(path));
      DeviceBuffer d_t(ref.size() * sizeof(float));
      d_t.Poison();
      ASSERT_EQ(SgmvShrinkCuda({.x = d_x.get(),
                                .t = d_t.as<float>(),
                                .seg_starts = d_starts.as<int32_t>(),
                                .a = d_a_table.as<const void*>(),
                                .ranks = d_ranks.as<int32_t>(),
                                .num_segments = p.S,
                                .num_rows = p.num_rows,
                                .in = c.in,
                                .ldx = p.ldx,
                                .ldt = p.ldt,
                                .dtype = dt},
                               nullptr, path),
                KernelStatus::kOk);
      gpu_test::ExpectDeviceClean(nullptr);
      const std::vector<float> out = Decode(d_t.DownloadBytes(), DataType::kF32);
      int bad = 0, written = 0;
      for (int r = 0; r < p.num_rows; ++r) {
        const int s = p.seg_of_row[r];
        for (int j = 0; j < p.ldt; ++j) {
          const size_t i = static_cast<size_t>(r) * p.ldt + j;
          const bool must_write = p.Adapted(s) && j < p.ranks[s];
          if (!must_write) {
            if (!std::isnan(out[i]) && ++bad <= 5) {
              ADD_FAILURE() << "t[" << r << ", " << j << "] = " << out[i] << " was written";
            }
            continue;
          }
          ++written;
          double mag = 0;
          for (int k = 0; k < c.in; ++k) {
            mag += std::fabs(static_cast<double>(p.x[static_cast<size_t>(r) * p.ldx + k]) *
                             p.a[s][static_cast<size_t>(j) * c.in + k]);
          }
          const double tol = 2.0 * (c.in + 2) * kF32Unit * mag;
          if (!(std::fabs(static_cast<double>(out[i]) - ref[i]) <= tol) && ++bad <= 5) {
            ADD_FAILURE() << "t[" << r << ", " << j << "] = " << out[i] << ", reference " << ref[i]
                          << ", tolerance " << tol;
          }
        }
      }
      EXPECT_EQ(bad, 0);
      EXPECT_EQ(written == 0, c.name == "empty_and_base_only") << "written " << written;
    }
  }
}

// Expand from the same float32 t on both sides. Per element the reference is
// y_ref = y0 + scale · Σ_k t_k B_jk in float32 (within (r + 2) u · mag of exact, mag = |y0| +
// |scale| Σ_k |t_k B_jk|); the device computes the same sum in another order and rounds it once
// to the storage type (unit u_s). So |out - ref| <= u_s |ref| (1 + 1e-3) + 2 (r + 4) u · mag.
TEST_P(CudaSgmv, ExpandMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  const Case& c = GetParam();
  for (DataType dt : kTypes) {
    Problem p = MakeProblem(c, dt);
    std::vector<DeviceBuffer> d_b(p.S);
    std::vector<const void*> b_dev(p.S, nullptr);
    for (int s = 0; s < p.S; ++s) {
      if (p.b_host[s] == nullptr) continue;
      d_b[s] = DeviceBuffer::From(Encode(p.b[s], dt));
      b_dev[s] = d_b[s].get();
    }
    // t: finite where the op reads it, NaN everywhere else (past each rank, skipped rows).
    std::vector<float> t = RandomVector(static_cast<size_t>(p.num_rows) * p.ldt, 7 + c.out);
    for (int r = 0; r < p.num_rows; ++r) {
      const int s = p.seg_of_row[r];
      for (int j = 0; j < p.ldt; ++j) {
        if (!(s >= 0 && p.b_host[s] != nullptr && j < p.ranks[s])) {
          t[static_cast<size_t>(r) * p.ldt + j] = kNaN;
        }
      }
    }
    std::vector<float> y0 = RandomVector(static_cast<size_t>(p.num_rows) * p.ldy, 9 + c.out);
    std::vector<char> y0_bytes = Encode(y0, dt);
    for (int r = 0; r < p.num_rows; ++r) {
      for (int j = c.out; j < p.ldy; ++j) {
        y0[static_cast<size_t>(r) * p.ldy + j] = kNaN;
        PoisonElement(&y0_bytes, static_cast<size_t>(r) * p.ldy + j, dt);
      }
    }
    std::vector<float> ref = y0;
    ASSERT_EQ(SgmvExpandCpu({.t = t.data(),
                             .y = ref.data(),
                             .seg_starts = p.starts.data(),
                             .b = p.b_host.data(),
                             .ranks = p.ranks.data(),
                             .scales = p.scales.data(),
                             .num_segments = p.S,
                             .num_rows = p.num_rows,
                             .out = c.out,
                             .ldy = p.ldy,
                             .ldt = p.ldt}),
              KernelStatus::kOk);
    DeviceBuffer d_t = DeviceBuffer::From(t);
    DeviceBuffer d_starts = DeviceBuffer::From(p.starts);
    DeviceBuffer d_ranks = DeviceBuffer::From(p.ranks);
    DeviceBuffer d_scales = DeviceBuffer::From(p.scales);
    DeviceBuffer d_b_table = DeviceBuffer::From(b_dev);
    for (SgmvCudaPath path : kPaths) {
      SCOPED_TRACE(testing::Message() << DataTypeName(dt) << " " << PathName(path));
      DeviceBuffer d_y = DeviceBuffer::From(y0_bytes);
      ASSERT_EQ(SgmvExpandCuda({.t = d_t.as<float>(),
                                .y = d_y.get(),
                                .seg_starts = d_starts.as<int32_t>(),
                                .b = d_b_table.as<const void*>(),
                                .ranks = d_ranks.as<int32_t>(),
                                .scales = d_scales.as<float>(),
                                .num_segments = p.S,
                                .num_rows = p.num_rows,
                                .out = c.out,
                                .ldy = p.ldy,
                                .ldt = p.ldt,
                                .dtype = dt},
                               nullptr, path),
                KernelStatus::kOk);
      gpu_test::ExpectDeviceClean(nullptr);
      const std::vector<char> out_bytes = d_y.DownloadBytes();
      const std::vector<float> out = Decode(out_bytes, dt);
      int bad = 0;
      for (int r = 0; r < p.num_rows; ++r) {
        const int s = p.seg_of_row[r];
        const bool adapted = s >= 0 && p.b_host[s] != nullptr && p.ranks[s] > 0;
        for (int j = 0; j < p.ldy; ++j) {
          const size_t i = static_cast<size_t>(r) * p.ldy + j;
          if (!adapted || j >= c.out) {
            if (!SameBits(out_bytes, y0_bytes, i, dt) && ++bad <= 5) {
              ADD_FAILURE() << "y[" << r << ", " << j << "] changed from " << y0[i] << " to "
                            << out[i];
            }
            continue;
          }
          double mag = std::fabs(y0[i]), dot = 0;
          for (int k = 0; k < p.ranks[s]; ++k) {
            dot += std::fabs(static_cast<double>(t[static_cast<size_t>(r) * p.ldt + k]) *
                             p.b[s][static_cast<size_t>(j) * p.ranks[s] + k]);
          }
          mag += std::fabs(p.scales[s]) * dot;
          const double tol = StorageUnit(dt) * std::fabs(ref[i]) * (1 + 1e-3) +
                             2.0 * (p.ranks[s] + 4) * kF32Unit * mag;
          if (!(std::fabs(static_cast<double>(out[i]) - ref[i]) <= tol) && ++bad <= 5) {
            ADD_FAILURE() << "y[" << r << ", " << j << "] = " << out[i] << ", reference " << ref[i]
                          << " (y0 " << y0[i] << "), tolerance " << tol;
          }
        }
      }
      EXPECT_EQ(bad, 0);
    }
  }
}

// Shrink then expand on the device, as a backend runs one target, against the CPU doing the same:
// the device's t differs from the reference's by float32 summation order, which reaches y scaled
// by |scale| Σ_k |B_jk|; the tolerance is sgmv_test's first-order bound 2 (in + r + 4) u · mag
// with mag = |y0| + |scale| Σ_k (Σ_i |x_i A_ki|) |B_jk|, plus the storage rounding of y.
TEST_P(CudaSgmv, ShrinkThenExpandMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  const Case& c = GetParam();
  for (DataType dt : {DataType::kBF16, DataType::kF32}) {
    Problem p = MakeProblem(c, dt);
    std::vector<DeviceBuffer> d_a(p.S), d_b(p.S);
    std::vector<const void*> a_dev(p.S, nullptr), b_dev(p.S, nullptr);
    for (int s = 0; s < p.S; ++s) {
      if (p.a_host[s] == nullptr) continue;
      d_a[s] = DeviceBuffer::From(Encode(p.a[s], dt));
      d_b[s] = DeviceBuffer::From(Encode(p.b[s], dt));
      a_dev[s] = d_a[s].get();
      b_dev[s] = d_b[s].get();
    }
    std::vector<float> y0 = RandomVector(static_cast<size_t>(p.num_rows) * p.ldy, 5 + c.in);
    const std::vector<char> y0_bytes = Encode(y0, dt);
    std::vector<float> t_ref(static_cast<size_t>(p.num_rows) * p.ldt, kNaN), ref = y0;
    ASSERT_EQ(SgmvShrinkCpu({.x = p.x.data(),
                             .t = t_ref.data(),
                             .seg_starts = p.starts.data(),
                             .a = p.a_host.data(),
                             .ranks = p.ranks.data(),
                             .num_segments = p.S,
                             .num_rows = p.num_rows,
                             .in = c.in,
                             .ldx = p.ldx,
                             .ldt = p.ldt}),
              KernelStatus::kOk);
    ASSERT_EQ(SgmvExpandCpu({.t = t_ref.data(),
                             .y = ref.data(),
                             .seg_starts = p.starts.data(),
                             .b = p.b_host.data(),
                             .ranks = p.ranks.data(),
                             .scales = p.scales.data(),
                             .num_segments = p.S,
                             .num_rows = p.num_rows,
                             .out = c.out,
                             .ldy = p.ldy,
                             .ldt = p.ldt}),
              KernelStatus::kOk);
    DeviceBuffer d_x = DeviceBuffer::From(p.x_dev_bytes);
    DeviceBuffer d_y = DeviceBuffer::From(y0_bytes);
    DeviceBuffer d_t(t_ref.size() * sizeof(float));
    d_t.Poison();
    DeviceBuffer d_starts = DeviceBuffer::From(p.starts);
    DeviceBuffer d_ranks = DeviceBuffer::From(p.ranks);
    DeviceBuffer d_scales = DeviceBuffer::From(p.scales);
    DeviceBuffer d_a_table = DeviceBuffer::From(a_dev);
    DeviceBuffer d_b_table = DeviceBuffer::From(b_dev);
    SCOPED_TRACE(DataTypeName(dt));
    ASSERT_EQ(SgmvShrinkCuda({.x = d_x.get(),
                              .t = d_t.as<float>(),
                              .seg_starts = d_starts.as<int32_t>(),
                              .a = d_a_table.as<const void*>(),
                              .ranks = d_ranks.as<int32_t>(),
                              .num_segments = p.S,
                              .num_rows = p.num_rows,
                              .in = c.in,
                              .ldx = p.ldx,
                              .ldt = p.ldt,
                              .dtype = dt},
                             nullptr),
              KernelStatus::kOk);
    ASSERT_EQ(SgmvExpandCuda({.t = d_t.as<float>(),
                              .y = d_y.get(),
                              .seg_starts = d_starts.as<int32_t>(),
                              .b = d_b_table.as<const void*>(),
                              .ranks = d_ranks.as<int32_t>(),
                              .scales = d_scales.as<float>(),
                              .num_segments = p.S,
                              .num_rows = p.num_rows,
                              .out = c.out,
                              .ldy = p.ldy,
                              .ldt = p.ldt,
                              .dtype = dt},
                             nullptr),
              KernelStatus::kOk);
    gpu_test::ExpectDeviceClean(nullptr);
    const std::vector<float> out = Decode(d_y.DownloadBytes(), dt);
    // xa[r, k] = Σ_i |x_ri A_ki|, the magnitude of t[r, k].
    std::vector<double> xa(static_cast<size_t>(p.num_rows) * p.ldt, 0.0);
    for (int r = 0; r < p.num_rows; ++r) {
      const int s = p.seg_of_row[r];
      if (!p.Adapted(s)) continue;
      for (int k = 0; k < p.ranks[s]; ++k) {
        double sum = 0;
        for (int q = 0; q < c.in; ++q) {
          sum += std::fabs(static_cast<double>(p.x[static_cast<size_t>(r) * p.ldx + q]) *
                           p.a[s][static_cast<size_t>(k) * c.in + q]);
        }
        xa[static_cast<size_t>(r) * p.ldt + k] = sum;
      }
    }
    int bad = 0;
    for (int r = 0; r < p.num_rows; ++r) {
      const int s = p.seg_of_row[r];
      const int rank = p.Adapted(s) ? p.ranks[s] : 0;
      for (int j = 0; j < c.out; ++j) {
        const size_t i = static_cast<size_t>(r) * p.ldy + j;
        double sum = 0;
        for (int k = 0; k < rank; ++k) {
          sum += xa[static_cast<size_t>(r) * p.ldt + k] *
                 std::fabs(p.b[s][static_cast<size_t>(j) * rank + k]);
        }
        const double mag = std::fabs(y0[i]) + (rank > 0 ? std::fabs(p.scales[s]) * sum : 0.0);
        const double tol = StorageUnit(dt) * std::fabs(ref[i]) * (1 + 1e-3) +
                           2.0 * (c.in + rank + 4) * kF32Unit * mag;
        if (!(std::fabs(static_cast<double>(out[i]) - ref[i]) <= tol) && ++bad <= 5) {
          ADD_FAILURE() << "y[" << r << ", " << j << "] = " << out[i] << ", reference " << ref[i]
                        << ", tolerance " << tol;
        }
      }
    }
    EXPECT_EQ(bad, 0);
  }
}

// Ranks: the fixtures' 4, 8 and 16, the 8..128 range real adapters use, 3 / 5 / 7 (odd, not a
// multiple of any tile), and 160 (two stacked adapters of a LINEAR merge: past one rank chunk of
// every kernel). Widths: Phi-2's 2560 / 10240 in miniature and odd ones (81, 83).
INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaSgmv,
    ::testing::Values(
        Case{"prefill_mixed", 256, 768, {37, 0, 64, 5, 17}, {16, 8, 0, 128, 4}, 3, 2, 512, 17},
        Case{"prefill_one_long_segment", 2560, 2560, {300}, {64}, 0, 0, 0, 0},
        Case{"decode_one_row_per_segment",
             320,
             1024,
             {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
             {8, 16, 0, 32, 64, 128, 4, 8, -1, 16, 8, 0, 4, 32, 8, 8, 16, 64, 128, 0, 8},
             0,
             0,
             0,
             0},
        Case{"odd_widths", 81, 83, {1, 2, 3, 0, 33}, {3, 5, 7, 8, 4}, 1, 1, 3, 5},
        Case{"wide_out_merged_rank", 64, 5000, {33, 1, 2}, {160, 96, -1}, 0, 2, 0, 0},
        Case{"fc2_shape", 10240, 256, {20, 1}, {16, 8}, 0, 0, 0, 0},
        Case{"empty_and_base_only", 96, 96, {0, 4, 0, 3}, {8, 0, 16, -1}, 2, 2, 0, 0}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

TEST(CudaSgmvChecks, RejectsBadArgumentsAndSkipsEmptyLaunches) {
  PHI_REQUIRE_GPU();
  int32_t dummy = 0;
  const void* table[1] = {nullptr};
  float t = 0;
  SgmvShrinkParams s{.x = &t,
                     .t = &t,
                     .seg_starts = &dummy,
                     .a = table,
                     .ranks = &dummy,
                     .num_segments = 1,
                     .num_rows = 1,
                     .in = 8,
                     .ldx = 4,  // < in
                     .ldt = 8,
                     .dtype = DataType::kBF16};
  EXPECT_EQ(SgmvShrinkCuda(s, nullptr), KernelStatus::kInvalidShape);
  s.ldx = 0;
  s.x = nullptr;
  EXPECT_EQ(SgmvShrinkCuda(s, nullptr), KernelStatus::kNullPointer);
  s.num_rows = 0;  // nothing to do: no pointer is needed and nothing is launched
  EXPECT_EQ(SgmvShrinkCuda(s, nullptr), KernelStatus::kOk);
  SgmvExpandParams e{.t = &t,
                     .y = &t,
                     .seg_starts = &dummy,
                     .b = nullptr,
                     .ranks = &dummy,
                     .num_segments = 1,
                     .num_rows = 1,
                     .out = 8,
                     .ldy = 0,
                     .ldt = 0,
                     .dtype = DataType::kF16};
  EXPECT_EQ(SgmvExpandCuda(e, nullptr), KernelStatus::kInvalidShape);  // ldt 0
  e.ldt = 8;
  EXPECT_EQ(SgmvExpandCuda(e, nullptr), KernelStatus::kNullPointer);  // b table
  e.num_segments = 0;
  EXPECT_EQ(SgmvExpandCuda(e, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
}

}  // namespace
}  // namespace phishard
