#include "kernels/paged_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using testing_util::CacheIndex;
using testing_util::kNaN;
using testing_util::Poisoned;
using testing_util::RandomVector;

struct Heads {
  int num_heads, num_kv_heads, head_dim;
};

struct Seq {
  int q_len, context_len;
};

// A varlen batch over a shuffled block pool. Cache slots that no sequence covers are NaN, as are
// the q padding columns: reading either would turn the output into NaN.
struct Batch {
  int block_size = 16, num_blocks = 0, max_blocks = 0, q_stride = 0, num_tokens = 0;
  std::vector<int32_t> cu_q_lens, context_lens, block_tables;
  std::vector<float> q, k_cache, v_cache;
};

Batch MakeBatch(const Heads& h, const std::vector<Seq>& seqs, uint32_t seed) {
  Batch b;
  const int kv_row = h.num_kv_heads * h.head_dim;
  b.q_stride = (h.num_heads + 2 * h.num_kv_heads) * h.head_dim;  // the fused qkv layout
  b.cu_q_lens = {0};
  int total_blocks = 0;
  for (const Seq& s : seqs) {
    b.cu_q_lens.push_back(b.cu_q_lens.back() + s.q_len);
    b.context_lens.push_back(s.context_len);
    const int blocks = (s.context_len + b.block_size - 1) / b.block_size;
    b.max_blocks = std::max(b.max_blocks, blocks + 1);  // one spare column, left invalid (-7)
    total_blocks += blocks;
  }
  b.num_tokens = b.cu_q_lens.back();
  b.num_blocks = total_blocks + 3;  // a few blocks nobody owns
  std::vector<int32_t> pool(b.num_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(pool.begin(), pool.end(), rng);
  b.block_tables.assign(seqs.size() * b.max_blocks, -7);
  b.k_cache = Poisoned(static_cast<size_t>(b.num_blocks) * b.block_size * kv_row);
  b.v_cache = Poisoned(b.k_cache.size());
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  size_t next = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const int blocks = (seqs[s].context_len + b.block_size - 1) / b.block_size;
    for (int i = 0; i < blocks; ++i) b.block_tables[s * b.max_blocks + i] = pool[next++];
    for (int c = 0; c < seqs[s].context_len; ++c) {  // fill exactly the slots of [0, ctx)
      const size_t slot =
          static_cast<size_t>(b.block_tables[s * b.max_blocks + c / b.block_size]) * b.block_size +
          c % b.block_size;
      for (int kvh = 0; kvh < h.num_kv_heads; ++kvh) {
        for (int d = 0; d < h.head_dim; ++d) {
          const size_t i = CacheIndex(slot, kvh, d, b.block_size, h.num_kv_heads, h.head_dim);
          b.k_cache[i] = dist(rng);
          b.v_cache[i] = dist(rng);
        }
      }
    }
  }
  b.q = Poisoned(static_cast<size_t>(b.num_tokens) * b.q_stride);
  for (int t = 0; t < b.num_tokens; ++t) {
    for (int i = 0; i < h.num_heads * h.head_dim; ++i) b.q[t * b.q_stride + i] = 2.0f * dist(rng);
  }
  return b;
}

PagedAttentionParams MakeParams(const Heads& h, Batch& b, std::vector<float>& out) {
  return PagedAttentionParams{.q = b.q.data(),
                              .k_cache = b.k_cache.data(),
                              .v_cache = b.v_cache.data(),
                              .out = out.data(),
                              .cu_q_lens = b.cu_q_lens.data(),
                              .context_lens = b.context_lens.data(),
                              .block_tables = b.block_tables.data(),
                              .num_seqs = static_cast<int>(b.context_lens.size()),
                              .num_tokens = b.num_tokens,
                              .max_blocks_per_seq = b.max_blocks,
                              .num_blocks = b.num_blocks,
                              .block_size = b.block_size,
                              .num_heads = h.num_heads,
                              .num_kv_heads = h.num_kv_heads,
                              .head_dim = h.head_dim,
                              .q_stride = b.q_stride,
                              .scale = 1.0f / std::sqrt(static_cast<float>(h.head_dim))};
}

