// The two fused 1-row decode paths against the op-by-op decode path of the same model, end to end
// through CudaPhiModel::Forward: the persistent decode kernel (kernels/cuda/decode_mega_cuda.h,
// CudaModelOptions::decode_megakernel) on the fixtures tiny-phi-code (MHA, head_dim 32, partial
// rotary 16, bf16 and f16) and phi-gqa-hd80 (GQA 4/2, head_dim 80, rotary 32), and random
// checkpoints with head_dim 16 and 128; the decode stream (kernels/cuda/decode_stream_cuda.h,
// CudaModelOptions::decode_stream: hidden 256 KC only) on tiny-phi-code and random checkpoints
// (GQA 8/2 x 64 at hidden 512; one Phi-2-shaped layer, hidden 2560, 32 x 80, I 10240).
//
// Steps: sequence A is prefilled with 90 tokens (the op-by-op prefill, identical in every run),
// then decodes 22 one-token steps (context 91..112, crossing the block boundary at 96 and 112);
// sequence B decodes from an empty cache, 20 one-token steps (context 1..20: 1, 15, 16, 17 and
// the boundary at 16 inside). Both block tables are scattered, and the whole KV pool is
// NaN-poisoned first (PoisonKvCache), so a read of any slot no step wrote makes the logits NaN.
// Token ids are fixed (teacher forcing), so every run sees the same inputs.
//
// Tolerance: the kernel keeps the op-by-op path's bf16 rounding points (LayerNorm output, q/k/v,
// rotated q/k, fc1 activation, attention output, h) but sums in other orders (per-row dot products
// over 8 warps, attention in 16 splits merged by log-sum-exp, dense + fc2 as two float32 sums
// added once): an activation can land on the other side of a bf16 rounding boundary, the same
// kind of difference as cuda_model_options_test's MLP mode 2 vs 0 (h rounded once vs twice a
// layer), so the same bounds: max |d| <= 0.02 of the logit scale, norm rel <= 0.015 (the numpy
// emulation in cuda_model_test_util.h gives their origin). Greedy tokens must agree unless the
// reference's top-2 gap is a near-tie (< 0.008 of the scale, kTieFrac of cuda_model_test.cc). A
// graph replay runs the eager launch's work with the same reduction orders: bit-identical.
// The stream rounds h once a layer (as the fused op-by-op forms) and sums its layer outputs on a
// grid (kernels/cuda/stream_stage.cuh: each item's contribution rounded to <= 2^-16 of the
// column's scale) — differences of the same kind and size, the same bounds; its sums are exact in
// any order, so graph replays and eager steps are bit-identical too, whichever blocks ran which
// items. The stream tests cannot run under compute-sanitizer: it serialises kernels, and the
// stream's attention must run beside it (such a step traps after ~10 s instead of hanging); the
// stream kernel alone is sanitised by cuda_decode_stream_test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/decode_mega_cuda.h"
#include "kernels/cuda/decode_stream_cuda.h"
#include "kernels/cuda/paged_decode_cuda.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/random_phi_checkpoint.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;

const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();

constexpr double kLogitFrac = 0.02;
constexpr double kLogitNormRel = 0.015;
constexpr double kTieFrac = 0.008;

