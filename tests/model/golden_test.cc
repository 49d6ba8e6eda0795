// End-to-end golden tests: our CPU float32 forward against Hugging Face transformers run in
// float32 (tf32 off, eager attention) from the same bf16 weights. Fixtures are written by
// tools/gen_golden.py under tests/golden/ (format in the file's header).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/log_softmax.h"
#include "model/cpu_phi_model.h"
#include "model/kv_cache.h"
#include "nlohmann/json.hpp"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();
const fs::path kGolden = kRepo / "tests" / "golden";

// Tolerances. HF and we compute the same float32 math from the same bf16-rounded weights, but in
// different orders (cuBLAS vs OpenBLAS blockings, SDPA-free eager softmax vs ours): float32
// reordering over K <= 1024-term sums, through a few layers, moves logits by ~1e-5 of their scale
// (the generator measured HF GPU vs HF CPU at 1.5e-5 to 2.5e-5 absolute). 1e-4 x max(1, max|logit|)
// leaves ~5x margin; a wrong rotary, GELU variant, missing bias or mask is off by >= 1e-2.
constexpr double kLogitRelTol = 1e-4;
// Log-probabilities are O(1) differences of logits, so the same bound applies absolutely.
constexpr double kLogprobTol = 1e-4;

absl::StatusOr<json> ReadJson(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("cannot open " + path.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(path.string() + ": " + e.what());
  }
}

// Runs prompt `ids` as one prefill on blocks [0, n) of the cache; returns [n, V] logits.
std::vector<float> PrefillAllRows(CpuPhiModel& model, const std::vector<int32_t>& ids) {
  const int n = static_cast<int>(ids.size());
  ForwardBatch b;
  b.token_ids = ids;
  b.positions.resize(n);
  std::iota(b.positions.begin(), b.positions.end(), 0);
  b.logit_rows = b.positions;
  std::vector<int32_t> blocks(KvBlockAllocator::BlocksFor(n, model.kv_block_size()));
  std::iota(blocks.begin(), blocks.end(), 0);
  b.seqs.push_back({.num_new_tokens = n, .context_len = n, .block_table = blocks});
  std::vector<float> logits;
  absl::Status st = model.Forward(b, &logits);
  EXPECT_TRUE(st.ok()) << st;
  return logits;
}

std::vector<float> LogSoftmaxRows(const std::vector<float>& logits, int vocab) {
  std::vector<float> out(logits.size());
  const KernelStatus st = LogSoftmaxCpu({.x = logits.data(),
                                         .y = out.data(),
                                         .rows = static_cast<int>(logits.size() / vocab),
                                         .cols = vocab});
  EXPECT_EQ(st, KernelStatus::kOk);
  return out;
}

struct GreedyResult {
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
  double min_gap = INFINITY;  // smallest top1 - top2 logit gap along our path
};

// Greedy continuation through our own serving path: one prefill of the prompt (last row only),
// then single-token decode steps, each writing its K/V into the sequence's blocks.
GreedyResult Greedy(CpuPhiModel& model, const std::vector<int32_t>& prompt, int steps) {
  const int V = model.config().vocab_size, bs = model.kv_block_size();
  const int total = static_cast<int>(prompt.size()) + steps;
  // Blocks taken from the top of the pool, reversed, so they differ from PrefillAllRows' ones.
  std::vector<int32_t> blocks(KvBlockAllocator::BlocksFor(total, bs));
  for (size_t i = 0; i < blocks.size(); ++i) {
    blocks[i] = model.kv_num_blocks() - 1 - static_cast<int32_t>(i);
  }
  GreedyResult r;
  ForwardBatch b;
  b.token_ids = prompt;
  b.positions.resize(prompt.size());
  std::iota(b.positions.begin(), b.positions.end(), 0);
  int ctx = static_cast<int>(prompt.size());
  b.seqs.push_back({.num_new_tokens = ctx, .context_len = ctx, .block_table = blocks});
  b.logit_rows = {ctx - 1};
  for (int step = 0; step < steps; ++step) {
    std::vector<float> logits;
    absl::Status st = model.Forward(b, &logits);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return r;
    const int best =
        static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    float second = -INFINITY;
    for (int v = 0; v < V; ++v) {
      if (v != best) second = std::max(second, logits[v]);
    }
    r.min_gap = std::min(r.min_gap, static_cast<double>(logits[best] - second));
    r.ids.push_back(best);
    r.logprobs.push_back(LogSoftmaxRows(logits, V)[best]);
    b.token_ids = {best};
    b.positions = {ctx};
    ++ctx;
    b.seqs[0].num_new_tokens = 1;
    b.seqs[0].context_len = ctx;
    b.logit_rows = {0};
  }
  return r;
}

