// PEFT LoRA adapter loading and validation, the adapter registry and adapter merging (no forward
// pass here: adapter_golden_test.cc runs the model).
#include "model/lora_adapter.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "model/adapter_registry.h"
#include "model/phi_config.h"
#include "nlohmann/json.hpp"
#include "tests/model/lora_test_util.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using lora_test::ReadJsonFile;
using lora_test::ReadTensors;
using lora_test::TempDir;
using lora_test::TensorMap;
using lora_test::WriteAdapter;
using lora_test::WriteText;
using ::testing::AllOf;
using ::testing::HasSubstr;

const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();
const fs::path kTinyModel = fs::path(PHISHARD_MODELS) / "tiny-phi-code";
const fs::path kProse = kTinyModel / "adapters" / "prose";
const fs::path kR4 = kRepo / "tests" / "golden" / "adapters" / "lora-r4-qv-fc2";
const fs::path kR16 = kRepo / "tests" / "golden" / "adapters" / "lora-r16-rslora-all";
const std::string kPrefix = "base_model.model.model.layers.";

PhiConfig TinyConfig() {
  absl::StatusOr<PhiConfig> c = LoadPhiConfig(kTinyModel);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : PhiConfig{};
}

// ---- the three fixture adapters ------------------------------------------------------------

struct FixtureCase {
  const char* name;
  fs::path dir;
  int rank;
  float scale;
  std::vector<LoraTarget> targets;
};

TEST(LoraAdapterLoad, AllThreeFixtureAdapters) {
  const PhiConfig c = TinyConfig();
  using T = LoraTarget;
  const std::vector<FixtureCase> cases = {
      {"prose", kProse, 8, 2.0f, {T::kQProj, T::kKProj, T::kVProj, T::kDense, T::kFc1, T::kFc2}},
      {"r4", kR4, 4, 2.0f, {T::kQProj, T::kVProj, T::kFc2}},
      // rsLoRA: 16 / sqrt(16) = 4 (alpha / r would be 1).
      {"r16", kR16, 16, 4.0f, {T::kQProj, T::kKProj, T::kVProj, T::kDense, T::kFc1, T::kFc2}},
  };
  for (const FixtureCase& fc : cases) {
    SCOPED_TRACE(fc.name);
    absl::StatusOr<LoraAdapter> a = LoraAdapter::LoadDir(fc.dir, c);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(a->num_layers(), c.num_hidden_layers);
    EXPECT_EQ(a->max_rank(), fc.rank);
    const TensorMap file = ReadTensors(fc.dir);
    int64_t params = 0;
    for (LoraTarget t : kAllLoraTargets) {
      const bool want = std::find(fc.targets.begin(), fc.targets.end(), t) != fc.targets.end();
      EXPECT_EQ(a->has_target(t), want) << LoraTargetName(t);
      if (t == LoraTarget::kLmHead) continue;
      for (int l = 0; l < c.num_hidden_layers; ++l) {
        const LoraModule& m = a->module(l, t);
        if (!want) {
          EXPECT_FALSE(m.present());
          continue;
        }
        ASSERT_EQ(m.rank, fc.rank);
        EXPECT_FLOAT_EQ(m.scale, fc.scale);
        const auto [in, out] = LoraTargetDims(c, t);
        const std::string base = "base_model." + LoraModuleName(t, l);
        // Bit-exact copies of the file (F32 in, F32 out).
        EXPECT_EQ(m.a, file.at("base_model.model." + LoraModuleName(t, l) + ".lora_A.weight").data);
        EXPECT_EQ(m.b, file.at("base_model.model." + LoraModuleName(t, l) + ".lora_B.weight").data);
        EXPECT_EQ(static_cast<int64_t>(m.a.size()), fc.rank * in);
        EXPECT_EQ(static_cast<int64_t>(m.b.size()), fc.rank * out);
        params += m.num_params();
      }
    }
    EXPECT_EQ(a->num_params(), params);
    int64_t file_params = 0;
    for (const auto& [name, t] : file) file_params += static_cast<int64_t>(t.data.size());
    EXPECT_EQ(a->num_params(), file_params) << "every tensor of the file is used";
    std::cout << fc.name << ": " << a->Describe() << "\n";
  }
}

