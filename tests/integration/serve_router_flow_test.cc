// The real `phishard serve` process driven over its unix socket exactly as the LoRAX router
// drives a shard: ServiceDiscovery -> ClearCache -> Info -> Warmup -> Prefill -> Decode loop with
// FilterBatch as requests finish, batches concatenated in one Decode, ClearCache by presence.
// Greedy outputs must equal the Hugging Face golden file token for token (float32 on the CPU; on
// CUDA, PHISHARD_TEST_DEVICE=cuda, within the bf16 bounds of tests/integration/golden_check.h).
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/client.h"
#include "tests/integration/golden_check.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;
using integration::DemoShard;
using integration::ExpectGreedyMatchesGolden;
using integration::GoldenGreedy;
using integration::TempDir;

// Logprob tolerance of the device under test (golden_check.h): CPU float32 1e-3, CUDA bf16 0.2.
const float kLogprobTol = integration::DeviceTolerance().logprob;

struct GoldenCase {
  std::string prompt;
  std::vector<uint32_t> prompt_ids;
  std::vector<uint32_t> greedy_ids;
  std::vector<float> greedy_logprobs;
  std::string greedy_text;
  std::vector<std::optional<float>> prefill_logprobs;
  GoldenGreedy greedy;  // ids, logprobs, top-2 margin and logit scale for the device tolerance
};

std::vector<GoldenCase> LoadGolden() {
  const std::string path = std::string(PHISHARD_TESTDATA) + "/../tests/golden/tiny-phi-code.json";
  nlohmann::json j = nlohmann::json::parse(integration::ReadFile(path));
  std::vector<GoldenCase> cases;
  for (const auto& c : j.at("cases")) {
    GoldenCase g;
    g.prompt = c.at("prompt").get<std::string>();
    g.prompt_ids = c.at("prompt_ids").get<std::vector<uint32_t>>();
    g.greedy_ids = c.at("greedy_ids").get<std::vector<uint32_t>>();
    g.greedy_logprobs = c.at("greedy_logprobs").get<std::vector<float>>();
    g.greedy_text = c.at("greedy_text").get<std::string>();
    for (const auto& lp : c.at("prefill_logprobs")) {
      g.prefill_logprobs.push_back(lp.is_null() ? std::nullopt
                                                : std::optional<float>(lp.get<float>()));
    }
    g.greedy = {.ids = g.greedy_ids,
                .logprobs = g.greedy_logprobs,
                .min_top2_gap = c.at("min_top2_gap").get<double>(),
                .scale = integration::LogitScale(c.at("last_logits").get<std::vector<float>>())};
    cases.push_back(std::move(g));
  }
  return cases;
}

class RouterFlow : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    shard_ = new DemoShard(*dir_);
    ASSERT_TRUE(shard_->ready) << shard_->process->Logs();
    absl::StatusOr<std::unique_ptr<RouterSession>> s =
        RouterSession::Connect(UdsTarget(shard_->uds), /*timeout_s=*/120);
    ASSERT_TRUE(s.ok()) << s.status();
    session_ = s->release();
    // The router's startup, once for the suite.
    ASSERT_TRUE(session_->ClearCache(std::nullopt).ok());
    ASSERT_TRUE(session_->Info().ok());
    absl::StatusOr<std::optional<uint32_t>> w =
        session_->Warmup(RouterWarmupRequest(1023, 1073, 1024));
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE(w->has_value());
    warmup_tokens_ = **w;
  }
  static void TearDownTestSuite() {
    delete session_;
    if (shard_ != nullptr) {
      shard_->process->Signal(SIGTERM);
      EXPECT_EQ(shard_->process->Wait(30), 0) << shard_->process->Logs();
    }
    delete shard_;
    delete dir_;
  }
  void TearDown() override { ASSERT_TRUE(session_->ClearCache(std::nullopt).ok()); }

  static pb::Request Golden(uint64_t id, const GoldenCase& g, uint32_t max_new, bool with_ids) {
    pb::Request r = RouterRequest(id, g.prompt, with_ids ? g.prompt_ids : std::vector<uint32_t>{},
                                  1023, max_new);
    r.mutable_stopping_parameters()->set_ignore_eos_token(true);  // golden never stops at EOS
    return r;
  }
  static pb::PrefillRequest PrefillOf(uint64_t batch_id, std::vector<pb::Request> reqs) {
    pb::PrefillRequest p;
    p.mutable_batch()->set_id(batch_id);
    for (pb::Request& r : reqs) *p.mutable_batch()->add_requests() = std::move(r);
    p.mutable_batch()->set_size(static_cast<uint32_t>(p.batch().requests_size()));
    return p;
  }
  static pb::DecodeRequest DecodeOf(std::vector<uint64_t> ids) {
    pb::DecodeRequest d;
    for (uint64_t id : ids) d.add_batches()->set_id(id);
    return d;
  }

  static TempDir* dir_;
  static DemoShard* shard_;
  static RouterSession* session_;
  static uint32_t warmup_tokens_;
};
TempDir* RouterFlow::dir_ = nullptr;
DemoShard* RouterFlow::shard_ = nullptr;
RouterSession* RouterFlow::session_ = nullptr;
uint32_t RouterFlow::warmup_tokens_ = 0;

