// BatchEngine against the real demo model models/tiny-phi-code on the CPU float32 backend: the
// spec §10 checklist items for Prefill/Decode/Filter/Concatenate/ClearCache/Warmup and token
// selection, plus the randomized operation sequence. References come from a second, independent
// backend instance running a plain prefill over the full context.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/model_factory.h"
#include "model/tokenizer.h"
#include "server/batch_engine.h"
#include "server/next_token_chooser.h"
#include "tests/server/engine_test_util.h"

namespace phishard {
namespace {

using namespace engine_test;  // NOLINT: test helpers
using ::testing::ElementsAre;

// Logits of the same float32 model computed by a paged decode step and by one prefill over the
// whole context differ only in summation order (attention over blocks vs. one pass): observed
// differences are ~1e-5; 1e-3 leaves room without hiding a wrong row or position (those move
// logprobs by O(1)).
constexpr double kLogprobTol = 1e-3;

class TinyPhiEngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tok = Tokenizer::FromDir(ModelDir());
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok).release();
  }
  static void TearDownTestSuite() { delete tokenizer_; }
  static std::string ModelDir() { return std::string(PHISHARD_MODELS) + "/tiny-phi-code"; }

  static std::unique_ptr<ModelBackend> LoadModel() {
    ModelLoadOptions o;
    o.model_dir = ModelDir();
    o.device = "cpu";
    auto m = CreateModelBackend(o);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }

  static BatchEngineOptions Options(int rank = 0, int world_size = 1) {
    BatchEngineOptions o;
    o.rank = rank;
    o.world_size = world_size;
    o.eos_token_ids = {0};  // generation_config.json eos_token_id
    return o;
  }

  // Engine over a freshly loaded model whose pool (`blocks` blocks) is adopted without Warmup.
  struct Rig {
    std::unique_ptr<ModelBackend> model;
    std::unique_ptr<BatchEngine> engine;
  };
  static Rig MakeRig(int blocks = 256, int rank = 0, int world_size = 1) {
    Rig rig;
    rig.model = LoadModel();
    EXPECT_TRUE(rig.model->AllocateKvCache(blocks, 16).ok());
    rig.engine =
        std::make_unique<BatchEngine>(rig.model.get(), tokenizer_, Options(rank, world_size));
    return rig;
  }

  // Raw logits rows [context.size(), V] of a plain prefill over `context` on the reference model.
  static std::vector<std::vector<float>> RawLogits(const std::vector<int32_t>& context) {
    if (!reference_) {
      reference_ = LoadModel().release();
      EXPECT_TRUE(reference_->AllocateKvCache(128, 16).ok());
    }
    ForwardBatch fb;
    fb.token_ids = context;
    SequenceInput seq;
    seq.num_new_tokens = seq.context_len = static_cast<int>(context.size());
    for (int b = 0; b * 16 < seq.context_len; ++b) seq.block_table.push_back(b);
    fb.seqs.push_back(seq);
    for (int i = 0; i < seq.context_len; ++i) {
      fb.positions.push_back(i);
      fb.logit_rows.push_back(i);
    }
    std::vector<float> flat;
    EXPECT_TRUE(reference_->Forward(fb, &flat).ok());
    const int v = reference_->config().vocab_size;
    std::vector<std::vector<float>> rows;
    for (size_t i = 0; i < context.size(); ++i) {
      rows.emplace_back(flat.begin() + i * v, flat.begin() + (i + 1) * v);
    }
    return rows;
  }

  // Greedy continuation through the engine (alone in its batch): ids and per-step generations.
  static std::vector<GenerationOut> Generate(BatchEngine* engine, RequestInput req, uint64_t bid) {
    std::vector<GenerationOut> gens;
    auto r = engine->Prefill(Batch(bid, {req}));
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return gens;
    gens.push_back(r->generations[0]);
    while (!gens.back().generated_text.has_value()) {
      auto d = engine->Decode({bid});
      EXPECT_TRUE(d.ok()) << d.status();
      if (!d.ok()) break;
      gens.push_back(d->generations[0]);
    }
    return gens;
  }

  static Tokenizer* tokenizer_;
  static ModelBackend* reference_;
};
Tokenizer* TinyPhiEngineTest::tokenizer_ = nullptr;
ModelBackend* TinyPhiEngineTest::reference_ = nullptr;

