// CudaPhiModel's weights: where each checkpoint tensor (this rank's slice of it, phi_weights.h)
// lives in the one device allocation, and the two ways to fill it (a checkpoint converted on the
// host, or random values made on the device for benchmarks).
#ifdef PHISHARD_HAVE_CUDA

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/random_fill_cuda.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"
#include "model/load_progress.h"
#include "model/phi_weights.h"
#include "model/safetensors.h"

namespace phishard {
namespace {

using cuda_model::AlignUp;
using cuda_model::GiB;

struct WeightItem {
  std::string name;
  std::vector<int64_t> shape;  // the checkpoint's (full) shape
  TensorSlice slice;           // the part this rank holds (phi_weights.h); all at world size 1
  bool f32;  // float32 on the device (lm_head.bias, added to float32 logits); else model dtype
  size_t offset;
  int64_t elements;  // of the slice
};

// Pass 1: what goes where. Each entry is (a slice of) one checkpoint tensor; q/k/v weights (and
// biases) land back to back so they form one fused [(nH + 2 nKV) hd, H] projection (local counts).
// Row-parallel biases (dense, fc2) exist on the rank that adds them only; kNone elsewhere.
constexpr size_t kNone = SIZE_MAX;
struct WeightPlan {
  std::vector<WeightItem> items;
  size_t embed = 0, fln_w = 0, fln_b = 0, lm_w = kNone, lm_b = kNone;
  // ln w/b, qkv w/b, dense w/b, fc1 w/b, fc2 w/b, then q / k LayerNorm w/b (float32; kNone
  // without PhiConfig::qk_layernorm)
  std::vector<std::array<size_t, 14>> layers;
  size_t bytes = 0;
};

absl::StatusOr<WeightPlan> PlanWeights(const PhiConfig& c, const PhiShard& sh, bool has_lm_head,
                                       bool has_lm_bias) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, hd = c.head_dim;
  const int64_t q_out = c.num_attention_heads * hd;
  const int64_t q0 = static_cast<int64_t>(sh.q_head_begin) * hd;
  const int64_t q1 = q0 + static_cast<int64_t>(sh.num_heads) * hd;
  const int64_t i0 = sh.intermediate_begin, i1 = i0 + sh.intermediate;
  const size_t e = 2;
  WeightPlan plan;
  size_t off = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, TensorSlice slice = {},
                 bool f32 = false, bool aligned = true) {
    const int64_t rows = (slice.row_end < 0 ? shape[0] : slice.row_end) - slice.row_begin;
    const int64_t cols =
        shape.size() == 2 ? (slice.col_end < 0 ? shape[1] : slice.col_end) - slice.col_begin : 1;
    if (aligned) off = AlignUp(off);
    plan.items.push_back({std::move(name), std::move(shape), slice, f32, off, rows * cols});
    off += static_cast<size_t>(rows * cols) * (f32 ? 4 : e);
    return plan.items.size() - 1;
  };
  const TensorSlice vocab_rows{.row_begin = sh.vocab_begin, .row_end = sh.vocab_end};
  const TensorSlice head_rows{.row_begin = sh.lm_head_begin, .row_end = sh.lm_head_end};
  plan.embed = add("model.embed_tokens.weight", {V, H}, vocab_rows);
  plan.fln_w = add("model.final_layernorm.weight", {H});
  plan.fln_b = add("model.final_layernorm.bias", {H});
  if (has_lm_head) {
    plan.lm_w = add("lm_head.weight", {V, H}, head_rows);
  } else if (!c.tie_word_embeddings) {
    return absl::NotFoundError(
        "tensor 'lm_head.weight' is missing and config.json does not set tie_word_embeddings");
  } else if (sh.lm_head_begin != sh.vocab_begin || sh.lm_head_end != sh.vocab_end) {
    // Tied, but the head needs other rows than the embedding holds (a replicated head over a
    // vocab-parallel embedding): its own copy.
    plan.lm_w = add("model.embed_tokens.weight", {V, H}, head_rows);
  }
  if (has_lm_bias) plan.lm_b = add("lm_head.bias", {V}, head_rows, /*f32=*/true);
  const bool row_bias = sh.adds_row_parallel_bias();
  plan.layers.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    auto& li = plan.layers[l];
    li[0] = add(p + "input_layernorm.weight", {H});
    li[1] = add(p + "input_layernorm.bias", {H});
    const std::vector<QkvPart> parts = QkvParts(c, sh);
    for (int b = 0; b < 2; ++b) {  // weights, then biases
      for (size_t k = 0; k < parts.size(); ++k) {
        const QkvPart& part = parts[k];
        const TensorSlice rows{.row_begin = part.row_begin,
                               .row_end = part.row_begin + part.local_rows};
        std::string name = absl::StrCat(p, "self_attn.", part.proj, b == 0 ? ".weight" : ".bias");
        std::vector<int64_t> shape =
            b == 0 ? std::vector<int64_t>{part.rows, H} : std::vector<int64_t>{part.rows};
        const size_t at = add(std::move(name), std::move(shape), rows, false, /*aligned=*/k == 0);
        if (k == 0) li[2 + b] = at;
      }
    }
    li[4] = add(p + "self_attn.dense.weight", {H, q_out}, {.col_begin = q0, .col_end = q1});
    li[5] = row_bias ? add(p + "self_attn.dense.bias", {H}) : kNone;
    li[6] = add(p + "mlp.fc1.weight", {I, H}, {.row_begin = i0, .row_end = i1});
    li[7] = add(p + "mlp.fc1.bias", {I}, {.row_begin = i0, .row_end = i1});
    li[8] = add(p + "mlp.fc2.weight", {H, I}, {.col_begin = i0, .col_end = i1});
    li[9] = row_bias ? add(p + "mlp.fc2.bias", {H}) : kNone;
    li[10] = li[11] = li[12] = li[13] = kNone;
    if (c.qk_layernorm) {  // [hd], shared by the heads: the same on every rank
      li[10] = add(p + "self_attn.q_layernorm.weight", {hd}, {}, /*f32=*/true);
      li[11] = add(p + "self_attn.q_layernorm.bias", {hd}, {}, /*f32=*/true);
      li[12] = add(p + "self_attn.k_layernorm.weight", {hd}, {}, /*f32=*/true);
      li[13] = add(p + "self_attn.k_layernorm.bias", {hd}, {}, /*f32=*/true);
    }
  }
  plan.bytes = AlignUp(off);
  return plan;
}

}  // namespace

