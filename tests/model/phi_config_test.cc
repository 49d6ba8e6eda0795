// Tests for model/phi_config: both config layouts (transformers 4.x and 5.x) with the real
// Phi-1.5 / Phi-2 values, HF defaults, every validation error (names the file and the field),
// generation_config.json overriding eos ids.
#include "model/phi_config.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// microsoft/phi-2 config.json as published (transformers 4.37 layout).
json Phi2Config() {
  return json::parse(R"({
    "_name_or_path": "microsoft/phi-2",
    "architectures": ["PhiForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "embd_pdrop": 0.0,
    "eos_token_id": 50256,
    "hidden_act": "gelu_new",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "qk_layernorm": false,
    "resid_pdrop": 0.1,
    "rope_scaling": null,
    "rope_theta": 10000.0,
    "tie_word_embeddings": false,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": true,
    "vocab_size": 51200
  })");
}

// microsoft/phi-1_5 config.json values (HF layout); null num_key_value_heads and eos ids exercise
// the "null means default" rule.
json Phi15Config() {
  return json::parse(R"({
    "architectures": ["PhiForCausalLM"],
    "bos_token_id": null,
    "eos_token_id": null,
    "hidden_act": "gelu_new",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 24,
    "num_key_value_heads": null,
    "partial_rotary_factor": 0.5,
    "qk_layernorm": false,
    "rope_scaling": null,
    "rope_theta": 10000.0,
    "tie_word_embeddings": false,
    "torch_dtype": "float16",
    "vocab_size": 51200
  })");
}

// Phi-2 as transformers 5.x writes it: rope_parameters, `dtype`, no top-level rope fields.
json Phi2ConfigV5() {
  json j = Phi2Config();
  j.erase("rope_theta");
  j.erase("partial_rotary_factor");
  j.erase("rope_scaling");
  j.erase("torch_dtype");
  j["dtype"] = "float16";
  j["rope_parameters"] = {
      {"rope_theta", 10000.0}, {"partial_rotary_factor", 0.4}, {"rope_type", "default"}};
  return j;
}

absl::StatusOr<PhiConfig> Parse(const json& j) { return ParsePhiConfig(j.dump(), "cfg.json"); }

// Expects `j` to be rejected with `code`, the message naming the source and every needle.
void ExpectError(const json& j, absl::StatusCode code, const std::vector<std::string>& needles) {
  auto c = Parse(j);
  ASSERT_FALSE(c.ok()) << "accepted: " << j.dump();
  EXPECT_EQ(c.status().code(), code) << c.status();
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("cfg.json"));
  for (const auto& n : needles) {
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(n)) << j.dump();
  }
}

TEST(PhiConfig, Phi2TransformersV4) {
  auto c = Parse(Phi2Config());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "phi");
  EXPECT_EQ(c->hidden_size, 2560);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->num_hidden_layers, 32);
  EXPECT_EQ(c->intermediate_size, 10240);
  EXPECT_EQ(c->vocab_size, 51200);
  EXPECT_EQ(c->head_dim, 80);
  EXPECT_EQ(c->rotary_dim, 32);  // int(0.4 * 80) = int(32.000000000000004)
  EXPECT_DOUBLE_EQ(c->partial_rotary_factor, 0.4);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_FLOAT_EQ(c->layer_norm_eps, 1e-5f);
  EXPECT_EQ(c->hidden_act, Activation::kGeluTanh);
  EXPECT_EQ(c->hidden_act_name, "gelu_new");
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->qk_layernorm);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_EQ(c->torch_dtype, "float16");
  EXPECT_THAT(c->eos_token_ids, ElementsAre(50256));
  EXPECT_EQ(c->bos_token_id, 50256);
}

TEST(PhiConfig, Phi15TransformersV4) {
  auto c = Parse(Phi15Config());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 2048);
  EXPECT_EQ(c->num_hidden_layers, 24);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 32);  // null -> num_attention_heads
  EXPECT_EQ(c->intermediate_size, 8192);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->rotary_dim, 32);
  EXPECT_TRUE(c->eos_token_ids.empty());
  EXPECT_FALSE(c->bos_token_id.has_value());
}

