// A Phi-2-shaped model (hidden 2560, 32 heads x 80, rotary 32, fc 10240, vocab 51200) with random
// bf16 weights, written here as a real safetensors checkpoint and loaded through CudaPhiModel:
// times prefill and decode steps (host clock around Forward, which ends in a stream sync, so the
// numbers are what the engine sees per step) and checks that the decode path and the prefill path
// agree at this scale. Runs only with PHISHARD_GPU_BENCH=1 (it writes ~5.6 GB to
// $PHISHARD_BENCH_DIR, default /tmp); PHISHARD_BENCH_LAYERS (default 32) shortens the model.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/paged_attention_cuda.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr int kHidden = 2560, kHeads = 32, kInter = 10240, kVocab = 51200;

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  float center, spread;  // values uniform in center ± spread
};

std::vector<Tensor> Phi2Tensors(int layers) {
  const float w = 0.02f * std::sqrt(3.0f);  // std 0.02, as the HF initialiser
  std::vector<Tensor> t = {{"model.embed_tokens.weight", {kVocab, kHidden}, 0, w},
                           {"model.final_layernorm.weight", {kHidden}, 1, 0.1f},
                           {"model.final_layernorm.bias", {kHidden}, 0, 0.01f},
                           {"lm_head.weight", {kVocab, kHidden}, 0, w},
                           {"lm_head.bias", {kVocab}, 0, 0.01f}};
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* n : {"q_proj", "k_proj", "v_proj"}) {
      t.push_back({p + "self_attn." + n + ".weight", {kHidden, kHidden}, 0, w});
      t.push_back({p + "self_attn." + n + ".bias", {kHidden}, 0, 0.01f});
    }
    t.push_back({p + "self_attn.dense.weight", {kHidden, kHidden}, 0, w});
    t.push_back({p + "self_attn.dense.bias", {kHidden}, 0, 0.01f});
    t.push_back({p + "input_layernorm.weight", {kHidden}, 1, 0.1f});
    t.push_back({p + "input_layernorm.bias", {kHidden}, 0, 0.01f});
    t.push_back({p + "mlp.fc1.weight", {kInter, kHidden}, 0, w});
    t.push_back({p + "mlp.fc1.bias", {kInter}, 0, 0.01f});
    t.push_back({p + "mlp.fc2.weight", {kHidden, kInter}, 0, w});
    t.push_back({p + "mlp.fc2.bias", {kHidden}, 0, 0.01f});
  }
  return t;
}

// Random bf16 values, several threads, xorshift per chunk (data need not be reproducible).
void FillRandom(std::vector<uint16_t>* out, const Tensor& t, uint64_t seed) {
  const size_t n = out->size();
  const int threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int th = 0; th < threads; ++th) {
    pool.emplace_back([&, th] {
      uint64_t s = seed * 0x9E3779B97F4A7C15ull + th * 0xD1B54A32D192ED03ull + 1;
      for (size_t i = n * th / threads; i < n * (th + 1) / threads; ++i) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        const float u = static_cast<float>(s >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        (*out)[i] = FloatToBF16(t.center + t.spread * (2.0f * u - 1.0f));
      }
    });
  }
  for (auto& th : pool) th.join();
}

void WriteCheckpoint(const fs::path& dir, int layers) {
  fs::create_directories(dir);
  nlohmann::json cfg = {{"architectures", {"PhiForCausalLM"}},
                        {"model_type", "phi"},
                        {"hidden_size", kHidden},
                        {"num_attention_heads", kHeads},
                        {"num_key_value_heads", kHeads},
                        {"num_hidden_layers", layers},
                        {"intermediate_size", kInter},
                        {"vocab_size", kVocab},
                        {"partial_rotary_factor", 0.4},
                        {"rope_theta", 10000.0},
                        {"layer_norm_eps", 1e-5},
                        {"hidden_act", "gelu_new"},
                        {"max_position_embeddings", 8192},
                        {"tie_word_embeddings", false},
                        {"torch_dtype", "bfloat16"},
                        {"eos_token_id", 50256},
                        {"bos_token_id", 50256}};
  std::ofstream(dir / "config.json") << cfg.dump(1);
  const std::vector<Tensor> tensors = Phi2Tensors(layers);
  nlohmann::json header = nlohmann::json::object();
  size_t off = 0;
  for (const Tensor& t : tensors) {
    size_t n = 1;
    for (int64_t d : t.shape) n *= d;
    header[t.name] = {{"dtype", "BF16"}, {"shape", t.shape}, {"data_offsets", {off, off + 2 * n}}};
    off += 2 * n;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::ofstream f(dir / "model.safetensors", std::ios::binary);
  const uint64_t hs = h.size();
  f.write(reinterpret_cast<const char*>(&hs), 8);
  f.write(h.data(), static_cast<std::streamsize>(h.size()));
  std::vector<uint16_t> buf;
  uint64_t seed = 1;
  for (const Tensor& t : tensors) {
    size_t n = 1;
    for (int64_t d : t.shape) n *= d;
    buf.resize(n);
    FillRandom(&buf, t, seed++);
    f.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(2 * n));
  }
  ASSERT_TRUE(f.good()) << "writing " << dir / "model.safetensors";
}

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  std::string what;
  double ms;
  std::string note;
};

