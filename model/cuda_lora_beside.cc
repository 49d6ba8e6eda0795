// CudaLora's beside mode for fused decode steps (model/cuda_lora.h, BeforeQkv): the q / k / v
// and fc1 deltas are computed while the qkv and fc1 GEMMs run, instead of after them.
//
// The fused launch adds y += Σ scale · t · Bᵀ into the GEMM's output, so it must wait for that
// GEMM; the delta does not depend on y. Here, right after the LayerNorm (the point both GEMMs
// fork from), BesideFork launches the delta-only fused form (SgmvFusedOp::delta: the float32
// sum, -0.0f on rows it does not adapt) on two side streams: the q / k / v deltas on one, fc1's
// on the other, each into its column window of delta_dev_ float32 [delta_rows_, W + I + H] (W =
// q + k + v width, I = intermediate, H = hidden). AfterQkv and AfterFc1 then make their stream wait
// for the matching side stream and fold (SgmvFoldCuda: y = act(y + delta), one rounding), which
// gives the fused launch's bits (the same float sum, the same single rounding; cuda_sgmv_test).
// Inside a decode-graph capture the fork and the joins are edges of the graph, as the MLP
// branch's are. Per layer critical path before attention (H200, b64, rank 16; perf-log lorad
// runs): qkv GEMM 14.6 + q/k/v delta 22 µs and fc1 GEMM 18.3 + fc1 delta 19.5 µs become
// max(GEMM, delta) + a fold of a few µs on each side.
// Dense's delta (BeforeDense, right after attention) runs the same way beside the dense GEMM into
// columns [W + I, W + I + H) and is folded into h by the next layer's LayerNorm
// (LayerNormParams::fold_delta), so no launch of its own stays on the critical path (H200 b64,
// 64 rank-16 adapters: -0.09 to -0.17 ms a step; docs/perf-log.md, lorad3 run 1). Likewise,
// in layers that adapt all of q, k and v, the q / k / v fold moves into the rotary
// (FoldIntoRotary, RotaryKvWriteParams::fold_delta): -0.14 to -0.17 ms more (lorad3 run 2).
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "common/logging.h"
#include "kernels/cuda/layer_norm_cuda.h"
#include "kernels/cuda/sgmv_cuda.h"
#include "model/cuda_lora.h"

