// The float32 math of the partial rotary embedding (kernels/rotary_kv_write.h), shared by every
// kernel that rotates (the rotary + K/V write kernels, the decode attention kernel's fused form),
// so that they produce the same bits: one definition, inlined the same way everywhere.
#pragma once

#include "kernels/cuda/cuda_common.cuh"

namespace phishard::cuda {

// cos / sin of position `pos` at frequency j (0 <= j < rotary_dim / 2), as the Hugging Face
// reference: angle = float(pos) * inv_freq in float32, inv_freq = 1 / theta^(2j / rotary_dim),
// divided by `factor` (linear RoPE scaling) when that is not 1.
// sincosf (not __sincosf) keeps full accuracy at angles of several thousand radians.
__device__ __forceinline__ void RopeCosSin(int pos, int j, int rotary_dim, float theta, float* c,
                                           float* s, float factor = 1.0f) {
  float inv_freq = 1.0f / powf(theta, static_cast<float>(2 * j) / static_cast<float>(rotary_dim));
  if (factor != 1.0f) inv_freq = __fdiv_rn(inv_freq, factor);
  sincosf(static_cast<float>(pos) * inv_freq, s, c);
}

// One rotated element: x1 = x[j], x2 = x[j + half] (float32 of the stored values); `first`: the
// element is x[j] (x1 cos - x2 sin), else x[j + half] (x2 cos + x1 sin). Rounded once to T.
// The multiply-adds are spelled out (one product rounded, then one fused multiply-add), so the
// compiler cannot contract them differently in different kernels: every caller gets these bits.
template <typename T>
__device__ __forceinline__ T RopeRotate(float x1, float x2, float c, float s, bool first) {
  return FromFloat<T>(first ? __fmaf_rn(x1, c, -__fmul_rn(x2, s))
                            : __fmaf_rn(x2, c, __fmul_rn(x1, s)));
}

}  // namespace phishard::cuda
