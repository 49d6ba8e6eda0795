// Greedy rows chosen by the backend (ModelBackend::ForwardGreedy, BatchEngineOptions::
// greedy_on_backend) must give exactly what the host chooser gives:
//  - GreedyPickCpu (the spec of the device kernel) equals NextTokenChooser::Choose of a plain
//    greedy request bit for bit, on rows with ties, NaN, +-inf;
//  - a BatchEngine over a backend that, like the CUDA one, leaves the marked rows' logits out
//    (here: NaN) produces the same generations as an engine choosing every row on the host, for a
//    mixed batch of greedy, sampling, penalty, watermark, alternatives and prefill-logprobs
//    requests, through prefill, decode, filter and concatenation.
// Everything runs on the CPU, so equality is exact (no tolerance).
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/greedy_pick.h"
#include "model/tokenizer.h"
#include "server/batch_engine.h"
#include "server/next_token_chooser.h"
#include "tests/server/batch_engine_fixture.h"
#include "tests/server/engine_test_util.h"
#include "tests/server/fake_model.h"

namespace phishard {
namespace {

using namespace engine_test;  // NOLINT: test helpers
using testing_fake::FakeModel;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

bool SameFloat(float a, float b) {
  return std::memcmp(&a, &b, sizeof(float)) == 0 || (std::isnan(a) && std::isnan(b));
}

TEST(GreedyPickVsChooser, PlainGreedyChooseEqualsGreedyPickCpu) {
  const int V = 1001;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-5.0f, 5.0f);
  std::vector<std::vector<float>> rows;
  for (int k = 0; k < 12; ++k) {
    std::vector<float> r(V);
    for (float& x : r) x = u(rng);
    switch (k) {
      case 1:
        r[10] = r[500] = r[900] = 7.0f;
        break;  // tie: first index
      case 2:
        for (int i = 0; i < V; i += 2) r[i] = kNaN;
        break;
      case 3:
        for (int i = 0; i < V; i += 3) r[i] = -kInf;
        break;
      case 4:
        r[0] = kNaN;
        break;
      case 5:
        r[V - 1] = kInf;
        r[3] = kInf;
        break;
      case 6:
        r.assign(V, kNaN);
        break;
      case 7:
        r.assign(V, -kInf);
        break;
      case 8:
        r.assign(V, -kInf);
        r[77] = 2.0f;
        break;
      case 9:
        r.assign(V, 0.5f);
        break;
      case 10:
        for (float& x : r) x = x * 100.0f + 3000.0f;
        break;
      default:
        break;
    }
    rows.push_back(r);
  }
  SamplingParams greedy_t1;  // temperature 1, no warper: greedy
  SamplingParams greedy_t0;
  greedy_t0.temperature = 0.0f;
  greedy_t0.top_k = 5;  // warpers are skipped at temperature 0
  greedy_t0.top_p = 0.5f;
  for (const SamplingParams& params : {greedy_t1, greedy_t0}) {
    NextTokenChooser chooser(params, V);
    ASSERT_TRUE(chooser.plain_greedy());
    ChooserWorkspace ws;
    for (size_t k = 0; k < rows.size(); ++k) {
      const std::vector<int32_t> history = {1, 2, 3};
      const TokenChoice want = chooser.Choose(rows[k], history, &ws);
      GreedyPick got;
      ASSERT_EQ(GreedyPickCpu({.logits = rows[k].data(),
                               .out = &got,
                               .rows = 1,
                               .cols = V,
                               .part_cols = V,
                               .row_stride = V}),
                KernelStatus::kOk);
      EXPECT_EQ(got.id, want.id) << "row " << k;
      EXPECT_TRUE(SameFloat(got.logprob, want.logprob))
          << "row " << k << ": " << got.logprob << " vs " << want.logprob;
    }
  }
}

TEST(GreedyPickVsChooser, PlainGreedyExcludesProcessorsSamplingAndAlternatives) {
  auto plain = [](auto edit) {
    SamplingParams p;
    edit(p);
    return NextTokenChooser(p, 100).plain_greedy();
  };
  EXPECT_TRUE(plain([](SamplingParams&) {}));
  EXPECT_TRUE(plain([](SamplingParams& p) {
    p.temperature = 0.0f;
    p.do_sample = true;
  }));
  EXPECT_FALSE(plain([](SamplingParams& p) { p.do_sample = true; }));
  EXPECT_FALSE(plain([](SamplingParams& p) { p.top_k = 3; }));
  EXPECT_FALSE(plain([](SamplingParams& p) { p.temperature = 0.7f; }));
  EXPECT_FALSE(plain([](SamplingParams& p) { p.watermark = true; }));
  EXPECT_FALSE(plain([](SamplingParams& p) { p.repetition_penalty = 1.1f; }));
  EXPECT_FALSE(plain([](SamplingParams& p) { p.frequency_penalty = 0.2f; }));
  EXPECT_FALSE(plain([](SamplingParams& p) { p.presence_penalty = -0.2f; }));
  EXPECT_FALSE(plain([](SamplingParams& p) { p.return_k_alternatives = 2; }));
}

// FakeModel whose ForwardGreedy behaves like the CUDA backend's: picks for the marked rows, and
// those rows' logits not delivered (NaN here, so a host choice made from them would show).
class LeavesGreedyRowsOut : public FakeModel {
 public:
  absl::Status ForwardGreedy(const ForwardBatch& batch, absl::Span<const float>* logits,
                             absl::Span<const GreedyPick>* picks) override {
    ++greedy_calls;
    if (absl::Status s = FakeModel::ForwardGreedy(batch, logits, picks); !s.ok()) return s;
    poisoned_.assign(logits->begin(), logits->end());
    const int V = config().vocab_size;
    for (size_t r = 0; r < batch.greedy_rows.size(); ++r) {
      if (!batch.greedy_rows[r]) continue;
      ++marked_rows;
      std::fill(poisoned_.begin() + r * V, poisoned_.begin() + (r + 1) * V, kNaN);
    }
    *logits = absl::MakeConstSpan(poisoned_);
    return absl::OkStatus();
  }
  int greedy_calls = 0;
  int marked_rows = 0;

