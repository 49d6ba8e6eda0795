// The GEMM form of multi-LoRA (kernels/cuda/lora_gemm_cuda.h): LoraGatherCuda and LoraMaskCuda
// against host-built expectations (exact: they copy 16-bit words, or scale one float32 and round
// it once, which the host does identically). CudaGemm's accumulate + GELU (kernels/gemm.h:
// y = act(y + x·wᵀ)) that the fc1 expand relies on is checked in cuda_gemm_accumulate_gelu_test.cc.
//
// Gather: three slots with ranks 0 (module absent), 3 (not a multiple of 8: the element-wise B
// path), 8, 16 and 24 over six modules; two of them in a step at windows of width 24 and 16
// (the third slot is loaded but not in the step); destinations start as NaN bytes, and every
// element of each adapter window must be the adapter's value or an exact zero past its rank.
// Mask: rows of both adapters and base rows (-1), t NaN outside each row's window (never read).
// Segmented expands: gather (per-adapter B layout) + compact mask + one GEMM per segment against
// a double reference, for uneven segments, ranks 8 / 16 / 64 (and 3), base rows between segments
// and one adapter in two segments.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
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

// A gather from the 3-slot table `table` ([3, kTargets] SgmvWeight, device) for the step's
// adapters `steps` ([num_adapters] LoraStepAdapter, device), windows up to max_width wide, bf16;
// the caller adds the jobs.
LoraGatherParams StepGather(const DeviceBuffer& table, const DeviceBuffer& steps, int num_adapters,
                            int max_width) {
  LoraGatherParams gp;
  gp.table = table.as<SgmvWeight>();
  gp.stride = kTargets;
  gp.num_slots = 3;
  gp.adapters = steps.as<LoraStepAdapter>();
  gp.num_adapters = num_adapters;
  gp.max_width = max_width;
  gp.dtype = DataType::kBF16;
  return gp;
}

// The rows of a segmented step from runs of (index into `step`, or -1 for base rows; row count):
// each row's adapter, and one segment per adapter run (its rows and its adapter's rank window).
struct StepRows {
  std::vector<int32_t> row_adapter;
  std::vector<LoraSegment> segs;
};