TEST(LoraAdapterLoad, ModuleNamesAndDims) {
  const PhiConfig c = TinyConfig();
  EXPECT_EQ(LoraModuleName(LoraTarget::kQProj, 3), "model.layers.3.self_attn.q_proj");
  EXPECT_EQ(LoraModuleName(LoraTarget::kDense, 0), "model.layers.0.self_attn.dense");
  EXPECT_EQ(LoraModuleName(LoraTarget::kFc2, 1), "model.layers.1.mlp.fc2");
  EXPECT_EQ(LoraModuleName(LoraTarget::kLmHead, 5), "lm_head");
  EXPECT_EQ(LoraTargetDims(c, LoraTarget::kDense), (std::pair<int64_t, int64_t>{256, 256}));
  EXPECT_EQ(LoraTargetDims(c, LoraTarget::kFc1), (std::pair<int64_t, int64_t>{256, 1024}));
  EXPECT_EQ(LoraTargetDims(c, LoraTarget::kFc2), (std::pair<int64_t, int64_t>{1024, 256}));
  EXPECT_EQ(LoraTargetDims(c, LoraTarget::kLmHead), (std::pair<int64_t, int64_t>{256, 4095}));
}

// ---- malformed adapters: each one a clear error -------------------------------------------

class MalformedAdapter : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = ReadJsonFile(kR4 / "adapter_config.json");
    tensors_ = ReadTensors(kR4);
    ASSERT_FALSE(tensors_.empty());
  }
  // Writes the (modified) r4 adapter and loads it against tiny-phi-code.
  absl::Status Load() {
    WriteAdapter(dir_.path(), config_, tensors_);
    return LoraAdapter::LoadDir(dir_.path(), TinyConfig()).status();
  }
  void ExpectError(absl::StatusCode code, const ::testing::Matcher<std::string>& message) {
    const absl::Status st = Load();
    EXPECT_EQ(st.code(), code) << st;
    EXPECT_THAT(std::string(st.message()), message);
  }
  static std::string Name(int layer, const std::string& module, const char* ab) {
    return kPrefix + std::to_string(layer) + "." + module + ".lora_" + ab + ".weight";
  }

  TempDir dir_{"lora-malformed"};
  json config_;
  TensorMap tensors_;
};

TEST_F(MalformedAdapter, UnmodifiedCopyLoads) { EXPECT_TRUE(Load().ok()); }

TEST_F(MalformedAdapter, BadJson) {
  WriteAdapter(dir_.path(), config_, tensors_);
  WriteText(dir_.path() / "adapter_config.json", "{\"r\": 4, \"peft_type\": ");
  const absl::Status st = LoraAdapter::LoadDir(dir_.path(), TinyConfig()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()),
              AllOf(HasSubstr("adapter_config.json"), HasSubstr("not valid JSON")));
  WriteText(dir_.path() / "adapter_config.json", "[1, 2]");
  EXPECT_EQ(LoraAdapter::LoadDir(dir_.path(), TinyConfig()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(MalformedAdapter, Dora) {
  config_["use_dora"] = true;
  ExpectError(absl::StatusCode::kUnimplemented, HasSubstr("DoRA adapters are not supported"));
}

TEST_F(MalformedAdapter, DoraMagnitudeTensorWithoutTheFlag) {
  tensors_[kPrefix + "0.self_attn.q_proj.lora_magnitude_vector"] = {{256}, std::vector<float>(256)};
  ExpectError(absl::StatusCode::kUnimplemented, HasSubstr("DoRA adapters are not supported"));
}

TEST_F(MalformedAdapter, ModulesToSave) {
  config_["modules_to_save"] = {"lm_head"};
  ExpectError(absl::StatusCode::kUnimplemented,
              AllOf(HasSubstr("modules_to_save"), HasSubstr("lm_head")));
}

TEST_F(MalformedAdapter, TrainedBias) {
  config_["bias"] = "lora_only";
  ExpectError(absl::StatusCode::kUnimplemented, AllOf(HasSubstr("bias"), HasSubstr("lora_only")));
  config_["bias"] = "none";
  config_["lora_bias"] = true;
  ExpectError(absl::StatusCode::kUnimplemented, HasSubstr("lora_bias"));
}

TEST_F(MalformedAdapter, NotLora) {
  config_["peft_type"] = "PREFIX_TUNING";
  ExpectError(absl::StatusCode::kUnimplemented, HasSubstr("PREFIX_TUNING"));
  config_.erase("peft_type");
  ExpectError(absl::StatusCode::kInvalidArgument, HasSubstr("peft_type"));
}

TEST_F(MalformedAdapter, BadFieldTypes) {
  config_["r"] = "4";
  ExpectError(absl::StatusCode::kInvalidArgument, HasSubstr("field 'r'"));
  config_["r"] = 0;
  ExpectError(absl::StatusCode::kInvalidArgument, HasSubstr("field 'r'"));
  config_["r"] = 4;
  config_["lora_alpha"] = "eight";
  ExpectError(absl::StatusCode::kInvalidArgument, HasSubstr("lora_alpha"));
  config_["lora_alpha"] = 8;
  config_["target_modules"] = {"q_proj", 3};
  ExpectError(absl::StatusCode::kInvalidArgument, HasSubstr("target_modules"));
  config_["target_modules"] = "model\\.layers\\.(";
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr("target_modules"), HasSubstr("does not compile")));
}