TEST(PhiConfig, Phi2TransformersV5) {
  auto c = Parse(Phi2ConfigV5());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rotary_dim, 32);
  EXPECT_DOUBLE_EQ(c->partial_rotary_factor, 0.4);
  EXPECT_EQ(c->torch_dtype, "float16");
  // rope_parameters wins over the defaults, not just matches them.
  json j = Phi2ConfigV5();
  j["rope_parameters"]["rope_theta"] = 5000.0;
  j["rope_parameters"]["partial_rotary_factor"] = 0.25;
  auto d = Parse(j);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_DOUBLE_EQ(d->rope_theta, 5000.0);
  EXPECT_EQ(d->rotary_dim, 20);
}

TEST(PhiConfig, TinyPhiCodeTransformersV5) {
  auto c = LoadPhiConfig(fs::path(PHISHARD_MODELS) / "tiny-phi-code");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 256);
  EXPECT_EQ(c->num_attention_heads, 8);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->num_hidden_layers, 4);
  EXPECT_EQ(c->intermediate_size, 1024);
  EXPECT_EQ(c->vocab_size, 4095);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->rotary_dim, 16);
  EXPECT_EQ(c->max_position_embeddings, 1024);
  EXPECT_EQ(c->torch_dtype, "bfloat16");  // written as "dtype" by transformers 5
  EXPECT_THAT(c->eos_token_ids, ElementsAre(0));
  EXPECT_EQ(c->bos_token_id, 0);
}

TEST(PhiConfig, DefaultsFollowHuggingFace) {
  json j = {{"model_type", "phi"},    {"hidden_size", 256},       {"num_attention_heads", 4},
            {"num_hidden_layers", 2}, {"intermediate_size", 512}, {"vocab_size", 100}};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_FLOAT_EQ(c->layer_norm_eps, 1e-5f);
  EXPECT_DOUBLE_EQ(c->partial_rotary_factor, 0.5);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->hidden_act, Activation::kGeluTanh);
  EXPECT_EQ(c->hidden_act_name, "gelu_new");
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->torch_dtype, "");
  EXPECT_EQ(c->rotary_dim, 32);
}

TEST(PhiConfig, ModelTypeMustBePhi) {
  for (const char* t : {"phi-msft", "phi3", "llama", ""}) {
    json j = Phi2Config();
    j["model_type"] = t;
    ExpectError(j, absl::StatusCode::kInvalidArgument, {"model_type", absl::StrCat("\"", t, "\"")});
  }
  json j = Phi2Config();
  j.erase("model_type");
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"model_type", "missing"});
  j["model_type"] = 3;
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"model_type", "string"});
}

TEST(PhiConfig, RequiredFields) {
  for (const char* f : {"hidden_size", "num_attention_heads", "num_hidden_layers",
                        "intermediate_size", "vocab_size"}) {
    json j = Phi2Config();
    j.erase(f);
    ExpectError(j, absl::StatusCode::kInvalidArgument, {absl::StrCat("'", f, "'"), "missing"});
    j[f] = nullptr;
    ExpectError(j, absl::StatusCode::kInvalidArgument, {absl::StrCat("'", f, "'"), "missing"});
  }
}

TEST(PhiConfig, WrongTypesNameTheField) {
  const std::vector<std::pair<std::string, json>> bad = {{"hidden_size", "2560"},
                                                         {"hidden_size", 2560.5},
                                                         {"hidden_size", 0},
                                                         {"num_hidden_layers", -1},
                                                         {"vocab_size", 4294967296LL},
                                                         {"layer_norm_eps", "1e-5"},
                                                         {"layer_norm_eps", 0},
                                                         {"layer_norm_eps", 1e-85},
                                                         {"layer_norm_eps", 1e300},
                                                         {"rope_theta", -1.0},
                                                         {"partial_rotary_factor", true},
                                                         {"tie_word_embeddings", "false"},
                                                         {"qk_layernorm", 0},
                                                         {"hidden_act", 5},
                                                         {"eos_token_id", "x"},
                                                         {"eos_token_id", json::array({1, -2})},
                                                         {"bos_token_id", json::array({1, 2})},
                                                         {"torch_dtype", "int8"},
                                                         {"max_position_embeddings", 1.5},
                                                         {"rope_scaling", "linear"},
                                                         {"num_key_value_heads", "32"}};
  for (const auto& [field, value] : bad) {
    json j = Phi2Config();
    j[field] = value;
    ExpectError(j, absl::StatusCode::kInvalidArgument, {absl::StrCat("'", field, "'")});
  }
}