RequestInput TextReq(uint64_t id, const Tokenizer& tok, const std::string& text, uint32_t max_new) {
  RequestInput r = Req(id, tok.Encode(text), max_new);
  r.inputs = text;
  return r;
}

TEST_F(TinyPhiEngineTest, WarmupWithTheRouterBatchThenServe) {
  std::unique_ptr<ModelBackend> model = LoadModel();
  BatchEngineOptions o = Options();
  o.memory_fraction = 0.02;  // keep the CPU pool small on a shared test machine
  BatchEngine engine(model.get(), tokenizer_, o);
  // Launcher defaults for max_position_embeddings = 1024: I = 1023, Pmax = 1073, Tt = 1024.
  auto total = engine.Warmup(RouterWarmupBatch(1023, 1073, 1024), 1023, 1073, 1);
  ASSERT_TRUE(total.ok()) << total.status();
  EXPECT_GT(*total, 1073u);
  EXPECT_EQ(*total % 16, 0u);
  // The router's part: the pool less the blocks kept for requests without `blocks` (by default
  // one request of the model's 1024 positions).
  EXPECT_EQ(engine.kv_blocks_unrouted(), 64);
  EXPECT_EQ(static_cast<int>(*total / 16), engine.kv_blocks_total() - 64);
  EXPECT_EQ(model->kv_num_blocks(), engine.kv_blocks_total());
  EXPECT_EQ(engine.kv_blocks_free(), engine.kv_blocks_total());
  EXPECT_EQ(engine.num_cached_batches(), 0u);
  EXPECT_EQ(engine.Decode({0}).status().code(), absl::StatusCode::kNotFound);
  auto r = engine.Prefill(Batch(0, {TextReq(0, *tokenizer_, "import os\n", 3)}));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->batch.has_value());
}

TEST_F(TinyPhiEngineTest, GreedyMatchesTheReadmeAndRawLogprobs) {
  Rig rig = MakeRig();
  const RequestInput req = TextReq(1, *tokenizer_, "import os\n", 16);
  const std::vector<GenerationOut> gens = Generate(rig.engine.get(), req, 0);
  ASSERT_EQ(gens.size(), 16u);
  std::vector<int32_t> context = req.token_ids;
  std::string streamed;
  for (const GenerationOut& g : gens) {
    ASSERT_EQ(g.next_tokens.ids.size(), 1u);
    const int32_t id = g.next_tokens.ids[0];
    const std::vector<float> row = RawLogits(context).back();
    EXPECT_EQ(id, std::max_element(row.begin(), row.end()) - row.begin());
    EXPECT_NEAR(g.next_tokens.logprobs[0], row[id] - LogSumExp(row), kLogprobTol);
    context.push_back(id);
    streamed += g.next_tokens.texts[0];
  }
  const GeneratedTextOut& done = *gens.back().generated_text;
  EXPECT_EQ(done.finish_reason, FinishReason::kLength);
  EXPECT_EQ(done.generated_tokens, 16u);
  EXPECT_FALSE(done.seed.has_value());
  EXPECT_EQ(streamed, done.text);
  // README: transformers (fp32 compute from these weights) continues with this text.
  EXPECT_TRUE(absl::StartsWith(
      "from pathlib import Path\nfrom typing import Any, Optional, Union\n\nimport torch\n",
      done.text.substr(0, 40)))
      << done.text;
}

