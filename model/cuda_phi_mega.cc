// CudaPhiModel's persistent decode path (issue #4): 1-row decode steps without adapter rows on an
// unsharded model run every layer in one launch of the persistent kernel
// (kernels/cuda/decode_mega_cuda.h) after the embedding; the final LayerNorm and the LM head stay
// as they are. Switched by CudaModelOptions::decode_megakernel / PHISHARD_DECODE_MEGAKERNEL.
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/logging.h"
#include "kernels/cuda/decode_mega_cuda.h"
#include "model/cuda_lora.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"

namespace phishard {
namespace {

using cuda_model::ArenaLayout;
using cuda_model::MakeArenaLayout;

// mega_buf_: [layers] DecodeMegaLayer table, then the sync words (zeroed once), then the
// attention partials; each part 256-byte aligned.
struct MegaBufLayout {
  size_t table, sync, partials, total;
};

MegaBufLayout MakeMegaBufLayout(const PhiConfig& c) {
  MegaBufLayout m;
  cuda_model::OffsetTaker offsets{cuda_model::kAlign};  // consecutive sub-buffers, 256-byte aligned
  m.table = offsets.Take(sizeof(DecodeMegaLayer) * c.num_hidden_layers);
  m.sync = offsets.Take(DecodeMegaSyncBytes(c.num_attention_heads));
  m.partials = offsets.Take(DecodeMegaPartialsBytes(c.num_attention_heads, c.head_dim));
  m.total = offsets.off;
  return m;
}

}  // namespace

absl::Status CudaPhiModel::set_decode_megakernel(bool on) {
  mega_on_ = on;
  DropGraphs();
  return absl::OkStatus();
}

void CudaPhiModel::set_decode_megakernel_tuning(int blocks, int stages, int stage_kb,
                                                int prefetch_kb, int form) {
  mega_blocks_ = blocks;
  mega_stages_ = stages;
  mega_stage_kb_ = stage_kb;
  mega_prefetch_kb_ = prefetch_kb;
  mega_form_ = form;
  DropGraphs();
}

// The timeline buffer holds kMegaTimelineBlocks blocks (more than any GPU's SMs this kernel runs
// on; blocks past it record nothing).
constexpr int kMegaTimelineBlocks = 256;

absl::Status CudaPhiModel::set_decode_megakernel_timeline(int layers) {
  if (layers < 0) return absl::InvalidArgumentError("timeline layers must be >= 0");
  DeviceSet(device_);
  if (mega_timeline_ != nullptr) {
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "timeline sync"));
    DeviceFree(mega_timeline_);
    mega_timeline_ = nullptr;
  }
  mega_timeline_layers_ = std::min(layers, config_.num_hidden_layers);
  DropGraphs();
  if (mega_timeline_layers_ == 0) return absl::OkStatus();
  const size_t bytes =
      sizeof(uint64_t) * kMegaTimelineBlocks * (mega_timeline_layers_ + 1) * kDecodeMegaEvents;
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMalloc(&mega_timeline_, bytes), "timeline buffer"));
  return DeviceStatus(DeviceMemset(mega_timeline_, 0, bytes, stream_), "zero timeline");
}

absl::StatusOr<std::vector<uint64_t>> CudaPhiModel::decode_megakernel_timeline() {
  if (mega_timeline_ == nullptr) return absl::FailedPreconditionError("timeline is off");
  return CopyTimelineWords(mega_timeline_, static_cast<size_t>(kMegaTimelineBlocks) *
                                               (mega_timeline_layers_ + 1) * kDecodeMegaEvents);
}

absl::StatusOr<std::vector<uint64_t>> CudaPhiModel::CopyTimelineWords(const void* timeline,
                                                                      size_t words) {
  DeviceSet(device_);
  std::vector<uint64_t> out(words);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "timeline sync"));
  PHI_RETURN_IF_ERROR(
      DeviceStatus(DeviceCopyToHost(out.data(), timeline, out.size() * sizeof(uint64_t), stream_),
                   "timeline copy"));
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "timeline sync"));
  return out;
}

