// Internal to the 1-row weight-stream kernels (kernels/cuda/decode_stream.cu, the bench probes
// bench/mlp_probe.cu / layer_probe.cu / branch_probe.cu): the two operations on a ring stage of
// R rows x K (16-bit, shared memory) and the exact-sum rounding of their partial outputs.
//
// Thread layout they assume: a row dot (WarpDot) is one warp's (lane l takes 16-byte units l,
// l + 32, ... of the row: K = 256 KC); an axpy over a stage (Axpy) gives every consumer thread t
// the 8 output columns 8t .. 8t + 8 (K / 8 threads).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"

namespace phishard::cuda {

// Dot of a row (shared memory, dtype T) with x (shared memory, dtype T) over K = 256 KC, lane's
// 16-byte units l, l + 32, ... (KC of them), summed over the warp (every lane gets the sum).
template <int KC, typename T>
__device__ __forceinline__ float WarpDot(const T* row, const T* x, int lane) {
  float d = 0.0f;
#pragma unroll
  for (int u = 0; u < KC; ++u) {
    const uint4 wv = reinterpret_cast<const uint4*>(row)[lane + 32 * u];
    const uint4 xv = reinterpret_cast<const uint4*>(x)[lane + 32 * u];
    const uint32_t wa[4] = {wv.x, wv.y, wv.z, wv.w}, xa[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 wf = Word2ToFloat2<T>(wa[e]);
      const float2 xf = Word2ToFloat2<T>(xa[e]);
      d = fmaf(wf.x, xf.x, fmaf(wf.y, xf.y, d));
    }
  }
  return WarpSum(d);
}

// acc[0..8) += sum_r g[r] * rows[r, 8t .. 8t + 8) over R rows of K (shared memory, dtype T).
template <int R, int K, typename T>
__device__ __forceinline__ void Axpy(const T* rows, const float* g, int t, float (&acc)[8]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const uint4 wv = reinterpret_cast<const uint4*>(rows)[r * (K / 8) + t];
    const uint32_t wa[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 wf = Word2ToFloat2<T>(wa[e]);
      acc[2 * e] = fmaf(g[r], wf.x, acc[2 * e]);
      acc[2 * e + 1] = fmaf(g[r], wf.y, acc[2 * e + 1]);
    }
  }
}

// Grid sums: partial outputs whose order of summation is not fixed (blocks taking items from a
// counter, float atomics) still sum to the same bits when every item's contribution to column c
// is first rounded to a multiple of a power of two q_c: multiples of q_c add EXACTLY in float32
// while every partial sum stays below 2^24 q_c in magnitude, and exact sums do not depend on their
// order. GridMagic(s) is the rounding constant of a column of scale s (> 0; the stream kernels use
// max(|h_c|, rms(h)) of the layer's input, which every block computes alike): M = 1.5 * 2^23 * q
// with q = 2^(E - 16), 2^E >= s, so sums stay exact up to 2^(E + 8) >= 256 s and one rounding
// costs at most q / 2 <= s * 2^-16. Beyond that range a sum rounds as plain float32 does.
__device__ __forceinline__ float GridMagic(float s) {
  // s's biased exponent ex: s < 2^(ex - 126) = 2^E; M's biased exponent ex + 8 (clamped: s = 0 or
  // tiny gets a tiny grid, s huge or infinite the largest finite M).
  const int ex = max(static_cast<int>((__float_as_uint(s) >> 23) & 0xff), 40);
  return __uint_as_float(static_cast<uint32_t>(min(ex + 8, 254)) << 23 | 0x400000u);
}

// acc[e] += t[e] rounded to its column's grid: t + M lies in [2^23 q, 2^24 q) for |t| < 2^22 q,
// where a float's ulp is q, so the add rounds t to a multiple of q (a larger |t|: a coarser
// multiple, still on the grid) and the subtraction is exact. __fadd_rn / __fsub_rn: never fused.
__device__ __forceinline__ void AddOnGrid(float (&acc)[8], const float (&t)[8],
                                          const float (&magic)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] += __fsub_rn(__fadd_rn(t[e], magic[e]), magic[e]);
}

}  // namespace phishard::cuda
