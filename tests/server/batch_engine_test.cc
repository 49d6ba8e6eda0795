// BatchEngine semantics (spec §2.3, §4, §5, §10 checklist) against a deterministic fake backend
// (tests/server/fake_model.h) and the real tiny-phi-code tokenizer. The fake's logits depend on
// every token read back through the block table, so KV bookkeeping mistakes change outputs.
// The same semantics against the real demo model are in batch_engine_tiny_phi_test.cc; error
// paths (state unchanged after each), warmup / pool sizing and the randomized leak check in
// batch_engine_errors_test.cc.
#include "server/batch_engine.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/tokenizer.h"
#include "server/next_token_chooser.h"
#include "tests/server/batch_engine_fixture.h"
#include "tests/server/engine_test_util.h"
#include "tests/server/fake_model.h"

namespace phishard {
namespace {

using namespace engine_test;  // NOLINT: test helpers
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing_fake::FakeModel;

constexpr uint64_t kU64Max = std::numeric_limits<uint64_t>::max();

TEST_F(BatchEngineTest, PrefillOfThreeRequestsChecklist) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  const std::vector<int32_t> p10 = Prompt(7, 10), p11 = Prompt(16, 11), p12 = Prompt(30, 12);
  auto r = engine->Prefill(Batch(5, {Req(10, p10, 5), Req(11, p11, 5), Req(12, p12, 5)}));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->generations.size(), 3u);
  const std::vector<std::vector<int32_t>> prompts = {p10, p11, p12};
  for (int i = 0; i < 3; ++i) {
    const GenerationOut& g = r->generations[i];
    EXPECT_EQ(g.request_id, 10u + i);
    EXPECT_EQ(g.prefill_tokens_length, prompts[i].size());
    EXPECT_FALSE(g.prefill_tokens.has_value());
    ASSERT_EQ(g.next_tokens.ids.size(), 1u);
    EXPECT_EQ(g.next_tokens.ids[0], ReferenceGreedy(prompts[i], 1)[0]);
    EXPECT_NEAR(g.next_tokens.logprobs[0], RefLogprob(prompts[i], g.next_tokens.ids[0]), 1e-5);
    EXPECT_EQ(g.next_tokens.texts.size(), 1u);
    EXPECT_EQ(g.next_tokens.is_special.size(), 1u);
    EXPECT_TRUE(g.next_tokens.alternative_tokens.empty());
    EXPECT_FALSE(g.generated_text.has_value());
  }
  ASSERT_TRUE(r->batch.has_value());
  EXPECT_EQ(r->batch->id, 5u);
  EXPECT_THAT(r->batch->request_ids, ElementsAre(10, 11, 12));
  EXPECT_EQ(r->batch->size, 3u);
  // ceil((P + 5 - 1) / 16) blocks each: 11 → 1, 20 → 2, 34 → 3.
  EXPECT_EQ(r->batch->max_tokens, (1 + 2 + 3) * 16u);
  EXPECT_EQ(r->batch->current_tokens, 3u);
  EXPECT_EQ(engine->kv_blocks_free(), 256 - 6);
  EXPECT_EQ(engine->num_cached_batches(), 1u);
}

