// PickTunedGemm (model/gemm_tune_rule.h): the decode GEMM tuning's rule for replacing the
// heuristic's pick by a finalist from its alternated timings.
#include "model/gemm_tune_rule.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace phishard {
namespace {

TEST(PickTunedGemm, KeepsTheHeuristicWithoutAClearGain) {
  EXPECT_EQ(PickTunedGemm({}, kGemmTuneMarginDefault), -1);
  // Faster on the median but not in every alternation: noise, not a gain.
  EXPECT_EQ(PickTunedGemm({{0.80, 0.82, 0.99}}, kGemmTuneMarginDefault), -1);
  // Faster every time, but by less than the margin (the default takes clear wins only).
  EXPECT_EQ(PickTunedGemm({{0.975, 0.98, 0.99}, {0.985, 0.98, 0.975}}, 0.03), -1);
  EXPECT_EQ(PickTunedGemm({{0.95, 0.96, 0.966}}, kGemmTuneMarginDefault), -1);
  // A finalist without timings (cuBLASLt refused it) or with a NaN never wins.
  EXPECT_EQ(PickTunedGemm({{}, {0.8, NAN, 0.8}}, kGemmTuneMarginDefault), -1);
}

TEST(PickTunedGemm, TakesTheFinalistWithTheLowestMedianAmongClearGains) {
  // fc2's non-split candidate at 256 rows (perf-log 2026-11-30 13:09) clears the default.
  EXPECT_EQ(PickTunedGemm({{0.852, 0.846, 0.86}}, kGemmTuneMarginDefault), 0);
  // Both clear the margin every time; the second has the lower median (0.90 vs 0.93).
  EXPECT_EQ(PickTunedGemm({{0.93, 0.92, 0.94}, {0.96, 0.90, 0.88}}, 0.03), 1);
  // The lower median belongs to one that once missed the margin: the other wins.
  EXPECT_EQ(PickTunedGemm({{0.95, 0.96, 0.95}, {0.80, 0.82, 0.99}}, 0.03), 0);
  // Exactly at the margin counts (a time of 0.97 of the first's passes a 3 % margin).
  EXPECT_EQ(PickTunedGemm({{0.97, 0.97, 0.97}}, 0.03), 0);
}

TEST(PickTunedGemm, NegativeMarginAcceptsSlowerFinalists) {
  EXPECT_EQ(PickTunedGemm({{1.20, 1.10, 1.15}, {1.05, 1.30, 1.04}}, -1.0),
            1);                                        // medians 1.15 / 1.05
  EXPECT_EQ(PickTunedGemm({{1.20, 2.10}}, -1.0), -1);  // beyond 2 ×
}

}  // namespace
}  // namespace phishard
