// LoraExpandActCuda (kernels/cuda/lora_expand_act_cuda.h: fc1's LoRA delta + GELU in one pass)
// against LoraExpandActCpu, the naive reference (double accumulation) on the same 16-bit inputs.
//
// Swept: bf16 / fp16, no activation / tanh / erf GELU, column counts that are and are not a
// multiple of the kernel's 256-column block, segments of 1, 7, 30, 33, 65 and 100 rows, terms
// k = 8 (one half k-step), 16, 24, 32 (a rank-16 adapter's split T), 56, 64, 136 and 256 (rank 128
// split), act-only segments (k = 0: the base rows' GELU), rows in no segment. Every element that
// must not be read (t and b outside the segments' windows) or written (rows in no segment, y's
// columns past n) is NaN: a read would turn an output NaN, a write would change the NaN bits.
//
// Tolerance, per element: half an ulp of the storage type at the result (the one rounding) +
// the float32 accumulation of y and up to 256 products ((k + 1) x 2^-22 x (|y| + Σ|t b|), x 1.2
// for the GELU's slope) + 2^-18 |ref| for the kernel's x / (1 + 2^z) GELU on ex2.approx /
// rcp.approx (~2^-20 relative, kernels/cuda/lora_expand_act.cu) + 2^-20 (|y| + Σ|t b|) for the
// device's tanhf / erff against the host's on act-only rows (a few float ulps of tanh ~ -1, which
// 0.5 x (1 + tanh) turns into an absolute error of ~|x| 2^-22 for very negative x) + 2^-24
// absolute (fp16's subnormals). A dropped k-step or a wrong
// column permutation misses by ~|t b| >> this.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/lora_expand_act_cuda.h"
#include "kernels/cuda/lora_gemm_cuda.h"
#include "kernels/lora_expand_act.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::FromBits;
using gpu_test::ToBits;
using testing_util::RandomVector;

struct Seg {
  int row, rows, k;
};

struct Case {
  std::string name;
  DataType dtype;
  GemmEpilogue act;
  int n, ldy, rows;
  std::vector<Seg> segs;
};

// Rounds v to dtype (the values the device sees) and returns the 16-bit words.
std::vector<uint16_t> Round16(std::vector<float>& v, DataType t) {
  std::vector<uint16_t> w(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (std::isnan(v[i])) {
      w[i] = 0xFFFF;
      continue;
    }
    w[i] = ToBits(v[i], t);
    v[i] = FromBits(w[i], t);
  }
  return w;
}

