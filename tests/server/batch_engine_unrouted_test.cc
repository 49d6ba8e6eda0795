// Requests without `blocks` after Warmup (a user's grpcurl or `phishard client` poking a shard the
// LoRAX router drives) against the router's block allocator (spec §3.1 step 6, §3.4): Warmup
// reports the pool minus the tail kept for such requests (BatchEngineOptions::unrouted_kv_blocks),
// they are served from that tail only, so the router's blocks [1, T/16) are never held when it
// hands them out, and a full tail (or none) is RESOURCE_EXHAUSTED naming the flag. The fake
// backend reads every position back through the block table, so a shared block would also show
// as a wrong token.
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/batch_engine.h"
#include "tests/server/batch_engine_fixture.h"
#include "tests/server/engine_test_util.h"
#include "tests/server/fake_model.h"

namespace phishard {
namespace {

using namespace engine_test;  // NOLINT: test helpers
using ::testing::HasSubstr;
using testing_fake::FakeModel;

// The router's allocator over the `num_blocks` blocks Warmup reported: block 0 kept for the health
// probe, ceil((P + max_new_tokens - 1) / 16) ids a request from the free list's tail.
class RouterAllocator {
 public:
  explicit RouterAllocator(uint32_t num_blocks) {
    for (uint32_t b = 1; b < num_blocks; ++b) free_.push_back(b);
  }
  bool Assign(RequestInput* r) {
    const size_t tokens = r->token_ids.size() + r->stopping.max_new_tokens - 1;
    const size_t n = (tokens + 15) / 16;
    if (n > free_.size()) return false;
    r->blocks.assign(free_.end() - static_cast<ptrdiff_t>(n), free_.end());
    free_.resize(free_.size() - n);
    return true;
  }
  size_t num_free() const { return free_.size(); }

