// LoraAdapter: one PEFT LoRA adapter for PhiForCausalLM, loaded from a local directory
// (adapter_config.json + *.safetensors, what peft's save_pretrained writes) and validated against
// the base model's PhiConfig. Host memory, float32 (converted from F32/F16/BF16 at load).
//
// Math (PEFT, unmerged): for a target nn.Linear y = W x + b, the adapted module computes
//   y = W x + b + scale · B (A x),   A = lora_A.weight [r, in], B = lora_B.weight [out, r],
//   scale = alpha / r, or alpha / sqrt(r) with use_rslora,
// with r and alpha per module (rank_pattern / alpha_pattern override the defaults). The scale
// always uses the module's own r: upstream LoRAX's rank padding that rescales by a padded r is a
// bug (spec §7.5) and is not reproduced.
//
// Targets: self_attn.{q_proj,k_proj,v_proj,dense}, mlp.{fc1,fc2} of every layer, and lm_head.
// Nothing is dropped silently: a tensor that maps onto no supported module, a targeted module
// without its A/B pair, an A without its B, a rank or shape that disagrees with the config or the
// base model, and every PEFT feature that changes the math and is not implemented (DoRA,
// modules_to_save, trained biases, embedding LoRA, ...) is an error naming the file, tensor or
// field.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/phi_config.h"

namespace phishard {

enum class LoraTarget : int { kQProj = 0, kKProj, kVProj, kDense, kFc1, kFc2, kLmHead };
inline constexpr int kNumLoraTargets = 7;
// The per-layer targets (everything but lm_head), in the order above.
inline constexpr int kNumLayerLoraTargets = 6;
inline constexpr std::array<LoraTarget, kNumLoraTargets> kAllLoraTargets = {
    LoraTarget::kQProj, LoraTarget::kKProj, LoraTarget::kVProj, LoraTarget::kDense,
    LoraTarget::kFc1,   LoraTarget::kFc2,   LoraTarget::kLmHead};

// "q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head".
std::string_view LoraTargetName(LoraTarget t);
// The module's full name in PhiForCausalLM: "model.layers.3.self_attn.q_proj", "lm_head".
std::string LoraModuleName(LoraTarget t, int layer);
// {in_features, out_features} of the base nn.Linear the target adapts (world size 1).
std::pair<int64_t, int64_t> LoraTargetDims(const PhiConfig& c, LoraTarget t);

// The low-rank pair of one module. rank 0 = the module is not adapted (a and b empty).
struct LoraModule {
  int rank = 0;
  float scale = 0.0f;    // applied at expand time, not folded into b
  std::vector<float> a;  // [rank, in] host float32 (lora_A.weight)
  std::vector<float> b;  // [out, rank] host float32 (lora_B.weight)

  bool present() const { return rank > 0; }
  int64_t num_params() const { return static_cast<int64_t>(a.size() + b.size()); }
};

// The adapter_config.json fields that decide which modules are adapted and how.
struct LoraAdapterConfig {
  int r = 8;
  double lora_alpha = 8.0;
  bool use_rslora = false;
  bool fan_in_fan_out = false;  // meaningless for nn.Linear (PEFT resets it to false); warned
  // target_modules: a list (a module matches when its name equals an entry or ends with
  // "." + entry), or a regex string that must match the whole module name. "all-linear" expands
  // to every linear layer but the output head. null means PEFT's default for phi.
  std::vector<std::string> target_list;
  std::optional<std::string> target_regex;
  // exclude_modules, same two forms; a matching module is never adapted.
  std::vector<std::string> exclude_list;
  std::optional<std::string> exclude_regex;
  // rank_pattern / alpha_pattern in file order: the first key K for which the module name matches
  // the regex "(.*\.)?(K)$" gives that module's r / alpha (PEFT's get_pattern_key).
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  // layers_to_transform (int or list) and layers_pattern (string or list), PEFT semantics.
  std::optional<std::vector<int>> layers_to_transform;
  std::vector<std::string> layers_pattern;
  std::string base_model_name_or_path;
};

// Parses adapter_config.json text; `source` names the file in error messages. Rejects what is not
// a plain LoRA adapter: peft_type != LORA, DoRA (UNIMPLEMENTED "DoRA adapters are not supported"),
// modules_to_save, bias != "none", lora_bias, layer_replication, target_parameters,
// trainable_token_indices, aLoRA, QALoRA (all UNIMPLEMENTED); malformed JSON or fields are
// INVALID_ARGUMENT naming the field.
absl::StatusOr<LoraAdapterConfig> ParseLoraAdapterConfig(std::string_view json_text,
                                                         std::string_view source);

// Whether `config` adapts module `module_name` (a full PhiForCausalLM name), and with which r and
// alpha. Exposed for tests. INVALID_ARGUMENT when a regex of the config does not compile.
struct LoraModuleSpec {
  bool targeted = false;
  int r = 0;
  double alpha = 0.0;
};
absl::StatusOr<LoraModuleSpec> ResolveLoraModule(const LoraAdapterConfig& config,
                                                 std::string_view module_name);

class LoraAdapter {
 public:
  // An adapter with no module yet, for `num_layers` decoder layers (merges and tests fill it with
  // SetModule).
  LoraAdapter(std::string name, int num_layers);

  // Loads `dir` for a base model with config `base`: its *.safetensors, else the PyTorch
  // checkpoint adapter_model.bin (model/torch_checkpoint.h). NOT_FOUND: the directory, its
  // adapter_config.json or both weight forms are missing; the other errors as described at the
  // top of this file.
  static absl::StatusOr<LoraAdapter> LoadDir(const std::filesystem::path& dir,
                                             const PhiConfig& base);

  // Sets (or, with rank 0, clears) one module after checking a/b sizes against `base`
  // (layer is ignored for lm_head). INVALID_ARGUMENT naming the module otherwise.
  absl::Status SetModule(const PhiConfig& base, int layer, LoraTarget t, LoraModule m);

  const std::string& name() const { return name_; }
  int num_layers() const { return static_cast<int>(layers_.size()); }
  // The pair of `t` in `layer` (layer ignored for lm_head); rank 0 when not adapted.
  const LoraModule& module(int layer, LoraTarget t) const;
  // True when some layer adapts `t`.
  bool has_target(LoraTarget t) const;
  int max_rank() const;
  // Elements of all A and B matrices (memory = num_params x bytes per element of the compute
  // dtype).
  int64_t num_params() const;
  // "q_proj,v_proj,fc2 (r 4, scale 2)" style summary for logs.
  std::string Describe() const;

 private:
  std::string name_;
  std::vector<std::array<LoraModule, kNumLayerLoraTargets>> layers_;
  LoraModule lm_head_;
};

}  // namespace phishard
