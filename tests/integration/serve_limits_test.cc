// A served shard at its limits, driven over its unix socket like the LoRAX router drives it (on
// CPU float32 by default, on `serve --device cuda --dtype bfloat16` with
// PHISHARD_TEST_DEVICE=cuda):
//   - a KV pool that cannot take a batch: RESOURCE_EXHAUSTED, nothing allocated, live batches
//     untouched, the pool back to empty once everything finished (metrics);
//   - a request longer than max_position_embeddings or than the whole pool: INVALID_ARGUMENT
//     naming the field;
//   - a batch of 300 sequences (above the CUDA decode-graph ladder's 256) whose prefill is larger
//     than the Warmup's max_prefill_tokens, filtered down to one request;
//   - two dozen cached batches concatenated in one Decode, a batch cleared while others live and
//     its blocks reused by a new batch;
//   - duplicate batch / request ids refused without losing the batches already cached;
//   - adapters: more than --adapter-slots, offload of an adapter a live batch uses.
// Every generated token is compared with the Hugging Face golden (tests/golden/tiny-phi-code.json)
// under the device tolerance of tests/integration/golden_check.h: greedy decoding of a request does
// not depend on what else is in its batch, so any mix-up of KV blocks or rows shows as a mismatch.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <regex>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/client.h"
#include "tests/integration/golden_check.h"
#include "tests/integration/shard_process.h"
#include "tests/server/prom_text_test_util.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;
namespace fs = std::filesystem;
using integration::DemoShard;
using integration::TempDir;

struct Case {
  std::vector<uint32_t> prompt_ids;
  integration::GoldenGreedy greedy;
};

// `r` failed with `code`, its message naming `needle`.
template <typename T>
void ExpectRefused(const absl::StatusOr<T>& r, absl::StatusCode code, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "expected a refusal naming: " << needle;
  EXPECT_EQ(r.status().code(), code) << r.status();
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
}

const std::vector<Case>& Golden() {
  static const auto* cases = [] {
    auto* out = new std::vector<Case>();
    const nlohmann::json j = nlohmann::json::parse(integration::ReadFile(
        std::string(PHISHARD_TESTDATA) + "/../tests/golden/tiny-phi-code.json"));
    for (const auto& c : j.at("cases")) {
      Case k;
      k.prompt_ids = c.at("prompt_ids").get<std::vector<uint32_t>>();
      k.greedy = {.ids = c.at("greedy_ids").get<std::vector<uint32_t>>(),
                  .logprobs = c.at("greedy_logprobs").get<std::vector<float>>(),
                  .min_top2_gap = c.at("min_top2_gap").get<double>(),
                  .scale = integration::LogitScale(c.at("last_logits").get<std::vector<float>>())};
      out->push_back(std::move(k));
    }
    return out;
  }();
  return *cases;
}

// Greedy request `id` on golden case `c`, never stopping at EOS.
pb::Request Req(uint64_t id, const Case& c, uint32_t max_new) {
  pb::Request r = RouterRequest(id, "", c.prompt_ids, 0, max_new);
  r.mutable_stopping_parameters()->set_ignore_eos_token(true);
  return r;
}
// A request of `prompt_len` arbitrary (in-vocabulary) ids.
pb::Request Sized(uint64_t id, int prompt_len, uint32_t max_new) {
  std::vector<uint32_t> ids(prompt_len);
  for (int i = 0; i < prompt_len; ++i) ids[i] = 100 + static_cast<uint32_t>(i % 50);
  pb::Request r = RouterRequest(id, "", ids, 0, max_new);
  r.mutable_stopping_parameters()->set_ignore_eos_token(true);
  return r;
}
pb::PrefillRequest PrefillOf(uint64_t batch_id, std::vector<pb::Request> reqs) {
  pb::PrefillRequest p;
  p.mutable_batch()->set_id(batch_id);
  for (pb::Request& r : reqs) *p.mutable_batch()->add_requests() = std::move(r);
  p.mutable_batch()->set_size(static_cast<uint32_t>(p.batch().requests_size()));
  return p;
}
pb::DecodeRequest DecodeOf(const std::vector<uint64_t>& ids) {
  pb::DecodeRequest d;
  for (uint64_t id : ids) d.add_batches()->set_id(id);
  return d;
}