void ExpectGreedyMatches(const GreedyResult& ours, const json& c, const std::string& what) {
  const std::vector<int32_t> want_ids = c.at("greedy_ids").get<std::vector<int32_t>>();
  const std::vector<double> want_lp = c.at("greedy_logprobs").get<std::vector<double>>();
  ASSERT_EQ(want_ids.size(), want_lp.size()) << what;
  EXPECT_EQ(ours.ids, want_ids) << what << " (fixture min_top2_gap "
                                << c.value("min_top2_gap", -1.0) << ", ours " << ours.min_gap
                                << ")";
  ASSERT_EQ(ours.logprobs.size(), want_lp.size()) << what;
  for (size_t i = 0; i < want_lp.size(); ++i) {
    EXPECT_NEAR(ours.logprobs[i], want_lp[i], kLogprobTol) << what << " greedy step " << i;
  }
}

// Compares [rows, V] logits; the bound scales with the largest |logit| of the fixture.
void ExpectLogitsMatch(const std::vector<float>& ours, const std::vector<double>& want,
                       const std::string& what) {
  ASSERT_EQ(ours.size(), want.size()) << what;
  double scale = 1.0, worst = 0.0;
  size_t at = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = std::fabs(ours[i] - want[i]);
    if (!(d <= worst)) worst = d, at = i;  // NaN-safe: a NaN becomes the worst
  }
  EXPECT_LE(worst, kLogitRelTol * scale)
      << what << ": worst |ours - HF| = " << worst << " at flat index " << at << " (logit scale "
      << scale << ")";
  ::testing::Test::RecordProperty(what + "_max_abs_logit_err", std::to_string(worst));
}

class RandomWeightGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(RandomWeightGolden, MatchesTransformersFloat32) {
  const fs::path dir = kGolden / GetParam();
  absl::StatusOr<json> golden = ReadJson(dir / "golden.json");
  ASSERT_TRUE(golden.ok()) << golden.status() << " (fixtures come from tools/gen_golden.py)";
  ASSERT_EQ(golden->at("compute_dtype"), "float32");
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> model = CpuPhiModel::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  CpuPhiModel& m = **model;
  const int V = m.config().vocab_size;
  ASSERT_TRUE(m.AllocateKvCache(16, kKvBlockSize).ok());

  const json& cases = golden->at("cases");
  ASSERT_GE(cases.size(), 5u);
  double worst_seen = 0.0;
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const json& c = cases[ci];
    const std::vector<int32_t> prompt = c.at("prompt_ids").get<std::vector<int32_t>>();
    const std::string what = GetParam() + " case " + std::to_string(ci) + " (" +
                             std::to_string(prompt.size()) + " tokens)";
    std::vector<double> want;
    for (const json& row : c.at("logits")) {
      ASSERT_EQ(row.size(), static_cast<size_t>(V)) << what;
      for (const json& x : row) want.push_back(x.get<double>());
    }
    ASSERT_EQ(want.size(), prompt.size() * V) << what;
    const std::vector<float> ours = PrefillAllRows(m, prompt);
    ExpectLogitsMatch(ours, want, what);
    for (size_t i = 0; i < want.size(); ++i) {
      worst_seen = std::max(worst_seen, std::fabs(ours[i] - want[i]));
    }
    ExpectGreedyMatches(Greedy(m, prompt, static_cast<int>(c.at("greedy_ids").size())), c, what);
  }
  std::cout << GetParam() << ": max |logit - HF| over all cases = " << worst_seen << "\n";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RandomWeightGolden,
                         ::testing::Values("phi-mha-hd64", "phi-gqa-hd80", "phi-qkln-tied",
                                           "phi-rope-linear"));