TEST_F(RouterFlow, DiscoveryInfoAndWarmupAnswerAsTheRouterNeeds) {
  EXPECT_EQ(session_->urls(), std::vector<std::string>{"unix://" + shard_->uds + "-0"});
  absl::StatusOr<pb::InfoResponse> info = session_->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->requires_padding());
  EXPECT_EQ(info->dtype(), integration::TestOnCuda() ? "torch.bfloat16" : "torch.float32");
  EXPECT_EQ(info->device_type(), integration::TestDevice());
  EXPECT_FALSE(info->has_window_size());
  EXPECT_EQ(info->block_size(), 16u);
  EXPECT_EQ(info->speculate(), 0u);
  EXPECT_EQ(info->preloaded_adapters_size(), 0);
  EXPECT_TRUE(info->supports_generation());
  EXPECT_FALSE(info->supports_embeddings());
  EXPECT_FALSE(info->supports_classification());
  EXPECT_FALSE(info->chunked_prefill());
  EXPECT_TRUE(info->requires_block_allocator());  // the router hands out KV blocks (spec §3.4)
  // Positive multiple of the block size, and enough for the router's own limits.
  EXPECT_GT(warmup_tokens_, 0u);
  EXPECT_EQ(warmup_tokens_ % 16, 0u);
  EXPECT_GE(warmup_tokens_, 1073u);
  EXPECT_TRUE(session_->Health().ok());
  // The warmup batch is never cached (its id 0 is reused by the router's first real batch).
  absl::StatusOr<pb::DecodeResponse> d = session_->Decode(DecodeOf({0}));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(d.status().message().find("Batch ID 0 not found in cache."), std::string::npos)
      << d.status();
}

TEST_F(RouterFlow, GreedyOutputsEqualTheHuggingFaceGolden) {
  const std::vector<GoldenCase> golden = LoadGolden();
  ASSERT_GE(golden.size(), 5u);
  for (bool with_ids : {true, false}) {  // router with / without a tokenizer
    SCOPED_TRACE(with_ids ? "router sends token ids" : "shard tokenizes inputs");
    pb::Batch batch;
    batch.set_id(0);
    for (size_t i = 0; i < golden.size(); ++i) {
      pb::Request r =
          Golden(i, golden[i], static_cast<uint32_t>(golden[i].greedy_ids.size()), with_ids);
      r.set_prefill_logprobs(true);
      *batch.add_requests() = r;
    }
    batch.set_size(static_cast<uint32_t>(batch.requests_size()));
    absl::StatusOr<std::vector<RequestOutcome>> out = RunBatchToCompletion(*session_, batch);
    ASSERT_TRUE(out.ok()) << out.status();
    for (size_t i = 0; i < golden.size(); ++i) {
      const GoldenCase& g = golden[i];
      const RequestOutcome& o = (*out)[i];
      SCOPED_TRACE(g.prompt);
      ASSERT_EQ(o.ids.size(), g.greedy_ids.size());
      ExpectGreedyMatchesGolden(o.ids, o.logprobs, g.greedy, "case " + std::to_string(i));
      std::string joined;
      bool any_special = false;
      for (size_t k = 0; k < o.texts.size(); ++k) {
        joined += o.texts[k];
        any_special |= o.is_special[k];
      }
      // Incremental texts (special tokens included, no clean-up) concatenate to the HF decode
      // (when the ids are the golden's: on CUDA a near-tie case may part from it).
      const bool same_ids = o.ids == g.greedy_ids;
      if (same_ids) {
        EXPECT_EQ(joined, g.greedy_text);
      }
      ASSERT_TRUE(o.generated_text.has_value());
      if (!any_special && same_ids) {
        EXPECT_EQ(o.generated_text->text(), g.greedy_text);
      }
      EXPECT_EQ(o.generated_text->finish_reason(), pb::FINISH_REASON_LENGTH);
      EXPECT_EQ(o.generated_text->generated_tokens(), g.greedy_ids.size());
      EXPECT_FALSE(o.generated_text->has_seed());  // greedy
      EXPECT_EQ(o.prefill_tokens_length, g.prompt_ids.size());
      ASSERT_TRUE(o.prefill_tokens.has_value());
      EXPECT_EQ(
          std::vector<uint32_t>(o.prefill_tokens->ids().begin(), o.prefill_tokens->ids().end()),
          g.prompt_ids);
      ASSERT_EQ(o.prefill_tokens->logprobs_size(), static_cast<int>(g.prefill_logprobs.size()));
      EXPECT_TRUE(std::isnan(o.prefill_tokens->logprobs(0)));
      for (size_t k = 1; k < g.prefill_logprobs.size(); ++k) {
        ASSERT_TRUE(g.prefill_logprobs[k].has_value());
        EXPECT_NEAR(o.prefill_tokens->logprobs(k), *g.prefill_logprobs[k], kLogprobTol);
      }
    }
  }
}

