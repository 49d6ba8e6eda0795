// CudaPhiModel's decode-stream path (issue #4, decode batch 1): 1-row decode steps without
// adapter rows on an unsharded model run each layer as ONE weight-stream launch
// (kernels/cuda/decode_stream_cuda.h) with the fused decode attention beside it as a programmatic
// dependent that spins on the stream's q/k/v counter (PagedDecodeCudaPlan::qkv_ready), then one
// fold launch into the residual; the final LayerNorm and the LM head stay as they are.
// docs/decode-stream-design.md has the design and its measurements. Switched by
// CudaModelOptions::decode_stream / PHISHARD_DECODE_STREAM.
//
// Memory (stream_buf_, allocated when the path is switched on, freed when off): fc2's and dense's
// weights transposed ([I, H] and [nH hd, H] a layer: +2.1 GB at Phi-2), then per layer the q/k/v
// row, the attention output and h_l (dtype), then per layer the float32 sums
// [kDecodeStreamCopies, H] and the counters, contiguous so one memset zeroes them every step.
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "kernels/cuda/decode_stream_cuda.h"
#include "model/cuda_lora.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"

namespace phishard {
namespace {

using cuda_model::ArenaLayout;
using cuda_model::MakeArenaLayout;
using cuda_model::MakeDecodePlan;

struct StreamBufLayout {
  size_t fc2_t, dense_t;  // [L][I, H], [L][A, H]
  size_t qkv, attn, h;    // [L][NQ], [L][A], [L][H] dtype
  size_t sums, counters;  // [L][copies, H] float32, [L + 1][kDecodeStreamCounterInts] int32
  size_t zero_bytes;      // sums .. end: what the step zeroes
  size_t total;
};

StreamBufLayout MakeStreamBufLayout(const PhiConfig& c, size_t elem) {
  const size_t L = c.num_hidden_layers, H = c.hidden_size, I = c.intermediate_size;
  const size_t A = static_cast<size_t>(c.num_attention_heads) * c.head_dim;
  const size_t NQ =
      static_cast<size_t>(c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
  StreamBufLayout m;
  cuda_model::OffsetTaker offsets{cuda_model::kAlign};  // consecutive sub-buffers, 256-byte aligned
  m.fc2_t = offsets.Take(L * I * H * elem);
  m.dense_t = offsets.Take(L * A * H * elem);
  m.qkv = offsets.Take(L * NQ * elem);
  m.attn = offsets.Take(L * A * elem);
  m.h = offsets.Take(L * H * elem);
  m.sums = offsets.Take(L * kDecodeStreamCopies * H * sizeof(float));
  m.counters = offsets.Take((L + 1) * kDecodeStreamCounterInts * sizeof(int32_t));  // + the head's
  m.zero_bytes = offsets.off - m.sums;
  m.total = offsets.off;
  return m;
}

// The stream's shape parameters (layer pointers aside) of a model.
DecodeStreamParams StreamShapeParams(const PhiConfig& c, DataType dtype) {
  DecodeStreamParams p;
  p.hidden = c.hidden_size;
  p.intermediate = c.intermediate_size;
  p.num_heads = c.num_attention_heads;
  p.num_kv_heads = c.num_key_value_heads;
  p.head_dim = c.head_dim;
  p.eps = static_cast<float>(c.layer_norm_eps);
  p.act = c.hidden_act == Activation::kGeluTanh ? GemmEpilogue::kGeluTanh : GemmEpilogue::kGeluErf;
  p.dtype = dtype;
  p.attn_heads = c.num_attention_heads;
  return p;
}

}  // namespace

absl::Status CudaPhiModel::set_decode_stream(bool on) {
  DeviceSet(device_);
  DropGraphs();
  if (!on) {
    stream_on_ = false;
    if (stream_buf_ != nullptr) {
      PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "decode stream sync"));
      DeviceFree(stream_buf_);
      stream_buf_ = nullptr;
    }
    return absl::OkStatus();
  }
  const PhiConfig& c = config_;
  if (layers_.empty() || layers_[0].fc2_w == nullptr) {
    return absl::FailedPreconditionError("decode stream: the weights are not uploaded yet");
  }
  // Shapes and device the kernels take (an unsupported model keeps the op-by-op path).
  const DecodeStreamParams shape = StreamShapeParams(c, dtype_);
  bool supported = !shard_.sharded() && PlainRotary() && DecodeStreamCudaSupports(shape) &&
                   PagedDecodeCudaSupportsHeadDim(c.head_dim);
  for (const Layer& w : layers_) {
    for (const void* ptr : {w.qkv_w, w.fc1_w, w.ln_w, w.ln_b}) {
      supported = supported && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
    }
  }
  if (!supported) {
    PHI_LOG(INFO) << "decode stream off: this model's shape, its sharding or this device is not "
                  << "supported; 1-row decode steps keep the op-by-op path";
    stream_on_ = false;
    return absl::OkStatus();
  }
  // Load every kernel a stream step launches now: a first launch under lazy module loading waits
  // for the work in flight, and inside a step the stream and the attention wait on each other.
  PHI_RETURN_IF_ERROR(KernelResult(DecodeStreamCudaPrepare(shape), "decode stream prepare"));
  PHI_RETURN_IF_ERROR(KernelResult(PagedDecodeCudaPrepareBesideStream(c.head_dim, dtype_),
                                   "decode stream attention prepare"));
  // A step needs the attention to run beside the stream kernel: where launches are serialised
  // (compute-sanitizer) or the stream's blocks cannot all be resident beside another kernel (an
  // MPS thread limit), a step would trap; keep the op-by-op path there.
  if (!stream_probed_) {
    void* scratch = nullptr;
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMalloc(&scratch, 2 * sizeof(int)), "stream probe"));
    bool concurrent = false;
    const KernelStatus probe =
        DecodeStreamCudaConcurrencyProbe(shape, static_cast<int*>(scratch), stream_, &concurrent);
    DeviceFree(scratch);
    PHI_RETURN_IF_ERROR(KernelResult(probe, "decode stream concurrency probe"));
    stream_probed_ = true;
    stream_concurrent_ = concurrent;
  }
  if (!stream_concurrent_) {
    PHI_LOG(WARNING) << "decode stream off: kernels do not run beside each other here "
                     << "(compute-sanitizer, an MPS thread limit?); 1-row decode steps keep the "
                     << "op-by-op path";
    stream_on_ = false;
    return absl::OkStatus();
  }
  if (stream_buf_ == nullptr) {
    const StreamBufLayout m = MakeStreamBufLayout(c, DataTypeSize(dtype_));
    if (DeviceMalloc(&stream_buf_, m.total) != 0) {
      stream_buf_ = nullptr;
      DeviceGetLastError();  // clear the failed allocation's error
      return absl::ResourceExhaustedError(
          absl::StrFormat("decode stream: %.2f GiB for the transposed fc2 / dense weights and the "
                          "stream's buffers are not free on the device",
                          m.total / 1073741824.0));
    }
    char* b = static_cast<char*>(stream_buf_);
    const size_t elem = DataTypeSize(dtype_);
    const int H = c.hidden_size, I = c.intermediate_size, A = c.num_attention_heads * c.head_dim;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& w = layers_[l];
      PHI_RETURN_IF_ERROR(KernelResult(
          DecodeStreamTransposeCuda(w.fc2_w, H, I, b + m.fc2_t + l * I * H * elem, dtype_, stream_),
          "fc2 transpose"));
      PHI_RETURN_IF_ERROR(
          KernelResult(DecodeStreamTransposeCuda(w.dense_w, H, A, b + m.dense_t + l * A * H * elem,
                                                 dtype_, stream_),
                       "dense transpose"));
    }
    PHI_RETURN_IF_ERROR(
        DeviceStatus(DeviceMemset(b + m.attn, kDecodeStreamAttnSentinelByte, m.h - m.attn, stream_),
                     "decode stream attention sentinel"));
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "decode stream transposes"));
    PHI_LOG(INFO) << absl::StrFormat(
        "decode stream on: 1-row decode steps run a weight stream a layer (%.2f GiB of "
        "transposed fc2 / dense weights and buffers)",
        m.total / 1073741824.0);
  }
  stream_on_ = true;
  return absl::OkStatus();
}

