// bench/lora_pairs.h, the statistics and the step order of phishard_bench --lora-prefill-pairs
// (host only): quantiles against a naive definition, and the order in which the steps run and
// are paired (each LoRA step against the base step right before it; tunings reversed every other
// round; warm-up pairs not counted). Exact comparisons: the step times here are small integers
// and every statistic is one interpolation between two of them.
#include "bench/lora_pairs.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace phishard::bench {
namespace {

TEST(LoraPrefillPairs, SpreadIsTheInterpolatedOrderStatistics) {
  // Sorted: 1 2 3 4 10 -> median at position 2, quartiles at 1 and 3.
  const Spread s = SpreadOf({4, 1, 10, 3, 2});
  EXPECT_EQ(s.median, 3);
  EXPECT_EQ(s.q1, 2);
  EXPECT_EQ(s.q3, 4);
  EXPECT_EQ(s.min, 1);
  EXPECT_EQ(s.max, 10);
  // Even count: 1 2 3 4 -> median at 1.5 (2.5), q1 at 0.75 (1.75), q3 at 2.25 (3.25).
  const Spread e = SpreadOf({4, 3, 2, 1});
  EXPECT_DOUBLE_EQ(e.median, 2.5);
  EXPECT_DOUBLE_EQ(e.q1, 1.75);
  EXPECT_DOUBLE_EQ(e.q3, 3.25);
  const Spread none = SpreadOf({});
  EXPECT_EQ(none.median, 0);
}

TEST(LoraPrefillPairs, EachLoraStepIsPairedWithTheBaseStepBeforeIt) {
  // The "clock": step k (counting every step) takes 100 + k ms base or 200 + k ms LoRA, so a pair
  // (base k, LoRA k + 1) is recognisable from its times, and the tuning set before each step is
  // recorded.
  std::vector<std::string> order;
  std::string current;
  int k = 0;
  const std::vector<PairResult> r = RunLoraPrefillPairs(
      {"A", "B"}, 3, 1, 1, [&](const std::string& t) { current = t; },
      [&](bool lora, double* host, double* dev) {
        order.push_back(std::string(lora ? "L" : "b") + current);
        *host = (lora ? 200 : 100) + k;
        *dev = *host / 2;
        ++k;
      });
  // Round 0 (warm-up) A then B, round 1 B then A, round 2 A B, round 3 B A.
  const std::vector<std::string> want = {"bA", "LA", "bB", "LB", "bB", "LB", "bA", "LA",
                                         "bA", "LA", "bB", "LB", "bB", "LB", "bA", "LA"};
  EXPECT_EQ(order, want);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].tuning, "A");
  EXPECT_EQ(r[0].warmup, 1);
  // Tuning A's timed pairs: steps (6, 7), (8, 9), (14, 15).
  EXPECT_EQ(r[0].host.base_ms, (std::vector<double>{106, 108, 114}));
  EXPECT_EQ(r[0].host.lora_ms, (std::vector<double>{207, 209, 215}));
  EXPECT_EQ(r[0].device.lora_ms, (std::vector<double>{103.5, 104.5, 107.5}));
  // Tuning B's: (4, 5), (10, 11), (12, 13).
  EXPECT_EQ(r[1].host.base_ms, (std::vector<double>{104, 110, 112}));
  EXPECT_EQ(r[1].host.lora_ms, (std::vector<double>{205, 211, 213}));
  // Per-pair % of base and the ratio of the medians (A: 108 / 209).
  const std::vector<double> pct = r[0].host.pct();
  ASSERT_EQ(pct.size(), 3u);
  EXPECT_DOUBLE_EQ(pct[0], 100.0 * 106 / 207);
  EXPECT_DOUBLE_EQ(r[0].host.ratio_of_medians(), 100.0 * 108 / 209);
  const nlohmann::json j = PairsJson("8x512", r[0]);
  EXPECT_EQ(j.at("pairs"), 3);
  EXPECT_DOUBLE_EQ(j.at("host").at("pct_median").get<double>(), 100.0 * 108 / 209);
}

TEST(LoraPrefillPairs, RepeatRunsBothKindsRTimesAndTimesTheLast) {
  std::string order;
  int k = 0;
  const std::vector<PairResult> r = RunLoraPrefillPairs(
      {""}, 2, 0, 2, [](const std::string&) {},
      [&](bool lora, double* host, double* dev) {
        order += lora ? 'L' : 'b';
        *host = *dev = k++;
      });
  EXPECT_EQ(order, "bbLLbbLL");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].repeat, 2);
  EXPECT_EQ(r[0].host.base_ms, (std::vector<double>{1, 5}));
  EXPECT_EQ(r[0].host.lora_ms, (std::vector<double>{3, 7}));
}

}  // namespace
}  // namespace phishard::bench