TEST(PhiConfig, NotJsonOrNotObject) {
  auto c = ParsePhiConfig("{\"model_type\": \"phi\",", "broken.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()),
              AllOf(HasSubstr("broken.json"), HasSubstr("JSON")));
  c = ParsePhiConfig("[1, 2]", "arr.json");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()), AllOf(HasSubstr("arr.json"), HasSubstr("object")));
}

TEST(PhiConfig, KeyValueHeads) {
  json j = Phi2Config();
  j["num_key_value_heads"] = 8;  // GQA
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 8);
  j["num_key_value_heads"] = 5;
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"num_key_value_heads", "5"});
  // Legacy spelling honoured when the HF one is absent.
  j.erase("num_key_value_heads");
  j["n_head_kv"] = 4;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 4);
}

TEST(PhiConfig, DerivedShapeChecks) {
  json j = Phi2Config();
  j["hidden_size"] = 2561;
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"hidden_size", "2561", "divisible"});
  j = Phi15Config();
  j["partial_rotary_factor"] = 0.3;  // int(0.3 * 64) = 19: odd
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"partial_rotary_factor", "19"});
  j["partial_rotary_factor"] = 1.5;
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"partial_rotary_factor"});
  j["partial_rotary_factor"] = 0.01;  // rotary_dim 0
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"partial_rotary_factor"});
  j["partial_rotary_factor"] = 1.0;  // full rotary is fine
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rotary_dim, 64);
}

TEST(PhiConfig, UnsupportedFeaturesAreUnimplemented) {
  json j = Phi2Config();
  j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  ExpectError(j, absl::StatusCode::kUnimplemented, {"rope_scaling.type", "dynamic"});
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 2.0}};
  ExpectError(j, absl::StatusCode::kUnimplemented, {"rope_scaling.rope_type", "llama3"});
  j = Phi2ConfigV5();
  j["rope_parameters"]["rope_type"] = "yarn";
  ExpectError(j, absl::StatusCode::kUnimplemented, {"rope_parameters.rope_type", "yarn"});
  j = Phi2Config();
  j["quantization_config"] = {{"quant_method", "gptq"}};
  ExpectError(j, absl::StatusCode::kUnimplemented, {"quantization_config"});
}

TEST(PhiConfig, QkLayerNormParsed) {
  json j = Phi2Config();
  j["qk_layernorm"] = true;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qk_layernorm);
  j["qk_layernorm"] = nullptr;  // HF's default
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->qk_layernorm);
}

// Linear RoPE scaling in both layouts (4.x rope_scaling with "type", 5.x rope_parameters with
// "rope_type"); rope_parameters wins over a stale rope_scaling; the factor is required.
TEST(PhiConfig, LinearRopeScalingParsed) {
  json j = Phi2Config();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.5}};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_linear_factor, 2.5);
  j = Phi2ConfigV5();
  j["rope_parameters"]["rope_type"] = "linear";
  j["rope_parameters"]["factor"] = 4;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_linear_factor, 4.0);
  j["rope_parameters"].erase("factor");
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"rope_parameters.factor", "missing"});
  j["rope_parameters"]["factor"] = -2.0;
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"rope_parameters.factor"});
}

TEST(PhiConfig, IdentityRopeScalingAccepted) {
  json j = Phi2Config();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 1.0}};
  EXPECT_TRUE(Parse(j).ok());
  j["rope_scaling"] = {{"rope_type", "default"}};
  EXPECT_TRUE(Parse(j).ok());
  EXPECT_EQ(Parse(j)->rope_linear_factor, 1.0);
}