namespace {
size_t StreamTimelineLayerWords() {
  return static_cast<size_t>(CudaPhiModel::kStreamTimelineBlocks) * kDecodeStreamTimelineEvents +
         static_cast<size_t>(CudaPhiModel::kStreamTimelineAttnBlocks) * kPagedDecodeTimelineEvents;
}
}  // namespace

void CudaPhiModel::set_decode_stream_preload(int stages) {
  DropGraphs();
  stream_preload_ = std::clamp(stages, 0, 2);
}

void CudaPhiModel::set_decode_stream_blocks(int blocks) {
  DropGraphs();
  stream_blocks_ = std::clamp(blocks, 0, multiprocessors_);
}

void CudaPhiModel::set_decode_stream_one_in_flight_ctx(int ctx) {
  DropGraphs();
  stream_one_in_flight_ctx_ = std::max(ctx, -1);
}

absl::Status CudaPhiModel::set_decode_stream_poll(bool on) {
  DeviceSet(device_);
  DropGraphs();
  stream_poll_ = on;
  if (!on || stream_buf_ == nullptr) return absl::OkStatus();
  // Steps without it leave their attention outputs in the buffers: arm them again.
  const StreamBufLayout m = MakeStreamBufLayout(config_, DataTypeSize(dtype_));
  return DeviceStatus(DeviceMemset(static_cast<char*>(stream_buf_) + m.attn,
                                   kDecodeStreamAttnSentinelByte, m.h - m.attn, stream_),
                      "decode stream attention sentinel");
}

