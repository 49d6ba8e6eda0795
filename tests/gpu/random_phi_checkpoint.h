// A random HF PhiForCausalLM checkpoint of any shape written by a test: config.json and an F32
// model.safetensors in a directory, so CUDA-vs-CPU tests can cover head dims and rotary sizes
// that no checked-in fixture has. Weights are drawn with tools/gen_golden.py's scales (activations
// O(1), logits spread with std ~6, every bias and LayerNorm parameter non-zero), the regime the
// bf16 bounds of cuda_model_test_util.h were derived for.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>

#include "nlohmann/json.hpp"
#include "tests/model/lora_test_util.h"

namespace phishard::model_test {

struct RandomPhiShape {
  int hidden_size, num_attention_heads, num_key_value_heads, intermediate_size;
  double partial_rotary_factor;
  int num_hidden_layers = 2;
  int vocab_size = 512;
  uint32_t seed = 1;
};

// Writes config.json + model.safetensors of shape `s` into `dir` (created).
inline void WriteRandomPhiCheckpoint(const std::filesystem::path& dir, const RandomPhiShape& s) {
  using lora_test::Tensor;
  const int H = s.hidden_size, I = s.intermediate_size, V = s.vocab_size;
  const int hd = H / s.num_attention_heads;
  const int q_rows = s.num_attention_heads * hd, kv_rows = s.num_key_value_heads * hd;
  std::mt19937 rng(s.seed);
  lora_test::TensorMap t;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float mean, float std) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::normal_distribution<float> dist(mean, std);
    Tensor& x = t[name];
    x.shape = std::move(shape);
    x.data.resize(n);
    for (float& v : x.data) v = dist(rng);
  };
  auto linear = [&](const std::string& name, int out, int in, float w_std) {
    add(name + ".weight", {out, in}, 0.0f, w_std);
    add(name + ".bias", {out}, 0.0f, 0.1f);
  };
  auto layer_norm = [&](const std::string& name) {
    add(name + ".weight", {H}, 1.0f, 0.1f);
    add(name + ".bias", {H}, 0.0f, 0.1f);
  };
  add("model.embed_tokens.weight", {V, H}, 0.0f, 1.0f);
  const float in_h = 1.0f / std::sqrt(static_cast<float>(H));
  for (int l = 0; l < s.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    layer_norm(p + "input_layernorm");
    linear(p + "self_attn.q_proj", q_rows, H, 1.5f * in_h);  // peakier attention than uniform
    linear(p + "self_attn.k_proj", kv_rows, H, 1.5f * in_h);
    linear(p + "self_attn.v_proj", kv_rows, H, in_h);
    linear(p + "self_attn.dense", H, q_rows, 1.0f / std::sqrt(static_cast<float>(q_rows)));
    linear(p + "mlp.fc1", I, H, in_h);
    linear(p + "mlp.fc2", H, I, 1.0f / std::sqrt(static_cast<float>(I)));
  }
  layer_norm("model.final_layernorm");
  add("lm_head.weight", {V, H}, 0.0f, 6.0f * in_h);
  add("lm_head.bias", {V}, 0.0f, 0.5f);
  const nlohmann::json config = {{"architectures", {"PhiForCausalLM"}},
                                 {"model_type", "phi"},
                                 {"hidden_size", H},
                                 {"num_attention_heads", s.num_attention_heads},
                                 {"num_key_value_heads", s.num_key_value_heads},
                                 {"num_hidden_layers", s.num_hidden_layers},
                                 {"intermediate_size", I},
                                 {"vocab_size", V},
                                 {"partial_rotary_factor", s.partial_rotary_factor},
                                 {"rope_theta", 10000.0},
                                 {"layer_norm_eps", 1e-5},
                                 {"hidden_act", "gelu_new"},
                                 {"max_position_embeddings", 256},
                                 {"tie_word_embeddings", false},
                                 {"torch_dtype", "float32"}};
  std::filesystem::create_directories(dir);
  lora_test::WriteText(dir / "config.json", config.dump(1));
  lora_test::WriteSafetensors(dir / "model.safetensors", t);
}

}  // namespace phishard::model_test
