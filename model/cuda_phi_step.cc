// CudaPhiModel's steps: the layer loop both paths share, the LM head and the eager prefill path
// (the decode path: cuda_phi_decode.cc).
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "kernels/cuda/embedding_cuda.h"
#include "kernels/cuda/gelu_cuda.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/layer_norm_cuda.h"
#include "kernels/cuda/paged_attention_cuda.h"
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "kernels/device_event.h"
#include "model/cuda_graph_runner.h"
#include "model/cuda_lora.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"

namespace phishard {
namespace {

using cuda_model::ArenaLayout;
using cuda_model::MakeArenaLayout;
using cuda_model::MakeDecodePlan;
using cuda_model::MakeMetaLayout;
using cuda_model::MetaLayout;
using cuda_model::VocabPad;

}  // namespace

absl::Status CudaPhiModel::Linear(const GemmParams& p, DataType y_dtype, const char* op,
                                  const GemmParams* second, cudaStream_t stream, CudaGemm* gemm) {
  if (stream == nullptr) stream = stream_;
  if (gemm == nullptr) gemm = gemm_.get();
  // GEMV where it measured faster (CudaModelOptions::gemv_max_rows, gemv_single_segment): the
  // fused residual pair and the float32 LM head; qkv and fc1 only when asked.
  // The bulk GEMV on every layer of steps up to bulk_rows_ rows (CudaModelOptions::bulk_gemv_*).
  const bool gemv_shape = second != nullptr || y_dtype == DataType::kF32 || gemv_single_segment_;
  if ((p.m <= gemv_max_rows_ && gemv_shape) || p.m <= bulk_rows_) {
    GemvParams g{.a = p, .y_dtype = y_dtype, .programmatic_launch = pdl_};
    if (second != nullptr) {
      g.x2 = second->x;
      g.w2 = second->w;
      g.bias2 = second->bias;
      g.k2 = second->k;
      g.ldx2 = second->ldx;
    }
    if (p.m <= bulk_rows_) {
      GemvParams b = g;
      b.bulk = true;
      b.programmatic_launch = bulk_pdl_;
      if (GemvCudaSupports(b)) return KernelResult(GemvCuda(b, stream), op);
    }
    if (p.m <= gemv_max_rows_ && gemv_shape && GemvCudaSupports(g)) {
      return KernelResult(GemvCuda(g, stream), op);
    }
  }
  PHI_RETURN_IF_ERROR(KernelResult(gemm->Run(p, y_dtype, stream), op));
  if (second != nullptr) {
    PHI_RETURN_IF_ERROR(KernelResult(gemm->Run(*second, y_dtype, stream), op));
  }
  return absl::OkStatus();
}

// Embedding and every layer; leaves the residual stream in the arena's h rows.
absl::Status CudaPhiModel::EnqueueLayers(const StepInputs& in) {
  const PhiConfig& c = config_;
  const int T = in.tokens;
  const int H = c.hidden_size, nH = c.num_attention_heads, nKV = c.num_key_value_heads;
  const int hd = c.head_dim, qkv_width = (nH + 2 * nKV) * hd;
  const ArenaLayout al = MakeArenaLayout(c, arena_tokens_);
  char* a = static_cast<char*>(arena_);
  void* h = a + al.h;
  void* normed = a + al.normed;
  void* qkv = a + al.qkv;
  void* attn = a + al.attn;
  void* mlp = a + al.mlp;
  const size_t layer_kv_bytes = static_cast<size_t>(kv_num_blocks_) * kv_block_size_ * nKV * hd * 2;
  const GemmEpilogue act =
      c.hidden_act == Activation::kGeluTanh ? GemmEpilogue::kGeluTanh : GemmEpilogue::kGeluErf;
  const DataType dt = dtype_;
  const bool lora = lora_->active();  // some row has an adapter (model/cuda_lora.h hooks)
  // The MLP branch on its own stream (CudaModelOptions::mlp_stream) in decode steps; steps with
  // adapter rows only when their hooks are the fused launches (CudaLora::BranchHooks; sharded
  // LoRA steps keep one stream: not yet run with NCCL), sharded steps only with
  // PHISHARD_MLP_STREAM_TP. Prefill steps (set_prefill_mlp_fork; unsharded, no adapter rows) fork
  // with fc1 alone on the branch, dense + fc2 after the join as without the fork (bit-identical):
  // at the H200's power cap 1x2048 ran 0.5 ms faster so (docs/perf-log.md, pre3 run 2). GEMM-form
  // LoRA prefill steps fork too, fc1's delta on the branch after AfterQkv (lora_fc1_branch).
  const bool prefill_fork = !in.decode && prefill_mlp_fork_ && mlp_mode_ != kMlpStreamOff &&
                            (!lora || lora_->gemm_step()) &&
                            (!shard_.sharded() || (prefill_mlp_fork_tp_ && !lora)) &&
                            in.chunks == nullptr;
  const bool mlp_fork = prefill_fork || (mlp_mode_ != kMlpStreamOff && in.decode &&
                                         (!shard_.sharded() || (mlp_sharded_ && !lora)) &&
                                         (!lora || lora_->BranchHooks()));
  const bool fc2_on_branch = mlp_fork && !prefill_fork && mlp_mode_ == kMlpStreamFc1Fc2;
  if (prefill_fork) ++prefill_mlp_fork_steps_;
  // GEMM-form LoRA steps write the q / k / v deltas before the qkv GEMM, which then adds to them
  // (CudaLora::GemmQkvDeltaFirst; unsharded, one row range).
  const bool lora_first = lora && lora_->gemm_step() && !shard_.sharded() && in.chunks == nullptr;
  // Steps with adapter rows may join the branch before attention (CudaLora::JoinBeforeAttention),
  // sharded base steps too (set_mlp_stream_sharded).
  const bool join_early =
      mlp_fork && !prefill_fork &&
      (lora ? lora_->JoinBeforeAttention() : shard_.sharded() && mlp_join_sharded_ > 0);
  // ... and then run fc2's GEMM on the main stream before attention, its delta on the branch
  // beside attention (CudaLora::Fc2DeltaBesideAttention).
  const bool fc2_main = join_early && fc2_on_branch &&
                        (lora ? lora_->Fc2DeltaBesideAttention() : mlp_join_sharded_ == 2);
  // Base decode steps in fc1's variant (DecodeVariantRules::Fc1Narrow: its row range, enough K/V)
  // give fc1 on the MLP branch a cuBLASLt SM count target (CudaModelOptions::decode_fc1_sms):
  // more SMs for qkv and the attention grid beside it.
  const bool fc1_sms = in.decode && !lora && in.fc1_narrow;
  if (fc1_sms) ++fc1_sms_steps_;
  // The MLP branch's fc1 (and fc2) done before anything after this reads mlp or h.
  auto mlp_join = [&]() -> absl::Status {
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceEventRecord(mlp_join_ev_, mlp_stream_), "MLP join"));
    return DeviceStatus(DeviceStreamWaitEvent(stream_, mlp_join_ev_), "MLP join wait");
  };
  // GEMM-form LoRA prefill forks (prefill_fork with adapter rows): fc1's delta reads the fc1
  // block of the mask AfterQkv wrote and shares the GEMM form's cuBLASLt workspace with its q / k
  // / v expands, so the branch waits for AfterQkv; the main stream then runs only rotary and
  // attention (no LoRA GEMM) until the join.
  auto lora_fc1_branch = [&](int l) -> absl::Status {
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceEventRecord(mlp_fork_ev_, stream_), "lora fc1 fork"));
    PHI_RETURN_IF_ERROR(
        DeviceStatus(DeviceStreamWaitEvent(mlp_stream_, mlp_fork_ev_), "lora fc1 fork wait"));
    return KernelResult(lora_->AfterFc1(l, normed, mlp, act, mlp_stream_), "lora fc1");
  };
  // LayerNorm folded into the qkv and fc1 bulk GEMVs (x = h; CudaModelOptions::bulk_gemv_ln):
  // steps of <= bulk_rows_ rows without adapter rows (their hooks read the normed rows) or row
  // chunks. With fc2 on the MLP stream, fc2 (h +=) waits for qkv (reads h): qkv_done_ev_.
  auto ln_gemv = [&](const GemmParams& p, const Layer& w) {
    return GemvParams{.a = p,
                      .y_dtype = dt,
                      .programmatic_launch = bulk_pdl_,
                      .bulk = true,
                      .ln_weight = w.ln_w,
                      .ln_bias = w.ln_b,
                      .ln_eps = static_cast<float>(c.layer_norm_eps)};
  };
  auto linear = [&](const void* x, const void* w, const void* bias, void* y, int n, int k,
                    bool accumulate, GemmEpilogue epi) {
    return GemmParams{.x = x,
                      .w = w,
                      .bias = bias,
                      .y = y,
                      .m = T,
                      .n = n,
                      .k = k,
                      .accumulate = accumulate,
                      .epilogue = epi,
                      .dtype = dt};
  };
  const bool ln_fused = bulk_ln_ && T <= bulk_rows_ && !lora && in.chunks == nullptr &&
                        GemvCudaSupports(ln_gemv(linear(h, layers_[0].qkv_w, layers_[0].qkv_b, qkv,
                                                        qkv_width, H, false, GemmEpilogue::kNone),
                                                 layers_[0])) &&
                        GemvCudaSupports(ln_gemv(linear(h, layers_[0].fc1_w, layers_[0].fc1_b, mlp,
                                                        c.intermediate_size, H, false, act),
                                                 layers_[0]));
  // Prefill forks without adapter rows take fc1's GELU off its GEMM (set_prefill_gelu_split): a
  // bias-only fc1, then the in-place GELU on the MLP stream before the join, beside attention.
  const bool gelu_split = prefill_fork && !lora && !ln_fused && prefill_gelu_split_;
  if (gelu_split) ++prefill_gelu_split_steps_;
  // Rows [rr.begin, rr.begin + rr.rows) of an arena buffer of `width` columns, and a GEMM on them.
  const size_t es = DataTypeSize(dt);
  auto at = [&](void* base, const RowRange& rr, int width) -> void* {
    return static_cast<char*>(base) + static_cast<size_t>(rr.begin) * width * es;
  };
  auto rows_of = [](GemmParams p, const RowRange& rr) {
    p.m = rr.rows;
    return p;
  };

  PHI_RETURN_IF_ERROR(EnqueueEmbedding(in.ids, h, T));
  // Row ranges of the ops next to the all-reduces (LayerNorm, qkv, rotary; dense + fc2): the whole
  // step, or the chunks of an overlapped prefill, whose hooks replace the all-reduces.
  const std::vector<RowRange> whole_step = {{0, T}};
  const std::vector<RowRange>& ranges = in.chunks ? in.chunks->ranges : whole_step;
  if (in.chunks) {
    for (int ch = 0; ch < static_cast<int>(ranges.size()); ++ch) {
      PHI_RETURN_IF_ERROR(in.chunks->after_tail(-1, ch));
    }
  } else {
    PHI_RETURN_IF_ERROR(TpAllReduce(h, T, "embedding all-reduce"));  // vocab-parallel rows
  }
  // Prefill: attention stores the new K/V into the cache (set_prefill_kv_store), rotary rotates.
  // Not when every sequence has one query row: PagedAttentionCuda runs its decode kernel then,
  // which does not store.
  const bool kv_store = !in.decode && prefill_kv_store_ && in.max_q_len > 1;
  PagedAttentionCudaPlan prefill_plan;
  prefill_plan.max_q_len = in.max_q_len;
  prefill_plan.max_context_len = in.max_ctx;
  prefill_plan.workspace = a + al.attn_ws;
  prefill_plan.workspace_bytes = al.attn_ws_bytes;
  prefill_plan.num_multiprocessors = multiprocessors_;
  prefill_plan.prefill_tiling = static_cast<PrefillTiling>(prefill_attention_tiling_);
  PagedDecodeCudaPlan decode_plan = MakeDecodePlan(in.min_live, nH, multiprocessors_, a, al);
  decode_plan.step_info = in.step_info;
  decode_plan.variant = static_cast<PagedDecodeVariant>(decode_attention_variant_);
  // CudaModelOptions::decode_short_regs_rows: short contexts on the register-staged kernel.
  if (in.decode && in.short_regs && !lora && decode_plan.variant == PagedDecodeVariant::kAuto) {
    decode_plan.variant = PagedDecodeVariant::kRegisterStages;
    ++short_regs_steps_;
  }
  // CudaModelOptions::decode_warp_heads: steps whose query heads fill the GPU several times over.
  if (in.decode && in.warp_heads && !lora && decode_plan.variant == PagedDecodeVariant::kAuto) {
    decode_plan.variant = PagedDecodeVariant::kWarpPerHead;
    ++warp_heads_steps_;
  }
  // Decode steps without adapter rows (LoRA folds its deltas into the rotary launch), unsharded
  // (not run with NCCL yet): rotary + K/V write and the split merge inside the attention launch
  // (set_decode_attention_fold_rows: steps of up to that many rows; bit-identical,
  // kernels/cuda/paged_decode_cuda.h).
  const bool fold_attention = in.decode && (T <= decode_fold_rows_ || in.fold_short) &&
                              in.merge_counters != nullptr && !lora && !shard_.sharded() &&
                              in.chunks == nullptr && PlainRotary();
  if (fold_attention) {
    ++decode_fold_steps_;
    decode_plan.merge_counters = in.merge_counters;
    decode_plan.merge_counters_len = in.merge_counters_len;
  }
  // CudaModelOptions::decode_dense_bulk_rows: dense through the bulk GEMV, a programmatic
  // dependent launched at the fused attention's start (after the join with fc2's branch), and the
  // LayerNorms launched as programmatic dependents (of the GEMV before, or the embedding). With
  // fc2 on the MLP branch, dense is h += attn · dense_w + dense_b (its `.a` for cuBLASLt).
  auto dense_gemv = [&](const Layer& w) {
    return GemvParams{
        .a = linear(attn, w.dense_w, w.dense_b, h, H, nH * hd, true, GemmEpilogue::kNone),
        .y_dtype = dt,
        .programmatic_launch = true,
        .bulk = true};
  };
  const bool dense_bulk = fold_attention && fc2_on_branch && !join_early && T <= dense_bulk_rows_ &&
                          GemvCudaSupports(dense_gemv(layers_[0]));
  if (dense_bulk) {
    ++dense_bulk_steps_;
    decode_plan.trigger_dependents_early = true;
  }
  // CudaModelOptions::decode_fc2_defer: in steps with fc1's SM target (the MLP branch the longer)
  // fc2 goes into its own float32 rows, added into h by the next LayerNorm, so dense need not
  // wait for the branch.
  const int last_layer = c.num_hidden_layers - (in.skip_last_layer ? 1 : 0) - 1;
  const bool fc2_defer = fc2_defer_ && fc1_sms && fc2_on_branch && !fc2_main && !join_early &&
                         !lora && !ln_fused && !shard_.sharded() && in.chunks == nullptr &&
                         fc2_defer_dev_ != nullptr && T <= decode_rows_ &&
                         (fc2_bias_f32_ != nullptr || layers_[0].fc2_b == nullptr);
  if (fc2_defer) ++fc2_defer_steps_;
  for (int l = 0; l < c.num_hidden_layers - (in.skip_last_layer ? 1 : 0); ++l) {
    const Layer& w = layers_[l];
    char* k_cache = static_cast<char*>(kv_) + 2 * l * layer_kv_bytes;
    char* v_cache = k_cache + layer_kv_bytes;
    // n = LN(h) feeds both branches (parallel residual); h += dense(attn) + fc2(gelu(fc1(n))),
    // both accumulating straight into the residual stream (dense first, or fc2 first when fc2
    // runs on the MLP stream). Sharded: rank 0 does the same with its partial sums (and the
    // biases), the other ranks overwrite h with their first partial and add the second, and one
    // all-reduce of h per layer sums residual + every rank's partials.
    // The MLP branch reads only n; on its own stream it runs beside qkv -> rotary -> attention.
    // h (+)= fc2(mlp) on `st` with `g`, then its LoRA delta on `delta_st` (forked from `st`).
    const bool defer_this = fc2_defer && l < last_layer;  // the next LayerNorm adds fc2
    const bool fold_prev = fc2_defer && l > 0;            // this one adds layer l - 1's
    auto fc2_part = [&](cudaStream_t st, CudaGemm* g, cudaStream_t delta_st) -> absl::Status {
      if (defer_this) {  // fc2(mlp) + b -> float32 rows, cuBLASLt on the branch as without it
        // (its bias in float32 like the output: GemmParams::bias has y's type)
        const void* bias_f32 = w.fc2_b ? fc2_bias_f32_ + static_cast<size_t>(l) * H : nullptr;
        const GemmParams fc2 = linear(mlp, w.fc2_w, bias_f32, fc2_defer_dev_, H,
                                      c.intermediate_size, false, GemmEpilogue::kNone);
        return KernelResult(g->Run(fc2, DataType::kF32, st), "fc2 gemm (deferred)");
      }
      // Rank 0 (or unsharded) adds to the residual, the other ranks start their partial.
      GemmParams fc2 = linear(mlp, w.fc2_w, w.fc2_b, h, H, c.intermediate_size,
                              shard_.adds_row_parallel_bias(), GemmEpilogue::kNone);
      if (st == mlp_stream_) fc2.sm_count_target = lora_->BranchGemmSms(0);  // LoRA steps
      PHI_RETURN_IF_ERROR(Linear(fc2, dt, "fc2 gemm", nullptr, st, g));
      if (!lora) return absl::OkStatus();
      if (delta_st != st) {
        PHI_RETURN_IF_ERROR(DeviceStatus(DeviceEventRecord(mlp_fork_ev_, st), "fc2 fork"));
        PHI_RETURN_IF_ERROR(
            DeviceStatus(DeviceStreamWaitEvent(delta_st, mlp_fork_ev_), "fc2 fork wait"));
      }
      return KernelResult(lora_->AfterFc2(l, mlp, h, delta_st), "lora fc2");
    };
    auto mlp_branch = [&](cudaStream_t st, CudaGemm* g) -> absl::Status {
      const GemmEpilogue fc1_act = lora_->SplitFc1(l) || gelu_split ? GemmEpilogue::kNone : act;
      if (ln_fused) {
        PHI_RETURN_IF_ERROR(KernelResult(
            GemvCuda(
                ln_gemv(linear(h, w.fc1_w, w.fc1_b, mlp, c.intermediate_size, H, false, act), w),
                st),
            "layer_norm + fc1 gemv"));
      } else {
        GemmParams fc1 =
            linear(normed, w.fc1_w, w.fc1_b, mlp, c.intermediate_size, H, false, fc1_act);
        if (st == mlp_stream_) fc1.sm_count_target = lora_->BranchGemmSms(1);  // LoRA steps
        if (st == mlp_stream_ && fc1_sms) fc1.sm_count_target = fc1_sms_;
        PHI_RETURN_IF_ERROR(Linear(fc1, dt, "fc1 gemm", nullptr, st, g));
      }
      if (gelu_split) {  // mlp [T, intermediate] device, in place
        PHI_RETURN_IF_ERROR(KernelResult(
            GeluInPlaceCuda(
                {.y = mlp, .rows = T, .cols = c.intermediate_size, .act = act, .dtype = dt}, st),
            "fc1 gelu"));
      }
      if (lora && !prefill_fork) {
        PHI_RETURN_IF_ERROR(KernelResult(lora_->AfterFc1(l, normed, mlp, act, st), "lora fc1"));
      }
      if (fc2_on_branch && !fc2_main) {
        if (ln_fused) {
          PHI_RETURN_IF_ERROR(
              DeviceStatus(DeviceStreamWaitEvent(mlp_stream_, qkv_done_ev_), "qkv done wait"));
        }
        PHI_RETURN_IF_ERROR(fc2_part(st, g, st));
      }
      return absl::OkStatus();
    };
    // The LoRA shrinks beside the base GEMMs (model/cuda_lora.h, overlap); sharded steps keep
    // them on the main stream (the fork was not yet run on a device together with NCCL).
    const bool lora_fork = lora && !shard_.sharded();
    // The head (LayerNorm, qkv, rotary + KV write) row range by row range; an overlapped prefill
    // waits for each range's all-reduce of the layer before (before_head).
    for (int ch = 0; ch < static_cast<int>(ranges.size()); ++ch) {
      const RowRange& rr = ranges[ch];
      if (in.chunks) PHI_RETURN_IF_ERROR(in.chunks->before_head(l, ch));
      if (ln_fused) {  // (one row range) qkv first: the MLP branch's fc2 waits for it
        if (mlp_fork) {
          PHI_RETURN_IF_ERROR(DeviceStatus(DeviceEventRecord(mlp_fork_ev_, stream_), "MLP fork"));
        }
        PHI_RETURN_IF_ERROR(KernelResult(
            GemvCuda(
                ln_gemv(linear(h, w.qkv_w, w.qkv_b, qkv, qkv_width, H, false, GemmEpilogue::kNone),
                        w),
                stream_),
            "layer_norm + qkv gemv"));
        if (mlp_fork) {
          PHI_RETURN_IF_ERROR(
              DeviceStatus(DeviceEventRecord(qkv_done_ev_, stream_), "qkv done record"));
          PHI_RETURN_IF_ERROR(
              DeviceStatus(DeviceStreamWaitEvent(mlp_stream_, mlp_fork_ev_), "MLP fork wait"));
          PHI_RETURN_IF_ERROR(mlp_branch(mlp_stream_, mlp_gemm_.get()));
        }
      } else {
        if (fold_prev) PHI_RETURN_IF_ERROR(mlp_join());  // layer l - 1's fc2 rows are done
        const LayerNormParams ln{
            .x = at(h, rr, H),
            .weight = w.ln_w,
            .bias = w.ln_b,
            .y = at(normed, rr, H),
            .rows = rr.rows,
            .cols = H,
            .eps = c.layer_norm_eps,
            .dtype = dt,
            .fold_delta = fold_prev ? static_cast<const float*>(fc2_defer_dev_) : nullptr,
            .ld_fold = fold_prev ? H : 0,
            .programmatic_launch = dense_bulk && !fold_prev};
        // LoRA steps may fold the last layer's dense delta in here (CudaLora::BeforeDense).
        PHI_RETURN_IF_ERROR(KernelResult(
            lora_fork ? lora_->LayerNorm(ln, stream_) : LayerNormCuda(ln, stream_), "layer_norm"));
        if (lora_fork) {  // before the MLP fork: its fc1 delta may fork from here (beside mode)
          PHI_RETURN_IF_ERROR(
              KernelResult(lora_->BeforeQkv(l, normed, stream_), "lora qkv shrink"));
        }
        if (mlp_fork) {  // (decode: one row range) after the LayerNorm of all rows
          PHI_RETURN_IF_ERROR(DeviceStatus(DeviceEventRecord(mlp_fork_ev_, stream_), "MLP fork"));
          PHI_RETURN_IF_ERROR(
              DeviceStatus(DeviceStreamWaitEvent(mlp_stream_, mlp_fork_ev_), "MLP fork wait"));
          PHI_RETURN_IF_ERROR(mlp_branch(mlp_stream_, mlp_gemm_.get()));
        }
        bool qkv_first = false;  // qkv = the q / k / v deltas, then the qkv GEMM adds to them
        if (lora_first) {
          PHI_RETURN_IF_ERROR(KernelResult(
              lora_->GemmQkvDeltaFirst(l, normed, qkv, &qkv_first, stream_), "lora qkv deltas"));
        }
        PHI_RETURN_IF_ERROR(
            Linear(rows_of(linear(at(normed, rr, H), w.qkv_w, w.qkv_b, at(qkv, rr, qkv_width),
                                  qkv_width, H, qkv_first, GemmEpilogue::kNone),
                           rr),
                   dt, "qkv gemm"));
      }
      if (lora) {
        PHI_RETURN_IF_ERROR(KernelResult(lora_->AfterQkv(l, normed, qkv, stream_), "lora qkv"));
      }
      if (lora && prefill_fork) PHI_RETURN_IF_ERROR(lora_fc1_branch(l));
      RotaryKvWriteParams rot =
          LayerRotaryParams(l, at(qkv, rr, qkv_width), in.positions + rr.begin, in.slots + rr.begin,
                            rr.rows, k_cache, v_cache);
      rot.write_cache = !kv_store;
      if (lora) lora_->FoldIntoRotary(&rot);  // the q / k / v deltas (CudaLora rotary fold)
      decode_plan.fold_rotary = fold_attention;
      decode_plan.rotary = rot;
      if (!fold_attention) {
        PHI_RETURN_IF_ERROR(KernelResult(RotaryKvWriteCuda(rot, stream_), "rotary_kv_write"));
      }
    }
    PagedAttentionParams ap = LayerAttentionParams(in, qkv, attn, T, k_cache, v_cache);
    ap.cu_q_lens = in.cu_q_lens;
    if (kv_store) {
      prefill_plan.store_new_k = k_cache;
      prefill_plan.store_new_v = v_cache;
    }
    if (join_early) {
      PHI_RETURN_IF_ERROR(mlp_join());
      if (fc2_main) PHI_RETURN_IF_ERROR(fc2_part(stream_, gemm_.get(), mlp_stream_));
    }
    PHI_RETURN_IF_ERROR(KernelResult(
        in.decode ? PagedDecodeCuda(ap, decode_plan, stream_, &last_decode_splits_)
                  : PagedAttentionCuda(ap, prefill_plan, stream_, &last_decode_splits_),
        "paged_attention"));
    if (lora_fork) {  // dense's delta beside the dense GEMM (CudaLora::BeforeDense)
      PHI_RETURN_IF_ERROR(
          KernelResult(lora_->BeforeDense(l, attn, fc2_on_branch, stream_), "lora dense delta"));
    }
    if (!mlp_fork) {
      PHI_RETURN_IF_ERROR(mlp_branch(stream_, gemm_.get()));
    } else if ((!join_early || fc2_main) && !defer_this) {
      PHI_RETURN_IF_ERROR(mlp_join());
    }
    if (lora_fork) {
      PHI_RETURN_IF_ERROR(
          KernelResult(lora_->BeforeResidual(l, attn, mlp, stream_), "lora dense + fc2 shrink"));
    }
    for (int ch = 0; ch < static_cast<int>(ranges.size()); ++ch) {
      const RowRange& rr = ranges[ch];
      void* h_rows = at(h, rr, H);
      if (fc2_on_branch) {
        // h (+)= fc2 ran on the MLP stream; the dense partial adds to it.
        const GemvParams dense = dense_gemv(w);
        PHI_RETURN_IF_ERROR(dense_bulk ? KernelResult(GemvCuda(dense, stream_), "dense bulk gemv")
                                       : Linear(dense.a, dt, "dense gemm"));
      } else {
        const GemmParams fc2 =
            rows_of(linear(at(mlp, rr, c.intermediate_size), w.fc2_w, w.fc2_b, h_rows, H,
                           c.intermediate_size, true, GemmEpilogue::kNone),
                    rr);
        PHI_RETURN_IF_ERROR(
            Linear(rows_of(linear(at(attn, rr, nH * hd), w.dense_w, w.dense_b, h_rows, H, nH * hd,
                                  shard_.adds_row_parallel_bias(), GemmEpilogue::kNone),
                           rr),
                   dt, "dense + fc2 gemm", &fc2));
      }
      if (lora) {
        PHI_RETURN_IF_ERROR(KernelResult(
            lora_->AfterResidual(l, attn, mlp, h, stream_, fc2_on_branch), "lora dense + fc2"));
      }
      if (in.chunks) {
        PHI_RETURN_IF_ERROR(in.chunks->after_tail(l, ch));  // this range's all-reduce
      } else {
        PHI_RETURN_IF_ERROR(TpAllReduce(h, T, "layer all-reduce"));  // after the LoRA partials
      }
    }
  }
  return absl::OkStatus();
}