TEST_F(BatchEngineTest, GreedyDecodeMatchesReferenceUntilLength) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  const std::vector<int32_t> prompt = Prompt(20, 1);
  const std::vector<int32_t> want = ReferenceGreedy(prompt, 6);
  auto r = engine->Prefill(Batch(1, {Req(7, prompt, 6)}));
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<int32_t> got = {r->generations[0].next_tokens.ids[0]};
  std::vector<int32_t> context = prompt;
  context.push_back(got[0]);
  for (int step = 1; step < 6; ++step) {
    auto d = engine->Decode({1});
    ASSERT_TRUE(d.ok()) << d.status();
    ASSERT_EQ(d->generations.size(), 1u);
    const GenerationOut& g = d->generations[0];
    EXPECT_EQ(g.prefill_tokens_length, 0u);
    EXPECT_FALSE(g.prefill_tokens.has_value());
    EXPECT_NEAR(g.next_tokens.logprobs[0], RefLogprob(context, g.next_tokens.ids[0]), 1e-5);
    got.push_back(g.next_tokens.ids[0]);
    context.push_back(g.next_tokens.ids[0]);
    if (step < 5) {
      EXPECT_FALSE(g.generated_text.has_value());
      ASSERT_TRUE(d->batch.has_value());
    } else {
      ASSERT_TRUE(g.generated_text.has_value());
      EXPECT_EQ(g.generated_text->finish_reason, FinishReason::kLength);
      EXPECT_EQ(g.generated_text->generated_tokens, 6u);
      EXPECT_FALSE(g.generated_text->seed.has_value());
      EXPECT_EQ(g.generated_text->text, tokenizer_->Decode(got, /*skip_special_tokens=*/true));
      EXPECT_FALSE(d->batch.has_value());  // the only request stopped: batch dropped
    }
  }
  EXPECT_EQ(got, want);
  EXPECT_EQ(engine->num_cached_batches(), 0u);
  EXPECT_EQ(engine->kv_blocks_free(), 256);
}

TEST_F(BatchEngineTest, TensorParallelRanksSplitGenerationsAndAgreeOnTheBatch) {
  FakeModel m0, m1;
  auto rank0 = MakeEngine(&m0, 64, 0, 2);
  auto rank1 = MakeEngine(&m1, 64, 1, 2);
  auto batch =
      Batch(3, {Req(10, Prompt(5, 1), 5), Req(11, Prompt(6, 2), 5), Req(12, Prompt(7, 3), 5)});
  auto r0 = rank0->Prefill(batch);
  auto r1 = rank1->Prefill(batch);
  ASSERT_TRUE(r0.ok() && r1.ok());
  ASSERT_EQ(r0->generations.size(), 2u);
  EXPECT_EQ(r0->generations[0].request_id, 10u);
  EXPECT_EQ(r0->generations[1].request_id, 12u);
  ASSERT_EQ(r1->generations.size(), 1u);
  EXPECT_EQ(r1->generations[0].request_id, 11u);
  ASSERT_TRUE(r0->batch && r1->batch);
  EXPECT_EQ(Describe(StepResult{{}, r0->batch}), Describe(StepResult{{}, r1->batch}));
  for (int step = 0; step < 3; ++step) {
    auto d0 = rank0->Decode({3});
    auto d1 = rank1->Decode({3});
    ASSERT_TRUE(d0.ok() && d1.ok());
    EXPECT_EQ(d0->generations.size(), 2u);
    EXPECT_EQ(d1->generations.size(), 1u);
    EXPECT_EQ(Describe(StepResult{{}, d0->batch}), Describe(StepResult{{}, d1->batch}));
  }
  // The health probe's id u64::MAX belongs to rank u64::MAX % 2 = 1 (unsigned arithmetic).
  RequestInput health = Req(kU64Max, {75}, 1);
  health.blocks = {0};
  auto h0 = rank0->Prefill(Batch(kU64Max, {health}));
  auto h1 = rank1->Prefill(Batch(kU64Max, {health}));
  ASSERT_TRUE(h0.ok() && h1.ok());
  EXPECT_TRUE(h0->generations.empty());
  ASSERT_EQ(h1->generations.size(), 1u);
  EXPECT_EQ(h1->generations[0].request_id, kU64Max);
}

TEST_F(BatchEngineTest, HealthProbeBatchFinishesWithoutCachingAnything) {
  FakeModel model;
  auto engine = MakeEngine(&model, 32);
  RequestInput health = Req(kU64Max, {75}, 1);
  health.inputs = "liveness";
  health.truncate = 10;
  health.blocks = {0};
  for (int i = 0; i < 16; ++i) health.slots.push_back(i);
  auto r = engine->Prefill(Batch(kU64Max, {health}));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->generations.size(), 1u);
  ASSERT_TRUE(r->generations[0].generated_text.has_value());
  EXPECT_EQ(r->generations[0].generated_text->finish_reason, FinishReason::kLength);
  EXPECT_EQ(r->generations[0].generated_text->generated_tokens, 1u);
  EXPECT_FALSE(r->batch.has_value());
  EXPECT_EQ(engine->num_cached_batches(), 0u);
  EXPECT_EQ(engine->kv_blocks_free(), 32);
}

