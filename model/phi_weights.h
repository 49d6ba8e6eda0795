// The weights of a PhiForCausalLM as float32 host arrays (CPU backend), loaded from a WeightStore
// with every shape taken from PhiConfig. q/k/v are fused at load into one [q; k; v] projection so a
// layer runs one QKV GEMM. Linear weights keep the HF layout [out, in].
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "model/phi_config.h"
#include "model/safetensors.h"

namespace phishard {

struct PhiLayerWeightsF32 {
  std::vector<float> ln_weight, ln_bias;  // [H], [H]
  std::vector<float> qkv_weight;          // [(nH + 2 nKV) hd, H]: rows of q_proj, k_proj, v_proj
  std::vector<float> qkv_bias;            // [(nH + 2 nKV) hd]
  std::vector<float> dense_weight;        // [H, nH hd]
  std::vector<float> dense_bias;          // [H]
  std::vector<float> fc1_weight;          // [I, H]
  std::vector<float> fc1_bias;            // [I]
  std::vector<float> fc2_weight;          // [H, I]
  std::vector<float> fc2_bias;            // [H]
};

struct PhiWeightsF32 {
  std::vector<float> embed;  // [V, H] model.embed_tokens.weight
  std::vector<PhiLayerWeightsF32> layers;
  std::vector<float> final_ln_weight, final_ln_bias;  // [H]
  // [V, H] lm_head.weight; empty when the head is tied to `embed` (tie_word_embeddings and no
  // lm_head.weight in the checkpoint). Use lm_head() to read it either way.
  std::vector<float> lm_head_weight;
  std::vector<float> lm_head_bias;  // [V] lm_head.bias, or empty when the checkpoint has none

  const float* lm_head() const {
    return lm_head_weight.empty() ? embed.data() : lm_head_weight.data();
  }
  bool lm_head_tied() const { return lm_head_weight.empty(); }
};

// Reads every tensor of spec §6.2 (converted to float32 from F32/F16/BF16). A missing tensor or a
// shape that disagrees with `config` is an error naming the tensor.
absl::StatusOr<PhiWeightsF32> LoadPhiWeightsF32(const WeightStore& store, const PhiConfig& config);

}  // namespace phishard