// The router's continuous batching: finish at different lengths, FilterBatch the survivors,
// prefill a second batch and decode both in one call (concatenated into the first id).
TEST_F(RouterFlow, FilterAndConcatenateLikeTheBatchingLoop) {
  const std::vector<GoldenCase> golden = LoadGolden();
  std::map<uint64_t, std::pair<const GoldenCase*, uint32_t>> plan = {
      {10, {&golden[0], 3}}, {11, {&golden[1], 6}}, {12, {&golden[2], 9}}, {20, {&golden[3], 4}}};
  std::map<uint64_t, std::vector<uint32_t>> got;
  std::map<uint64_t, bool> done;
  auto absorb = [&](const google::protobuf::RepeatedPtrField<pb::Generation>& gens) {
    for (const pb::Generation& g : gens) {
      ASSERT_EQ(g.next_tokens().ids_size(), 1);
      ASSERT_FALSE(done[g.request_id()]) << "request " << g.request_id() << " after finishing";
      got[g.request_id()].push_back(g.next_tokens().ids(0));
      if (g.has_generated_text()) {
        done[g.request_id()] = true;
        EXPECT_EQ(g.generated_text().generated_tokens(), plan[g.request_id()].second);
        EXPECT_EQ(g.generated_text().finish_reason(), pb::FINISH_REASON_LENGTH);
      }
    }
  };

  absl::StatusOr<pb::PrefillResponse> a = session_->Prefill(
      PrefillOf(1, {Golden(10, golden[0], 3, true), Golden(11, golden[1], 6, true),
                    Golden(12, golden[2], 9, true)}));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->generations_size(), 3);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(a->generations(i).prefill_tokens_length(), plan[10 + i].first->prompt_ids.size());
    EXPECT_FALSE(a->generations(i).has_prefill_tokens());  // not asked for
  }
  absorb(a->generations());
  ASSERT_TRUE(a->has_batch());
  EXPECT_EQ(a->batch().id(), 1u);
  EXPECT_EQ(std::vector<uint64_t>(a->batch().request_ids().begin(), a->batch().request_ids().end()),
            (std::vector<uint64_t>{10, 11, 12}));
  EXPECT_EQ(a->batch().size(), 3u);
  EXPECT_EQ(a->batch().current_tokens(), 3u);
  EXPECT_GT(a->batch().max_tokens(), 0u);
  EXPECT_EQ(a->batch().max_tokens() % 16, 0u);

  // Two decodes: request 10 reaches its 3 tokens and finishes but stays in the batch.
  pb::CachedBatch cur = a->batch();
  for (int step = 0; step < 2; ++step) {
    absl::StatusOr<pb::DecodeResponse> d = session_->Decode(DecodeOf({cur.id()}));
    ASSERT_TRUE(d.ok()) << d.status();
    absorb(d->generations());
    ASSERT_TRUE(d->has_batch());
    cur = d->batch();
  }
  ASSERT_TRUE(done[10]);
  EXPECT_EQ(cur.request_ids_size(), 3) << "finished requests stay until FilterBatch";
  const uint32_t tokens_before = cur.max_tokens();
  absl::StatusOr<std::optional<pb::CachedBatch>> f = session_->FilterBatch(cur.id(), {11, 12});
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE(f->has_value()) << "FilterBatch must always answer with the batch";
  cur = **f;
  EXPECT_EQ(std::vector<uint64_t>(cur.request_ids().begin(), cur.request_ids().end()),
            (std::vector<uint64_t>{11, 12}));
  EXPECT_EQ(cur.size(), 2u);
  EXPECT_LT(cur.max_tokens(), tokens_before);

  // A new batch joins: prefilled alone, then decoded together with the running one.
  absl::StatusOr<pb::PrefillResponse> b =
      session_->Prefill(PrefillOf(2, {Golden(20, golden[3], 4, true)}));
  ASSERT_TRUE(b.ok()) << b.status();
  absorb(b->generations());
  ASSERT_TRUE(b->has_batch());
  absl::StatusOr<pb::DecodeResponse> both = session_->Decode(DecodeOf({cur.id(), b->batch().id()}));
  ASSERT_TRUE(both.ok()) << both.status();
  EXPECT_EQ(both->generations_size(), 3);
  absorb(both->generations());
  ASSERT_TRUE(both->has_batch());
  cur = both->batch();
  EXPECT_EQ(cur.id(), 1u) << "the concatenation keeps the first batch's id";
  EXPECT_EQ(std::vector<uint64_t>(cur.request_ids().begin(), cur.request_ids().end()),
            (std::vector<uint64_t>{11, 12, 20}));
  absl::StatusOr<pb::DecodeResponse> gone = session_->shard(0).Decode(DecodeOf({2}));
  ASSERT_FALSE(gone.ok());
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(gone.status().message(), "Batch ID 2 not found in cache.");

  // Run to the end, filtering as the router does.
  while (true) {
    absl::StatusOr<pb::DecodeResponse> d = session_->Decode(DecodeOf({cur.id()}));
    ASSERT_TRUE(d.ok()) << d.status();
    absorb(d->generations());
    if (!d->has_batch()) break;
    cur = d->batch();
    std::vector<uint64_t> keep;
    for (uint64_t id : cur.request_ids()) {
      if (!done[id]) keep.push_back(id);
    }
    if (keep.empty()) {
      ASSERT_TRUE(session_->ClearCache(cur.id()).ok());
      break;
    }
    if (static_cast<int>(keep.size()) != cur.request_ids_size()) {
      f = session_->FilterBatch(cur.id(), keep);
      ASSERT_TRUE(f.ok() && f->has_value());
      cur = **f;
    }
  }
  // Batching never changes a greedy result: every request equals the golden prefix (within the
  // device's near-tie rule).
  for (const auto& [id, p] : plan) {
    ASSERT_TRUE(done[id]) << id;
    ASSERT_EQ(got[id].size(), p.second) << "request " << id;
    ExpectGreedyMatchesGolden(got[id], {}, p.first->greedy, "request " + std::to_string(id));
  }
}