void CudaPhiModel::set_decode_stream_head(bool on) {
  DropGraphs();
  stream_head_ = on;
}

void CudaPhiModel::set_decode_stream_host_logits(bool on) {
  DropGraphs();
  stream_host_logits_ = on;
}

bool CudaPhiModel::StreamTakesDecode(int rows) const {
  return stream_on_ && stream_buf_ != nullptr && rows == 1 && !lora_->active() &&
         !shard_.sharded() && kv_ != nullptr;
}

bool CudaPhiModel::StreamHeadForm() const {
  return stream_head_ && config_.vocab_size % (config_.hidden_size / 256) == 0 &&
         reinterpret_cast<uintptr_t>(lm_head_w_) % 16 == 0;
}

void CudaPhiModel::set_decode_stream_attn_smem(bool on) {
  DropGraphs();
  stream_attn_smem_ = on;
}

absl::Status CudaPhiModel::set_decode_stream_timeline(bool on) {
  DeviceSet(device_);
  DropGraphs();
  if (stream_timeline_ != nullptr) {
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "timeline sync"));
    DeviceFree(stream_timeline_);
    stream_timeline_ = nullptr;
  }
  if (!on) return absl::OkStatus();
  // A row per layer and one for the LM head form (its stream blocks only).
  const size_t bytes =
      sizeof(uint64_t) * (config_.num_hidden_layers + 1) * StreamTimelineLayerWords();
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMalloc(&stream_timeline_, bytes), "timeline buffer"));
  return DeviceStatus(DeviceMemset(stream_timeline_, 0, bytes, stream_), "zero timeline");
}

absl::StatusOr<std::vector<uint64_t>> CudaPhiModel::decode_stream_timeline() {
  if (stream_timeline_ == nullptr) return absl::FailedPreconditionError("timeline is off");
  return CopyTimelineWords(stream_timeline_,
                           (config_.num_hidden_layers + 1) * StreamTimelineLayerWords());
}