TEST_F(TinyPhiEngineTest, RepetitionPenaltyLogprobsComeFromPenalisedLogits) {
  Rig rig = MakeRig();
  RequestInput req = TextReq(1, *tokenizer_, "def add(a, b):\n    return a", 6);
  req.parameters.repetition_penalty = 1.7f;
  const std::vector<GenerationOut> gens = Generate(rig.engine.get(), req, 0);
  ASSERT_EQ(gens.size(), 6u);
  std::vector<int32_t> context = req.token_ids;
  for (const GenerationOut& g : gens) {
    std::vector<float> row = RawLogits(context).back();
    std::vector<bool> seen(row.size(), false);
    for (int32_t t : context) {
      if (seen[t]) continue;
      seen[t] = true;
      row[t] = row[t] < 0 ? row[t] * 1.7f : row[t] / 1.7f;
    }
    const int32_t id = g.next_tokens.ids[0];
    EXPECT_EQ(id, std::max_element(row.begin(), row.end()) - row.begin());
    EXPECT_NEAR(g.next_tokens.logprobs[0], row[id] - LogSumExp(row), kLogprobTol);
    context.push_back(id);
  }
}

TEST_F(TinyPhiEngineTest, TopKOneSamplingIsArgmaxWithLogprobZero) {
  Rig rig = MakeRig();
  RequestInput req = TextReq(1, *tokenizer_, "class Config:\n", 5);
  req.parameters.do_sample = true;
  req.parameters.top_k = 1;
  req.parameters.seed = 31337;
  RequestInput greedy = req;
  greedy.parameters = SamplingParams{};
  const std::vector<GenerationOut> s = Generate(rig.engine.get(), req, 0);
  const std::vector<GenerationOut> g = Generate(rig.engine.get(), greedy, 1);
  ASSERT_EQ(s.size(), g.size());
  for (size_t i = 0; i < s.size(); ++i) {
    EXPECT_EQ(s[i].next_tokens.ids, g[i].next_tokens.ids);
    EXPECT_EQ(s[i].next_tokens.logprobs[0], 0.0f);
  }
  EXPECT_EQ(s.back().generated_text->seed, std::optional<uint64_t>(31337));
  EXPECT_FALSE(g.back().generated_text->seed.has_value());
}

TEST_F(TinyPhiEngineTest, SameSeedSameTokensAcrossRunsAndBatchCompositions) {
  RequestInput req = TextReq(7, *tokenizer_, "import numpy as np\n", 20);
  req.parameters.temperature = 0.8f;
  req.parameters.top_p = 0.95f;
  req.parameters.seed = 123456789;
  auto ids_of = [](const std::vector<GenerationOut>& gens) {
    std::vector<int32_t> ids;
    for (const GenerationOut& g : gens) ids.push_back(g.next_tokens.ids[0]);
    return ids;
  };
  Rig a = MakeRig();
  const std::vector<int32_t> alone = ids_of(Generate(a.engine.get(), req, 0));
  Rig b = MakeRig();
  EXPECT_EQ(ids_of(Generate(b.engine.get(), req, 0)), alone);
  // Next to two other requests, one of them sampled too.
  Rig c = MakeRig();
  RequestInput other = TextReq(8, *tokenizer_, "while True:\n", 30);
  other.parameters.do_sample = true;
  other.parameters.seed = 5;
  auto r = c.engine->Prefill(Batch(0, {TextReq(6, *tokenizer_, "# comment\n", 30), req, other}));
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<int32_t> mixed = {Find(*r, 7)->next_tokens.ids[0]};
  while (mixed.size() < 20) {
    auto d = c.engine->Decode({0});
    ASSERT_TRUE(d.ok()) << d.status();
    mixed.push_back(Find(*d, 7)->next_tokens.ids[0]);
  }
  EXPECT_EQ(mixed, alone);
  std::set<int32_t> distinct(alone.begin(), alone.end());
  EXPECT_GT(distinct.size(), 3u);
}

