// Shared pieces of the served-shard limit tests (serve_limits_test.cc, serve_churn_test.cc): the
// golden cases, request builders, a served demo model with metrics after the router's startup
// (Served), the router's invariants on received tokens (Tracker) and the router's block allocator
// (RouterBlocks).
#pragma once

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

namespace phishard::limits_test {

namespace pb = ::generate::v1;
namespace fs = std::filesystem;
using integration::DemoShard;
using integration::TempDir;

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

// One case of a golden file (tests/golden/*.json: prompt_ids, greedy_ids, greedy_logprobs,
// min_top2_gap, last_logits).
inline Case CaseFromJson(const nlohmann::json& c) {
  Case k;
  k.prompt_ids = c.at("prompt_ids").get<std::vector<uint32_t>>();
  k.greedy = {.ids = c.at("greedy_ids").get<std::vector<uint32_t>>(),
              .logprobs = c.at("greedy_logprobs").get<std::vector<float>>(),
              .min_top2_gap = c.at("min_top2_gap").get<double>(),
              .scale = integration::LogitScale(c.at("last_logits").get<std::vector<float>>())};
  return k;
}

inline const std::vector<Case>& Golden() {
  static const auto* cases = [] {
    auto* out = new std::vector<Case>();
    const nlohmann::json j = nlohmann::json::parse(integration::ReadFile(
        std::string(PHISHARD_TESTDATA) + "/../tests/golden/tiny-phi-code.json"));
    for (const auto& c : j.at("cases")) out->push_back(CaseFromJson(c));
    return out;
  }();
  return *cases;
}

// Greedy request `id` on golden case `c`, never stopping at EOS.
inline pb::Request Req(uint64_t id, const Case& c, uint32_t max_new) {
  pb::Request r = RouterRequest(id, "", c.prompt_ids, 0, max_new);
  r.mutable_stopping_parameters()->set_ignore_eos_token(true);
  return r;
}
// A request of `prompt_len` arbitrary (in-vocabulary) ids.
inline pb::Request Sized(uint64_t id, int prompt_len, uint32_t max_new) {
  std::vector<uint32_t> ids(prompt_len);
  for (int i = 0; i < prompt_len; ++i) ids[i] = 100 + static_cast<uint32_t>(i % 50);
  pb::Request r = RouterRequest(id, "", ids, 0, max_new);
  r.mutable_stopping_parameters()->set_ignore_eos_token(true);
  return r;
}
inline pb::PrefillRequest PrefillOf(uint64_t batch_id, std::vector<pb::Request> reqs) {
  pb::PrefillRequest p;
  p.mutable_batch()->set_id(batch_id);
  for (pb::Request& r : reqs) *p.mutable_batch()->add_requests() = std::move(r);
  p.mutable_batch()->set_size(static_cast<uint32_t>(p.batch().requests_size()));
  return p;
}
inline pb::DecodeRequest DecodeOf(const std::vector<uint64_t>& ids) {
  pb::DecodeRequest d;
  for (uint64_t id : ids) d.add_batches()->set_id(id);
  return d;
}

// The port `serve` logged for --metrics-addr 127.0.0.1:0.
inline int LoggedMetricsPort(const std::string& log) {
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
inline void DecodeToTheEnd(RouterSession& session, Tracker& t, pb::CachedBatch cur) {
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

}  // namespace phishard::limits_test
