// The decode GEMM tuning's rule (model/gemm_tune_rule.h): which candidates become finalists from
// their first timings, and when a finalist's alternated timings replace the heuristic's pick.
#include "model/gemm_tune_rule.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace phishard {
namespace {

using Ints = std::vector<int>;

TEST(GemmTuneFinalists, ClearlyFasterCandidatesInTheHeuristicsOrder) {
  // Candidate 0 is the heuristic's pick (10 µs); 8 % faster means at most 9.2 µs (values kept
  // clear of that boundary, where the product's rounding would decide).
  const std::vector<double> t = {10.0, 9.5, 8.0, 9.1, 7.0, 11.0, -1.0, 9.0};
  EXPECT_EQ(GemmTuneFinalists(t, kGemmTuneMarginDefault), (Ints{2, 3, 4}));  // rank, not speed
  EXPECT_EQ(GemmTuneFinalists(t, kGemmTuneMarginDefault, 5), (Ints{2, 3, 4, 7}));
  EXPECT_EQ(GemmTuneFinalists(t, 0.25), (Ints{4}));
  // Refused candidates (<= 0) never; a refused first pick: nothing to compare with.
  EXPECT_TRUE(GemmTuneFinalists({-1.0, 1.0, 2.0}, kGemmTuneMarginDefault).empty());
  EXPECT_TRUE(GemmTuneFinalists({}, kGemmTuneMarginDefault).empty());
  EXPECT_TRUE(GemmTuneFinalists({10.0, NAN, 9.5}, kGemmTuneMarginDefault).empty());
  // A negative margin admits slower ones, up to 2x at -1 (the GPU test forces a choice so).
  EXPECT_EQ(GemmTuneFinalists({10.0, 15.0, 25.0, 12.0}, -1.0), (Ints{1, 3}));
}

TEST(GemmTuneWins, EveryAlternationByTheMargin) {
  EXPECT_FALSE(GemmTuneWins({}, kGemmTuneMarginDefault));
  // fc2's non-split candidate at 256 rows (perf-log 2026-11-30 13:09).
  EXPECT_TRUE(GemmTuneWins({0.852, 0.846, 0.86}, kGemmTuneMarginDefault));
  // Faster on the median but not in every alternation: noise, not a gain.
  EXPECT_FALSE(GemmTuneWins({0.80, 0.82, 0.99}, kGemmTuneMarginDefault));
  // Faster every time, but by less than the margin (dense at 256 rows: 0.966).
  EXPECT_FALSE(GemmTuneWins({0.95, 0.96, 0.966}, kGemmTuneMarginDefault));
  EXPECT_TRUE(GemmTuneWins({0.95, 0.96, 0.966}, 0.03));
  // Exactly at the margin counts (0.75 = 1 - 0.25 exactly in binary); a NaN never does.
  EXPECT_TRUE(GemmTuneWins({0.75, 0.75, 0.75}, 0.25));
  EXPECT_FALSE(GemmTuneWins({0.75, 0.7500001, 0.75}, 0.25));
  EXPECT_FALSE(GemmTuneWins({0.8, NAN, 0.8}, kGemmTuneMarginDefault));
  EXPECT_TRUE(GemmTuneWins({1.5, 1.9}, -1.0));
  EXPECT_FALSE(GemmTuneWins({1.5, 2.1}, -1.0));
}

}  // namespace
}  // namespace phishard
