// CudaLora: the LoRA side of CudaPhiModel (world size 1): device copies of the adapters an
// AdapterRegistry holds, and the per-step plan and launches that add their deltas (spec §7.4-7.8,
// kernels/cuda/sgmv_cuda.h). Built only when PHISHARD_HAVE_CUDA.
//
// Device memory:
//  * one allocation per loaded adapter: every module's A [r, in] and B [out, r] in the model's
//    16-bit dtype, each 256-byte aligned; made when the registry's generation changes (Sync), freed
//    when the adapter leaves its slot, so device memory returns to where it was after an offload;
//  * the weight table SgmvWeight [num_slots, 6 L + 1] (entry layer * 6 + target for q, k, v,
//    dense, fc1, fc2; 6 L for lm_head): pointers, rank and scale (alpha / r, or alpha / sqrt(r)
//    with rsLoRA, per module as LoraAdapter resolved it; applied in float32 by expand);
//  * a plan buffer at a fixed address: {token tiles, logit tiles, 0, 0} counts then the tiles
//    (SgmvTile [capacity]), uploaded once per step from pinned staging;
//  * the shrink output t float32 [rows, 6 x rank_cap] (one column window per target).
// The decode CUDA graph of a LoRA step reads everything per-step from these fixed addresses, so it
// is replayed for any mix of adapters; only a larger rank cap, plan or t buffer (new_graphs())
// makes the model capture its LoRA graphs again.
//
// Steps: Plan() groups the batch's rows into tiles (runs of consecutive rows of one adapter, at
// most kSgmvTileRows rows each, one row each in decode); base rows are in no tile and cost
// nothing, and a step without adapter rows launches nothing (active() false). The hooks then run,
// per layer,
//   AfterQkv:      shrink q, k, v, fc1 (x = LN output), expand q, k, v into their qkv columns;
//   AfterFc1:      expand fc1 into the pre-activation, then the GELU (fc1 ran without it);
//   AfterResidual: shrink dense (x = attention output) and fc2 (x = GELU output), expand both
//                  into the residual stream (two terms, one rounding);
// and AfterLmHead adds the lm_head delta to the float32 logits of the logit rows. With the
// overlap (default; the layer loop calls the Before hooks on single-GPU steps only), the two
// shrinks are forked onto a side stream by BeforeQkv (before the qkv GEMM) and BeforeResidual
// (before the dense + fc2 GEMM), so each runs beside a base GEMM that does not touch its input
// or output, and joined before the expand that reads t (measured: -0.5 ms an eager b64 decode
// step, no change in graphs; docs/perf-log.md run 5).
// Decode steps whose ranks are all <= kSgmvFusedMaxRank (64) take neither: each hook is one
// fused launch (SgmvDecodeFusedCuda: every block computes its row's rank-r intermediate in shared
// memory and expands it), AfterQkv for q / k / v, AfterFc1 for fc1 with the GELU, AfterResidual
// for dense + fc2 as two terms (or AfterFc2 + AfterResidual when fc2 runs on the MLP stream, see
// BranchHooks); no t buffer, no side stream (3-4 launches a layer instead of 5;
// PHISHARD_LORA_FUSED=0 keeps the shrink + expand kernels).
// Long steps (prefill of at least gemm_min_rows() rows, few adapters) take the GEMM form instead
// (model/cuda_lora_gemm.cc, kernels/cuda/lora_gemm_cuda.h): per layer the step's adapters are
// gathered into concatenated A / B matrices, the shrinks are cuBLASLt GEMMs into a float32 t, a
// mask keeps each row's own adapter window (scaled, split into bf16 hi + lo parts), and the
// expands are cuBLASLt GEMMs with beta = 1 (fc1's with the GELU epilogue, so it needs no separate
// activation pass): over all rows against the concatenated B, or, in steps of few long segments,
// one GEMM per segment (a strided-batched one per run of equal segments) against its adapter's
// columns only (gemm_max_segments_). The lm_head delta stays on the SGMV kernels (few logit rows).
// Decode steps launch every module that any adapter loaded so far adapts, whatever the batch's
// adapters adapt, so eager and graph steps run the same launches and one graph serves every mix
// (a newly loaded adapter that adapts a module none did before makes the graphs stale); other
// steps launch only the modules some adapter of the step adapts in that layer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/lora_gemm_cuda.h"
#include "kernels/device.h"
#include "kernels/device_event.h"
#include "kernels/dtype.h"
#include "kernels/gemm.h"
#include "kernels/kernel_status.h"
#include "kernels/layer_norm.h"
#include "kernels/rotary_kv_write.h"
#include "kernels/sgmv.h"
#include "model/adapter_registry.h"
#include "model/forward_batch.h"
#include "model/phi_config.h"

namespace phishard {

// The GEMM form's device workspace (fixed; steps whose buffers need more take the SGMV kernels)
// and what the KV sizing keeps free for it (+ the cuBLASLt workspace).
inline constexpr size_t kLoraGemmWorkspaceBytes = size_t{96} << 20;
inline constexpr size_t kLoraGemmCublasBytes = size_t{4} << 20;
inline constexpr size_t kLoraGemmReserveBytes = kLoraGemmWorkspaceBytes + kLoraGemmCublasBytes;

class CudaLora {
 public:
  CudaLora(const PhiConfig& config, DataType dtype, int device);
  ~CudaLora();
  CudaLora(const CudaLora&) = delete;
  CudaLora& operator=(const CudaLora&) = delete;