TEST(CudaPhi2Bench, TimesStepsAndDecodeAgreesWithPrefill) {
  PHI_REQUIRE_GPU();
  if (std::getenv("PHISHARD_GPU_BENCH") == nullptr) {
    GTEST_SKIP() << "set PHISHARD_GPU_BENCH=1 to run (writes a ~5.6 GB checkpoint)";
  }
  const int layers =
      std::getenv("PHISHARD_BENCH_LAYERS") ? std::atoi(std::getenv("PHISHARD_BENCH_LAYERS")) : 32;
  const fs::path dir =
      fs::path(std::getenv("PHISHARD_BENCH_DIR") ? std::getenv("PHISHARD_BENCH_DIR") : "/tmp") /
      ("phishard-phi2-L" + std::to_string(layers));
  std::vector<Row> rows;
  auto t0 = Clock::now();
  if (!fs::exists(dir / "model.safetensors")) WriteCheckpoint(dir, layers);
  ASSERT_FALSE(HasFatalFailure());
  rows.push_back({"write random checkpoint", Ms(t0, Clock::now()), ""});

  t0 = Clock::now();
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> loaded =
      CudaPhiModel::Load(dir, {.dtype = "bfloat16", .device = 0, .reserve_tokens = 4096});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  CudaPhiModel& m = **loaded;
  rows.push_back({"load + upload weights", Ms(t0, Clock::now()),
                  std::to_string(m.weight_bytes() / (1 << 20)) + " MiB"});
  const int V = m.config().vocab_size;
  const int bt = kKvBlockSize;
  // Sequence 0 owns blocks [0, 256) (4096 tokens); sequence s >= 1 owns 64 blocks (1024 tokens).
  const int num_blocks = 256 + 64 * 64;
  ASSERT_TRUE(m.AllocateKvCache(num_blocks, bt).ok());
  auto table = [&](int s) {
    std::vector<int32_t> t(s == 0 ? 4096 / bt : 1024 / bt);
    std::iota(t.begin(), t.end(), s == 0 ? 0 : 256 + (s - 1) * 64);
    return t;
  };
  // Prefills sequences [first, first + seqs) with `len` tokens each, in one step.
  auto prefill_range = [&](int first, int seqs, int len, bool all_rows,
                           std::vector<float>* logits) {
    ForwardBatch b;
    for (int s = first; s < first + seqs; ++s) {
      for (int i = 0; i < len; ++i) {
        b.token_ids.push_back((s * 7919 + i * 104729 + 17) % V);
        b.positions.push_back(i);
        if (all_rows || i == len - 1) b.logit_rows.push_back((s - first) * len + i);
      }
      b.seqs.push_back({.num_new_tokens = len, .context_len = len, .block_table = table(s)});
    }
    return m.Forward(b, logits);
  };
  auto prefill = [&](int seqs, int len, bool all_rows, std::vector<float>* logits) {
    // At most 4096 tokens a step (the reserved workspace).
    const int per_step = std::max(1, 4096 / len);
    for (int s = 0; s < seqs; s += per_step) {
      absl::Status st = prefill_range(s, std::min(per_step, seqs - s), len, all_rows, logits);
      if (!st.ok()) return st;
    }
    return absl::OkStatus();
  };
  auto decode = [&](int seqs, int ctx_before, int token, std::vector<float>* logits) {
    ForwardBatch b;
    for (int s = 0; s < seqs; ++s) {
      b.token_ids.push_back((token + s) % V);
      b.positions.push_back(ctx_before);
      b.seqs.push_back(
          {.num_new_tokens = 1, .context_len = ctx_before + 1, .block_table = table(s)});
      b.logit_rows.push_back(s);
    }
    return m.Forward(b, logits);
  };
  std::vector<float> logits;
  ASSERT_TRUE(prefill(1, 64, false, &logits).ok());  // warm-up (cuBLASLt plans, module load)

  for (int len : {512, 2048, 4096}) {
    std::vector<double> ts;
    for (int r = 0; r < 3; ++r) {
      t0 = Clock::now();
      ASSERT_TRUE(prefill(1, len, false, &logits).ok());
      ts.push_back(Ms(t0, Clock::now()));
    }
    const double flops = 2.0 * len * (m.weight_bytes() / 2.0);  // ~2 x tokens x params
    rows.push_back({"prefill 1 x " + std::to_string(len), Median(ts),
                    std::to_string(static_cast<int>(flops / Median(ts) / 1e9)) + " TFLOP/s"});
  }
  // Decode: batch 1 at context 512 and 4096, batch 16 and 64 at 1024 (context after the step).
  struct DecodeCase {
    int seqs, ctx;
  };
  for (DecodeCase dc :
       {DecodeCase{1, 511}, DecodeCase{1, 4095}, DecodeCase{16, 1023}, DecodeCase{64, 1023}}) {
    ASSERT_TRUE(prefill(dc.seqs, dc.ctx, false, &logits).ok());
    std::vector<double> ts;
    for (int step = 0; step < 16; ++step) {
      // Rewrites the same position each step: context stays fixed, cost is the same.
      t0 = Clock::now();
      ASSERT_TRUE(decode(dc.seqs, dc.ctx, step, &logits).ok());
      ts.push_back(Ms(t0, Clock::now()));
    }
    const double floor_ms = m.weight_bytes() / 4.3e12 * 1e3;  // all weights once at 4.3 TB/s
    char note[96];
    std::snprintf(note, sizeof(note), "floor %.2f ms, splits %d, %.0f tok/s", floor_ms,
                  m.last_decode_splits(), dc.seqs / Median(ts) * 1e3);
    rows.push_back(
        {"decode " + std::to_string(dc.seqs) + " seq @ ctx " + std::to_string(dc.ctx + 1),
         Median(ts), note});
  }

  // Decode path vs prefill path at Phi-2 scale: position 300's logits from one 301-token prefill
  // (tensor-core kernel, bf16 probabilities) and from a 300-token prefill + one decode step
  // (split-K kernel, float32 probabilities). Both are bf16 computations of the same function, so
  // they agree to the bf16 bound of cuda_model_test_util.h (0.02 x logit scale).
  std::vector<float> all, one;
  ASSERT_TRUE(prefill(1, 301, true, &all).ok());
  const std::vector<float> want(all.end() - V, all.end());
  ASSERT_TRUE(prefill(1, 300, false, &one).ok());
  ForwardBatch b;
  b.token_ids = {(0 * 7919 + 300 * 104729 + 17) % V};
  b.positions = {300};
  b.seqs.push_back({.num_new_tokens = 1, .context_len = 301, .block_table = table(0)});
  b.logit_rows = {0};
  ASSERT_TRUE(m.Forward(b, &one).ok());
  double scale = 1, worst = 0;
  for (int i = 0; i < V; ++i) {
    ASSERT_TRUE(std::isfinite(one[i]) && std::isfinite(want[i])) << "logit " << i;
    scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
    worst = std::max(worst, std::fabs(static_cast<double>(one[i]) - want[i]));
  }
  EXPECT_LE(worst, 0.02 * scale) << "decode vs prefill logits at position 300";
  std::printf("decode vs prefill at position 300: max |d| %.4f (logit scale %.2f)\n", worst, scale);

  const std::string title = "phi-2 shaped, bf16, " + std::to_string(layers) + " layers";
  std::printf("\n%-34s %10s   %s\n", title.c_str(), "ms", "note");
  for (const Row& r : rows)
    std::printf("%-34s %10.3f   %s\n", r.what.c_str(), r.ms, r.note.c_str());
}

