// Helpers shared by the kernel tests: seeded random data, NaN poisoning, comparisons.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace phishard::testing_util {

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Unit roundoff of float32 (half an ulp of 1).
inline constexpr double kF32Unit = 1.0 / (1 << 24);

inline std::vector<float> RandomVector(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// The GELU variants in double: the references of the fused activations (kernels/gemm.h
// GemmEpilogue::kGeluTanh / kGeluErf).
inline double NaiveGeluTanh(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
inline double NaiveGeluErf(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

// Element index of (slot, KV head, dim) in one layer's K or V cache, written out from the layout's
// definition [num_blocks, num_kv_heads, block_size, head_dim] (kernels/kv_layout.h), independently
// of that header: the tests' naive references and cache fills address the cache through this.
inline size_t CacheIndex(size_t slot, int kv_head, int d, int block_size, int num_kv_heads,
                         int head_dim) {
  const size_t block = slot / block_size, in_block = slot % block_size;
  return ((block * num_kv_heads + kv_head) * block_size + in_block) * head_dim + d;
}

// Sets every KV head of cache slot `slot` to `value` (a float cache, or a 16-bit one as uint16_t).
template <class T>
inline void FillCacheSlot(T* cache, size_t slot, T value, int block_size, int num_kv_heads,
                          int head_dim) {
  for (int h = 0; h < num_kv_heads; ++h) {
    T* run = cache + CacheIndex(slot, h, 0, block_size, num_kv_heads, head_dim);
    for (int d = 0; d < head_dim; ++d) run[d] = value;
  }
}

// Copies slot `slot` (every KV head) of a cache to a token row [num_kv_heads * head_dim], the
// K or V part of a fused qkv row.
template <class T>
inline void CopyCacheSlotToRow(const T* cache, size_t slot, T* row, int block_size,
                               int num_kv_heads, int head_dim) {
  for (int h = 0; h < num_kv_heads; ++h) {
    const T* run = cache + CacheIndex(slot, h, 0, block_size, num_kv_heads, head_dim);
    for (int d = 0; d < head_dim; ++d) row[h * head_dim + d] = run[d];
  }
}

inline std::vector<float> Poisoned(size_t n) { return std::vector<float>(n, kNaN); }

inline bool AllFinite(const std::vector<float>& v) {
  for (float x : v) {
    if (!std::isfinite(x)) return false;
  }
  return true;
}

}  // namespace phishard::testing_util
