// The fixture of the BatchEngine tests against the fake backend (batch_engine_test.cc,
// batch_engine_errors_test.cc): the real tiny-phi-code tokenizer and engines over a FakeModel
// (tests/server/fake_model.h), with the fake's own greedy tokens and logprobs as references.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "model/tokenizer.h"
#include "server/batch_engine.h"
#include "server/next_token_chooser.h"
#include "tests/server/fake_model.h"

namespace phishard::engine_test {

// The fake's greedy continuation of `context` (n tokens; eos_at as FakeLogits) and the
// log-probability it gives `token` after `context`.
inline std::vector<int32_t> ReferenceGreedy(std::vector<int32_t> context, int n,
                                            size_t eos_at = 0) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    const std::vector<float> row = testing_fake::FakeLogits(context, 4095, 0, eos_at);
    const int32_t best =
        static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
    out.push_back(best);
    context.push_back(best);
  }
  return out;
}

inline double RefLogprob(const std::vector<int32_t>& context, int32_t token) {
  const std::vector<float> row = testing_fake::FakeLogits(context, 4095, 0, 0);
  return row[token] - LogSumExp(row);
}

// The tiny-phi-code tokenizer, loaded once per suite, and engines over a FakeModel.
class BatchEngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tok = Tokenizer::FromDir(std::string(PHISHARD_MODELS) + "/tiny-phi-code");
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok).release();
  }
  static void TearDownTestSuite() { delete tokenizer_; }

  // An engine whose backend already holds a pool of `blocks` blocks (adopted, no Warmup).
  static std::unique_ptr<BatchEngine> MakeEngine(testing_fake::FakeModel* model, int blocks = 256,
                                                 int rank = 0, int world_size = 1) {
    EXPECT_TRUE(model->AllocateKvCache(blocks, 16).ok());
    BatchEngineOptions o;
    o.rank = rank;
    o.world_size = world_size;
    return std::make_unique<BatchEngine>(model, tokenizer_, o);
  }

  static inline Tokenizer* tokenizer_ = nullptr;
};

}  // namespace phishard::engine_test
