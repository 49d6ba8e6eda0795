// Partial rotary embedding (GPT-NeoX "rotate half") on Q and K, fused with writing K and V into
// the paged KV cache.
//
// `qkv` is the fused projection output, one row per new token:
//   [num_tokens, qkv_stride], row t = [ q: num_heads x head_dim | k: num_kv_heads x head_dim |
//                                       v: num_kv_heads x head_dim | (unused up to qkv_stride) ]
// For every Q and K head, only dims [0, rotary_dim) rotate; [rotary_dim, head_dim) pass through.
// With half = rotary_dim / 2, j in [0, half):
//   inv_freq[j] = theta^(-2j / rotary_dim)      (float32; then / rope_factor when it is not 1:
//                                                  linear RoPE scaling)
//   angle       = positions[t] * inv_freq[j]    (float32), cos/sin of it in float32
//   x1 = x[j], x2 = x[j + half]
//   x[j]        = x1 * cos - x2 * sin
//   x[j + half] = x2 * cos + x1 * sin
// Q and K are rotated in place in `qkv`; then the rotated K and the V of token t are copied to slot
// slots[t] of the cache. One layer's cache is K and V, each [num_blocks, num_kv_heads,
// block_size, head_dim] (kernels/kv_layout.h: KvSlotOffset); the slot of position p of a sequence
// is block_table[p / block_size] * block_size + p % block_size (the caller computes it).
// Optional per-head LayerNorm first (HF PhiConfig.qk_layernorm, see q_norm_w below).
// All slots are checked before anything is written: on error neither qkv nor the cache changes.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct RotaryKvWriteParams {
  void* qkv = nullptr;                 // [num_tokens, qkv_stride], dtype, rotated in place
  const int32_t* positions = nullptr;  // [num_tokens] absolute positions (>= 0)
  const int64_t* slots = nullptr;      // [num_tokens] cache slot of each token, in [0, num_slots)
  void* k_cache = nullptr;             // [num_blocks, num_kv_heads, block_size, head_dim], dtype
  void* v_cache = nullptr;             // [num_blocks, num_kv_heads, block_size, head_dim], dtype
  int64_t num_slots = 0;               // num_blocks * block_size
  int block_size = 0;                  // tokens a block (>= 1, divides num_slots) when writing
  int num_tokens = 0;
  int qkv_stride = 0;  // 0 means (num_heads + 2 * num_kv_heads) * head_dim
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int rotary_dim = 0;  // even, in [0, head_dim]; 0 disables rotation
  float theta = 10000.0f;
  float rope_factor = 1.0f;  // linear RoPE scaling: inv_freq / rope_factor (> 0)
  DataType dtype = DataType::kF32;
  // Optional fold (LoRA decode steps, model/cuda_lora.h): when set, every element of q, k and v
  // first becomes qkv + fold_delta (float32 add, rounded once to dtype), and the whole q | k | v
  // row is written back to qkv (rotated where it rotates) before K and V go to the cache: the
  // same bits as SgmvFold into qkv followed by the plain launch.
  const float* fold_delta = nullptr;  // [num_tokens, ld_fold] float32, columns as qkv's q | k | v
  int ld_fold = 0;                    // 0 means (num_heads + 2 * num_kv_heads) * head_dim
  // false: rotate Q and K in place only; the cache is not touched (k_cache / v_cache may be null,
  // slots are still checked when given). A prefill whose attention kernel stores the new K/V
  // itself (PagedAttentionCudaPlan::store_new_kv) uses it.
  bool write_cache = true;
  // Optional per-head LayerNorm (HF q_layernorm / k_layernorm, PhiConfig::qk_layernorm): when
  // q_norm_w is set, each Q head and each K head x (head_dim values, after the fold) becomes
  //   y = (x - mean) * rsqrt(var + norm_eps) * w + b   (float32; var biased; w, b shared by the
  //                                                     heads: q_norm_* for Q, k_norm_* for K)
  // rounded once to dtype; then y rotates as above, and every element of the Q and K heads is
  // written back to qkv. All four pointers [head_dim] float32, in the memory space of qkv.
  const float* q_norm_w = nullptr;
  const float* q_norm_b = nullptr;
  const float* k_norm_w = nullptr;
  const float* k_norm_b = nullptr;
  float norm_eps = 1e-5f;
};

// Host memory, kF32 only. kInvalidShape when ld_fold is below the q | k | v width; kNullPointer
// when q_norm_w is set and one of the other three norm pointers is not.
KernelStatus RotaryKvWriteCpu(const RotaryKvWriteParams& p);

}  // namespace phishard