TEST_F(BatchEngineTest, FinishedRequestStaysListedAndIsNotFedAgain) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  auto r = engine->Prefill(Batch(0, {Req(1, Prompt(4, 1), 1), Req(2, Prompt(4, 2), 4)}));
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->generations[0].generated_text.has_value());
  EXPECT_FALSE(r->generations[1].generated_text.has_value());
  ASSERT_TRUE(r->batch.has_value());
  EXPECT_THAT(r->batch->request_ids, ElementsAre(1, 2));
  EXPECT_EQ(r->batch->current_tokens, 1u);  // only request 2 is fed next
  const int64_t fed = model.tokens_fed;
  auto d = engine->Decode({0});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(model.tokens_fed - fed, 1);
  ASSERT_EQ(d->generations.size(), 1u);
  EXPECT_EQ(d->generations[0].request_id, 2u);
  EXPECT_THAT(d->batch->request_ids, ElementsAre(1, 2));
}

TEST_F(BatchEngineTest, FilterKeepsGivenOrderAndFreesDroppedBlocks) {
  FakeModel model;
  auto engine = MakeEngine(&model, 64);
  auto r = engine->Prefill(
      Batch(9, {Req(10, Prompt(20, 1), 5), Req(11, Prompt(40, 2), 5), Req(12, Prompt(3, 3), 5)}));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->batch->max_tokens, (2 + 3 + 1) * 16u);
  auto f = engine->FilterBatch(9, {12, 10});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_THAT(f->request_ids, ElementsAre(12, 10));
  EXPECT_EQ(f->id, 9u);
  EXPECT_EQ(f->size, 2u);
  EXPECT_EQ(f->max_tokens, (1 + 2) * 16u);
  EXPECT_EQ(engine->kv_blocks_free(), 64 - 3);
  auto d = engine->Decode({9});
  ASSERT_TRUE(d.ok());
  ASSERT_EQ(d->generations.size(), 2u);
  EXPECT_EQ(d->generations[0].request_id, 12u);
  EXPECT_EQ(d->generations[1].request_id, 10u);
  EXPECT_THAT(d->batch->request_ids, ElementsAre(12, 10));
}

TEST_F(BatchEngineTest, DecodeConcatenatesIntoTheFirstBatchId) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  ASSERT_TRUE(engine->Prefill(Batch(4, {Req(1, Prompt(5, 1), 8)})).ok());
  ASSERT_TRUE(engine->Prefill(Batch(7, {Req(2, Prompt(5, 2), 8), Req(3, Prompt(9, 3), 8)})).ok());
  auto d = engine->Decode({4, 7});
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_EQ(d->generations.size(), 3u);
  EXPECT_EQ(d->generations[0].request_id, 1u);
  EXPECT_EQ(d->generations[2].request_id, 3u);
  EXPECT_EQ(d->batch->id, 4u);
  EXPECT_THAT(d->batch->request_ids, ElementsAre(1, 2, 3));
  EXPECT_EQ(engine->num_cached_batches(), 1u);
  auto gone = engine->Decode({7});
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(gone.status().message(), "Batch ID 7 not found in cache.");
  EXPECT_TRUE(engine->Decode({4}).ok());
}

