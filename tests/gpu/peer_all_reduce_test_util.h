// Inputs and the naive reference of the two-rank all-reduce tests (custom_all_reduce_test.cc,
// copy_engine_all_reduce_test.cc): each rank's random partial and the float sum of both, rounded
// once to the element type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/dtype.h"

namespace phishard::peer_test {

// Rank `rank`'s partial for call `seed`: `count` random values of `dtype` as raw little-endian
// bytes, and the same values as floats (exact: they are dtype values).
struct Partial {
  std::vector<unsigned char> bytes;
  std::vector<float> values;
};

inline Partial MakePartial(int rank, uint32_t seed, size_t count, DataType dtype) {
  std::mt19937 rng(seed * 7919u + static_cast<uint32_t>(rank) * 104729u + 17u);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-12, 12);
  Partial p;
  p.bytes.resize(count * DataTypeSize(dtype));
  p.values.resize(count);
  for (size_t i = 0; i < count; ++i) {
    const float x = std::ldexp(normal(rng), exponent(rng));
    if (dtype == DataType::kBF16) {
      const __nv_bfloat16 b = __float2bfloat16(x);
      std::memcpy(&p.bytes[2 * i], &b, 2);
      p.values[i] = __bfloat162float(b);
    } else if (dtype == DataType::kF16) {
      const __half h = __float2half(x);
      std::memcpy(&p.bytes[2 * i], &h, 2);
      p.values[i] = __half2float(h);
    } else {
      std::memcpy(&p.bytes[4 * i], &x, 4);
      p.values[i] = x;
    }
  }
  return p;
}

// The naive reference: both partials as floats, added once, rounded once to dtype.
inline std::vector<unsigned char> ReferenceSum(size_t count, DataType dtype, uint32_t seed) {
  const Partial a = MakePartial(0, seed, count, dtype), b = MakePartial(1, seed, count, dtype);
  std::vector<unsigned char> out(count * DataTypeSize(dtype));
  for (size_t i = 0; i < count; ++i) {
    const float s = a.values[i] + b.values[i];
    if (dtype == DataType::kBF16) {
      const __nv_bfloat16 r = __float2bfloat16(s);
      std::memcpy(&out[2 * i], &r, 2);
    } else if (dtype == DataType::kF16) {
      const __half r = __float2half(s);
      std::memcpy(&out[2 * i], &r, 2);
    } else {
      std::memcpy(&out[4 * i], &s, 4);
    }
  }
  return out;
}

// First element where two raw arrays differ, or -1.
inline long FirstDiff(const std::vector<unsigned char>& x, const std::vector<unsigned char>& y,
                      size_t esize) {
  for (size_t i = 0; i < x.size(); i += esize) {
    if (std::memcmp(&x[i], &y[i], esize) != 0) return static_cast<long>(i / esize);
  }
  return -1;
}

}  // namespace phishard::peer_test