// The port `serve` logged for --metrics-addr 127.0.0.1:0.
int LoggedMetricsPort(const std::string& log) {
  std::smatch m;
  static const std::regex kLine(R"(Prometheus metrics on \S+ \(port (\d+)\))");
  return std::regex_search(log, m, kLine) ? std::stoi(m[1].str()) : 0;
}

// A served demo model with metrics, after the router's startup (ClearCache, Info, Warmup).
class Served {
 public:
  Served(std::vector<std::string> extra, uint32_t max_input, uint32_t max_prefill,
         uint32_t max_total) {
    extra.push_back("--metrics-addr");
    extra.push_back("127.0.0.1:0");
    shard_ = std::make_unique<DemoShard>(dir_, extra, integration::CleanEnv());
    if (!shard_->ready) {
      ADD_FAILURE() << shard_->process->Logs();
      return;
    }
    port_ = LoggedMetricsPort(shard_->process->out());
    absl::StatusOr<std::unique_ptr<RouterSession>> s =
        RouterSession::Connect(UdsTarget(shard_->uds), /*timeout_s=*/120);
    if (!s.ok()) {
      ADD_FAILURE() << s.status();
      return;
    }
    session_ = *std::move(s);
    EXPECT_TRUE(session_->ClearCache(std::nullopt).ok());
    EXPECT_TRUE(session_->Info().ok());
    absl::StatusOr<std::optional<uint32_t>> w =
        session_->Warmup(RouterWarmupRequest(max_input, max_prefill, max_total));
    if (!w.ok() || !w->has_value()) {
      ADD_FAILURE() << "Warmup: " << w.status() << shard_->process->Logs();
      return;
    }
    warmup_tokens_ = **w;
    ok_ = port_ > 0;
    EXPECT_GT(port_, 0) << shard_->process->Logs();
  }
  ~Served() {
    session_.reset();
    if (shard_ != nullptr && shard_->process->running()) {
      shard_->process->Signal(SIGTERM);
      EXPECT_EQ(shard_->process->Wait(30), 0) << shard_->process->Logs();
    }
  }
  bool ok() const { return ok_; }
  RouterSession& session() { return *session_; }
  uint32_t warmup_tokens() const { return warmup_tokens_; }
  const TempDir& dir() const { return dir_; }
  integration::ShardProcess& process() { return *shard_->process; }
  // KV blocks in `state` ("used" / "free") as /metrics reports them after the last step.
  double KvBlocks(const std::string& state) {
    std::string status;
    const std::string body = testing::HttpGet(port_, "/metrics", &status);
    EXPECT_EQ(status, "HTTP/1.1 200 OK");
    testing::PromParse p = testing::ParsePromText(body);
    EXPECT_EQ(p.error, "") << body;
    return p.Value("phishard_kv_blocks", "phishard_kv_blocks", {{"state", state}});
  }
  // Still healthy and still exact: Health OK and a control request equals its golden.
  void ExpectStillServing(uint64_t batch_id) {
    ASSERT_TRUE(shard_->process->running()) << shard_->process->Logs();
    EXPECT_TRUE(session_->Health().ok());
    const Case& c = Golden()[3];
    pb::Batch b = PrefillOf(batch_id, {Req(batch_id, c, 6)}).batch();
    absl::StatusOr<std::vector<RequestOutcome>> out = RunBatchToCompletion(*session_, b);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->size(), 1u);
    ASSERT_EQ((*out)[0].ids.size(), 6u);
    integration::ExpectGreedyMatchesGolden((*out)[0].ids, (*out)[0].logprobs, c.greedy,
                                           "control request");
  }

 private:
  TempDir dir_;
  std::unique_ptr<DemoShard> shard_;
  std::unique_ptr<RouterSession> session_;
  int port_ = 0;
  uint32_t warmup_tokens_ = 0;
  bool ok_ = false;
};

