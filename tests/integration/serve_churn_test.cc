// A served shard under churn and adapter pressure, driven over its unix socket like the LoRAX
// router drives it (CPU float32 by default, `serve --device cuda --dtype bfloat16` with
// PHISHARD_TEST_DEVICE=cuda): 2,000 short requests through the router's loop leak no block, and
// --adapter-slots / an offload under a live batch are refused or survived cleanly. Every greedy
// token is compared with the Hugging Face golden (tests/golden/tiny-phi-code.json) under the
// device tolerance of tests/integration/golden_check.h. Shared pieces: serve_limits_util.h.
#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/integration/serve_limits_util.h"

namespace phishard {
namespace {

using namespace limits_test;  // NOLINT(build/namespaces): the limit tests' shared fixture

// Churn: 2,000 requests of random short golden prompts (1-11 tokens) and lengths (1-16 new tokens,
// a quarter sampled) through the router's loop (admit what the router's block allocator can place,
// Prefill, Decode with the running batch, free the blocks of finished requests, FilterBatch /
// ClearCache) over a pool of 128 blocks, so every block is reused many times. Every greedy request
// equals its golden, the pool is empty at the end, and the shard still serves.
TEST(ServeLimits, TwoThousandShortRequestsOfChurnLeakNothing) {
  // 128 blocks for the router's allocator, 4 kept for ExpectStillServing's request without blocks.
  Served s({"--max-kv-blocks", "132", "--unrouted-kv-blocks", "4"}, 128, 256, 256);
  ASSERT_TRUE(s.ok());
  RouterSession& session = s.session();
  const std::vector<Case>& golden = Golden();
  RouterBlocks router(s.warmup_tokens() / 16);
  std::mt19937 rng(7);
  const std::vector<size_t> kShort = {0, 1, 2, 4, 5};  // prompts of 1-11 tokens
  struct Planned {
    pb::Request req;
    const Case* golden = nullptr;  // null: sampled, not compared
    bool released = false;
  };
  std::map<uint64_t, Planned> plan;
  std::deque<uint64_t> queue;
  for (uint64_t id = 1; id <= 2000; ++id) {
    const Case& c = golden[kShort[rng() % kShort.size()]];
    const uint32_t max_new = 1 + rng() % 16;
    Planned p{Req(id, c, max_new), &c};
    if (rng() % 4 == 0) {
      p.req.mutable_parameters()->set_temperature(0.7f);
      p.req.mutable_parameters()->set_do_sample(true);
      p.req.mutable_parameters()->set_seed(id);
      p.golden = nullptr;
    }
    plan[id] = std::move(p);
    queue.push_back(id);
  }
  Tracker t;
  // The router frees a finished request's blocks at once, then filters its batch.
  auto absorb = [&](const google::protobuf::RepeatedPtrField<pb::Generation>& gens) {
    t.Absorb(gens);
    for (const pb::Generation& g : gens) {
      Planned& p = plan[g.request_id()];
      if (t.done(g.request_id()) && !p.released) {
        router.Release(p.req);
        p.released = true;
      }
    }
  };
  auto settle = [&](std::optional<pb::CachedBatch> b) -> std::optional<pb::CachedBatch> {
    if (!b.has_value()) return std::nullopt;
    std::vector<uint64_t> keep = t.Unfinished(*b);
    if (keep.empty()) {
      EXPECT_TRUE(session.ClearCache(b->id()).ok());
      return std::nullopt;
    }
    if (static_cast<int>(keep.size()) == b->request_ids_size()) return b;
    absl::StatusOr<std::optional<pb::CachedBatch>> f = session.FilterBatch(b->id(), keep);
    EXPECT_TRUE(f.ok() && f->has_value()) << f.status();
    return f.ok() ? *f : std::nullopt;
  };
  std::optional<pb::CachedBatch> cur;
  uint64_t next_batch = 1;
  int steps = 0;
  while ((!queue.empty() || cur.has_value()) && steps < 20000) {
    ++steps;
    std::vector<pb::Request> reqs;
    while (!queue.empty() && reqs.size() < 1 + rng() % 24) {
      Planned& p = plan[queue.front()];
      if (!router.Assign(&p.req)) break;
      reqs.push_back(p.req);
      queue.pop_front();
    }
    std::optional<pb::CachedBatch> fresh;
    if (!reqs.empty()) {
      absl::StatusOr<pb::PrefillResponse> r = session.Prefill(PrefillOf(next_batch++, reqs));
      ASSERT_TRUE(r.ok()) << r.status();
      absorb(r->generations());
      if (r->has_batch()) fresh = settle(r->batch());
    }
    std::vector<uint64_t> ids;
    if (cur.has_value()) ids.push_back(cur->id());
    if (fresh.has_value()) ids.push_back(fresh->id());
    if (ids.empty()) continue;
    absl::StatusOr<pb::DecodeResponse> d = session.Decode(DecodeOf(ids));
    ASSERT_TRUE(d.ok()) << d.status();
    absorb(d->generations());
    cur = d->has_batch() ? settle(d->batch()) : std::nullopt;
  }
  ASSERT_TRUE(queue.empty() && !cur.has_value()) << "stuck after " << steps << " steps";
  std::printf("  %d router steps\n", steps);
  int compared = 0;
  for (auto& [id, p] : plan) {
    ASSERT_TRUE(t.done(id)) << id;
    if (p.golden == nullptr) {
      EXPECT_EQ(t.ids(id).size(), p.req.stopping_parameters().max_new_tokens()) << id;
      continue;
    }
    t.ExpectGolden(id, *p.golden, p.req.stopping_parameters().max_new_tokens());
    ++compared;
  }
  EXPECT_GT(compared, 1000);
  EXPECT_EQ(router.num_free(), 127u);
  EXPECT_EQ(s.KvBlocks("used"), 0);
  EXPECT_EQ(s.KvBlocks("free"), 132);
  s.ExpectStillServing(next_batch);
}

// The peft golden of `adapter` on `prompt` (tests/golden/tiny-phi-code-adapters.json).
Case AdapterCase(const std::string& adapter, const std::string& prompt) {
  const nlohmann::json j = nlohmann::json::parse(integration::ReadFile(
      std::string(PHISHARD_TESTDATA) + "/../tests/golden/tiny-phi-code-adapters.json"));
  for (const auto& c : j.at("cases")) {
    if (c.at("adapter") != adapter || c.at("prompt") != prompt) continue;
    return CaseFromJson(c);
  }
  ADD_FAILURE() << "no golden case for " << adapter << " / " << prompt;
  return {};
}

grpc::Status AdapterCall(ShardClient& shard, bool load, const std::string& id, uint32_t index,
                         bool* answer) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  if (load) {
    pb::LoadAdapterRequest r;
    r.mutable_adapter_parameters()->add_adapter_ids(id);
    r.set_adapter_source(pb::LOCAL);
    r.set_adapter_index(index);
    pb::LoadAdapterResponse out;
    grpc::Status st = shard.stub()->LoadAdapter(&ctx, r, &out);
    *answer = out.loaded();
    return st;
  }
  pb::OffloadAdapterRequest r;
  r.mutable_adapter_parameters()->add_adapter_ids(id);
  r.set_adapter_source(pb::LOCAL);
  r.set_adapter_index(index);
  pb::OffloadAdapterResponse out;
  grpc::Status st = shard.stub()->OffloadAdapter(&ctx, r, &out);
  *answer = out.offloaded();
  return st;
}

// --adapter-slots 2: a third adapter is RESOURCE_EXHAUSTED naming the slots; an adapter offloaded
// while a live batch still uses it (the router never does; upstream then computes the base model)
// leaves the batch running to its end without a fault, and its slot takes another adapter whose
// outputs equal peft's while the remaining one's still do.
TEST(ServeLimits, AdapterSlotsAndAnOffloadUnderALiveBatch) {
  const std::string models = PHISHARD_MODELS;
  Served s({"--adapter-root", models + "/tiny-phi-code/adapters", "--adapter-root",
            models + "/../tests/golden/adapters", "--adapter-slots", "2", "--adapter-memory-bytes",
            "100000000"},
           64, 128, 256);
  ASSERT_TRUE(s.ok());
  RouterSession& session = s.session();
  ShardClient& shard = session.shard(0);
  bool answer = false;
  grpc::Status st = AdapterCall(shard, true, "prose", 1, &answer);
  ASSERT_TRUE(st.ok() && answer) << st.error_message();
  st = AdapterCall(shard, true, "lora-r4-qv-fc2", 2, &answer);
  ASSERT_TRUE(st.ok() && answer) << st.error_message();
  st = AdapterCall(shard, true, "lora-r16-rslora-all", 3, &answer);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(st.error_message().find("all 2 adapter slots are in use"), std::string::npos)
      << st.error_message();

  // A live batch on index 2 and on index 1; index 2 goes away after two tokens.
  const Case r4 = AdapterCase("lora-r4-qv-fc2", "The ");
  const Case prose = AdapterCase("prose", "import");
  pb::Request on2 = Req(1, r4, 10);
  on2.set_adapter_index(2);
  pb::Request on1 = Req(2, prose, 10);
  on1.set_adapter_index(1);
  Tracker t;
  absl::StatusOr<pb::PrefillResponse> p = session.Prefill(PrefillOf(1, {on2, on1}));
  ASSERT_TRUE(p.ok()) << p.status();
  t.Absorb(p->generations());
  absl::StatusOr<pb::DecodeResponse> d = session.Decode(DecodeOf({1}));
  ASSERT_TRUE(d.ok()) << d.status();
  t.Absorb(d->generations());
  st = AdapterCall(shard, false, "lora-r4-qv-fc2", 2, &answer);
  ASSERT_TRUE(st.ok() && answer) << st.error_message();
  ASSERT_TRUE(d->has_batch());
  DecodeToTheEnd(session, t, d->batch());
  EXPECT_EQ(t.ids(1).size(), 10u);
  std::vector<uint32_t> head(t.ids(1).begin(), t.ids(1).begin() + 2);
  integration::ExpectGreedyMatchesGolden(head, {}, r4.greedy, "index 2 before its offload");
  t.ExpectGolden(2, prose, 10);  // the other adapter never noticed

  // The freed slot takes the third adapter; both loaded adapters are exact.
  st = AdapterCall(shard, true, "lora-r16-rslora-all", 3, &answer);
  ASSERT_TRUE(st.ok() && answer) << st.error_message();
  const Case r16 = AdapterCase("lora-r16-rslora-all", "The ");
  pb::Request on3 = Req(3, r16, 16);
  on3.set_adapter_index(3);
  pb::Request again1 = Req(4, prose, 16);
  again1.set_adapter_index(1);
  p = session.Prefill(PrefillOf(2, {on3, again1}));
  ASSERT_TRUE(p.ok()) << p.status();
  t.Absorb(p->generations());
  ASSERT_TRUE(p->has_batch());
  DecodeToTheEnd(session, t, p->batch());
  t.ExpectGolden(3, r16, 16);
  t.ExpectGolden(4, prose, 16);
  EXPECT_EQ(s.KvBlocks("used"), 0);
  s.ExpectStillServing(5);
}

}  // namespace
}  // namespace phishard