std::unique_ptr<CudaPhiModel> LoadModel(const fs::path& dir, const std::string& dtype) {
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> m = CudaPhiModel::Load(dir, {.dtype = dtype,
                                                                             .device = 0,
                                                                             .reserve_tokens = 256,
                                                                             .decode_megakernel = 0,
                                                                             .decode_stream = 0});
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

ForwardBatch Tokens(const std::vector<int32_t>& ids, int past, const std::vector<int32_t>& table) {
  ForwardBatch b;
  b.token_ids = ids;
  const int n = static_cast<int>(ids.size());
  for (int i = 0; i < n; ++i) b.positions.push_back(past + i);
  b.seqs.push_back({.num_new_tokens = n, .context_len = past + n, .block_table = table});
  b.logit_rows = {n - 1};
  return b;
}

// Scattered block tables (16-token blocks of a 24-block pool): A holds 112 tokens, B 20.
const std::vector<int32_t> kTableA = {20, 3, 17, 5, 11, 0, 9};
const std::vector<int32_t> kTableB = {7, 22};

// Logits of every decode step of A then B (the prefill's are not the kernel's).
std::vector<std::vector<float>> RunSteps(CudaPhiModel& m) {
  const int V = m.config().vocab_size;
  std::vector<std::vector<float>> out;
  std::vector<int32_t> prompt;
  for (int i = 0; i < 90; ++i) prompt.push_back((i * 389 + 5) % V);
  std::vector<float> logits;
  EXPECT_TRUE(m.Forward(Tokens(prompt, 0, kTableA), &logits).ok());
  for (int d = 0; d < 22; ++d) {
    out.emplace_back();
    const absl::Status st = m.Forward(Tokens({(d * 97 + 3) % V}, 90 + d, kTableA), &out.back());
    EXPECT_TRUE(st.ok()) << st;
  }
  for (int d = 0; d < 20; ++d) {
    out.emplace_back();
    const absl::Status st = m.Forward(Tokens({(d * 61 + 11) % V}, d, kTableB), &out.back());
    EXPECT_TRUE(st.ok()) << st;
  }
  return out;
}

int StepContext(size_t i) { return i < 22 ? 91 + static_cast<int>(i) : static_cast<int>(i) - 21; }

// Worst deviations over a fixture's steps, printed at its end.
struct Worst {
  double frac = 0, norm_rel = 0;
};

void ExpectClose(const std::vector<float>& ours, const std::vector<float>& ref,
                 const std::string& what, Worst* worst_seen) {
  ASSERT_EQ(ours.size(), ref.size()) << what;
  double num = 0, den = 0, worst = 0, scale = 1.0;
  size_t nonfinite = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::fabs(static_cast<double>(ref[i])));
    if (!std::isfinite(ours[i])) {
      ++nonfinite;
      continue;
    }
    const double d = static_cast<double>(ours[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
    worst = std::max(worst, std::fabs(d));
  }
  EXPECT_EQ(nonfinite, 0u) << what;
  EXPECT_LE(worst, kLogitFrac * scale) << what << " (logit scale " << scale << ")";
  EXPECT_LE(std::sqrt(num / std::max(den, 1e-30)), kLogitNormRel) << what;
  worst_seen->frac = std::max(worst_seen->frac, worst / scale);
  worst_seen->norm_rel = std::max(worst_seen->norm_rel, std::sqrt(num / std::max(den, 1e-30)));
  // Greedy agreement unless the reference's top-2 gap is a near-tie.
  std::vector<float> sorted = ref;
  std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
  const auto best = [](const std::vector<float>& v) {
    return std::max_element(v.begin(), v.end()) - v.begin();
  };
  if (sorted[0] - sorted[1] >= kTieFrac * scale) {
    EXPECT_EQ(best(ours), best(ref)) << what << ": greedy token differs";
  }
}

// A GQA shape the stream takes (hidden 512: R = 2 rows a stage; 8 / 2 heads of 64).
model_test::RandomPhiShape Gqa512(uint32_t seed) {
  return {.hidden_size = 512,
          .num_attention_heads = 8,
          .num_key_value_heads = 2,
          .intermediate_size = 2048,
          .partial_rotary_factor = 0.5,
          .seed = seed};
}

// A bf16 model of `dir` with a poisoned 24-block KV pool and the decode stream on (null and a
// test failure otherwise).
std::unique_ptr<CudaPhiModel> StreamModel(const fs::path& dir) {
  std::unique_ptr<CudaPhiModel> m = LoadModel(dir, "bfloat16");
  if (!m || !m->AllocateKvCache(24, kKvBlockSize).ok() || !m->PoisonKvCache().ok() ||
      !m->set_decode_stream(true).ok() || !m->decode_stream()) {
    ADD_FAILURE() << dir << ": no model with the decode stream on";
    return nullptr;
  }
  return m;
}

// body(model) for StreamModel of tiny-phi-code and of a random GQA-512 checkpoint (Gqa512(seed),
// written into a temporary folder named `tmp`), each under a SCOPED_TRACE of its folder.
void ForEachStreamModel(const char* tmp, uint32_t seed,
                        const std::function<void(CudaPhiModel&)>& body) {
  lora_test::TempDir gqa(tmp);
  model_test::WriteRandomPhiCheckpoint(gqa.path(), Gqa512(seed));
  ASSERT_FALSE(testing::Test::HasFatalFailure());
  for (const fs::path& dir : {kRepo / "models" / "tiny-phi-code", gqa.path()}) {
    SCOPED_TRACE(dir.string());
    std::unique_ptr<CudaPhiModel> m = StreamModel(dir);
    ASSERT_TRUE(m);
    body(*m);
    if (testing::Test::HasFatalFailure()) return;
  }
}

// The fused 1-row decode paths (each switched on alone).
enum class Path { kMega, kStream };
absl::Status SetPath(CudaPhiModel& m, Path p, bool on) {
  return p == Path::kMega ? m.set_decode_megakernel(on) : m.set_decode_stream(on);
}
int64_t PathLaunches(const CudaPhiModel& m, Path p) {
  return p == Path::kMega ? m.mega_decode_launches() : m.decode_stream_steps();
}

// `configure`: applied to the model after load (a path's settings).
void CompareWithOpByOp(const fs::path& dir, const std::string& dtype, Path path = Path::kMega,
                       const std::function<void(CudaPhiModel&)>& configure = nullptr) {
  std::unique_ptr<CudaPhiModel> m = LoadModel(dir, dtype);
  ASSERT_TRUE(m);
  if (configure) configure(*m);
  ASSERT_TRUE(m->AllocateKvCache(24, kKvBlockSize).ok());
  ASSERT_TRUE(m->PoisonKvCache().ok());
  ASSERT_FALSE(m->decode_megakernel());
  ASSERT_FALSE(m->decode_stream());
  const std::vector<std::vector<float>> ref = RunSteps(*m);
  ASSERT_EQ(PathLaunches(*m, path), 0);

  ASSERT_TRUE(SetPath(*m, path, true).ok());
  ASSERT_TRUE(path != Path::kStream || m->decode_stream()) << "decode stream refused the model";
  const int64_t graphs_before = m->decode_graph_captures();
  const std::vector<std::vector<float>> graph = RunSteps(*m);
  // The first 1-row step runs eagerly, the next ones replay the bucket's graph (captured once).
  EXPECT_EQ(m->decode_graph_captures(), graphs_before + 1) << "1-row graph not captured";
  EXPECT_GE(PathLaunches(*m, path), 2) << "the fused path did not run";
  const std::vector<std::vector<float>> graph2 = RunSteps(*m);  // replays only
  m->set_cuda_graphs(false);
  const int64_t launches = PathLaunches(*m, path);
  const std::vector<std::vector<float>> eager = RunSteps(*m);
  EXPECT_EQ(PathLaunches(*m, path), launches + static_cast<int64_t>(eager.size()));

  ASSERT_EQ(graph.size(), ref.size());
  ASSERT_EQ(eager.size(), ref.size());
  Worst worst;
  for (size_t i = 0; i < ref.size(); ++i) {
    const std::string what = dir.filename().string() + " " + dtype + " step " + std::to_string(i) +
                             " (context " + std::to_string(StepContext(i)) + ")";
    ExpectClose(graph[i], ref[i], what, &worst);
    EXPECT_TRUE(graph[i] == eager[i]) << what << ": graph replay != eager";
    EXPECT_TRUE(graph[i] == graph2[i]) << what << ": two runs differ";
  }
  std::printf("  %s %s %s, %zu steps: worst max|d| %.4f of the logit scale, norm rel %.4f\n",
              path == Path::kMega ? "megakernel" : "stream", dir.filename().c_str(), dtype.c_str(),
              ref.size(), worst.frac, worst.norm_rel);
}

TEST(CudaMegaDecode, TinyPhiCodeBf16MatchesOpByOpPath) {
  PHI_REQUIRE_GPU();
  CompareWithOpByOp(kRepo / "models" / "tiny-phi-code", "bfloat16");
}

TEST(CudaMegaDecode, TinyPhiCodeFp16MatchesOpByOpPath) {
  PHI_REQUIRE_GPU();
  CompareWithOpByOp(kRepo / "models" / "tiny-phi-code", "float16");
}

TEST(CudaMegaDecode, GqaHd80Bf16MatchesOpByOpPath) {
  PHI_REQUIRE_GPU();
  CompareWithOpByOp(kRepo / "tests" / "golden" / "phi-gqa-hd80", "bfloat16");
}

// Head dims no fixture has (tests/gpu/random_phi_checkpoint.h): a tiny GQA checkpoint with
// head_dim 16 (rotary 8) and a custom one with head_dim 128 (rotary 32).
TEST(CudaMegaDecode, RandomHd16AndHd128MatchOpByOpPath) {
  PHI_REQUIRE_GPU();
  const model_test::RandomPhiShape shapes[] = {{.hidden_size = 64,
                                                .num_attention_heads = 4,
                                                .num_key_value_heads = 2,
                                                .intermediate_size = 256,
                                                .partial_rotary_factor = 0.5},
                                               {.hidden_size = 512,
                                                .num_attention_heads = 4,
                                                .num_key_value_heads = 1,
                                                .intermediate_size = 512,
                                                .partial_rotary_factor = 0.25,
                                                .seed = 4}};
  for (const model_test::RandomPhiShape& shape : shapes) {
    lora_test::TempDir dir("phishard-mega-hdim");
    model_test::WriteRandomPhiCheckpoint(dir.path(), shape);
    ASSERT_FALSE(HasFatalFailure());
    CompareWithOpByOp(dir.path(), "bfloat16");
    if (HasFatalFailure()) return;
  }
}

// Decode steps of 2 rows keep the op-by-op path (the kernel is for one row): no launch, and the
// same logits as with the switch off, bit for bit.
void MultiRowStepsKeepTheOpByOpPath(Path path) {
  std::unique_ptr<CudaPhiModel> m = LoadModel(kRepo / "models" / "tiny-phi-code", "bfloat16");
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->AllocateKvCache(24, kKvBlockSize).ok());
  const int V = m->config().vocab_size;
  auto run = [&]() {
    std::vector<std::vector<float>> out;
    std::vector<float> logits;
    EXPECT_TRUE(m->Forward(Tokens({1, 2, 3, 4, 5}, 0, kTableA), &logits).ok());
    EXPECT_TRUE(m->Forward(Tokens({6, 7, 8}, 0, kTableB), &logits).ok());
    int ca = 5, cb = 3;
    for (int d = 0; d < 4; ++d, ++ca, ++cb) {
      ForwardBatch b;
      b.token_ids = {(d * 13 + 1) % V, (d * 17 + 2) % V};
      b.positions = {ca, cb};
      b.seqs.push_back({.num_new_tokens = 1, .context_len = ca + 1, .block_table = kTableA});
      b.seqs.push_back({.num_new_tokens = 1, .context_len = cb + 1, .block_table = kTableB});
      b.logit_rows = {0, 1};
      out.emplace_back();
      EXPECT_TRUE(m->Forward(b, &out.back()).ok());
    }
    return out;
  };
  const auto off = run();
  ASSERT_TRUE(SetPath(*m, path, true).ok());
  const auto on = run();
  EXPECT_EQ(PathLaunches(*m, path), 0);
  ASSERT_EQ(on.size(), off.size());
  for (size_t i = 0; i < on.size(); ++i) EXPECT_TRUE(on[i] == off[i]) << "step " << i;
}

