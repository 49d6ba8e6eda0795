// PyTorch checkpoints (model/torch_checkpoint.h) against what torch wrote: the fixtures in
// tests/data/torch/ come from tools/gen_torch_fixtures.py (torch 2.11 on the GPU machine), made
// from weights already in the repo, so every tensor can be compared with its safetensors twin
// bit for bit.
#include "model/torch_checkpoint.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "model/cpu_phi_model.h"
#include "model/forward_batch.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "model/phi_config.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();
const fs::path kTorch = kRepo / "tests" / "data" / "torch";
const fs::path kGolden = kRepo / "tests" / "golden";

// Same names, dtypes, shapes and bytes.
void ExpectSameTensors(const WeightStore& a, const WeightStore& b) {
  ASSERT_EQ(a.Names(), b.Names());
  for (const std::string& name : a.Names()) {
    absl::StatusOr<const TensorView*> x = a.Get(name);
    absl::StatusOr<const TensorView*> y = b.Get(name);
    ASSERT_TRUE(x.ok() && y.ok()) << name;
    EXPECT_EQ((*x)->dtype, (*y)->dtype) << name;
    EXPECT_EQ((*x)->shape, (*y)->shape) << name;
    ASSERT_EQ((*x)->nbytes, (*y)->nbytes) << name;
    EXPECT_EQ(std::memcmp((*x)->data, (*y)->data, (*x)->nbytes), 0) << name;
  }
}

TEST(TorchCheckpoint, ModelBinEqualsItsSafetensors) {
  absl::StatusOr<std::unique_ptr<WeightStore>> bin = WeightStore::OpenDir(kTorch / "model-bin");
  ASSERT_TRUE(bin.ok()) << bin.status();
  absl::StatusOr<std::unique_ptr<WeightStore>> st = WeightStore::OpenDir(kGolden / "phi-mha-hd64");
  ASSERT_TRUE(st.ok()) << st.status();
  ExpectSameTensors(**bin, **st);
}

// transformers 4.x's sharded layout: pytorch_model-0000i-of-0000n.bin +
// pytorch_model.bin.index.json.
TEST(TorchCheckpoint, ShardedBinThroughItsIndex) {
  absl::StatusOr<std::unique_ptr<WeightStore>> bin =
      WeightStore::OpenDir(kTorch / "model-bin-sharded");
  ASSERT_TRUE(bin.ok()) << bin.status();
  absl::StatusOr<std::unique_ptr<WeightStore>> st = WeightStore::OpenDir(kGolden / "phi-mha-hd64");
  ASSERT_TRUE(st.ok()) << st.status();
  ExpectSameTensors(**bin, **st);
}

// The model from pytorch_model.bin answers exactly as from model.safetensors (the same bf16
// values widened the same way): the logits of a prefill are bit-identical.
TEST(TorchCheckpoint, CpuModelFromBinGivesTheSameLogits) {
  auto logits = [](const fs::path& dir) {
    absl::StatusOr<std::unique_ptr<CpuPhiModel>> m = CpuPhiModel::Load(dir);
    EXPECT_TRUE(m.ok()) << m.status();
    if (!m.ok()) return std::vector<float>();
    EXPECT_TRUE((*m)->AllocateKvCache(8, 16).ok());
    ForwardBatch b;
    b.token_ids = {5, 17, 300, 42, 7, 99, 511, 0, 12};
    const int n = static_cast<int>(b.token_ids.size());
    b.positions.resize(n);
    std::iota(b.positions.begin(), b.positions.end(), 0);
    b.logit_rows = b.positions;
    b.seqs.push_back({.num_new_tokens = n, .context_len = n, .block_table = {0}});
    std::vector<float> out;
    const absl::Status s = (*m)->Forward(b, &out);
    EXPECT_TRUE(s.ok()) << s;
    return out;
  };
  const std::vector<float> from_bin = logits(kTorch / "model-bin");
  const std::vector<float> from_st = logits(kGolden / "phi-mha-hd64");
  ASSERT_FALSE(from_bin.empty());
  EXPECT_EQ(from_bin, from_st);
}

// An adapter directory with only adapter_model.bin (older peft) loads like its safetensors twin.
TEST(TorchCheckpoint, AdapterBinLoadsLikeSafetensors) {
  absl::StatusOr<PhiConfig> base = LoadPhiConfig(kRepo / "models" / "tiny-phi-code");
  ASSERT_TRUE(base.ok()) << base.status();
  absl::StatusOr<LoraAdapter> bin = LoraAdapter::LoadDir(kTorch / "adapter-bin", *base);
  ASSERT_TRUE(bin.ok()) << bin.status();
  absl::StatusOr<LoraAdapter> st =
      LoraAdapter::LoadDir(kGolden / "adapters" / "lora-r4-qv-fc2", *base);
  ASSERT_TRUE(st.ok()) << st.status();
  int modules = 0;
  for (int l = 0; l < base->num_hidden_layers; ++l) {
    for (LoraTarget t : {LoraTarget::kQProj, LoraTarget::kKProj, LoraTarget::kVProj,
                         LoraTarget::kDense, LoraTarget::kFc1, LoraTarget::kFc2}) {
      const LoraModule& x = bin->module(l, t);
      const LoraModule& y = st->module(l, t);
      ASSERT_EQ(x.rank, y.rank);
      EXPECT_EQ(x.scale, y.scale);
      EXPECT_EQ(x.a, y.a);
      EXPECT_EQ(x.b, y.b);
      modules += x.present();
    }
  }
  EXPECT_GT(modules, 0);
}