absl::Status CudaPhiModel::ReserveMegaDecode() {
  if (mega_buf_ != nullptr || shard_.sharded()) return absl::OkStatus();
  const MegaBufLayout ml = MakeMegaBufLayout(config_);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMalloc(&mega_buf_, ml.total), "megakernel buffer"));
  std::vector<DecodeMegaLayer> table(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& w = layers_[l];
    table[l] = {w.ln_w,    w.ln_b,  w.qkv_w, w.qkv_b, w.dense_w,
                w.dense_b, w.fc1_w, w.fc1_b, w.fc2_w, w.fc2_b};
  }
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMemset(mega_buf_, 0, ml.total, stream_), "zero"));
  PHI_RETURN_IF_ERROR(
      DeviceStatus(DeviceCopyToDevice(static_cast<char*>(mega_buf_) + ml.table, table.data(),
                                      sizeof(DecodeMegaLayer) * table.size(), stream_),
                   "megakernel layer table"));
  return DeviceStatus(DeviceStreamSync(stream_), "megakernel table sync");
}

absl::StatusOr<bool> CudaPhiModel::TryEnqueueMegaDecode(const StepInputs& in) {
  if (!mega_on_ || in.tokens != 1 || lora_->active() || shard_.sharded() || kv_ == nullptr ||
      mega_buf_ == nullptr || !PlainRotary()) {
    return false;
  }
  const PhiConfig& c = config_;
  const ArenaLayout al = MakeArenaLayout(c, arena_tokens_);
  char* a = static_cast<char*>(arena_);
  const MegaBufLayout ml = MakeMegaBufLayout(c);
  char* mb = static_cast<char*>(mega_buf_);
  DecodeMegaParams p;
  p.layers = reinterpret_cast<const DecodeMegaLayer*>(mb + ml.table);
  p.num_layers = c.num_hidden_layers;
  p.kv = kv_;
  p.layer_kv_bytes = static_cast<size_t>(kv_num_blocks_) * kv_block_size_ * c.num_key_value_heads *
                     c.head_dim * DataTypeSize(dtype_);
  p.num_blocks = kv_num_blocks_;
  p.block_size = kv_block_size_;
  p.positions = in.positions;
  p.slots = in.slots;
  p.context_lens = in.context_lens;
  p.block_table = in.block_tables;  // row 0 starts at 0 whatever the pitch
  p.h = a + al.h;
  p.q = a + al.qkv;
  p.act = a + al.mlp;
  p.attn = a + al.attn;
  p.partials = reinterpret_cast<float*>(mb + ml.partials);
  p.sync = reinterpret_cast<uint32_t*>(mb + ml.sync);
  p.hidden = c.hidden_size;
  p.intermediate = c.intermediate_size;
  p.num_heads = c.num_attention_heads;
  p.num_kv_heads = c.num_key_value_heads;
  p.head_dim = c.head_dim;
  p.rotary_dim = c.rotary_dim;
  p.theta = static_cast<float>(c.rope_theta);
  p.eps = static_cast<float>(c.layer_norm_eps);
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  p.act_fn =
      c.hidden_act == Activation::kGeluTanh ? GemmEpilogue::kGeluTanh : GemmEpilogue::kGeluErf;
  p.dtype = dtype_;
  p.blocks = mega_blocks_;
  p.stages = mega_stages_;
  p.stage_kb = mega_stage_kb_;
  p.prefetch_kb = mega_prefetch_kb_;
  p.form = mega_form_;
  p.timeline = static_cast<uint64_t*>(mega_timeline_);
  p.timeline_layers = mega_timeline_ != nullptr ? mega_timeline_layers_ : 0;
  p.timeline_blocks = kMegaTimelineBlocks;
  // Weights 16-byte aligned (the bulk copies' sources); the layout makes them so, checked anyway.
  for (const Layer& w : layers_) {
    for (const void* ptr : {w.qkv_w, w.dense_w, w.fc1_w, w.fc2_w, w.ln_w, w.ln_b}) {
      if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
    }
  }
  if (!DecodeMegaCudaSupports(p)) {
    if (!mega_refused_logged_) {
      PHI_LOG(WARNING) << "decode megakernel: this model's shape is not supported on this device; "
                       << "1-row decode steps keep the op-by-op path";
      mega_refused_logged_ = true;
    }
    return false;
  }
  PHI_RETURN_IF_ERROR(EnqueueEmbedding(in.ids, p.h, 1));
  PHI_RETURN_IF_ERROR(KernelResult(DecodeMegaCuda(p, stream_), "decode megakernel"));
  ++mega_launches_;
  return true;
}

absl::Status CudaPhiModel::PoisonKvCache() {
  if (kv_ == nullptr) return absl::FailedPreconditionError("KV cache is not allocated");
  DeviceSet(device_);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMemset(kv_, 0xFF, kv_bytes_, stream_), "poison KV"));
  return DeviceStatus(DeviceStreamSync(stream_), "poison KV");
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
