// Private to the CudaPhiModel sources (model/cuda_phi_*.cc): the step arena's layout and small
// helpers they share. Not part of any interface.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "common/status_macros.h"
#include "kernels/cuda/paged_attention_cuda.h"
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/paged_attention.h"
#include "model/cuda_phi_model.h"
#include "model/cuda_phi_tp_overlap.h"
#include "model/phi_config.h"
#include "model/rotary_params.h"
#include "model/tp_prefill_split.h"

namespace phishard {

// Row chunks of an overlapped prefill: EnqueueLayers runs each layer's row-wise head
// (LayerNorm, qkv, rotary + KV write) and tail (dense + fc2 into h) chunk by chunk, attention and
// fc1 on all rows, and calls the hooks instead of enqueuing all-reduces itself.
struct PrefillRowChunks {
  std::vector<RowRange> ranges;
  // Before chunk `chunk`'s LayerNorm of layer `layer` (its rows of h must be summed by then).
  std::function<absl::Status(int layer, int chunk)> before_head;
  // After chunk `chunk`'s dense + fc2 of layer `layer` (layer -1: after the embedding).
  std::function<absl::Status(int layer, int chunk)> after_tail;
};

// Device pointers (device memory) and sizes of one step's inputs.
struct CudaPhiModel::StepInputs {
  int tokens = 0;  // rows of the step (decode: the bucket, padding rows included)
  const int32_t* ids = nullptr;
  const int32_t* positions = nullptr;
  const int64_t* slots = nullptr;
  const int32_t* cu_q_lens = nullptr;  // prefill only
  const int32_t* context_lens = nullptr;
  const int32_t* block_tables = nullptr;
  int num_seqs = 0;
  int max_blocks = 0;                  // block-table pitch when step_info is null
  const int32_t* step_info = nullptr;  // decode graphs: {live, pitch} on the device
  // Decode steps: the fused attention's split counters (device int32, zero between launches;
  // PagedDecodeCudaPlan::merge_counters), null where the step may not fuse.
  int32_t* merge_counters = nullptr;
  size_t merge_counters_len = 0;
  bool decode = false;      // one token per sequence: PagedDecodeCuda
  int min_live = 1;         // decode: fewest live sequences this launch serves
  // decode: the step's graph variant (DecodeVariantRules, CudaPhiModel::SetDecodeVariant): fc1
  // with its SM count target, the attention fold beyond its rows, the register-staged attention,
  // the one-warp-a-head attention.
  bool fc1_narrow = false;
  bool fold_short = false;
  bool short_regs = false;
  bool warp_heads = false;  // the one-warp-a-head attention (DecodeVariantRules::WarpHeads)
  // The decode stream's launches keep one copy in flight (DecodeVariantRules::StreamLong).
  bool stream_one_in_flight = false;
  int max_q_len = 0;        // prefill plan
  int max_ctx = 0;
  bool skip_last_layer = false;  // prefill: the caller runs it (EnqueueLastLayerRows)
  // Overlapped sharded prefill (model/cuda_phi_tp_overlap.cc): the row chunks whose hooks take
  // the place of the per-layer all-reduce; nullptr: the whole step, one all-reduce a layer.
  const PrefillRowChunks* chunks = nullptr;
};

// Rotary on q and k of `tokens` rows of qkv ([tokens, qkv_width] device) and their K/V into
// layer `layer`'s cache (k_cache / v_cache: [kv_num_blocks_, nKV, kv_block_size_, hd] device),
// after the layer's q / k LayerNorm when the checkpoint has them (PhiConfig::qk_layernorm); the
// caller sets the optional fields (write_cache, fold_delta).
inline RotaryKvWriteParams CudaPhiModel::LayerRotaryParams(int layer, void* qkv,
                                                           const int32_t* positions,
                                                           const int64_t* slots, int tokens,
                                                           void* k_cache, void* v_cache) const {
  const Layer& w = layers_[layer];
  RotaryKvWriteParams p = RotaryParamsOf(config_);
  p.qkv = qkv;
  p.positions = positions;
  p.slots = slots;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.num_slots = static_cast<int64_t>(kv_num_blocks_) * kv_block_size_;
  p.block_size = kv_block_size_;
  p.num_tokens = tokens;
  p.dtype = dtype_;
  p.q_norm_w = w.q_norm_w;
  p.q_norm_b = w.q_norm_b;
  p.k_norm_w = w.k_norm_w;
  p.k_norm_b = w.k_norm_b;
  return p;
}

// Attention of `tokens` query rows (q: the q heads of [tokens, qkv_width] device rows; out:
// [tokens, nH * hd] device) over one layer's cache through the step's block tables. cu_q_lens is
// left null: prefill callers set it (the decode kernels take one row per sequence).
inline PagedAttentionParams CudaPhiModel::LayerAttentionParams(const StepInputs& in, const void* q,
                                                               void* out, int tokens,
                                                               const void* k_cache,
                                                               const void* v_cache) const {
  const PhiConfig& c = config_;
  const int nH = c.num_attention_heads, nKV = c.num_key_value_heads, hd = c.head_dim;
  return PagedAttentionParams{.q = q,
                              .k_cache = k_cache,
                              .v_cache = v_cache,
                              .out = out,
                              .context_lens = in.context_lens,
                              .block_tables = in.block_tables,
                              .num_seqs = in.num_seqs,
                              .num_tokens = tokens,
                              .max_blocks_per_seq = in.max_blocks,
                              .num_blocks = kv_num_blocks_,
                              .block_size = kv_block_size_,
                              .num_heads = nH,
                              .num_kv_heads = nKV,
                              .head_dim = hd,
                              .q_stride = (nH + 2 * nKV) * hd,
                              .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                              .dtype = dtype_};
}

}  // namespace phishard