// Dtypes, a view at a storage offset, two names over one storage, a 0-d tensor; I64 listed as
// unsupported (reading it names it), as in safetensors files.
TEST(TorchCheckpoint, MixedDtypesViewsAndSharedStorage) {
  absl::StatusOr<std::unique_ptr<WeightStore>> store =
      WeightStore::OpenFiles({kTorch / "misc" / "mixed.bin"});
  ASSERT_TRUE(store.ok()) << store.status();
  std::ifstream in(kTorch / "misc" / "mixed.json");
  const json want = json::parse(in);
  for (const auto& [name, values] : want.at("values").items()) {
    std::vector<int64_t> shape = want.at("shapes").at(name).get<std::vector<int64_t>>();
    std::vector<float> got;
    const absl::Status s = store->get()->ReadF32(name, shape, &got);
    ASSERT_TRUE(s.ok()) << name << ": " << s;
    const std::vector<float> expect = values.get<std::vector<float>>();
    EXPECT_EQ(got, expect) << name;  // float32 of f16 / bf16 / f32 values: exact
  }
  EXPECT_TRUE(store->get()->Has("i64"));
  const absl::StatusOr<const TensorView*> i64 = store->get()->Get("i64");
  EXPECT_TRUE(absl::IsUnimplemented(i64.status()) &&
              i64.status().message().find("I64") != std::string::npos)
      << i64.status();
}

TEST(TorchCheckpoint, RefusesWhatItCannotMapWithANamedError) {
  absl::StatusOr<std::unique_ptr<TorchCheckpointFile>> nc =
      TorchCheckpointFile::Open(kTorch / "misc" / "noncontig.bin");
  EXPECT_TRUE(absl::IsInvalidArgument(nc.status()) &&
              nc.status().message().find("'t' is not contiguous") != std::string::npos)
      << nc.status();
  absl::StatusOr<std::unique_ptr<TorchCheckpointFile>> legacy =
      TorchCheckpointFile::Open(kTorch / "misc" / "legacy.bin");
  EXPECT_TRUE(absl::IsInvalidArgument(legacy.status()) &&
              legacy.status().message().find("legacy") != std::string::npos)
      << legacy.status();
  absl::StatusOr<std::unique_ptr<TorchCheckpointFile>> none =
      TorchCheckpointFile::Open(kTorch / "misc" / "no-such.bin");
  EXPECT_TRUE(absl::IsNotFound(none.status())) << none.status();
}

// A valid archive whose pickle calls posix.system("touch /tmp/phishard-pwned") (written with
// Python's zipfile, no torch): refused by name, nothing runs.
TEST(TorchCheckpoint, HostilePickleIsRefusedWithoutRunningIt) {
  fs::remove("/tmp/phishard-pwned");
  absl::StatusOr<std::unique_ptr<TorchCheckpointFile>> evil =
      TorchCheckpointFile::Open(kTorch / "misc" / "evil.bin");
  EXPECT_TRUE(absl::IsInvalidArgument(evil.status()) &&
              evil.status().message().find("global posix.system is not allowed") !=
                  std::string::npos)
      << evil.status();
  EXPECT_FALSE(fs::exists("/tmp/phishard-pwned"));
}

// Truncated and bit-flipped copies of a real checkpoint: an error or a well-formed file, never a
// crash or a read outside the mapping (run under ASan in the fuzz build too).
TEST(TorchCheckpoint, DamagedFilesFailCleanly) {
  std::ifstream in(kTorch / "misc" / "mixed.bin", std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 1000u);
  const fs::path tmp = fs::temp_directory_path() / ("phishard-torch-" + std::to_string(getpid()));
  fs::create_directories(tmp);
  auto open = [&](const std::string& data) {
    const fs::path p = tmp / "x.bin";
    std::ofstream(p, std::ios::binary | std::ios::trunc).write(data.data(), data.size());
    return TorchCheckpointFile::Open(p);
  };
  int errors = 0;
  for (size_t len = 0; len < bytes.size(); len += 37) errors += !open(bytes.substr(0, len)).ok();
  EXPECT_GT(errors, 0);
  for (size_t i = 0; i < bytes.size(); i += 13) {
    std::string d = bytes;
    d[i] = static_cast<char>(d[i] ^ 0x5a);
    absl::StatusOr<std::unique_ptr<TorchCheckpointFile>> f = open(d);
    if (f.ok()) {  // whatever it lists lies inside the file
      for (const auto& [name, view] : (*f)->tensors()) EXPECT_LE(view.nbytes, d.size()) << name;
    }
  }
  fs::remove_all(tmp);
}

}  // namespace
}  // namespace phishard