TEST_F(TinyPhiEngineTest, PrefillOfThreeRequestsAndTensorParallelSplit) {
  // Router-style blocks/slots (Info.requires_block_allocator), taken from the pool's tail as the
  // router's allocator does: they are the requests' block tables.
  auto make = [&] {
    std::vector<RequestInput> reqs;
    const char* texts[] = {"import os\n", "def main():\n    print(",
                           "x = [1, 2, 3]\nfor i in x:\n"};
    uint32_t next = 63;
    for (int i = 0; i < 3; ++i) {
      RequestInput r = TextReq(10 + i, *tokenizer_, texts[i], 5);
      const uint32_t tokens = static_cast<uint32_t>(r.token_ids.size()) + 5 - 1;
      for (uint32_t b = 0; b < (tokens + 15) / 16; ++b) r.blocks.push_back(next--);
      for (uint32_t p = 0; p < tokens; ++p) r.slots.push_back(r.blocks[p / 16] * 16 + p % 16);
      reqs.push_back(r);
    }
    return Batch(42, reqs);
  };
  const BatchInput batch = make();
  Rig solo = MakeRig(64);
  auto r = solo.engine->Prefill(batch);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->generations.size(), 3u);
  uint32_t blocks = 0;
  for (int i = 0; i < 3; ++i) {
    const uint32_t p = static_cast<uint32_t>(batch.requests[i].token_ids.size());
    EXPECT_EQ(r->generations[i].request_id, 10u + i);
    EXPECT_EQ(r->generations[i].prefill_tokens_length, p);
    EXPECT_EQ(r->generations[i].next_tokens.ids.size(), 1u);
    blocks += (p + 5 - 1 + 15) / 16;
  }
  ASSERT_TRUE(r->batch.has_value());
  EXPECT_EQ(r->batch->id, 42u);
  EXPECT_THAT(r->batch->request_ids, ElementsAre(10, 11, 12));
  EXPECT_EQ(r->batch->size, 3u);
  EXPECT_EQ(r->batch->max_tokens, blocks * 16);
  EXPECT_EQ(r->batch->current_tokens, 3u);

  Rig rank0 = MakeRig(64, 0, 2), rank1 = MakeRig(64, 1, 2);
  auto r0 = rank0.engine->Prefill(batch);
  auto r1 = rank1.engine->Prefill(batch);
  ASSERT_TRUE(r0.ok() && r1.ok());
  ASSERT_EQ(r0->generations.size(), 2u);
  EXPECT_EQ(r0->generations[0].request_id, 10u);
  EXPECT_EQ(r0->generations[1].request_id, 12u);
  ASSERT_EQ(r1->generations.size(), 1u);
  EXPECT_EQ(r1->generations[0].request_id, 11u);
  EXPECT_EQ(Describe(StepResult{{}, r0->batch}), Describe(StepResult{{}, r1->batch}));
  EXPECT_EQ(r0->generations[0].next_tokens.ids, r->generations[0].next_tokens.ids);
  EXPECT_EQ(r1->generations[0].next_tokens.ids, r->generations[1].next_tokens.ids);
}

