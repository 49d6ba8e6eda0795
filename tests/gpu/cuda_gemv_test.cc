// The decode GEMV kernels (the register one and the bulk-copy one, kernels/cuda/gemv*.cu)
// against their CPU reference over swept shapes, splits, stages and launch forms.
//
// Tolerances: each output is rounded once to its 16-bit type after float32 arithmetic, so
// OneRoundingTol (4x the rounding unit, see gpu_test_util.h) applies; float32 outputs (lm_head)
// carry only summation-order error, ~1e-6 relative, checked at 5e-4 as in cuda_ops_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/gemv_cuda.h"
#include "kernels/device.h"
#include "kernels/gemm.h"
#include "kernels/layer_norm.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::Compare;
using gpu_test::Decode;
using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using gpu_test::OneRoundingTol;
using testing_util::RandomVector;

constexpr DataType kHalfTypes[] = {DataType::kBF16, DataType::kF16};

// ---------------------------------------------------------------------------------------------
// GEMV
struct GemvShape {
  int m, n, k, k2;  // k2 > 0: a second segment
};

class CudaGemvTest : public ::testing::TestWithParam<GemvShape> {};

// Every epilogue x bias x accumulate, padded row strides, one or two segments, bf16 and fp16,
// against GemmCpu on the same (rounded) inputs; poisoned outputs must be written exactly on
// [m, n] and nowhere else. Two launches give the same bits (no atomics).
TEST_P(CudaGemvTest, MatchesCpuReference) {
  PHI_REQUIRE_GPU();
  const GemvShape s = GetParam();
  for (DataType t : kHalfTypes) {
    const int ldx = s.k + 8, ldx2 = s.k2 + 16, ldy = s.n + 3;
    std::vector<float> x = RandomVector(static_cast<size_t>(s.m) * ldx, s.m + s.k);
    std::vector<float> w = RandomVector(static_cast<size_t>(s.n) * s.k, s.n, -0.1f, 0.1f);
    std::vector<float> bias = RandomVector(s.n, s.n + 1);
    std::vector<float> x2 = RandomVector(static_cast<size_t>(s.m) * std::max(ldx2, 1), s.k2 + 2);
    std::vector<float> w2 =
        RandomVector(static_cast<size_t>(s.n) * std::max(s.k2, 1), s.n + 3, -0.05f, 0.05f);
    std::vector<float> bias2 = RandomVector(s.n, s.n + 4);
    std::vector<float> y_old = RandomVector(static_cast<size_t>(s.m) * ldy, s.m + 5);
    DeviceBuffer d_x = DeviceBuffer::From(Encode(x, t));
    DeviceBuffer d_w = DeviceBuffer::From(Encode(w, t));
    DeviceBuffer d_b = DeviceBuffer::From(Encode(bias, t));
    DeviceBuffer d_x2 = DeviceBuffer::From(Encode(x2, t));
    DeviceBuffer d_w2 = DeviceBuffer::From(Encode(w2, t));
    DeviceBuffer d_b2 = DeviceBuffer::From(Encode(bias2, t));
    const std::vector<char> y_old_bytes = Encode(y_old, t);
    for (bool bulk : {false, true}) {  // the column kernel, then the bulk kernel
      for (GemmEpilogue epi :
           {GemmEpilogue::kNone, GemmEpilogue::kGeluTanh, GemmEpilogue::kGeluErf}) {
        for (bool with_bias : {false, true}) {
          for (bool acc : {false, true}) {
            if (acc && epi != GemmEpilogue::kNone) continue;
            SCOPED_TRACE(testing::Message()
                         << DataTypeName(t) << " m " << s.m << " n " << s.n << " k " << s.k
                         << " k2 " << s.k2 << " epi " << static_cast<int>(epi) << " bias "
                         << with_bias << " acc " << acc << " bulk " << bulk);
            DeviceBuffer d_y(y_old_bytes.size());
            if (acc) {
              d_y.Upload(y_old_bytes.data(), y_old_bytes.size());
            } else {
              d_y.Poison();
            }
            GemvParams p{.a = {.x = d_x.get(),
                               .w = d_w.get(),
                               .bias = with_bias ? d_b.get() : nullptr,
                               .y = d_y.get(),
                               .m = s.m,
                               .n = s.n,
                               .k = s.k,
                               .ldx = ldx,
                               .ldy = ldy,
                               .accumulate = acc,
                               .epilogue = epi,
                               .dtype = t},
                         .y_dtype = t,
                         .bulk = bulk};
            if (s.k2 > 0) {
              p.x2 = d_x2.get();
              p.w2 = d_w2.get();
              p.bias2 = with_bias ? d_b2.get() : nullptr;
              p.k2 = s.k2;
              p.ldx2 = ldx2;
            }
            ASSERT_TRUE(GemvCudaSupports(p));
            ASSERT_EQ(GemvCuda(p, nullptr), KernelStatus::kOk);
            gpu_test::ExpectDeviceClean(nullptr);
            const std::vector<char> first = d_y.DownloadBytes();
            if (!acc) {  // same bits on a second launch
              ASSERT_EQ(GemvCuda(p, nullptr), KernelStatus::kOk);
              ASSERT_EQ(first, d_y.DownloadBytes()) << "GEMV is not deterministic";
            }
            // Reference: pre-activation in float32, then the activation once.
            std::vector<float> ref = acc ? y_old : std::vector<float>(y_old.size(), 0.0f);
            GemmParams pc{.x = x.data(),
                          .w = w.data(),
                          .bias = with_bias ? bias.data() : nullptr,
                          .y = ref.data(),
                          .m = s.m,
                          .n = s.n,
                          .k = s.k,
                          .ldx = ldx,
                          .ldy = ldy,
                          .accumulate = acc,
                          .dtype = DataType::kF32};
            ASSERT_EQ(GemmCpu(pc), KernelStatus::kOk);
            if (s.k2 > 0) {
              GemmParams pc2 = pc;
              pc2.x = x2.data();
              pc2.w = w2.data();
              pc2.bias = with_bias ? bias2.data() : nullptr;
              pc2.k = s.k2;
              pc2.ldx = ldx2;
              pc2.accumulate = true;
              ASSERT_EQ(GemmCpu(pc2), KernelStatus::kOk);
            }
            for (float& v : ref) {  // the activation, once
              if (epi == GemmEpilogue::kGeluTanh) v = GeluTanh(v);
              if (epi == GemmEpilogue::kGeluErf) v = GeluErf(v);
            }
            const std::vector<float> out = Decode(first, t);
            ASSERT_NO_FATAL_FAILURE(
                gpu_test::ExpectPaddingUntouched(out, s.m, s.n, ldy, acc ? &y_old : nullptr));
            const gpu_test::Diff d = gpu_test::CompareRows(out, ref, s.m, s.n, ldy);
            EXPECT_EQ(d.nonfinite, 0u);
            EXPECT_LE(d.rel, OneRoundingTol(t)) << gpu_test::ToString(d);
          }
        }
      }
    }
  }
}