  // Not owned; nullptr frees every device copy. Allocates the weight table for the registry's
  // slots, then Sync.
  absl::Status SetRegistry(const AdapterRegistry* registry, cudaStream_t stream);
  const AdapterRegistry* registry() const { return registry_; }
  // Device copies brought in line with the registry (uploads new adapters, frees offloaded ones);
  // nothing when its generation did not change. RESOURCE_EXHAUSTED when a copy does not fit the
  // device, INVALID_ARGUMENT when an adapter's shapes are not this model's.
  absl::Status Sync(cudaStream_t stream);
  // Device bytes held by adapter copies (excluding the table, plan and t buffers).
  int64_t adapter_device_bytes() const { return adapter_bytes_; }
  // Device bytes of the table, plan and t buffers for steps of `rows` rows at rank cap `rank`,
  // plus the GEMM form's fixed workspace.
  size_t WorkspaceBytes(int rows, int rank) const;
  // Fewest rows of a non-decode step that takes the GEMM form (default 128; environment
  // PHISHARD_LORA_GEMM_MIN_ROWS overrides it at construction, 0 disables the GEMM form).
  int gemm_min_rows() const { return gemm_min_rows_; }
  // Whether the current step runs the GEMM form.
  bool gemm_step() const { return active_ && gemm_step_; }
  // True once after a buffer or the rank cap that LoRA graphs bake in changed.
  bool TakeGraphsStale();
  // Makes the step buffers for steps of up to `step_rows` rows (decode steps: `decode_rows`) now,
  // at warmup and adapter loads, so that steps within those sizes allocate nothing: the plan and
  // t buffers, the overlap stream, the beside delta buffer and the GEMM form's workspace and row
  // map. The sizes are remembered (Sync repeats this after each load, the rank cap may grow);
  // nothing is made while no adapter is on the device. Larger steps still grow the plan, t and
  // row-map buffers when they run; larger decode steps run without beside mode.
  absl::Status Reserve(int step_rows, int decode_rows, cudaStream_t stream);

  // Plans a step of batch.num_tokens() rows (decode: `padded_rows` >= that, the graph bucket)
  // and uploads it. Returns whether some row uses an adapter (active()).
  absl::StatusOr<bool> Plan(const ForwardBatch& batch, bool decode, int padded_rows,
                            cudaStream_t stream);
  bool active() const { return active_; }
  void Deactivate() { active_ = false; }
  // fc1 runs without its activation and AfterFc1 adds the delta and applies it (SGMV steps).
  bool SplitFc1(int layer) const;

  // q / k / v deltas first (GEMM-form steps, unsharded, one row range; on unless
  // PHISHARD_LORA_GEMM_DELTA_FIRST=0 at construction or SetPrefillTuning): GemmQkvDeltaFirst,
  // called after the LayerNorm (and the MLP fork) and before the qkv GEMM, runs the layer's
  // gathers, the q / k / v / fc1 shrink and mask, and writes qkv = the q / k / v deltas (beta = 0,
  // base rows zeroed); the qkv GEMM then adds to them (accumulate, with its bias) and AfterQkv
  // does nothing for the layer. *first says whether it ran (every one of q / k / v has a delta
  // in the layer). The expands, memory-bound, then write qkv [rows, nq + 2 nkv] once instead of
  // reading and writing it back after the GEMM (H200, 8x512 with 8 rank-16 adapters: 9.7 us
  // each instead of 16.9, the qkv GEMM as fast with beta = 1; docs/perf-log.md, lorap3). The
  // bits: cuBLASLt's beta = 1 kernel adds round(x Wᵀ + b) to C = round(T Bᵀ), the same sum
  // as the deltas after (bit-identical logits in cuda_lora_model_test). fc1's delta stays
  // after its GEMM (AfterFc1): written first (branch lorap4-fc1first) it is rounded to bf16
  // instead of the base pre-activation, which puts the one sensitive golden case (prose on
  // 'The ') at 0.0219 of the scale (bound 0.020), and it gains nothing: the fc1 GEMM's GELU
  // epilogue costs what the write-only expand saves (docs/perf-log.md, lorap4 runs 1-2).
  KernelStatus GemmQkvDeltaFirst(int layer, const void* normed, void* qkv, bool* first,
                                 cudaStream_t stream);
  // Prefetch (with the deltas first; on unless PHISHARD_LORA_GEMM_PREFETCH=0 at construction or
  // SetPrefillTuning): when the workspace holds two sets of a layer's A / B matrices, the end of
  // GemmQkvDeltaFirst forks the next layer's gathers onto the side stream (into the other set),
  // so that they run beside this layer's qkv GEMM, rotary and attention instead of on the main
  // stream at the next layer's start, which waits for them.
  // Merged q / k / v expand (segmented steps; off unless PHISHARD_LORA_GEMM_QKV_MERGE=1 at
  // construction or SetPrefillTuning "F:G:P:1"): one GEMM a run of segments writes (or adds to) all
  // of qkv [rows, nq + 2 nkv] from T's q, k, v blocks [rows, 3 w W] against a block-diagonal B_qkv
  // [nq + 2 nkv, 3 w W per adapter] (B_q, B_k, B_v on the diagonal at their row ranges, zeros
  // elsewhere and past each adapter's width) instead of three GEMMs of n = nq, nkv, nkv: 3x
  // the tensor work on a GEMM that is memory-bound on its qkv write (rank << hidden), one launch
  // and one pass over the output instead of three. The zeros of B_qkv and the unused columns of
  // T's q / k / v blocks (adapters narrower than W) are written once per step (PlanGemm), so every
  // product the merged GEMM adds beyond the three GEMMs' is 0 x 0. Taken when the workspace
  // holds two sets with B_qkv (else the three GEMMs) and, per layer, when every one of q / k / v
  // has a delta in it (GemmQkvMerged; the gathers follow the same choice). The same bits as the
  // three GEMMs on an H200 (cuda_lora_prefill_test), but not faster: 8x512 with 8 rank-16
  // adapters, one merged expand 27.6 us a layer (cuBLASLt's 320x128 tile over 512-row segments)
  // against 3 x 10.1 us at a ~8 % lower clock, and the interleaved base / LoRA pairs +0.6 and
  // -0.2 points in two runs (docs/perf-log.md, lorap5): kept off, as a measured alternative.
  // Benchmarks (old and new forms in one process): "F", "F:G", "F:G:P", "F:G:P:M" or
  // "F:G:P:M:E" sets the q / k / v deltas first (F = 1) or after the qkv GEMM (0), the gathers'
  // 16-byte chunks a thread (G = 8, the default, or 1: LoraGatherParams::chunks_per_thread), the
  // prefetch (P = 1 or 0), the merged q / k / v expand (M = 1 or 0) and fc1's delta + GELU as
  // one LoraExpandActCuda pass (E = 1) or cuBLASLt GEMMs with the GELU epilogue (E = 0;
  // model/cuda_lora_fc1.cc); fields left out keep their values.
  // INVALID_ARGUMENT names a bad field.
  absl::Status SetPrefillTuning(absl::string_view spec);
  std::string PrefillTuning() const;
  // Layers whose q / k / v deltas ran first, over all steps so far (tests: the form is taken).
  int64_t qkv_first_layers() const { return qkv_first_layers_; }
  // Layers whose gathers were prefetched, over all steps so far.
  int64_t prefetched_layers() const { return prefetched_layers_; }
  // Layers whose q / k / v deltas ran as one merged expand, over all steps so far.
  int64_t qkv_merged_layers() const { return qkv_merged_layers_; }
  // Layers whose fc1 delta + GELU ran as LoraExpandActCuda (GemmFc1Kernel), over all steps.
  int64_t fc1_kernel_layers() const { return fc1_kernel_layers_; }