TEST_F(TinyPhiEngineTest, FilterConcatenateAndClearCache) {
  Rig rig = MakeRig(64);
  BatchEngine& e = *rig.engine;
  ASSERT_TRUE(e.Prefill(Batch(0, {TextReq(10, *tokenizer_, "import os\n", 8),
                                  TextReq(11, *tokenizer_, "import sys\n", 8),
                                  TextReq(12, *tokenizer_, "import re\n", 8)}))
                  .ok());
  ASSERT_TRUE(e.Prefill(Batch(1, {TextReq(20, *tokenizer_, "def f():\n", 8)})).ok());
  auto f = e.FilterBatch(0, {12, 10});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_THAT(f->request_ids, ElementsAre(12, 10));
  EXPECT_EQ(f->size, 2u);
  EXPECT_EQ(f->max_tokens, 2 * 16u);
  auto d = e.Decode({0, 1});
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_EQ(d->generations.size(), 3u);
  EXPECT_EQ(d->generations[0].request_id, 12u);
  EXPECT_EQ(d->generations[1].request_id, 10u);
  EXPECT_EQ(d->generations[2].request_id, 20u);
  EXPECT_EQ(d->batch->id, 0u);
  EXPECT_THAT(d->batch->request_ids, ElementsAre(12, 10, 20));
  auto gone = e.Decode({1});
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(gone.status().message(), "Batch ID 1 not found in cache.");
  ASSERT_TRUE(e.Prefill(Batch(5, {TextReq(30, *tokenizer_, "x = 1\n", 8)})).ok());
  EXPECT_TRUE(e.ClearCache(uint64_t{0}).ok());
  EXPECT_EQ(e.Decode({0}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(e.Decode({5}).ok());
  EXPECT_TRUE(e.ClearCache(std::nullopt).ok());
  EXPECT_EQ(e.num_cached_batches(), 0u);
  EXPECT_EQ(e.kv_blocks_free(), 64);
}

TEST_F(TinyPhiEngineTest, InterleavedBatchesMatchSeparateRuns) {
  const RequestInput a =
      TextReq(1, *tokenizer_, "import os\nimport sys\n\n\ndef main(argv):\n", 24);
  const RequestInput b =
      TextReq(2, *tokenizer_, "class Point:\n    def __init__(self, x, y):\n", 24);
  auto ids = [](const std::vector<GenerationOut>& gens) {
    std::vector<int32_t> out;
    for (const GenerationOut& g : gens) out.push_back(g.next_tokens.ids[0]);
    return out;
  };
  Rig ra = MakeRig(16), rb = MakeRig(16);
  const std::vector<int32_t> alone_a = ids(Generate(ra.engine.get(), a, 0));
  const std::vector<int32_t> alone_b = ids(Generate(rb.engine.get(), b, 0));

  Rig rig = MakeRig(16);
  std::vector<int32_t> got_a = {
      rig.engine->Prefill(Batch(0, {a}))->generations[0].next_tokens.ids[0]};
  for (int i = 0; i < 5; ++i) {
    got_a.push_back(rig.engine->Decode({0})->generations[0].next_tokens.ids[0]);
  }
  std::vector<int32_t> got_b = {
      rig.engine->Prefill(Batch(1, {b}))->generations[0].next_tokens.ids[0]};
  std::vector<uint64_t> list = {0, 1};
  while (got_a.size() < 24 || got_b.size() < 24) {
    auto d = rig.engine->Decode(list);
    ASSERT_TRUE(d.ok()) << d.status();
    list = {0};
    for (const GenerationOut& g : d->generations) {
      (g.request_id == 1 ? got_a : got_b).push_back(g.next_tokens.ids[0]);
    }
  }
  EXPECT_EQ(got_a, alone_a);
  EXPECT_EQ(got_b, alone_b);
  EXPECT_EQ(rig.engine->kv_blocks_free(), 16);
}

TEST_F(TinyPhiEngineTest, PrefillLogprobsTruncationAndTokenization) {
  Rig rig = MakeRig();
  const std::string text = "def greet(name):\n    return f\"Hello, {name}! 😀\"\n";
  RequestInput full = TextReq(1, *tokenizer_, text, 2);
  full.prefill_logprobs = true;
  RequestInput cut = Req(2, std::vector<int32_t>(full.token_ids), 2);
  cut.truncate = 4;
  cut.prefill_logprobs = true;
  auto r = rig.engine->Prefill(Batch(0, {full, cut}));
  ASSERT_TRUE(r.ok()) << r.status();
  const TokensOut& pt = *r->generations[0].prefill_tokens;
  EXPECT_EQ(pt.ids, full.token_ids);
  EXPECT_TRUE(std::isnan(pt.logprobs[0]));
  EXPECT_TRUE(pt.is_special.empty());
  const std::vector<std::vector<float>> rows = RawLogits(full.token_ids);
  for (size_t k = 1; k < pt.ids.size(); ++k) {
    EXPECT_NEAR(pt.logprobs[k], rows[k - 1][pt.ids[k]] - LogSumExp(rows[k - 1]), kLogprobTol);
  }
  for (const std::string& t : pt.texts) EXPECT_TRUE(IsValidUtf8(t));
  EXPECT_EQ(r->generations[1].prefill_tokens_length, 4u);
  EXPECT_EQ(r->generations[1].prefill_tokens->ids,
            std::vector<int32_t>(full.token_ids.end() - 4, full.token_ids.end()));

  // One request without ids: every request's `inputs` is tokenized, truncated from the left.
  RequestInput a = Req(3, {1, 2, 3}, 2);
  a.inputs = text;
  a.truncate = 5;
  a.prefill_logprobs = true;
  RequestInput b = Req(4, {}, 2);
  b.inputs = "print(1)";
  auto t = rig.engine->Prefill(Batch(1, {a, b}));
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->generations[0].prefill_tokens->ids,
            std::vector<int32_t>(full.token_ids.end() - 5, full.token_ids.end()));
  EXPECT_EQ(t->generations[1].prefill_tokens_length, tokenizer_->Encode("print(1)").size());
}

TEST_F(TinyPhiEngineTest, HealthProbeBatch) {
  Rig rig = MakeRig(8);
  RequestInput h = Req(std::numeric_limits<uint64_t>::max(), {75}, 1);
  h.inputs = "liveness";
  h.truncate = 10;
  h.blocks = {0};
  for (int i = 0; i < 16; ++i) h.slots.push_back(i);
  auto r = rig.engine->Prefill(Batch(std::numeric_limits<uint64_t>::max(), {h}));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->generations.size(), 1u);
  EXPECT_EQ(r->generations[0].generated_text->finish_reason, FinishReason::kLength);
  EXPECT_FALSE(r->batch.has_value());
  EXPECT_EQ(rig.engine->kv_blocks_free(), 8);
}