TEST(CudaMegaDecode, MultiRowStepsKeepTheOpByOpPath) {
  PHI_REQUIRE_GPU();
  MultiRowStepsKeepTheOpByOpPath(Path::kMega);
}

TEST(CudaDecodeStreamModel, MultiRowStepsKeepTheOpByOpPath) {
  PHI_REQUIRE_GPU();
  MultiRowStepsKeepTheOpByOpPath(Path::kStream);
}

TEST(CudaDecodeStreamModel, TinyPhiCodeBf16MatchesOpByOpPath) {
  PHI_REQUIRE_GPU();
  CompareWithOpByOp(kRepo / "models" / "tiny-phi-code", "bfloat16", Path::kStream);
}

TEST(CudaDecodeStreamModel, TinyPhiCodeFp16MatchesOpByOpPath) {
  PHI_REQUIRE_GPU();
  CompareWithOpByOp(kRepo / "models" / "tiny-phi-code", "float16", Path::kStream);
}

// GQA 8/2 x 64 (rotary 32) at hidden 512, and one layer of Phi-2's shape (hidden 2560, 32 x 80,
// I 10240, rotary 32; one layer: the fold after the last layer runs in place).
TEST(CudaDecodeStreamModel, RandomGqaAndPhi2LayerMatchOpByOpPath) {
  PHI_REQUIRE_GPU();
  const model_test::RandomPhiShape shapes[] = {Gqa512(5),
                                               {.hidden_size = 2560,
                                                .num_attention_heads = 32,
                                                .num_key_value_heads = 32,
                                                .intermediate_size = 10240,
                                                .partial_rotary_factor = 0.4,
                                                .num_hidden_layers = 1,
                                                .seed = 6}};
  for (const model_test::RandomPhiShape& shape : shapes) {
    lora_test::TempDir dir("phishard-stream-shape");
    model_test::WriteRandomPhiCheckpoint(dir.path(), shape);
    ASSERT_FALSE(HasFatalFailure());
    CompareWithOpByOp(dir.path(), "bfloat16", Path::kStream);
    if (HasFatalFailure()) return;
  }
}

