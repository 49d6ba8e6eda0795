// CudaPhiModel's tensor-parallel pieces (spec §6.8-6.9, docs/tensor-parallel.md): the layer and
// embedding all-reduces, the vocab-parallel LM head's all-gather and its download, the hang-safe
// end-of-step wait, the KV pool agreement and adapter sharding. The weights follow PhiShard
// (model/cuda_phi_weights.cc); the step code (model/cuda_phi_step.cc) calls these at fixed points,
// and each is a no-op (or the plain world-size-1 path) when the model is not sharded.
//
// Collectives are enqueued on the model's stream, between its kernels, so the decode CUDA graphs
// capture them too (NCCL >= 2.9). Every rank runs the same steps with the same shapes, so every
// rank enqueues and captures the same collectives in the same order.
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"
#include "model/cuda_phi_tp_overlap.h"
#include "model/lora_shard.h"

namespace phishard {

using cuda_model::VocabPad;

namespace {

absl::Status TpError(const PhiShard& shard, const absl::Status& st, const char* what) {
  if (st.ok()) return st;
  return absl::InternalError(absl::StrFormat("tensor-parallel rank %d of %d: %s failed: %s",
                                             shard.rank, shard.world_size, what, st.message()));
}

}  // namespace

absl::StatusOr<LoraAdapter> CudaPhiModel::ShardAdapter(LoraAdapter full) const {
  if (!shard_.sharded()) return full;
  return ShardLoraAdapter(full, full_config_, shard_.rank, shard_.world_size);
}

void CudaPhiModel::set_tp_skip_collectives(bool on) {
  tp_skip_collectives_ = on;
  DropGraphs();
}

void CudaPhiModel::set_mlp_stream_sharded(bool on, int join) {
  mlp_sharded_ = on;
  mlp_join_sharded_ = join;
  DropGraphs();
}

absl::Status CudaPhiModel::TpAllReduce(void* data, int rows, const char* what) {
  if (comm_ == nullptr || tp_skip_collectives_ || rows == 0) return absl::OkStatus();
  absl::Status st = comm_->EnqueueAllReduceSum(
      data, static_cast<size_t>(rows) * config_.hidden_size, dtype_, stream_);
  return TpFailed(st, what);
}

float* CudaPhiModel::TpLocalLogits(float* logits, int rows) {
  if (!shard_.lm_head_parallel) return logits;
  return tp_logits_ + static_cast<size_t>(shard_.rank) * rows * VocabPad(config_.vocab_size);
}

absl::Status CudaPhiModel::TpGatherLogits(int rows) {
  if (comm_ == nullptr || tp_skip_collectives_ || !shard_.lm_head_parallel || rows == 0) {
    return absl::OkStatus();
  }
  // [W, rows, VocabPad(Vl)] float32; this rank's block is filled, the all-gather copies the rest.
  const size_t count = static_cast<size_t>(rows) * VocabPad(config_.vocab_size);
  absl::Status st = comm_->EnqueueAllGather(tp_logits_ + shard_.rank * count, tp_logits_, count,
                                            DataType::kF32, stream_);
  return TpFailed(st, "logits all-gather");
}

absl::Status CudaPhiModel::DownloadLogitRows(float* host, const float* d_logits, int first, int n,
                                             int step_rows) {
  const int V = full_config_.vocab_size;
  if (!shard_.lm_head_parallel) {  // world size 1, or a replicated LM head: full rows here
    const size_t pad = VocabPad(V);
    return DeviceStatus(
        DeviceCopy2DToHost(host, sizeof(float) * V, d_logits + static_cast<size_t>(first) * pad,
                           sizeof(float) * pad, sizeof(float) * V, n, stream_),
        "logits download");
  }
  // Rank w's block holds vocabulary columns [w Vl, (w + 1) Vl) of every row of the step.
  const int Vl = config_.vocab_size;
  const size_t pad = VocabPad(Vl);
  for (int w = 0; w < shard_.world_size; ++w) {
    const float* src =
        tp_logits_ + (static_cast<size_t>(w) * step_rows + static_cast<size_t>(first)) * pad;
    PHI_RETURN_IF_ERROR(
        DeviceStatus(DeviceCopy2DToHost(host + static_cast<size_t>(w) * Vl, sizeof(float) * V, src,
                                        sizeof(float) * pad, sizeof(float) * Vl, n, stream_),
                     "logits download"));
  }
  return absl::OkStatus();
}

absl::Status CudaPhiModel::SyncStep() {
  if (comm_ == nullptr) return DeviceStatus(DeviceStreamSync(stream_), "step");
  // A plain stream sync would wait forever on an all-reduce whose peer died; the communicator's
  // wait watches the abort watch, NCCL's errors and the timeout, and aborts NCCL's kernels.
  return TpFailed(comm_->SyncStream(stream_), "step");
}

absl::Status CudaPhiModel::TpFailed(const absl::Status& st, const char* what) {
  if (st.ok()) return st;
  // The group is broken: no later step may run. The decode graphs hold NCCL collectives, and the
  // communicator's abort waits until every such graph is destroyed: drop them now (one still
  // running is freed when it ends, which NCCL's abort flag makes it do).
  healthy_ = false;
  DropGraphs();
  return TpError(shard_, st, what);
}

absl::Status CudaPhiModel::ReserveTpLogits(int tokens) {
  if (!shard_.lm_head_parallel || tokens <= tp_logits_tokens_) return absl::OkStatus();
  DropGraphs();  // they point into the buffer
  if (tp_logits_) DeviceFree(tp_logits_);
  tp_logits_ = nullptr;
  tp_logits_tokens_ = 0;
  const size_t bytes = static_cast<size_t>(shard_.world_size) * tokens *
                       VocabPad(config_.vocab_size) * sizeof(float);
  void* p = nullptr;
  if (int err = DeviceMalloc(&p, bytes); err != 0) {
    DeviceGetLastError();
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot allocate %.2f GiB of gathered logits for %d tokens on CUDA device %d: %s",
        cuda_model::GiB(bytes), tokens, device_, DeviceErrorString(err)));
  }
  tp_logits_ = static_cast<float*>(p);
  tp_logits_tokens_ = tokens;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> CudaPhiModel::AllGatherHost(absl::Span<const float> mine,
                                                                const char* what) const {
  // Blocking collective on the communicator's own stream, through a small device buffer (the
  // communicator gathers device memory): mine, then [W, n] of every rank's.
  const size_t n = mine.size();
  const int W = shard_.world_size;
  std::vector<float> all(n * static_cast<size_t>(W));
  auto cuda = [&](int err, const char* op) {
    return err == 0 ? absl::OkStatus()
                    : absl::InternalError(absl::StrFormat("CUDA %s failed on device %d: %s", op,
                                                          device_, DeviceErrorString(err)));
  };
  DeviceSet(device_);
  void* dev = nullptr;
  absl::Status st = cuda(DeviceMalloc(&dev, (n + all.size()) * sizeof(float)), "malloc");
  float* d = static_cast<float*>(dev);
  if (st.ok()) st = cuda(DeviceCopyToDevice(d, mine.data(), n * sizeof(float), stream_), "copy");
  if (st.ok()) st = cuda(DeviceStreamSync(stream_), "copy");
  if (st.ok()) st = TpError(shard_, comm_->AllGather(d, d + n, n), what);
  if (st.ok()) {
    st = cuda(DeviceCopyToHost(all.data(), d + n, all.size() * sizeof(float), stream_), "copy");
  }
  if (st.ok()) st = cuda(DeviceStreamSync(stream_), "copy");
  if (dev != nullptr) DeviceFree(dev);
  if (!st.ok()) return st;
  return all;
}

