// The GEMM form of multi-LoRA (kernels/cuda/lora_gemm_cuda.h): LoraGatherCuda and LoraMaskCuda
// against host-built expectations (exact: they copy 16-bit words, or scale one float32 and round
// it once, which the host does identically), and CudaGemm's accumulate + GELU (kernels/gemm.h:
// y = act(y + x·wᵀ)) against a double reference.
//
// Gather: three slots with ranks 0 (module absent), 3 (not a multiple of 8: the element-wise B
// path), 8, 16 and 24 over six modules; two of them in a step at windows of width 24 and 16
// (the third slot is loaded but not in the step); destinations start as NaN bytes, and every
// element of each adapter window must be the adapter's value or an exact zero past its rank.
// Mask: rows of both adapters and base rows (-1), t NaN outside each row's window (never read).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/lora_gemm_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;

constexpr int kTargets = 6;
// Per slot, rank of each target (q, k, v, dense, fc1, fc2).
const int kRank[3][kTargets] = {{16, 3, 0, 8, 24, 16}, {8, 8, 8, 0, 8, 8}, {3, 16, 24, 16, 0, 8}};
// Module dims: in / out per target.
const int kIn[kTargets] = {64, 64, 64, 64, 64, 128};
const int kOut[kTargets] = {64, 32, 32, 64, 128, 64};

struct Adapters {
  std::vector<std::vector<uint16_t>> a, b;  // [slot * 6 + target]
  std::vector<float> scale;
  std::vector<DeviceBuffer> dev;
  std::vector<SgmvWeight> table;
};

Adapters MakeAdapters() {
  Adapters ad;
  ad.a.resize(3 * kTargets);
  ad.b.resize(3 * kTargets);
  ad.scale.assign(3 * kTargets, 0.0f);
  ad.table.assign(3 * kTargets, SgmvWeight{});
  for (int s = 0; s < 3; ++s) {
    for (int t = 0; t < kTargets; ++t) {
      const int e = s * kTargets + t, r = kRank[s][t];
      if (r == 0) continue;
      std::vector<float> a = RandomVector(static_cast<size_t>(r) * kIn[t], 100 + e);
      std::vector<float> b = RandomVector(static_cast<size_t>(kOut[t]) * r, 200 + e);
      std::vector<char> ab = Encode(a, DataType::kBF16), bb = Encode(b, DataType::kBF16);
      ad.a[e].resize(a.size());
      ad.b[e].resize(b.size());
      std::memcpy(ad.a[e].data(), ab.data(), ab.size());
      std::memcpy(ad.b[e].data(), bb.data(), bb.size());
      ad.dev.push_back(DeviceBuffer::From(ab));
      const void* da = ad.dev.back().get();
      ad.dev.push_back(DeviceBuffer::From(bb));
      ad.scale[e] = 0.5f + s + 0.25f * t;
      ad.table[e] = {da, ad.dev.back().get(), r, ad.scale[e]};
    }
  }
  return ad;
}