absl::Status CudaPhiModel::UploadWeights(const WeightStore& store) {
  absl::StatusOr<WeightPlan> plan =
      PlanWeights(full_config_, shard_, store.Has("lm_head.weight"), store.Has("lm_head.bias"));
  if (!plan.ok()) return plan.status();
  weights_bytes_ = plan->bytes;
  size_t free_bytes = 0, total_bytes = 0;
  DeviceMemGetInfo(&free_bytes, &total_bytes);
  if (int err = DeviceMalloc(&weights_, weights_bytes_); err != 0) {
    weights_ = nullptr;
    DeviceGetLastError();
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot allocate %.2f GiB for the weights on CUDA device %d (%.2f GiB free): %s",
        GiB(weights_bytes_), device_, GiB(free_bytes), DeviceErrorString(err)));
  }
  // Pass 2: convert on the host (round to nearest even) and upload, one tensor at a time.
  std::vector<uint16_t> half;
  std::vector<float> f32;
  char* base = static_cast<char*>(weights_);
  uint64_t upload_bytes = 0;  // without the alignment padding of plan->bytes
  for (const WeightItem& it : plan->items)
    upload_bytes += static_cast<uint64_t>(it.elements) * (it.f32 ? 4 : 2);
  LoadProgress progress(upload_bytes);  // a line every 2 s: "Weights loaded: X/Y GB"
  for (const WeightItem& it : plan->items) {
    const void* src = nullptr;
    size_t bytes = 0;
    // Only this rank's slice is read (and converted) out of the mmapped file.
    if (it.f32) {
      PHI_RETURN_IF_ERROR(ReadF32Slice(store, it.name, it.shape, it.slice, &f32));
      src = f32.data();
      bytes = f32.size() * sizeof(float);
    } else {
      PHI_RETURN_IF_ERROR(ReadSlice16(store, it.name, it.shape, it.slice,
                                      dtype_ == DataType::kBF16 ? DType::kBF16 : DType::kF16,
                                      &half));
      src = half.data();
      bytes = half.size() * sizeof(uint16_t);
    }
    PHI_RETURN_IF_ERROR(
        DeviceStatus(DeviceCopyToDevice(base + it.offset, src, bytes, stream_), "weight upload"));
    // The host buffer is reused for the next tensor.
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "weight upload"));
    progress.Add(bytes, it.name);
  }
  SetWeightPointers(&*plan);
  return absl::OkStatus();
}