TEST_F(MalformedAdapter, MissingPair) {
  ASSERT_EQ(tensors_.erase(Name(2, "self_attn.q_proj", "B")), 1u);
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr("model.layers.2.self_attn.q_proj"), HasSubstr("lora_B.weight"),
                    HasSubstr("pairs")));
}

TEST_F(MalformedAdapter, WrongRankForTheConfig) {
  config_["r"] = 8;  // the tensors have r = 4
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr("rank 4"), HasSubstr("r = 8"), HasSubstr("model.layers.0")));
}

TEST_F(MalformedAdapter, RanksOfAPairDisagree) {
  lora_test::Tensor& b = tensors_[Name(1, "mlp.fc2", "B")];
  b.shape = {256, 5};
  b.data.resize(256 * 5);
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr("rank mismatch"), HasSubstr("model.layers.1.mlp.fc2"),
                    HasSubstr("[256, 5]")));
}

TEST_F(MalformedAdapter, ShapeMismatchWithTheBaseModel) {
  lora_test::Tensor& a = tensors_[Name(0, "self_attn.v_proj", "A")];
  a.shape = {4, 255};
  a.data.resize(4 * 255);
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr("shape mismatch with the base model"),
                    HasSubstr(Name(0, "self_attn.v_proj", "A")), HasSubstr("[4, 255]"),
                    HasSubstr("[4, 256]")));
}

TEST_F(MalformedAdapter, UnknownModule) {
  tensors_[kPrefix + "0.mlp.fc3.lora_A.weight"] = {{4, 256}, std::vector<float>(4 * 256)};
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr(kPrefix + "0.mlp.fc3.lora_A.weight"),
                    HasSubstr("adapter_model.safetensors")));
}

TEST_F(MalformedAdapter, ForeignTensorName) {
  tensors_["model.layers.0.self_attn.q_proj.weight"] = {{4}, std::vector<float>(4)};
  ExpectError(absl::StatusCode::kInvalidArgument,
              HasSubstr("model.layers.0.self_attn.q_proj.weight"));
}

TEST_F(MalformedAdapter, LayerOutOfRange) {
  tensors_[Name(7, "mlp.fc2", "A")] = {{4, 1024}, std::vector<float>(4 * 1024)};
  tensors_[Name(7, "mlp.fc2", "B")] = {{256, 4}, std::vector<float>(256 * 4)};
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr("layer 7"), HasSubstr("4 layers")));
}

TEST_F(MalformedAdapter, TensorsForAModuleTheConfigDoesNotTarget) {
  tensors_[Name(0, "self_attn.k_proj", "A")] = {{4, 256}, std::vector<float>(4 * 256)};
  tensors_[Name(0, "self_attn.k_proj", "B")] = {{256, 4}, std::vector<float>(256 * 4)};
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr("model.layers.0.self_attn.k_proj"), HasSubstr("does not target")));
}

TEST_F(MalformedAdapter, TargetWithNoTensors) {
  config_["target_modules"] = {"q_proj", "v_proj", "fc2", "dense"};
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr("targets model.layers.0.self_attn.dense"),
                    HasSubstr("no lora_A/lora_B tensors")));
}

TEST_F(MalformedAdapter, EmbeddingTarget) {
  config_["target_modules"] = {"q_proj", "v_proj", "fc2", "embed_tokens"};
  ExpectError(absl::StatusCode::kUnimplemented, HasSubstr("embed_tokens"));
}