// lm_head: float32 output and bias, padded output stride.
TEST_P(CudaGemvTest, Float32OutputMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  const GemvShape s = GetParam();
  for (DataType t : kHalfTypes) {
    const int ldy = (s.n + 63) / 64 * 64;
    std::vector<float> x = RandomVector(static_cast<size_t>(s.m) * s.k, s.m + 7 * s.k);
    std::vector<float> w = RandomVector(static_cast<size_t>(s.n) * s.k, s.n + 8);
    std::vector<float> bias = RandomVector(s.n, s.n + 9);
    DeviceBuffer d_x = DeviceBuffer::From(Encode(x, t));
    DeviceBuffer d_w = DeviceBuffer::From(Encode(w, t));
    DeviceBuffer d_b = DeviceBuffer::From(bias);
    for (bool bulk : {false, true}) {
      SCOPED_TRACE(bulk ? "bulk kernel" : "column kernel");
      DeviceBuffer d_y(static_cast<size_t>(s.m) * ldy * sizeof(float));
      d_y.Poison();
      GemvParams p{.a = {.x = d_x.get(),
                         .w = d_w.get(),
                         .bias = d_b.get(),
                         .y = d_y.get(),
                         .m = s.m,
                         .n = s.n,
                         .k = s.k,
                         .ldy = ldy,
                         .dtype = t},
                   .y_dtype = DataType::kF32,
                   .bulk = bulk};
      ASSERT_EQ(GemvCuda(p, nullptr), KernelStatus::kOk);
      gpu_test::ExpectDeviceClean(nullptr);
      std::vector<float> ref(static_cast<size_t>(s.m) * ldy, 0.0f);
      ASSERT_EQ(GemmCpu({.x = x.data(),
                         .w = w.data(),
                         .bias = bias.data(),
                         .y = ref.data(),
                         .m = s.m,
                         .n = s.n,
                         .k = s.k,
                         .ldy = ldy}),
                KernelStatus::kOk);
      const std::vector<float> out = Decode(d_y.DownloadBytes(), DataType::kF32);
      const gpu_test::Diff d = gpu_test::CompareRows(out, ref, s.m, s.n, ldy);
      EXPECT_EQ(d.nonfinite, 0u);
      EXPECT_LE(d.rel, 5e-4) << DataTypeName(t) << ": " << gpu_test::ToString(d);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaGemvTest,
                         ::testing::Values(GemvShape{1, 768, 256, 0},        // demo qkv
                                           GemvShape{3, 4095, 256, 0},       // odd n (demo vocab)
                                           GemvShape{1, 2560, 10240, 0},     // Phi-2 fc2: k split
                                           GemvShape{4, 2560, 2560, 10240},  // dense + fc2
                                           GemvShape{8, 320, 384, 64},
                                           GemvShape{2, 51203, 264, 0},     // many blocks, odd n
                                           GemvShape{1, 1000, 2568, 1032},  // ragged k slices
                                           GemvShape{5, 33, 8, 8}));        // tiny k, both segments

// The two-segment case both GEMV sweeps below use: y[m, 300] = x·wᵀ + x2·w2ᵀ with k = 2568 +
// 1032 (450 16-byte chunks a row: ragged k slices, rows that divide into no stage or block), the
// inputs rounded to dtype t (Encode rounds the host copies in place, so the CPU reference sees
// what the kernel reads) and on the device.
struct TwoSegmentCase {
  static constexpr int n = 300, k = 2568, k2 = 1032;
  TwoSegmentCase(int m, uint32_t seed, DataType t) : m(m), t(t), ref(static_cast<size_t>(m) * n) {
    std::vector<float> x = RandomVector(static_cast<size_t>(m) * k, seed + m);
    std::vector<float> w = RandomVector(static_cast<size_t>(n) * k, seed + 1, -0.1f, 0.1f);
    std::vector<float> x2 = RandomVector(static_cast<size_t>(m) * k2, seed + 2 + m);
    std::vector<float> w2 = RandomVector(static_cast<size_t>(n) * k2, seed + 3, -0.1f, 0.1f);
    d_x = DeviceBuffer::From(Encode(x, t));
    d_w = DeviceBuffer::From(Encode(w, t));
    d_x2 = DeviceBuffer::From(Encode(x2, t));
    d_w2 = DeviceBuffer::From(Encode(w2, t));
    GemmParams pc{.x = x.data(), .w = w.data(), .y = ref.data(), .m = m, .n = n, .k = k};
    EXPECT_EQ(GemmCpu(pc), KernelStatus::kOk);
    pc.x = x2.data();
    pc.w = w2.data();
    pc.k = k2;
    pc.accumulate = true;
    EXPECT_EQ(GemmCpu(pc), KernelStatus::kOk);
  }
  // The GEMV of this case into y ([m, n] of dtype t); the caller adds the tuning.
  GemvParams Params(void* y) const {
    return GemvParams{
        .a = {.x = d_x.get(), .w = d_w.get(), .y = y, .m = m, .n = n, .k = k, .dtype = t},
        .x2 = d_x2.get(),
        .w2 = d_w2.get(),
        .k2 = k2,
        .y_dtype = t};
  }
  // y against the reference: finite, within one rounding of the float32 sum.
  void Check(const DeviceBuffer& y) const {
    const gpu_test::Diff d = Compare(Decode(y.DownloadBytes(), t), ref);
    EXPECT_EQ(d.nonfinite, 0u);
    EXPECT_LE(d.rel, OneRoundingTol(t)) << gpu_test::ToString(d);
  }
  int m;
  DataType t;
  std::vector<float> ref;
  DeviceBuffer d_x, d_w, d_x2, d_w2;
};

// The tuning overrides (GemvParams::ksplit, ::unroll) change only which warps load which chunks
// and how many loads a lane keeps in flight: every setting must match the CPU reference on a
// two-segment shape with ragged slices (k = 2568 + 1032: 450 chunks, not a multiple of any split)
// and m = 1 and 3. Tolerance: OneRoundingTol, one rounding of a float32 sum to the dtype.
TEST(CudaGemvTuning, EverySplitAndUnrollMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  for (int m : {1, 3}) {
    for (DataType t : kHalfTypes) {
      const TwoSegmentCase c(m, 11, t);
      for (int unroll : {4, 8}) {
        for (int ksplit : {1, 2, 4, 8}) {
          SCOPED_TRACE(testing::Message() << DataTypeName(t) << " m " << m << " ksplit " << ksplit
                                          << " unroll " << unroll);
          DeviceBuffer d_y(static_cast<size_t>(m) * c.n * DataTypeSize(t));
          d_y.Poison();
          GemvParams p = c.Params(d_y.get());
          p.ksplit = ksplit;
          p.unroll = unroll;
          ASSERT_EQ(GemvCuda(p, nullptr), KernelStatus::kOk);
          gpu_test::ExpectDeviceClean(nullptr);
          c.Check(d_y);
        }
      }
    }
  }
}

// The bulk kernel's tuning (GemvParams::bulk_*) changes the stage size (rows a stage, a power of
// two: 1 at a 1 KiB cap, 4 here at 48 KiB), the ring depth and the grid: every setting that fits
// in shared memory, launched plainly and as a programmatic dependent on a stream of its own, must
// match the CPU reference on a two-segment
// shape whose rows do not divide into the stages or blocks (n = 300, k = 2568 + 1032), at m = 1
// and 3. Tolerance: OneRoundingTol, one rounding of a float32 sum to the dtype.
TEST(CudaGemvBulk, EveryStageSizeDepthAndGridMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(DeviceStreamCreate(&stream), 0);
  for (int m : {1, 3}) {
    for (DataType t : kHalfTypes) {
      const TwoSegmentCase c(m, 21, t);
      for (int kb : {1, 16, 48}) {
        for (int stages : {1, 3, 8}) {
          for (int bps : {1, 2}) {
            for (bool pdl : {false, true}) {
              SCOPED_TRACE(testing::Message()
                           << DataTypeName(t) << " m " << m << " kb " << kb << " stages " << stages
                           << " blocks/SM " << bps << " pdl " << pdl);
              DeviceBuffer d_y(static_cast<size_t>(m) * c.n * DataTypeSize(t));
              d_y.Poison();
              GemvParams p = c.Params(d_y.get());
              p.programmatic_launch = pdl;
              p.bulk = true;
              p.bulk_stage_kb = kb;
              p.bulk_stages = stages;
              p.bulk_blocks_per_sm = bps;
              // The deepest rings of the biggest stages (4 rows of 7,200 bytes a stage at 48
              // KiB) do not fit in shared memory, two blocks an SM even less; one block with a
              // ring of <= 3 stages (<= 87 KB + 22 KB of x) always does.
              if (!GemvCudaSupports(p)) {
                ASSERT_FALSE(bps == 1 && stages <= 3) << "refused a plan that fits";
                continue;
              }
              ASSERT_EQ(GemvCuda(p, stream), KernelStatus::kOk);
              ASSERT_EQ(DeviceStreamSync(stream), 0);
              gpu_test::ExpectDeviceClean(stream);
              c.Check(d_y);
            }
          }
        }
      }
    }
  }
  DeviceStreamDestroy(stream);
}

// GemvParams::ln_weight: the bulk kernel applies LayerNorm to x's rows itself (the model's qkv,
// fc1 and LM head at one row). Reference: LayerNormCpu in float32, the normed rows rounded to the
// dtype (what LayerNormCuda stores and the kernel keeps in shared memory), then GemmCpu; x with a
// non-zero mean so the centring matters. Tolerance: OneRoundingTol for 16-bit outputs (the
// output's one rounding; a normed element whose float32 statistics differ in the last bit may
// round the other way, a change far below that), 5e-4 for float32 logits as above plus that.
TEST(CudaGemvBulk, LayerNormFoldedMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  struct Case {
    int m, n, k;
    GemmEpilogue epi;
    bool f32;
  };
  for (const Case& cs : {Case{1, 1000, 2560, GemmEpilogue::kNone, false},
                         Case{2, 777, 264, GemmEpilogue::kGeluTanh, false},
                         Case{1, 4095, 256, GemmEpilogue::kNone, true},
                         Case{3, 64, 80, GemmEpilogue::kGeluErf, false}}) {
    for (DataType t : kHalfTypes) {
      SCOPED_TRACE(testing::Message() << DataTypeName(t) << " m " << cs.m << " n " << cs.n << " k "
                                      << cs.k << " f32 " << cs.f32);
      const int ldx = cs.k + 16;
      std::vector<float> x = RandomVector(static_cast<size_t>(cs.m) * ldx, 31 + cs.k, -0.5f, 1.5f);
      std::vector<float> lw = RandomVector(cs.k, 32, 0.5f, 1.5f);
      std::vector<float> lb = RandomVector(cs.k, 33, -0.2f, 0.2f);
      std::vector<float> w = RandomVector(static_cast<size_t>(cs.n) * cs.k, 34, -0.1f, 0.1f);
      std::vector<float> bias = RandomVector(cs.n, 35);
      // Inputs as the device sees them (rounded), then the reference in float32.
      x = Decode(Encode(x, t), t);
      lw = Decode(Encode(lw, t), t);
      lb = Decode(Encode(lb, t), t);
      w = Decode(Encode(w, t), t);
      if (!cs.f32) bias = Decode(Encode(bias, t), t);
      std::vector<float> normed(static_cast<size_t>(cs.m) * cs.k);
      for (int r = 0; r < cs.m; ++r) {
        ASSERT_EQ(LayerNormCpu({.x = x.data() + static_cast<size_t>(r) * ldx,
                                .weight = lw.data(),
                                .bias = lb.data(),
                                .y = normed.data() + static_cast<size_t>(r) * cs.k,
                                .rows = 1,
                                .cols = cs.k,
                                .eps = 1e-5f}),
                  KernelStatus::kOk);
      }
      normed = Decode(Encode(normed, t), t);
      std::vector<float> ref(static_cast<size_t>(cs.m) * cs.n, 0.0f);
      ASSERT_EQ(GemmCpu({.x = normed.data(),
                         .w = w.data(),
                         .bias = bias.data(),
                         .y = ref.data(),
                         .m = cs.m,
                         .n = cs.n,
                         .k = cs.k}),
                KernelStatus::kOk);
      if (cs.epi == GemmEpilogue::kGeluTanh) {
        for (float& v : ref) v = GeluTanh(v);
      } else if (cs.epi == GemmEpilogue::kGeluErf) {
        for (float& v : ref) v = GeluErf(v);
      }
      const DataType yt = cs.f32 ? DataType::kF32 : t;
      DeviceBuffer d_x = DeviceBuffer::From(Encode(x, t));
      DeviceBuffer d_lw = DeviceBuffer::From(Encode(lw, t));
      DeviceBuffer d_lb = DeviceBuffer::From(Encode(lb, t));
      DeviceBuffer d_w = DeviceBuffer::From(Encode(w, t));
      DeviceBuffer d_b = DeviceBuffer::From(Encode(bias, yt));
      DeviceBuffer d_y(static_cast<size_t>(cs.m) * cs.n * DataTypeSize(yt));
      d_y.Poison();
      GemvParams p{.a = {.x = d_x.get(),
                         .w = d_w.get(),
                         .bias = d_b.get(),
                         .y = d_y.get(),
                         .m = cs.m,
                         .n = cs.n,
                         .k = cs.k,
                         .ldx = ldx,
                         .epilogue = cs.epi,
                         .dtype = t},
                   .y_dtype = yt,
                   .bulk = true,
                   .ln_weight = d_lw.get(),
                   .ln_bias = d_lb.get(),
                   .ln_eps = 1e-5f};
      ASSERT_TRUE(GemvCudaSupports(p));
      ASSERT_EQ(GemvCuda(p, nullptr), KernelStatus::kOk);
      gpu_test::ExpectDeviceClean(nullptr);
      const gpu_test::Diff d = Compare(Decode(d_y.DownloadBytes(), yt), ref);
      EXPECT_EQ(d.nonfinite, 0u);
      EXPECT_LE(d.rel, cs.f32 ? 5e-4 : OneRoundingTol(t)) << gpu_test::ToString(d);
    }
  }
}

TEST(CudaGemvErrors, RejectsWhatItCannotDo) {
  PHI_REQUIRE_GPU();
  DeviceBuffer buf(1 << 16);
  GemvParams p{.a = {.x = buf.get(),
                     .w = buf.get(),
                     .y = buf.get(),
                     .m = 9,
                     .n = 8,
                     .k = 16,
                     .dtype = DataType::kBF16},
               .y_dtype = DataType::kBF16};
  EXPECT_FALSE(GemvCudaSupports(p));
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kInvalidShape);  // m > kGemvMaxRows
  p.a.m = 2;
  p.a.k = 12;
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kInvalidShape);  // k not a multiple of 8
  p.a.k = 16;
  p.a.x = static_cast<char*>(buf.get()) + 2;
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kInvalidShape);  // x not 16-byte aligned
  p.a.x = buf.get();
  p.ksplit = 3;
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kInvalidShape);  // ksplit not a power of two
  p.ksplit = 0;
  p.unroll = 5;
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kInvalidShape);  // unroll not 4 or 8
  p.unroll = 0;
  p.a.accumulate = true;
  p.a.epilogue = GemmEpilogue::kGeluTanh;
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kInvalidShape);
  p.a.accumulate = false;
  p.a.dtype = DataType::kF32;
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kUnsupportedDtype);
  p.a.dtype = DataType::kBF16;
  p.a.w = nullptr;
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kNullPointer);
  p.a.w = buf.get();
  p.ln_weight = buf.get();
  p.ln_bias = buf.get();
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kInvalidShape);  // LayerNorm: bulk kernel only
  p.bulk = true;
  EXPECT_TRUE(GemvCudaSupports(p));
  p.x2 = buf.get();
  p.w2 = buf.get();
  p.k2 = 16;
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kInvalidShape);  // LayerNorm: one segment only
  p.x2 = p.w2 = p.ln_weight = p.ln_bias = nullptr;
  p.bulk_stages = 9;
  EXPECT_EQ(GemvCuda(p, nullptr), KernelStatus::kInvalidShape);  // ring deeper than 8
  p.bulk_stages = 0;
  p.a.k = 1 << 20;  // x rows and one stage row beyond shared memory
  p.a.n = 1;
  EXPECT_FALSE(GemvCudaSupports(p));
  gpu_test::ExpectDeviceClean(nullptr);
}

}  // namespace
}  // namespace phishard
