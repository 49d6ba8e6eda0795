// CudaPhiModel's trimmed last layer of a prefill step (issue #4, set_prefill_last_rows). After
// the last layer only the rows that return logits are read (the final LayerNorm and the LM head
// take them alone), and a layer's row t depends on the other rows only through the K/V it stores.
// So the last layer runs its head on every row (LayerNorm, qkv, rotary + K/V into the cache: the
// cache must hold every new token for the decode steps after), then gathers the logit rows and
// runs the rest on them only: their attention as a decode query (each is the last row of its
// sequence, attending its whole context), dense, fc1 + GELU and fc2 into their residual rows.
// At 1 x 2048 tokens on Phi-2 that replaces ~420 us of attention and MLP GEMMs on 2048 rows with
// a decode attention and three weight-streaming GEMMs on one row.
//
// Steps with adapter rows (CudaLora, either prefill form) run AfterQkv on every row as in the
// other layers, then the fc1 / dense / fc2 deltas on the logit rows only (CudaLora::LastRows*:
// the SGMV kernels over the lm_head's logit tiles, whose rows are exactly these).
//
// The logit rows' results are the full layer's up to summation order (the decode attention
// splits the keys, the small GEMMs use other cuBLASLt plans): within bf16 rounding of the full
// path (cuda_model_options_test PrefillLastRowsMatchFullLastLayer), the same K/V cache bits.
#ifdef PHISHARD_HAVE_CUDA

#include <vector>

#include "kernels/cuda/embedding_cuda.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/layer_norm_cuda.h"
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "model/cuda_lora.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"

