#include "model/cpu_phi_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "model/kv_cache.h"
#include "model/model_factory.h"
#include "nlohmann/json.hpp"

namespace phishard {
namespace {

namespace fs = std::filesystem;

const fs::path kTinyModel = fs::path(PHISHARD_MODELS) / "tiny-phi-code";

std::vector<int32_t> RandomIds(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = dist(rng);
  return ids;
}

// A batch of one sequence feeding ids[begin, end) after `begin` cached tokens.
ForwardBatch OneSeq(const std::vector<int32_t>& ids, int begin, int end,
                    const std::vector<int32_t>& blocks, bool all_rows) {
  ForwardBatch b;
  b.token_ids.assign(ids.begin() + begin, ids.begin() + end);
  b.positions.resize(end - begin);
  std::iota(b.positions.begin(), b.positions.end(), begin);
  b.seqs.push_back({.num_new_tokens = end - begin, .context_len = end, .block_table = blocks});
  if (all_rows) {
    b.logit_rows.resize(end - begin);
    std::iota(b.logit_rows.begin(), b.logit_rows.end(), 0);
  } else {
    b.logit_rows = {end - begin - 1};
  }
  return b;
}

ModelLoadOptions Options(const fs::path& dir, const std::string& device,
                         const std::string& dtype = "", int rank = 0, int world_size = 1) {
  ModelLoadOptions o;
  o.model_dir = dir;
  o.device = device;
  o.dtype = dtype;
  o.rank = rank;
  o.world_size = world_size;
  return o;
}

double MaxAbs(const std::vector<float>& v) {
  double m = 0.0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

// Both sides compute the same float32 math; only the summation order inside OpenBLAS differs
// between GEMM shapes (M = 1 vs M = 40 pick different kernels and blockings). That reorders
// float32 sums over K <= 1024 terms, ~1e-6 relative per layer; through 4 layers and a 4095-way
// head the logits (|logit| up to ~15) agree to ~1e-5. 1e-4 x max(1, max|logit|) is the same
// bar the golden tests hold us to against Hugging Face, and far below any real bug (a wrong
// position or slot changes logits by O(1)).
void ExpectLogitsNear(const std::vector<float>& got, const std::vector<float>& want,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const double tol = 1e-4 * std::max(1.0, MaxAbs(want));
  double worst = 0.0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << ": non-finite logit at " << i;
    const double d = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (d > worst) worst = d, at = i;
  }
  EXPECT_LE(worst, tol) << what << ": worst |diff| " << worst << " at " << at;
}

class TinyPhiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<CpuPhiModel>> m = CpuPhiModel::Load(kTinyModel);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(model_, nullptr);
    ASSERT_TRUE(model_->AllocateKvCache(64, kKvBlockSize).ok());
  }
  int V() const { return model_->config().vocab_size; }
  static CpuPhiModel* model_;
};
CpuPhiModel* TinyPhiTest::model_ = nullptr;

TEST_F(TinyPhiTest, DescribesItself) {
  EXPECT_EQ(model_->device_type(), "cpu");
  EXPECT_EQ(model_->dtype_name(), "torch.float32");
  EXPECT_EQ(model_->config().vocab_size, 4095);
  EXPECT_EQ(model_->kv_num_blocks(), 64);
  EXPECT_TRUE(model_->Ping().ok());
}