// Both forms of the stream step's end (the fold + the LM head's bulk GEMV, or the LM head as one
// more stream launch: set_decode_stream_head) match the op-by-op path within the same bounds, on
// tiny-phi-code (bf16 and fp16) and a GQA model (8 / 2 heads of 64, hidden 512: two LM head rows
// a stage).
TEST(CudaDecodeStreamModel, BothHeadFormsMatchOpByOpPath) {
  PHI_REQUIRE_GPU();
  lora_test::TempDir gqa("phishard-stream-head");
  model_test::WriteRandomPhiCheckpoint(gqa.path(), Gqa512(9));
  ASSERT_FALSE(HasFatalFailure());
  for (bool head : {false, true}) {
    for (const auto& [dir, dtype] : {std::pair{kRepo / "models" / "tiny-phi-code", "bfloat16"},
                                     std::pair{kRepo / "models" / "tiny-phi-code", "float16"},
                                     std::pair{gqa.path(), "bfloat16"}}) {
      SCOPED_TRACE(std::string(head ? "LM head in the stream " : "LM head GEMV ") + dir.string() +
                   " " + dtype);
      CompareWithOpByOp(dir, dtype, Path::kStream,
                        [head](CudaPhiModel& m) { m.set_decode_stream_head(head); });
      if (HasFatalFailure()) return;
    }
  }
}

