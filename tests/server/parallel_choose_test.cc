// ChooseRows against a plain sequential loop of NextTokenChooser::Choose (the reference): the
// same ids, logprobs and alternatives bit for bit, for one and several threads, over several
// steps (every sampling RNG must advance exactly as in the loop), with a mix of greedy and
// sampling requests, warpers, penalties and alternatives. Exact equality is the right bar: the
// rows are independent and each is computed by the same code in the same order.
#include "server/parallel_choose.h"

#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace phishard {
namespace {

SamplingParams ParamsFor(int i) {
  SamplingParams p;
  switch (i % 6) {
    case 0:  // greedy
      break;
    case 1:
      p.do_sample = true;
      p.seed = 1000 + i;
      break;
    case 2:
      p.do_sample = true;
      p.seed = 2000 + i;
      p.temperature = 0.7f;
      p.top_k = 40;
      p.top_p = 0.9f;
      break;
    case 3:
      p.repetition_penalty = 1.3f;
      p.return_k_alternatives = 5;
      break;
    case 4:
      p.do_sample = true;
      p.seed = 3000 + i;
      p.typical_p = 0.8f;
      p.frequency_penalty = 0.5f;
      break;
    default:
      p.temperature = 0.0f;  // greedy even with warpers
      p.top_k = 3;
      p.return_k_alternatives = 2;
  }
  return p;
}

bool SameChoice(const TokenChoice& a, const TokenChoice& b) {
  return a.id == b.id && std::memcmp(&a.logprob, &b.logprob, sizeof(float)) == 0 &&
         a.alt_ids == b.alt_ids && a.alt_logprobs.size() == b.alt_logprobs.size() &&
         (a.alt_logprobs.empty() || std::memcmp(a.alt_logprobs.data(), b.alt_logprobs.data(),
                                                a.alt_logprobs.size() * sizeof(float)) == 0);
}

TEST(ChooseRowsTest, MatchesSequentialChooseForAnyThreadCount) {
  const int kRows = 37, kVocab = 3001, kSteps = 3;
  for (int threads : {1, 2, 5, 0}) {
    SCOPED_TRACE(threads);
    std::vector<NextTokenChooser> ref, par;
    std::vector<std::vector<int32_t>> hist_ref(kRows), hist_par(kRows);
    for (int i = 0; i < kRows; ++i) {
      ref.emplace_back(ParamsFor(i), kVocab);
      par.emplace_back(ParamsFor(i), kVocab);
      hist_ref[i] = hist_par[i] = {i % kVocab, (7 * i) % kVocab, 11};
    }
    std::mt19937 rng(42);
    std::normal_distribution<float> dist(0.0f, 3.0f);
    ChooseScratch scratch;
    ChooserWorkspace ws;
    for (int step = 0; step < kSteps; ++step) {
      std::vector<float> logits(static_cast<size_t>(kRows) * kVocab);
      for (float& x : logits) x = dist(rng);
      std::vector<ChooseTask> tasks;
      for (int i = 0; i < kRows; ++i) {
        tasks.push_back({&par[i], logits.data() + static_cast<size_t>(i) * kVocab, hist_par[i]});
      }
      std::vector<TokenChoice> got;
      ChooseRows(tasks, kVocab, threads, &scratch, &got);
      ASSERT_EQ(got.size(), static_cast<size_t>(kRows));
      for (int i = 0; i < kRows; ++i) {
        const TokenChoice want = ref[i].Choose(
            absl::MakeConstSpan(logits.data() + static_cast<size_t>(i) * kVocab, kVocab),
            hist_ref[i], &ws);
        EXPECT_TRUE(SameChoice(got[i], want))
            << "row " << i << " step " << step << ": id " << got[i].id << " vs " << want.id;
        hist_ref[i].push_back(want.id);
        hist_par[i].push_back(got[i].id);
      }
    }
  }
}

TEST(ChooseRowsTest, EmptyStepIsANoOp) {
  ChooseScratch scratch;
  std::vector<TokenChoice> got(3);
  ChooseRows({}, 10, 4, &scratch, &got);
  EXPECT_TRUE(got.empty());
}

}  // namespace
}  // namespace phishard
