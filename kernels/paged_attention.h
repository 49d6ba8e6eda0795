// Causal attention of a varlen batch over a paged KV cache: ONE code path for prefill (many new
// tokens per sequence, possibly after a cached prefix) and decode (one new token per sequence).
//
// Sequence s owns query rows [cu_q_lens[s], cu_q_lens[s + 1]) (q_len = their count, >= 1) and has
// context_lens[s] tokens in the cache after this step, their K/V already written (see
// rotary_kv_write.h). Query row j of s sits at position pos = context_lens[s] - q_len + j and
// attends to cache positions [0, pos]. Position c of s lives in slot
//   block_tables[s * max_blocks_per_seq + c / block_size] * block_size + c % block_size,
// its head kvh at KvSlotOffset(slot, kvh, ...) of each cache (kernels/kv_layout.h).
// Query head h reads KV head h / (num_heads / num_kv_heads) (GQA; MHA when equal).
//   out[t, h, :] = softmax_c(scale * q[t, h, :] · K[c, kvh, :]) · V[c, kvh, :]
// Scores, softmax and the weighted sum are float32 or wider.
// Shapes, block ids and sizes are all checked before anything is written.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct PagedAttentionParams {
  const void* q = nullptr;  // [num_tokens, q_stride]; head h of row t at t*q_stride + h*head_dim
  const void* k_cache = nullptr;          // [num_blocks, num_kv_heads, block_size, head_dim], dtype
  const void* v_cache = nullptr;          // [num_blocks, num_kv_heads, block_size, head_dim], dtype
  void* out = nullptr;                    // [num_tokens, num_heads * head_dim], dtype
  const int32_t* cu_q_lens = nullptr;     // [num_seqs + 1], cu_q_lens[0] = 0, last = num_tokens
  const int32_t* context_lens = nullptr;  // [num_seqs]
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq] row-major
  int num_seqs = 0;
  int num_tokens = 0;
  int max_blocks_per_seq = 0;
  int num_blocks = 0;
  int block_size = 0;
  int num_heads = 0;
  int num_kv_heads = 0;  // divides num_heads
  int head_dim = 0;
  int q_stride = 0;    // 0 means num_heads * head_dim
  float scale = 0.0f;  // usually 1 / sqrt(head_dim)
  DataType dtype = DataType::kF32;
};

// Host memory, kF32 only.
KernelStatus PagedAttentionCpu(const PagedAttentionParams& p);

}  // namespace phishard