 private:
  std::vector<float> poisoned_;
};

// The tiny-phi-code tokenizer, loaded once per suite (BatchEngineTest's fixture).
class GreedyOnBackendEngine : public BatchEngineTest {};

std::vector<RequestInput> MixedRequests(uint64_t first_id, uint64_t seed) {
  std::vector<RequestInput> reqs;
  for (int k = 0; k < 9; ++k) {
    RequestInput r = Req(first_id + k, Prompt(3 + k * 2, seed + k), 12);
    SamplingParams& p = r.parameters;
    switch (k) {
      case 0:
        break;  // plain greedy
      case 1:
        p.temperature = 0.0f;
        p.top_k = 4;
        break;  // plain greedy (t = 0)
      case 2:
        p.do_sample = true;
        p.seed = 11;
        break;  // sampling
      case 3:
        p.repetition_penalty = 1.3f;
        break;  // greedy + penalty
      case 4:
        p.frequency_penalty = 0.4f;
        p.presence_penalty = 0.3f;
        break;
      case 5:
        p.watermark = true;
        break;
      case 6:
        p.return_k_alternatives = 3;
        break;  // greedy + alternatives
      case 7:
        r.prefill_logprobs = true;
        break;  // plain greedy, full prompt rows
      case 8:
        p.temperature = 0.8f;
        p.top_p = 0.9f;
        p.seed = 5;
        break;
    }
    reqs.push_back(r);
  }
  return reqs;
}

TEST_F(GreedyOnBackendEngine, MixedBatchesGiveTheHostChoosersResults) {
  FakeModel host_model;
  LeavesGreedyRowsOut backend_model;
  ASSERT_TRUE(host_model.AllocateKvCache(512, 16).ok());
  ASSERT_TRUE(backend_model.AllocateKvCache(512, 16).ok());
  BatchEngineOptions host_opts;
  host_opts.greedy_on_backend = false;
  BatchEngine host(&host_model, tokenizer_, host_opts);
  BatchEngine backend(&backend_model, tokenizer_, BatchEngineOptions{});

  auto both = [&](auto step) {
    absl::StatusOr<StepResult> a = step(host), b = step(backend);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(Describe(*b), Describe(*a));
    for (const GenerationOut& g : b->generations) {
      for (float lp : g.next_tokens.logprobs) EXPECT_FALSE(std::isnan(lp)) << g.request_id;
      if (g.prefill_tokens) {  // prefill logprobs come from full rows, never poisoned
        for (size_t k = 1; k < g.prefill_tokens->logprobs.size(); ++k) {
          EXPECT_FALSE(std::isnan(g.prefill_tokens->logprobs[k])) << g.request_id;
        }
      }
    }
    const GenerationOut* alt = nullptr;
    for (const GenerationOut& g : b->generations) {
      if (!g.next_tokens.alternative_tokens.empty()) alt = &g;
    }
    if (alt != nullptr) {
      EXPECT_EQ(alt->next_tokens.alternative_tokens[0].ids.size(), 3u);
    }
  };
  both([&](BatchEngine& e) { return e.Prefill(Batch(1, MixedRequests(100, 1))); });
  both([&](BatchEngine& e) { return e.Prefill(Batch(2, MixedRequests(200, 50))); });
  for (int i = 0; i < 4; ++i) both([&](BatchEngine& e) { return e.Decode({1}); });
  both([&](BatchEngine& e) { return e.Decode({1, 2}); });  // concatenation
  both([&](BatchEngine& e) -> absl::StatusOr<StepResult> {
    absl::StatusOr<CachedBatchOut> f = e.FilterBatch(1, {208, 100, 203, 101, 102, 206});
    if (!f.ok()) return f.status();
    return e.Decode({1});
  });
  for (int i = 0; i < 8; ++i) {
    both([&](BatchEngine& e) -> absl::StatusOr<StepResult> {
      if (e.num_cached_batches() == 0) return StepResult{};
      return e.Decode({1});
    });
  }
  // The fast path was taken, and only for the plain-greedy requests' rows: per prefill 3 of 9
  // requests (0, 1, 7); per decode step their live rows.
  EXPECT_GT(backend_model.greedy_calls, 10);
  EXPECT_GT(backend_model.marked_rows, 20);
  EXPECT_EQ(host_model.forwards, backend_model.forwards);
}

// TP: every rank runs the same steps with the same picks; each reports only the requests it owns,
// and together they report what one rank choosing on the host reports.
TEST_F(GreedyOnBackendEngine, RanksAgreeWithTheHostChooser) {
  FakeModel host_model;
  ASSERT_TRUE(host_model.AllocateKvCache(256, 16).ok());
  BatchEngineOptions host_opts;
  host_opts.greedy_on_backend = false;
  BatchEngine host(&host_model, tokenizer_, host_opts);
  std::vector<std::unique_ptr<LeavesGreedyRowsOut>> models;
  std::vector<std::unique_ptr<BatchEngine>> ranks;
  for (int r = 0; r < 2; ++r) {
    models.push_back(std::make_unique<LeavesGreedyRowsOut>());
    ASSERT_TRUE(models.back()->AllocateKvCache(256, 16).ok());
    BatchEngineOptions o;
    o.rank = r;
    o.world_size = 2;
    ranks.push_back(std::make_unique<BatchEngine>(models.back().get(), tokenizer_, o));
  }
  auto merged = [&](auto step) {
    absl::StatusOr<StepResult> want = step(host);
    ASSERT_TRUE(want.ok()) << want.status();
    std::vector<std::string> got(want->generations.size());
    for (auto& e : ranks) {
      absl::StatusOr<StepResult> r = step(*e);
      ASSERT_TRUE(r.ok()) << r.status();
      for (const GenerationOut& g : r->generations) {
        for (size_t i = 0; i < want->generations.size(); ++i) {
          if (want->generations[i].request_id != g.request_id) continue;
          StepResult one;
          one.generations.push_back(g);
          got[i] = Describe(one);
        }
      }
    }
    for (size_t i = 0; i < got.size(); ++i) {
      StepResult one;
      one.generations.push_back(want->generations[i]);
      EXPECT_EQ(got[i], Describe(one));
    }
  };
  merged([&](BatchEngine& e) { return e.Prefill(Batch(1, MixedRequests(10, 3))); });
  for (int i = 0; i < 5; ++i) merged([&](BatchEngine& e) { return e.Decode({1}); });
}

}  // namespace
}  // namespace phishard