TEST_F(BatchEngineTest, InterleavedBatchesMatchSeparateRuns) {
  const std::vector<int32_t> pa = Prompt(33, 5), pb = Prompt(17, 6);
  auto run_alone = [&](const std::vector<int32_t>& prompt) {
    FakeModel model;
    auto engine = MakeEngine(&model, 16);
    std::vector<int32_t> out = {
        engine->Prefill(Batch(0, {Req(1, prompt, 12)}))->generations[0].next_tokens.ids[0]};
    while (out.size() < 12) out.push_back(engine->Decode({0})->generations[0].next_tokens.ids[0]);
    return out;
  };
  FakeModel model;
  auto engine = MakeEngine(&model, 16);  // A takes 3 blocks, B 2: block ids interleave
  std::vector<int32_t> a = {
      engine->Prefill(Batch(0, {Req(1, pa, 12)}))->generations[0].next_tokens.ids[0]};
  a.push_back(engine->Decode({0})->generations[0].next_tokens.ids[0]);
  a.push_back(engine->Decode({0})->generations[0].next_tokens.ids[0]);
  std::vector<int32_t> b = {
      engine->Prefill(Batch(1, {Req(2, pb, 12)}))->generations[0].next_tokens.ids[0]};
  std::vector<uint64_t> ids = {0, 1};
  while (a.size() < 12 || b.size() < 12) {
    auto d = engine->Decode(ids);
    ASSERT_TRUE(d.ok()) << d.status();
    ids = {0};
    for (const GenerationOut& g : d->generations) {
      (g.request_id == 1 ? a : b).push_back(g.next_tokens.ids[0]);
    }
  }
  EXPECT_EQ(a, run_alone(pa));
  EXPECT_EQ(b, run_alone(pb));
  EXPECT_EQ(engine->num_cached_batches(), 0u);
  EXPECT_EQ(engine->kv_blocks_free(), 16);
}

TEST_F(BatchEngineTest, PrefillLogprobsFromRawLogits) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  const std::vector<int32_t> prompt = tokenizer_->Encode("def f(x):\n    return x  # 😀");
  RequestInput req = Req(3, prompt, 3);
  req.prefill_logprobs = true;
  RequestInput penalised = req;
  penalised.id = 5;
  penalised.parameters.repetition_penalty = 3.0f;  // must not touch prefill logprobs
  auto r = engine->Prefill(Batch(0, {req, Req(4, Prompt(6, 1), 3), penalised}));
  ASSERT_TRUE(r.ok()) << r.status();
  const GenerationOut& g = r->generations[0];
  // The next token comes from the logits of the last prompt position.
  EXPECT_EQ(g.next_tokens.ids[0], ReferenceGreedy(prompt, 1)[0]);
  EXPECT_NEAR(g.next_tokens.logprobs[0], RefLogprob(prompt, g.next_tokens.ids[0]), 1e-5);
  ASSERT_TRUE(r->generations[2].prefill_tokens.has_value());
  const std::vector<float>& penalised_lp = r->generations[2].prefill_tokens->logprobs;
  ASSERT_EQ(penalised_lp.size(), prompt.size());
  for (size_t k = 1; k < prompt.size(); ++k) {
    EXPECT_EQ(penalised_lp[k], g.prefill_tokens->logprobs[k]) << k;
  }
  ASSERT_TRUE(g.prefill_tokens.has_value());
  const TokensOut& pt = *g.prefill_tokens;
  EXPECT_EQ(pt.ids, prompt);
  ASSERT_EQ(pt.logprobs.size(), prompt.size());
  EXPECT_TRUE(std::isnan(pt.logprobs[0]));
  for (size_t k = 1; k < prompt.size(); ++k) {
    std::vector<int32_t> ctx(prompt.begin(), prompt.begin() + k);
    EXPECT_NEAR(pt.logprobs[k], RefLogprob(ctx, prompt[k]), 1e-5) << k;
  }
  ASSERT_EQ(pt.texts.size(), prompt.size());
  for (size_t k = 0; k < prompt.size(); ++k) {
    EXPECT_TRUE(IsValidUtf8(pt.texts[k]));
    const int32_t one[1] = {prompt[k]};
    EXPECT_EQ(pt.texts[k], tokenizer_->Decode(one, false, false));
  }
  EXPECT_TRUE(pt.is_special.empty());
  EXPECT_FALSE(r->generations[1].prefill_tokens.has_value());
  EXPECT_EQ(r->generations[1].prefill_tokens_length, 6u);
}

