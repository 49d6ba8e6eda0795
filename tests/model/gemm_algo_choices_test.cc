// The recorded cuBLASLt algorithm choices' text form (PHISHARD_PREFILL_GEMM_ALGOS,
// phishard_bench --gemm-algo-sets; model/cuda_gemm_choices.h): host code, no GPU.
#include <cstdlib>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/cuda_gemm_choices.h"

namespace phishard {
namespace {

TEST(GemmAlgoChoicesText, ParsesEveryField) {
  absl::StatusOr<std::vector<GemmAlgoChoice>> c = ParseGemmAlgoChoices(
      " 1536-3072:7680:2560:0:0:1=66.24.35.1.0.0.0.3.0 ; "
      "1024-4096:10240:2560:0:1:1=66.23.36.1.0.1.2.5.4",
      DataType::kBF16, "test");
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->size(), 2u);
  const GemmAlgoChoice& a = (*c)[0];
  EXPECT_EQ(a.min_m, 1536);
  EXPECT_EQ(a.max_m, 3072);
  EXPECT_EQ(a.n, 7680);
  EXPECT_EQ(a.k, 2560);
  EXPECT_FALSE(a.accumulate);
  EXPECT_FALSE(a.gelu);
  EXPECT_TRUE(a.bias);
  EXPECT_EQ(a.dtype, DataType::kBF16);
  EXPECT_EQ(a.config.algo_id, 66);
  EXPECT_EQ(a.config.tile_id, 24);
  EXPECT_EQ(a.config.stages_id, 35);
  EXPECT_EQ(a.config.split_k, 1);
  EXPECT_EQ(a.config.cluster_id, 3);
  const GemmAlgoChoice& b = (*c)[1];
  EXPECT_TRUE(b.gelu);
  EXPECT_EQ(b.config.swizzle, 1);
  EXPECT_EQ(b.config.custom, 2);
  EXPECT_EQ(b.config.cluster_id, 5);
  EXPECT_EQ(b.config.inner_shape_id, 4);
}

TEST(GemmAlgoChoicesText, EmptyListIsNoChoice) {
  absl::StatusOr<std::vector<GemmAlgoChoice>> c = ParseGemmAlgoChoices(" ; ", DataType::kBF16, "t");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->empty());
}

TEST(GemmAlgoChoicesText, MalformedEntriesNameTheSourceAndEntry) {
  const char* bad[] = {
      "1536-3072:7680:2560:0:0:1",                       // no '='
      "1536:7680:2560:0:0:1=66.24.35.1.0.0.0.3.0",       // no range
      "3072-1536:7680:2560:0:0:1=66.24.35.1.0.0.0.3.0",  // empty range
      "1536-3072:7680:0:0:0:1=66.24.35.1.0.0.0.3.0",     // k = 0
      "1536-3072:7680:2560:2:0:1=66.24.35.1.0.0.0.3.0",  // ACC not 0/1
      "1536-3072:7680:2560:0:0:1=66.24.35.1.0.0.0.3",    // 8 values
      "1536-3072:7680:2560:0:0:1=66.24.x.1.0.0.0.3.0",   // not a number
      "1536-3072:7680:2560:0:0:1=66.24.-1.1.0.0.0.3.0",  // negative
  };
  for (const char* s : bad) {
    absl::StatusOr<std::vector<GemmAlgoChoice>> c = ParseGemmAlgoChoices(s, DataType::kBF16, "SRC");
    ASSERT_FALSE(c.ok()) << s;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(c.status().message()), ::testing::HasSubstr("SRC")) << s;
    EXPECT_THAT(std::string(c.status().message()), ::testing::HasSubstr(s)) << s;
  }
}

TEST(GemmAlgoChoicesEnv, UnsetOrZeroIsNoneAndBadTextIsAnError) {
  unsetenv("PHISHARD_PREFILL_GEMM_ALGOS");
  absl::StatusOr<std::vector<GemmAlgoChoice>> unset = GemmAlgoChoicesFromEnv(DataType::kBF16);
  ASSERT_TRUE(unset.ok());
  EXPECT_TRUE(unset->empty());
  setenv("PHISHARD_PREFILL_GEMM_ALGOS", "0", 1);
  absl::StatusOr<std::vector<GemmAlgoChoice>> none = GemmAlgoChoicesFromEnv(DataType::kBF16);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  setenv("PHISHARD_PREFILL_GEMM_ALGOS", "1536-3072:10240:2560:0:1:1=66.20.35.1.0.0.1.3.0", 1);
  absl::StatusOr<std::vector<GemmAlgoChoice>> one = GemmAlgoChoicesFromEnv(DataType::kF16);
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_EQ(one->size(), 1u);
  EXPECT_EQ((*one)[0].dtype, DataType::kF16);
  EXPECT_TRUE((*one)[0].gelu);
  setenv("PHISHARD_PREFILL_GEMM_ALGOS", "1536-3072:7680:2560:0:0:1=66", 1);
  absl::StatusOr<std::vector<GemmAlgoChoice>> bad = GemmAlgoChoicesFromEnv(DataType::kBF16);
  EXPECT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()),
              ::testing::HasSubstr("PHISHARD_PREFILL_GEMM_ALGOS"));
  unsetenv("PHISHARD_PREFILL_GEMM_ALGOS");
}

}  // namespace
}  // namespace phishard