// The fixtures must exercise what they are named for, or the test above proves less.
TEST(RandomWeightGoldenFixtures, CoverWhatTheyAreNamedFor) {
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> mha = CpuPhiModel::Load(kGolden / "phi-mha-hd64");
  ASSERT_TRUE(mha.ok()) << mha.status();
  EXPECT_EQ((*mha)->config().head_dim, 64);
  EXPECT_EQ((*mha)->config().num_key_value_heads, (*mha)->config().num_attention_heads);
  EXPECT_LT((*mha)->config().rotary_dim, 64);
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> gqa = CpuPhiModel::Load(kGolden / "phi-gqa-hd80");
  ASSERT_TRUE(gqa.ok()) << gqa.status();
  EXPECT_EQ((*gqa)->config().head_dim, 80);
  EXPECT_LT((*gqa)->config().num_key_value_heads, (*gqa)->config().num_attention_heads);
  EXPECT_EQ((*gqa)->config().rotary_dim, 32);
  // q / k LayerNorm and tied embeddings: the file has no lm_head.weight.
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> qkln = CpuPhiModel::Load(kGolden / "phi-qkln-tied");
  ASSERT_TRUE(qkln.ok()) << qkln.status();
  EXPECT_TRUE((*qkln)->config().qk_layernorm);
  EXPECT_TRUE((*qkln)->config().tie_word_embeddings);
  EXPECT_LT((*qkln)->config().num_key_value_heads, (*qkln)->config().num_attention_heads);
  // Linear RoPE scaling, written in the 4.x layout's rope_scaling.
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> lin = CpuPhiModel::Load(kGolden / "phi-rope-linear");
  ASSERT_TRUE(lin.ok()) << lin.status();
  EXPECT_EQ((*lin)->config().rope_linear_factor, 2.0);
}

TEST(TinyPhiCodeGolden, MatchesTransformersFloat32) {
  absl::StatusOr<json> golden = ReadJson(kGolden / "tiny-phi-code.json");
  ASSERT_TRUE(golden.ok()) << golden.status() << " (fixtures come from tools/gen_golden.py)";
  ASSERT_EQ(golden->at("compute_dtype"), "float32");
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> model =
      CpuPhiModel::Load(kRepo / golden->at("model_dir").get<std::string>());
  ASSERT_TRUE(model.ok()) << model.status();
  CpuPhiModel& m = **model;
  const int V = m.config().vocab_size;
  ASSERT_TRUE(m.AllocateKvCache(32, kKvBlockSize).ok());

  const json& cases = golden->at("cases");
  ASSERT_GE(cases.size(), 1u);
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const json& c = cases[ci];
    const std::vector<int32_t> prompt = c.at("prompt_ids").get<std::vector<int32_t>>();
    const std::string what = "tiny-phi-code case " + std::to_string(ci) + " " +
                             json(c.at("prompt").get<std::string>()).dump();
    const std::vector<float> logits = PrefillAllRows(m, prompt);
    ASSERT_EQ(logits.size(), prompt.size() * V) << what;

    const std::vector<double> want_last = c.at("last_logits").get<std::vector<double>>();
    ExpectLogitsMatch(std::vector<float>(logits.end() - V, logits.end()), want_last,
                      what + " last_logits");

    const std::vector<float> lp = LogSoftmaxRows(logits, V);
    const json& want_lp = c.at("prefill_logprobs");
    ASSERT_EQ(want_lp.size(), prompt.size()) << what;
    EXPECT_TRUE(want_lp[0].is_null()) << what;
    for (size_t k = 1; k < prompt.size(); ++k) {
      EXPECT_NEAR(lp[(k - 1) * V + prompt[k]], want_lp[k].get<double>(), kLogprobTol)
          << what << " prefill logprob of prompt token " << k;
    }
    ExpectGreedyMatches(Greedy(m, prompt, static_cast<int>(c.at("greedy_ids").size())), c, what);
  }
}

}  // namespace
}  // namespace phishard
