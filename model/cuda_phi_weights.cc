// CudaPhiModel's weights: where each checkpoint tensor lives in the one device allocation, and
// the two ways to fill it (a checkpoint converted on the host, or random values made on the
// device for benchmarks).
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

namespace phishard {
namespace {

using cuda_model::AlignUp;
using cuda_model::GiB;

struct WeightItem {
  std::string name;
  std::vector<int64_t> shape;
  bool f32;  // float32 on the device (lm_head.bias, added to float32 logits); else model dtype
  size_t offset;
};

// Pass 1: what goes where. Each entry is one checkpoint tensor; q/k/v weights (and biases) land
// back to back so they form one fused [(nH + 2 nKV) hd, H] projection.
struct WeightPlan {
  std::vector<WeightItem> items;
  size_t embed = 0, fln_w = 0, fln_b = 0, lm_w = SIZE_MAX, lm_b = SIZE_MAX;
  std::vector<std::array<size_t, 10>> layers;  // ln w/b, qkv w/b, dense w/b, fc1 w/b, fc2 w/b
  size_t bytes = 0;
};

absl::StatusOr<WeightPlan> PlanWeights(const PhiConfig& c, bool has_lm_head, bool has_lm_bias) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, hd = c.head_dim;
  const int64_t q_out = c.num_attention_heads * hd, kv_out = c.num_key_value_heads * hd;
  const size_t e = 2;
  WeightPlan plan;
  size_t off = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool f32 = false,
                 bool aligned = true) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    if (aligned) off = AlignUp(off);
    plan.items.push_back({std::move(name), std::move(shape), f32, off});
    off += static_cast<size_t>(n) * (f32 ? 4 : e);
    return plan.items.size() - 1;
  };
  plan.embed = add("model.embed_tokens.weight", {V, H});
  plan.fln_w = add("model.final_layernorm.weight", {H});
  plan.fln_b = add("model.final_layernorm.bias", {H});
  if (has_lm_head) {
    plan.lm_w = add("lm_head.weight", {V, H});
  } else if (!c.tie_word_embeddings) {
    return absl::NotFoundError(
        "tensor 'lm_head.weight' is missing and config.json does not set tie_word_embeddings");
  }
  if (has_lm_bias) plan.lm_b = add("lm_head.bias", {V}, /*f32=*/true);
  plan.layers.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    auto& li = plan.layers[l];
    li[0] = add(p + "input_layernorm.weight", {H});
    li[1] = add(p + "input_layernorm.bias", {H});
    li[2] = add(p + "self_attn.q_proj.weight", {q_out, H});
    add(p + "self_attn.k_proj.weight", {kv_out, H}, false, /*aligned=*/false);
    add(p + "self_attn.v_proj.weight", {kv_out, H}, false, /*aligned=*/false);
    li[3] = add(p + "self_attn.q_proj.bias", {q_out});
    add(p + "self_attn.k_proj.bias", {kv_out}, false, /*aligned=*/false);
    add(p + "self_attn.v_proj.bias", {kv_out}, false, /*aligned=*/false);
    li[4] = add(p + "self_attn.dense.weight", {H, q_out});
    li[5] = add(p + "self_attn.dense.bias", {H});
    li[6] = add(p + "mlp.fc1.weight", {I, H});
    li[7] = add(p + "mlp.fc1.bias", {I});
    li[8] = add(p + "mlp.fc2.weight", {H, I});
    li[9] = add(p + "mlp.fc2.bias", {H});
  }
  plan.bytes = AlignUp(off);
  return plan;
}

int64_t Elements(const WeightItem& it) {
  int64_t n = 1;
  for (int64_t d : it.shape) n *= d;
  return n;
}

}  // namespace

absl::Status CudaPhiModel::UploadWeights(const WeightStore& store) {
  absl::StatusOr<WeightPlan> plan =
      PlanWeights(config_, store.Has("lm_head.weight"), store.Has("lm_head.bias"));
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
    upload_bytes += static_cast<uint64_t>(Elements(it)) * (it.f32 ? 4 : 2);
  LoadProgress progress(upload_bytes);  // a line every 2 s: "Weights loaded: X/Y GB"
  for (const WeightItem& it : plan->items) {
    const void* src = nullptr;
    size_t bytes = 0;
    if (it.f32) {
      PHI_RETURN_IF_ERROR(store.ReadF32(it.name, it.shape, &f32));
      src = f32.data();
      bytes = f32.size() * sizeof(float);
    } else {
      PHI_RETURN_IF_ERROR(dtype_ == DataType::kBF16 ? store.ReadBF16(it.name, it.shape, &half)
                                                    : store.ReadF16(it.name, it.shape, &half));
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
  absl::StatusOr<WeightPlan> plan = PlanWeights(config_, true, true);
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
                       .count = Elements(it),
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
  auto at = [&](size_t i) -> const void* { return base + plan.items[i].offset; };
  embed_ = at(plan.embed);
  final_ln_w_ = at(plan.fln_w);
  final_ln_b_ = at(plan.fln_b);
  lm_head_w_ = plan.lm_w == SIZE_MAX ? embed_ : at(plan.lm_w);
  lm_head_b_ = plan.lm_b == SIZE_MAX ? nullptr : static_cast<const float*>(at(plan.lm_b));
  layers_.resize(config_.num_hidden_layers);
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    const auto& li = plan.layers[l];
    layers_[l] = Layer{at(li[0]), at(li[1]), at(li[2]), at(li[3]), at(li[4]),
                       at(li[5]), at(li[6]), at(li[7]), at(li[8]), at(li[9])};
  }
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