TEST_F(TinyPhiEngineTest, DoubleNewlineStopSequence) {
  Rig rig = MakeRig();
  RequestInput req = TextReq(1, *tokenizer_, "import os\n", 40);
  req.stopping.stop_sequences = {"\n\n"};
  const std::vector<GenerationOut> gens = Generate(rig.engine.get(), req, 0);
  ASSERT_FALSE(gens.empty());
  const GeneratedTextOut& done = *gens.back().generated_text;
  EXPECT_EQ(done.finish_reason, FinishReason::kStopSequence);
  EXPECT_TRUE(absl::EndsWith(done.text, "\n\n") || absl::EndsWith(done.text, "\n\n\n"))
      << done.text;
  EXPECT_LT(done.generated_tokens, 40u);
  EXPECT_EQ(done.generated_tokens, gens.size());
}

TEST_F(TinyPhiEngineTest, AlternativesAndTemperatureZeroNextToSampling) {
  Rig rig = MakeRig();
  RequestInput alt = TextReq(1, *tokenizer_, "for i in range(", 3);
  alt.parameters.return_k_alternatives = 3;
  RequestInput cold = TextReq(2, *tokenizer_, "for i in range(", 3);
  cold.parameters.temperature = 0.0f;
  RequestInput hot = TextReq(3, *tokenizer_, "for i in range(", 3);
  hot.parameters.temperature = 0.7f;
  auto r = rig.engine->Prefill(Batch(0, {alt, cold, hot}));
  ASSERT_TRUE(r.ok()) << r.status();
  const TokensOut& t = r->generations[0].next_tokens;
  ASSERT_EQ(t.alternative_tokens.size(), 1u);
  const AlternativeTokensOut& a = t.alternative_tokens[0];
  ASSERT_EQ(a.ids.size(), 3u);
  EXPECT_EQ(a.ids[0], t.ids[0]);
  EXPECT_GE(a.logprobs[0], a.logprobs[1]);
  EXPECT_GE(a.logprobs[1], a.logprobs[2]);
  // Temperature 0 is greedy and finite even though its neighbour samples.
  EXPECT_EQ(r->generations[1].next_tokens.ids, t.ids);
  EXPECT_TRUE(std::isfinite(r->generations[1].next_tokens.logprobs[0]));
}

TEST_F(TinyPhiEngineTest, RandomizedOperationsNeverLeakBlocks) {
  Rig rig = MakeRig(96);
  RunRandomizedOperations(rig.engine.get(), /*num_blocks=*/96, /*ops=*/1000, /*seed=*/77,
                          /*max_prompt=*/40);
}

}  // namespace
}  // namespace phishard