// Final LayerNorm of `rows` hidden rows into the arena's `last` (in place when hidden is last),
// then the LM head into float32 logits [rows, VocabPad(V)].
absl::Status CudaPhiModel::EnqueueEmbedding(const int32_t* ids, void* out, int tokens) {
  return KernelResult(EmbeddingCuda({.ids = ids,
                                     .table = embed_,
                                     .out = out,
                                     .num_tokens = tokens,
                                     .num_rows = embed_rows_,
                                     .dim = config_.hidden_size,
                                     .row_offset = embed_row_offset_,
                                     .dtype = dtype_},
                                    stream_),
                      "embedding");
}

absl::Status CudaPhiModel::EnqueueLogits(const void* hidden, int rows, float* logits) {
  const PhiConfig& c = config_;
  const ArenaLayout al = MakeArenaLayout(c, arena_tokens_);
  void* last = static_cast<char*>(arena_) + al.last;
  GemmParams p;
  p.x = last;
  p.w = lm_head_w_;
  p.bias = lm_head_b_;
  p.y = TpLocalLogits(logits, rows);  // `logits` unless the LM head is vocab-parallel
  p.m = rows;
  p.n = c.vocab_size;
  p.k = c.hidden_size;
  p.ldy = VocabPad(c.vocab_size);
  p.dtype = dtype_;
  if (bulk_ln_ && rows <= bulk_rows_ && !lora_->active()) {
    // The final LayerNorm inside the LM head's bulk GEMV (CudaModelOptions::bulk_gemv_ln).
    GemvParams g{.a = p,
                 .y_dtype = DataType::kF32,
                 .programmatic_launch = bulk_pdl_,
                 .bulk = true,
                 .ln_weight = final_ln_w_,
                 .ln_bias = final_ln_b_,
                 .ln_eps = static_cast<float>(c.layer_norm_eps)};
    g.a.x = hidden;
    if (GemvCudaSupports(g)) {
      PHI_RETURN_IF_ERROR(KernelResult(GemvCuda(g, stream_), "final layer_norm + lm_head gemv"));
      return TpGatherLogits(rows);
    }
  }
  PHI_RETURN_IF_ERROR(KernelResult(LayerNormCuda({.x = hidden,
                                                  .weight = final_ln_w_,
                                                  .bias = final_ln_b_,
                                                  .y = last,
                                                  .rows = rows,
                                                  .cols = c.hidden_size,
                                                  .eps = c.layer_norm_eps,
                                                  .dtype = dtype_},
                                                 stream_),
                                   "final layer_norm"));
  PHI_RETURN_IF_ERROR(Linear(p, DataType::kF32, "lm_head gemm"));
  if (lora_->active()) {
    // Into this rank's logits (its vocabulary rows when the head is vocab-parallel).
    PHI_RETURN_IF_ERROR(KernelResult(
        lora_->AfterLmHead(last, static_cast<float*>(p.y), p.ldy, stream_), "lora lm_head"));
  }
  return TpGatherLogits(rows);
}

