#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/rotary_kv_write_cuda.h"

namespace phishard {
namespace {

constexpr int kThreads = 128;

// One block per token. Phase 1: every (Q or K head, j < half) pair rotates x[j], x[j + half]
// (one thread per pair). Phase 2, after a barrier: K (now rotated) and V rows of the token are
// copied to the cache slot.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    RotaryKvWriteKernel(T* __restrict__ qkv, const int32_t* __restrict__ positions,
                        const int64_t* __restrict__ slots, T* __restrict__ k_cache,
                        T* __restrict__ v_cache, int64_t num_slots, int stride, int num_heads,
                        int num_kv_heads, int head_dim, int rotary_dim, float theta) {
  const int t = blockIdx.x;
  T* row = qkv + static_cast<size_t>(t) * stride;
  const int half = rotary_dim / 2;
  if (half > 0) {
    // As the Hugging Face reference: angle = float(pos) * inv_freq in float32, then cos/sin.
    // sincosf (not __sincosf) keeps full accuracy at angles of several thousand radians.
    const float pos = static_cast<float>(positions[t]);
    const int pairs = (num_heads + num_kv_heads) * half;
    for (int i = threadIdx.x; i < pairs; i += kThreads) {
      const int head = i / half;  // Q heads 0..nH-1 then K heads, contiguous in the row
      const int j = i - head * half;
      const float inv_freq =
          1.0f / powf(theta, static_cast<float>(2 * j) / static_cast<float>(rotary_dim));
      float s, c;
      sincosf(pos * inv_freq, &s, &c);
      T* x = row + head * head_dim;
      const float x1 = cuda::ToFloat(x[j]);
      const float x2 = cuda::ToFloat(x[j + half]);
      x[j] = cuda::FromFloat<T>(x1 * c - x2 * s);
      x[j + half] = cuda::FromFloat<T>(x2 * c + x1 * s);
    }
  }
  __syncthreads();  // K rotated by other threads before it is copied
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;
  const int kv_row = num_kv_heads * head_dim;
  const T* k = row + num_heads * head_dim;
  const T* v = k + kv_row;
  T* kd = k_cache + slot * kv_row;
  T* vd = v_cache + slot * kv_row;
  for (int i = threadIdx.x; i < kv_row; i += kThreads) {
    kd[i] = k[i];
    vd[i] = v[i];
  }
}

}  // namespace

KernelStatus RotaryKvWriteCuda(const RotaryKvWriteParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.num_slots < 0 || p.rotary_dim < 0 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0) {
    return KernelStatus::kInvalidShape;
  }
  const int qkv_width = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim;
  const int stride = p.qkv_stride == 0 ? qkv_width : p.qkv_stride;
  if (stride < qkv_width) return KernelStatus::kInvalidShape;
  if (p.num_tokens == 0) return KernelStatus::kOk;
  if (!p.qkv || !p.positions || !p.slots || !p.k_cache || !p.v_cache) {
    return KernelStatus::kNullPointer;
  }
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    RotaryKvWriteKernel<T><<<p.num_tokens, kThreads, 0, stream>>>(
        static_cast<T*>(p.qkv), p.positions, p.slots, static_cast<T*>(p.k_cache),
        static_cast<T*>(p.v_cache), p.num_slots, stride, p.num_heads, p.num_kv_heads, p.head_dim,
        p.rotary_dim, p.theta);
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