std::vector<uint16_t> Download16(const DeviceBuffer& b) {
  const std::vector<char> bytes = b.DownloadBytes();
  std::vector<uint16_t> v(bytes.size() / 2);
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

TEST(CudaLoraGemm, GatherBuildsConcatenatedMatricesWithZeroPadding) {
  PHI_REQUIRE_GPU();
  Adapters ad = MakeAdapters();
  DeviceBuffer table = DeviceBuffer::From(ad.table);
  // Step adapters: slot 2 at [0, 24), slot 0 at [24, 48): R = 48.
  const std::vector<LoraStepAdapter> step = {{2, 0, 24, 0}, {0, 24, 24, 0}};
  const int R = 48;
  DeviceBuffer steps = DeviceBuffer::From(step);
  // One A job per target (dst [R, in]) and one B job per target into [out, 2 R] at column R
  // (the model's residual layout), all destinations NaN-poisoned.
  std::vector<DeviceBuffer> dst;
  LoraGatherParams gp;
  for (int t = 0; t < kTargets; ++t) {
    dst.emplace_back(static_cast<size_t>(R) * kIn[t] * 2);
    dst.back().Poison();
    gp.jobs[gp.num_jobs++] = {dst.back().get(), false, t, kIn[t], 0, 0};
  }
  for (int t = 0; t < kTargets; ++t) {
    dst.emplace_back(static_cast<size_t>(kOut[t]) * 2 * R * 2);
    dst.back().Poison();
    gp.jobs[gp.num_jobs++] = {dst.back().get(), true, t, kOut[t], 2 * R, R};
  }
  gp.table = table.as<SgmvWeight>();
  gp.stride = kTargets;
  gp.num_slots = 3;
  gp.adapters = steps.as<LoraStepAdapter>();
  gp.num_adapters = 2;
  gp.max_width = 24;
  gp.dtype = DataType::kBF16;
  ASSERT_EQ(LoraGatherCuda(gp, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  int bad = 0;
  for (int t = 0; t < kTargets; ++t) {
    const std::vector<uint16_t> ga = Download16(dst[t]), gb = Download16(dst[kTargets + t]);
    for (const LoraStepAdapter& s : step) {
      const int e = s.slot * kTargets + t, r = kRank[s.slot][t];
      for (int k = 0; k < s.width; ++k) {
        for (int c = 0; c < kIn[t] && bad < 10; ++c) {
          const uint16_t want = k < r ? ad.a[e][static_cast<size_t>(k) * kIn[t] + c] : 0;
          const uint16_t got = ga[static_cast<size_t>(s.col + k) * kIn[t] + c];
          if (got != want) {
            ++bad;
            ADD_FAILURE() << "A target " << t << " slot " << s.slot << " [" << k << "][" << c
                          << "]: " << got << " want " << want;
          }
        }
        for (int j = 0; j < kOut[t] && bad < 10; ++j) {
          const uint16_t want = k < r ? ad.b[e][static_cast<size_t>(j) * r + k] : 0;
          const uint16_t got = gb[static_cast<size_t>(j) * 2 * R + R + s.col + k];
          if (got != want) {
            ++bad;
            ADD_FAILURE() << "B target " << t << " slot " << s.slot << " [" << j << "][" << k
                          << "]: " << got << " want " << want;
          }
        }
      }
    }
    // B columns [0, R) belong to no job here: still the poison.
    for (int j = 0; j < kOut[t] && bad < 10; ++j) {
      for (int k = 0; k < R; ++k) {
        const uint16_t got = gb[static_cast<size_t>(j) * 2 * R + k];
        if (got != 0xFFFF) {
          ++bad;
          ADD_FAILURE() << "B target " << t << " column " << k << " written outside the job";
        }
      }
    }
  }
}

TEST(CudaLoraGemm, MaskKeepsEachRowsOwnWindowScaledAndZeroesTheRest) {
  PHI_REQUIRE_GPU();
  Adapters ad = MakeAdapters();
  DeviceBuffer table = DeviceBuffer::From(ad.table);
  const std::vector<LoraStepAdapter> step = {{2, 0, 24, 0}, {0, 24, 24, 0}};
  // Row pitches padded by 8 (every offset a multiple of 8: the 8-columns-a-thread kernel) and by 9
  // (the one-column-a-thread kernel).
  for (int pad : {8, 9}) {
    SCOPED_TRACE("row pitch pad " + std::to_string(pad));
    const int R = 48, rows = 7, ld = 6 * R + pad;
    DeviceBuffer steps = DeviceBuffer::From(step);
    const std::vector<int32_t> row_adapter = {0, 0, -1, 1, 1, -1, 0};
    DeviceBuffer rmap = DeviceBuffer::From(row_adapter);
    // Block order of the model: q, k, v, fc1, dense, fc2.
    const int entries[6] = {0, 1, 2, 4, 3, 5};
    std::vector<float> t = RandomVector(static_cast<size_t>(rows) * ld, 5, -4.0f, 4.0f);
    for (int i = 0; i < rows; ++i) {
      for (int c = 0; c < 6 * R; ++c) {
        const int a = row_adapter[i], k = c % R - (a >= 0 ? step[a].col : 0);
        const int r = a >= 0 ? kRank[step[a].slot][entries[c / R]] : 0;
        if (a < 0 || k < 0 || k >= r) t[static_cast<size_t>(i) * ld + c] = testing_util::kNaN;
      }
    }
    DeviceBuffer tdev = DeviceBuffer::From(t);
    DeviceBuffer out(static_cast<size_t>(rows) * ld * 2);
    out.Poison();
    // The split form (hi, lo) into a second buffer of twice the width.
    const int lds = 12 * R + pad;
    DeviceBuffer split(static_cast<size_t>(rows) * lds * 2);
    split.Poison();
    for (int first : {0, 4, 10, 14}) {
      const bool sp = first >= 10;
      LoraMaskParams mp;
      mp.t = tdev.as<float>();
      mp.ldt = ld;
      mp.out = sp ? split.get() : out.get();
      mp.ldo = sp ? lds : ld;
      mp.split = sp;
      mp.row_adapter = rmap.as<int32_t>();
      mp.adapters = steps.as<LoraStepAdapter>();
      mp.num_adapters = 2;
      mp.table = table.as<SgmvWeight>();
      mp.stride = kTargets;
      mp.num_slots = 3;
      mp.rows = rows;
      mp.rank_cols = R;
      mp.first_block = first % 10;
      mp.num_blocks = first % 10 == 0 ? 4 : 2;
      for (int b = 0; b < 6; ++b) mp.entries[b] = entries[b];
      mp.dtype = DataType::kBF16;
      ASSERT_EQ(LoraMaskCuda(mp, nullptr), KernelStatus::kOk);
    }
    gpu_test::ExpectDeviceClean(nullptr);
    const std::vector<uint16_t> got = Download16(out);
    int bad = 0;
    for (int i = 0; i < rows && bad < 10; ++i) {
      for (int c = 0; c < ld && bad < 10; ++c) {
        const size_t at = static_cast<size_t>(i) * ld + c;
        uint16_t want = 0xFFFF;  // past the module blocks: untouched
        if (c < 6 * R) {
          want = 0;
          const int a = row_adapter[i];
          if (a >= 0) {
            const int k = c % R - step[a].col, e = step[a].slot * kTargets + entries[c / R];
            if (k >= 0 && k < kRank[step[a].slot][entries[c / R]]) {
              want = FloatToBF16(t[at] * ad.scale[e]);
            }
          }
        }
        if (got[at] != want) {
          ++bad;
          ADD_FAILURE() << "T[" << i << "][" << c << "]: " << got[at] << " want " << want;
        }
      }
    }
    const std::vector<uint16_t> gs = Download16(split);
    for (int i = 0; i < rows && bad < 10; ++i) {
      for (int c = 0; c < 6 * R && bad < 10; ++c) {
        const int a = row_adapter[i], b = c / R;
        float v = 0.0f;
        if (a >= 0) {
          const int k = c % R - step[a].col, e = step[a].slot * kTargets + entries[b];
          if (k >= 0 && k < kRank[step[a].slot][entries[b]]) {
            v = t[static_cast<size_t>(i) * ld + c] * ad.scale[e];
          }
        }
        const uint16_t hi = FloatToBF16(v), lo = FloatToBF16(v - BF16ToFloat(hi));
        const size_t at = static_cast<size_t>(i) * lds + 2 * b * R + c % R;
        if (gs[at] != hi || gs[at + R] != lo) {
          ++bad;
          ADD_FAILURE() << "split T[" << i << "][" << c << "]: " << gs[at] << ", " << gs[at + R]
                        << " want " << hi << ", " << lo;
        }
      }
    }
  }
}

// y = GELU-tanh(y0 + x·wᵀ) in bf16 (the fc1 expand of the GEMM form): the fused epilogue when
// the probe found it to act on the accumulated sum, else the product then the activation
// kernel. Tolerance: float32 accumulation of k = 48 products (negligible), |gelu'| <= 1.13 times
// y0's exactness (y0 is bf16, exact), and the two roundings on the unfused path (the sum to bf16,
// then the GELU output): 1.13 x unit x |pre| + unit x |out| with unit = 2^-8.
TEST(CudaLoraGemm, AccumulateWithGeluActsOnTheSum) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaGemm> gemm;
  ASSERT_EQ(CudaGemm::Create(size_t{4} << 20, &gemm), KernelStatus::kOk);
  std::printf(
      "cuBLASLt GELU epilogue: tanh %d (probe err %.3g), acts on the accumulated sum %d (wide "
      "probe err / tol %.3g)\n",
      gemm->gelu_tanh_in_epilogue(), gemm->probe_err_tanh(), gemm->gelu_accumulate_in_epilogue(),
      gemm->probe_accumulate_err());
  const int m = 37, n = 200, k = 48, ldx = 6 * 48, ldy = 256;
  std::vector<float> x = RandomVector(static_cast<size_t>(m) * ldx, 1, -0.5f, 0.5f);
  std::vector<float> w = RandomVector(static_cast<size_t>(n) * k, 2, -0.5f, 0.5f);
  // Pre-activations up to |20| (a strong adapter moves fc1's far out).
  std::vector<float> y0 = RandomVector(static_cast<size_t>(m) * ldy, 3, -20.0f, 20.0f);
  std::vector<char> xb = Encode(x, DataType::kBF16), wb = Encode(w, DataType::kBF16);
  std::vector<char> yb = Encode(y0, DataType::kBF16);
  DeviceBuffer dx = DeviceBuffer::From(xb), dw = DeviceBuffer::From(wb),
               dy = DeviceBuffer::From(yb);
  GemmParams p{.x = dx.get(),
               .w = dw.get(),
               .y = dy.get(),
               .m = m,
               .n = n,
               .k = k,
               .ldx = ldx,
               .ldy = ldy,
               .accumulate = true,
               .epilogue = GemmEpilogue::kGeluTanh,
               .dtype = DataType::kBF16};
  ASSERT_EQ(gemm->Run(p, nullptr), KernelStatus::kOk) << gemm->last_error();
  gpu_test::ExpectDeviceClean(nullptr);
  const std::vector<float> got = gpu_test::Decode(dy.DownloadBytes(), DataType::kBF16);
  int bad = 0;
  for (int i = 0; i < m && bad < 10; ++i) {
    for (int j = 0; j < ldy && bad < 10; ++j) {
      const size_t at = static_cast<size_t>(i) * ldy + j;
      if (j >= n) {
        if (got[at] != y0[at]) {
          ++bad;
          ADD_FAILURE() << "y[" << i << "][" << j << "] outside the window changed";
        }
        continue;
      }
      double pre = y0[at];
      for (int q = 0; q < k; ++q) {
        pre += static_cast<double>(x[static_cast<size_t>(i) * ldx + q]) * w[j * k + q];
      }
      const double want =
          0.5 * pre * (1 + std::tanh(std::sqrt(2 / M_PI) * (pre + 0.044715 * pre * pre * pre)));
      const double tol = 1.13 * std::fabs(pre) / 256 + std::fabs(want) / 256 + 1e-5;
      if (!(std::fabs(got[at] - want) <= tol)) {
        ++bad;
        ADD_FAILURE() << "y[" << i << "][" << j << "]: " << got[at] << " want " << want << " (pre "
                      << pre << ")";
      }
    }
  }
}

}  // namespace
}  // namespace phishard
