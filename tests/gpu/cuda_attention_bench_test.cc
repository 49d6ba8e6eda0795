// Prefill attention kernel timings at the shapes that matter (Phi-2: 32 heads x 80, Phi-1.5:
// 32 heads x 64; bf16; causal prefill of S tokens, and S new tokens after a cached prefix), for
// every query tiling of the kernel. tools/attn_bench.py times PyTorch's SDPA (FlashAttention,
// cuDNN, memory-efficient) on the same shapes in the same device call; tools/attn_gpu_check.sh
// runs both and prints one table.
//
// FLOP: 4 x hd x heads x (number of (query, key) pairs a causal mask keeps), and for a full
// causal prefill the usual 4 x S^2 x hd x heads / 2 so that the numbers compare with the
// FlashAttention/cuDNN benchmarks. Random data (never zeros) through a shuffled block table;
// every tiling's output must be finite and agree with the kQ128 output within two bf16 roundings
// of the values (|o| <= 1: 2 x 2^-8). Each time is the median of 15 launches timed one by one with
// device events after 3 warm-ups. Runs only with PHISHARD_GPU_BENCH=1; PHISHARD_ATTN_BENCH_SHAPES
// (comma-separated names) runs only those shapes (one kernel under a profiler, say).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/paged_attention_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::DeviceBuffer;

struct Shape {
  std::string name;
  int heads, head_dim, q_len, context_len, batch;
};

const char* TilingName(PrefillTiling t) {
  switch (t) {
    case PrefillTiling::kAuto:
      return "auto";
    case PrefillTiling::kQ128:
      return "q128";
    case PrefillTiling::kQ128Warps8:
      return "q128w8";
    case PrefillTiling::kWgmma:
      return "wgmma";
    case PrefillTiling::kWgmmaWs:
      return "wgmma-ws";
  }
  return "?";
}

// Median milliseconds of `reps` launches of `launch`, each between its own pair of events.
template <typename F>
double MedianMs(DeviceTimer* timer, int warmup, int reps, F&& launch) {
  for (int i = 0; i < warmup; ++i) launch();
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    EXPECT_EQ(DeviceTimerStart(timer, nullptr), 0);
    launch();
    EXPECT_EQ(DeviceTimerStop(timer, nullptr), 0);
    EXPECT_EQ(DeviceTimerElapsedMs(timer, &ms[i]), 0);
  }
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2];
}