  // Overlap (SGMV steps, on unless PHISHARD_LORA_OVERLAP=0): BeforeQkv, called between the LN
  // and the qkv GEMM, forks the q / k / v / fc1 shrink onto a side stream so it runs alongside
  // that GEMM; BeforeResidual, called between AfterFc1 and the dense + fc2 GEMM, does the same
  // with the dense / fc2 shrink. The matching After hook joins the side stream before its expand
  // (inside a capture: a fork / join of the graph). Without the Before call the After hook
  // shrinks on `stream` itself, as before.
  // Fused decode steps with the beside mode (default; PHISHARD_LORA_BESIDE=0 or the decode
  // tuning's 4th field 0: off) use BeforeQkv instead to fork the q / k / v and the fc1 deltas in
  // delta-only form (SgmvFusedOp::delta, float32 side buffers) onto two side streams, so they run
  // beside the qkv and fc1 GEMMs instead of after them; AfterQkv and AfterFc1 then join them and
  // fold them into the GEMMs' outputs (SgmvFoldCuda: the same bits as the fused launch).
  // BeforeQkv must then be enqueued before the fc1 GEMM's stream forks from `stream`
  // (model/cuda_lora_beside.cc).
  KernelStatus BeforeQkv(int layer, const void* normed, cudaStream_t stream);
  // Dense beside (beside-mode steps whose residual hook has dense's delta as its only term, i.e.
  // fc2's delta ran in AfterFc2; PHISHARD_LORA_DENSE_BESIDE or the decode tuning's 5th field:
  // 0 off, 1, 2): BeforeDense, called right after attention (before the dense GEMM), forks
  // dense's delta in delta-only form onto a side stream (float32, columns [W + I, W + I + H) of
  // the delta buffer). AfterResidual then (1) joins it and folds it into h (SgmvFoldCuda), or (2)
  // leaves it to the next layer's LayerNorm (LayerNorm below: x = h + delta rounded once, written
  // back, then normalised; the last layer folds as in 1). Same bits as the fused launch after
  // the dense GEMM in both (model/cuda_lora_beside.cc).
  KernelStatus BeforeDense(int layer, const void* attn, bool fc2_done, cudaStream_t stream);
  // The layer's LayerNorm on `stream` (p.x = h): with the previous layer's dense delta pending
  // (dense beside 2), joins it and folds it in (LayerNormParams::fold_delta); else LayerNormCuda.
  KernelStatus LayerNorm(LayerNormParams p, cudaStream_t stream);
  // Rotary fold (PHISHARD_LORA_ROTARY_FOLD or the decode tuning's 6th field, 0 or 1): in a
  // beside-mode layer that adapts all of q, k and v, AfterQkv only joins the side stream and the
  // layer's RotaryKvWrite folds the deltas in (RotaryKvWriteParams::fold_delta), one launch
  // fewer before attention. FoldIntoRotary sets p's fold (call it for the RotaryKvWrite right
  // after AfterQkv); nothing when no fold is pending. Same bits as the fold after the GEMM.
  void FoldIntoRotary(RotaryKvWriteParams* p);
  KernelStatus BeforeResidual(int layer, const void* attn, const void* mlp, cudaStream_t stream);
  KernelStatus AfterQkv(int layer, const void* normed, void* qkv, cudaStream_t stream);
  KernelStatus AfterFc1(int layer, const void* normed, void* mlp, GemmEpilogue act,
                        cudaStream_t stream);
  KernelStatus AfterResidual(int layer, const void* attn, const void* mlp, void* h,
                             cudaStream_t stream, bool fc2_done = false);
  // The MLP branch on its own stream (CudaModelOptions::mlp_stream) in steps with adapter rows:
  // allowed when every hook is one fused launch (BranchHooks: AfterFc1 reads only the LN output
  // and mlp, no t buffer shared with the other branch). With fc2 on the branch, AfterFc2 runs on
  // that stream after the fc2 GEMM and AfterResidual(fc2_done = true) after the join; which of
  // them adds fc2's delta depends on the branch mode.
  // PHISHARD_LORA_BRANCH (read at construction) picks what of the LoRA work runs there:
  //   0: nothing (steps with adapter rows keep one stream),
  //   1: fc1's and fc2's deltas (AfterFc2 on the branch, dense's alone after the join),
  //   2: fc1's delta only; fc2's is the second term of dense's after the join (AfterFc2 adds
  //      nothing),
  //   3 (default): as 1, but with the early join (below) fc2's GEMM runs on the main stream
  //      before attention and fc2's delta alone on the branch beside attention, joined before
  //      dense (Fc2DeltaBesideAttention; the branch before attention is then fc1 and its delta
  //      only, about as long as qkv, its delta and rotary). H200 b64, 64 rank-16 adapters:
  //      10.28 ms against mode 1's 10.39 (one adapter 9.77 vs 9.93; docs/perf-log.md, session 4).
  // The branch joins before attention in steps with adapter rows (JoinBeforeAttention;
  // PHISHARD_LORA_JOIN_EARLY=0: after it, as base steps): it then overlaps qkv, its delta and
  // rotary only. Joined after attention, the branch's fc2 GEMM started beside the attention
  // kernel and the b64 decode graph took ~1 ms longer, with one adapter for all rows as with 64
  // (H200, docs/perf-log.md lora4 runs 1-2: 11.2-11.5 ms against 10.4-10.5 ms; the same with
  // fc2's delta after the join, and with the fused kernel's early PDL trigger removed).
  // Why (CUPTI kernel timeline, phishard_bench --trace-csv; perf-log lorafc2 runs 1-2): fc2's
  // cuBLASLt GEMM at m = 64 is 120 CTAs that each hold a whole SM (224 KB of shared memory)
  // for ~17 us. In base steps the branch is fc1 + fc2 GEMMs only and ends with the rotary, so
  // nothing of it overlaps attention. In LoRA steps fc1's delta makes the branch longer, and
  // the fc2 GEMM starts with the attention kernel (one CTA per sequence x head, 2048 at b64);
  // attention then ran 250-290 us instead of 190-200 in the layers where the GEMM was resident
  // at its launch (with a 64-CTA plan, SM count target 66: ~247 us), far more than the GEMM's
  // 17 us on those SMs; and the GEMM's split-K reduce queued behind attention's CTAs, so fc2's
  // delta and the join before dense came after attention. Mode 3 keeps every whole-SM GEMM off
  // attention's launch.
  // Decode steps planned in beside mode so far (tests: the mode is really taken).
  int64_t beside_steps() const { return beside_steps_; }
  bool BranchHooks() const { return active_ && branch_mode_ != 0 && FusedStep(); }
  bool JoinBeforeAttention() const { return join_early_; }
  // SM count targets of the MLP branch's fc2 (0) and fc1 (1) GEMMs in steps with BranchHooks
  // (GemmParams::sm_count_target; 0: every SM; the decode tuning's 8th field "T2.T1").
  int BranchGemmSms(int which) const { return BranchHooks() ? branch_gemm_sms_[which] : 0; }
  bool Fc2DeltaBesideAttention() const { return branch_mode_ == 3; }
  // Benchmarks (environment PHISHARD_LORA_DECODE_TUNING at construction, or set later; the
  // caller then drops its LoRA decode graphs): "B", "B:Q.F1.F2.D" or "B:Q.F1.F2.D:P", the branch
  // mode (as PHISHARD_LORA_BRANCH), the fused launches' column blocks per op
  // (SgmvFusedParams::col_blocks; 0 = automatic) of AfterQkv, AfterFc1, AfterFc2 and
  // AfterResidual, and whether they launch as programmatic dependents (P = 1, the default).
  // INVALID_ARGUMENT naming the spec when it is not of that form. Session 5 (H200, b64, 64
  // rank-16 adapters; docs/perf-log.md, lorad runs 1-2): no setting beat the default by more
  // than the noise (~0.05 ms); fc1 with one column block a row (1) or with 4 cost 0.7 and 0.13
  // ms a step.
  // A 4th field, "B:Q.F1.F2.D:P:S", sets the beside mode (S = 1, the default, or 0), a 5th,
  // "B:Q.F1.F2.D:P:S:R", the dense beside mode (R = 0, 1 or 2; BeforeDense), a 6th the rotary
  // fold (FoldIntoRotary), a 7th whether steps with adapter rows join the MLP branch before
  // attention (JoinBeforeAttention), an 8th "T2.T1" the SM count targets of the branch's fc2 and
  // fc1 GEMMs (BranchGemmSms).
  absl::Status SetDecodeTuning(absl::string_view spec);
  std::string DecodeTuning() const;
  // PHISHARD_LORA_BRANCH_PRIORITY=1 (an experiment, off by default; not yet run on a GPU): the
  // MLP stream is created at the device's highest priority and the LoRA decode graphs replay
  // with per-node priorities, so the branch's blocks are scheduled ahead of attention's queued
  // ones (meant to let the late join work: the fc2 GEMM no longer starting behind attention).
  // Eager steps, base ones too, then also run the branch at that priority.
  bool BranchPriority() const { return branch_priority_; }
  KernelStatus AfterFc2(int layer, const void* mlp, void* h, cudaStream_t stream);
  // x = the final-LN rows that feed the LM head, logits [rows, ld_logits] float32
  // (model/cuda_lora_last_rows.cc).
  KernelStatus AfterLmHead(const void* x, float* logits, int ld_logits, cudaStream_t stream);
  // The trimmed last layer of a prefill step (model/cuda_phi_last_rows.cc; SGMV and GEMM-form
  // steps alike): AfterQkv on every row as in the other layers (every row's K/V goes into the
  // cache), then fc1, dense and fc2 on the logit rows only, whose deltas these add with the SGMV
  // kernels over the lm_head's logit tiles (row r of x and y is the step's logit row r):
  // LastRowsAfterFc1 into mlp_r [logit rows, I] device (fc1 ran without its activation when
  // SplitFc1; the GELU after, on every logit row), LastRowsAfterResidual into out
  // [logit rows, H] device (dense's and fc2's deltas, one rounding). model/cuda_lora_last_rows.cc.
  bool LastRowsSupported() const { return active_ && !all_ops_; }
  KernelStatus LastRowsAfterFc1(int layer, const void* normed_r, void* mlp_r, GemmEpilogue act,
                                cudaStream_t stream);
  KernelStatus LastRowsAfterResidual(int layer, const void* attn_r, const void* mlp_r, void* out,
                                     cudaStream_t stream);