TEST_F(BatchEngineTest, TruncationKeepsTheLastTokens) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  const std::vector<int32_t> ids = Prompt(10, 4);
  RequestInput req = Req(1, ids, 2);
  req.truncate = 4;
  req.prefill_logprobs = true;
  auto r = engine->Prefill(Batch(0, {req}));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->generations[0].prefill_tokens_length, 4u);
  EXPECT_EQ(r->generations[0].prefill_tokens->ids, std::vector<int32_t>(ids.end() - 4, ids.end()));
}

TEST_F(BatchEngineTest, TokenizesAllInputsWhenAnyRequestLacksIds) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  RequestInput a = Req(1, {5, 6, 7}, 2);  // has ids, but b has none: everything is tokenized
  a.inputs = "import os\nimport sys\n";
  a.truncate = 3;
  a.prefill_logprobs = true;
  RequestInput b = Req(2, {}, 2);
  b.inputs = "print('hello world')";
  b.truncate = 100;
  b.prefill_logprobs = true;
  auto r = engine->Prefill(Batch(0, {a, b}));
  ASSERT_TRUE(r.ok()) << r.status();
  const std::vector<int32_t> ea = tokenizer_->Encode(a.inputs), eb = tokenizer_->Encode(b.inputs);
  EXPECT_EQ(r->generations[0].prefill_tokens->ids, std::vector<int32_t>(ea.end() - 3, ea.end()));
  EXPECT_EQ(r->generations[1].prefill_tokens->ids, eb);
}

TEST_F(BatchEngineTest, EosTokenStopsAndIsCountedButNotInText) {
  FakeModel model;
  model.eos_at_length = 9;  // 6 prompt tokens + 3 generated → the 4th generated token is EOS
  auto engine = MakeEngine(&model);
  auto r = engine->Prefill(Batch(0, {Req(1, Prompt(6, 2), 10)}));
  ASSERT_TRUE(r.ok());
  std::vector<int32_t> ids = {r->generations[0].next_tokens.ids[0]};
  std::optional<StepResult> last;
  for (int i = 0; i < 3; ++i) {
    auto d = engine->Decode({0});
    ASSERT_TRUE(d.ok());
    ids.push_back(d->generations[0].next_tokens.ids[0]);
    last = *d;
  }
  const GenerationOut& g = last->generations[0];
  EXPECT_EQ(g.next_tokens.ids[0], 0);
  EXPECT_EQ(g.next_tokens.texts[0], "<|endoftext|>");
  EXPECT_TRUE(g.next_tokens.is_special[0]);
  ASSERT_TRUE(g.generated_text.has_value());
  EXPECT_EQ(g.generated_text->finish_reason, FinishReason::kEosToken);
  EXPECT_EQ(g.generated_text->generated_tokens, 4u);
  EXPECT_THAT(g.generated_text->text, ::testing::Not(HasSubstr("<|endoftext|>")));
  ids.pop_back();
  EXPECT_EQ(g.generated_text->text, tokenizer_->Decode(ids, true));
  EXPECT_FALSE(last->batch.has_value());
}

TEST_F(BatchEngineTest, EosOnTheLastAllowedTokenIsLengthAndIgnoreEosContinues) {
  FakeModel model;
  model.eos_at_length = 5;  // 4 prompt tokens + 1 → the 2nd generated token is EOS
  auto engine = MakeEngine(&model);
  RequestInput ignoring = Req(2, Prompt(4, 1), 4);
  ignoring.stopping.ignore_eos_token = true;
  ASSERT_TRUE(engine->Prefill(Batch(0, {Req(1, Prompt(4, 1), 2), ignoring})).ok());
  auto d = engine->Decode({0});
  ASSERT_TRUE(d.ok());
  ASSERT_TRUE(d->generations[0].generated_text.has_value());
  EXPECT_EQ(d->generations[0].next_tokens.ids[0], 0);
  EXPECT_EQ(d->generations[0].generated_text->finish_reason, FinishReason::kLength);
  EXPECT_FALSE(d->generations[1].generated_text.has_value());
  auto d2 = engine->Decode({0});
  auto d3 = engine->Decode({0});
  ASSERT_TRUE(d2.ok() && d3.ok());
  EXPECT_EQ(d2->generations[0].next_tokens.ids[0], 0);
  ASSERT_TRUE(d3->generations[0].generated_text.has_value());
  EXPECT_EQ(d3->generations[0].generated_text->finish_reason, FinishReason::kLength);
  EXPECT_EQ(d3->generations[0].generated_text->generated_tokens, 4u);
}