// Tokens received per request; checks the router's invariants (one token per live request and
// step, nothing after finishing).
class Tracker {
 public:
  void Absorb(const google::protobuf::RepeatedPtrField<pb::Generation>& gens) {
    for (const pb::Generation& g : gens) {
      ASSERT_EQ(g.next_tokens().ids_size(), 1) << "request " << g.request_id();
      ASSERT_FALSE(done_[g.request_id()]) << "request " << g.request_id() << " after finishing";
      ids_[g.request_id()].push_back(g.next_tokens().ids(0));
      logprobs_[g.request_id()].push_back(g.next_tokens().logprobs(0));
      if (g.has_generated_text()) done_[g.request_id()] = true;
    }
  }
  bool done(uint64_t id) { return done_[id]; }
  const std::vector<uint32_t>& ids(uint64_t id) { return ids_[id]; }
  // Survivors of `b` (unfinished requests, batch order).
  std::vector<uint64_t> Unfinished(const pb::CachedBatch& b) {
    std::vector<uint64_t> keep;
    for (uint64_t id : b.request_ids()) {
      if (!done_[id]) keep.push_back(id);
    }
    return keep;
  }
  void ExpectGolden(uint64_t id, const Case& c, size_t n) {
    ASSERT_EQ(ids_[id].size(), n) << "request " << id;
    integration::ExpectGreedyMatchesGolden(ids_[id], logprobs_[id], c.greedy,
                                           "request " + std::to_string(id));
  }

 private:
  std::map<uint64_t, std::vector<uint32_t>> ids_;
  std::map<uint64_t, std::vector<float>> logprobs_;
  std::map<uint64_t, bool> done_;
};

// Decodes `batch` (FilterBatch as requests finish) until nothing is left.
void DecodeToTheEnd(RouterSession& session, Tracker& t, pb::CachedBatch cur) {
  for (int step = 0; step < 2000; ++step) {
    std::vector<uint64_t> keep = t.Unfinished(cur);
    if (keep.empty()) {
      ASSERT_TRUE(session.ClearCache(cur.id()).ok());
      return;
    }
    if (static_cast<int>(keep.size()) != cur.request_ids_size()) {
      absl::StatusOr<std::optional<pb::CachedBatch>> f = session.FilterBatch(cur.id(), keep);
      ASSERT_TRUE(f.ok()) << f.status();
      ASSERT_TRUE(f->has_value());
      cur = **f;
    }
    absl::StatusOr<pb::DecodeResponse> d = session.Decode(DecodeOf({cur.id()}));
    ASSERT_TRUE(d.ok()) << d.status();
    t.Absorb(d->generations());
    if (!d->has_batch()) return;
    cur = d->batch();
  }
  FAIL() << "batch " << cur.id() << " never finished";
}

// The LoRAX router's block allocator (spec §3.4) over the pool Warmup reported: block 0 kept for
// the health probe, ceil((P + max_new_tokens - 1) / 16) blocks a request from the free list's
// tail, slots for exactly those tokens.
class RouterBlocks {
 public:
  explicit RouterBlocks(uint32_t num_blocks) {
    for (uint32_t b = 1; b < num_blocks; ++b) free_.push_back(b);
  }
  bool Assign(pb::Request* r) {
    const uint32_t tokens = static_cast<uint32_t>(r->tokenized_inputs().ids_size()) +
                            r->stopping_parameters().max_new_tokens() - 1;
    const uint32_t n = (tokens + 15) / 16;
    if (n > free_.size()) return false;
    std::vector<uint32_t> blocks(free_.end() - n, free_.end());
    free_.resize(free_.size() - n);
    for (uint32_t b : blocks) r->add_blocks(b);
    for (uint32_t p = 0; p < tokens; ++p) r->add_slots(blocks[p / 16] * 16 + p % 16);
    return true;
  }
  void Release(const pb::Request& r) {
    free_.insert(free_.end(), r.blocks().begin(), r.blocks().end());
  }
  size_t num_free() const { return free_.size(); }

 private:
  std::vector<uint32_t> free_;
};