StepRows MakeStepRows(const std::vector<LoraStepAdapter>& step,
                      const std::vector<std::pair<int, int>>& runs) {
  StepRows sr;
  for (const auto& [a, n] : runs) {
    if (a >= 0) {
      sr.segs.push_back({static_cast<int>(sr.row_adapter.size()), n, step[a].col, step[a].width});
    }
    sr.row_adapter.insert(sr.row_adapter.end(), n, a);
  }
  return sr;
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
  LoraGatherParams gp = StepGather(table, steps, 2, 24);
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
  // One chunk a thread (the other launch shape): the same words everywhere, poison included.
  std::vector<std::vector<uint16_t>> first;
  for (DeviceBuffer& d : dst) {
    first.push_back(Download16(d));
    d.Poison();
  }
  gp.chunks_per_thread = 1;
  ASSERT_EQ(LoraGatherCuda(gp, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  for (size_t i = 0; i < dst.size(); ++i) {
    EXPECT_EQ(Download16(dst[i]), first[i]) << "destination " << i << ", one chunk a thread";
  }
  gp.chunks_per_thread = 4;
  EXPECT_EQ(LoraGatherCuda(gp, nullptr), KernelStatus::kInvalidShape);
}

// index_mul (the merged q / k / v expand's B, model/cuda_lora_gemm.cc): adapter a's part at a
// fixed pitch a x index_mul whatever the widths (24 and 16 here, so the concatenated col_a = 24
// would land elsewhere), col_mul 0; everything outside the parts stays the poison, and the
// columns / rows past a module's rank inside a part are exact zeros.
TEST(CudaLoraGemm, GatherPlacesAdaptersAtAFixedPitchWithIndexMul) {
  PHI_REQUIRE_GPU();
  Adapters ad = MakeAdapters();
  DeviceBuffer table = DeviceBuffer::From(ad.table);
  const std::vector<LoraStepAdapter> step = {{2, 0, 24, 0}, {1, 24, 16, 0}};
  DeviceBuffer steps = DeviceBuffer::From(step);
  constexpr int kPitch = 56, kBase = 8, kCols = 2 * kPitch;  // part a: kBase + a kPitch + width_a
  std::vector<DeviceBuffer> dst;
  LoraGatherParams gp;
  for (int t = 0; t < kTargets; ++t) {
    dst.emplace_back(static_cast<size_t>(kOut[t]) * kCols * 2);
    dst.back().Poison();
    gp.jobs[gp.num_jobs++] = {dst.back().get(), true, t, kOut[t], kCols, kBase, 0, 1, kPitch};
  }
  for (int t = 0; t < kTargets; ++t) {  // A: rows kBase + a kPitch + width_a + k of [kCols, in]
    dst.emplace_back(static_cast<size_t>(kCols) * kIn[t] * 2);
    dst.back().Poison();
    gp.jobs[gp.num_jobs++] = {dst.back().get(), false, t, kIn[t], 0, kBase, 0, 1, kPitch};
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
    const std::vector<uint16_t> gb = Download16(dst[t]), ga = Download16(dst[kTargets + t]);
    // Expected word of part-relative index k (column of B row j / row of A, column c) or poison.
    for (int col = 0; col < kCols; ++col) {
      int a = -1, k = 0;
      for (int i = 0; i < 2; ++i) {
        const int first = kBase + i * kPitch + step[i].width;
        if (col >= first && col < first + step[i].width) a = i, k = col - first;
      }
      const int e = a < 0 ? 0 : step[a].slot * kTargets + t;
      const int r = a < 0 ? 0 : kRank[step[a].slot][t];
      for (int j = 0; j < kOut[t] && bad < 10; ++j) {
        const uint16_t want = a < 0   ? 0xFFFF
                              : k < r ? ad.b[e][static_cast<size_t>(j) * kRank[step[a].slot][t] + k]
                                      : 0;
        const uint16_t got = gb[static_cast<size_t>(j) * kCols + col];
        if (got != want) {
          ++bad;
          ADD_FAILURE() << "B target " << t << " [" << j << "][" << col << "]: " << got << " want "
                        << want;
        }
      }
      for (int c = 0; c < kIn[t] && bad < 10; ++c) {
        const uint16_t want = a < 0   ? 0xFFFF
                              : k < r ? ad.a[e][static_cast<size_t>(k) * kIn[t] + c]
                                      : 0;
        const uint16_t got = ga[static_cast<size_t>(col) * kIn[t] + c];
        if (got != want) {
          ++bad;
          ADD_FAILURE() << "A target " << t << " [" << col << "][" << c << "]: " << got << " want "
                        << want;
        }
      }
    }
  }
  gp.jobs[0].index_mul = 4;  // not a multiple of 8
  EXPECT_EQ(LoraGatherCuda(gp, nullptr), KernelStatus::kInvalidShape);
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

// The compact mask's parameters as GemmMask sets them up for a segmented step: t [rows, ldt]
// float32 -> out [rows, ldo] 16-bit hi | lo, each row's adapter from row_adapter / steps / table
// (3 slots), model blocks q, k, v, fc1, dense, fc2 at table entries `entries`, each block's output
// at column min(b, 4) x 2W (fc2 in dense's part, slot 1), bf16.
LoraMaskParams CompactMask(const float* t, int ldt, void* out, int ldo, const int32_t* row_adapter,
                           const DeviceBuffer& steps, int num_adapters, const DeviceBuffer& table,
                           int rows, int R, int W, const int entries[6]) {
  constexpr int tw = 2;  // hi and lo
  LoraMaskParams mp;
  mp.t = t;
  mp.ldt = ldt;
  mp.out = out;
  mp.ldo = ldo;
  mp.split = true;
  mp.row_adapter = row_adapter;
  mp.adapters = steps.as<LoraStepAdapter>();
  mp.num_adapters = num_adapters;
  mp.table = table.as<SgmvWeight>();
  mp.stride = kTargets;
  mp.num_slots = 3;
  mp.rows = rows;
  mp.rank_cols = R;
  mp.compact = true;
  mp.compact_width = W;
  for (int b = 0; b < 6; ++b) {
    mp.entries[b] = entries[b];
    mp.out_block_col[b] = std::min(b, 4) * tw * W;
    mp.out_block_slot[b] = b == 5 ? 1 : 0;
  }
  mp.dtype = DataType::kBF16;
  return mp;
}

// The segmented expand path end to end (what the model runs per layer on a segmented step):
// B gathered per adapter (col_mul = parts), T masked compact and split (hi + lo), then
// LoraSegmentExpandCuda for q (no activation), fc1 (GELU-tanh, the model's AfterFc1) and the
// residual (dense and fc2 as one K = 4 width GEMM), against a double reference
// y0 + sum_k t[i, k] scale B[j, k]. Tolerance: T carries t x scale to ~2^-16 relative (hi + lo),
// B is exact, float32 accumulation, then y rounds to bf16: |want| / 256 (one rounding: bf16's
// unit roundoff is 2^-8) + 2^-12 x sum |terms| (the hi + lo residue and float32 sums). For fc1
// (the GELU epilogue) that is all, plus the GELU's slope (<= 1.13) times that rounding of the
// pre-activation, as AccumulateWithGeluActsOnTheSum. q and the residual (cuBLASLt's default
// epilogue, beta = 1) also get |delta| / 256: on the H200 that epilogue returns
// round(y0 + round(T · Bᵀ)), the product rounded to bf16 before the sum (lora6 runs 1-2,
// 2026-11-29: all its algorithms were the tensor-op algo 66, split-K 1; a CPU emulation of
// exactly that reproduced every printed worst error and failure count), so the hi + lo split
// buys the one-rounding result for fc1 only. peft computes the delta in bf16 and adds it to the
// bf16 base output, so it rounds the product before the sum too (exact float32 accumulation was
// measured slower and not closer to the goldens: perf-log 2026-11-29 01:11). Rows of no segment
// must keep y0 bit for bit.
TEST(CudaLoraGemm, SegmentedExpandsMatchNaiveReference) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaGemm> gemm;
  ASSERT_EQ(CudaGemm::Create(size_t{4} << 20, &gemm), KernelStatus::kOk);
  // Slots: ranks per target (q, k, v, dense, fc1, fc2). Slot 2 has no fc2 and a rank-3 q.
  const int rank[3][kTargets] = {
      {8, 8, 8, 8, 8, 8}, {16, 16, 16, 16, 16, 16}, {3, 64, 64, 64, 64, 0}};
  int out[kTargets] = {40, 32, 32, 64, 128, 64};     // q, k, v, dense (H), fc1 (I), fc2 (H)
  std::vector<std::vector<float>> bf(3 * kTargets);  // B as the bf16 values, float
  std::vector<float> scale(3 * kTargets, 0.0f);
  std::vector<DeviceBuffer> mem;
  DeviceBuffer table;
  auto make_slots = [&] {  // B of every slot at the current `out` dims
    std::vector<SgmvWeight> tab(3 * kTargets);
    mem.clear();
    for (int s = 0; s < 3; ++s) {
      for (int t = 0; t < kTargets; ++t) {
        const int e = s * kTargets + t, r = rank[s][t];
        if (r == 0) continue;
        std::vector<float> b = RandomVector(static_cast<size_t>(out[t]) * r, 300 + e);
        std::vector<char> bb = Encode(b, DataType::kBF16);
        bf[e] = gpu_test::Decode(bb, DataType::kBF16);
        mem.push_back(DeviceBuffer::From(bb));
        scale[e] = 0.25f + 0.5f * s + 0.125f * t;
        // A is not read by the expands: any valid pointer.
        tab[e] = {mem.back().get(), mem.back().get(), r, scale[e]};
      }
    }
    table = DeviceBuffer::From(tab);
  };
  make_slots();
  gemm->RequireFloat32SplitK();  // as the model sets it up
  // Rows i with i % row_step == 0 (and the last) are compared (the Phi-2-sized step checks a
  // sample: its full double reference would take seconds).
  auto check_step = [&](const char* label, const std::vector<LoraStepAdapter>& step, int W,
                        const std::vector<std::pair<int, int>>& runs, int row_step) {
    SCOPED_TRACE(label);
    int R = 0;
    for (const LoraStepAdapter& a : step) R = std::max(R, a.col + a.width);
    const int tw = 2;
    DeviceBuffer steps = DeviceBuffer::From(step);
    const StepRows sr = MakeStepRows(step, runs);
    const std::vector<int32_t>& row_adapter = sr.row_adapter;
    const std::vector<LoraSegment>& segs = sr.segs;
    const int rows = static_cast<int>(row_adapter.size());
    DeviceBuffer rmap = DeviceBuffer::From(row_adapter);
    // t in the concatenated shrink layout (block b at b R; model block order q, k, v, fc1, dense,
    // fc2), NaN outside each row's rank window (never read).
    const int entries[6] = {0, 1, 2, 4, 3, 5};
    const int ldt = 6 * R;
    std::vector<float> t = RandomVector(static_cast<size_t>(rows) * ldt, 7, -2.0f, 2.0f);
    for (int i = 0; i < rows; ++i) {
      for (int c = 0; c < ldt; ++c) {
        const int a = row_adapter[i], k = c % R - (a >= 0 ? step[a].col : 0);
        const int r = a >= 0 ? rank[step[a].slot][entries[c / R]] : 0;
        if (a < 0 || k < 0 || k >= r) t[static_cast<size_t>(i) * ldt + c] = testing_util::kNaN;
      }
    }
    DeviceBuffer tdev = DeviceBuffer::From(t);
    const int ldo = 6 * tw * W + 8;
    DeviceBuffer tm(static_cast<size_t>(rows) * ldo * 2);
    tm.Poison();
    LoraMaskParams mp = CompactMask(tdev.as<float>(), ldt, tm.get(), ldo, rmap.as<int32_t>(), steps,
                                    static_cast<int>(step.size()), table, rows, R, W, entries);
    mp.first_block = 0;
    mp.num_blocks = 4;
    ASSERT_EQ(LoraMaskCuda(mp, nullptr), KernelStatus::kOk);
    mp.first_block = 4;
    mp.num_blocks = 2;
    ASSERT_EQ(LoraMaskCuda(mp, nullptr), KernelStatus::kOk);
    // B: q [40, tw R], fc1 [128, tw R], residual [64, 2 tw R] (dense parts then fc2 parts).
    DeviceBuffer bq(static_cast<size_t>(out[0]) * tw * R * 2),
        bf1(static_cast<size_t>(out[4]) * tw * R * 2),
        bres(static_cast<size_t>(out[3]) * 2 * tw * R * 2);
    bq.Poison();
    bf1.Poison();
    bres.Poison();
    LoraGatherParams gp = StepGather(table, steps, static_cast<int>(step.size()), W);
    for (int h = 0; h < tw; ++h) {
      gp.jobs[gp.num_jobs++] = {bq.get(), true, 0, out[0], tw * R, 0, tw, h};
      gp.jobs[gp.num_jobs++] = {bf1.get(), true, 4, out[4], tw * R, 0, tw, h};
      gp.jobs[gp.num_jobs++] = {bres.get(), true, 3, out[3], 2 * tw * R, 0, 2 * tw, h};
      gp.jobs[gp.num_jobs++] = {bres.get(), true, 5, out[5], 2 * tw * R, 0, 2 * tw, tw + h};
    }
    ASSERT_EQ(LoraGatherCuda(gp, nullptr), KernelStatus::kOk);
    // Outputs: y0 bf16 in a wider row (q at the start of a q | k | v row as in the model, the
    // others n + 8 wide), pre-activations up to |8| for fc1.
    struct Case {
      const char* name;
      int t_block;  // model block of T (q 0, fc1 3, residual 4)
      int parts;
      const DeviceBuffer* b;
      int ldb;
      int n;
      int ldy;
      std::vector<int> targets;  // summed terms
      GemmEpilogue act;
    };
    const std::vector<Case> cases = {
        {"q", 0, tw, &bq, tw * R, out[0], out[0] + out[1] + out[2], {0}, GemmEpilogue::kNone},
        {"fc1", 3, tw, &bf1, tw * R, out[4], out[4] + 8, {4}, GemmEpilogue::kGeluTanh},
        {"residual",
         4,
         2 * tw,
         &bres,
         2 * tw * R,
         out[3],
         out[3] + 8,
         {3, 5},
         GemmEpilogue::kNone}};
    // accumulate = false (CudaLora's deltas first): y = T · Bᵀ on the segments' rows, one bf16
    // rounding of the float sum, rows outside untouched; without the activation (the model's base
    // GEMM applies it after adding its product).
    for (const bool acc : {true, false})
      for (const Case& cs : cases) {
        if (!acc && cs.act != GemmEpilogue::kNone) continue;
        SCOPED_TRACE(std::string(cs.name) + (acc ? "" : " (no accumulate)"));
        const int ldy = cs.ldy;
        std::vector<float> y0 =
            RandomVector(static_cast<size_t>(rows) * ldy, 11 + cs.t_block, -8.0f, 8.0f);
        const std::vector<char> y0b = Encode(y0, DataType::kBF16);
        y0 = gpu_test::Decode(y0b, DataType::kBF16);
        DeviceBuffer y = DeviceBuffer::From(y0b);
        const KernelStatus st =
            LoraSegmentExpandCuda(*gemm,
                                  {.t = tm.get(),
                                   .ldt = ldo,
                                   .t_col = cs.t_block * tw * W,
                                   .b = cs.b->get(),
                                   .ldb = cs.ldb,
                                   .y = y.get(),
                                   .ldy = ldy,
                                   .n = cs.n,
                                   .parts = cs.parts,
                                   .segments = segs.data(),
                                   .num_segments = static_cast<int>(segs.size()),
                                   .act = cs.act,
                                   .dtype = DataType::kBF16,
                                   .accumulate = acc},
                                  nullptr);
        ASSERT_EQ(st, KernelStatus::kOk) << gemm->last_error();
        gpu_test::ExpectDeviceClean(nullptr);
        const std::vector<float> got = gpu_test::Decode(y.DownloadBytes(), DataType::kBF16);
        std::vector<int> bad(step.size(), 0);
        int untouched_bad = 0;
        double worst = 0.0;  // |error| / tolerance
        for (int i = 0; i < rows; ++i) {
          if (i % row_step != 0 && i != rows - 1) continue;
          const int a = row_adapter[i];
          for (int j = 0; j < ldy; ++j) {
            const size_t at = static_cast<size_t>(i) * ldy + j;
            if (a < 0 || j >= cs.n) {
              if (!(got[at] == y0[at]) && ++untouched_bad <= 3) {
                ADD_FAILURE() << "y[" << i << "][" << j
                              << "] outside the segments changed: " << got[at] << " was " << y0[at];
              }
              continue;
            }
            double pre = acc ? y0[at] : 0.0, mag = 0.0;
            for (int target : cs.targets) {
              const int slot = step[a].slot, e = slot * kTargets + target, r = rank[slot][target];
              const int tb = target == 3 ? 4 : target == 5 ? 5 : cs.t_block;
              for (int k = 0; k < r; ++k) {
                const double term =
                    static_cast<double>(
                        t[static_cast<size_t>(i) * ldt + tb * R + step[a].col + k]) *
                    scale[e] * bf[e][static_cast<size_t>(j) * r + k];
                pre += term;
                mag += std::fabs(term);
              }
            }
            double want = pre, tol = std::fabs(pre) / 256 + mag / 4096 + 1e-5;
            if (cs.act == GemmEpilogue::kGeluTanh) {
              want = testing_util::NaiveGeluTanh(pre);
              tol = 1.13 * tol + std::fabs(want) / 256;
            } else if (acc) {
              tol += std::fabs(pre - y0[at]) / 256;  // the default epilogue's rounded product
            }
            const double err = std::fabs(got[at] - want);
            worst = std::isfinite(err) ? std::max(worst, err / tol) : INFINITY;
            if (!(err <= tol) && ++bad[a] <= 3) {
              ADD_FAILURE() << "y[" << i << "][" << j << "] (adapter " << a << "): " << got[at]
                            << " want " << want << " tol " << tol;
            }
          }
        }
        std::string fails;
        for (int f : bad) fails.append(" ").append(std::to_string(f));
        std::printf("%s, %s%s: worst |err| / tol %.3f, failures per adapter%s; last GEMM: %s\n",
                    label, cs.name, acc ? "" : " (no accumulate)", worst, fails.c_str(),
                    gemm->last_plan_info().c_str());
      }
  };
  // Slot 1 at [0, 16), slot 2 at [16, 80), slot 0 at [80, 88); rows: adapter 1 x 37, base x 5,
  // adapter 0 x 130, adapter 2 x 3, base x 11, adapter 1 x 64 (uneven: one GEMM a segment).
  check_step("uneven segments", {{1, 0, 16, 0}, {2, 16, 64, 0}, {0, 80, 8, 0}}, 64,
             {{1, 37}, {-1, 5}, {0, 130}, {2, 3}, {-1, 11}, {1, 64}}, 1);
  // Equal segments in rank-axis order (one strided-batched GEMM for the first three; slot 0 in
  // two windows, which the kernels allow), then base rows, a repeat and a rank-64 segment.
  check_step("equal segments", {{0, 0, 16, 0}, {1, 16, 16, 0}, {0, 32, 16, 0}, {2, 48, 64, 0}}, 64,
             {{0, 40}, {1, 40}, {2, 40}, {-1, 7}, {0, 40}, {3, 9}}, 1);
  // The bench's Phi-2 prefill: 8 sequences of 512 rows, each its own rank-16 adapter (slot 1 in
  // eight windows), q / k / v 2560 wide in a 7680-wide qkv row (here q's window at its start),
  // fc1 10240, the residual 2560: one strided-batched GEMM of 8 per module.
  out[0] = out[1] = out[2] = out[3] = out[5] = 2560;
  out[4] = 10240;
  make_slots();
  std::vector<LoraStepAdapter> phi2;
  std::vector<std::pair<int, int>> phi2_runs;
  for (int a = 0; a < 8; ++a) {
    phi2.push_back({1, 16 * a, 16, 0});
    phi2_runs.push_back({a, 512});
  }
  check_step("phi-2 prefill 8 x 512", phi2, 16, phi2_runs, 61);
}

// The segmented shrink path (what the model runs per layer on a segmented step): A_qkvf
// gathered with each adapter's q, k, v, fc1 blocks side by side (col_mul 4), A_dense / A_fc2 as
// concatenated, one GEMM per segment (a strided batch for the equal run) into a NaN-poisoned
// float32 t, then the compact mask reading that layout (t_block_slot), against a double
// reference scale x · A_aᵀ per row and block. Tolerance: bf16 products are exact in float32 and
// K <= 128 float32 additions err by <= 128 x 2^-24 of sum |terms| (2^-14 used), hi + lo carries
// the scaled value to 2^-17 relative (2^-16 used); a wrong adapter, block or row is off by O(1).
// Rows of no segment must keep t's NaN (nothing writes them); columns past a rank are exact 0.
TEST(CudaLoraGemm, SegmentedShrinksMatchNaiveReference) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaGemm> gemm;
  ASSERT_EQ(CudaGemm::Create(size_t{4} << 20, &gemm), KernelStatus::kOk);
  Adapters ad = MakeAdapters();
  DeviceBuffer table = DeviceBuffer::From(ad.table);
  // Slot 0 at [0, 24), slot 2 at [24, 48), slot 1 at [48, 56): W = 24, R = 56. Rows: slot 0 x 20
  // and slot 2 x 20 (an equal run: one batched GEMM), base x 5, slot 1 x 13, slot 0 again x 7.
  const std::vector<LoraStepAdapter> step = {{0, 0, 24, 0}, {2, 24, 24, 0}, {1, 48, 8, 0}};
  const int W = 24, R = 56;
  const std::vector<std::pair<int, int>> runs = {{0, 20}, {1, 20}, {-1, 5}, {2, 13}, {0, 7}};
  DeviceBuffer steps = DeviceBuffer::From(step);
  const StepRows sr = MakeStepRows(step, runs);
  const std::vector<int32_t>& row_adapter = sr.row_adapter;
  const std::vector<LoraSegment>& segs = sr.segs;
  const int rows = static_cast<int>(row_adapter.size());
  DeviceBuffer rmap = DeviceBuffer::From(row_adapter);
  // Inputs: the LayerNorm output (q, k, v, fc1: in 64), attention output (dense: 64), MLP
  // activation (fc2: 128), bf16.
  const int in_x = kIn[0], in_attn = kIn[3], in_mlp = kIn[5];
  std::vector<float> x[3] = {RandomVector(static_cast<size_t>(rows) * in_x, 31),
                             RandomVector(static_cast<size_t>(rows) * in_attn, 32),
                             RandomVector(static_cast<size_t>(rows) * in_mlp, 33)};
  std::vector<DeviceBuffer> xdev;
  for (std::vector<float>& v : x) {
    const std::vector<char> b = Encode(v, DataType::kBF16);
    v = gpu_test::Decode(b, DataType::kBF16);
    xdev.push_back(DeviceBuffer::From(b));
  }
  DeviceBuffer a_qkvf(static_cast<size_t>(4) * R * in_x * 2),
      a_dense(static_cast<size_t>(R) * in_attn * 2), a_fc2(static_cast<size_t>(R) * in_mlp * 2);
  a_qkvf.Poison();
  a_dense.Poison();
  a_fc2.Poison();
  // Model block order q, k, v, fc1, dense, fc2 -> targets (q, k, v, dense, fc1, fc2).
  const int entries[6] = {0, 1, 2, 4, 3, 5};
  LoraGatherParams gp = StepGather(table, steps, static_cast<int>(step.size()), W);
  for (int b = 0; b < 4; ++b) {
    gp.jobs[gp.num_jobs++] = {a_qkvf.get(), false, entries[b], in_x, 0, 0, 4, b};
  }
  gp.jobs[gp.num_jobs++] = {a_dense.get(), false, 3, in_attn, 0, 0};
  gp.jobs[gp.num_jobs++] = {a_fc2.get(), false, 5, in_mlp, 0, 0};
  ASSERT_EQ(LoraGatherCuda(gp, nullptr), KernelStatus::kOk);
  const int ldt = 6 * W;
  DeviceBuffer t(static_cast<size_t>(rows) * ldt * sizeof(float));
  t.Poison();
  const struct {
    const DeviceBuffer* x;
    int in;
    const DeviceBuffer* a;
    int blocks, t_col;
  } shrinks[3] = {{&xdev[0], in_x, &a_qkvf, 4, 0},
                  {&xdev[1], in_attn, &a_dense, 1, 4 * W},
                  {&xdev[2], in_mlp, &a_fc2, 1, 5 * W}};
  for (const auto& sh : shrinks) {
    ASSERT_EQ(LoraSegmentShrinkCuda(*gemm,
                                    {.x = sh.x->get(),
                                     .ldx = sh.in,
                                     .k = sh.in,
                                     .a = sh.a->get(),
                                     .blocks = sh.blocks,
                                     .t = t.as<float>(),
                                     .ldt = ldt,
                                     .t_col = sh.t_col,
                                     .segments = segs.data(),
                                     .num_segments = static_cast<int>(segs.size()),
                                     .dtype = DataType::kBF16},
                                    nullptr),
              KernelStatus::kOk)
        << gemm->last_error();
  }
  gpu_test::ExpectDeviceClean(nullptr);
  const std::vector<char> tbytes = t.DownloadBytes();
  std::vector<float> tv(tbytes.size() / sizeof(float));
  std::memcpy(tv.data(), tbytes.data(), tbytes.size());
  int base_written = 0;
  for (int i = 0; i < rows; ++i) {
    for (int c = 0; c < ldt && row_adapter[i] < 0; ++c) {
      base_written += !std::isnan(tv[static_cast<size_t>(i) * ldt + c]);
    }
  }
  EXPECT_EQ(base_written, 0) << "t of base rows was written";
  // The compact mask over that t (hi + lo), as GemmMask sets it up.
  const int tw = 2, ldo = 6 * tw * W + 8;
  DeviceBuffer tm(static_cast<size_t>(rows) * ldo * 2);
  tm.Poison();
  LoraMaskParams mp = CompactMask(t.as<float>(), ldt, tm.get(), ldo, rmap.as<int32_t>(), steps,
                                  static_cast<int>(step.size()), table, rows, R, W, entries);
  mp.t_per_module = true;  // the per-segment shrinks' t: q, k, v, fc1 side by side per adapter
  for (int b = 0; b < 6; ++b) {
    mp.t_block_col[b] = b < 4 ? 0 : b * W;
    mp.t_block_slot[b] = b < 4 ? b : 0;
  }
  mp.first_block = 0;
  mp.num_blocks = 6;
  ASSERT_EQ(LoraMaskCuda(mp, nullptr), KernelStatus::kOk);
  const std::vector<float> got = gpu_test::Decode(tm.DownloadBytes(), DataType::kBF16);
  int bad = 0, checked = 0;
  for (int i = 0; i < rows; ++i) {
    const int a = row_adapter[i];
    if (a < 0) continue;
    const int slot = step[a].slot, width = step[a].width;
    for (int b = 0; b < 6; ++b) {
      const int target = entries[b], e = slot * kTargets + target, r = kRank[slot][target];
      const int in = kIn[target];
      const std::vector<float>& xs = x[b < 4 ? 0 : b - 3];
      const int col = mp.out_block_col[b] + mp.out_block_slot[b] * tw * width;
      for (int k = 0; k < width; ++k) {
        double want = 0.0, mag = 0.0;
        for (int j = 0; k < r && j < in; ++j) {
          uint32_t bits = static_cast<uint32_t>(ad.a[e][static_cast<size_t>(k) * in + j]) << 16;
          float av;
          std::memcpy(&av, &bits, sizeof(av));
          const double term = static_cast<double>(xs[static_cast<size_t>(i) * in + j]) * av;
          want += term;
          mag += std::fabs(term);
        }
        want *= ad.scale[e];
        mag *= ad.scale[e];
        const size_t at = static_cast<size_t>(i) * ldo + col + k;
        const double v = static_cast<double>(got[at]) + got[at + width];
        const double tol = k < r ? mag * 0x1p-14 + std::fabs(want) * 0x1p-16 : 0.0;
        ++checked;
        if (!(std::fabs(v - want) <= tol) && ++bad <= 5) {
          ADD_FAILURE() << "row " << i << " (adapter " << a << ") block " << b << " k " << k << ": "
                        << v << " want " << want << " tol " << tol;
        }
      }
    }
  }
  EXPECT_EQ(bad, 0) << "of " << checked;
  EXPECT_GT(checked, 0);
}

}  // namespace
}  // namespace phishard