void BenchShape(const Shape& s, DeviceTimer* timer) {
  SCOPED_TRACE(s.name);
  const int bs = 16, hd = s.head_dim, nh = s.heads;
  const int q_stride = 3 * nh * hd;  // q inside a fused qkv row, as the model lays it out
  const int T = s.q_len * s.batch;
  const int blocks_per_seq = (s.context_len + bs - 1) / bs;
  const int num_blocks = blocks_per_seq * s.batch;
  std::mt19937 rng(T + s.context_len);
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);  // paged: no two neighbours adjacent in memory
  std::vector<int32_t> cu(s.batch + 1), lens(s.batch, s.context_len);
  for (int b = 0; b <= s.batch; ++b) cu[b] = b * s.q_len;
  std::vector<float> qf = testing_util::RandomVector(static_cast<size_t>(T) * q_stride, rng());
  std::vector<float> kvf =
      testing_util::RandomVector(static_cast<size_t>(num_blocks) * bs * nh * hd, rng());
  DeviceBuffer q = DeviceBuffer::From(gpu_test::Encode(qf, DataType::kBF16));
  DeviceBuffer k = DeviceBuffer::From(gpu_test::Encode(kvf, DataType::kBF16));
  std::shuffle(kvf.begin(), kvf.end(), rng);  // V != K
  DeviceBuffer v = DeviceBuffer::From(gpu_test::Encode(kvf, DataType::kBF16));
  DeviceBuffer d_ids = DeviceBuffer::From(ids);
  DeviceBuffer d_cu = DeviceBuffer::From(cu);
  DeviceBuffer d_lens = DeviceBuffer::From(lens);
  DeviceBuffer out(static_cast<size_t>(T) * nh * hd * 2);
  const PagedAttentionParams p{.q = q.get(),
                               .k_cache = k.get(),
                               .v_cache = v.get(),
                               .out = out.get(),
                               .cu_q_lens = d_cu.as<int32_t>(),
                               .context_lens = d_lens.as<int32_t>(),
                               .block_tables = d_ids.as<int32_t>(),
                               .num_seqs = s.batch,
                               .num_tokens = T,
                               .max_blocks_per_seq = blocks_per_seq,
                               .num_blocks = num_blocks,
                               .block_size = bs,
                               .num_heads = nh,
                               .num_kv_heads = nh,
                               .head_dim = hd,
                               .q_stride = q_stride,
                               .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                               .dtype = DataType::kBF16};
  // (query, key) pairs under the causal mask; a full prefill counts S^2 / 2 (the usual convention).
  double pairs = 0;
  if (s.q_len == s.context_len) {
    pairs = 0.5 * s.q_len * static_cast<double>(s.q_len);
  } else {
    for (int i = 0; i < s.q_len; ++i) pairs += s.context_len - s.q_len + i + 1;
  }
  const double flop = 4.0 * hd * nh * pairs * s.batch;

  std::vector<float> ref;
  std::vector<PrefillTiling> tilings = {PrefillTiling::kQ128, PrefillTiling::kQ128Warps8};
  if (PagedAttentionPrefillWgmmaAvailable()) {
    tilings.push_back(PrefillTiling::kWgmma);
    tilings.push_back(PrefillTiling::kWgmmaWs);
  }
  tilings.push_back(PrefillTiling::kAuto);
  for (PrefillTiling tiling : tilings) {
    const PagedAttentionCudaPlan plan{.max_q_len = s.q_len,
                                      .max_context_len = s.context_len,
                                      .kernel = AttentionKernel::kPrefill,
                                      .num_multiprocessors = 132,
                                      .prefill_tiling = tiling};
    out.Poison();
    ASSERT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kOk);
    gpu_test::ExpectDeviceClean(nullptr);
    const std::vector<float> o = gpu_test::Decode(out.DownloadBytes(), DataType::kBF16);
    size_t nonfinite = 0;
    double max_diff = 0;
    for (size_t i = 0; i < o.size(); ++i) {
      nonfinite += !std::isfinite(o[i]);
      if (!ref.empty()) max_diff = std::max(max_diff, std::fabs(double{o[i]} - ref[i]));
    }
    EXPECT_EQ(nonfinite, 0u) << TilingName(tiling);
    EXPECT_LE(max_diff, 2.0 / 256) << TilingName(tiling) << " vs q128";
    if (ref.empty()) ref = o;
    const double ms = MedianMs(timer, 3, 15, [&] { PagedAttentionCuda(p, plan, nullptr); });
    gpu_test::ExpectDeviceClean(nullptr);
    std::printf("RESULT impl=phishard-%s shape=%s ms=%.4f tflops=%.1f max_diff_vs_q128=%.2g\n",
                TilingName(tiling), s.name.c_str(), ms, flop / (ms * 1e-3) / 1e12, max_diff);
  }
}

TEST(CudaAttentionBench, PrefillTilings) {
  PHI_REQUIRE_GPU();
  if (std::getenv("PHISHARD_GPU_BENCH") == nullptr) GTEST_SKIP() << "set PHISHARD_GPU_BENCH=1";
  DeviceTimer* timer = nullptr;
  ASSERT_EQ(DeviceTimerCreate(&timer), 0);
  // Shape names are what tools/attn_bench.py uses for the same problem.
  const std::vector<Shape> shapes = {
      {"h32d80_s512", 32, 80, 512, 512, 1},          {"h32d80_s1024", 32, 80, 1024, 1024, 1},
      {"h32d80_s2048", 32, 80, 2048, 2048, 1},       {"h32d80_s4096", 32, 80, 4096, 4096, 1},
      {"h32d80_s8192", 32, 80, 8192, 8192, 1},       {"h32d80_b8_s1024", 32, 80, 1024, 1024, 8},
      {"h32d80_b8_s2048", 32, 80, 2048, 2048, 8},    {"h32d64_s2048", 32, 64, 2048, 2048, 1},
      {"h32d64_s4096", 32, 64, 4096, 4096, 1},       {"h32d64_s8192", 32, 64, 8192, 8192, 1},
      {"h32d80_q512_ctx4096", 32, 80, 512, 4096, 1},
      // A tensor-parallel rank of Phi-2 at TP=2 (16 of the 32 heads).
      {"h16d80_s1024", 16, 80, 1024, 1024, 1},       {"h16d80_s2048", 16, 80, 2048, 2048, 1},
  };
  const char* only = std::getenv("PHISHARD_ATTN_BENCH_SHAPES");
  for (const Shape& s : shapes) {
    if (only != nullptr &&
        ("," + std::string(only) + ",").find("," + s.name + ",") == std::string::npos) {
      continue;
    }
    BenchShape(s, timer);
    if (HasFatalFailure()) break;
  }
  DeviceTimerDestroy(timer);
}

}  // namespace
}  // namespace phishard