// Info asks for the router's allocator; the router's blocks are the requests' block tables: the
// pool fills to its last block with every output exact, the router's health probe (block 0)
// still runs on a full pool, a block still held or outside the router's part is refused naming
// it, and requests without blocks (a user's grpcurl) get the shard's own from the
// --unrouted-kv-blocks tail only: held while the router hands out every block it has, and
// refused once the tail is taken, however many router blocks are free.
TEST(ServeLimits, RouterBlocksFillThePoolAndTheHealthProbeStillRuns) {
  Served s({"--max-kv-blocks", "44", "--unrouted-kv-blocks", "4"}, 64, 128, 256);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s.warmup_tokens(), 40u * 16u) << "Warmup reports the pool less the 4-block tail";
  RouterSession& session = s.session();
  absl::StatusOr<pb::InfoResponse> info = session.Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->requires_block_allocator());
  RouterBlocks router(s.warmup_tokens() / 16);
  const std::vector<Case>& golden = Golden();
  // Pokes without blocks before the router's traffic: 11 + 16 - 1 and 3 + 16 - 1 tokens, 2 blocks
  // each, fill the tail (without it they took blocks 1..4, which the router hands out below).
  Tracker poked;
  std::vector<pb::CachedBatch> pokes;
  for (auto [batch_id, id, c] :
       std::vector<std::tuple<uint64_t, uint64_t, size_t>>{{50, 800, 1}, {51, 801, 0}}) {
    absl::StatusOr<pb::PrefillResponse> r =
        session.Prefill(PrefillOf(batch_id, {Req(id, golden[c], 16)}));
    ASSERT_TRUE(r.ok()) << r.status();
    poked.Absorb(r->generations());
    ASSERT_TRUE(r->has_batch());
    pokes.push_back(r->batch());
  }
  absl::StatusOr<pb::PrefillResponse> refused =
      session.Prefill(PrefillOf(52, {Req(802, golden[4], 16)}));
  ExpectRefused(refused, absl::StatusCode::kResourceExhausted,
                "0 of the 4 blocks kept for such requests are free "
                "(--unrouted-kv-blocks");
  EXPECT_EQ(s.KvBlocks("used"), 4);
  // Short golden prompts (3, 11, 10, 1, 2 tokens) with 16 new tokens: 1 or 2 blocks each.
  const std::vector<size_t> short_cases = {0, 1, 2, 4, 5};
  Tracker t;
  std::map<uint64_t, const Case*> which;
  std::vector<pb::Request> reqs;
  for (uint64_t id = 1; router.num_free() > 0; ++id) {
    const Case& c = golden[short_cases[id % short_cases.size()]];
    pb::Request r = Req(id, c, 16);
    if (!router.Assign(&r)) {
      r = Req(id, golden[4], 16);  // 1 + 16 - 1 tokens: one block
      ASSERT_TRUE(router.Assign(&r));
      which[id] = &golden[4];
    } else {
      which[id] = &c;
    }
    reqs.push_back(std::move(r));
  }
  int router_blocks = 0;
  for (const pb::Request& r : reqs) router_blocks += r.blocks_size();
  ASSERT_EQ(router_blocks, 39);
  absl::StatusOr<pb::PrefillResponse> p = session.Prefill(PrefillOf(1, reqs));
  ASSERT_TRUE(p.ok()) << p.status();  // before the tail: FAILED_PRECONDITION "already in use"
  t.Absorb(p->generations());
  ASSERT_TRUE(p->has_batch());
  EXPECT_EQ(p->batch().max_tokens(), 39u * 16u);
  EXPECT_EQ(s.KvBlocks("used"), 39 + 4);

  // The router's /health generation probe on its reserved block 0, with the pool otherwise full.
  const uint64_t kMax = std::numeric_limits<uint64_t>::max();
  pb::Request probe = RouterRequest(kMax, "liveness", {75}, 10, 1);
  probe.add_blocks(0);
  for (uint32_t slot = 0; slot < 16; ++slot) probe.add_slots(slot);
  absl::StatusOr<pb::PrefillResponse> h = session.Prefill(PrefillOf(kMax, {probe}));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->generations_size(), 1);
  EXPECT_FALSE(h->has_batch());
  EXPECT_EQ(s.KvBlocks("used"), 39 + 4) << "the probe's block is free again";

  // Blocks the router never hands out twice, or that do not exist: refused, naming them.
  pb::Request dup = Req(500, golden[4], 2);
  dup.add_blocks(reqs[3].blocks(0));
  absl::StatusOr<pb::PrefillResponse> bad =
      session.Prefill(PrefillOf(2, {Req(499, golden[4], 2), dup}));
  ExpectRefused(
      bad, absl::StatusCode::kFailedPrecondition,
      "requests[1].blocks[0] = " + std::to_string(reqs[3].blocks(0)) + " is already in use");
  pb::Request outside = Req(501, golden[4], 2);
  outside.add_blocks(40);
  bad = session.Prefill(PrefillOf(2, {outside}));
  ExpectRefused(bad, absl::StatusCode::kInvalidArgument,
                "requests[0].blocks[0] = 40 is outside the router's KV "
                "blocks [0, 40) (Warmup reported 640 tokens; blocks "
                "[40, 44) are kept for requests without blocks");
  pb::Request few = Req(502, golden[1], 16);  // 11 + 15 tokens need 2 blocks
  few.add_blocks(0);
  bad = session.Prefill(PrefillOf(2, {few}));
  ExpectRefused(bad, absl::StatusCode::kInvalidArgument,
                "requests[0].blocks has 1 blocks of 16 tokens, the "
                "request needs 2");
  EXPECT_EQ(s.KvBlocks("used"), 39 + 4) << "refused batches take nothing";
  // The pokes run to their ends beside the router's batch, exactly as alone.
  for (const pb::CachedBatch& b : pokes) DecodeToTheEnd(session, poked, b);
  poked.ExpectGolden(800, golden[1], 16);
  poked.ExpectGolden(801, golden[0], 16);
  EXPECT_EQ(s.KvBlocks("used"), 39);

  // Finish half the batch (FilterBatch), give its blocks to a new router batch and take the
  // shard's own for a request without blocks (from the tail again): all exact.
  absl::StatusOr<pb::DecodeResponse> d = session.Decode(DecodeOf({1}));
  ASSERT_TRUE(d.ok()) << d.status();
  t.Absorb(d->generations());
  std::vector<uint64_t> keep;
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (i % 2 == 0) {
      keep.push_back(reqs[i].id());
    } else {
      router.Release(reqs[i]);
    }
  }
  absl::StatusOr<std::optional<pb::CachedBatch>> f = session.FilterBatch(1, keep);
  ASSERT_TRUE(f.ok()) << f.status();
  std::vector<pb::Request> more;
  std::map<uint64_t, const Case*> more_which;
  for (uint64_t id = 100; router.num_free() >= 2; ++id) {
    const Case& c = golden[short_cases[id % short_cases.size()]];
    pb::Request r = Req(id, c, 16);
    if (!router.Assign(&r)) break;
    more_which[id] = &c;
    more.push_back(std::move(r));
  }
  more.push_back(Req(900, golden[4], 16));  // no blocks: the shard's own, from the tail
  more_which[900] = &golden[4];
  p = session.Prefill(PrefillOf(3, more));
  ASSERT_TRUE(p.ok()) << p.status();
  t.Absorb(p->generations());
  d = session.Decode(DecodeOf({1, 3}));
  ASSERT_TRUE(d.ok()) << d.status();
  t.Absorb(d->generations());
  ASSERT_TRUE(d->has_batch());
  DecodeToTheEnd(session, t, d->batch());
  for (uint64_t id : keep) t.ExpectGolden(id, *which[id], 16);
  for (const auto& [id, c] : more_which) t.ExpectGolden(id, *c, 16);
  EXPECT_EQ(s.KvBlocks("used"), 0);
  s.ExpectStillServing(4);
}