 private:
  std::vector<uint32_t> free_;
};

// Decodes `ids` together, filtering finished requests as the router does, to the end; records
// every token.
void DecodeToTheEnd(BatchEngine* engine, std::vector<uint64_t> ids,
                    std::map<uint64_t, std::vector<int32_t>>* tokens,
                    std::map<uint64_t, bool>* done) {
  for (int step = 0; step < 200 && !ids.empty(); ++step) {
    absl::StatusOr<StepResult> d = engine->Decode(ids);
    ASSERT_TRUE(d.ok()) << d.status();
    for (const GenerationOut& g : d->generations) {
      (*tokens)[g.request_id].push_back(g.next_tokens.ids[0]);
      if (g.generated_text) (*done)[g.request_id] = true;
    }
    if (!d->batch) return;
    std::vector<uint64_t> keep;
    for (uint64_t r : d->batch->request_ids) {
      if (!(*done)[r]) keep.push_back(r);
    }
    if (keep.size() != d->batch->request_ids.size()) {
      ASSERT_TRUE(engine->FilterBatch(d->batch->id, keep).ok());
    }
    ids = {d->batch->id};
  }
  ASSERT_TRUE(ids.empty() || engine->num_cached_batches() == 0) << "never finished";
}

class UnroutedBlocksTest : public engine_test::BatchEngineTest {
 protected:
  // Warmup over a pool of `pool` blocks of which `unrouted` are kept back; the router's batch
  // of §3.2 for a 100-token input budget.
  static absl::StatusOr<uint32_t> WarmUp(BatchEngine* engine) {
    return engine->Warmup(RouterWarmupBatch(100, 150, 200), 100, 150, 100);
  }
  static BatchEngineOptions Options(int pool, int unrouted) {
    BatchEngineOptions o;
    o.max_kv_blocks = pool;
    o.unrouted_kv_blocks = unrouted;
    return o;
  }
};

// Pokes without blocks before, between and after router batches that fill every block the router
// owns: the router's requests never meet FAILED_PRECONDITION, the pokes are served from the tail
// until it is full and then refused without touching anything, the health probe still runs on
// block 0, and every output is the fake's greedy continuation.
TEST_F(UnroutedBlocksTest, PokesWithoutBlocksNeverHoldTheRoutersBlocks) {
  FakeModel model;
  BatchEngine engine(&model, tokenizer_, Options(40, 8));
  absl::StatusOr<uint32_t> total = WarmUp(&engine);
  ASSERT_TRUE(total.ok()) << total.status();
  EXPECT_EQ(*total, 32u * 16u) << "Warmup reports the router's part only";
  EXPECT_EQ(engine.kv_blocks_total(), 40);
  EXPECT_EQ(engine.kv_blocks_unrouted(), 8);
  RouterAllocator router(*total / 16);

  std::map<uint64_t, std::vector<int32_t>> prompts, tokens;
  std::map<uint64_t, uint32_t> max_new;
  std::map<uint64_t, bool> done;
  auto prefill = [&](uint64_t batch_id, std::vector<RequestInput> reqs) {
    // Every request runs to max_new_tokens (the fake's greedy path may hit the eos id).
    for (RequestInput& r : reqs) r.stopping.ignore_eos_token = true;
    absl::StatusOr<StepResult> p = engine.Prefill(Batch(batch_id, reqs));
    if (!p.ok()) return p.status();
    for (const RequestInput& r : reqs) {
      prompts[r.id] = r.token_ids;
      max_new[r.id] = r.stopping.max_new_tokens;
    }
    for (const GenerationOut& g : p->generations) {
      tokens[g.request_id].push_back(g.next_tokens.ids[0]);
      if (g.generated_text) done[g.request_id] = true;
    }
    return absl::OkStatus();
  };
  // Router requests of 20 + 13 - 1 = 32 tokens: 2 blocks each.
  auto router_batch = [&](uint64_t first_id, int n) {
    std::vector<RequestInput> reqs;
    for (int i = 0; i < n; ++i) {
      RequestInput r = Req(first_id + i, Prompt(20, first_id + i), 13);
      EXPECT_TRUE(router.Assign(&r));
      reqs.push_back(r);
    }
    return reqs;
  };

  // A poke first: 10 + 20 - 1 tokens, 2 blocks. Before the fix it took blocks 1 and 2.
  ASSERT_TRUE(prefill(100, {Req(1000, Prompt(10, 1000), 20)}).ok());
  // The router hands out 16 of its 31 blocks (31..16).
  ASSERT_TRUE(prefill(1, router_batch(1, 8)).ok());
  // Another poke of 30 + 40 - 1 tokens (5 blocks): 6 of the tail's 8 were free.
  ASSERT_TRUE(prefill(101, {Req(1001, Prompt(30, 1001), 40)}).ok());
  EXPECT_EQ(engine.kv_blocks_free(), 40 - 2 - 16 - 5);
  // One block left in the tail: a 2-block poke is refused and takes nothing, though 17 of the
  // router's blocks are free.
  absl::Status full = prefill(102, {Req(1002, Prompt(10, 1002), 20)});
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_THAT(std::string(full.message()),
              HasSubstr("needs 2 blocks of 16 tokens for its requests without `blocks`, 1 of the "
                        "8 blocks kept for such requests are free (--unrouted-kv-blocks"));
  EXPECT_EQ(engine.kv_blocks_free(), 17);
  EXPECT_EQ(engine.num_cached_batches(), 3u);
  // The router's last 15 blocks (15..1): 7 requests of 2 blocks and one of 16 + 1 - 1 tokens.
  std::vector<RequestInput> rest = router_batch(20, 7);
  RequestInput one = Req(27, Prompt(16, 27), 1);
  ASSERT_TRUE(router.Assign(&one));
  rest.push_back(one);
  ASSERT_EQ(router.num_free(), 0u);
  absl::Status routed = prefill(2, rest);
  ASSERT_TRUE(routed.ok()) << routed;  // before the fix: FAILED_PRECONDITION "already in use"
  ASSERT_TRUE(done[27]) << "max_new_tokens 1: finished at prefill";
  // The router's health probe on its block 0, with every other router block held.
  RequestInput probe = Req(std::numeric_limits<uint64_t>::max(), {75}, 1);
  probe.blocks = {0};
  absl::StatusOr<StepResult> h =
      engine.Prefill(Batch(std::numeric_limits<uint64_t>::max(), {probe}));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_FALSE(h->batch.has_value());
  EXPECT_EQ(engine.kv_blocks_free(), 2) << "the tail's last block and the probe's block 0";
  // The tail is not the router's: an id there is refused, naming the range.
  RequestInput stray = Req(3000, Prompt(3, 3000), 2);
  stray.blocks = {39};
  absl::Status bad = prefill(3, {stray});
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
  EXPECT_THAT(std::string(bad.message()),
              HasSubstr("requests[0].blocks[0] = 39 is outside the router's KV blocks [0, 32) "
                        "(Warmup reported 512 tokens; blocks [32, 40) are kept for requests "
                        "without blocks: --unrouted-kv-blocks)"));

  // Everything decodes together to the end, each request exactly as alone.
  // Batch 2 still holds request 27 (finished): the router filters it first.
  std::vector<uint64_t> keep2;
  for (const RequestInput& r : rest) {
    if (r.id != 27) keep2.push_back(r.id);
  }
  ASSERT_TRUE(engine.FilterBatch(2, keep2).ok());
  DecodeToTheEnd(&engine, {1, 100, 101, 2}, &tokens, &done);
  for (const auto& [id, prompt] : prompts) {
    EXPECT_EQ(tokens[id], ReferenceGreedy(prompt, static_cast<int>(max_new[id])))
        << "request " << id;
  }
  EXPECT_EQ(engine.num_cached_batches(), 0u);
  EXPECT_EQ(engine.kv_blocks_free(), 40);
  // The tail is free again for the next poke.
  EXPECT_TRUE(prefill(104, {Req(1004, Prompt(30, 1004), 40)}).ok());
}

// --unrouted-kv-blocks 0: Warmup reports the whole pool and requests without blocks are refused,
// naming the flag; router requests and the probe are served.
TEST_F(UnroutedBlocksTest, ZeroKeepsNothingBackAndRefusesRequestsWithoutBlocks) {
  FakeModel model;
  BatchEngine engine(&model, tokenizer_, Options(40, 0));
  absl::StatusOr<uint32_t> total = WarmUp(&engine);
  ASSERT_TRUE(total.ok()) << total.status();
  EXPECT_EQ(*total, 40u * 16u);
  EXPECT_EQ(engine.kv_blocks_unrouted(), 0);
  absl::StatusOr<StepResult> p = engine.Prefill(Batch(1, {Req(1, Prompt(3, 1), 2)}));
  EXPECT_EQ(p.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(p.status().message()),
              HasSubstr("--unrouted-kv-blocks is 0: after Warmup the router's allocator owns "
                        "all 40 blocks"));
  RequestInput routed = Req(2, Prompt(3, 2), 2);
  routed.blocks = {39};
  EXPECT_TRUE(engine.Prefill(Batch(2, {routed})).ok());
  EXPECT_EQ(engine.kv_blocks_free(), 39);
}

// The default (-1) keeps one request of max_position_embeddings tokens (the fake's 1024: 64
// blocks); a pool that cannot hold it beside what the router needs fails Warmup naming the flag.
// Before any Warmup (an adopted pool) requests without blocks use the whole pool, as before.
TEST_F(UnroutedBlocksTest, DefaultFitsOneMaxPositionsRequestAndTooSmallAPoolNamesTheFlag) {
  {
    FakeModel model;
    BatchEngine engine(&model, tokenizer_, Options(200, -1));
    absl::StatusOr<uint32_t> total = WarmUp(&engine);
    ASSERT_TRUE(total.ok()) << total.status();
    EXPECT_EQ(*total, (200u - 64u) * 16u);
    EXPECT_EQ(engine.kv_blocks_unrouted(), 64);
    // 10 + 1014 tokens: the longest request the model takes, 64 blocks.
    absl::StatusOr<StepResult> p = engine.Prefill(Batch(1, {Req(1, Prompt(10, 1), 1014)}));
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(engine.kv_blocks_free(), 200 - 64);
  }
  {
    FakeModel model;
    BatchEngine engine(&model, tokenizer_, Options(70, -1));  // 70 - 64 < 10 for 150 tokens
    absl::StatusOr<uint32_t> total = WarmUp(&engine);
    EXPECT_EQ(total.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(std::string(total.status().message()),
                HasSubstr("70 blocks of 16 tokens fit (CUDA_MEMORY_FRACTION=1, "
                          "MEMORY_WIGGLE_ROOM=0.9), 64 of them kept for requests without blocks "
                          "(--unrouted-kv-blocks), but at least 75 are needed"));
    EXPECT_THAT(std::string(total.status().message()), HasSubstr("lower --unrouted-kv-blocks"));
  }
  {
    FakeModel model;
    auto engine = MakeEngine(&model, /*blocks=*/4);  // adopted: no Warmup
    EXPECT_EQ(engine->kv_blocks_unrouted(), 0);
    absl::StatusOr<StepResult> p = engine->Prefill(Batch(1, {Req(1, Prompt(30, 1), 34)}));
    ASSERT_TRUE(p.ok()) << p.status();  // 63 tokens: all 4 blocks, block 0 included
    EXPECT_EQ(engine->kv_blocks_free(), 0);
  }
}

}  // namespace
}  // namespace phishard