// The option at load (CudaModelOptions::decode_stream = 1, what PHISHARD_DECODE_STREAM sets)
// takes the stream with the weights uploaded: the same logits, bit for bit, as switching it on
// after load (the stream's sums are exact, so two models of the same weights agree exactly).
TEST(CudaDecodeStreamModel, OptionAtLoadEqualsTheSwitchAfterLoad) {
  PHI_REQUIRE_GPU();
  const fs::path dir = kRepo / "models" / "tiny-phi-code";
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> at_load = CudaPhiModel::Load(
      dir, {.dtype = "bfloat16", .device = 0, .reserve_tokens = 256, .decode_stream = 1});
  ASSERT_TRUE(at_load.ok()) << at_load.status();
  ASSERT_TRUE((*at_load)->decode_stream());
  std::unique_ptr<CudaPhiModel> after = LoadModel(dir, "bfloat16");
  ASSERT_TRUE(after);
  ASSERT_TRUE(after->set_decode_stream(true).ok());
  std::vector<std::vector<float>> got[2];
  CudaPhiModel* models[2] = {at_load->get(), after.get()};
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(models[i]->AllocateKvCache(24, kKvBlockSize).ok());
    got[i] = RunSteps(*models[i]);
    EXPECT_GE(models[i]->decode_stream_steps(), 2);
  }
  ASSERT_EQ(got[0].size(), got[1].size());
  for (size_t i = 0; i < got[0].size(); ++i) EXPECT_TRUE(got[0][i] == got[1][i]) << "step " << i;
}