namespace phishard {

using cuda_model::AlignUp;
using cuda_model::ArenaLayout;
using cuda_model::MakeArenaLayout;
using cuda_model::MakeDecodePlan;

namespace {

// Scratch of the trimmed layer for `rows` logit rows, in the arena's float32 logits region (dead
// until the LM head writes it, after this layer): byte offsets from that region's start.
struct LastRowsLayout {
  size_t qkv, normed, attn, mlp, total;  // [rows, qkv width | H | heads x head_dim | I], dtype
};

LastRowsLayout MakeLastRowsLayout(const PhiConfig& c, int rows) {
  const size_t r = static_cast<size_t>(rows), e = 2;  // 16-bit storage
  LastRowsLayout l;
  cuda_model::OffsetTaker offsets{
      cuda_model::kAlign};  // consecutive sub-buffers, each 256-byte aligned
  l.qkv = offsets.Take(r * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim * e);
  l.normed = offsets.Take(r * c.hidden_size * e);
  l.attn = offsets.Take(r * c.num_attention_heads * c.head_dim * e);
  l.mlp = offsets.Take(r * c.intermediate_size * e);
  l.total = offsets.off;
  return l;
}

}  // namespace

bool CudaPhiModel::PrefillLastRowsApplies(const ForwardBatch& batch) const {
  const int T = batch.num_tokens(), S = static_cast<int>(batch.seqs.size());
  const int R = static_cast<int>(batch.logit_rows.size());
  // Sharded models keep the full layer unless set_prefill_sharded_forms asks (then the trimmed
  // rows' partials are all-reduced; steps with adapter rows stay whole); so does a step whose
  // logit rows are most of its rows (nothing to save). Steps with adapter rows add the trimmed
  // rows' deltas over the lm_head's logit tiles (CudaLora::LastRows*).
  const bool sharded = shard_.sharded() || comm_ != nullptr;
  if (!prefill_last_rows_ || (lora_->active() && !lora_->LastRowsSupported()) ||
      (sharded && (!prefill_last_rows_tp_ || lora_->active())) || R == 0 || R != S || 2 * R > T) {
    return false;
  }
  const ArenaLayout al = MakeArenaLayout(config_, arena_tokens_);
  if (MakeLastRowsLayout(config_, R).total > al.attn_ws - al.logits) return false;
  // Each logit row must be the last new row of its sequence, at position context_len - 1: then
  // sequence s's query attends exactly its context_lens[s] keys (a decode query).
  for (int s = 0, end = 0; s < S; ++s) {
    const SequenceInput& seq = batch.seqs[s];
    end += seq.num_new_tokens;
    if (seq.num_new_tokens < 1 || batch.logit_rows[s] != end - 1 ||
        batch.positions[end - 1] != seq.context_len - 1) {
      return false;
    }
  }
  return true;
}

absl::Status CudaPhiModel::EnqueueLastLayerRows(const StepInputs& in, const int32_t* logit_rows,
                                                int rows, void* out) {
  ++prefill_last_rows_steps_;
  const PhiConfig& c = config_;
  const int T = in.tokens, R = rows, L = c.num_hidden_layers;
  const int H = c.hidden_size, nH = c.num_attention_heads, nKV = c.num_key_value_heads;
  const int hd = c.head_dim, qkv_width = (nH + 2 * nKV) * hd, I = c.intermediate_size;
  const DataType dt = dtype_;
  const ArenaLayout al = MakeArenaLayout(c, arena_tokens_);
  char* a = static_cast<char*>(arena_);
  void* h = a + al.h;
  void* normed = a + al.normed;
  void* qkv = a + al.qkv;
  const LastRowsLayout ll = MakeLastRowsLayout(c, R);
  if (ll.total > al.attn_ws - al.logits) {
    return absl::InternalError("prefill last rows: scratch larger than the logits region");
  }
  char* scratch = a + al.logits;
  void* qkv_r = scratch + ll.qkv;        // [R, qkv_width]
  void* normed_r = scratch + ll.normed;  // [R, H]
  void* attn_r = scratch + ll.attn;      // [R, nH * hd]
  void* mlp_r = scratch + ll.mlp;        // [R, I]
  const Layer& w = layers_[L - 1];
  const size_t layer_kv_bytes = static_cast<size_t>(kv_num_blocks_) * kv_block_size_ * nKV * hd * 2;
  char* k_cache = static_cast<char*>(kv_) + 2 * static_cast<size_t>(L - 1) * layer_kv_bytes;
  char* v_cache = k_cache + layer_kv_bytes;
  auto linear = [&](const void* x, const void* wt, const void* bias, void* y, int m, int n, int k,
                    bool accumulate, GemmEpilogue epi) {
    return GemmParams{.x = x,
                      .w = wt,
                      .bias = bias,
                      .y = y,
                      .m = m,
                      .n = n,
                      .k = k,
                      .accumulate = accumulate,
                      .epilogue = epi,
                      .dtype = dt};
  };

  // Head on every row: n = LN(h), qkv = n W_qkv + b, rotary with the K/V cache write.
  PHI_RETURN_IF_ERROR(KernelResult(LayerNormCuda({.x = h,
                                                  .weight = w.ln_w,
                                                  .bias = w.ln_b,
                                                  .y = normed,
                                                  .rows = T,
                                                  .cols = H,
                                                  .eps = c.layer_norm_eps,
                                                  .dtype = dt},
                                                 stream_),
                                   "last layer_norm"));
  // Adapter rows: the q / k / v deltas on every row, as in the other layers (model/cuda_lora.h;
  // first in GEMM-form steps, as there, so that the K/V cache holds the full layer's bits).
  const bool lora = lora_->active();
  bool qkv_first = false;
  if (lora && lora_->gemm_step()) {
    PHI_RETURN_IF_ERROR(KernelResult(
        lora_->GemmQkvDeltaFirst(L - 1, normed, qkv, &qkv_first, stream_), "last lora qkv deltas"));
  }
  PHI_RETURN_IF_ERROR(
      Linear(linear(normed, w.qkv_w, w.qkv_b, qkv, T, qkv_width, H, qkv_first, GemmEpilogue::kNone),
             dt, "last qkv gemm"));
  if (lora) {
    PHI_RETURN_IF_ERROR(
        KernelResult(lora_->AfterQkv(L - 1, normed, qkv, stream_), "last lora qkv"));
  }
  PHI_RETURN_IF_ERROR(KernelResult(
      RotaryKvWriteCuda(LayerRotaryParams(L - 1, qkv, in.positions, in.slots, T, k_cache, v_cache),
                        stream_),
      "last rotary_kv_write"));

  // The logit rows: residual into `out`, their q | k | v and normed rows into the scratch.
  auto gather = [&](const void* table, void* dst, int dim, const char* what) {
    return KernelResult(EmbeddingCuda({.ids = logit_rows,
                                       .table = table,
                                       .out = dst,
                                       .num_tokens = R,
                                       .num_rows = T,
                                       .dim = dim,
                                       .dtype = dt},
                                      stream_),
                        what);
  };
  PHI_RETURN_IF_ERROR(gather(h, out, H, "last rows: gather h"));
  PHI_RETURN_IF_ERROR(gather(qkv, qkv_r, qkv_width, "last rows: gather qkv"));
  PHI_RETURN_IF_ERROR(gather(normed, normed_r, H, "last rows: gather normed"));

  // Attention: sequence s's one query (row s of qkv_r) over its context_lens[s] cached keys.
  const PagedAttentionParams ap = LayerAttentionParams(in, qkv_r, attn_r, R, k_cache, v_cache);
  const PagedDecodeCudaPlan plan = MakeDecodePlan(in.num_seqs, nH, multiprocessors_, a, al);
  PHI_RETURN_IF_ERROR(
      KernelResult(PagedDecodeCuda(ap, plan, stream_), "last rows: paged_attention"));

  // MLP and residual: out += dense(attn_r) + fc2(act(fc1(normed_r))).
  const GemmEpilogue act =
      c.hidden_act == Activation::kGeluTanh ? GemmEpilogue::kGeluTanh : GemmEpilogue::kGeluErf;
  // With an fc1 delta the GEMM leaves out the activation (CudaLora::SplitFc1): the delta first.
  const GemmEpilogue fc1_act = lora && lora_->SplitFc1(L - 1) ? GemmEpilogue::kNone : act;
  PHI_RETURN_IF_ERROR(Linear(linear(normed_r, w.fc1_w, w.fc1_b, mlp_r, R, I, H, false, fc1_act), dt,
                             "last rows: fc1 gemm"));
  if (lora) {
    PHI_RETURN_IF_ERROR(KernelResult(lora_->LastRowsAfterFc1(L - 1, normed_r, mlp_r, act, stream_),
                                     "last rows: lora fc1"));
  }
  // Sharded: rank 0 adds its partial (and the biases) to the residual rows, the others write
  // theirs, and one all-reduce of the R rows sums them (as the full layer does for every row).
  const GemmParams fc2 = linear(mlp_r, w.fc2_w, w.fc2_b, out, R, H, I, true, GemmEpilogue::kNone);
  PHI_RETURN_IF_ERROR(Linear(linear(attn_r, w.dense_w, w.dense_b, out, R, H, nH * hd,
                                    shard_.adds_row_parallel_bias(), GemmEpilogue::kNone),
                             dt, "last rows: dense + fc2 gemm", &fc2));
  if (lora) {
    PHI_RETURN_IF_ERROR(
        KernelResult(lora_->LastRowsAfterResidual(L - 1, attn_r, mlp_r, out, stream_),
                     "last rows: lora dense + fc2"));
  }
  return TpAllReduce(out, R, "last rows all-reduce");  // no-op unsharded
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