TEST(PhiConfig, RopeParametersWinOverStaleTopLevel) {
  json j = Phi2ConfigV5();
  // transformers 5.x writes a stale top-level default next to rope_parameters and reads only
  // rope_parameters: so must we.
  j["partial_rotary_factor"] = 0.5;  // top level disagrees with rope_parameters (0.4)
  auto c = ParsePhiConfig(j.dump(), "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->partial_rotary_factor, 0.4);
  EXPECT_EQ(c->rotary_dim, 32);
  j["rope_parameters"] = "default";
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"rope_parameters"});
}

TEST(PhiConfig, Activations) {
  const std::vector<std::pair<std::string, Activation>> ok = {
      {"gelu_new", Activation::kGeluTanh},  {"gelu_pytorch_tanh", Activation::kGeluTanh},
      {"gelu_fast", Activation::kGeluTanh}, {"gelu_accurate", Activation::kGeluTanh},
      {"gelu", Activation::kGeluErf},       {"gelu_python", Activation::kGeluErf}};
  for (const auto& [name, act] : ok) {
    json j = Phi2Config();
    j["hidden_act"] = name;
    auto c = Parse(j);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->hidden_act, act) << name;
    EXPECT_EQ(c->hidden_act_name, name);
  }
  json j = Phi2Config();
  j["hidden_act"] = "relu";
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"hidden_act", "relu"});
}

TEST(PhiConfig, DtypeSpellings) {
  json j = Phi2ConfigV5();
  j["dtype"] = "bfloat16";
  EXPECT_EQ(Parse(j)->torch_dtype, "bfloat16");
  j["torch_dtype"] = "torch.float32";  // torch_dtype preferred when both are written
  EXPECT_EQ(Parse(j)->torch_dtype, "float32");
  j.erase("torch_dtype");
  j["dtype"] = "float64";
  ExpectError(j, absl::StatusCode::kInvalidArgument, {"'dtype'", "float64"});
}

TEST(PhiConfig, EosTokenList) {
  json j = Phi2Config();
  j["eos_token_id"] = {50256, 50295};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(50256, 50295));
}

// ---------------------------------------------------------------------------------------------
// LoadPhiConfig: files on disk.

class LoadPhiConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "phishard_cfg_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
  }
  fs::path dir_;
};

TEST_F(LoadPhiConfigTest, MissingConfig) {
  auto c = LoadPhiConfig(dir_);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(dir_.string()));
}

TEST_F(LoadPhiConfigTest, ErrorsNameTheFile) {
  json j = Phi2Config();
  j["hidden_size"] = "big";
  Write("config.json", j.dump());
  auto c = LoadPhiConfig(dir_);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(std::string(c.status().message()),
              AllOf(HasSubstr((dir_ / "config.json").string()), HasSubstr("'hidden_size'")));
}

TEST_F(LoadPhiConfigTest, GenerationConfigEosWins) {
  Write("config.json", Phi2Config().dump());
  auto c = LoadPhiConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(50256));

  EXPECT_FALSE(c->eos_token_ids_from_generation_list);

  Write("generation_config.json", R"({"eos_token_id": [50256, 7], "max_length": 20})");
  c = LoadPhiConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(50256, 7));
  EXPECT_TRUE(c->eos_token_ids_from_generation_list);  // the one form upstream stops on

  Write("generation_config.json", R"({"eos_token_id": 3})");
  c = LoadPhiConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(3));
  EXPECT_FALSE(c->eos_token_ids_from_generation_list);

  // No eos in generation_config: config.json's stays.
  Write("generation_config.json", R"({"do_sample": false})");
  c = LoadPhiConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(50256));
}

TEST_F(LoadPhiConfigTest, BadGenerationConfig) {
  Write("config.json", Phi2Config().dump());
  const fs::path gen = dir_ / "generation_config.json";
  for (const char* text : {"{not json", "[50256]", R"({"eos_token_id": "eos"})"}) {
    Write("generation_config.json", text);
    auto c = LoadPhiConfig(dir_);
    ASSERT_FALSE(c.ok()) << text;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(gen.string())) << text;
  }
}

}  // namespace
}  // namespace phishard