// A client without router blocks over a tail of 40 blocks (640 tokens) kept for it beside the
// router's 10: what does not fit is refused with RESOURCE_EXHAUSTED and changes nothing, though
// the router's blocks are free; what can never fit is INVALID_ARGUMENT naming the field; the live
// batch is untouched and every block is free again at the end.
TEST(ServeLimits, KvPoolOverflowIsRefusedCleanlyAndTheShardRecovers) {
  Served s({"--max-kv-blocks", "50", "--unrouted-kv-blocks", "40"}, 64, 128, 256);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s.warmup_tokens(), 10u * 16u) << "Warmup reports the router's part of the pool";
  EXPECT_EQ(s.KvBlocks("used"), 0);
  EXPECT_EQ(s.KvBlocks("free"), 50);
  RouterSession& session = s.session();

  // Longer than the model's 1024 positions.
  absl::StatusOr<pb::PrefillResponse> r = session.Prefill(PrefillOf(1, {Sized(1, 1000, 25)}));
  ExpectRefused(r, absl::StatusCode::kInvalidArgument,
                "requests[0].stopping_parameters.max_new_tokens");
  EXPECT_NE(r.status().message().find("max_position_embeddings 1024"), std::string::npos)
      << r.status();
  // Within the positions, larger than the whole pool (10 + 800 - 1 tokens = 51 blocks > 50).
  r = session.Prefill(PrefillOf(1, {Sized(1, 10, 800)}));
  ExpectRefused(r, absl::StatusCode::kInvalidArgument, "more than the whole cache (50 blocks");
  // Larger than the tail, within the pool (10 + 700 - 1 tokens = 45 blocks > 40): no room.
  r = session.Prefill(PrefillOf(1, {Sized(1, 10, 700)}));
  ExpectRefused(r, absl::StatusCode::kResourceExhausted,
                "needs 45 blocks of 16 tokens for its requests without "
                "`blocks`, 40 of the 40 blocks kept");

  // A live batch of two golden requests holding 2 x ceil((P + 200 - 1) / 16) blocks.
  Tracker t;
  const Case& a = Golden()[0];  // 3 prompt tokens: 13 blocks
  const Case& b = Golden()[5];  // 2 prompt tokens: 13 blocks
  r = session.Prefill(PrefillOf(2, {Req(20, a, 200), Req(21, b, 200)}));
  ASSERT_TRUE(r.ok()) << r.status();
  t.Absorb(r->generations());
  ASSERT_TRUE(r->has_batch());
  EXPECT_EQ(r->batch().max_tokens(), 26u * 16u);
  EXPECT_EQ(s.KvBlocks("used"), 26);

  // 14 free: a batch needing 2 x 13 does not fit, and takes nothing.
  r = session.Prefill(PrefillOf(3, {Req(30, a, 200), Req(31, b, 200)}));
  ExpectRefused(r, absl::StatusCode::kResourceExhausted,
                "needs 26 blocks of 16 tokens for its requests without "
                "`blocks`, 14 of the 40 blocks kept for such requests are "
                "free");
  ASSERT_TRUE(session.ClearCache(uint64_t{3}).ok());  // what the router does after an error
  EXPECT_EQ(s.KvBlocks("used"), 26);
  // One that fits exactly (14 blocks: 3 + 222 - 1 = 224 tokens) is served beside the live batch.
  r = session.Prefill(PrefillOf(4, {Req(40, a, 222)}));
  ASSERT_TRUE(r.ok()) << r.status();
  t.Absorb(r->generations());
  EXPECT_EQ(s.KvBlocks("free"), 10) << "the router's 10 blocks are never given away";
  // Full tail: even the smallest request is refused.
  r = session.Prefill(PrefillOf(5, {Sized(50, 1, 2)}));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);

  // Both live batches decode together to their ends, exactly as alone.
  absl::StatusOr<pb::DecodeResponse> d = session.Decode(DecodeOf({2, 4}));
  ASSERT_TRUE(d.ok()) << d.status();
  t.Absorb(d->generations());
  ASSERT_TRUE(d->has_batch());
  DecodeToTheEnd(session, t, d->batch());
  // The golden has 16 tokens: compare the first 16 of each (the rest are not recorded).
  for (uint64_t id : {20, 21, 40}) ASSERT_TRUE(t.done(id)) << id;
  for (auto [id, c] : std::vector<std::pair<uint64_t, const Case*>>{{20, &a}, {21, &b}, {40, &a}}) {
    std::vector<uint32_t> head(t.ids(id).begin(), t.ids(id).begin() + 16);
    integration::ExpectGreedyMatchesGolden(head, {}, c->greedy, "request " + std::to_string(id));
  }
  EXPECT_EQ(t.ids(20).size(), 200u);
  EXPECT_EQ(t.ids(40).size(), 222u);
  EXPECT_EQ(s.KvBlocks("used"), 0);
  EXPECT_EQ(s.KvBlocks("free"), 50);
  s.ExpectStillServing(6);
}