TEST_F(RouterFlow, ClearCacheDecidesByPresenceNotValue) {
  const std::vector<GoldenCase> golden = LoadGolden();
  ASSERT_TRUE(session_->Prefill(PrefillOf(0, {Golden(1, golden[0], 8, true)})).ok());
  ASSERT_TRUE(session_->Prefill(PrefillOf(5, {Golden(2, golden[1], 8, true)})).ok());
  ASSERT_TRUE(session_->ClearCache(uint64_t{0}).ok());  // present, value 0: only batch 0
  EXPECT_EQ(session_->Decode(DecodeOf({0})).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(session_->Decode(DecodeOf({5})).ok());
  EXPECT_TRUE(session_->ClearCache(uint64_t{12345}).ok()) << "unknown id is not an error";
  ASSERT_TRUE(session_->ClearCache(std::nullopt).ok());  // absent: everything
  EXPECT_EQ(session_->Decode(DecodeOf({5})).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(RouterFlow, SingleTokenRequestsAndTheHealthProbeLeaveNoBatch) {
  const std::vector<GoldenCase> golden = LoadGolden();
  absl::StatusOr<pb::PrefillResponse> one =
      session_->Prefill(PrefillOf(3, {Golden(7, golden[0], 1, true)}));
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_EQ(one->generations_size(), 1);
  ASSERT_TRUE(one->generations(0).has_generated_text());
  EXPECT_EQ(one->generations(0).generated_text().finish_reason(), pb::FINISH_REASON_LENGTH);
  EXPECT_EQ(one->generations(0).generated_text().generated_tokens(), 1u);
  EXPECT_FALSE(one->has_batch());

  // The router's /health generation probe (spec §3.8), router blocks and slots included.
  const uint64_t kMax = std::numeric_limits<uint64_t>::max();
  pb::Request probe = RouterRequest(kMax, "liveness", {75}, 10, 1);
  probe.add_blocks(0);
  for (uint32_t s = 0; s < 16; ++s) probe.add_slots(s);
  absl::StatusOr<pb::PrefillResponse> p = session_->Prefill(PrefillOf(kMax, {probe}));
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->generations_size(), 1);
  EXPECT_EQ(p->generations(0).request_id(), kMax);
  EXPECT_FALSE(p->has_batch());

  // truncate keeps the last tokens.
  pb::Request t = RouterRequest(8, "", {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 4, 2);
  t.set_prefill_logprobs(true);
  absl::StatusOr<pb::PrefillResponse> tr = session_->Prefill(PrefillOf(4, {t}));
  ASSERT_TRUE(tr.ok()) << tr.status();
  EXPECT_EQ(tr->generations(0).prefill_tokens_length(), 4u);
  EXPECT_EQ(std::vector<uint32_t>(tr->generations(0).prefill_tokens().ids().begin(),
                                  tr->generations(0).prefill_tokens().ids().end()),
            (std::vector<uint32_t>{7, 8, 9, 10}));
}

}  // namespace
}  // namespace phishard