namespace phishard {
namespace {

constexpr int kQ = 0, kK = 1, kV = 2, kDense = 3, kFc1 = 4;  // LoraTarget order (cuda_lora.cc)
constexpr int kDeltaRowStep = 256;  // delta_dev_ grows in steps of these rows

}  // namespace

void CudaLora::FreeBeside() {
  for (int s = 0; s < 2; ++s) {
    if (beside_streams_[s] != nullptr) {
      DeviceStreamSync(beside_streams_[s]);
      DeviceStreamDestroy(beside_streams_[s]);
      beside_streams_[s] = nullptr;
    }
  }
  for (int s = 0; s < 3; ++s) {
    DeviceEventDestroy(beside_done_ev_[s]);
    beside_done_ev_[s] = nullptr;
  }
  DeviceEventDestroy(beside_fork_ev_);
  beside_fork_ev_ = nullptr;
  if (delta_dev_ != nullptr) DeviceFree(delta_dev_);
  delta_dev_ = nullptr;
  delta_rows_ = 0;
}

bool CudaLora::PlanBeside(int rows, bool grow) {
  // Reserve (grow) runs between steps, where all_ops_ is the last step's: only the rank part of
  // FusedStep applies there. (With FusedStep, an adapter load after a prefill, or before any step,
  // left the buffer unmade and every decode step on the fused launches.)
  const bool fused_ranks = fused_ && rank_cap_ <= kSgmvFusedMaxRank;
  if (!beside_ || beside_failed_ || !fused_ranks || (!grow && !FusedStep())) return false;
  if (!grow && rows > delta_rows_) return false;  // above the reserved rows: the fused launches
  if (beside_fork_ev_ == nullptr) {
    int err = DeviceEventCreate(&beside_fork_ev_);
    for (int s = 0; s < 2 && err == 0; ++s) err = DeviceStreamCreate(&beside_streams_[s]);
    for (int s = 0; s < 3 && err == 0; ++s) err = DeviceEventCreate(&beside_done_ev_[s]);
    if (err != 0) {
      DeviceGetLastError();
      PHI_LOG(WARNING) << "LoRA beside mode off: cannot create streams / events on CUDA device "
                       << device_ << ": " << DeviceErrorString(err);
      FreeBeside();
      beside_failed_ = true;
      return false;
    }
  }
  if (rows > delta_rows_) {
    const int want = (rows + kDeltaRowStep - 1) / kDeltaRowStep * kDeltaRowStep;
    const size_t bytes = static_cast<size_t>(want) * DeltaLd() * sizeof(float);
    if (DeviceStreamSync(beside_streams_[0]) != 0 || DeviceStreamSync(beside_streams_[1]) != 0) {
      DeviceGetLastError();
      return false;
    }
    void* mem = nullptr;
    int err = DeviceMalloc(&mem, bytes);
    // Zeroed once: the dense delta's fold into the next LayerNorm (DenseBeside) reads every row
    // of the step, also the padding rows of a graph bucket that no tile writes (finite values
    // there; their outputs are dropped).
    if (err == 0) err = DeviceMemset(mem, 0, bytes, beside_streams_[0]);
    if (err == 0) err = DeviceStreamSync(beside_streams_[0]);
    if (err != 0) {
      DeviceGetLastError();
      if (mem != nullptr) DeviceFree(mem);
      PHI_LOG(WARNING) << "LoRA beside mode off for this step: cannot allocate " << bytes
                       << " bytes of delta buffer on CUDA device " << device_ << ": "
                       << DeviceErrorString(err);
      return false;
    }
    if (delta_dev_ != nullptr) DeviceFree(delta_dev_);
    delta_dev_ = static_cast<float*>(mem);
    delta_rows_ = want;
    graphs_stale_ = true;  // the decode graphs bake in the buffer's address
  }
  return true;
}

KernelStatus CudaLora::BesideFork(int layer, const void* normed, cudaStream_t stream) {
  const PhiConfig& c = config_;
  const int H = c.hidden_size, hd = c.head_dim;
  const int nq = c.num_attention_heads * hd, nkv = c.num_key_value_heads * hd;
  const int width = nq + 2 * nkv, ld = DeltaLd();
  SgmvFusedParams fps[2];
  const int offsets[] = {0, nq, nq + nkv};
  const int outs[] = {nq, nkv, nkv};
  for (int t : {kQ, kK, kV}) {
    if (!Launch(Entry(layer, t))) continue;
    SgmvFusedOp& op = fps[0].ops[fps[0].num_ops++];
    op.out = outs[t];
    op.delta = delta_dev_ + offsets[t];
    op.ld_delta = ld;
    op.terms[0] = {.x = normed, .ldx = H, .in = H, .entry = Entry(layer, t)};
  }
  if (Launch(Entry(layer, kFc1))) {
    SgmvFusedOp& op = fps[1].ops[fps[1].num_ops++];
    op.out = c.intermediate_size;
    op.delta = delta_dev_ + width;
    op.ld_delta = ld;
    op.terms[0] = {.x = normed, .ldx = H, .in = H, .entry = Entry(layer, kFc1)};
  }
  if (fps[0].num_ops == 0 && fps[1].num_ops == 0) return KernelStatus::kOk;
  if (DeviceEventRecord(beside_fork_ev_, stream) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  KernelStatus result = KernelStatus::kOk;
  for (int s = 0; s < 2; ++s) {
    if (fps[s].num_ops == 0) continue;
    if (DeviceStreamWaitEvent(beside_streams_[s], beside_fork_ev_) != 0) {
      DeviceGetLastError();
      return KernelStatus::kDeviceError;
    }
    const KernelStatus st =
        Fused(fps[s], GemmEpilogue::kNone, beside_streams_[s], s == 0 ? kHookQkv : kHookFc1);
    if (result == KernelStatus::kOk) result = st;
    // Recorded even after a failed launch, so that the join stays well-formed.
    if (DeviceEventRecord(beside_done_ev_[s], beside_streams_[s]) != 0) {
      DeviceGetLastError();
      return KernelStatus::kDeviceError;
    }
    beside_pending_[s] = true;
  }
  return result;
}

KernelStatus CudaLora::BesideFold(bool fc1, int layer, void* y, GemmEpilogue act,
                                  cudaStream_t stream) {
  const int s = fc1 ? 1 : 0;
  beside_pending_[s] = false;
  if (DeviceStreamWaitEvent(stream, beside_done_ev_[s]) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  const PhiConfig& c = config_;
  const int hd = c.head_dim;
  const int nq = c.num_attention_heads * hd, nkv = c.num_key_value_heads * hd;
  const int width = nq + 2 * nkv, ld = DeltaLd();
  const size_t es = DataTypeSize(dtype_);
  SgmvFoldParams p;
  if (fc1) {
    p.ops[p.num_ops++] = {.y = y,
                          .ldy = c.intermediate_size,
                          .out = c.intermediate_size,
                          .delta = delta_dev_ + width,
                          .ld_delta = ld};
  } else {
    const int offsets[] = {0, nq, nq + nkv};
    const int outs[] = {nq, nkv, nkv};
    for (int t : {kQ, kK, kV}) {
      if (!Launch(Entry(layer, t))) continue;
      p.ops[p.num_ops++] = {.y = static_cast<char*>(y) + static_cast<size_t>(offsets[t]) * es,
                            .ldy = width,
                            .out = outs[t],
                            .delta = delta_dev_ + offsets[t],
                            .ld_delta = ld};
    }
  }
  p.ref = Ref(false);
  p.dtype = dtype_;
  p.programmatic = fused_pdl_;
  return SgmvFoldCuda(p, act, stream);
}

KernelStatus CudaLora::BeforeDense(int layer, const void* attn, bool fc2_done,
                                   cudaStream_t stream) {
  PHI_CHECK(!dense_pending_);  // the previous layer's LayerNorm (LayerNorm) folded it
  if (!active_ || !beside_step_ || dense_beside_ == 0 || !FusedStep() || !fc2_done ||
      branch_mode_ == 2 || !Launch(Entry(layer, kDense))) {
    return KernelStatus::kOk;
  }
  const PhiConfig& c = config_;
  const int A = c.num_attention_heads * c.head_dim;
  const int width = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
  SgmvFusedParams fp;
  SgmvFusedOp& op = fp.ops[fp.num_ops++];
  op.out = c.hidden_size;
  op.delta = delta_dev_ + width + c.intermediate_size;
  op.ld_delta = DeltaLd();
  op.terms[0] = {.x = attn, .ldx = A, .in = A, .entry = Entry(layer, kDense)};
  // The q / k / v deltas' stream: its work of this layer was joined before rotary.
  cudaStream_t side = beside_streams_[0];
  if (DeviceEventRecord(beside_fork_ev_, stream) != 0 ||
      DeviceStreamWaitEvent(side, beside_fork_ev_) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  const KernelStatus st = Fused(fp, GemmEpilogue::kNone, side, kHookResidual);
  // Recorded even after a failed launch, so that the join stays well-formed.
  if (DeviceEventRecord(beside_done_ev_[2], side) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  dense_pending_ = true;
  return st;
}

KernelStatus CudaLora::DenseAfterResidual(int layer, void* h, cudaStream_t stream) {
  // Dense beside 2: the next layer's LayerNorm folds it (the last layer has none after it here).
  if (dense_beside_ == 2 && layer + 1 < config_.num_hidden_layers) return KernelStatus::kOk;
  dense_pending_ = false;
  if (DeviceStreamWaitEvent(stream, beside_done_ev_[2]) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  const PhiConfig& c = config_;
  const int width = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
  SgmvFoldParams p;
  p.ops[p.num_ops++] = {.y = h,
                        .ldy = c.hidden_size,
                        .out = c.hidden_size,
                        .delta = delta_dev_ + width + c.intermediate_size,
                        .ld_delta = DeltaLd()};
  p.ref = Ref(false);
  p.dtype = dtype_;
  p.programmatic = fused_pdl_;
  return SgmvFoldCuda(p, GemmEpilogue::kNone, stream);
}

KernelStatus CudaLora::LayerNorm(LayerNormParams p, cudaStream_t stream) {
  if (dense_pending_) {
    dense_pending_ = false;
    if (DeviceStreamWaitEvent(stream, beside_done_ev_[2]) != 0) {
      DeviceGetLastError();
      return KernelStatus::kDeviceError;
    }
    const PhiConfig& c = config_;
    const int width = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
    p.fold_delta = delta_dev_ + width + c.intermediate_size;
    p.ld_fold = DeltaLd();
  }
  return LayerNormCuda(p, stream);
}

KernelStatus CudaLora::BesideAfterQkv(int layer, void* qkv, cudaStream_t stream) {
  // The rotary fold reads every q / k / v delta column: only when all three ran this layer.
  if (!rotary_fold_ || !Launch(Entry(layer, kQ)) || !Launch(Entry(layer, kK)) ||
      !Launch(Entry(layer, kV))) {
    return BesideFold(false, layer, qkv, GemmEpilogue::kNone, stream);
  }
  beside_pending_[0] = false;
  if (DeviceStreamWaitEvent(stream, beside_done_ev_[0]) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  qkv_fold_pending_ = true;
  return KernelStatus::kOk;
}

void CudaLora::FoldIntoRotary(RotaryKvWriteParams* p) {
  if (!qkv_fold_pending_) return;
  qkv_fold_pending_ = false;
  p->fold_delta = delta_dev_;  // q / k / v at their qkv columns
  p->ld_fold = DeltaLd();
}

// The decode tuning (PHISHARD_LORA_DECODE_TUNING, CudaPhiModel::set_lora_decode_tuning): the
// branch mode, per-hook column blocks, PDL and the beside / fold switches above.
absl::Status CudaLora::SetDecodeTuning(absl::string_view spec) {
  // "B", "B:Q.F1.F2.D", "B:Q.F1.F2.D:P", "B:Q.F1.F2.D:P:S", "B:Q.F1.F2.D:P:S:R",
  // "B:Q.F1.F2.D:P:S:R:F", "B:Q.F1.F2.D:P:S:R:F:J" or "B:Q.F1.F2.D:P:S:R:F:J:T2.T1".
  const std::vector<absl::string_view> parts = absl::StrSplit(spec, ':');
  int mode = -1, pdl = 1, beside = beside_ ? 1 : 0, dense = dense_beside_;
  int rotary = rotary_fold_ ? 1 : 0, join = join_early_ ? 1 : 0;
  int sms[2] = {branch_gemm_sms_[0], branch_gemm_sms_[1]};
  int cols[kNumHooks] = {0, 0, 0, 0};
  bool ok = !parts.empty() && parts.size() <= 8 && absl::SimpleAtoi(parts[0], &mode) && mode >= 0 &&
            mode <= 3;
  if (ok && parts.size() >= 2) {
    const std::vector<absl::string_view> c = absl::StrSplit(parts[1], '.');
    ok = c.size() == kNumHooks;
    for (int h = 0; ok && h < kNumHooks; ++h) {
      ok = absl::SimpleAtoi(c[h], &cols[h]) && cols[h] >= 0 && cols[h] <= 4096;
    }
  }
  if (ok && parts.size() >= 3) ok = absl::SimpleAtoi(parts[2], &pdl) && (pdl == 0 || pdl == 1);
  if (ok && parts.size() >= 4) {
    ok = absl::SimpleAtoi(parts[3], &beside) && (beside == 0 || beside == 1);
  }
  if (ok && parts.size() >= 5) ok = absl::SimpleAtoi(parts[4], &dense) && dense >= 0 && dense <= 2;
  if (ok && parts.size() >= 6) {
    ok = absl::SimpleAtoi(parts[5], &rotary) && (rotary == 0 || rotary == 1);
  }
  if (ok && parts.size() >= 7) ok = absl::SimpleAtoi(parts[6], &join) && (join == 0 || join == 1);
  if (ok && parts.size() == 8) {
    const std::vector<absl::string_view> t = absl::StrSplit(parts[7], '.');
    ok = t.size() == 2;
    for (int i = 0; ok && i < 2; ++i) {
      ok = absl::SimpleAtoi(t[i], &sms[i]) && sms[i] >= 0 && sms[i] <= 4096;
    }
  }
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "LoRA decode tuning '%s' is not BRANCH (0..3), BRANCH:QKV.FC1.FC2.DENSE (column blocks "
        "in [0, 4096], 0 = automatic), BRANCH:QKV.FC1.FC2.DENSE:PDL (0 or 1), "
        "BRANCH:QKV.FC1.FC2.DENSE:PDL:BESIDE (0 or 1), "
        "BRANCH:QKV.FC1.FC2.DENSE:PDL:BESIDE:DENSE_BESIDE (0, 1 or 2), "
        "BRANCH:QKV.FC1.FC2.DENSE:PDL:BESIDE:DENSE_BESIDE:ROTARY_FOLD (0 or 1), "
        "BRANCH:QKV.FC1.FC2.DENSE:PDL:BESIDE:DENSE_BESIDE:ROTARY_FOLD:JOIN_EARLY (0 or 1) or "
        "BRANCH:QKV.FC1.FC2.DENSE:PDL:BESIDE:DENSE_BESIDE:ROTARY_FOLD:JOIN_EARLY:FC2_SMS.FC1_SMS "
        "(SM count targets in [0, 4096], 0 = all)",
        spec));
  }
  beside_ = beside == 1;
  dense_beside_ = dense;
  rotary_fold_ = rotary == 1;
  join_early_ = join == 1;
  branch_gemm_sms_[0] = sms[0];
  branch_gemm_sms_[1] = sms[1];
  branch_mode_ = mode;
  std::copy(cols, cols + kNumHooks, hook_cols_);
  fused_pdl_ = pdl == 1;
  return absl::OkStatus();
}

std::string CudaLora::DecodeTuning() const {
  return absl::StrFormat("%d:%d.%d.%d.%d:%d:%d:%d:%d:%d:%d.%d", branch_mode_, hook_cols_[0],
                         hook_cols_[1], hook_cols_[2], hook_cols_[3], fused_pdl_ ? 1 : 0,
                         beside_ ? 1 : 0, dense_beside_, rotary_fold_ ? 1 : 0, join_early_ ? 1 : 0,
                         branch_gemm_sms_[0], branch_gemm_sms_[1]);
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