namespace phishard::cuda_model {

inline constexpr size_t kAlign = 256;  // every device sub-buffer starts 256-byte aligned (cuBLASLt)
inline constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;
// Attention split-K partials are reserved for this many rows x kMaxDecodeSplits; bigger decode
// batches fill the GPU without splitting.
inline constexpr int kDecodeSplitRows = 256;
inline constexpr int kMaxDecodeSplits = 16;

inline size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Offsets of consecutive sub-buffers of one allocation (a layout's fields), each starting
// `align`-byte aligned; `off` ends as the total.
struct OffsetTaker {
  size_t align;
  size_t off = 0;
  size_t Take(size_t bytes) {
    const size_t at = off;
    off += (bytes + align - 1) / align * align;
    return at;
  }
};
// Logit rows are padded to 64 floats so every row starts 256-byte aligned.
inline int VocabPad(int v) { return (v + 63) / 64 * 64; }
inline double GiB(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

// Byte offsets of the step arena for `tokens` tokens (all sub-buffers [tokens, width], device).
struct ArenaLayout {
  size_t h, normed, qkv, attn, mlp, last, logits, attn_ws, attn_ws_bytes, total;
};

inline ArenaLayout MakeArenaLayout(const PhiConfig& c, int tokens) {
  const size_t t = static_cast<size_t>(tokens), e = 2;  // 16-bit storage
  const size_t qkv_w =
      static_cast<size_t>(c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
  ArenaLayout l;
  OffsetTaker offsets{kAlign};                     // consecutive sub-buffers, each 256-byte aligned
  l.h = offsets.Take(t * c.hidden_size * e);       // residual stream
  l.normed = offsets.Take(t * c.hidden_size * e);  // LayerNorm output feeding attention and MLP
  l.qkv = offsets.Take(t * qkv_w * e);
  l.attn = offsets.Take(t * c.num_attention_heads * c.head_dim * e);
  l.mlp = offsets.Take(t * c.intermediate_size * e);
  l.last = offsets.Take(t * c.hidden_size * e);  // hidden rows that return logits
  l.logits = offsets.Take(t * VocabPad(c.vocab_size) * sizeof(float));  // float32 logits
  const int rows = std::min(tokens, kDecodeSplitRows);
  l.attn_ws_bytes = std::max(
      PagedAttentionCudaWorkspaceBytes(rows, c.num_attention_heads, c.head_dim, kMaxDecodeSplits),
      PagedDecodeCudaWorkspaceBytes(rows, c.num_attention_heads, c.head_dim, kMaxDecodeSplits));
  l.attn_ws = offsets.Take(l.attn_ws_bytes);
  l.total = offsets.off;
  return l;
}

// Per-step metadata of the prefill path, one contiguous block (host pinned and device).
struct MetaLayout {
  size_t slots, ids, positions, cu_q_lens, context_lens, logit_rows, block_tables, total;
};

inline MetaLayout MakeMetaLayout(int T, int S, int R, int max_blocks) {
  MetaLayout m;
  OffsetTaker offsets{16};  // consecutive sub-buffers, each 16-byte aligned
  m.slots = offsets.Take(sizeof(int64_t) * T);
  m.ids = offsets.Take(sizeof(int32_t) * T);
  m.positions = offsets.Take(sizeof(int32_t) * T);
  m.cu_q_lens = offsets.Take(sizeof(int32_t) * (S + 1));
  m.context_lens = offsets.Take(sizeof(int32_t) * S);
  m.logit_rows = offsets.Take(sizeof(int32_t) * std::max(R, 1));
  m.block_tables = offsets.Take(sizeof(int32_t) * static_cast<size_t>(S) * max_blocks);
  m.total = offsets.off;
  return m;
}

// The decode attention plan of a step: split-K partials in the arena's attention workspace
// (`arena` device, laid out by `al`), at most the splits that fill the GPU for `live_seqs`.
inline PagedDecodeCudaPlan MakeDecodePlan(int live_seqs, int num_heads, int multiprocessors,
                                          char* arena, const ArenaLayout& al) {
  PagedDecodeCudaPlan plan;
  plan.max_splits = PagedDecodeCudaMaxSplits(live_seqs, num_heads, multiprocessors);
  plan.workspace = arena + al.attn_ws;
  plan.workspace_bytes = al.attn_ws_bytes;
  plan.num_multiprocessors = multiprocessors;
  return plan;
}

}  // namespace phishard::cuda_model