// Naive attention in double: positions, slots and GQA mapping recomputed from the definitions.
std::vector<double> NaiveAttention(const Heads& h, const Batch& b) {
  const int hd = h.head_dim;
  std::vector<double> out(static_cast<size_t>(b.num_tokens) * h.num_heads * hd);
  for (size_t s = 0; s + 1 < b.cu_q_lens.size(); ++s) {
    const int q_len = b.cu_q_lens[s + 1] - b.cu_q_lens[s];
    for (int j = 0; j < q_len; ++j) {
      const int t = b.cu_q_lens[s] + j;
      const int pos = b.context_lens[s] - q_len + j;
      for (int head = 0; head < h.num_heads; ++head) {
        const int kvh = head / (h.num_heads / h.num_kv_heads);
        std::vector<double> score(pos + 1);
        for (int c = 0; c <= pos; ++c) {
          const size_t slot =
              static_cast<size_t>(b.block_tables[s * b.max_blocks + c / b.block_size]) *
                  b.block_size +
              c % b.block_size;
          double dot = 0.0;
          for (int d = 0; d < hd; ++d) {
            dot += static_cast<double>(b.q[t * b.q_stride + head * hd + d]) *
                   b.k_cache[CacheIndex(slot, kvh, d, b.block_size, h.num_kv_heads, hd)];
          }
          score[c] = dot / std::sqrt(static_cast<double>(hd));
        }
        const double m = *std::max_element(score.begin(), score.end());
        double z = 0.0;
        for (double& x : score) z += (x = std::exp(x - m));
        for (int c = 0; c <= pos; ++c) {
          const size_t slot =
              static_cast<size_t>(b.block_tables[s * b.max_blocks + c / b.block_size]) *
                  b.block_size +
              c % b.block_size;
          for (int d = 0; d < hd; ++d) {
            out[(static_cast<size_t>(t) * h.num_heads + head) * hd + d] +=
                score[c] / z *
                b.v_cache[CacheIndex(slot, kvh, d, b.block_size, h.num_kv_heads, hd)];
          }
        }
      }
    }
  }
  return out;
}

class PagedAttentionTest : public ::testing::TestWithParam<Heads> {};

// Tolerance 2e-5 absolute: q.k sums <= 80 float products of |q| <= 2, |k| <= 1 (error <= 80 u * 160
// ~ 1e-5 before the 1/sqrt(hd) scale, ~1e-6 after), softmax weights then err by ~that relative,
// and the weighted sum of <= 40 values |v| <= 1 adds <= 40 u. Outputs are O(1), so 2e-5 is ~10x
// the worst accumulated float32 error, while a wrong mask, position, block or head mapping moves
// outputs by O(0.1).
TEST_P(PagedAttentionTest, VarlenBatchMatchesNaiveReference) {
  const Heads h = GetParam();
  // One token, odd lengths, block boundaries 15/16/17, prefill after a cached prefix, decode.
  const std::vector<std::vector<Seq>> batches = {
      {{1, 1}},
      {{1, 15}, {1, 16}, {1, 17}, {1, 33}},            // decode steps
      {{15, 15}, {16, 16}, {17, 17}, {5, 5}},          // prefills
      {{3, 20}, {1, 1}, {17, 40}, {16, 32}, {2, 17}},  // mixed, with cached prefixes
  };
  for (size_t i = 0; i < batches.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "batch " << i);
    Batch b = MakeBatch(h, batches[i], 100 + i);
    std::vector<float> out = Poisoned(static_cast<size_t>(b.num_tokens) * h.num_heads * h.head_dim);
    ASSERT_EQ(PagedAttentionCpu(MakeParams(h, b, out)), KernelStatus::kOk);
    const std::vector<double> ref = NaiveAttention(h, b);
    for (size_t k = 0; k < out.size(); ++k) ASSERT_NEAR(out[k], ref[k], 2e-5) << "element " << k;
  }
}

