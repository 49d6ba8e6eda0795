// Helpers shared by the BatchEngine tests (fake backend and real demo model).
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "server/batch_engine.h"
#include "server/next_token_chooser.h"

namespace phishard {
namespace engine_test {

inline RequestInput Req(uint64_t id, std::vector<int32_t> ids, uint32_t max_new) {
  RequestInput r;
  r.id = id;
  r.token_ids = std::move(ids);
  r.inputs = "unused";
  r.truncate = 1000;
  r.stopping.max_new_tokens = max_new;
  return r;
}

inline BatchInput Batch(uint64_t id, std::vector<RequestInput> requests) {
  BatchInput b;
  b.id = id;
  b.requests = std::move(requests);
  b.size = static_cast<uint32_t>(b.requests.size());
  return b;
}

inline std::vector<int32_t> Prompt(int n, uint64_t seed) {
  PortableRng rng(seed);
  std::vector<int32_t> ids;
  for (int i = 0; i < n; ++i) ids.push_back(1 + static_cast<int32_t>(rng.UniformInt(4000)));
  return ids;
}

// Greedy continuation computed straight from the fake's logits function.
// Everything observable in a step result, NaN-safe, for equality checks.
inline std::string Describe(const StepResult& r) {
  std::string s;
  for (const GenerationOut& g : r.generations) {
    absl::StrAppend(&s, "gen ", g.request_id, " pl=", g.prefill_tokens_length,
                    " ids=", absl::StrJoin(g.next_tokens.ids, ","),
                    " lp=", absl::StrJoin(g.next_tokens.logprobs, ","), " texts=[",
                    absl::StrJoin(g.next_tokens.texts, "|"), "]");
    if (g.generated_text) {
      absl::StrAppend(&s, " done(", g.generated_text->text, ",", g.generated_text->generated_tokens,
                      ",", static_cast<int>(g.generated_text->finish_reason), ",",
                      g.generated_text->seed ? std::to_string(*g.generated_text->seed) : "-", ")");
    }
    s += "\n";
  }
  if (r.batch) {
    absl::StrAppend(&s, "batch ", r.batch->id, " [", absl::StrJoin(r.batch->request_ids, ","),
                    "] size=", r.batch->size, " max=", r.batch->max_tokens,
                    " cur=", r.batch->current_tokens);
  }
  return s;
}

inline const GenerationOut* Find(const StepResult& r, uint64_t id) {
  for (const GenerationOut& g : r.generations) {
    if (g.request_id == id) return &g;
  }
  return nullptr;
}

// The router's warmup batch (§3.2) for the tiny model's launcher defaults: I = 1023,
// Pmax = 1073, Tt = 1024 ⇒ two requests with truncate 1023 and 50, all ids 0.
inline BatchInput RouterWarmupBatch(uint32_t input_len, uint32_t max_prefill, uint32_t max_total) {
  BatchInput b;
  b.id = 0;
  std::string text;
  for (uint32_t i = 0; i < input_len; ++i) text += "_test ";
  for (uint32_t n = 0; n < max_prefill; n += input_len) {
    RequestInput r;
    r.id = 0;
    r.inputs = text;
    r.truncate = std::min(input_len, max_prefill - n);
    r.prefill_logprobs = true;
    r.parameters.temperature = 0.9f;
    r.parameters.top_k = 10;
    r.parameters.top_p = 0.9f;
    r.parameters.typical_p = 0.9f;
    r.parameters.repetition_penalty = 1.2f;
    r.parameters.frequency_penalty = 0.5f;
    r.parameters.presence_penalty = 0.5f;
    r.parameters.watermark = true;
    r.stopping.max_new_tokens = max_total - r.truncate;
    b.requests.push_back(r);
  }
  b.size = static_cast<uint32_t>(b.requests.size());
  b.max_tokens = input_len;
  return b;
}

// 1,000 random router-like (and some invalid) operations. After every step the pool's free count
// equals total minus the blocks of the cached batches as reported by their CachedBatch; at the
// end every batch is driven to completion the router's way and the pool must be entirely free.
// Uses request ids and batch ids from 0 upwards; `engine` must start empty with `num_blocks` free.
inline void RunRandomizedOperations(BatchEngine* engine, int num_blocks, int ops, uint64_t seed,
                                    int max_prompt) {
  const int kBlocks = num_blocks;
  PortableRng rng(seed);
  std::map<uint64_t, CachedBatchOut> cached;  // what the router knows
  std::set<uint64_t> finished;                // requests that reported generated_text
  uint64_t next_batch = 0, next_request = 0;
  int ok_ops = 0;

  auto absorb = [&](const StepResult& r, const std::vector<uint64_t>& consumed) {
    for (uint64_t id : consumed) cached.erase(id);
    for (const GenerationOut& g : r.generations) {
      ASSERT_EQ(g.next_tokens.ids.size(), 1u);
      ASSERT_FALSE(finished.count(g.request_id)) << "finished request generated again";
      if (g.generated_text) finished.insert(g.request_id);
    }
    if (r.batch) cached[r.batch->id] = *r.batch;
  };
  auto check_pool = [&] {
    int used = 0;
    for (auto& [id, b] : cached) used += b.max_tokens / 16;
    ASSERT_EQ(engine->kv_blocks_free(), kBlocks - used);
    ASSERT_EQ(engine->num_cached_batches(), cached.size());
  };
  auto pick = [&]() -> uint64_t {
    auto it = cached.begin();
    std::advance(it, rng.UniformInt(cached.size()));
    return it->first;
  };

  for (int op = 0; op < ops; ++op) {
    const uint64_t kind = rng.UniformInt(10);
    if (kind < 3 || cached.empty()) {  // Prefill
      std::vector<RequestInput> reqs;
      const int n = 1 + static_cast<int>(rng.UniformInt(3));
      for (int i = 0; i < n; ++i) {
        RequestInput r = Req(next_request++,
                             Prompt(1 + static_cast<int>(rng.UniformInt(max_prompt)), op * 7 + i),
                             1 + static_cast<uint32_t>(rng.UniformInt(30)));
        if (rng.UniformInt(3) == 0) {
          r.parameters.do_sample = true;
          r.parameters.seed = rng.Next();
          r.parameters.top_k = static_cast<uint32_t>(rng.UniformInt(20));
        }
        if (rng.UniformInt(4) == 0) r.prefill_logprobs = true;
        if (rng.UniformInt(20) == 0) r.parameters.top_p = 0.0f;  // invalid
        reqs.push_back(r);
      }
      const uint64_t id = next_batch++;
      auto res = engine->Prefill(Batch(id, reqs));
      if (res.ok()) {
        ++ok_ops;
        absorb(*res, {});
      } else {
        ASSERT_TRUE(absl::IsResourceExhausted(res.status()) ||
                    absl::IsInvalidArgument(res.status()))
            << res.status();
      }
    } else if (kind < 7) {  // Decode 1–3 batches, random order
      std::vector<uint64_t> ids;
      const int n = 1 + static_cast<int>(rng.UniformInt(std::min<size_t>(3, cached.size())));
      while (static_cast<int>(ids.size()) < n) {
        const uint64_t id = pick();
        if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
      }
      if (rng.UniformInt(15) == 0) {  // an unknown id anywhere in the list: nothing happens
        ids.insert(ids.begin() + rng.UniformInt(ids.size() + 1), uint64_t{1} << 40);
        ASSERT_EQ(engine->Decode(ids).status().code(), absl::StatusCode::kNotFound);
      } else {
        auto res = engine->Decode(ids);
        ASSERT_TRUE(res.ok()) << res.status();
        ++ok_ops;
        absorb(*res, ids);
      }
    } else if (kind < 9) {  // FilterBatch: drop finished ones plus a random client disconnect
      const uint64_t id = pick();
      std::vector<uint64_t> keep;
      for (uint64_t r : cached[id].request_ids) {
        if (!finished.count(r) && rng.UniformInt(6) != 0) keep.push_back(r);
      }
      if (rng.UniformInt(10) == 0) keep.push_back(1u << 30);  // unknown: must fail cleanly
      if (keep.empty()) {
        ASSERT_TRUE(engine->ClearCache(id).ok());
        cached.erase(id);
      } else {
        for (size_t i = keep.size(); i > 1; --i) std::swap(keep[i - 1], keep[rng.UniformInt(i)]);
        auto res = engine->FilterBatch(id, keep);
        if (res.ok()) {
          ++ok_ops;
          EXPECT_EQ(res->request_ids, keep);
          cached[id] = *res;
        } else {
          ASSERT_EQ(res.status().code(), absl::StatusCode::kNotFound) << res.status();
        }
      }
    } else {  // ClearCache: one batch, or (rarely) all
      if (rng.UniformInt(8) == 0) {
        ASSERT_TRUE(engine->ClearCache(std::nullopt).ok());
        cached.clear();
      } else {
        const uint64_t id = pick();
        ASSERT_TRUE(engine->ClearCache(id).ok());
        cached.erase(id);
      }
    }
    check_pool();
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_GT(ok_ops, ops / 2);
  // Drain: decode everything together, filtering finished requests as the router does.
  while (!cached.empty()) {
    std::vector<uint64_t> ids;
    for (auto& [id, b] : cached) ids.push_back(id);
    auto res = engine->Decode(ids);
    ASSERT_TRUE(res.ok()) << res.status();
    absorb(*res, ids);
    for (auto& [id, b] : cached) {
      std::vector<uint64_t> keep;
      for (uint64_t r : b.request_ids) {
        if (!finished.count(r)) keep.push_back(r);
      }
      if (keep.size() == b.request_ids.size()) continue;
      ASSERT_FALSE(keep.empty());  // an all-finished batch is never returned
      auto f = engine->FilterBatch(id, keep);
      ASSERT_TRUE(f.ok());
      b = *f;
    }
    check_pool();
  }
  EXPECT_EQ(engine->kv_blocks_free(), kBlocks);
  EXPECT_EQ(engine->num_cached_batches(), 0u);
}

}  // namespace engine_test
}  // namespace phishard
