// SplitPrefillRows against a naive per-row reference: every row of the step lands in exactly one
// range, in order; ranges are aligned, at least min_rows long, and as many as the rule in the
// header allows; near-even. Integers only: the comparisons are exact.
#include "model/tp_prefill_split.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

namespace phishard {
namespace {

void CheckSplit(int rows, int chunks, int min_rows) {
  SCOPED_TRACE(::testing::Message()
               << "rows " << rows << " chunks " << chunks << " min_rows " << min_rows);
  const std::vector<RowRange> got = SplitPrefillRows(rows, chunks, min_rows);
  const int want_n = std::max(1, std::min(chunks, rows / (min_rows + kPrefillChunkAlign)));
  ASSERT_EQ(static_cast<int>(got.size()), want_n);
  std::vector<int> owner(rows, -1);  // the naive reference: which range holds each row
  for (int c = 0; c < want_n; ++c) {
    for (int r = got[c].begin; r < got[c].begin + got[c].rows; ++r) {
      ASSERT_GE(r, 0);
      ASSERT_LT(r, rows);
      EXPECT_EQ(owner[r], -1) << "row " << r << " in two ranges";
      owner[r] = c;
    }
    if (want_n > 1) {
      EXPECT_GE(got[c].rows, min_rows) << "range " << c;
      // Even up to the alignment: within one alignment step of rows / n.
      EXPECT_LE(std::abs(got[c].rows - rows / want_n), kPrefillChunkAlign) << "range " << c;
    }
    if (c > 0) {
      EXPECT_EQ(got[c].begin % kPrefillChunkAlign, 0) << "range " << c;
    }
  }
  for (int r = 1; r < rows; ++r) EXPECT_LE(owner[r - 1], owner[r]) << "row " << r;
  EXPECT_EQ(std::count(owner.begin(), owner.end(), -1), 0);
}

TEST(SplitPrefillRows, OneLongPrefillSplitsEvenly) {
  const std::vector<RowRange> two = SplitPrefillRows(2048, 2, 512);
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[0].begin, 0);
  EXPECT_EQ(two[0].rows, 1024);
  EXPECT_EQ(two[1].begin, 1024);
  EXPECT_EQ(two[1].rows, 1024);
  EXPECT_EQ(SplitPrefillRows(2048, 4, 512).size(), 3u);  // 2048 / (512 + 16) = 3
  CheckSplit(2048, 2, 512);
  CheckSplit(2048, 3, 512);
  CheckSplit(16384, 8, 512);
}

TEST(SplitPrefillRows, ShortStepsStayWhole) {
  for (int rows : {1, 17, 1000, 1055}) {
    const std::vector<RowRange> got = SplitPrefillRows(rows, 2, 512);
    ASSERT_EQ(got.size(), 1u) << rows;
    EXPECT_EQ(got[0].begin, 0);
    EXPECT_EQ(got[0].rows, rows);
  }
  EXPECT_EQ(SplitPrefillRows(1056, 2, 512).size(), 2u);
  EXPECT_EQ(SplitPrefillRows(5000, 1, 1).size(), 1u);
}

TEST(SplitPrefillRows, RandomShapes) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 500; ++trial) {
    const int rows = 1 + static_cast<int>(rng() % 20000);
    const int chunks = 1 + static_cast<int>(rng() % kMaxPrefillChunks);
    const int min_rows = 1 + static_cast<int>(rng() % 1000);
    CheckSplit(rows, chunks, min_rows);
  }
}

TEST(TpPrefillChunksFromEnv, AcceptsCountsAndRefusesTheRestNamingTheVariable) {
  unsetenv("PHISHARD_TP_PREFILL_CHUNKS");
  EXPECT_EQ(*TpPrefillChunksFromEnv(2), 2);
  setenv("PHISHARD_TP_PREFILL_CHUNKS", "", 1);
  EXPECT_EQ(*TpPrefillChunksFromEnv(3), 3);
  setenv("PHISHARD_TP_PREFILL_CHUNKS", "1", 1);
  EXPECT_EQ(*TpPrefillChunksFromEnv(2), 1);
  setenv("PHISHARD_TP_PREFILL_CHUNKS", "8", 1);
  EXPECT_EQ(*TpPrefillChunksFromEnv(2), 8);
  for (const char* bad : {"0", "9", "-1", "two", "2x"}) {
    setenv("PHISHARD_TP_PREFILL_CHUNKS", bad, 1);
    absl::StatusOr<int> got = TpPrefillChunksFromEnv(2);
    ASSERT_FALSE(got.ok()) << bad;
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(got.status().message().find("PHISHARD_TP_PREFILL_CHUNKS"), std::string::npos);
  }
  unsetenv("PHISHARD_TP_PREFILL_CHUNKS");
}

// The Warmup all-gather's rows: [KV count high, KV count low, chunks, min rows] per rank.
TEST(CheckPrefillChunkingAgrees, EveryRankSeesTheSameVerdictAndTheFirstDifferingRank) {
  const std::vector<float> same = {0, 900, 2, 4096, 0, 850, 2, 4096, 0, 900, 2, 4096};
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_TRUE(CheckPrefillChunkingAgrees(same.data(), 4, 2, 3, rank).ok()) << rank;
  }
  // Rank 2 was started with another PHISHARD_TP_PREFILL_CHUNKS; then another min_rows.
  for (const std::vector<float>& odd :
       {std::vector<float>{0, 900, 2, 4096, 0, 900, 2, 4096, 0, 900, 1, 4096},
        std::vector<float>{0, 900, 2, 4096, 0, 900, 2, 4096, 0, 900, 2, 64}}) {
    for (int rank = 0; rank < 3; ++rank) {
      absl::Status st = CheckPrefillChunkingAgrees(odd.data(), 4, 2, 3, rank);
      ASSERT_FALSE(st.ok()) << rank;
      EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
      EXPECT_NE(st.message().find("PHISHARD_TP_PREFILL_CHUNKS"), std::string::npos);
      // Ranks 0 and 1 name rank 2; rank 2 names rank 0.
      const std::string other = rank == 2 ? "rank 0 has" : "rank 2 has";
      EXPECT_NE(st.message().find(other), std::string::npos) << st.message();
    }
  }
}

}  // namespace
}  // namespace phishard
