// CudaLora's deltas of the logit rows (model/cuda_lora.h): the lm_head's (AfterLmHead) and those
// of the trimmed last layer of a prefill step (model/cuda_phi_last_rows.cc: the fc1, dense and
// fc2 deltas of the logit rows alone), all with the SGMV shrink + expand kernels over the logit
// tiles (Ref(true): one tile per run of logit rows of one adapter, rows indexed 0 .. logit rows
// - 1; base rows are in no tile; decode steps: the token tiles, the logit rows being the token
// rows). The t buffer (float32 [rows_, 6 x rank_cap]) holds rows_ >= logit rows rows; its
// columns here are the same module windows as in the SGMV steps (the lm_head's: from column 0).
#ifdef PHISHARD_HAVE_CUDA

#include "common/logging.h"
#include "kernels/cuda/gelu_cuda.h"
#include "kernels/cuda/sgmv_cuda.h"
#include "model/cuda_lora.h"

namespace phishard {
namespace {

constexpr int kDense = 3, kFc1 = 4, kFc2 = 5;  // LoraTarget order (cuda_lora.cc)

}  // namespace

KernelStatus CudaLora::LogitRowsDelta(SgmvGroupedShrinkParams sp, const SgmvExpandOp& y,
                                      cudaStream_t stream) const {
  sp.t = t_dev_;
  sp.ldt = 6 * rank_cap_;
  sp.ref = Ref(true);
  sp.dtype = dtype_;
  if (KernelStatus st = SgmvGroupedShrinkCuda(sp, stream); st != KernelStatus::kOk) return st;
  SgmvGroupedExpandParams ep;
  ep.ops[0] = y;
  ep.num_ops = 1;
  ep.t = t_dev_;
  ep.ldt = 6 * rank_cap_;
  ep.ref = sp.ref;
  ep.dtype = dtype_;
  // Decode steps: the decode expand; prefill (LastRows* check it): the grouped one.
  return Expand(ep, GemmEpilogue::kNone, stream);
}

KernelStatus CudaLora::AfterLmHead(const void* x, float* logits, int ld_logits,
                                   cudaStream_t stream) {
  const int entry = 6 * config_.num_hidden_layers;
  if (!active_ || !Launch(entry)) return KernelStatus::kOk;
  const int H = config_.hidden_size;
  SgmvGroupedShrinkParams sp;
  sp.ops[0] = {.x = x, .ldx = H, .in = H, .t_col = 0, .entry = entry};
  sp.num_ops = 1;
  SgmvExpandOp y;  // logits [logit rows, ld_logits] float32 += x's lm_head delta
  y.y = logits;
  y.ldy = ld_logits;
  y.out = config_.vocab_size;
  y.y_f32 = true;
  y.terms[0] = {0, entry};
  return LogitRowsDelta(sp, y, stream);
}

KernelStatus CudaLora::LastRowsAfterFc1(int layer, const void* normed_r, void* mlp_r,
                                        GemmEpilogue act, cudaStream_t stream) {
  if (!SplitFc1(layer)) return KernelStatus::kOk;  // fc1 ran with its activation, no delta
  PHI_CHECK(LastRowsSupported());
  const int H = config_.hidden_size, I = config_.intermediate_size;
  SgmvGroupedShrinkParams sp;
  // normed_r [logit rows, H] dtype -> t[:, fc1 window] float32.
  sp.ops[0] = {
      .x = normed_r, .ldx = H, .in = H, .t_col = kFc1 * rank_cap_, .entry = Entry(layer, kFc1)};
  sp.num_ops = 1;
  SgmvExpandOp y;  // mlp_r [logit rows, I] dtype += the fc1 delta
  y.y = mlp_r;
  y.ldy = I;
  y.out = I;
  y.terms[0] = {kFc1 * rank_cap_, Entry(layer, kFc1)};
  if (KernelStatus st = LogitRowsDelta(sp, y, stream); st != KernelStatus::kOk) return st;
  // Base logit rows have no tile: the activation over every row, after the delta.
  return GeluInPlaceCuda({.y = mlp_r, .rows = logit_rows_, .cols = I, .act = act, .dtype = dtype_},
                         stream);
}

KernelStatus CudaLora::LastRowsAfterResidual(int layer, const void* attn_r, const void* mlp_r,
                                             void* out, cudaStream_t stream) {
  if (!active_) return KernelStatus::kOk;
  PHI_CHECK(LastRowsSupported());
  const PhiConfig& c = config_;
  const int H = c.hidden_size, A = c.num_attention_heads * c.head_dim, I = c.intermediate_size;
  SgmvGroupedShrinkParams sp;
  SgmvExpandOp y;  // out [logit rows, H] dtype += dense(attn_r) + fc2(mlp_r) deltas
  y.y = out;
  y.ldy = H;
  y.out = H;
  y.num_terms = 0;
  if (Launch(Entry(layer, kDense))) {  // attn_r [logit rows, A]
    sp.ops[sp.num_ops++] = {
        .x = attn_r, .ldx = A, .in = A, .t_col = kDense * rank_cap_, .entry = Entry(layer, kDense)};
    y.terms[y.num_terms++] = {kDense * rank_cap_, Entry(layer, kDense)};
  }
  if (Launch(Entry(layer, kFc2))) {  // mlp_r [logit rows, I]
    sp.ops[sp.num_ops++] = {
        .x = mlp_r, .ldx = I, .in = I, .t_col = kFc2 * rank_cap_, .entry = Entry(layer, kFc2)};
    y.terms[y.num_terms++] = {kFc2 * rank_cap_, Entry(layer, kFc2)};
  }
  if (sp.num_ops == 0) return KernelStatus::kOk;
  return LogitRowsDelta(sp, y, stream);
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
