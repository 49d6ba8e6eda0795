// The rotary + K/V write parameters (kernels/rotary_kv_write.h) that a model's config fixes: head
// counts and size, the RoPE (rotary_dim, theta, linear scaling) and the q / k LayerNorm's eps. One
// place, so the CPU and CUDA backends cannot read a RoPE or norm field differently.
#pragma once

#include "kernels/rotary_kv_write.h"
#include "model/phi_config.h"

namespace phishard {

// `c` is the config the rank computes with (LocalPhiConfig: its heads). The caller sets the
// buffers, token count, cache geometry, dtype and (PhiConfig::qk_layernorm) the norm weights.
inline RotaryKvWriteParams RotaryParamsOf(const PhiConfig& c) {
  RotaryKvWriteParams p;
  p.num_heads = c.num_attention_heads;
  p.num_kv_heads = c.num_key_value_heads;
  p.head_dim = c.head_dim;
  p.rotary_dim = c.rotary_dim;
  p.theta = static_cast<float>(c.rope_theta);
  p.rope_factor = static_cast<float>(c.rope_linear_factor);
  p.norm_eps = c.layer_norm_eps;
  return p;
}

}  // namespace phishard