// Prefill of the whole prompt at once, token-by-token decode, and a chunked prefill (17 tokens,
// then 15 after the cached prefix, then single steps) all give the same logits at every position.
TEST_F(TinyPhiTest, PrefillEqualsTokenByTokenDecode) {
  const int n = 40;  // crosses the block boundaries at 16 and 32
  const std::vector<int32_t> ids = RandomIds(n, V(), 1);
  const std::vector<int32_t> blocks_a = {5, 2, 9}, blocks_b = {0, 63, 17}, blocks_c = {30, 31, 1};

  std::vector<float> prefill;
  ASSERT_TRUE(model_->Forward(OneSeq(ids, 0, n, blocks_a, true), &prefill).ok());
  ASSERT_EQ(prefill.size(), static_cast<size_t>(n) * V());

  for (int t = 0; t < n; ++t) {
    std::vector<float> step;
    absl::Status st = model_->Forward(OneSeq(ids, t, t + 1, blocks_b, true), &step);
    ASSERT_TRUE(st.ok()) << st;
    const std::vector<float> want(prefill.begin() + static_cast<size_t>(t) * V(),
                                  prefill.begin() + static_cast<size_t>(t + 1) * V());
    ExpectLogitsNear(step, want, "decode step " + std::to_string(t));
  }

  std::vector<float> chunk;
  int begin = 0;
  for (int end : {17, 32, 33, 40}) {
    ASSERT_TRUE(model_->Forward(OneSeq(ids, begin, end, blocks_c, true), &chunk).ok());
    const std::vector<float> want(prefill.begin() + static_cast<size_t>(begin) * V(),
                                  prefill.begin() + static_cast<size_t>(end) * V());
    ExpectLogitsNear(chunk, want,
                     "chunk [" + std::to_string(begin) + ", " + std::to_string(end) + ")");
    begin = end;
  }
}

// A prefill batch of three sequences of different lengths equals each run alone, and so does the
// following decode step of all three together.
TEST_F(TinyPhiTest, BatchOfThreeEqualsEachAlone) {
  const std::vector<int> lens = {1, 17, 40};
  const std::vector<std::vector<int32_t>> tables = {{3}, {10, 11}, {20, 4, 22}};
  std::vector<std::vector<int32_t>> ids;
  for (size_t i = 0; i < lens.size(); ++i) ids.push_back(RandomIds(lens[i] + 1, V(), 10 + i));

  // Alone: prefill (last row) then one decode step, each sequence on its own.
  std::vector<std::vector<float>> alone_prefill, alone_decode;
  for (size_t i = 0; i < lens.size(); ++i) {
    std::vector<float> out;
    ASSERT_TRUE(model_->Forward(OneSeq(ids[i], 0, lens[i], tables[i], false), &out).ok());
    alone_prefill.push_back(out);
    ASSERT_TRUE(model_->Forward(OneSeq(ids[i], lens[i], lens[i] + 1, tables[i], false), &out).ok());
    alone_decode.push_back(out);
  }

  // Together, in fresh blocks of the same cache.
  const std::vector<std::vector<int32_t>> tables2 = {{40}, {41, 50}, {51, 60, 61}};
  ForwardBatch prefill, decode;
  int row = 0;
  for (size_t i = 0; i < lens.size(); ++i) {
    ForwardBatch one = OneSeq(ids[i], 0, lens[i], tables2[i], false);
    prefill.token_ids.insert(prefill.token_ids.end(), one.token_ids.begin(), one.token_ids.end());
    prefill.positions.insert(prefill.positions.end(), one.positions.begin(), one.positions.end());
    prefill.seqs.push_back(one.seqs[0]);
    row += lens[i];
    prefill.logit_rows.push_back(row - 1);
    ForwardBatch step = OneSeq(ids[i], lens[i], lens[i] + 1, tables2[i], false);
    decode.token_ids.push_back(step.token_ids[0]);
    decode.positions.push_back(step.positions[0]);
    decode.seqs.push_back(step.seqs[0]);
    decode.logit_rows.push_back(static_cast<int32_t>(i));
  }
  std::vector<float> together;
  ASSERT_TRUE(model_->Forward(prefill, &together).ok());
  ASSERT_EQ(together.size(), lens.size() * V());
  for (size_t i = 0; i < lens.size(); ++i) {
    ExpectLogitsNear(
        std::vector<float>(together.begin() + i * V(), together.begin() + (i + 1) * V()),
        alone_prefill[i], "prefill of sequence " + std::to_string(i));
  }
  ASSERT_TRUE(model_->Forward(decode, &together).ok());
  for (size_t i = 0; i < lens.size(); ++i) {
    ExpectLogitsNear(
        std::vector<float>(together.begin() + i * V(), together.begin() + (i + 1) * V()),
        alone_decode[i], "decode of sequence " + std::to_string(i));
  }
}

