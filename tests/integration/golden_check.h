// Greedy outputs of a `phishard serve` against the Hugging Face goldens (tests/golden/*.json,
// float32 transformers), with the tolerance of the device under test (TestDevice()):
//
//  cpu  (float32): logits agree with HF to ~2e-5 (the golden's cpu_check), so greedy ids must be
//       equal everywhere and logprobs within 1e-3.
//  cuda (bf16 storage, float32 accumulation): the bounds of tests/gpu/cuda_model_test.cc, which
//  come
//       from a numpy emulation of exactly that backend's rounding on all 17 fixture cases:
//         a top-1/top-2 decision moves by at most 0.0054 x scale (scale = max(1, max |logit|) of
//         the case) -> near-tie bound kTieFrac = 0.008 x scale; logprobs of the chosen tokens move
//         by at most 0.076 -> tolerance 0.2.
//       The goldens record one top-1/top-2 margin per case (min_top2_gap, the smallest over its
//       greedy steps), not one per step. A case whose margin is at least the near-tie bound must
//       give the golden ids exactly. A case under it may part from the golden once, at a step that
//       the golden itself calls a near-tie: ids equal up to that step, and there our chosen token's
//       logprob within the logprob tolerance of the golden's (both are the top of a near-tie);
//       after it the sequences continue from different tokens and nothing more is compared.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace integration {

struct GoldenTolerance {
  float logprob;    // |ours - golden| for chosen-token and prompt logprobs
  double tie_frac;  // near-tie bound as a fraction of the case's logit scale; 0 = ids exact
};

inline GoldenTolerance DeviceTolerance() {
  if (TestOnCuda()) return {.logprob = 0.2f, .tie_frac = 0.008};
  return {.logprob = 1e-3f, .tie_frac = 0.0};
}

// max(1, max |v|): the logit scale of a case (from its recorded last_logits).
inline double LogitScale(const std::vector<float>& logits) {
  double s = 1.0;
  for (float v : logits) s = std::max(s, std::fabs(static_cast<double>(v)));
  return s;
}

// One golden greedy continuation, as the checks need it.
struct GoldenGreedy {
  std::vector<uint32_t> ids;
  std::vector<float> logprobs;
  double min_top2_gap = 0;  // smallest top-1/top-2 logit margin over the greedy steps
  double scale = 1;         // LogitScale(last_logits)
};

// Checks `ids` (and `logprobs`, when not empty: one per id) — what the server generated, a prefix
// of the golden's length — against `g`. Returns the number of leading steps that are comparable
// (all of them, or up to and including an allowed near-tie divergence on CUDA); the caller compares
// texts only when it equals ids.size() and the ids are equal.
inline size_t ExpectGreedyMatchesGolden(const std::vector<uint32_t>& ids,
                                        const std::vector<float>& logprobs, const GoldenGreedy& g,
                                        const std::string& what) {
  const GoldenTolerance tol = DeviceTolerance();
  EXPECT_LE(ids.size(), g.ids.size()) << what;
  const size_t n = std::min(ids.size(), g.ids.size());
  if (!logprobs.empty()) {
    EXPECT_EQ(logprobs.size(), ids.size()) << what;
  }
  const double tie = tol.tie_frac * g.scale;
  const bool may_part = g.min_top2_gap < tie;
  size_t k = 0;
  for (; k < n; ++k) {
    const bool have_lp = k < logprobs.size() && k < g.logprobs.size();
    if (have_lp) {
      EXPECT_NEAR(logprobs[k], g.logprobs[k], tol.logprob) << what << " token " << k;
    }
    if (ids[k] == g.ids[k]) continue;
    if (!may_part) {
      ADD_FAILURE() << what << ": token " << k << " is " << ids[k] << ", golden " << g.ids[k]
                    << (tie > 0 ? " (min_top2_gap " + std::to_string(g.min_top2_gap) +
                                      " >= bf16 near-tie bound " + std::to_string(tie) +
                                      ": no flip allowed)"
                                : "");
      return k;
    }
    std::printf(
        "  %s: parts from the golden at token %zu (%u vs %u), a near-tie case "
        "(min_top2_gap %.4f < %.4f); not compared further\n",
        what.c_str(), k, ids[k], g.ids[k], g.min_top2_gap, tie);
    return k + 1;
  }
  return k;
}

}  // namespace integration
}  // namespace phishard