// The attention's preloaded K/V stages (set_decode_stream_preload: loads moved before its wait),
// the dense chunks' attention output through shared memory (set_decode_stream_attn_smem), a
// smaller stream grid (set_decode_stream_blocks: the grid sums are exact in any order), one copy
// in flight a block (set_decode_stream_one_in_flight_ctx), the dense chunks waiting on the
// attention output itself (set_decode_stream_poll, switched off and on again between runs) and the
// timeline (clock stamps only) change no value: every step's logits equal the plain path's bit
// for bit, over contexts 1-20 (one 32-key stage, part of one) and 91-112 (several
// stages, the new key in each position of a stage). The last step's timeline: every layer's
// stream blocks stamped start <= folded <= items done <= flushed, layer l's fold after layer
// l - 1's last flush, and attention blocks start <= ready <= keys done <= end, with at least one
// attention block a layer.
TEST(CudaDecodeStreamModel, PreloadAndTimelineKeepTheLogits) {
  PHI_REQUIRE_GPU();
  ForEachStreamModel("phishard-stream-preload", 7, [](CudaPhiModel& m) {
    m.set_decode_stream_preload(0);
    m.set_decode_stream_attn_smem(false);
    m.set_decode_stream_blocks(0);
    m.set_decode_stream_head(false);  // (the LM head form's logits are its own; both as base)
    ASSERT_TRUE(m.set_decode_stream_poll(false).ok());
    const std::vector<std::vector<float>> base = RunSteps(m);
    for (int preload : {1, 2, 3, 4}) {
      m.set_decode_stream_preload(preload);
      EXPECT_EQ(m.decode_stream_preload(), std::min(preload, 2));
      m.set_decode_stream_attn_smem(preload >= 2);
      m.set_decode_stream_blocks(preload == 4 ? 7 : 0);
      m.set_decode_stream_one_in_flight_ctx(preload >= 3 ? 0 : -1);
      ASSERT_TRUE(m.set_decode_stream_poll(preload != 2).ok());
      const bool timeline = preload >= 3;
      ASSERT_TRUE(m.set_decode_stream_timeline(timeline).ok());
      const int64_t steps0 = m.decode_stream_steps();
      const std::vector<std::vector<float>> got = RunSteps(m);
      EXPECT_GE(m.decode_stream_steps() - steps0, 1);  // (graph captures count, replays not)
      ASSERT_EQ(got.size(), base.size());
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_TRUE(got[i] == base[i]) << "preload " << preload << " step " << i;
      }
      if (!timeline) continue;
      absl::StatusOr<std::vector<uint64_t>> tl = m.decode_stream_timeline();
      ASSERT_TRUE(tl.ok()) << tl.status();
      const int SB = CudaPhiModel::kStreamTimelineBlocks;
      const int AB = CudaPhiModel::kStreamTimelineAttnBlocks;
      const size_t per_layer = static_cast<size_t>(SB) * kDecodeStreamTimelineEvents +
                               static_cast<size_t>(AB) * kPagedDecodeTimelineEvents;
      // The layers' rows, then the LM head form's (stream blocks only).
      const int L = m.config().num_hidden_layers;
      ASSERT_EQ(tl->size(), per_layer * (L + 1));
      uint64_t prev_flush = 0;
      for (int l = 0; l <= L; ++l) {
        const uint64_t* rows = tl->data() + l * per_layer;
        int stream_blocks = 0, attn_blocks = 0;
        uint64_t last_flush = 0;
        for (int b = 0; b < SB; ++b) {
          const uint64_t* r = rows + b * kDecodeStreamTimelineEvents;
          if (r[kTlStart] == 0) continue;
          ++stream_blocks;
          EXPECT_LE(r[kTlStart], r[kTlFolded]) << "layer " << l << " block " << b;
          EXPECT_LE(r[kTlFolded], r[kTlItemsDone]) << "layer " << l << " block " << b;
          EXPECT_LE(r[kTlItemsDone], r[kTlFlushed]) << "layer " << l << " block " << b;
          EXPECT_GE(r[kTlFolded], prev_flush) << "layer " << l << " block " << b;
          last_flush = std::max(last_flush, r[kTlFlushed]);
        }
        const uint64_t* arows = rows + static_cast<size_t>(SB) * kDecodeStreamTimelineEvents;
        for (int b = 0; b < AB; ++b) {
          const uint64_t* r = arows + b * kPagedDecodeTimelineEvents;
          if (r[kAttnTlEnd] == 0) continue;
          ++attn_blocks;
          EXPECT_LE(r[kAttnTlStart], r[kAttnTlReady]) << "layer " << l << " block " << b;
          EXPECT_LE(r[kAttnTlReady], r[kAttnTlKeysDone]) << "layer " << l << " block " << b;
          EXPECT_LE(r[kAttnTlKeysDone], r[kAttnTlEnd]) << "layer " << l << " block " << b;
        }
        if (l == L) {  // the LM head form is off here: its row stays zero
          EXPECT_EQ(stream_blocks, 0);
          EXPECT_EQ(attn_blocks, 0);
          break;
        }
        EXPECT_GT(stream_blocks, 0) << "layer " << l;
        EXPECT_GT(attn_blocks, 0) << "layer " << l;
        prev_flush = last_flush;
      }
    }
    ASSERT_TRUE(m.set_decode_stream_timeline(false).ok());
  });
}

