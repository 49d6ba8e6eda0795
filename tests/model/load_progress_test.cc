// LoadProgress: the startup lines "Weights loaded: X/Y GB (P%), DETAIL" are rate-limited and the
// last one is always written (docs/observability.md).
#include "model/load_progress.h"

#include <chrono>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace phishard {
namespace {

TEST(LoadProgress, WithoutAnIntervalEveryAddIsALineWithBytesAndPercent) {
  std::vector<std::string> lines;
  LoadProgress p(4'000'000'000ull, std::chrono::seconds(0),
                 [&](const std::string& l) { lines.push_back(l); });
  p.Add(1'000'000'000ull, "layer 1/4");
  p.Add(2'000'000'000ull);
  p.Add(1'000'000'000ull, "layer 4/4");
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0], "Weights loaded: 1.00/4.00 GB (25%), layer 1/4");
  EXPECT_EQ(lines[1], "Weights loaded: 3.00/4.00 GB (75%)");
  EXPECT_EQ(lines[2], "Weights loaded: 4.00/4.00 GB (100%), layer 4/4");
  EXPECT_EQ(p.done(), 4'000'000'000ull);
}

TEST(LoadProgress, ALongIntervalLeavesOnlyTheFinalLine) {
  std::vector<std::string> lines;
  LoadProgress p(300, std::chrono::hours(1), [&](const std::string& l) { lines.push_back(l); });
  for (int i = 0; i < 3; ++i) p.Add(100, "layer " + std::to_string(i + 1) + "/3");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0], "Weights loaded: 0.00/0.00 GB (100%), layer 3/3");
}

}  // namespace
}  // namespace phishard