void RunCase(const Case& c) {
  SCOPED_TRACE(c.name);
  const float kNan = std::nanf("");
  const int S = static_cast<int>(c.segs.size());
  // t [rows, ldt]: every segment reads columns [t_col, t_col + k); b [n, ldb]: segment s its own
  // window at b_col_s (side by side, like the gathered B_fc1's adapters).
  int max_k = 0, ldb = 0;
  std::vector<int> b_col(S);
  for (int s = 0; s < S; ++s) {
    max_k = std::max(max_k, c.segs[s].k);
    b_col[s] = ldb;
    ldb += c.segs[s].k + 8;  // 8 NaN columns between windows
  }
  const int t_col = 8, ldt = t_col + max_k + 16;  // NaN columns before and after
  std::vector<float> y(static_cast<size_t>(c.rows) * c.ldy, kNan);
  std::vector<float> t(static_cast<size_t>(c.rows) * ldt, kNan);
  std::vector<float> b(static_cast<size_t>(c.n) * std::max(ldb, 2), kNan);
  ldb = std::max(ldb, 2);
  const std::vector<float> ry = RandomVector(y.size(), 11, -3.0f, 3.0f);
  const std::vector<float> rt = RandomVector(t.size(), 12, -1.0f, 1.0f);
  const std::vector<float> rb = RandomVector(b.size(), 13, -0.15f, 0.15f);
  LoraExpandActParams p;
  for (int s = 0; s < S; ++s) {
    const Seg& g = c.segs[s];
    for (int i = g.row; i < g.row + g.rows; ++i) {
      for (int j = 0; j < c.n; ++j) y[i * c.ldy + j] = ry[i * c.ldy + j];
      for (int k = 0; k < g.k; ++k) t[i * ldt + t_col + k] = rt[i * ldt + t_col + k];
    }
    for (int j = 0; j < c.n; ++j) {
      for (int k = 0; k < g.k; ++k) b[j * ldb + b_col[s] + k] = rb[j * ldb + b_col[s] + k];
    }
    p.segments[s] = {g.row, g.rows, b_col[s], g.k};
  }
  p.num_segments = S;
  p.n = c.n;
  p.ldy = c.ldy;
  p.ldt = ldt;
  p.t_col = t_col;
  p.ldb = ldb;
  p.act = c.act;
  const std::vector<uint16_t> y16 = Round16(y, c.dtype), t16 = Round16(t, c.dtype),
                              b16 = Round16(b, c.dtype);
  DeviceBuffer dy = DeviceBuffer::From(y16), dt = DeviceBuffer::From(t16),
               db = DeviceBuffer::From(b16);
  // The reference: float copies of the rounded values, in place.
  std::vector<float> ref = y;
  p.y = ref.data();
  p.t = t.data();
  p.b = b.data();
  p.dtype = DataType::kF32;
  ASSERT_EQ(LoraExpandActCpu(p), KernelStatus::kOk);
  p.y = dy.get();
  p.t = dt.get();
  p.b = db.get();
  p.dtype = c.dtype;
  ASSERT_EQ(LoraExpandActCuda(p, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  std::vector<uint16_t> out16(y16.size());
  const std::vector<char> bytes = dy.DownloadBytes();
  std::memcpy(out16.data(), bytes.data(), bytes.size());

  const double half_ulp = c.dtype == DataType::kBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  std::vector<int> seg_of(c.rows, -1);
  for (int s = 0; s < S; ++s) {
    for (int i = c.segs[s].row; i < c.segs[s].row + c.segs[s].rows; ++i) seg_of[i] = s;
  }
  int bad = 0, checked = 0;
  double worst = 0;
  for (int i = 0; i < c.rows; ++i) {
    for (int j = 0; j < c.ldy; ++j) {
      const size_t e = static_cast<size_t>(i) * c.ldy + j;
      if (seg_of[i] < 0 || j >= c.n) {  // not this kernel's: the NaN bits must stay
        if (out16[e] != y16[e] && ++bad <= 5) {
          ADD_FAILURE() << "row " << i << " col " << j << " written outside the window";
        }
        continue;
      }
      const int s = seg_of[i];
      double mag = std::fabs(y[e]);
      for (int k = 0; k < c.segs[s].k; ++k) {
        mag += std::fabs(static_cast<double>(t[i * ldt + t_col + k]) * b[j * ldb + b_col[s] + k]);
      }
      const double o = FromBits(out16[e], c.dtype), r = ref[e];
      const double tol = half_ulp * std::max(std::fabs(o), std::fabs(r)) +
                         1.2 * (c.segs[s].k + 1) * std::ldexp(mag, -22) +
                         std::ldexp(std::fabs(r), -18) + std::ldexp(mag, -20) +
                         std::ldexp(1.0, -24);
      ++checked;
      worst = std::max(worst, std::fabs(o - r) / tol);
      if (!(std::fabs(o - r) <= tol) && ++bad <= 5) {
        ADD_FAILURE() << "row " << i << " col " << j << ": " << o << " vs " << r << " (tol " << tol
                      << ")";
      }
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_GT(checked, 0);
  std::printf("%s: %d elements, worst |out - ref| / tol %.3f\n", c.name.c_str(), checked, worst);
}

TEST(CudaLoraExpandAct, MatchesNaiveReferenceAcrossShapes) {
  PHI_REQUIRE_GPU();
  // 150 rows: a 1-row segment, a 33-row rank-16-split one, 6 rows in no segment (base rows the
  // caller activates itself), 7 act-only rows, a rank-128-split segment of 65 rows, a k = 8
  // segment of 30, a k = 56 one of 7 and the last 1 row untouched.
  const std::vector<Seg> mixed = {{0, 1, 16},    {1, 33, 32},  {40, 7, 0},
                                  {47, 65, 256}, {112, 30, 8}, {142, 7, 56}};
  const std::vector<Case> cases = {
      {"bf16 tanh n264", DataType::kBF16, GemmEpilogue::kGeluTanh, 264, 272, 150, mixed},
      {"fp16 erf n264", DataType::kF16, GemmEpilogue::kGeluErf, 264, 264, 150, mixed},
      {"bf16 none n520", DataType::kBF16, GemmEpilogue::kNone, 520, 528, 150, mixed},
      {"fp16 tanh n8", DataType::kF16, GemmEpilogue::kGeluTanh, 8, 16, 150, mixed},
      {"bf16 erf 8 x 100 rows k136",
       DataType::kBF16,
       GemmEpilogue::kGeluErf,
       1024,
       1024,
       800,
       {{0, 100, 136},
        {100, 100, 32},
        {200, 100, 24},
        {300, 100, 16},
        {400, 100, 8},
        {500, 100, 0},
        {600, 100, 64},
        {700, 100, 32}}},
  };
  for (const Case& c : cases) RunCase(c);
}

TEST(CudaLoraExpandAct, RejectsShapesItCannotServe) {
  PHI_REQUIRE_GPU();
  DeviceBuffer y(64 * 64 * 2), t(64 * 64 * 2), b(64 * 64 * 2);
  LoraExpandActParams p;
  p.y = y.get();
  p.t = t.get();
  p.b = b.get();
  p.n = 64;
  p.ldy = 64;
  p.ldt = 64;
  p.ldb = 64;
  p.num_segments = 1;
  p.segments[0] = {0, 16, 0, 16};
  p.act = GemmEpilogue::kGeluTanh;
  EXPECT_EQ(LoraExpandActCuda(p, nullptr), KernelStatus::kOk);
  LoraExpandActParams q = p;
  q.n = 60;  // not a multiple of 8
  q.ldy = 60;
  EXPECT_EQ(LoraExpandActCuda(q, nullptr), KernelStatus::kInvalidShape);
  q = p;
  q.segments[0].k = 12;  // not a multiple of 8
  EXPECT_EQ(LoraExpandActCuda(q, nullptr), KernelStatus::kInvalidShape);
  q = p;
  q.segments[0].b_col = 56;  // window past ldb
  EXPECT_EQ(LoraExpandActCuda(q, nullptr), KernelStatus::kInvalidShape);
  q = p;
  q.segments[0].b_col = 4;  // not a multiple of 8 (the 16-byte fragment loads)
  EXPECT_EQ(LoraExpandActCuda(q, nullptr), KernelStatus::kInvalidShape);
  q = p;
  q.rows_per_block = 48;
  EXPECT_EQ(LoraExpandActCuda(q, nullptr), KernelStatus::kInvalidShape);
  q = p;
  q.num_segments = kLoraExpandActMaxSegments + 1;
  EXPECT_EQ(LoraExpandActCuda(q, nullptr), KernelStatus::kInvalidShape);
  q = p;
  q.t = nullptr;
  EXPECT_EQ(LoraExpandActCuda(q, nullptr), KernelStatus::kNullPointer);
  q = p;
  q.dtype = DataType::kF32;
  EXPECT_EQ(LoraExpandActCuda(q, nullptr), KernelStatus::kUnsupportedDtype);
  gpu_test::ExpectDeviceClean(nullptr);
}

// The model's step (Phi-2's fc1, 8 x 512 rows, 8 rank-16 adapters, T split hi + lo: k = 32 a
// row) against what it replaces, LoraSegmentExpandCuda's cuBLASLt GEMMs with the tanh GELU
// epilogue, on the same inputs: both round one float32 sum of the same terms (in another order),
// so they may differ by one bf16 ulp where the two sums straddle a rounding boundary: bound
// 2^-7 |x| (one ulp) + 2^-10 absolute (cuBLASLt's GELU need not be our float formula: its
// error near GELU's flat negative tail is absolute, ~|pre| 2^-12 for a tanh good to 2^-11; a
// lost or misplaced delta, ~0.2 here, is far outside). Elements beyond one ulp are counted. Then
// times both (CUDA events, 20 launches after 3, in place: values drift, the work does not) and
// prints µs and the effective bandwidth of the kernel's one read + one write of y.
TEST(CudaLoraExpandAct, MatchesTheCublasLtExpandAtThePhi2ShapeAndTimesBoth) {
  PHI_REQUIRE_GPU();
  const int kSeg = 8, kSegRows = 512, rows = kSeg * kSegRows, n = 10240, W = 16, parts = 2;
  const int ldt = 6 * parts * W, t_col = 3 * parts * W, ldb = parts * kSeg * W;
  std::vector<float> y = RandomVector(static_cast<size_t>(rows) * n, 21, -3.0f, 3.0f);
  std::vector<float> t = RandomVector(static_cast<size_t>(rows) * ldt, 22, -1.0f, 1.0f);
  std::vector<float> b = RandomVector(static_cast<size_t>(n) * ldb, 23, -0.1f, 0.1f);
  const std::vector<uint16_t> y16 = Round16(y, DataType::kBF16), t16 = Round16(t, DataType::kBF16),
                              b16 = Round16(b, DataType::kBF16);
  DeviceBuffer dy = DeviceBuffer::From(y16), dref = DeviceBuffer::From(y16),
               dt = DeviceBuffer::From(t16), db = DeviceBuffer::From(b16);
  std::unique_ptr<CudaGemm> gemm;
  ASSERT_EQ(CudaGemm::Create(size_t{32} << 20, &gemm), KernelStatus::kOk);
  gemm->RequireFloat32SplitK();  // as CudaLora's
  std::vector<LoraSegment> segs;
  LoraExpandActParams p;
  for (int a = 0; a < kSeg; ++a) {
    segs.push_back({a * kSegRows, kSegRows, a * W, W});
    p.segments[a] = {a * kSegRows, kSegRows, parts * a * W, parts * W};
  }
  p.num_segments = kSeg;
  p.y = dy.get();
  p.ldy = n;
  p.n = n;
  p.t = dt.get();
  p.ldt = ldt;
  p.t_col = t_col;
  p.b = db.get();
  p.ldb = ldb;
  p.act = GemmEpilogue::kGeluTanh;
  p.dtype = DataType::kBF16;
  LoraSegmentExpandParams ep{.t = dt.get(),
                             .ldt = ldt,
                             .t_col = t_col,
                             .b = db.get(),
                             .ldb = ldb,
                             .y = dref.get(),
                             .ldy = n,
                             .n = n,
                             .parts = parts,
                             .segments = segs.data(),
                             .num_segments = kSeg,
                             .act = GemmEpilogue::kGeluTanh,
                             .dtype = DataType::kBF16};
  ASSERT_EQ(LoraSegmentExpandCuda(*gemm, ep, nullptr), KernelStatus::kOk);
  ASSERT_EQ(LoraExpandActCuda(p, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  const std::vector<char> got_b = dy.DownloadBytes(), want_b = dref.DownloadBytes();
  const auto* got = reinterpret_cast<const uint16_t*>(got_b.data());
  const auto* want = reinterpret_cast<const uint16_t*>(want_b.data());
  int64_t differ = 0, bad = 0, over_ulp = 0;
  for (size_t e = 0; e < y16.size(); ++e) {
    if (got[e] == want[e]) continue;
    ++differ;
    const double o = FromBits(got[e], DataType::kBF16), w = FromBits(want[e], DataType::kBF16);
    if (std::fabs(o - w) > std::ldexp(std::max(std::fabs(o), std::fabs(w)), -7)) ++over_ulp;
    if (!(std::fabs(o - w) <=
          std::ldexp(std::max(std::fabs(o), std::fabs(w)), -7) + std::ldexp(1.0, -10)) &&
        ++bad <= 5) {
      ADD_FAILURE() << "element " << e << ": kernel " << o << " vs cuBLASLt " << w;
    }
  }
  EXPECT_EQ(bad, 0);
  std::printf("kernel vs cuBLASLt expand: %lld of %zu elements differ, %lld by more than an ulp\n",
              static_cast<long long>(differ), y16.size(), static_cast<long long>(over_ulp));

  cudaEvent_t start, stop;
  ASSERT_EQ(cudaEventCreate(&start), cudaSuccess);
  ASSERT_EQ(cudaEventCreate(&stop), cudaSuccess);
  auto time_us = [&](auto&& launch) {
    for (int i = 0; i < 3; ++i) launch();
    cudaEventRecord(start, nullptr);
    for (int i = 0; i < 20; ++i) launch();
    cudaEventRecord(stop, nullptr);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    return 1000.0 * ms / 20;
  };
  const double bytes = 2.0 * rows * n * 2;
  const double cublas = time_us([&] { LoraSegmentExpandCuda(*gemm, ep, nullptr); });
  std::printf("cuBLASLt segment expand + GELU epilogue: %.1f us (%.2f TB/s)\n", cublas,
              bytes / cublas * 1e-6);
  for (int rpb : {32, 64, 128}) {
    p.rows_per_block = rpb;
    const double us = time_us([&] { LoraExpandActCuda(p, nullptr); });
    std::printf("LoraExpandActCuda rows_per_block %d: %.1f us (%.2f TB/s)\n", rpb, us,
                bytes / us * 1e-6);
  }
  gpu_test::ExpectDeviceClean(nullptr);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

}  // namespace
}  // namespace phishard