// The attention kernels alone at Phi-2 shape (32 heads x 80, bf16), timed with device events
// over 10 launches after a warm-up: causal prefill of 4096 tokens (4 x 4096^2 / 2 x 80 x 32
// FLOP = 86 GFLOP) and decode of one sequence at context 4096 (reads 42 MB of K/V; 10 us at
// 4.3 TB/s). Random data (never zeros); outputs must be finite.
TEST(CudaPhi2Bench, AttentionKernelTimes) {
  PHI_REQUIRE_GPU();
  if (std::getenv("PHISHARD_GPU_BENCH") == nullptr) GTEST_SKIP() << "set PHISHARD_GPU_BENCH=1";
  const int nh = 32, hd = 80, bs = 16, ctx = 4096, blocks = ctx / bs;
  const int q_stride = 3 * nh * hd;
  std::vector<float> qf = testing_util::RandomVector(static_cast<size_t>(ctx) * q_stride, 1);
  std::vector<float> kv = testing_util::RandomVector(static_cast<size_t>(blocks) * bs * nh * hd, 2);
  gpu_test::DeviceBuffer q = gpu_test::DeviceBuffer::From(gpu_test::Encode(qf, DataType::kBF16));
  gpu_test::DeviceBuffer k = gpu_test::DeviceBuffer::From(gpu_test::Encode(kv, DataType::kBF16));
  gpu_test::DeviceBuffer v(k.bytes());
  v.Upload(gpu_test::Encode(kv, DataType::kBF16).data(), k.bytes());
  std::vector<int32_t> table(blocks);
  std::iota(table.begin(), table.end(), 0);
  gpu_test::DeviceBuffer d_table = gpu_test::DeviceBuffer::From(table);
  gpu_test::DeviceBuffer out(static_cast<size_t>(ctx) * nh * hd * 2);
  const size_t ws = PagedAttentionCudaWorkspaceBytes(1, nh, hd, 16);
  gpu_test::DeviceBuffer d_ws(ws);
  DeviceTimer* timer = nullptr;
  ASSERT_EQ(DeviceTimerCreate(&timer), 0);
  // Prefill once, then decode with the automatic split count and with 1, 4, 8, 16 splits.
  for (int variant : {-1, 0, 1, 4, 8, 16}) {
    const bool decode = variant >= 0;
    const int q_len = decode ? 1 : ctx;
    const std::vector<int32_t> cu = {0, q_len}, lens = {ctx};
    gpu_test::DeviceBuffer d_cu = gpu_test::DeviceBuffer::From(cu);
    gpu_test::DeviceBuffer d_lens = gpu_test::DeviceBuffer::From(lens);
    out.Poison();
    PagedAttentionParams p{.q = q.get(),
                           .k_cache = k.get(),
                           .v_cache = v.get(),
                           .out = out.get(),
                           .cu_q_lens = d_cu.as<int32_t>(),
                           .context_lens = d_lens.as<int32_t>(),
                           .block_tables = d_table.as<int32_t>(),
                           .num_seqs = 1,
                           .num_tokens = q_len,
                           .max_blocks_per_seq = blocks,
                           .num_blocks = blocks,
                           .block_size = bs,
                           .num_heads = nh,
                           .num_kv_heads = nh,
                           .head_dim = hd,
                           .q_stride = q_stride,
                           .scale = 1.0f / std::sqrt(80.0f),
                           .dtype = DataType::kBF16};
    PagedAttentionCudaPlan plan{.max_q_len = q_len,
                                .max_context_len = ctx,
                                .workspace = d_ws.get(),
                                .workspace_bytes = ws,
                                .num_multiprocessors = 132,
                                .force_splits = decode ? variant : 0};
    int splits = 0;
    ASSERT_EQ(PagedAttentionCuda(p, plan, nullptr, &splits), KernelStatus::kOk);
    ASSERT_EQ(DeviceTimerStart(timer, nullptr), 0);
    for (int r = 0; r < 10; ++r) ASSERT_EQ(PagedAttentionCuda(p, plan, nullptr), KernelStatus::kOk);
    ASSERT_EQ(DeviceTimerStop(timer, nullptr), 0);
    float ms = 0;
    ASSERT_EQ(DeviceTimerElapsedMs(timer, &ms), 0);
    gpu_test::ExpectDeviceClean(nullptr);
    const std::vector<float> o = gpu_test::Decode(out.DownloadBytes(), DataType::kBF16);
    size_t nonfinite = 0;
    for (size_t i = 0; i < static_cast<size_t>(q_len) * nh * hd; ++i) {
      nonfinite += !std::isfinite(o[i]);
    }
    EXPECT_EQ(nonfinite, 0u);
    const double per = ms / 10;
    if (decode) {
      std::printf(
          "attention decode 1 x ctx 4096, 32 x 80 bf16, %s: %.4f ms (%d splits, %.0f GB/s)\n",
          variant == 0 ? "auto" : "forced", per, splits,
          2.0 * ctx * nh * hd * 2 / (per * 1e-3) / 1e9);
    } else {
      std::printf("attention prefill 4096 causal, 32 x 80 bf16: %.3f ms (%.0f TFLOP/s)\n", per,
                  2.0 * ctx * static_cast<double>(ctx) * hd * nh / (per * 1e-3) / 1e12);
    }
  }
  DeviceTimerDestroy(timer);
}