absl::Status CudaPhiModel::PrefillStep(const ForwardBatch& batch, std::vector<float>* logits) {
  const PhiConfig& c = config_;
  const int T = batch.num_tokens(), S = static_cast<int>(batch.seqs.size());
  const int R = static_cast<int>(batch.logit_rows.size());
  const int H = c.hidden_size, V = full_config_.vocab_size;
  if (T > arena_tokens_) {
    PHI_LOG(WARNING) << "step of " << T << " tokens exceeds the reserved workspace of "
                     << arena_tokens_ << " tokens: growing it (a device allocation on the step "
                     << "path; reserve more at warmup)";
    PHI_RETURN_IF_ERROR(ReserveWorkspace(T));
  }

  // Plan: slots, varlen offsets, the padded block-table matrix; one upload.
  int max_blocks = 1, max_q_len = 0, max_ctx = 0;
  for (const SequenceInput& seq : batch.seqs) {
    max_blocks = std::max(max_blocks, static_cast<int>(seq.block_table.size()));
    max_q_len = std::max(max_q_len, seq.num_new_tokens);
    max_ctx = std::max(max_ctx, seq.context_len);
  }
  const MetaLayout ml = MakeMetaLayout(T, S, R, max_blocks);
  PHI_RETURN_IF_ERROR(EnsureMetadataCapacity(ml.total));
  char* mh = static_cast<char*>(meta_host_);
  auto* slots = reinterpret_cast<int64_t*>(mh + ml.slots);
  auto* cu_q_lens = reinterpret_cast<int32_t*>(mh + ml.cu_q_lens);
  auto* ctx_lens = reinterpret_cast<int32_t*>(mh + ml.context_lens);
  auto* tables = reinterpret_cast<int32_t*>(mh + ml.block_tables);
  std::memcpy(mh + ml.ids, batch.token_ids.data(), sizeof(int32_t) * T);
  std::memcpy(mh + ml.positions, batch.positions.data(), sizeof(int32_t) * T);
  if (R > 0) std::memcpy(mh + ml.logit_rows, batch.logit_rows.data(), sizeof(int32_t) * R);
  std::memset(tables, 0, sizeof(int32_t) * static_cast<size_t>(S) * max_blocks);
  cu_q_lens[0] = 0;
  for (int i = 0, t = 0; i < S; ++i) {
    const SequenceInput& seq = batch.seqs[i];
    std::copy(seq.block_table.begin(), seq.block_table.end(),
              tables + static_cast<size_t>(i) * max_blocks);
    cu_q_lens[i + 1] = cu_q_lens[i] + seq.num_new_tokens;
    ctx_lens[i] = seq.context_len;
    for (int j = 0; j < seq.num_new_tokens; ++j, ++t) {
      const int pos = batch.positions[t];
      slots[t] = static_cast<int64_t>(seq.block_table[pos / kv_block_size_]) * kv_block_size_ +
                 pos % kv_block_size_;
    }
  }
  PHI_RETURN_IF_ERROR(PlanLora(batch, /*decode=*/false, T));
  StepTimerStart();
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceCopyToDevice(meta_dev_, meta_host_, ml.total, stream_),
                                   "metadata upload"));
  char* md = static_cast<char*>(meta_dev_);
  StepInputs in;
  in.tokens = T;
  in.ids = reinterpret_cast<const int32_t*>(md + ml.ids);
  in.positions = reinterpret_cast<const int32_t*>(md + ml.positions);
  in.slots = reinterpret_cast<const int64_t*>(md + ml.slots);
  in.cu_q_lens = reinterpret_cast<const int32_t*>(md + ml.cu_q_lens);
  in.context_lens = reinterpret_cast<const int32_t*>(md + ml.context_lens);
  in.block_tables = reinterpret_cast<const int32_t*>(md + ml.block_tables);
  in.num_seqs = S;
  in.max_blocks = max_blocks;
  in.decode = max_q_len == 1;  // a decode batch above the largest graph bucket
  in.min_live = S;
  if (in.decode) SetDecodeVariant(T, DecodeVariantOf(batch, T), &in);
  in.max_q_len = max_q_len;
  in.max_ctx = max_ctx;
  in.skip_last_layer = PrefillLastRowsApplies(batch);  // then R rows: model/cuda_phi_last_rows.cc
  PHI_RETURN_IF_ERROR(EnqueuePrefillLayers(in));       // in row chunks: cuda_phi_tp_overlap.cc

  const ArenaLayout al = MakeArenaLayout(c, arena_tokens_);
  char* a = static_cast<char*>(arena_);
  float* d_logits = reinterpret_cast<float*>(a + al.logits);
  logits->resize(static_cast<size_t>(R) * V);
  const int32_t* d_logit_rows = reinterpret_cast<const int32_t*>(md + ml.logit_rows);
  if (in.skip_last_layer) {
    PHI_RETURN_IF_ERROR(EnqueueLastLayerRows(in, d_logit_rows, R, a + al.last));
  } else if (R > 0) {
    // Only the requested rows go through the final norm and the LM head (float32 logits).
    PHI_RETURN_IF_ERROR(KernelResult(EmbeddingCuda({.ids = d_logit_rows,
                                                    .table = a + al.h,
                                                    .out = a + al.last,
                                                    .num_tokens = R,
                                                    .num_rows = T,
                                                    .dim = H,
                                                    .dtype = dtype_},
                                                   stream_),
                                     "gather logit rows"));
  }
  if (R > 0) {
    PHI_RETURN_IF_ERROR(EnqueueLogits(a + al.last, R, d_logits));
    PHI_RETURN_IF_ERROR(DownloadLogitRows(logits->data(), d_logits, 0, R, R));
  }
  if (absl::Status st = SyncStep(); !st.ok()) {
    healthy_ = false;
    return st;
  }
  StepTimerStop();
  return absl::OkStatus();
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