 private:
  // The GEMM form's buffers for one layer (in its workspace; see the members below).
  struct GemmBufs {
    float* t = nullptr;
    void* tm = nullptr;
    void *a_qkvf = nullptr, *a_dense = nullptr, *a_fc2 = nullptr;
    void *b_q = nullptr, *b_k = nullptr, *b_v = nullptr, *b_fc1 = nullptr, *b_res = nullptr;
    void* b_qkv = nullptr;  // the merged q / k / v expand's block-diagonal B (gemm_qkv_merge_)
  };
  struct Slot {
    const LoraAdapter* adapter = nullptr;
    uint64_t serial = 0;
    void* mem = nullptr;
    size_t bytes = 0;
    int max_rank = 0;
    std::vector<bool> present;  // [stride]
  };
  int stride() const { return 6 * config_.num_hidden_layers + 1; }
  int Entry(int layer, int target) const { return layer * 6 + target; }
  absl::Status Upload(int slot, const LoraAdapter& a, cudaStream_t stream);
  void FreeSlot(int slot);
  void FreeAll();
  absl::Status EnsureBuffers(int rows, cudaStream_t stream);
  absl::Status ReserveNow(cudaStream_t stream);
  void EnsureOverlapStream();
  // The GEMM form's cuBLASLt handle, workspace and row map for `rows` rows (gemm_failed_ set and
  // OK when cuBLASLt cannot be set up).
  absl::Status EnsureGemmBuffers(int rows, cudaStream_t stream);
  SgmvTableRef Ref(bool logits) const;
  // Over the logit tiles (Ref(true)): t = the shrink of sp's ops (their windows of t), then
  // y += the expand of t (model/cuda_lora_last_rows.cc: the lm_head delta, the trimmed layer's).
  KernelStatus LogitRowsDelta(SgmvGroupedShrinkParams sp, const SgmvExpandOp& y,
                              cudaStream_t stream) const;
  // Decode steps: SgmvDecodeExpandCuda (PDL, act fused); others: the grouped expand.
  KernelStatus Expand(const SgmvGroupedExpandParams& ep, GemmEpilogue act,
                      cudaStream_t stream) const;
  // Decode steps with every rank <= kSgmvFusedMaxRank (unless PHISHARD_LORA_FUSED=0): each
  // hook is one SgmvDecodeFusedCuda launch (shrink + expand, no t buffer, no side stream).
  bool FusedStep() const;
  // Beside mode (model/cuda_lora_beside.cc): the side streams, events and the delta buffer
  // float32 [delta_rows_, qkv width + intermediate + hidden] (qkv deltas, fc1's, dense's; zeroed
  // when made), made by Reserve (PlanBeside with grow) for the decode buckets; at each decode
  // step PlanBeside (no growth; false leaves the step on the fused launches), the fork, and the
  // joins + folds of AfterQkv / AfterFc1.
  bool PlanBeside(int rows, bool grow);
  KernelStatus BesideFork(int layer, const void* normed, cudaStream_t stream);
  KernelStatus BesideFold(bool fc1, int layer, void* y, GemmEpilogue act, cudaStream_t stream);
  // AfterQkv in beside mode: the join, then the fold, or (rotary fold) a pending fold.
  KernelStatus BesideAfterQkv(int layer, void* qkv, cudaStream_t stream);
  // AfterResidual with dense's delta forked by BeforeDense: fold it now or leave it pending.
  KernelStatus DenseAfterResidual(int layer, void* h, cudaStream_t stream);
  // Columns of the delta buffer: q / k / v, fc1, dense (W + I + H).
  int DeltaLd() const {
    const PhiConfig& c = config_;
    return (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + c.intermediate_size +
           c.hidden_size;
  }
  void FreeBeside();
  // hook: kHookQkv .. kHookResidual (the column blocks SetDecodeTuning set for it).
  KernelStatus Fused(SgmvFusedParams& fp, GemmEpilogue act, cudaStream_t stream, int hook) const;
  // The shrinks of AfterQkv (x = LN output) and AfterResidual (x = attention / GELU output).
  SgmvGroupedShrinkParams QkvShrink(int layer, const void* normed) const;
  SgmvGroupedShrinkParams ResidualShrink(int layer, const void* attn, const void* mlp) const;
  // Launches `sp` on side_ after the work enqueued on `stream` so far (fork); *pending is set
  // once the join event is recorded behind it. Join makes `stream` wait for it.
  KernelStatus ForkShrink(const SgmvGroupedShrinkParams& sp, cudaStream_t stream, bool* pending);
  KernelStatus Join(bool* pending, cudaStream_t stream);
  // GEMM form (model/cuda_lora_gemm.cc): plans the step (gemm_step_ stays false when the step
  // does not qualify or its buffers do not fit), and the three layer hooks.
  absl::Status PlanGemm(const ForwardBatch& batch, cudaStream_t stream);
  KernelStatus GemmAfterQkv(int layer, const void* normed, void* qkv, cudaStream_t stream);
  // Gathers `layer`'s A / B matrices into m's (LoraGatherCuda).
  KernelStatus GemmGather(int layer, const GemmBufs& m, cudaStream_t stream);
  // Whether some adapter of the step adapts a module of `layer`.
  bool GemmLayerAdapted(int layer) const;
  // Whether `layer`'s q / k / v deltas run as one merged expand: a merged step (B_qkv in the
  // workspace) and every one of q / k / v launched in the layer (else the gathers fill B_q / B_k /
  // B_v and the three expands run, as without the merge).
  bool GemmQkvMerged(int layer) const;
  // Points gb_ at `layer`'s set, then waits for a prefetch in flight (any layer's) and, unless
  // it was this layer's, gathers in line.
  KernelStatus GemmLayerMats(int layer, cudaStream_t stream);
  // Forks `layer`'s gathers onto side_ into set layer & 1 (see the prefetch above); nothing when
  // there is one set, no side stream, a prefetch in flight or nothing to gather.
  KernelStatus GemmPrefetch(int layer, cudaStream_t stream);
  KernelStatus GemmQkv(int layer, const void* normed, void* qkv, bool first, cudaStream_t stream);
  // Zeroes the rows of the step's base runs in y [rows, width] (dtype, device).
  KernelStatus ZeroBaseRuns(void* y, int width, cudaStream_t stream);
  KernelStatus GemmAfterFc1(int layer, void* mlp, GemmEpilogue act, cudaStream_t stream);
  KernelStatus GemmAfterResidual(int layer, const void* attn, const void* mlp, void* h,
                                 cudaStream_t stream);
  KernelStatus Gemm(const GemmParams& p, DataType y_dtype, cudaStream_t stream);
  KernelStatus GemmMask(int layer, int first_block, int num_blocks, cudaStream_t stream);
  // One LoraSegmentExpandCuda over the step's segments (segmented steps).
  KernelStatus GemmSegmentExpand(int t_block, int parts, const void* b, int ldb, void* y, int ldy,
                                 int n, GemmEpilogue act, cudaStream_t stream,
                                 bool accumulate = true);
  // One LoraSegmentShrinkCuda into t (float32, row stride 6 W) at column t_col.
  KernelStatus GemmSegmentShrink(const void* x, int ldx, int k, const void* a, int blocks,
                                 int t_col, cudaStream_t stream);
  void FreeGemm();
  // Decode steps launch every module some loaded adapter has adapted (so one graph serves every
  // mix of them), other steps the modules this step's adapters adapt.
  bool Launch(int entry) const { return all_ops_ ? loaded_present_[entry] : step_present_[entry]; }

  PhiConfig config_;
  DataType dtype_;
  int device_;
  const AdapterRegistry* registry_ = nullptr;
  uint64_t synced_generation_ = ~uint64_t{0};
  std::vector<Slot> slots_;
  std::vector<SgmvWeight> table_host_;  // [num_slots, stride]
  SgmvWeight* table_dev_ = nullptr;
  int64_t adapter_bytes_ = 0;
  int rank_cap_ = 0;  // ranks the t buffer and the kernels' grids cover (power of two >= 16)

  // Plan buffer (pinned host staging and device, same layout) and the t buffer.
  void* plan_host_ = nullptr;
  void* plan_dev_ = nullptr;
  int plan_tiles_ = 0;  // tile capacity
  float* t_dev_ = nullptr;
  int t_rows_ = 0;
  int t_rank_ = 0;
  bool graphs_stale_ = false;
  // Overlap: the side stream and its fork / join events (made at the first active Plan; when
  // they cannot be made the shrinks stay on the main stream), and which shrinks ran early.
  bool overlap_ = true;
  bool fused_ = true;       // PHISHARD_LORA_FUSED=0: decode steps on the shrink + expand kernels
  int branch_mode_ = 3;     // PHISHARD_LORA_BRANCH (BranchHooks)
  bool join_early_ = true;  // PHISHARD_LORA_JOIN_EARLY / SetDecodeTuning
  int branch_gemm_sms_[2] = {0, 0};  // SetDecodeTuning (BranchGemmSms)
  bool branch_priority_ = false;     // PHISHARD_LORA_BRANCH_PRIORITY
  // Column blocks of the fused launches, by hook, and their PDL attribute (SetDecodeTuning).
  static constexpr int kHookQkv = 0, kHookFc1 = 1, kHookFc2 = 2, kHookResidual = 3, kNumHooks = 4;
  int hook_cols_[kNumHooks] = {0, 0, 0, 0};
  bool fused_pdl_ = true;
  cudaStream_t side_ = nullptr;
  DeviceEvent* fork_ev_ = nullptr;
  DeviceEvent* join_ev_ = nullptr;
  bool qkv_pending_ = false;
  bool res_pending_ = false;
  bool beside_ = true;        // PHISHARD_LORA_BESIDE / SetDecodeTuning
  bool beside_step_ = false;  // this step forks its deltas (PlanBeside succeeded)
  int64_t beside_steps_ = 0;  // steps with beside_step_ (beside_steps())
  cudaStream_t beside_streams_[2] = {nullptr, nullptr};  // q / k / v deltas, fc1's
  DeviceEvent* beside_fork_ev_ = nullptr;
  DeviceEvent* beside_done_ev_[3] = {nullptr, nullptr, nullptr};  // ... and dense's delta
  bool beside_pending_[2] = {false, false};
  float* delta_dev_ = nullptr;
  int delta_rows_ = 0;
  bool beside_failed_ = false;     // streams / events could not be made: fused launches only
  int dense_beside_ = 2;           // PHISHARD_LORA_DENSE_BESIDE / SetDecodeTuning (BeforeDense)
  bool dense_pending_ = false;     // dense's delta forked and not yet folded
  bool rotary_fold_ = true;        // PHISHARD_LORA_ROTARY_FOLD / SetDecodeTuning (FoldIntoRotary)
  bool qkv_fold_pending_ = false;  // q / k / v deltas joined, for the rotary to fold

  // The current step.
  bool active_ = false;
  bool all_ops_ = false;
  int rows_ = 0;        // rows of x / y for the layer hooks
  int logit_rows_ = 0;  // rows of the LM head
  int max_tok_tiles_ = 0;
  int max_logit_tiles_ = 0;
  int logit_offset_ = 0;              // first logit tile in the plan buffer
  std::vector<bool> step_present_;    // [stride]: some adapter of the step adapts the entry
  std::vector<bool> loaded_present_;  // [stride]: some adapter loaded so far adapts the entry
  std::vector<int32_t> seq_slot_;

  // GEMM form. One device workspace of kLoraGemmWorkspaceBytes (allocated at the first such
  // step) holds, for the current layer (w = 2 with the split T, else 1): t float32 [rows, 6 R],
  // T dtype [rows, 6 w R] (module blocks q, k, v, fc1, dense, fc2 of w R columns: hi then lo),
  // A_qkvf [4 R, H], A_dense [R, A], A_fc2 [R, I], B_q [nq, w R], B_k / B_v [nkv, w R], B_fc1
  // [I, w R], B_res [H, 2 w R] (dense then fc2 blocks; each block B, or B | B against hi | lo).
  // Segmented steps use T [rows, 6 w W] compact and B with each adapter's parts side by side
  // (see gemm_segmented_).
  // The step's adapters and the row map (int32 [rows], index into them or -1) are uploaded per
  // step.
  int gemm_min_rows_ = 128;
  bool gemm_fused_gelu_ = true;  // PHISHARD_LORA_GEMM_FUSED_GELU=0: separate activation kernel
  // T as hi + lo (LoraMaskParams::split): the expands then carry t x scale to ~2^-16 instead of
  // bf16's 2^-9, which the peft goldens need (one case at 0.019 norm-rel without it, bound
  // 0.015); costs ~1 ms of the 8x512 prefill. PHISHARD_LORA_GEMM_SPLIT_T=0 turns it off. Only
  // fc1's expand (GELU epilogue) adds the full-precision product to y: cuBLASLt's default
  // epilogue rounds the product to bf16 before adding it (measured; kernels/cuda/gemm_cuda.h),
  // so q / k / v / the residual get the delta to 2^-8 relative, not y's one rounding.
  bool gemm_split_t_ = true;
  // PHISHARD_LORA_GEMM_SGMV_SHRINK=1: the shrinks on the SGMV kernels (16-row tiles, each row's
  // own adapter only) into the t buffer, the mask reading that layout (measured ~1.5 ms slower on
  // the 8x512 prefill than the cuBLASLt shrinks; kept as a measured alternative).
  bool gemm_sgmv_shrink_ = false;
  // Segmented expands (LoraSegmentExpandCuda): steps of at most gemm_max_segments_ adapter
  // segments, each at least ~one GEMM tile of rows on average, expand each segment by its own
  // GEMMs against its adapter's columns (T compact, [rows, 6 w W] with W the widest adapter:
  // blocks q, k, v, fc1 of w W columns, then dense | fc2 side by side per adapter) instead of
  // the concatenated T · B_catᵀ, whose tensor work is R / width_a times a row's own. Other steps
  // keep the concatenated form (5 GEMMs a layer however many segments).
  // PHISHARD_LORA_GEMM_MAX_SEGMENTS (default 16; 0: always concatenated): 16 unequal segments
  // are up to 128 GEMM launches a layer (5 expands + 3 shrinks each; ~16 ms of host enqueue a
  // Phi-2 step at ~4 us each), about the GPU time of such a step at the minimum rows below; more
  // segments would leave the GPU waiting on the host (equal consecutive segments are one launch).
  // PHISHARD_LORA_GEMM_SEGMENT_ROWS (default 64): fewest adapter rows per segment on average; a
  // cuBLASLt tile is 64-256 rows, so shorter segments pay a mostly empty tile each where the
  // concatenated form pays R / width_a.
  int gemm_max_segments_ = 16;
  int gemm_segment_rows_ = 64;
  bool gemm_segmented_ = false;
  // Segmented steps also shrink per segment (LoraSegmentShrinkCuda: A_qkvf gathered with each
  // adapter's q, k, v, fc1 blocks side by side, t [rows, 6 W] float32 with a row's own blocks at
  // b width_a (q, k, v, fc1), 4 W (dense) and 5 W (fc2)) instead of every adapter's shrink for
  // every row (the concatenated shrinks' n = 4 R, R, R). PHISHARD_LORA_GEMM_SEGMENT_SHRINK=0
  // keeps the concatenated shrinks in segmented steps. Not with the SGMV shrinks.
  bool gemm_segment_shrink_ = true;
  bool gemm_shrink_segmented_ = false;       // this step: gemm_segmented_ && the above
  int gemm_ldt_ = 0;                         // T's row stride (columns) in this step
  std::vector<LoraSegment> gemm_segments_;   // the step's adapter segments (segmented steps)
  std::vector<LoraSegment> gemm_base_runs_;  // its runs of base rows (row, rows)
  std::unique_ptr<CudaGemm> gemm_;
  int reserve_rows_ = 0, reserve_decode_rows_ = 0;  // Reserve's sizes
  bool gemm_failed_ = false;                        // cuBLASLt could not be set up: SGMV only
  void* gemm_ws_ = nullptr;
  void* gemm_map_host_ = nullptr;  // pinned: LoraStepAdapter [kMaxGemmAdapters] + int32 [rows]
  void* gemm_map_dev_ = nullptr;
  int gemm_map_rows_ = 0;
  bool gemm_step_ = false;
  bool gemm_delta_first_ = true;  // GemmQkvDeltaFirst
  // The layer whose q / k / v deltas ran first in this step, or -1 (GemmQkvDeltaFirst).
  int qkv_first_layer_ = -1;
  int64_t qkv_first_layers_ = 0;
  int gather_chunks_ = 8;  // LoraGatherParams::chunks_per_thread (SetPrefillTuning)
  int gemm_r_ = 0;         // R
  int gemm_adapters_ = 0;
  int gemm_max_width_ = 0;
  GemmBufs gb_;                // the current layer's
  GemmBufs gemm_sets_[2];      // set 0 and, when the workspace holds it, set 1 (else = set 0)
  bool gemm_double_ = false;   // this step has two sets
  bool gemm_prefetch_ = true;  // PHISHARD_LORA_GEMM_PREFETCH / SetPrefillTuning
  int prefetch_layer_ = -1;    // the layer whose prefetch is in flight (not yet waited for)
  int64_t prefetched_layers_ = 0;
  bool gemm_qkv_merge_ = false;       // PHISHARD_LORA_GEMM_QKV_MERGE / SetPrefillTuning
  bool gemm_qkv_merge_step_ = false;  // this step: segmented, B_qkv in both sets
  int gemm_qkv_ldb_ = 0;              // B_qkv's row stride: 3 w W x the step's adapters
  // The merged expand's segments: adapter a's rows at col a W, width W (B_qkv's pitch).
  std::vector<LoraSegment> gemm_qkv_segments_;
  int64_t qkv_merged_layers_ = 0;
  // fc1's delta + GELU in segmented steps as one pass over the pre-activation
  // (model/cuda_lora_fc1.cc; PHISHARD_LORA_GEMM_FC1_KERNEL=1 / SetPrefillTuning field 5). Off:
  // correct (peft goldens, mixed batch = alone, within one ulp of the GEMMs) but slower on the
  // H200, 83 us against cuBLASLt's 67 us at 4096 x 10240 (97.5 / 77.7 us a layer in the step:
  // ~2 TB/s, too few bytes in flight per SM), pairs 83.6 vs 84.8 % (docs/perf-log.md, lorap6).
  bool gemm_fc1_kernel_ = false;
  int64_t fc1_kernel_layers_ = 0;
  KernelStatus GemmFc1Kernel(void* mlp, GemmEpilogue act, cudaStream_t stream, bool* done);
  DeviceEvent* prefetch_fork_ev_ = nullptr;
  DeviceEvent* prefetch_done_ev_ = nullptr;
};

}  // namespace phishard