absl::StatusOr<int> CudaPhiModel::AgreeKvBlocks(absl::StatusOr<int> local) const {
  if (comm_ == nullptr) return local;
  // Every rank must allocate the same pool (each rank's engine hands out the same block ids): the
  // smallest fit wins. An error travels as 0 blocks, after the collective, so no peer is left
  // waiting in it. The same all-gather carries the prefill chunking, which every rank must share
  // (it sets the size of each chunk's all-reduce). Per rank, as floats (< 2^24, exact): the count
  // as two < 2^20 halves, the chunk count, the minimum chunk rows.
  constexpr int kStride = 4;
  const int W = shard_.world_size;
  const int64_t mine = local.ok() ? *local : 0;
  float host[kStride];
  EncodeKvBlockCount(mine, host);
  host[2] = static_cast<float>(tp_overlap_->chunks);
  host[3] = static_cast<float>(std::min(tp_overlap_->min_rows, 1 << 24));
  absl::StatusOr<std::vector<float>> all = AllGatherHost(host, "all-gather of KV block counts");
  if (!all.ok()) return all.status();
  if (!local.ok()) return local.status();
  if (absl::Status agree = CheckPrefillChunkingAgrees(all->data(), kStride, 2, W, shard_.rank);
      !agree.ok()) {
    return agree;
  }
  std::vector<float> counts(2 * static_cast<size_t>(W));
  for (int r = 0; r < W; ++r) {
    counts[2 * r] = (*all)[kStride * r];
    counts[2 * r + 1] = (*all)[kStride * r + 1];
  }
  return FewestKvBlocks(counts.data(), W, shard_.rank, mine);
}

absl::Status CudaPhiModel::CheckSameOnEveryRank(absl::Span<const RankSetting> settings) const {
  if (comm_ == nullptr || settings.empty()) return absl::OkStatus();
  std::vector<float> mine(settings.size() * kRankSettingFloats);
  EncodeRankSettings(settings, mine.data());
  absl::StatusOr<std::vector<float>> all = AllGatherHost(mine, "all-gather of the rank settings");
  if (!all.ok()) return all.status();
  return CheckRankSettingsAgree(settings, all->data(), shard_.world_size);
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