// One layer's GEMMs at Phi-2 shape through CudaGemm, bf16, device events over 20 launches after a
// warm-up, for decode (m = 1, 64: weight-read bound, GB/s of weights) and prefill (m = 4096:
// TFLOP/s). With the step times above this splits a decode step into GEMM time and the rest
// (small kernels, launch gaps, host work).
TEST(CudaPhi2Bench, LayerGemmTimes) {
  PHI_REQUIRE_GPU();
  if (std::getenv("PHISHARD_GPU_BENCH") == nullptr) GTEST_SKIP() << "set PHISHARD_GPU_BENCH=1";
  std::unique_ptr<CudaGemm> gemm;
  ASSERT_EQ(CudaGemm::Create(size_t{32} << 20, &gemm), KernelStatus::kOk);
  struct Shape {
    const char* name;
    int n, k;
    GemmEpilogue epi;
    bool acc;
  };
  const Shape shapes[] = {{"qkv", 3 * kHidden, kHidden, GemmEpilogue::kNone, false},
                          {"dense", kHidden, kHidden, GemmEpilogue::kNone, true},
                          {"fc1+gelu", kInter, kHidden, GemmEpilogue::kGeluTanh, false},
                          {"fc2", kHidden, kInter, GemmEpilogue::kNone, true}};
  const int max_m = 4096;
  std::vector<float> xf = testing_util::RandomVector(static_cast<size_t>(max_m) * kInter, 3);
  std::vector<float> wf =
      testing_util::RandomVector(static_cast<size_t>(kInter) * 3 * kHidden, 4, -0.05f, 0.05f);
  std::vector<float> bf = testing_util::RandomVector(kInter, 5);
  gpu_test::DeviceBuffer x = gpu_test::DeviceBuffer::From(gpu_test::Encode(xf, DataType::kBF16));
  gpu_test::DeviceBuffer w = gpu_test::DeviceBuffer::From(gpu_test::Encode(wf, DataType::kBF16));
  gpu_test::DeviceBuffer b = gpu_test::DeviceBuffer::From(gpu_test::Encode(bf, DataType::kBF16));
  gpu_test::DeviceBuffer y(static_cast<size_t>(max_m) * kInter * 2);
  y.Upload(gpu_test::Encode(xf, DataType::kBF16).data(), y.bytes());
  DeviceTimer* timer = nullptr;
  ASSERT_EQ(DeviceTimerCreate(&timer), 0);
  for (int m : {1, 64, 256, 2048, 4096}) {
    double layer_us = 0;
    for (const Shape& sh : shapes) {
      GemmParams p{.x = x.get(),
                   .w = w.get(),
                   .bias = b.get(),
                   .y = y.get(),
                   .m = m,
                   .n = sh.n,
                   .k = sh.k,
                   .accumulate = sh.acc,
                   .epilogue = sh.epi,
                   .dtype = DataType::kBF16};
      ASSERT_EQ(gemm->Run(p, nullptr), KernelStatus::kOk) << gemm->last_error();
      ASSERT_EQ(DeviceTimerStart(timer, nullptr), 0);
      for (int r = 0; r < 20; ++r) ASSERT_EQ(gemm->Run(p, nullptr), KernelStatus::kOk);
      ASSERT_EQ(DeviceTimerStop(timer, nullptr), 0);
      float ms = 0;
      ASSERT_EQ(DeviceTimerElapsedMs(timer, &ms), 0);
      const double us = ms * 1e3 / 20;
      layer_us += us;
      const double bytes = 2.0 * sh.n * sh.k, flops = 2.0 * m * sh.n * sh.k;
      std::printf("gemm m %4d %-9s n %5d k %5d: %8.1f us  %6.0f GB/s of weights  %6.1f TFLOP/s\n",
                  m, sh.name, sh.n, sh.k, us, bytes / (us * 1e-6) / 1e9,
                  flops / (us * 1e-6) / 1e12);
    }
    std::printf("gemm m %4d one layer: %.1f us, x 32 layers = %.3f ms\n", m, layer_us,
                layer_us * 32 / 1e3);
  }
  gpu_test::ExpectDeviceClean(nullptr);
  DeviceTimerDestroy(timer);
}

}  // namespace
}  // namespace phishard
