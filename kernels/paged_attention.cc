#include "kernels/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/kv_layout.h"

namespace phishard {
namespace {

KernelStatus Validate(const PagedAttentionParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.num_seqs < 0 || p.num_tokens < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 ||
      p.head_dim <= 0 || p.block_size <= 0 || p.num_blocks < 0 || p.max_blocks_per_seq < 0 ||
      p.num_heads % p.num_kv_heads != 0) {
    return KernelStatus::kInvalidShape;
  }
  const int q_stride = p.q_stride == 0 ? p.num_heads * p.head_dim : p.q_stride;
  if (q_stride < p.num_heads * p.head_dim) return KernelStatus::kInvalidShape;
  if (p.num_seqs == 0) return p.num_tokens == 0 ? KernelStatus::kOk : KernelStatus::kInvalidShape;
  if (!p.q || !p.k_cache || !p.v_cache || !p.out || !p.cu_q_lens || !p.context_lens ||
      !p.block_tables) {
    return KernelStatus::kNullPointer;
  }
  if (p.cu_q_lens[0] != 0 || p.cu_q_lens[p.num_seqs] != p.num_tokens) {
    return KernelStatus::kInvalidShape;
  }
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = p.cu_q_lens[s + 1] - p.cu_q_lens[s];
    const int ctx = p.context_lens[s];
    if (q_len < 1 || ctx < q_len) return KernelStatus::kInvalidShape;
    const int64_t blocks = (static_cast<int64_t>(ctx) + p.block_size - 1) / p.block_size;
    if (blocks > p.max_blocks_per_seq) return KernelStatus::kInvalidShape;
    const int32_t* table = p.block_tables + static_cast<size_t>(s) * p.max_blocks_per_seq;
    for (int64_t b = 0; b < blocks; ++b) {
      if (table[b] < 0 || table[b] >= p.num_blocks) return KernelStatus::kOutOfRange;
    }
  }
  return KernelStatus::kOk;
}

}  // namespace

KernelStatus PagedAttentionCpu(const PagedAttentionParams& p) {
  if (KernelStatus st = Validate(p); st != KernelStatus::kOk || p.num_seqs == 0) return st;

  const auto* q = static_cast<const float*>(p.q);
  const auto* k_cache = static_cast<const float*>(p.k_cache);
  const auto* v_cache = static_cast<const float*>(p.v_cache);
  auto* out = static_cast<float*>(p.out);
  const int hd = p.head_dim;
  const int q_stride = p.q_stride == 0 ? p.num_heads * hd : p.q_stride;
  const int group = p.num_heads / p.num_kv_heads;
  // Head kvh of a slot sits KvHeadRunElems further than head 0 (kernels/kv_layout.h).
  const size_t head_run = static_cast<size_t>(KvHeadRunElems(p.block_size, hd));

  int max_ctx = 0;
  for (int s = 0; s < p.num_seqs; ++s) max_ctx = std::max(max_ctx, p.context_lens[s]);
  std::vector<size_t> slot_offset(max_ctx);  // float offset of each context position's head 0
  std::vector<float> scores(max_ctx);
  std::vector<float> acc(hd);

  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_begin = p.cu_q_lens[s];
    const int q_len = p.cu_q_lens[s + 1] - q_begin;
    const int ctx = p.context_lens[s];
    const int32_t* table = p.block_tables + static_cast<size_t>(s) * p.max_blocks_per_seq;
    for (int c = 0; c < ctx; ++c) {
      const int64_t slot =
          static_cast<int64_t>(table[c / p.block_size]) * p.block_size + c % p.block_size;
      slot_offset[c] =
          static_cast<size_t>(KvSlotOffset(slot, 0, p.block_size, p.num_kv_heads, hd));
    }
    for (int j = 0; j < q_len; ++j) {
      const int t = q_begin + j;
      const int n_keys = ctx - q_len + j + 1;  // positions [0, pos]
      for (int h = 0; h < p.num_heads; ++h) {
        const float* qh = q + static_cast<size_t>(t) * q_stride + static_cast<size_t>(h) * hd;
        const size_t kv_head = static_cast<size_t>(h / group) * head_run;
        float max_score = -INFINITY;
        for (int c = 0; c < n_keys; ++c) {
          const float* kc = k_cache + slot_offset[c] + kv_head;
          float dot = 0.0f;
          for (int d = 0; d < hd; ++d) dot += qh[d] * kc[d];
          scores[c] = dot * p.scale;
          max_score = std::max(max_score, scores[c]);
        }
        float denom = 0.0f;
        for (int c = 0; c < n_keys; ++c) {
          scores[c] = std::exp(scores[c] - max_score);
          denom += scores[c];
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int c = 0; c < n_keys; ++c) {
          const float* vc = v_cache + slot_offset[c] + kv_head;
          const float w = scores[c];
          for (int d = 0; d < hd; ++d) acc[d] += w * vc[d];
        }
        float* oh = out + static_cast<size_t>(t) * p.num_heads * hd + static_cast<size_t>(h) * hd;
        const float inv = 1.0f / denom;
        for (int d = 0; d < hd; ++d) oh[d] = acc[d] * inv;
      }
    }
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