// 300 sequences in one batch: above the CUDA backend's largest decode graph (256) and a prefill
// of ~9,000 tokens against a Warmup of 256 prefill tokens (the CUDA step arena grows). Then
// filtered to one request, which must go on exactly as alone.
TEST(ServeLimits, ThreeHundredSequencesThenFilteredToOne) {
  Served s({}, 64, 256, 320);
  ASSERT_TRUE(s.ok());
  RouterSession& session = s.session();
  const std::vector<Case>& golden = Golden();
  RouterBlocks router(s.warmup_tokens() / 16);  // as the router: more than the tail holds
  std::vector<pb::Request> reqs;
  std::map<uint64_t, const Case*> which;
  for (uint64_t i = 0; i < 300; ++i) {
    const Case& c = golden[i % golden.size()];
    which[1000 + i] = &c;
    reqs.push_back(Req(1000 + i, c, i == 7 ? 12 : 3));  // request 1007 outlives the others
    ASSERT_TRUE(router.Assign(&reqs.back()));
  }
  Tracker t;
  absl::StatusOr<pb::PrefillResponse> r = session.Prefill(PrefillOf(9, reqs));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->generations_size(), 300);
  t.Absorb(r->generations());
  ASSERT_TRUE(r->has_batch());
  EXPECT_EQ(r->batch().size(), 300u);
  pb::CachedBatch cur = r->batch();
  for (int step = 0; step < 2; ++step) {  // two decodes of all 300
    absl::StatusOr<pb::DecodeResponse> d = session.Decode(DecodeOf({cur.id()}));
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->generations_size(), 300);
    t.Absorb(d->generations());
    ASSERT_TRUE(d->has_batch());
    cur = d->batch();
  }
  EXPECT_EQ(t.Unfinished(cur), std::vector<uint64_t>{1007});
  DecodeToTheEnd(session, t, cur);
  for (const auto& [id, c] : which) t.ExpectGolden(id, *c, id == 1007 ? 12 : 3);
  EXPECT_EQ(s.KvBlocks("used"), 0);
  s.ExpectStillServing(10);
}