TEST_F(MalformedAdapter, NonFiniteWeight) {
  tensors_[Name(3, "mlp.fc2", "B")].data[17] = NAN;
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr(Name(3, "mlp.fc2", "B")), HasSubstr("NaN")));
}

// A finite lora_alpha whose scale alpha / r overflows float32 (the deltas' precision): refused
// like a non-finite weight, since every output it touched would be inf or NaN.
TEST_F(MalformedAdapter, ScaleOutsideFloat32) {
  config_["lora_alpha"] = 1e300;
  ExpectError(absl::StatusCode::kInvalidArgument,
              AllOf(HasSubstr("lora_alpha"), HasSubstr("float32")));
}

TEST_F(MalformedAdapter, CorruptSafetensors) {
  WriteAdapter(dir_.path(), config_, tensors_);
  WriteText(dir_.path() / "adapter_model.safetensors", "not a safetensors file at all");
  const absl::Status st = LoraAdapter::LoadDir(dir_.path(), TinyConfig()).status();
  EXPECT_FALSE(st.ok());
  EXPECT_THAT(std::string(st.message()), HasSubstr("adapter_model.safetensors"));
}

// adapter_model.bin is read (model/torch_checkpoint.h; real ones in torch_checkpoint_test): one
// that is not a torch.save archive is INVALID_ARGUMENT naming the file.
TEST_F(MalformedAdapter, BrokenPickleCheckpoint) {
  fs::create_directories(dir_.path());
  WriteText(dir_.path() / "adapter_config.json", config_.dump());
  WriteText(dir_.path() / "adapter_model.bin", "PK\x03\x04 pretend pickle, with no ZIP directory");
  const absl::Status st = LoraAdapter::LoadDir(dir_.path(), TinyConfig()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()),
              AllOf(HasSubstr("adapter_model.bin"), HasSubstr("not a ZIP archive")));
}

TEST_F(MalformedAdapter, PathsWithoutFiles) {
  absl::Status st = LoraAdapter::LoadDir(dir_.path() / "nope", TinyConfig()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("does not exist"));

  st = LoraAdapter::LoadDir(dir_.path(), TinyConfig()).status();  // empty directory
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("No valid adapter config file found"));

  WriteText(dir_.path() / "adapter_config.json", config_.dump());  // config, no weights
  st = LoraAdapter::LoadDir(dir_.path(), TinyConfig()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("no *.safetensors"));

  WriteText(dir_.path() / "some_file.txt", "x");  // a file, not a directory
  st = LoraAdapter::LoadDir(dir_.path() / "some_file.txt", TinyConfig()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
}

TEST_F(MalformedAdapter, MedusaDirectory) {
  WriteText(dir_.path() / "config.json", R"({"medusa_num_heads": 4, "medusa_num_layers": 1})");
  const absl::Status st = LoraAdapter::LoadDir(dir_.path(), TinyConfig()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("Medusa"));
}

// ---- config semantics: which modules, which r and alpha ---------------------------------

LoraAdapterConfig Parse(const json& j) {
  absl::StatusOr<LoraAdapterConfig> c = ParseLoraAdapterConfig(j.dump(), "test config");
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : LoraAdapterConfig{};
}

LoraModuleSpec Resolve(const LoraAdapterConfig& c, const std::string& module) {
  absl::StatusOr<LoraModuleSpec> s = ResolveLoraModule(c, module);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : LoraModuleSpec{};
}