absl::Status CudaPhiModel::FillRandomWeights(uint64_t seed) {
  // This rank's shapes only: at world size > 1 the ranks' random weights are not slices of one
  // model (timings only).
  absl::StatusOr<WeightPlan> plan = PlanWeights(full_config_, shard_, true, true);
  if (!plan.ok()) return plan.status();
  weights_bytes_ = plan->bytes;
  if (int err = DeviceMalloc(&weights_, weights_bytes_); err != 0) {
    weights_ = nullptr;
    DeviceGetLastError();
    return absl::ResourceExhaustedError(
        absl::StrFormat("cannot allocate %.2f GiB for random weights on CUDA device %d: %s",
                        GiB(weights_bytes_), device_, DeviceErrorString(err)));
  }
  char* base = static_cast<char*>(weights_);
  const float w = 0.02f * 1.7320508f;  // uniform with std 0.02
  for (size_t i = 0; i < plan->items.size(); ++i) {
    const WeightItem& it = plan->items[i];
    RandomFillParams p{.data = base + it.offset,
                       .count = it.elements,
                       .center = 0.0f,
                       .spread = w,
                       .seed = seed * 1000003u + i,
                       .dtype = it.f32 ? DataType::kF32 : dtype_};
    if (absl::StrContains(it.name, "layernorm.weight")) {
      p.center = 1.0f;
      p.spread = 0.1f;
    } else if (absl::EndsWith(it.name, ".bias")) {
      p.spread = 0.01f;
    }
    PHI_RETURN_IF_ERROR(KernelResult(RandomFillCuda(p, stream_), "random weights"));
  }
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "random weights"));
  SetWeightPointers(&*plan);
  return absl::OkStatus();
}

void CudaPhiModel::SetWeightPointers(const void* weight_plan) {
  const WeightPlan& plan = *static_cast<const WeightPlan*>(weight_plan);
  const char* base = static_cast<const char*>(weights_);
  auto at = [&](size_t i) -> const void* {
    return i == kNone ? nullptr : base + plan.items[i].offset;
  };
  embed_ = at(plan.embed);
  final_ln_w_ = at(plan.fln_w);
  final_ln_b_ = at(plan.fln_b);
  lm_head_w_ = plan.lm_w == kNone ? embed_ : at(plan.lm_w);
  lm_head_b_ = static_cast<const float*>(at(plan.lm_b));
  layers_.resize(config_.num_hidden_layers);
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    const auto& li = plan.layers[l];
    auto f32 = [&](size_t i) { return static_cast<const float*>(at(i)); };
    layers_[l] =
        Layer{at(li[0]), at(li[1]), at(li[2]), at(li[3]),   at(li[4]),   at(li[5]),   at(li[6]),
              at(li[7]), at(li[8]), at(li[9]), f32(li[10]), f32(li[11]), f32(li[12]), f32(li[13])};
  }
}

absl::Status CudaPhiModel::MakeFc2BiasF32() {
  const int L = config_.num_hidden_layers, H = config_.hidden_size;
  if (L == 0 || layers_[0].fc2_b == nullptr) return absl::OkStatus();  // no fc2 bias on this rank
  // Exact widening (bf16 / fp16 -> float32) on the host: H values a layer, once at load.
  std::vector<uint16_t> half(static_cast<size_t>(H));
  std::vector<float> f32(static_cast<size_t>(L) * H);
  for (int l = 0; l < L; ++l) {
    PHI_RETURN_IF_ERROR(DeviceStatus(
        DeviceCopyToHost(half.data(), layers_[l].fc2_b, half.size() * sizeof(uint16_t), stream_),
        "fc2 bias download"));
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "fc2 bias download"));
    for (int i = 0; i < H; ++i) {
      f32[static_cast<size_t>(l) * H + i] =
          dtype_ == DataType::kBF16 ? BF16ToFloat(half[i]) : HalfToFloat(half[i]);
    }
  }
  void* dev = nullptr;
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMalloc(&dev, f32.size() * sizeof(float)),
                                   "malloc (fc2 bias, float32)"));
  fc2_bias_f32_ = static_cast<float*>(dev);
  PHI_RETURN_IF_ERROR(DeviceStatus(
      DeviceCopyToDevice(fc2_bias_f32_, f32.data(), f32.size() * sizeof(float), stream_),
      "fc2 bias upload"));
  return DeviceStatus(DeviceStreamSync(stream_), "fc2 bias upload");
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
