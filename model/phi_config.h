// PhiConfig: the single source of every model shape, parsed from a Hugging Face config.json of
// `PhiForCausalLM` (model_type "phi"). Both layouts seen in the wild are accepted:
//   transformers 4.x: top-level `rope_theta`, `partial_rotary_factor`;
//   transformers 5.x: `rope_parameters: {rope_theta, partial_rotary_factor, rope_type}`.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace phishard {

enum class Activation {
  kGeluTanh,  // gelu_new, gelu_pytorch_tanh, gelu_fast: 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3)))
  kGeluErf,   // gelu: exact erf GELU
};

struct PhiConfig {
  std::string model_type;        // "phi"
  int hidden_size = 0;           // H
  int num_attention_heads = 0;   // nH
  int num_key_value_heads = 0;   // nKV (defaults to nH; GQA when smaller)
  int num_hidden_layers = 0;     // L
  int intermediate_size = 0;     // I
  int vocab_size = 0;            // V (rows of embed_tokens / lm_head)
  int head_dim = 0;              // H / nH
  int rotary_dim = 0;            // int(partial_rotary_factor * head_dim), even
  double partial_rotary_factor = 0.5;
  double rope_theta = 10000.0;
  // Linear RoPE scaling (rope_scaling / rope_parameters {"rope_type": "linear", "factor": f}):
  // inv_freq / f, i.e. positions / f. 1: none.
  double rope_linear_factor = 1.0;
  float layer_norm_eps = 1e-5f;
  Activation hidden_act = Activation::kGeluTanh;
  std::string hidden_act_name;   // as written in config.json
  bool tie_word_embeddings = false;
  // HF PhiConfig.qk_layernorm: a LayerNorm over head_dim (weights shared by the heads, eps
  // layer_norm_eps) on every q and every k head after the projections, before the rotary
  // (model.layers.N.self_attn.{q,k}_layernorm.{weight,bias}).
  bool qk_layernorm = false;
  int max_position_embeddings = 2048;
  std::string torch_dtype;       // "float16", "bfloat16", "float32" or "" when absent
  std::vector<int> eos_token_ids;  // from config.json eos_token_id (int or list); may be empty
  // True when eos_token_ids came from a JSON *list* in generation_config.json: the one case in
  // which upstream LoRAX stops on these ids rather than the tokenizer's eos token (spec §5.7).
  bool eos_token_ids_from_generation_list = false;
  std::optional<int> bos_token_id;
};

// Parses config.json text. `source` names the file in error messages.
absl::StatusOr<PhiConfig> ParsePhiConfig(std::string_view json_text, std::string_view source);
// Reads DIR/config.json (and DIR/generation_config.json for eos ids when present: they replace
// config.json's).
absl::StatusOr<PhiConfig> LoadPhiConfig(const std::filesystem::path& model_dir);

}  // namespace phishard