// 24 batches prefilled one by one, one of them cleared while the others live and its blocks
// taken by a new batch, then all decoded in one call (concatenated into the first id). The
// requests carry no router blocks: a tail of 256 blocks is kept for them.
TEST(ServeLimits, TwoDozenCachedBatchesConcatenateInOneDecode) {
  Served s({"--unrouted-kv-blocks", "256"}, 128, 256, 256);
  ASSERT_TRUE(s.ok());
  RouterSession& session = s.session();
  const std::vector<Case>& golden = Golden();
  Tracker t;
  std::map<uint64_t, std::pair<const Case*, uint32_t>> plan;
  std::vector<uint64_t> batch_ids;
  for (uint64_t b = 0; b < 24; ++b) {
    std::vector<pb::Request> reqs;
    for (uint64_t k = 0; k < 1 + b % 3; ++k) {
      const uint64_t id = 100 * (b + 1) + k;
      const Case& c = golden[(b + k) % golden.size()];
      const uint32_t n = 4 + static_cast<uint32_t>((b + k) % 9);
      plan[id] = {&c, n};
      reqs.push_back(Req(id, c, n));
    }
    absl::StatusOr<pb::PrefillResponse> r = session.Prefill(PrefillOf(b + 1, reqs));
    ASSERT_TRUE(r.ok()) << r.status();
    t.Absorb(r->generations());
    ASSERT_TRUE(r->has_batch());
    batch_ids.push_back(b + 1);
  }
  const double used_before = s.KvBlocks("used");
  // Batch 5 goes away (router: its requests failed elsewhere); batch 50 takes its blocks.
  ASSERT_TRUE(session.ClearCache(uint64_t{5}).ok());
  EXPECT_LT(s.KvBlocks("used"), used_before);
  for (uint64_t k = 0; k < 3; ++k) plan.erase(500 + k);
  batch_ids.erase(std::find(batch_ids.begin(), batch_ids.end(), 5));
  absl::StatusOr<pb::PrefillResponse> r =
      session.Prefill(PrefillOf(50, {Req(5000, golden[4], 16), Req(5001, golden[6], 16)}));
  ASSERT_TRUE(r.ok()) << r.status();
  t.Absorb(r->generations());
  plan[5000] = {&golden[4], 16};
  plan[5001] = {&golden[6], 16};
  batch_ids.push_back(50);

  absl::StatusOr<pb::DecodeResponse> d = session.Decode(DecodeOf(batch_ids));
  ASSERT_TRUE(d.ok()) << d.status();
  t.Absorb(d->generations());
  ASSERT_TRUE(d->has_batch());
  EXPECT_EQ(d->batch().id(), 1u);
  EXPECT_EQ(static_cast<size_t>(d->batch().request_ids_size()), plan.size());
  for (uint64_t gone : {2, 24, 50}) {
    EXPECT_EQ(session.shard(0).Decode(DecodeOf({gone})).status().code(),
              absl::StatusCode::kNotFound)
        << gone;
  }
  DecodeToTheEnd(session, t, d->batch());
  for (const auto& [id, p] : plan) t.ExpectGolden(id, *p.first, p.second);
  EXPECT_EQ(s.KvBlocks("used"), 0);
  s.ExpectStillServing(60);
}