// The LM head form writing a 1-row step's logits straight into the pinned staging
// (set_decode_stream_host_logits) gives the logits the download gives, bit for bit, and never
// falls back to the download (the staging's sentinel was overwritten every step).
TEST(CudaDecodeStreamModel, HostLogitsEqualTheDownload) {
  PHI_REQUIRE_GPU();
  ForEachStreamModel("phishard-stream-host-logits", 15, [](CudaPhiModel& m) {
    EXPECT_TRUE(m.decode_stream_host_logits());  // the default
    m.set_decode_stream_host_logits(false);
    const std::vector<std::vector<float>> base = RunSteps(m);
    m.set_decode_stream_host_logits(true);
    const int64_t steps0 = m.decode_stream_steps();
    const std::vector<std::vector<float>> got = RunSteps(m);
    EXPECT_GE(m.decode_stream_steps() - steps0, 1);
    EXPECT_EQ(m.decode_stream_host_logits_misses(), 0);
    ASSERT_EQ(got.size(), base.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(got[i] == base[i]) << "step " << i;
  });
}

// A shape the stream does not take (hidden 320: not 256 KC) keeps the op-by-op path: the switch
// logs and stays off, no step goes through it.
TEST(CudaDecodeStreamModel, UnsupportedShapeStaysOff) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaPhiModel> m =
      LoadModel(kRepo / "tests" / "golden" / "phi-gqa-hd80", "bfloat16");
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->set_decode_stream(true).ok());
  EXPECT_FALSE(m->decode_stream());
  ASSERT_TRUE(m->AllocateKvCache(24, kKvBlockSize).ok());
  const std::vector<std::vector<float>> steps = RunSteps(*m);
  EXPECT_EQ(m->decode_stream_steps(), 0);
  EXPECT_EQ(steps.size(), 42u);
}