TEST(LoraAdapterConfigTest, TargetsListRegexAllLinearAndDefault) {
  const std::string q0 = "model.layers.0.self_attn.q_proj", q2 = "model.layers.2.self_attn.q_proj";
  LoraAdapterConfig c = Parse({{"peft_type", "LORA"}, {"target_modules", {"q_proj"}}});
  EXPECT_TRUE(Resolve(c, q0).targeted);
  EXPECT_FALSE(Resolve(c, "model.layers.0.self_attn.k_proj").targeted);
  // List entries match whole dotted suffixes only: "proj" is not "q_proj".
  c = Parse({{"peft_type", "LORA"}, {"target_modules", {"proj", "self_attn.dense"}}});
  EXPECT_FALSE(Resolve(c, q0).targeted);
  EXPECT_TRUE(Resolve(c, "model.layers.1.self_attn.dense").targeted);
  // A string is a regex over the full name.
  c = Parse({{"peft_type", "LORA"}, {"target_modules", R"(model\.layers\.[01]\..*q_proj)"}});
  EXPECT_TRUE(Resolve(c, q0).targeted);
  EXPECT_FALSE(Resolve(c, q2).targeted);
  EXPECT_FALSE(Resolve(c, "xmodel.layers.0.self_attn.q_proj").targeted) << "must match fully";
  c = Parse({{"peft_type", "LORA"}, {"target_modules", "all-linear"}});
  for (LoraTarget t : kAllLoraTargets) {
    EXPECT_EQ(Resolve(c, LoraModuleName(t, 1)).targeted, t != LoraTarget::kLmHead);
  }
  c = Parse({{"peft_type", "LORA"}, {"target_modules", nullptr}});  // PEFT's phi default
  EXPECT_TRUE(Resolve(c, q0).targeted);
  EXPECT_TRUE(Resolve(c, "model.layers.0.mlp.fc1").targeted);
  EXPECT_FALSE(Resolve(c, "model.layers.0.self_attn.dense").targeted);
  c = Parse({{"peft_type", "LORA"},
             {"target_modules", {"q_proj", "v_proj"}},
             {"exclude_modules", {"layers.2.self_attn.q_proj"}}});
  EXPECT_TRUE(Resolve(c, q0).targeted);
  EXPECT_FALSE(Resolve(c, q2).targeted);
  EXPECT_TRUE(Resolve(c, "model.layers.2.self_attn.v_proj").targeted);
}

TEST(LoraAdapterConfigTest, LayersToTransformAndPattern) {
  const json base = {{"peft_type", "LORA"}, {"target_modules", {"q_proj", "lm_head"}}};
  json j = base;
  j["layers_to_transform"] = {1, 3};
  LoraAdapterConfig c = Parse(j);
  EXPECT_FALSE(Resolve(c, "model.layers.0.self_attn.q_proj").targeted);
  EXPECT_TRUE(Resolve(c, "model.layers.1.self_attn.q_proj").targeted);
  EXPECT_TRUE(Resolve(c, "model.layers.3.self_attn.q_proj").targeted);
  EXPECT_FALSE(Resolve(c, "lm_head").targeted) << "no layer index: PEFT skips it";
  j["layers_pattern"] = "layers";
  j["layers_to_transform"] = 2;
  c = Parse(j);
  EXPECT_TRUE(Resolve(c, "model.layers.2.self_attn.q_proj").targeted);
  EXPECT_FALSE(Resolve(c, "model.layers.1.self_attn.q_proj").targeted);
  j["layers_pattern"] = "h";  // GPT-2 naming: matches nothing in Phi
  c = Parse(j);
  EXPECT_FALSE(Resolve(c, "model.layers.2.self_attn.q_proj").targeted);
}

TEST(LoraAdapterConfigTest, RankAndAlphaPatternsFirstMatchInFileOrder) {
  // Raw text: the key order of the file matters (nlohmann::json would sort the keys).
  absl::StatusOr<LoraAdapterConfig> parsed = ParseLoraAdapterConfig(R"({
    "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "fc2", "fc1"],
    "rank_pattern": {"layers.1.mlp.fc2": 2, "fc2": 4, "model.layers.1.mlp.fc2": 32},
    "alpha_pattern": {"q_proj": 3.5}})",
                                                                    "test config");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const LoraAdapterConfig& c = *parsed;
  LoraModuleSpec s = Resolve(c, "model.layers.1.mlp.fc2");
  EXPECT_EQ(s.r, 2);  // first key in file order wins, as in PEFT's get_pattern_key
  EXPECT_EQ(s.alpha, 16.0);
  s = Resolve(c, "model.layers.0.mlp.fc2");
  EXPECT_EQ(s.r, 4);
  s = Resolve(c, "model.layers.0.mlp.fc1");  // "fc2" is not a suffix of fc1
  EXPECT_EQ(s.r, 8);
  s = Resolve(c, "model.layers.3.self_attn.q_proj");
  EXPECT_EQ(s.r, 8);
  EXPECT_EQ(s.alpha, 3.5);
}