TEST_F(BatchEngineTest, StopSequenceSpanningTokens) {
  const std::vector<int32_t> prompt = tokenizer_->Encode("import numpy as np\n");
  // First, the free-running text of 12 tokens.
  std::vector<std::string> texts;
  {
    FakeModel model;
    auto engine = MakeEngine(&model);
    auto r = engine->Prefill(Batch(0, {Req(1, prompt, 12)}));
    texts.push_back(r->generations[0].next_tokens.texts[0]);
    for (int i = 1; i < 12; ++i)
      texts.push_back(engine->Decode({0})->generations[0].next_tokens.texts[0]);
  }
  // A stop sequence made of the last character of one token's text and all of the next one's,
  // whose first occurrence in the output is across that boundary. (Matching is "the output ends
  // with S", as upstream's `$`-anchored regex, so S must end where a token's text ends.)
  auto ascii_at = [](const std::string& t, size_t i) {
    return i < t.size() && static_cast<unsigned char>(t[i]) < 0x80;
  };
  int split = -1;
  std::string stop;
  std::string joined = texts[0];
  for (int i = 0; i + 1 < 12 && split < 0; ++i) {
    const std::string& x = texts[i];
    const std::string& y = texts[i + 1];
    if (i >= 1 && !x.empty() && ascii_at(x, x.size() - 1) && !y.empty()) {
      const std::string candidate = x.substr(x.size() - 1) + y;
      if ((joined + y).find(candidate) == joined.size() - 1) {
        split = i;
        stop = candidate;
      }
    }
    joined += y;
  }
  ASSERT_GE(split, 0) << "no usable token boundary in the free-running text";
  SCOPED_TRACE(
      absl::StrCat("stop=[", stop, "] split=", split, " texts=[", absl::StrJoin(texts, "|"), "]"));

  FakeModel model;
  auto engine = MakeEngine(&model);
  RequestInput req = Req(1, prompt, 12);
  req.stopping.stop_sequences = {"never appears", stop};
  auto r = engine->Prefill(Batch(0, {req}));
  ASSERT_TRUE(r.ok());
  std::optional<GeneratedTextOut> done;
  int steps = 1;
  while (!done) {
    auto d = engine->Decode({0});
    ASSERT_TRUE(d.ok());
    ++steps;
    done = d->generations[0].generated_text;
  }
  EXPECT_EQ(done->finish_reason, FinishReason::kStopSequence);
  EXPECT_EQ(steps, split + 2);
  EXPECT_EQ(done->generated_tokens, static_cast<uint32_t>(split + 2));
  EXPECT_TRUE(absl::EndsWith(done->text, stop) || absl::EndsWith(done->text, stop + "\n"))
      << done->text;
}

