#include "kernels/embedding.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using testing_util::Poisoned;
using testing_util::RandomVector;

// A gather is a copy: results must be bit-identical, so the tolerance is zero.
TEST(Embedding, GathersRowsExactly) {
  for (int dim : {1, 64, 80}) {
    const int vocab = 37;
    const std::vector<float> table = RandomVector(static_cast<size_t>(vocab) * dim, dim);
    const std::vector<int32_t> ids = {0, 36, 5, 5, 17};
    std::vector<float> out = Poisoned(ids.size() * dim);
    EmbeddingParams p{.ids = ids.data(),
                      .table = table.data(),
                      .out = out.data(),
                      .num_tokens = static_cast<int>(ids.size()),
                      .num_rows = vocab,
                      .dim = dim};
    ASSERT_EQ(EmbeddingCpu(p), KernelStatus::kOk);
    for (size_t t = 0; t < ids.size(); ++t) {
      for (int d = 0; d < dim; ++d) {
        ASSERT_EQ(out[t * dim + d], table[static_cast<size_t>(ids[t]) * dim + d]) << t << "," << d;
      }
    }
  }
}

// Vocab-parallel slice: rows [10, 20) live here; other ids give zero rows.
TEST(Embedding, SliceGivesZeroRowsOutsideItsRange) {
  const int dim = 8, rows = 10, offset = 10;
  const std::vector<float> table = RandomVector(static_cast<size_t>(rows) * dim, 3);
  const std::vector<int32_t> ids = {9, 10, 19, 20, 1000};
  std::vector<float> out = Poisoned(ids.size() * dim);
  EmbeddingParams p{.ids = ids.data(),
                    .table = table.data(),
                    .out = out.data(),
                    .num_tokens = 5,
                    .num_rows = rows,
                    .dim = dim,
                    .row_offset = offset};
  ASSERT_EQ(EmbeddingCpu(p), KernelStatus::kOk);
  for (size_t t = 0; t < ids.size(); ++t) {
    const bool local = ids[t] >= offset && ids[t] < offset + rows;
    for (int d = 0; d < dim; ++d) {
      const float want = local ? table[static_cast<size_t>(ids[t] - offset) * dim + d] : 0.0f;
      ASSERT_EQ(out[t * dim + d], want) << "token " << t << " dim " << d;
    }
  }
}

TEST(Embedding, NegativeIdIsAnErrorAndWritesNothing) {
  const std::vector<float> table = RandomVector(4 * 2, 5);
  const std::vector<int32_t> ids = {1, -1};
  std::vector<float> out = Poisoned(4);
  EmbeddingParams p{.ids = ids.data(),
                    .table = table.data(),
                    .out = out.data(),
                    .num_tokens = 2,
                    .num_rows = 4,
                    .dim = 2};
  EXPECT_EQ(EmbeddingCpu(p), KernelStatus::kOutOfRange);
  for (float v : out) EXPECT_TRUE(std::isnan(v));
  p.dtype = DataType::kF16;
  EXPECT_EQ(EmbeddingCpu(p), KernelStatus::kUnsupportedDtype);
  p.dtype = DataType::kF32;
  p.dim = 0;
  EXPECT_EQ(EmbeddingCpu(p), KernelStatus::kInvalidShape);
}

}  // namespace
}  // namespace phishard