// rank_pattern, alpha_pattern, rsLoRA and layers_to_transform through a real load.
TEST(LoraAdapterLoad, PatternsAndLayersEndToEnd) {
  const PhiConfig c = TinyConfig();
  TempDir dir("lora-patterns");
  json config = {{"peft_type", "LORA"},
                 {"r", 4},
                 {"lora_alpha", 8},
                 {"use_rslora", true},
                 {"target_modules", {"q_proj", "fc2", "lm_head"}},
                 {"rank_pattern", {{"fc2", 2}}},
                 {"alpha_pattern", {{"lm_head", 3}}},
                 {"layers_to_transform", {0, 2}}};
  TensorMap t;
  for (int l : {0, 2}) {
    t[kPrefix + std::to_string(l) + ".self_attn.q_proj.lora_A.weight"] = {
        {4, 256}, lora_test::RandomValues(4 * 256, l, 0.1f)};
    t[kPrefix + std::to_string(l) + ".self_attn.q_proj.lora_B.weight"] = {
        {256, 4}, lora_test::RandomValues(256 * 4, 10 + l, 0.1f)};
    t[kPrefix + std::to_string(l) + ".mlp.fc2.lora_A.weight"] = {
        {2, 1024}, lora_test::RandomValues(2 * 1024, 20 + l, 0.1f)};
    t[kPrefix + std::to_string(l) + ".mlp.fc2.lora_B.weight"] = {
        {256, 2}, lora_test::RandomValues(256 * 2, 30 + l, 0.1f)};
  }
  // layers_to_transform applies to lm_head too (no layer index => not targeted), so no lm_head
  // tensors here; with them the load must fail (next block).
  WriteAdapter(dir.path(), config, t);
  absl::StatusOr<LoraAdapter> a = LoraAdapter::LoadDir(dir.path(), c);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->module(0, LoraTarget::kQProj).rank, 4);
  EXPECT_FLOAT_EQ(a->module(0, LoraTarget::kQProj).scale, 8.0f / 2.0f);  // alpha / sqrt(4)
  EXPECT_EQ(a->module(2, LoraTarget::kFc2).rank, 2);
  EXPECT_FLOAT_EQ(a->module(2, LoraTarget::kFc2).scale, static_cast<float>(8.0 / std::sqrt(2.0)));
  EXPECT_FALSE(a->module(1, LoraTarget::kQProj).present());
  EXPECT_FALSE(a->has_target(LoraTarget::kLmHead));

  t["base_model.model.lm_head.lora_A.weight"] = {{4, 256}, std::vector<float>(4 * 256)};
  t["base_model.model.lm_head.lora_B.weight"] = {{4095, 4}, std::vector<float>(4095 * 4)};
  WriteAdapter(dir.path(), config, t);
  absl::Status st = LoraAdapter::LoadDir(dir.path(), c).status();
  EXPECT_THAT(std::string(st.message()), AllOf(HasSubstr("lm_head"), HasSubstr("does not target")));

  config.erase("layers_to_transform");  // now every layer is targeted: layers 1 and 3 lack tensors
  WriteAdapter(dir.path(), config, t);
  st = LoraAdapter::LoadDir(dir.path(), c).status();
  EXPECT_THAT(std::string(st.message()), HasSubstr("targets model.layers.1.self_attn.q_proj"));
}

// ---- registry -------------------------------------------------------------------------------

LoraAdapter Fixture(const fs::path& dir) {
  absl::StatusOr<LoraAdapter> a = LoraAdapter::LoadDir(dir, TinyConfig());
  EXPECT_TRUE(a.ok()) << a.status();
  return a.ok() ? *std::move(a) : LoraAdapter("empty", 0);
}

