#include "model/lora_shard.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "model/lora_adapter.h"
#include "model/phi_config.h"
#include "model/phi_weights.h"
#include "tests/model/lora_test_util.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;

const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();

PhiConfig Config(const fs::path& dir) {
  absl::StatusOr<PhiConfig> c = LoadPhiConfig(dir);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : PhiConfig{};
}

// A random adapter on all seven targets, ranks 3..9 varying by target.
LoraAdapter RandomAdapter(const PhiConfig& c) {
  LoraAdapter a("random", c.num_hidden_layers);
  uint32_t seed = 7;
  for (LoraTarget t : kAllLoraTargets) {
    const auto [in, out] = LoraTargetDims(c, t);
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : c.num_hidden_layers); ++l) {
      LoraModule m;
      m.rank = 3 + static_cast<int>(t);
      m.scale = 0.5f + static_cast<float>(t);
      m.a = lora_test::RandomValues(m.rank * in, seed++, 1.0f);
      m.b = lora_test::RandomValues(out * m.rank, seed++, 1.0f);
      const absl::Status st = a.SetModule(c, l, t, std::move(m));
      EXPECT_TRUE(st.ok()) << st;
    }
  }
  return a;
}

// scale · B (A x) in double for one module over input x [in].
std::vector<double> Delta(const LoraModule& m, const double* x, int64_t in, int64_t out) {
  std::vector<double> ax(m.rank, 0.0), y(out, 0.0);
  for (int k = 0; k < m.rank; ++k) {
    for (int64_t i = 0; i < in; ++i) ax[k] += static_cast<double>(m.a[k * in + i]) * x[i];
  }
  for (int64_t j = 0; j < out; ++j) {
    for (int k = 0; k < m.rank; ++k)
      y[j] += m.scale * static_cast<double>(m.b[j * m.rank + k]) * ax[k];
  }
  return y;
}

// First global output row rank r holds of a column-parallel target (KV heads may be replicated).
int64_t FirstOutputRow(const PhiConfig& c, int world, int r, LoraTarget t) {
  absl::StatusOr<PhiShard> s = MakePhiShard(c, r, world);
  EXPECT_TRUE(s.ok()) << s.status();
  if (!s.ok()) return 0;
  switch (t) {
    case LoraTarget::kQProj:
      return int64_t{s->q_head_begin} * c.head_dim;
    case LoraTarget::kKProj:
    case LoraTarget::kVProj:
      return int64_t{s->kv_head_begin} * c.head_dim;
    case LoraTarget::kFc1:
      return s->intermediate_begin;
    default:
      return s->lm_head_begin;
  }
}

// The ranks' deltas, combined as the model combines them (column-parallel: concatenated outputs;
// row-parallel: sum of partial outputs over split inputs; replicated lm_head: each rank has all),
// equal the unsharded delta. Everything in double from the same float values, so only summation
// order differs: 1e-10 relative.
void ExpectShardsRecombine(const PhiConfig& c, int world) {
  SCOPED_TRACE("world " + std::to_string(world));
  const LoraAdapter full = RandomAdapter(c);
  absl::StatusOr<PhiConfig> local = LoraShardConfig(c, world);
  ASSERT_TRUE(local.ok()) << local.status();
  std::vector<LoraAdapter> shards;
  for (int r = 0; r < world; ++r) {
    absl::StatusOr<LoraAdapter> s = ShardLoraAdapter(full, c, r, world);
    ASSERT_TRUE(s.ok()) << s.status();
    shards.push_back(*std::move(s));
  }
  int64_t shard_params = 0;
  for (const LoraAdapter& s : shards) shard_params += s.num_params();
  EXPECT_GE(shard_params, full.num_params());  // replicated parts count once per rank

  for (LoraTarget t : kAllLoraTargets) {
    const auto [in, out] = LoraTargetDims(c, t);
    const auto [lin, lout] = LoraTargetDims(*local, t);
    const bool row_parallel = t == LoraTarget::kDense || t == LoraTarget::kFc2;
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : c.num_hidden_layers); ++l) {
      const std::string what = LoraModuleName(t, l);
      std::vector<double> x(in);
      for (int64_t i = 0; i < in; ++i) x[i] = std::sin(0.37 * i + l + static_cast<int>(t));
      const std::vector<double> want = Delta(full.module(l, t), x.data(), in, out);
      double mag = 1e-30;
      for (double v : want) mag = std::max(mag, std::fabs(v));
      std::vector<double> sum(out, 0.0);
      for (int r = 0; r < world; ++r) {
        const LoraModule& m = shards[r].module(l, t);
        ASSERT_EQ(m.rank, full.module(l, t).rank) << what;
        ASSERT_EQ(m.scale, full.module(l, t).scale) << what;
        if (row_parallel) {
          ASSERT_EQ(lout, out);
          const std::vector<double> part = Delta(m, x.data() + r * lin, lin, lout);
          for (int64_t j = 0; j < out; ++j) sum[j] += part[j];
        } else {
          const std::vector<double> part = Delta(m, x.data(), lin, lout);
          const int64_t r0 = FirstOutputRow(c, world, r, t);
          for (int64_t j = 0; j < lout; ++j) {
            ASSERT_NEAR(part[j], want[r0 + j], 1e-10 * mag)
                << what << " rank " << r << " row " << j;
          }
        }
      }
      if (row_parallel) {
        for (int64_t j = 0; j < out; ++j) ASSERT_NEAR(sum[j], want[j], 1e-10 * mag) << what;
      }
    }
  }
}

TEST(LoraShard, GqaVocabParallelHeadRecombines) {
  const PhiConfig c = Config(kRepo / "tests/golden/phi-gqa-hd80");  // nH 4, nKV 2, V 512
  // W = 4 replicates each of the 2 KV heads on two ranks: k/v B rows follow the rank's head.
  for (int w : {1, 2, 4}) ExpectShardsRecombine(c, w);
  absl::StatusOr<PhiConfig> local = LoraShardConfig(c, 2);
  ASSERT_TRUE(local.ok());
  EXPECT_EQ(local->vocab_size, 256) << "V % W == 0: lm_head B is split on vocab rows";
}

TEST(LoraShard, ReplicatedHeadWhenVocabDoesNotDivide) {
  const PhiConfig c = Config(fs::path(PHISHARD_MODELS) / "tiny-phi-code");  // V 4095
  for (int w : {2, 4, 8}) ExpectShardsRecombine(c, w);
  absl::StatusOr<PhiConfig> local = LoraShardConfig(c, 4);
  ASSERT_TRUE(local.ok());
  EXPECT_EQ(local->vocab_size, 4095);
}

TEST(LoraShard, RejectsWhatCannotBeSplit) {
  const PhiConfig c = Config(kRepo / "tests/golden/phi-gqa-hd80");
  const LoraAdapter full = RandomAdapter(c);
  EXPECT_EQ(LoraShardConfig(c, 0).status().code(), absl::StatusCode::kInvalidArgument);
  PhiConfig odd_kv = c;  // nKV 3 over 2 ranks: neither split nor replicated
  odd_kv.num_key_value_heads = 3;
  const absl::Status st = LoraShardConfig(odd_kv, 2).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(st.message()).find("num_key_value_heads"), std::string::npos) << st;
  EXPECT_EQ(ShardLoraAdapter(full, c, 2, 2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ShardLoraAdapter(full, c, -1, 2).status().code(), absl::StatusCode::kInvalidArgument);
  const LoraAdapter wrong_layers("x", c.num_hidden_layers + 1);
  EXPECT_EQ(ShardLoraAdapter(wrong_layers, c, 0, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace phishard
