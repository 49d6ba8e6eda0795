#include "kernels/rotary_kv_write.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/kv_layout.h"

namespace phishard {
namespace {

// Rotates the first rotary_dim dims of one head in place; cos/sin are [rotary_dim / 2].
void RotateHead(float* x, const float* cos, const float* sin, int half) {
  for (int j = 0; j < half; ++j) {
    const float x1 = x[j];
    const float x2 = x[j + half];
    x[j] = x1 * cos[j] - x2 * sin[j];
    x[j + half] = x2 * cos[j] + x1 * sin[j];
  }
}

// LayerNormCpu's statistics (two passes in double, rounded once to float32) over the `heads`
// consecutive heads at x, in place, with one [head_dim] weight / bias for all of them.
void NormHeads(float* x, int heads, int head_dim, const float* w, const float* b, float eps) {
  for (int h = 0; h < heads; ++h) {
    float* xh = x + static_cast<size_t>(h) * head_dim;
    double sum = 0.0;
    for (int i = 0; i < head_dim; ++i) sum += xh[i];
    const double mean = sum / head_dim;
    double sq = 0.0;
    for (int i = 0; i < head_dim; ++i) sq += (xh[i] - mean) * (xh[i] - mean);
    const float inv_std =
        static_cast<float>(1.0 / std::sqrt(sq / head_dim + static_cast<double>(eps)));
    const float mean_f = static_cast<float>(mean);
    for (int i = 0; i < head_dim; ++i) xh[i] = (xh[i] - mean_f) * inv_std * w[i] + b[i];
  }
}

}  // namespace

KernelStatus RotaryKvWriteCpu(const RotaryKvWriteParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.num_tokens < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.num_slots < 0 || p.rotary_dim < 0 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0 ||
      !(p.rope_factor > 0.0f)) {
    return KernelStatus::kInvalidShape;
  }
  if (p.write_cache && (p.block_size <= 0 || p.num_slots % p.block_size != 0)) {
    return KernelStatus::kInvalidShape;
  }
  const int qkv_width = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim;
  const int stride = p.qkv_stride == 0 ? qkv_width : p.qkv_stride;
  if (stride < qkv_width) return KernelStatus::kInvalidShape;
  const int ld_fold = p.ld_fold == 0 ? qkv_width : p.ld_fold;
  if (p.fold_delta != nullptr && ld_fold < qkv_width) return KernelStatus::kInvalidShape;
  if (p.num_tokens == 0) return KernelStatus::kOk;
  if (!p.qkv || !p.positions || (p.write_cache && (!p.slots || !p.k_cache || !p.v_cache))) {
    return KernelStatus::kNullPointer;
  }
  const bool norm = p.q_norm_w != nullptr;
  if (norm && (!p.q_norm_b || !p.k_norm_w || !p.k_norm_b)) return KernelStatus::kNullPointer;
  for (int t = 0; t < p.num_tokens; ++t) {
    if ((p.slots && (p.slots[t] < 0 || p.slots[t] >= p.num_slots)) || p.positions[t] < 0) {
      return KernelStatus::kOutOfRange;
    }
  }

  const int half = p.rotary_dim / 2;
  // inv_freq in float32 as the Hugging Face reference computes it: 1 / theta^(2j / rotary_dim).
  std::vector<float> inv_freq(half), cos(half), sin(half);
  for (int j = 0; j < half; ++j) {
    const float exponent = static_cast<float>(2 * j) / static_cast<float>(p.rotary_dim);
    inv_freq[j] = 1.0f / std::pow(p.theta, exponent);
    if (p.rope_factor != 1.0f) inv_freq[j] /= p.rope_factor;  // transformers: inv_freq /= factor
  }

  auto* qkv = static_cast<float*>(p.qkv);
  auto* k_cache = static_cast<float*>(p.k_cache);
  auto* v_cache = static_cast<float*>(p.v_cache);
  const size_t kv_row = static_cast<size_t>(p.num_kv_heads) * p.head_dim;
  for (int t = 0; t < p.num_tokens; ++t) {
    const float pos = static_cast<float>(p.positions[t]);
    for (int j = 0; j < half; ++j) {
      const float angle = pos * inv_freq[j];
      cos[j] = std::cos(angle);
      sin[j] = std::sin(angle);
    }
    float* row = qkv + static_cast<size_t>(t) * stride;
    if (p.fold_delta != nullptr) {  // one float32 add: the fold's one rounding
      const float* d = p.fold_delta + static_cast<size_t>(t) * ld_fold;
      for (int c = 0; c < qkv_width; ++c) row[c] += d[c];
    }
    float* q = row;
    float* k = row + static_cast<size_t>(p.num_heads) * p.head_dim;
    const float* v = k + kv_row;
    if (norm) {
      NormHeads(q, p.num_heads, p.head_dim, p.q_norm_w, p.q_norm_b, p.norm_eps);
      NormHeads(k, p.num_kv_heads, p.head_dim, p.k_norm_w, p.k_norm_b, p.norm_eps);
    }
    if (half > 0) {
      for (int h = 0; h < p.num_heads; ++h)
        RotateHead(q + h * p.head_dim, cos.data(), sin.data(), half);
      for (int h = 0; h < p.num_kv_heads; ++h) {
        RotateHead(k + h * p.head_dim, cos.data(), sin.data(), half);
      }
    }
    if (!p.write_cache) continue;
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const int64_t off =
          KvSlotOffset(p.slots[t], h, p.block_size, p.num_kv_heads, p.head_dim);
      std::memcpy(k_cache + off, k + h * p.head_dim, sizeof(float) * p.head_dim);
      std::memcpy(v_cache + off, v + h * p.head_dim, sizeof(float) * p.head_dim);
    }
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