// Ids the router never repeats, repeated: refused before anything changes.
TEST(ServeLimits, DuplicateIdsAreRefusedWithoutLosingCachedBatches) {
  Served s({}, 64, 128, 128);
  ASSERT_TRUE(s.ok());
  RouterSession& session = s.session();
  const Case& c = Golden()[1];
  Tracker t;
  absl::StatusOr<pb::PrefillResponse> r = session.Prefill(PrefillOf(1, {Req(5, c, 8)}));
  ASSERT_TRUE(r.ok()) << r.status();
  t.Absorb(r->generations());
  const double used = s.KvBlocks("used");
  // The same batch id again.
  r = session.Prefill(PrefillOf(1, {Req(6, c, 8)}));
  ExpectRefused(r, absl::StatusCode::kInvalidArgument, "batch.id = 1");
  // The same request id twice in one batch.
  r = session.Prefill(PrefillOf(2, {Req(7, c, 8), Req(7, c, 8)}));
  ExpectRefused(r, absl::StatusCode::kInvalidArgument, "requests[1].id = 7");
  EXPECT_EQ(s.KvBlocks("used"), used);
  // Request 5 again in another batch: fine alone, refused when concatenated with batch 1.
  r = session.Prefill(PrefillOf(3, {Req(5, c, 8)}));
  ASSERT_TRUE(r.ok()) << r.status();
  absl::StatusOr<pb::DecodeResponse> d = session.Decode(DecodeOf({1, 3}));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  // The same batch listed twice.
  d = session.Decode(DecodeOf({1, 1}));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  // Batch 1 lost nothing: it runs to its golden end.
  ASSERT_TRUE(session.ClearCache(uint64_t{3}).ok());
  d = session.Decode(DecodeOf({1}));
  ASSERT_TRUE(d.ok()) << d.status();
  t.Absorb(d->generations());
  ASSERT_TRUE(d->has_batch());
  DecodeToTheEnd(session, t, d->batch());
  t.ExpectGolden(5, c, 8);
  EXPECT_EQ(s.KvBlocks("used"), 0);
  s.ExpectStillServing(9);
}

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
    Case k;
    k.prompt_ids = c.at("prompt_ids").get<std::vector<uint32_t>>();
    k.greedy = {.ids = c.at("greedy_ids").get<std::vector<uint32_t>>(),
                .logprobs = c.at("greedy_logprobs").get<std::vector<float>>(),
                .min_top2_gap = c.at("min_top2_gap").get<double>(),
                .scale = integration::LogitScale(c.at("last_logits").get<std::vector<float>>())};
    return k;
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
