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
//   - duplicate batch / request ids refused without losing the batches already cached.
// (Churn and adapter slots: serve_churn_test.cc; shared pieces: serve_limits_util.h.)
// Every generated token is compared with the Hugging Face golden (tests/golden/tiny-phi-code.json)
// under the device tolerance of tests/integration/golden_check.h: greedy decoding of a request does
// not depend on what else is in its batch, so any mix-up of KV blocks or rows shows as a mismatch.
#include <algorithm>
#include <limits>
#include <map>
#include <tuple>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/integration/serve_limits_util.h"

namespace phishard {
namespace {

using namespace limits_test;  // NOLINT(build/namespaces): the limit tests' shared fixture

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

}  // namespace
}  // namespace phishard
