#include "model/phi_weights.h"

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace phishard {
namespace {

#define PHI_RETURN_IF_ERROR(expr) \
  do {                            \
    absl::Status _st = (expr);    \
    if (!_st.ok()) return _st;    \
  } while (0)

absl::Status LoadLayer(const WeightStore& store, const PhiConfig& c, int i, PhiLayerWeightsF32* l) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim;
  const int64_t q_out = c.num_attention_heads * hd, kv_out = c.num_key_value_heads * hd;
  const std::string p = absl::StrCat("model.layers.", i, ".");
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "input_layernorm.weight", {H}, &l->ln_weight));
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "input_layernorm.bias", {H}, &l->ln_bias));

  // Fuse q, k, v row blocks into one [(nH + 2 nKV) hd, H] matrix.
  l->qkv_weight.clear();
  l->qkv_bias.clear();
  std::vector<float> w, b;
  for (auto [name, rows] :
       {std::pair<const char*, int64_t>{"q_proj", q_out}, {"k_proj", kv_out}, {"v_proj", kv_out}}) {
    const std::string base = absl::StrCat(p, "self_attn.", name);
    PHI_RETURN_IF_ERROR(store.ReadF32(base + ".weight", {rows, H}, &w));
    PHI_RETURN_IF_ERROR(store.ReadF32(base + ".bias", {rows}, &b));
    l->qkv_weight.insert(l->qkv_weight.end(), w.begin(), w.end());
    l->qkv_bias.insert(l->qkv_bias.end(), b.begin(), b.end());
  }
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "self_attn.dense.weight", {H, q_out}, &l->dense_weight));
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "self_attn.dense.bias", {H}, &l->dense_bias));
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "mlp.fc1.weight", {I, H}, &l->fc1_weight));
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "mlp.fc1.bias", {I}, &l->fc1_bias));
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "mlp.fc2.weight", {H, I}, &l->fc2_weight));
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "mlp.fc2.bias", {H}, &l->fc2_bias));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PhiWeightsF32> LoadPhiWeightsF32(const WeightStore& store, const PhiConfig& c) {
  if (c.hidden_size <= 0 || c.num_attention_heads <= 0 || c.num_key_value_heads <= 0 ||
      c.head_dim <= 0 || c.intermediate_size <= 0 || c.vocab_size <= 0 ||
      c.num_hidden_layers <= 0) {
    return absl::InvalidArgumentError("PhiConfig has a non-positive size; was it parsed?");
  }
  const int64_t H = c.hidden_size, V = c.vocab_size;
  PhiWeightsF32 w;
  PHI_RETURN_IF_ERROR(store.ReadF32("model.embed_tokens.weight", {V, H}, &w.embed));
  w.layers.resize(c.num_hidden_layers);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    PHI_RETURN_IF_ERROR(LoadLayer(store, c, i, &w.layers[i]));
  }
  PHI_RETURN_IF_ERROR(store.ReadF32("model.final_layernorm.weight", {H}, &w.final_ln_weight));
  PHI_RETURN_IF_ERROR(store.ReadF32("model.final_layernorm.bias", {H}, &w.final_ln_bias));
  if (store.Has("lm_head.weight")) {
    PHI_RETURN_IF_ERROR(store.ReadF32("lm_head.weight", {V, H}, &w.lm_head_weight));
  } else if (!c.tie_word_embeddings) {
    return absl::NotFoundError(
        "tensor 'lm_head.weight' is missing and config.json does not set tie_word_embeddings");
  }
  if (store.Has("lm_head.bias")) {
    PHI_RETURN_IF_ERROR(store.ReadF32("lm_head.bias", {V}, &w.lm_head_bias));
  }
  return w;
}

}  // namespace phishard