TEST_F(BatchEngineTest, SamplingReportsSeedAndRngSurvivesFilterAndConcatenate) {
  RequestInput sampled = Req(21, Prompt(12, 7), 10);
  sampled.parameters.temperature = 0.5f;  // auto-enables sampling (do_sample stays false)
  sampled.parameters.seed = 4242;
  // Alone.
  std::vector<int32_t> alone;
  std::optional<GeneratedTextOut> alone_done;
  {
    FakeModel model;
    auto engine = MakeEngine(&model);
    auto r = engine->Prefill(Batch(0, {sampled}));
    alone.push_back(r->generations[0].next_tokens.ids[0]);
    for (int i = 1; i < 10; ++i) {
      auto d = engine->Decode({0});
      alone.push_back(d->generations[0].next_tokens.ids[0]);
      alone_done = d->generations[0].generated_text;
    }
  }
  ASSERT_TRUE(alone_done.has_value());
  EXPECT_EQ(alone_done->seed, std::optional<uint64_t>(4242));
  // Prefilled next to another request, decoded, concatenated behind another batch, filtered.
  FakeModel model;
  auto engine = MakeEngine(&model);
  ASSERT_TRUE(engine->Prefill(Batch(1, {Req(30, Prompt(9, 1), 20)})).ok());
  auto r = engine->Prefill(Batch(2, {Req(31, Prompt(3, 2), 20), sampled}));
  std::vector<int32_t> got = {Find(*r, 21)->next_tokens.ids[0]};
  got.push_back(Find(*engine->Decode({2}), 21)->next_tokens.ids[0]);
  got.push_back(Find(*engine->Decode({1, 2}), 21)->next_tokens.ids[0]);
  ASSERT_TRUE(engine->FilterBatch(1, {21, 30}).ok());
  while (got.size() < 10) got.push_back(Find(*engine->Decode({1}), 21)->next_tokens.ids[0]);
  EXPECT_EQ(got, alone);
}

TEST_F(BatchEngineTest, TemperatureZeroNextToSampledRequestIsGreedyAndFinite) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  RequestInput cold = Req(1, Prompt(8, 3), 1);
  cold.parameters.temperature = 0.0f;
  RequestInput hot = Req(2, Prompt(8, 4), 1);
  hot.parameters.temperature = 0.7f;
  auto r = engine->Prefill(Batch(0, {cold, hot}));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->generations[0].next_tokens.ids[0], ReferenceGreedy(cold.token_ids, 1)[0]);
  EXPECT_TRUE(std::isfinite(r->generations[0].next_tokens.logprobs[0]));
  EXPECT_FALSE(r->generations[0].generated_text->seed.has_value());
  EXPECT_TRUE(r->generations[1].generated_text->seed.has_value());
}

TEST_F(BatchEngineTest, AlternativeTokens) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  RequestInput req = Req(1, Prompt(8, 3), 3);
  req.parameters.return_k_alternatives = 3;
  auto r = engine->Prefill(Batch(0, {req}));
  ASSERT_TRUE(r.ok());
  const TokensOut& t = r->generations[0].next_tokens;
  ASSERT_EQ(t.alternative_tokens.size(), 1u);
  const AlternativeTokensOut& alt = t.alternative_tokens[0];
  ASSERT_EQ(alt.ids.size(), 3u);
  ASSERT_EQ(alt.texts.size(), 3u);
  EXPECT_EQ(alt.ids[0], t.ids[0]);
  EXPECT_EQ(alt.texts[0], t.texts[0]);
  EXPECT_GE(alt.logprobs[0], alt.logprobs[1]);
  EXPECT_GE(alt.logprobs[1], alt.logprobs[2]);
  for (const std::string& s : alt.texts) EXPECT_TRUE(IsValidUtf8(s));
}

TEST_F(BatchEngineTest, ClearCacheByIdPresenceNotValue) {
  FakeModel model;
  auto engine = MakeEngine(&model, 64);
  ASSERT_TRUE(engine->Prefill(Batch(0, {Req(1, Prompt(5, 1), 9)})).ok());
  ASSERT_TRUE(engine->Prefill(Batch(1, {Req(2, Prompt(5, 2), 9)})).ok());
  EXPECT_TRUE(engine->ClearCache(uint64_t{0}).ok());
  EXPECT_EQ(engine->num_cached_batches(), 1u);
  EXPECT_EQ(engine->Decode({0}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(engine->Decode({1}).ok());
  EXPECT_TRUE(engine->ClearCache(uint64_t{12345}).ok());  // unknown id: OK
  EXPECT_EQ(engine->num_cached_batches(), 1u);
  EXPECT_TRUE(engine->ClearCache(std::nullopt).ok());
  EXPECT_EQ(engine->num_cached_batches(), 0u);
  EXPECT_EQ(engine->kv_blocks_free(), 64);
  EXPECT_EQ(engine->Decode({1}).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace phishard