// The L2 lookahead (prefetch hints only) and the phase timeline (clock stamps only) change no
// value the kernel computes: with both on, every step's logits equal the plain kernel's bit for
// bit. The timeline of the last step: every block wrote its row; per block and layer the phase
// boundaries are in program order and each layer starts after the previous one left barrier C;
// a phase's ring waits fit inside the phase; the attention items over all blocks cover every head
// the same number of times (the context splits).
TEST(CudaMegaDecode, TimelineAndL2LookaheadKeepTheLogits) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaPhiModel> m = LoadModel(kRepo / "models" / "tiny-phi-code", "bfloat16");
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->AllocateKvCache(24, kKvBlockSize).ok());
  ASSERT_TRUE(m->PoisonKvCache().ok());
  ASSERT_TRUE(m->set_decode_megakernel(true).ok());
  m->set_cuda_graphs(false);
  m->set_decode_megakernel_tuning(0, 0, 0, -1, 0);  // lookahead off, form 0
  const std::vector<std::vector<float>> plain = RunSteps(*m);
  const int layers = m->config().num_hidden_layers;
  m->set_decode_megakernel_tuning(0, 0, 0, 64, 0);
  ASSERT_TRUE(m->set_decode_megakernel_timeline(layers).ok());
  const int64_t launches = m->mega_decode_launches();
  const std::vector<std::vector<float>> timed = RunSteps(*m);
  EXPECT_EQ(m->mega_decode_launches(), launches + static_cast<int64_t>(timed.size()));
  ASSERT_EQ(timed.size(), plain.size());
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_TRUE(timed[i] == plain[i]) << "step " << i;

  absl::StatusOr<std::vector<uint64_t>> tl = m->decode_megakernel_timeline();
  ASSERT_TRUE(tl.ok()) << tl.status();
  const int E = kDecodeMegaEvents;
  const size_t per_block = static_cast<size_t>(layers + 1) * E;
  ASSERT_EQ(tl->size() % per_block, 0u);
  const uint64_t* w = tl->data();
  const uint64_t grid = w[static_cast<size_t>(layers) * E + 5];
  ASSERT_GE(grid, 1u);
  ASSERT_LE(grid, tl->size() / per_block);
  uint64_t items = 0;
  for (uint64_t b = 0; b < grid; ++b) {
    const uint64_t* head = w + b * per_block + static_cast<size_t>(layers) * E;
    ASSERT_EQ(head[4], 1u) << "block " << b << " wrote no timeline";
    EXPECT_EQ(head[5], grid);
    EXPECT_LT(head[0], head[2]);
    EXPECT_LT(head[1], head[3]);
    uint64_t prev_end = head[0];
    for (int l = 0; l < layers; ++l) {
      const uint64_t* e = w + b * per_block + static_cast<size_t>(l) * E;
      EXPECT_LE(prev_end, e[kMegaLayerStart]) << "block " << b << " layer " << l;
      for (int k = kMegaLayerStart; k < kMegaBarCEnd; ++k) {
        EXPECT_LE(e[k], e[k + 1]) << "block " << b << " layer " << l << " event " << k;
      }
      EXPECT_LE(e[kMegaWaitQkvFc1], e[kMegaFc1End] - e[kMegaLnEnd]) << "block " << b;
      EXPECT_LE(e[kMegaFinishHead], e[kMegaQkvEnd] - e[kMegaLnEnd]) << "block " << b;
      EXPECT_LE(e[kMegaWaitFc2], e[kMegaFc2End] - e[kMegaAttnEnd]) << "block " << b;
      EXPECT_LE(e[kMegaWaitDense], e[kMegaDenseEnd] - e[kMegaBarBEnd]) << "block " << b;
      if (l == 0) items += e[kMegaAttnItems];
      prev_end = e[kMegaBarCEnd];
    }
    EXPECT_LE(prev_end, head[2]);
  }
  const uint64_t heads = static_cast<uint64_t>(m->config().num_attention_heads);
  EXPECT_GE(items, heads);
  EXPECT_EQ(items % heads, 0u) << items << " attention items for " << heads << " heads";
  ASSERT_TRUE(m->set_decode_megakernel_timeline(0).ok());
}

// Every form compiled (kDecodeMegaForm* bits: attention tail, grid barrier, pipelined stage loop,
// one stage-loop copy, lean attention items) computes the same values in the same order: each one's
// logits equal form 0's bit for bit, on MHA (tiny-phi- code) and GQA head_dim 80 (phi-gqa-hd80);
// form 0 itself is held to the op-by-op path above.
TEST(CudaMegaDecode, EveryFormKeepsTheLogits) {
  PHI_REQUIRE_GPU();
  for (const fs::path& dir :
       {kRepo / "models" / "tiny-phi-code", kRepo / "tests" / "golden" / "phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadModel(dir, "bfloat16");
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->AllocateKvCache(24, kKvBlockSize).ok());
    ASSERT_TRUE(m->PoisonKvCache().ok());
    ASSERT_TRUE(m->set_decode_megakernel(true).ok());
    m->set_decode_megakernel_tuning(0, 0, 0, 0, 0);
    const std::vector<std::vector<float>> base = RunSteps(*m);
    for (int form : {1, 3, 7, 11, 75}) {  // the forms compiled
      m->set_decode_megakernel_tuning(0, 0, 0, 0, form);
      const int64_t launches = m->mega_decode_launches();
      const std::vector<std::vector<float>> got = RunSteps(*m);
      EXPECT_GT(m->mega_decode_launches(), launches) << "form " << form;
      ASSERT_EQ(got.size(), base.size());
      for (size_t i = 0; i < base.size(); ++i) {
        EXPECT_TRUE(got[i] == base[i]) << dir.filename() << " form " << form << " step " << i;
      }
    }
  }
}

}  // namespace
}  // namespace phishard