INSTANTIATE_TEST_SUITE_P(HeadLayouts, PagedAttentionTest,
                         ::testing::Values(Heads{4, 4, 64}, Heads{4, 4, 80}, Heads{8, 2, 80},
                                           Heads{8, 2, 64}, Heads{3, 1, 80}, Heads{8, 8, 32}));

// Prefill of n tokens at once equals n single-token steps over the same cache: the one-code-path
// property the model relies on. Results must be identical bits (same loop, same order).
TEST(PagedAttention, PrefillRowsEqualDecodeSteps) {
  const Heads h{4, 2, 64};
  Batch b = MakeBatch(h, {{17, 17}}, 7);
  std::vector<float> prefill(static_cast<size_t>(17) * h.num_heads * h.head_dim);
  ASSERT_EQ(PagedAttentionCpu(MakeParams(h, b, prefill)), KernelStatus::kOk);
  for (int j = 0; j < 17; ++j) {
    std::vector<int32_t> cu = {0, 1}, ctx = {j + 1};
    std::vector<float> one(h.num_heads * h.head_dim, kNaN);
    PagedAttentionParams p = MakeParams(h, b, one);
    p.q = b.q.data() + static_cast<size_t>(j) * b.q_stride;
    p.cu_q_lens = cu.data();
    p.context_lens = ctx.data();
    p.num_tokens = 1;
    ASSERT_EQ(PagedAttentionCpu(p), KernelStatus::kOk);
    for (size_t k = 0; k < one.size(); ++k) {
      ASSERT_EQ(one[k], prefill[j * one.size() + k]) << "token " << j;
    }
  }
}

TEST(PagedAttention, BadTablesAreErrorsAndWriteNothing) {
  const Heads h{4, 2, 64};
  Batch b = MakeBatch(h, {{2, 20}, {1, 5}}, 9);
  std::vector<float> out = Poisoned(static_cast<size_t>(3) * h.num_heads * h.head_dim);
  auto all_nan = [&] {
    return std::all_of(out.begin(), out.end(), [](float v) { return std::isnan(v); });
  };
  PagedAttentionParams p = MakeParams(h, b, out);
  const int32_t good_block = b.block_tables[1];
  b.block_tables[1] = b.num_blocks;  // second block of seq 0: out of range
  EXPECT_EQ(PagedAttentionCpu(p), KernelStatus::kOutOfRange);
  b.block_tables[1] = -1;
  EXPECT_EQ(PagedAttentionCpu(p), KernelStatus::kOutOfRange);
  b.block_tables[1] = good_block;
  b.context_lens[1] = 16 * b.max_blocks + 1;  // table too short for the context
  EXPECT_EQ(PagedAttentionCpu(p), KernelStatus::kInvalidShape);
  b.context_lens[1] = 0;  // fewer cached tokens than new ones
  EXPECT_EQ(PagedAttentionCpu(p), KernelStatus::kInvalidShape);
  b.context_lens[1] = 5;
  b.cu_q_lens[2] = 4;  // disagrees with num_tokens
  EXPECT_EQ(PagedAttentionCpu(p), KernelStatus::kInvalidShape);
  b.cu_q_lens[2] = 3;
  p.num_kv_heads = 3;  // does not divide num_heads
  EXPECT_EQ(PagedAttentionCpu(p), KernelStatus::kInvalidShape);
  p.num_kv_heads = 2;
  p.dtype = DataType::kF16;
  EXPECT_EQ(PagedAttentionCpu(p), KernelStatus::kUnsupportedDtype);
  EXPECT_TRUE(all_nan());
  p.dtype = DataType::kF32;
  EXPECT_EQ(PagedAttentionCpu(p), KernelStatus::kOk);
  EXPECT_FALSE(std::any_of(out.begin(), out.end(), [](float v) { return std::isnan(v); }));
}

}  // namespace
}  // namespace phishard