// The same step twice gives the same bits; logit_rows selects rows in the order given.
TEST_F(TinyPhiTest, DeterministicAndRowSelection) {
  const std::vector<int32_t> ids = RandomIds(9, V(), 3);
  ForwardBatch all = OneSeq(ids, 0, 9, {7}, true);
  std::vector<float> a, b, picked;
  ASSERT_TRUE(model_->Forward(all, &a).ok());
  ASSERT_TRUE(model_->Forward(all, &b).ok());
  EXPECT_EQ(a, b);
  ForwardBatch some = all;
  some.logit_rows = {2, 8};
  ASSERT_TRUE(model_->Forward(some, &picked).ok());
  ASSERT_EQ(picked.size(), 2u * V());
  for (int r = 0; r < 2; ++r) {
    const int src = some.logit_rows[r];
    for (int v = 0; v < V(); ++v) ASSERT_EQ(picked[r * V() + v], a[src * V() + v]);
  }
  some.logit_rows.clear();  // no logits wanted: still writes the cache, returns nothing
  ASSERT_TRUE(model_->Forward(some, &picked).ok());
  EXPECT_TRUE(picked.empty());
}

TEST_F(TinyPhiTest, InvalidInputsAreInvalidArgument) {
  const std::vector<int32_t> ids = RandomIds(5, V(), 4);
  const ForwardBatch good = OneSeq(ids, 0, 5, {1}, true);
  std::vector<float> out;
  ASSERT_TRUE(model_->Forward(good, &out).ok());

  auto expect_invalid = [&](ForwardBatch b, const std::string& needle) {
    std::vector<float> logits;
    absl::Status st = model_->Forward(b, &logits);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << needle << ": " << st;
    EXPECT_NE(st.message().find(needle), std::string::npos) << st;
  };
  ForwardBatch b = good;
  b.token_ids[2] = V();
  expect_invalid(b, "token_ids[2]");
  b = good;
  b.token_ids[0] = -1;
  expect_invalid(b, "token_ids[0]");
  b = good;
  b.seqs[0].block_table = {64};
  expect_invalid(b, "block_table[0]");
  b = good;
  b.seqs[0].block_table = {-3};
  expect_invalid(b, "block_table[0]");
  b = OneSeq(RandomIds(17, V(), 5), 0, 17, {1}, true);  // 17 tokens need 2 blocks
  expect_invalid(b, "block_table has 1 blocks");
  b = good;
  b.seqs[0].num_new_tokens = 4;  // sum 4 != 5 tokens
  expect_invalid(b, "num_new_tokens");
  b = good;
  b.seqs[0].num_new_tokens = 6;
  expect_invalid(b, "num_new_tokens");
  b = good;
  b.seqs[0].num_new_tokens = 0;
  expect_invalid(b, "num_new_tokens");
  b = good;
  b.seqs[0].context_len = 4;  // fewer than the new tokens
  expect_invalid(b, "context_len");
  b = good;
  b.seqs[0].context_len = 64 * 16 + 1;
  expect_invalid(b, "context_len");
  b = good;
  b.positions[3] = 7;
  expect_invalid(b, "positions[3]");
  b = good;
  b.positions.pop_back();
  expect_invalid(b, "positions has 4 entries");
  b = good;
  b.logit_rows = {5};
  expect_invalid(b, "logit_rows[0]");
  b = good;
  b.token_ids.clear();
  b.positions.clear();
  expect_invalid(b, "no tokens");
  b = good;
  b.seqs.push_back(b.seqs[0]);  // a second sequence with no tokens left for it
  expect_invalid(b, "seqs[1].num_new_tokens");
}

