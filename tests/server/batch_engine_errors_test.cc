// BatchEngine against the fake backend (tests/server/fake_model.h), continued from
// batch_engine_test.cc: every error leaves the engine's state exactly as before (spec §5, §10),
// warmup sizes the KV pool the way the router's startup expects and fails naming the flag to
// change, and randomized operations never leak KV blocks.
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/tokenizer.h"
#include "server/batch_engine.h"
#include "tests/server/batch_engine_fixture.h"
#include "tests/server/engine_test_util.h"
#include "tests/server/fake_model.h"

namespace phishard {
namespace {

using namespace engine_test;  // NOLINT: test helpers
using ::testing::AllOf;
using ::testing::HasSubstr;
using testing_fake::FakeModel;

// Runs `ops` on a fresh engine with two cached batches; `bad` may run failing operations in
// between. Returns the transcript of the good steps.
std::string Scenario(Tokenizer* tok, const std::function<void(BatchEngine*, FakeModel*)>& bad) {
  FakeModel model;
  EXPECT_TRUE(model.AllocateKvCache(40, 16).ok());
  BatchEngine engine(&model, tok, BatchEngineOptions{});
  std::string out;
  RequestInput s = Req(3, Prompt(7, 3), 12);
  s.parameters.do_sample = true;
  s.parameters.seed = 99;
  s.stopping.stop_sequences = {"zzz"};
  out += Describe(*engine.Prefill(Batch(1, {Req(1, Prompt(9, 1), 12), Req(2, Prompt(20, 2), 3)})));
  out += Describe(*engine.Prefill(Batch(2, {s})));
  bad(&engine, &model);
  out += absl::StrCat(" free=", engine.kv_blocks_free(), " n=", engine.num_cached_batches(), "\n");
  out += Describe(*engine.Decode({1, 2}));
  out += Describe(StepResult{{}, *engine.FilterBatch(1, {3, 1})});
  for (int i = 0; i < 4; ++i) out += Describe(*engine.Decode({1}));
  out += absl::StrCat(" free=", engine.kv_blocks_free(), "\n");
  return out;
}

TEST_F(BatchEngineTest, EveryErrorLeavesStateExactlyAsBefore) {
  const std::string control = Scenario(tokenizer_, [](BatchEngine*, FakeModel*) {});
  struct Case {
    std::string name;
    absl::StatusCode code;
    std::string message_part;
    std::function<absl::Status(BatchEngine*, FakeModel*)> op;
  };
  auto prefill = [](BatchInput b) {
    return [b](BatchEngine* e, FakeModel*) { return e->Prefill(b).status(); };
  };
  auto with = [](std::function<void(RequestInput&)> f) {
    RequestInput good = Req(50, Prompt(5, 9), 3);
    RequestInput bad = Req(51, Prompt(5, 8), 3);
    f(bad);
    return Batch(7, {good, bad});
  };
  std::vector<Case> cases = {
      {"decode unknown", absl::StatusCode::kNotFound, "Batch ID 8 not found in cache.",
       [](BatchEngine* e, FakeModel*) {
         return e->Decode({1, 8}).status();
       }},
      {"decode empty", absl::StatusCode::kInvalidArgument, "Must provide at least one batch",
       [](BatchEngine* e, FakeModel*) { return e->Decode({}).status(); }},
      {"decode twice", absl::StatusCode::kInvalidArgument, "more than once",
       [](BatchEngine* e, FakeModel*) {
         return e->Decode({1, 1}).status();
       }},
      {"filter unknown batch", absl::StatusCode::kNotFound, "Batch ID 5 not found in cache.",
       [](BatchEngine* e, FakeModel*) { return e->FilterBatch(5, {1}).status(); }},
      {"filter unknown request", absl::StatusCode::kNotFound, "77",
       [](BatchEngine* e, FakeModel*) {
         return e->FilterBatch(1, {1, 77}).status();
       }},
      {"filter empty", absl::StatusCode::kInvalidArgument, "at least one request",
       [](BatchEngine* e, FakeModel*) { return e->FilterBatch(1, {}).status(); }},
      {"filter duplicate", absl::StatusCode::kInvalidArgument, "twice",
       [](BatchEngine* e, FakeModel*) {
         return e->FilterBatch(1, {1, 1}).status();
       }},
      {"decode forward fails", absl::StatusCode::kInternal, "boom",
       [](BatchEngine* e, FakeModel* m) {
         m->fail_next_forward = absl::InternalError("boom");
         return e->Decode({1, 2}).status();
       }},
      {"prefill forward fails", absl::StatusCode::kInternal, "boom",
       [prefill](BatchEngine* e, FakeModel* m) {
         m->fail_next_forward = absl::InternalError("boom");
         return prefill(Batch(7, {Req(60, Prompt(30, 1), 9)}))(e, m);
       }},
      {"decode NaN logits", absl::StatusCode::kInternal, "logits for request 1 are NaN",
       [](BatchEngine* e, FakeModel* m) {
         m->nan_logits_next_forward = true;
         return e->Decode({1, 2}).status();
       }},
      {"decode NaN logits, sampled row", absl::StatusCode::kInternal,
       "logits for request 3 are NaN",
       [](BatchEngine* e, FakeModel* m) {
         m->nan_logits_next_forward = true;
         return e->Decode({2}).status();
       }},
      {"prefill NaN logits", absl::StatusCode::kInternal, "logits for request 60 are NaN",
       [prefill](BatchEngine* e, FakeModel* m) {
         m->nan_logits_next_forward = true;
         RequestInput sampled = Req(61, Prompt(4, 2), 3);
         sampled.parameters.do_sample = true;
         return prefill(Batch(7, {Req(60, Prompt(30, 1), 9), sampled}))(e, m);
       }},
      {"prefill existing id", absl::StatusCode::kInvalidArgument, "already",
       prefill(Batch(2, {Req(60, Prompt(3, 1), 2)}))},
      {"prefill no requests", absl::StatusCode::kInvalidArgument, "no requests",
       prefill(Batch(7, {}))},
      {"prefill exhausts pool", absl::StatusCode::kResourceExhausted, "KV cache exhausted",
       prefill(Batch(7, {Req(60, Prompt(300, 1), 100), Req(61, Prompt(300, 2), 100)}))},
      {"request larger than pool", absl::StatusCode::kInvalidArgument, "more than the whole cache",
       prefill(Batch(7, {Req(60, Prompt(700, 1), 300)}))},
      {"duplicate ids", absl::StatusCode::kInvalidArgument, "requests[1].id = 60 appears twice",
       prefill(Batch(7, {Req(60, Prompt(3, 1), 2), Req(60, Prompt(3, 2), 2)}))},
      {"token id range", absl::StatusCode::kInvalidArgument,
       "requests[1].tokenized_inputs.ids[2] = 60000 out of range [0, 4095)",
       prefill(with([](RequestInput& r) { r.token_ids[2] = 60000; }))},
      {"negative token id", absl::StatusCode::kInvalidArgument, "tokenized_inputs.ids[0] = -1",
       prefill(with([](RequestInput& r) { r.token_ids[0] = -1; }))},
      {"temperature", absl::StatusCode::kInvalidArgument, "parameters.temperature",
       prefill(with([](RequestInput& r) { r.parameters.temperature = -0.5f; }))},
      {"temperature nan", absl::StatusCode::kInvalidArgument, "parameters.temperature",
       prefill(with([](RequestInput& r) { r.parameters.temperature = std::nanf(""); }))},
      {"top_p", absl::StatusCode::kInvalidArgument, "parameters.top_p",
       prefill(with([](RequestInput& r) { r.parameters.top_p = 0.0f; }))},
      {"top_p > 1", absl::StatusCode::kInvalidArgument, "parameters.top_p",
       prefill(with([](RequestInput& r) { r.parameters.top_p = 1.5f; }))},
      {"typical_p", absl::StatusCode::kInvalidArgument, "parameters.typical_p",
       prefill(with([](RequestInput& r) { r.parameters.typical_p = 0.0f; }))},
      {"repetition_penalty", absl::StatusCode::kInvalidArgument, "parameters.repetition_penalty",
       prefill(with([](RequestInput& r) { r.parameters.repetition_penalty = 0.0f; }))},
      {"frequency_penalty", absl::StatusCode::kInvalidArgument, "parameters.frequency_penalty",
       prefill(with([](RequestInput& r) {
         r.parameters.frequency_penalty = std::numeric_limits<float>::infinity();
       }))},
      {"presence_penalty", absl::StatusCode::kInvalidArgument, "parameters.presence_penalty",
       prefill(with([](RequestInput& r) { r.parameters.presence_penalty = std::nanf(""); }))},
      {"schema", absl::StatusCode::kInvalidArgument, "parameters.schema",
       prefill(with([](RequestInput& r) { r.parameters.schema = "{}"; }))},
      {"max_new_tokens 0", absl::StatusCode::kInvalidArgument,
       "requests[1].stopping_parameters.max_new_tokens",
       prefill(with([](RequestInput& r) { r.stopping.max_new_tokens = 0; }))},
      {"over max positions", absl::StatusCode::kInvalidArgument, "max_position_embeddings 1024",
       prefill(with([](RequestInput& r) { r.stopping.max_new_tokens = 1020; }))},
      {"prompt alone fills the positions", absl::StatusCode::kInvalidArgument,
       "requests[0].inputs has 1024 tokens after truncation (truncate = 0",
       [prefill](BatchEngine* e, FakeModel* m) {
         RequestInput r = Req(60, Prompt(1024, 8), 1);
         r.truncate = 0;  // keep everything
         return prefill(Batch(7, {r}))(e, m);
       }},
      {"empty prompt", absl::StatusCode::kInvalidArgument, "requests[1].inputs is empty",
       prefill(with([](RequestInput& r) {
         r.token_ids.clear();
         r.inputs = "";
       }))},
      {"invalid utf8", absl::StatusCode::kInvalidArgument, "requests[1].inputs is not valid UTF-8",
       prefill(with([](RequestInput& r) {
         r.token_ids.clear();
         r.inputs = "abc\xff\xfe";
       }))},
      {"cache_len", absl::StatusCode::kInvalidArgument, "requests[1].cache_len",
       prefill(with([](RequestInput& r) { r.cache_len = 2; }))},
      {"chunk_len", absl::StatusCode::kInvalidArgument, "requests[1].chunk_len",
       prefill(with([](RequestInput& r) { r.chunk_len = 2; }))},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    absl::Status seen;
    const std::string t = Scenario(tokenizer_, [&](BatchEngine* e, FakeModel* m) {
      const int free_before = e->kv_blocks_free();
      const size_t batches_before = e->num_cached_batches();
      seen = c.op(e, m);
      EXPECT_EQ(e->kv_blocks_free(), free_before);
      EXPECT_EQ(e->num_cached_batches(), batches_before);
    });
    EXPECT_EQ(seen.code(), c.code) << seen;
    EXPECT_THAT(std::string(seen.message()), HasSubstr(c.message_part));
    EXPECT_EQ(t, control);
  }
}

TEST_F(BatchEngineTest, UnknownAdapterIndexIsBaseModel) {
  FakeModel model;
  auto engine = MakeEngine(&model);
  RequestInput r = Req(1, Prompt(6, 1), 2);
  r.adapter_index = 7;
  auto out = engine->Prefill(Batch(0, {r}));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->generations[0].next_tokens.ids[0], ReferenceGreedy(r.token_ids, 1)[0]);
}

TEST_F(BatchEngineTest, PrefillBeforeWarmupIsFailedPrecondition) {
  FakeModel model;  // no pool
  BatchEngine engine(&model, tokenizer_, BatchEngineOptions{});
  auto r = engine.Prefill(Batch(0, {Req(1, {1, 2}, 2)}));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(BatchEngineTest, WarmupWithTheRouterBatchSizesThePool) {
  FakeModel model;
  model.memory_blocks = 1000;
  BatchEngineOptions o;
  o.memory_fraction = 0.5;
  o.memory_wiggle_room = 0.9;
  BatchEngine engine(&model, tokenizer_, o);
  const BatchInput warm = RouterWarmupBatch(1023, 1073, 1024);
  ASSERT_EQ(warm.requests.size(), 2u);
  auto total = engine.Warmup(warm, 1023, 1073, 1024 - 1023);
  ASSERT_TRUE(total.ok()) << total.status();
  // floor(1000 × 0.5 × 0.9) blocks, 64 of them (one request of the fake's 1024 positions) kept
  // for requests without blocks (BatchEngineOptions::unrouted_kv_blocks' default).
  EXPECT_EQ(*total, (450u - 64u) * 16);
  EXPECT_EQ(model.last_max_batch_tokens, 1073);
  EXPECT_EQ(model.kv_num_blocks(), 450);
  EXPECT_EQ(engine.kv_blocks_total(), 450);
  EXPECT_EQ(engine.kv_blocks_free(), 450);
  EXPECT_EQ(engine.kv_blocks_unrouted(), 64);
  EXPECT_EQ(engine.num_cached_batches(), 0u);
  EXPECT_EQ(engine.Decode({0}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(model.forwards, 2);  // one prefill, one decode (the second request is unfinished)
  // Then real traffic works, including the health probe on block 0's batch id (here without
  // blocks: served from the kept tail).
  EXPECT_TRUE(engine.Prefill(Batch(0, {Req(1, {75}, 1)})).ok());
}

TEST_F(BatchEngineTest, WarmupHonoursMaxKvBlocksOption) {
  FakeModel model;
  BatchEngineOptions o;
  o.max_kv_blocks = 200;
  o.unrouted_kv_blocks = 0;  // the whole cap is the router's
  BatchEngine engine(&model, tokenizer_, o);
  auto total = engine.Warmup(RouterWarmupBatch(100, 150, 200), 100, 150, 100);
  ASSERT_TRUE(total.ok()) << total.status();
  EXPECT_EQ(*total, 200u * 16);
  EXPECT_EQ(engine.kv_blocks_total(), 200);
}

TEST_F(BatchEngineTest, WarmupTooLargeIsResourceExhaustedNamingTheFlag) {
  {
    FakeModel model;
    model.memory_blocks = 20;  // 18 blocks after wiggle room: less than the 1073-token prefill
    BatchEngine engine(&model, tokenizer_, BatchEngineOptions{});
    auto total = engine.Warmup(RouterWarmupBatch(1023, 1073, 1024), 1023, 1073, 1);
    EXPECT_EQ(total.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(std::string(total.status().message()), HasSubstr("--max-batch-prefill-tokens"));
    EXPECT_EQ(engine.Prefill(Batch(1, {Req(1, {1}, 1)})).status().code(),
              absl::StatusCode::kFailedPrecondition);
  }
  {
    FakeModel model;
    model.alloc_limit = 10;  // even the temporary warmup pool does not fit
    BatchEngine engine(&model, tokenizer_, BatchEngineOptions{});
    auto total = engine.Warmup(RouterWarmupBatch(1023, 1073, 1024), 1023, 1073, 1);
    EXPECT_EQ(total.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(std::string(total.status().message()),
                HasSubstr("Not enough memory to handle 1073 prefill tokens"));
  }
  {
    FakeModel model;
    model.fail_next_forward = absl::ResourceExhaustedError("fake out of memory");
    BatchEngine engine(&model, tokenizer_, BatchEngineOptions{});
    auto total = engine.Warmup(RouterWarmupBatch(1023, 1073, 1024), 1023, 1073, 1);
    EXPECT_EQ(total.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(std::string(total.status().message()),
                HasSubstr("You need to decrease `--max-batch-prefill-tokens`"));
  }
}

// A launcher whose --max-total-tokens exceeds the model's positions (2048 over 1024 here) gets a
// Warmup refusal that names the flags to change; the engine keeps its state.
TEST_F(BatchEngineTest, WarmupBeyondMaxPositionsNamesTheLauncherFlags) {
  FakeModel model;
  BatchEngineOptions o;
  o.max_kv_blocks = 200;
  BatchEngine engine(&model, tokenizer_, o);
  ASSERT_TRUE(engine.Warmup(RouterWarmupBatch(100, 150, 200), 100, 150, 100).ok());
  ASSERT_TRUE(engine.Prefill(Batch(3, {Req(1, Prompt(5, 1), 5)})).ok());
  auto total = engine.Warmup(RouterWarmupBatch(1023, 1073, 2048), 1023, 1073, 2048 - 1023);
  EXPECT_EQ(total.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(total.status().message()),
              AllOf(HasSubstr("Warmup batch: requests[0]"),
                    HasSubstr("max_position_embeddings 1024"), HasSubstr("--max-total-tokens")));
  EXPECT_EQ(engine.num_cached_batches(), 1u);  // refused before anything was torn down
  EXPECT_EQ(engine.kv_blocks_total(), 200);
}

TEST_F(BatchEngineTest, WarmupDiscardsCachedBatches) {
  FakeModel model;
  BatchEngineOptions o;
  o.max_kv_blocks = 300;
  auto engine = std::make_unique<BatchEngine>(&model, tokenizer_, o);
  ASSERT_TRUE(engine->Warmup(RouterWarmupBatch(100, 150, 200), 100, 150, 100).ok());
  ASSERT_TRUE(engine->Prefill(Batch(3, {Req(1, Prompt(5, 1), 5)})).ok());
  ASSERT_TRUE(engine->Warmup(RouterWarmupBatch(100, 150, 200), 100, 150, 100).ok());
  EXPECT_EQ(engine->num_cached_batches(), 0u);
  EXPECT_EQ(engine->kv_blocks_free(), 300);
}

TEST_F(BatchEngineTest, RandomizedOperationsNeverLeakBlocks) {
  FakeModel model;
  auto engine = MakeEngine(&model, 96);
  RunRandomizedOperations(engine.get(), /*num_blocks=*/96, /*ops=*/1000, /*seed=*/2024,
                          /*max_prompt=*/40);
}

}  // namespace
}  // namespace phishard