absl::StatusOr<bool> CudaPhiModel::TryEnqueueStreamDecode(const StepInputs& in, bool* logits_done) {
  *logits_done = false;
  if (!StreamTakesDecode(in.tokens) || in.merge_counters == nullptr) return false;
  const PhiConfig& c = config_;
  const int L = c.num_hidden_layers, H = c.hidden_size, I = c.intermediate_size;
  const int nH = c.num_attention_heads, A = nH * c.head_dim;
  const int NQ = (nH + 2 * c.num_key_value_heads) * c.head_dim;
  const size_t elem = DataTypeSize(dtype_);
  const ArenaLayout al = MakeArenaLayout(c, arena_tokens_);
  char* a = static_cast<char*>(arena_);
  const StreamBufLayout m = MakeStreamBufLayout(c, elem);
  char* b = static_cast<char*>(stream_buf_);
  auto qkv_of = [&](int l) { return b + m.qkv + static_cast<size_t>(l) * NQ * elem; };
  auto attn_of = [&](int l) { return b + m.attn + static_cast<size_t>(l) * A * elem; };
  // h_l: layer 0's input is the embedding row in the arena's h; the fold after the last layer
  // writes h_L back there (EnqueueLogits reads it).
  auto h_of = [&](int l) -> void* {
    return l == 0 ? static_cast<void*>(a + al.h) : b + m.h + static_cast<size_t>(l) * H * elem;
  };
  auto sums_of = [&](int l) {
    return reinterpret_cast<float*>(b + m.sums) + static_cast<size_t>(l) * kDecodeStreamCopies * H;
  };
  auto counters_of = [&](int l) {
    return reinterpret_cast<int32_t*>(b + m.counters) +
           static_cast<size_t>(l) * kDecodeStreamCounterInts;
  };
  // set_decode_stream_poll: the attention outputs hold the sentinel between steps (armed when the
  // buffers are made or the mode switched on, re-armed by each layer's fold after their use).
  const bool poll = stream_poll_ && A == H;
  PHI_RETURN_IF_ERROR(EnqueueEmbedding(in.ids, a + al.h, 1));
  PHI_RETURN_IF_ERROR(
      DeviceStatus(DeviceMemset(b + m.sums, 0, m.zero_bytes, stream_), "decode stream counters"));
  uint64_t* timeline = static_cast<uint64_t*>(stream_timeline_);
  if (timeline != nullptr) {
    PHI_RETURN_IF_ERROR(DeviceStatus(
        DeviceMemset(timeline, 0, sizeof(uint64_t) * (L + 1) * StreamTimelineLayerWords(), stream_),
        "zero timeline"));
  }
  const size_t layer_kv_bytes = static_cast<size_t>(kv_num_blocks_) * kv_block_size_ *
                                c.num_key_value_heads * c.head_dim * elem;
  for (int l = 0; l < L; ++l) {
    const Layer& w = layers_[l];
    const Layer* prev = l > 0 ? &layers_[l - 1] : nullptr;
    DecodeStreamParams p = StreamShapeParams(c, dtype_);
    p.layer = DecodeStreamLayer{.ln_w = w.ln_w,
                                .ln_b = w.ln_b,
                                .qkv_w = w.qkv_w,
                                .qkv_b = w.qkv_b,
                                .fc1_w = w.fc1_w,
                                .fc1_b = w.fc1_b,
                                .fc2_wt = b + m.fc2_t + static_cast<size_t>(l) * I * H * elem,
                                .dense_wt = b + m.dense_t + static_cast<size_t>(l) * A * H * elem,
                                .h_in = h_of(l == 0 ? 0 : l - 1),
                                .sums_in = l == 0 ? nullptr : sums_of(l - 1),
                                .prev_dense_b = prev != nullptr ? prev->dense_b : nullptr,
                                .prev_fc2_b = prev != nullptr ? prev->fc2_b : nullptr,
                                .prev_counters = l == 0 ? nullptr : counters_of(l - 1),
                                .h_out = h_of(l),
                                .qkv = qkv_of(l),
                                .attn = attn_of(l),
                                .sums = sums_of(l),
                                .counters = counters_of(l)};
    uint64_t* layer_timeline = timeline != nullptr
                                   ? timeline + static_cast<size_t>(l) * StreamTimelineLayerWords()
                                   : nullptr;
    p.layer.timeline = layer_timeline;
    p.layer.timeline_blocks = kStreamTimelineBlocks;
    p.blocks = stream_blocks_;
    p.dense_attn_in_smem = stream_attn_smem_;
    p.one_in_flight = in.stream_one_in_flight;  // (the step's variant)
    if (poll) {  // the dense chunks wait for the attention output itself
      p.dense_poll_attn = true;
      p.attn_heads = 0;
      p.layer.rearm_attn = l > 0 ? attn_of(l - 1) : nullptr;
    }
    p.programmatic_launch = l > 0;  // a dependent of the attention of the layer before
    PHI_RETURN_IF_ERROR(KernelResult(DecodeStreamLayerCuda(p, stream_), "decode stream layer"));
    char* k_cache = static_cast<char*>(kv_) + 2 * static_cast<size_t>(l) * layer_kv_bytes;
    char* v_cache = k_cache + layer_kv_bytes;
    PagedDecodeCudaPlan plan = MakeDecodePlan(1, nH, multiprocessors_, a, al);
    plan.step_info = in.step_info;
    plan.variant = PagedDecodeVariant::kRegisterStages;
    plan.fold_rotary = true;
    plan.rotary = LayerRotaryParams(l, qkv_of(l), in.positions, in.slots, 1, k_cache, v_cache);
    plan.merge_counters = in.merge_counters;
    plan.merge_counters_len = in.merge_counters_len;
    plan.qkv_ready = counters_of(l) + kStreamQkvDone;
    plan.qkv_ready_target = NQ / (H / 256);  // the stream's q/k/v chunks (R = H / 256 rows each)
    plan.heads_done = poll ? nullptr : counters_of(l) + kStreamHeadsDone;
    plan.preload_stages = stream_preload_;
    if (layer_timeline != nullptr) {
      plan.timeline =
          layer_timeline + static_cast<size_t>(kStreamTimelineBlocks) * kDecodeStreamTimelineEvents;
      plan.timeline_blocks = kStreamTimelineAttnBlocks;
    }
    const PagedAttentionParams ap =
        LayerAttentionParams(in, qkv_of(l), attn_of(l), 1, k_cache, v_cache);
    PHI_RETURN_IF_ERROR(KernelResult(PagedDecodeCuda(ap, plan, stream_, &last_decode_splits_),
                                     "decode stream attention"));
  }
  const Layer& last = layers_[L - 1];
  if (StreamHeadForm()) {
    // The final LayerNorm and the LM head as one more stream launch (float32 logits).
    DecodeStreamParams p = StreamShapeParams(c, dtype_);
    p.attn_heads = 0;
    p.head_vocab = c.vocab_size;
    p.blocks = stream_blocks_;
    p.one_in_flight = in.stream_one_in_flight;  // (the step's variant)
    p.programmatic_launch = true;  // a dependent of the last layer's attention
    p.layer = DecodeStreamLayer{.ln_w = final_ln_w_,
                                .ln_b = final_ln_b_,
                                .qkv_w = lm_head_w_,
                                .h_in = h_of(L - 1),
                                .sums_in = sums_of(L - 1),
                                .prev_dense_b = last.dense_b,
                                .prev_fc2_b = last.fc2_b,
                                .prev_counters = counters_of(L - 1),
                                .h_out = a + al.h,
                                .counters = counters_of(L),
                                .logits = reinterpret_cast<float*>(a + al.logits),
                                .head_bias = lm_head_b_,
                                // (logits_host_ holds >= 1 row; a staging change drops graphs)
                                .logits_host = stream_host_logits_ ? logits_host_ : nullptr,
                                .rearm_attn = poll ? attn_of(L - 1) : nullptr};
    if (timeline != nullptr) {
      p.layer.timeline = timeline + static_cast<size_t>(L) * StreamTimelineLayerWords();
      p.layer.timeline_blocks = kStreamTimelineBlocks;
    }
    PHI_RETURN_IF_ERROR(KernelResult(DecodeStreamLayerCuda(p, stream_), "decode stream LM head"));
    *logits_done = true;
    ++stream_steps_;
    return true;
  }
  PHI_RETURN_IF_ERROR(
      KernelResult(DecodeStreamFoldCuda({.h_in = h_of(L - 1),
                                         .sums = sums_of(L - 1),
                                         .dense_b = last.dense_b,
                                         .fc2_b = last.fc2_b,
                                         .h_out = a + al.h,
                                         .hidden = H,
                                         .dtype = dtype_,
                                         .rearm_attn = poll ? attn_of(L - 1) : nullptr},
                                        stream_),
                   "decode stream fold"));
  ++stream_steps_;
  return true;
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