TEST(AdapterRegistryTest, CreateRejectsBadArguments) {
  EXPECT_EQ(AdapterRegistry::Create(0, 1 << 20, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AdapterRegistry::Create(4, -1, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AdapterRegistry::Create(4, 1 << 20, 3).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AdapterRegistryTest, LoadOffloadSlotsAndBytes) {
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> reg = AdapterRegistry::Create(2, 64 << 20, 4);
  ASSERT_TRUE(reg.ok()) << reg.status();
  AdapterRegistry& r = **reg;
  const LoraAdapter r4 = Fixture(kR4);
  const int64_t r4_bytes = r4.num_params() * 4;
  EXPECT_EQ(r.BytesOf(r4), r4_bytes);
  EXPECT_FALSE(r.IsLoaded(7));
  EXPECT_EQ(r.Find(7), nullptr);
  EXPECT_EQ(r.SlotOf(7), -1);
  EXPECT_FALSE(r.Offload(7)) << "offloading what is not loaded answers false";

  const uint64_t g0 = r.generation();
  absl::StatusOr<AdapterLoadResult> res = r.Load(7, Fixture(kR4));
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(*res, AdapterLoadResult::kLoaded);
  EXPECT_TRUE(r.IsLoaded(7));
  ASSERT_NE(r.Find(7), nullptr);
  EXPECT_EQ(r.Find(7)->max_rank(), 4);
  EXPECT_EQ(r.SlotOf(7), 0);
  EXPECT_EQ(r.used_bytes(), r4_bytes);
  EXPECT_GT(r.generation(), g0);

  // Same index again: a no-op even with a different adapter (spec: loaded = true, no reload).
  const uint64_t g1 = r.generation();
  res = r.Load(7, Fixture(kR16));
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(*res, AdapterLoadResult::kAlreadyLoaded);
  EXPECT_EQ(r.Find(7)->max_rank(), 4);
  EXPECT_EQ(r.used_bytes(), r4_bytes);
  EXPECT_EQ(r.generation(), g1);

  ASSERT_TRUE(r.Load(0, Fixture(kProse)).ok()) << "index 0 may hold a static adapter";
  EXPECT_EQ(r.SlotOf(0), 1);
  EXPECT_EQ(r.num_loaded(), 2);
  const absl::StatusOr<AdapterLoadResult> full = r.Load(9, Fixture(kR16));
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  EXPECT_THAT(std::string(full.status().message()), HasSubstr("slots"));
  EXPECT_FALSE(r.IsLoaded(9));

  EXPECT_TRUE(r.Offload(7));
  EXPECT_FALSE(r.IsLoaded(7));
  EXPECT_FALSE(r.Offload(7));
  EXPECT_EQ(r.used_bytes(), r.BytesOf(*r.Find(0)));
  ASSERT_TRUE(r.Load(9, Fixture(kR16)).ok());
  EXPECT_EQ(r.SlotOf(9), 0) << "the freed slot is reused";
  EXPECT_TRUE(r.Offload(9));
  EXPECT_TRUE(r.Offload(0));
  EXPECT_EQ(r.used_bytes(), 0);
  EXPECT_EQ(r.num_loaded(), 0);
}

TEST(AdapterRegistryTest, BudgetIsEnforcedBeforeAnythingChanges) {
  const LoraAdapter r4 = Fixture(kR4);
  const LoraAdapter r16 = Fixture(kR16);
  // bf16 accounting: 2 bytes per parameter. Budget: r16 plus r4 minus one byte.
  const int64_t budget = 2 * (r16.num_params() + r4.num_params()) - 1;
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> reg = AdapterRegistry::Create(8, budget, 2);
  ASSERT_TRUE(reg.ok());
  AdapterRegistry& r = **reg;
  ASSERT_TRUE(r.Load(1, Fixture(kR16)).ok());
  EXPECT_EQ(r.used_bytes(), 2 * r16.num_params());
  const absl::StatusOr<AdapterLoadResult> over = r.Load(2, Fixture(kR4));
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_THAT(std::string(over.status().message()),
              AllOf(HasSubstr("budget"), HasSubstr(std::to_string(budget))));
  EXPECT_FALSE(r.IsLoaded(2));
  EXPECT_EQ(r.used_bytes(), 2 * r16.num_params());
  EXPECT_EQ(r.CheckFits(2 * r4.num_params()).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(r.CheckFits(2 * r4.num_params() - 1).ok());

  absl::StatusOr<std::unique_ptr<AdapterRegistry>> none = AdapterRegistry::Create(8, 0, 2);
  ASSERT_TRUE(none.ok());
  EXPECT_THAT(std::string((*none)->Load(1, Fixture(kR4)).status().message()),
              HasSubstr("Memory reserved for adapters is 0"));
}

TEST(AdapterRegistryTest, PreloadedAdaptersAreNeverOffloaded) {
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> reg = AdapterRegistry::Create(4, 64 << 20, 4);
  ASSERT_TRUE(reg.ok());
  ASSERT_TRUE((*reg)->Load(1, Fixture(kR4), /*preloaded=*/true).ok());
  EXPECT_FALSE((*reg)->Offload(1));
  EXPECT_TRUE((*reg)->IsLoaded(1));
}

TEST(AdapterRegistryTest, EmptyAdapterIsRejected) {
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> reg = AdapterRegistry::Create(4, 64 << 20, 4);
  ASSERT_TRUE(reg.ok());
  EXPECT_EQ((*reg)->Load(1, LoraAdapter("nothing", 4)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- merging --------------------------------------------------------------------------------

// ΔW = Σ scale · B A of one module, in double.
std::vector<double> DeltaW(const LoraModule& m, int64_t in, int64_t out, double weight = 1.0) {
  std::vector<double> d(out * in, 0.0);
  if (!m.present()) return d;
  for (int64_t j = 0; j < out; ++j) {
    for (int k = 0; k < m.rank; ++k) {
      const double bjk = weight * m.scale * m.b[j * m.rank + k];
      for (int64_t i = 0; i < in; ++i) d[j * in + i] += bjk * m.a[k * in + i];
    }
  }
  return d;
}

TEST(MergeAdaptersTest, LinearMergeIsTheWeightedSumOfUpdates) {
  const PhiConfig c = TinyConfig();
  const LoraAdapter r4 = Fixture(kR4), prose = Fixture(kProse);
  const std::vector<WeightedAdapter> parts = {{&r4, 0.7f}, {&prose, -0.4f}};
  absl::StatusOr<LoraAdapter> m = MergeAdapters(c, parts, MergeStrategy::kLinear, "merged");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->name(), "merged");
  EXPECT_EQ(m->module(1, LoraTarget::kQProj).rank, 12);  // both adapters have q_proj
  EXPECT_EQ(m->module(1, LoraTarget::kKProj).rank, 8);   // only prose has k_proj
  EXPECT_EQ(m->num_params(), r4.num_params() + prose.num_params());
  // Upstream's Σ w A / Σ w B would fail this on every module both adapters have: it adds the
  // cross terms B_i A_j. Bound: float32 rounding of w·s·B (1 ulp) and of the stored values.
  for (LoraTarget t : {LoraTarget::kQProj, LoraTarget::kKProj, LoraTarget::kFc2}) {
    const auto [in, out] = LoraTargetDims(c, t);
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const std::vector<double> got = DeltaW(m->module(l, t), in, out);
      const std::vector<double> w1 = DeltaW(r4.module(l, t), in, out, 0.7);
      const std::vector<double> w2 = DeltaW(prose.module(l, t), in, out, -0.4);
      double worst = 0.0, scale = 0.0;
      for (size_t i = 0; i < got.size(); ++i) {
        worst = std::max(worst, std::fabs(got[i] - (w1[i] + w2[i])));
        scale = std::max(scale, std::fabs(w1[i] + w2[i]));
      }
      EXPECT_LE(worst, 1e-6 * scale) << LoraModuleName(t, l);
    }
  }
}

TEST(MergeAdaptersTest, UnsupportedStrategiesAndBadInput) {
  const PhiConfig c = TinyConfig();
  const LoraAdapter r4 = Fixture(kR4);
  const std::vector<WeightedAdapter> one = {{&r4, 1.0f}};
  for (MergeStrategy s :
       {MergeStrategy::kTies, MergeStrategy::kDareLinear, MergeStrategy::kDareTies}) {
    EXPECT_EQ(MergeAdapters(c, one, s, "m").status().code(), absl::StatusCode::kUnimplemented);
  }
  EXPECT_EQ(MergeAdapters(c, {}, MergeStrategy::kLinear, "m").status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<WeightedAdapter> nan = {{&r4, NAN}};
  EXPECT_EQ(MergeAdapters(c, nan, MergeStrategy::kLinear, "m").status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<WeightedAdapter> null = {{nullptr, 1.0f}};
  EXPECT_EQ(MergeAdapters(c, null, MergeStrategy::kLinear, "m").status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<WeightedAdapter> zero = {{&r4, 0.0f}};
  EXPECT_EQ(MergeAdapters(c, zero, MergeStrategy::kLinear, "m").status().code(),
            absl::StatusCode::kInvalidArgument);
  // A finite weight whose product with the adapter's scale and lora_B overflows float32.
  const std::vector<WeightedAdapter> huge = {{&r4, 3e38f}};
  const absl::Status st = MergeAdapters(c, huge, MergeStrategy::kLinear, "m").status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("overflows float32"));
}

}  // namespace
}  // namespace phishard