TEST(CpuPhiModel, KvCacheSizingAndPreconditions) {
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> m = CpuPhiModel::Load(kTinyModel);
  ASSERT_TRUE(m.ok()) << m.status();
  CpuPhiModel& model = **m;
  std::vector<float> logits;
  absl::Status st = model.Forward(OneSeq({1, 2}, 0, 2, {0}, true), &logits);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;

  // tiny-phi-code: 4 layers x 8 KV heads x 32 x K,V x 4 bytes = 8 KiB per token.
  EXPECT_EQ(model.KvBytesPerToken(), 2 * 4 * 8 * 32 * 4);
  absl::StatusOr<int> blocks = model.MaxKvBlocks(0.5, 4096);
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  EXPECT_GE(*blocks, 1);
  EXPECT_LE(static_cast<int64_t>(*blocks) * kKvBlockSize * model.KvBytesPerToken(),
            CpuPhiModel::kMaxKvCacheBytes);
  absl::StatusOr<int> smaller = model.MaxKvBlocks(0.001, 16);
  ASSERT_TRUE(smaller.ok()) << smaller.status();
  EXPECT_LE(*smaller, *blocks);
  // Workspace for 2^30 tokens (~27 KiB each) exceeds any host: nothing left for the cache.
  EXPECT_EQ(model.MaxKvBlocks(1.0, 1 << 30).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(model.MaxKvBlocks(0.0, 16).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model.MaxKvBlocks(1.5, 16).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model.MaxKvBlocks(0.5, -1).status().code(), absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(model.AllocateKvCache(0, 16).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model.AllocateKvCache(16, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model.AllocateKvCache(1 << 30, 16).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(model.AllocateKvCache(*smaller, kKvBlockSize).ok());
  EXPECT_EQ(model.kv_num_blocks(), *smaller);
  // A non-default block size works end to end.
  ASSERT_TRUE(model.AllocateKvCache(8, 4).ok());
  EXPECT_TRUE(model.Forward(OneSeq(RandomIds(9, 4095, 6), 0, 9, {7, 0, 3}, true), &logits).ok());
  EXPECT_EQ(logits.size(), 9u * 4095);
}

// --- A synthetic model written to a temp dir: weight-loading edge cases. ---

// Writes an F32 safetensors file.
void WriteSafetensors(
    const fs::path& path,
    const std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const size_t bytes = t.second.size() * sizeof(float);
    header[name] = {
        {"dtype", "F32"}, {"shape", t.first}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  const std::string h = header.dump();
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = h.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(h.data(), h.size());
  for (const auto& [name, t] : tensors) {
    out.write(reinterpret_cast<const char*>(t.second.data()), t.second.size() * sizeof(float));
  }
}

class SyntheticModelTest : public ::testing::Test {
 protected:
  using Tensors = std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>;
  static constexpr int H = 16, nH = 2, nKV = 1, I = 24, V = 11, hd = 8;

  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("phishard_synthetic_" +
            std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    uint32_t seed = 1;
    auto add = [&](const std::string& name, std::vector<int64_t> shape, float scale = 0.3f) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      std::mt19937 rng(seed++);
      std::uniform_real_distribution<float> dist(-scale, scale);
      std::vector<float> v(n);
      for (float& x : v) x = dist(rng);
      tensors_[name] = {shape, v};
    };
    add("model.embed_tokens.weight", {V, H}, 1.0f);
    const std::string p = "model.layers.0.";
    add(p + "input_layernorm.weight", {H});
    add(p + "input_layernorm.bias", {H});
    add(p + "self_attn.q_proj.weight", {nH * hd, H});
    add(p + "self_attn.q_proj.bias", {nH * hd});
    add(p + "self_attn.k_proj.weight", {nKV * hd, H});
    add(p + "self_attn.k_proj.bias", {nKV * hd});
    add(p + "self_attn.v_proj.weight", {nKV * hd, H});
    add(p + "self_attn.v_proj.bias", {nKV * hd});
    add(p + "self_attn.dense.weight", {H, nH * hd});
    add(p + "self_attn.dense.bias", {H});
    add(p + "mlp.fc1.weight", {I, H});
    add(p + "mlp.fc1.bias", {I});
    add(p + "mlp.fc2.weight", {H, I});
    add(p + "mlp.fc2.bias", {H});
    add("model.final_layernorm.weight", {H});
    add("model.final_layernorm.bias", {H});
  }
  void TearDown() override { fs::remove_all(dir_); }

  void Write(bool tie) {
    nlohmann::json config = {{"model_type", "phi"},
                             {"hidden_size", H},
                             {"num_attention_heads", nH},
                             {"num_key_value_heads", nKV},
                             {"num_hidden_layers", 1},
                             {"intermediate_size", I},
                             {"vocab_size", V},
                             {"partial_rotary_factor", 0.5},
                             {"tie_word_embeddings", tie},
                             {"hidden_act", "gelu_new"}};
    std::ofstream(dir_ / "config.json") << config.dump();
    WriteSafetensors(dir_ / "model.safetensors", tensors_);
  }

  absl::StatusOr<std::vector<float>> Logits() {
    absl::StatusOr<std::unique_ptr<ModelBackend>> m = CreateModelBackend(Options(dir_, "cpu"));
    if (!m.ok()) return m.status();
    if (absl::Status st = (*m)->AllocateKvCache(2, 16); !st.ok()) return st;
    std::vector<float> out;
    if (absl::Status st = (*m)->Forward(OneSeq({3, 1, 4, 1, 5}, 0, 5, {1}, true), &out); !st.ok()) {
      return st;
    }
    return out;
  }

  fs::path dir_;
  Tensors tensors_;
};

TEST_F(SyntheticModelTest, TiedHeadEqualsExplicitCopyOfEmbedding) {
  Write(/*tie=*/true);  // no lm_head.weight in the file
  absl::StatusOr<std::vector<float>> tied = Logits();
  ASSERT_TRUE(tied.ok()) << tied.status();
  tensors_["lm_head.weight"] = tensors_["model.embed_tokens.weight"];
  Write(/*tie=*/false);
  absl::StatusOr<std::vector<float>> untied = Logits();
  ASSERT_TRUE(untied.ok()) << untied.status();
  EXPECT_EQ(*tied, *untied);
  // lm_head.bias, when present, is added to every row.
  tensors_["lm_head.bias"] = {{V}, std::vector<float>(V, 0.0f)};
  tensors_["lm_head.bias"].second[3] = 2.5f;
  Write(/*tie=*/false);
  absl::StatusOr<std::vector<float>> biased = Logits();
  ASSERT_TRUE(biased.ok()) << biased.status();
  for (size_t i = 0; i < biased->size(); ++i) {
    EXPECT_FLOAT_EQ((*biased)[i], (*untied)[i] + (i % V == 3 ? 2.5f : 0.0f)) << i;
  }
}

TEST_F(SyntheticModelTest, MissingOrMisshapenTensorsNameTheTensor) {
  Write(/*tie=*/false);  // neither lm_head.weight nor tying
  absl::StatusOr<std::vector<float>> r = Logits();
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("lm_head.weight"), std::string::npos) << r.status();

  tensors_["lm_head.weight"] = tensors_["model.embed_tokens.weight"];
  tensors_["model.layers.0.mlp.fc1.bias"] = {{I + 1}, std::vector<float>(I + 1, 0.0f)};
  Write(/*tie=*/false);
  r = Logits();
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.layers.0.mlp.fc1.bias"), std::string::npos)
      << r.status();

  tensors_["model.layers.0.mlp.fc1.bias"] = {{I}, std::vector<float>(I, 0.0f)};
  tensors_.erase("model.layers.0.self_attn.k_proj.bias");
  Write(/*tie=*/false);
  r = Logits();
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.layers.0.self_attn.k_proj.bias"), std::string::npos)
      << r.status();
}

// A checkpoint may carry tensors the model never reads in dtypes phishard does not convert
// (an I64 position-id buffer, a BOOL causal mask saved by an older writer): Hugging Face and
// upstream LoRAX load it, and so must we, with the same logits. A tensor the model does read in
// such a dtype is refused naming it.
TEST_F(SyntheticModelTest, UnreadTensorsOfOtherDtypesAreIgnored) {
  tensors_["lm_head.weight"] = tensors_["model.embed_tokens.weight"];
  Write(/*tie=*/false);
  absl::StatusOr<std::vector<float>> plain = Logits();
  ASSERT_TRUE(plain.ok()) << plain.status();

  auto write_raw = [&](const fs::path& path, const std::string& name, const char* dtype, int64_t n,
                       size_t elem_bytes) {
    std::string h = nlohmann::json{{name,
                                    {{"dtype", dtype},
                                     {"shape", {n}},
                                     {"data_offsets", {0, n * static_cast<int64_t>(elem_bytes)}}}}}
                        .dump();
    std::ofstream out(path, std::ios::binary);
    const uint64_t len = h.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out << h << std::string(n * elem_bytes, '\0');
  };
  write_raw(dir_ / "buffers.safetensors", "model.position_ids", "I64", 5, 8);
  write_raw(dir_ / "masks.safetensors", "model.layers.0.self_attn.causal_mask", "BOOL", 9, 1);
  absl::StatusOr<std::vector<float>> with_buffers = Logits();
  ASSERT_TRUE(with_buffers.ok()) << with_buffers.status();
  EXPECT_EQ(*with_buffers, *plain);

  // lm_head.bias is read when present: as I64 it is refused, naming it and its dtype.
  write_raw(dir_ / "buffers.safetensors", "lm_head.bias", "I64", V, 8);
  absl::StatusOr<std::vector<float>> r = Logits();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented) << r.status();
  EXPECT_NE(r.status().message().find("unsupported dtype I64 for tensor 'lm_head.bias'"),
            std::string::npos)
      << r.status();
}

TEST(ModelFactory, ChoosesCpuAndRejectsWhatItCannotDo) {
  auto code = [](ModelLoadOptions o) { return CreateModelBackend(o).status().code(); };
  absl::StatusOr<std::unique_ptr<ModelBackend>> cpu =
      CreateModelBackend(Options(kTinyModel, "cpu", "float32"));
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->device_type(), "cpu");

  absl::StatusOr<std::unique_ptr<ModelBackend>> bf16 =
      CreateModelBackend(Options(kTinyModel, "cpu", "bfloat16"));
  ASSERT_FALSE(bf16.ok());
  EXPECT_EQ(bf16.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bf16.status().message().find("float32"), std::string::npos) << bf16.status();

  EXPECT_EQ(code(Options(kTinyModel, "tpu")), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Options(kTinyModel, "cpu", "", 2, 2)), absl::StatusCode::kInvalidArgument);
  // World size 2 needs the group's communicator (tests/model/tp_model_test.cc runs real groups).
  EXPECT_EQ(code(Options(kTinyModel, "cpu", "", 0, 2)), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(CreateModelBackend(Options("/nonexistent/model", "cpu")).ok());
  if (!CudaBackendUsable()) {
    absl::StatusOr<std::unique_ptr<ModelBackend>> cuda =
        CreateModelBackend(Options(kTinyModel, "cuda"));
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition) << cuda.status();
    absl::StatusOr<std::unique_ptr<ModelBackend>> automatic =
        CreateModelBackend(Options(kTinyModel, "auto"));
    ASSERT_TRUE(automatic.ok()) << automatic.status();
    EXPECT_EQ((*automatic)->device_type(), "cpu");
  }
}

}  // namespace
}  // namespace phishard
