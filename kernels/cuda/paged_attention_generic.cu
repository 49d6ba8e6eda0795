// The paged attention for head dims the tuned kernels are not built for (any head_dim in
// [1, kPagedAttentionGenericMaxHeadDim] outside cuda::AttentionHeadDims: 8, 24, 48, 112, ...), so
// the CUDA backend serves every HF PhiForCausalLM shape. Correctness, not speed: one warp a
// (query row, query head) walks that row's keys one by one; the lanes split the head's dims
// (lane i holds dims i, i + 32, ...), a key's score is a warp sum, and the softmax is online
// (running max and sum, float32 throughout, expf: the CPU reference's operations up to
// summation order). No alignment or stride requirement beyond the layout itself.
// The same semantics as the tuned kernels (kernels/paged_attention.h, paged_attention_cuda.h,
// paged_decode_cuda.h): a block id outside [0, num_blocks) reads as zero K / V, a fused store of
// the new K / V (PagedAttentionCudaPlan::store_new_k) and a folded rotary
// (PagedDecodeCudaPlan::fold_rotary) run as their own launches first.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_attention_generic_cuda.h"
#include "kernels/kv_layout.h"

namespace phishard {
namespace {

constexpr int kWarps = 4;  // query heads a block
constexpr int kPerLane = kPagedAttentionGenericMaxHeadDim / 32;

// Sequence of query row t and the row's index in it (cu_q_lens null: row t = sequence t).
__device__ __forceinline__ void RowSequence(const int32_t* cu_q_lens, int num_seqs, int t, int* s,
                                            int* j, int* q_len) {
  if (cu_q_lens == nullptr) {
    *s = t, *j = 0, *q_len = 1;
    return;
  }
  int lo = 0, hi = num_seqs - 1;  // the last s with cu_q_lens[s] <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_q_lens[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  *s = lo, *j = t - cu_q_lens[lo], *q_len = cu_q_lens[lo + 1] - cu_q_lens[lo];
}

// Grid (num_tokens, ceil(num_heads / kWarps)), kWarps warps. A row without keys (a padding row,
// an inconsistent context) gets zeros.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    GenericAttentionKernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                           const T* __restrict__ v_cache, T* __restrict__ out,
                           const int32_t* __restrict__ cu_q_lens,
                           const int32_t* __restrict__ context_lens,
                           const int32_t* __restrict__ block_tables,
                           const int32_t* __restrict__ step_info, int num_seqs,
                           int max_blocks_per_seq, int num_blocks, int block_size, int num_heads,
                           int num_kv_heads, int head_dim, int q_stride, float scale) {
  const int t = blockIdx.x;
  const int h = blockIdx.y * kWarps + threadIdx.x / 32;
  if (h >= num_heads) return;
  const int lane = threadIdx.x % 32;
  int s, j, q_len;
  RowSequence(cu_q_lens, num_seqs, t, &s, &j, &q_len);
  // step_info (decode graphs): [0] live rows (the others are padding: no keys), [1] the pitch.
  const bool live = step_info == nullptr || t < step_info[0];
  if (step_info != nullptr) max_blocks_per_seq = step_info[1];
  const int pos = live ? context_lens[s] - q_len + j : -1;  // attends keys [0, pos]
  const int kvh = h / (num_heads / num_kv_heads);
  const T* qh = q + static_cast<int64_t>(t) * q_stride + static_cast<int64_t>(h) * head_dim;
  float qv[kPerLane], acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    qv[e] = d < head_dim ? cuda::ToFloat(qh[d]) : 0.0f;
    acc[e] = 0.0f;
  }
  const int32_t* table = block_tables + static_cast<int64_t>(s) * max_blocks_per_seq;
  float m = -INFINITY, l = 0.0f;
  for (int c = 0; c <= pos; ++c) {
    const int bi = c / block_size;
    const int blk = bi < max_blocks_per_seq ? table[bi] : -1;
    const bool valid = blk >= 0 && blk < num_blocks;
    const int64_t off =
        valid ? KvOffset(blk, c - bi * block_size, kvh, block_size, num_kv_heads, head_dim) : 0;
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int d = lane + 32 * e;
      if (valid && d < head_dim) dot += qv[e] * cuda::ToFloat(k_cache[off + d]);
    }
    const float score = cuda::WarpSum(dot) * scale;
    const float m_new = fmaxf(m, score);
    const float alpha = expf(m - m_new);  // 0 for the first key (m = -inf)
    const float p = expf(score - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int d = lane + 32 * e;
      const float v = valid && d < head_dim ? cuda::ToFloat(v_cache[off + d]) : 0.0f;
      acc[e] = acc[e] * alpha + p * v;
    }
    m = m_new;
  }
  T* oh = out + static_cast<int64_t>(t) * num_heads * head_dim + static_cast<int64_t>(h) * head_dim;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no key (an inconsistent context): zeros
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < head_dim) oh[d] = cuda::FromFloat<T>(acc[e] * inv);
  }
}

// The new tokens' K / V from their fused q | k | v rows into the caches (PagedAttentionCudaPlan::
// store_new_k): row t is position context_len - q_len + j of its sequence. Grid (num_tokens,
// 2 num_kv_heads), 32 threads; ids outside [0, num_blocks) are skipped.
template <typename T>
__global__ void __launch_bounds__(32)
    GenericStoreNewKvKernel(const T* __restrict__ qkv, T* __restrict__ k_cache,
                            T* __restrict__ v_cache, const int32_t* __restrict__ cu_q_lens,
                            const int32_t* __restrict__ context_lens,
                            const int32_t* __restrict__ block_tables, int num_seqs,
                            int max_blocks_per_seq, int num_blocks, int block_size, int num_heads,
                            int num_kv_heads, int head_dim, int q_stride) {
  const int t = blockIdx.x;
  const bool is_v = blockIdx.y >= num_kv_heads;
  const int kvh = is_v ? blockIdx.y - num_kv_heads : blockIdx.y;
  int s, j, q_len;
  RowSequence(cu_q_lens, num_seqs, t, &s, &j, &q_len);
  const int pos = context_lens[s] - q_len + j;
  const int bi = pos / block_size;
  if (pos < 0 || bi >= max_blocks_per_seq) return;
  const int blk = block_tables[static_cast<int64_t>(s) * max_blocks_per_seq + bi];
  if (blk < 0 || blk >= num_blocks) return;
  const T* src = qkv + static_cast<int64_t>(t) * q_stride +
                 static_cast<int64_t>(num_heads + blockIdx.y) * head_dim;
  T* dst = (is_v ? v_cache : k_cache) +
           KvOffset(blk, pos - bi * block_size, kvh, block_size, num_kv_heads, head_dim);
  for (int d = threadIdx.x; d < head_dim; d += 32) dst[d] = src[d];
}

}  // namespace

KernelStatus PagedAttentionGenericCuda(const PagedAttentionParams& p, void* store_new_k,
                                       void* store_new_v, const int32_t* step_info,
                                       cudaStream_t stream) {
  if (p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (p.num_seqs < 0 || p.num_tokens < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 ||
      p.block_size <= 0 || p.num_blocks < 0 || p.max_blocks_per_seq < 0 ||
      p.num_heads % p.num_kv_heads != 0 || p.head_dim < 1 ||
      p.head_dim > kPagedAttentionGenericMaxHeadDim) {
    return KernelStatus::kInvalidShape;
  }
  const bool store = store_new_k != nullptr || store_new_v != nullptr;
  if (store && step_info != nullptr) return KernelStatus::kInvalidShape;  // a decode-only field
  const int q_width = (store ? p.num_heads + 2 * p.num_kv_heads : p.num_heads) * p.head_dim;
  const int q_stride = p.q_stride == 0 ? p.num_heads * p.head_dim : p.q_stride;
  if (q_stride < q_width || (store && (store_new_k != p.k_cache || store_new_v != p.v_cache))) {
    return KernelStatus::kInvalidShape;
  }
  if (p.num_seqs == 0) return p.num_tokens == 0 ? KernelStatus::kOk : KernelStatus::kInvalidShape;
  if (p.num_seqs > 65535 || (p.cu_q_lens == nullptr && p.num_tokens != p.num_seqs)) {
    return KernelStatus::kInvalidShape;
  }
  if (p.num_tokens == 0) return KernelStatus::kOk;
  if (!p.q || !p.k_cache || !p.v_cache || !p.out || !p.context_lens || !p.block_tables) {
    return KernelStatus::kNullPointer;
  }
  return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (store) {
      GenericStoreNewKvKernel<T><<<dim3(p.num_tokens, 2 * p.num_kv_heads), 32, 0, stream>>>(
          static_cast<const T*>(p.q), static_cast<T*>(store_new_k), static_cast<T*>(store_new_v),
          p.cu_q_lens, p.context_lens, p.block_tables, p.num_seqs, p.max_blocks_per_seq,
          p.num_blocks, p.block_size, p.num_heads, p.num_kv_heads, p.head_dim, q_stride);
      if (KernelStatus st = cuda::LaunchStatus(); st != KernelStatus::kOk) return st;
    }
    const dim3 grid(p.num_tokens, cuda::CeilDiv(p.num_heads, kWarps));
    GenericAttentionKernel<T><<<grid, kWarps * 32, 0, stream>>>(
        static_cast<const T*>(p.q), static_cast<const T*>(p.k_cache),
        static_cast<const T*>(p.v_cache), static_cast<T*>(p.out), p.cu_q_lens, p.context_lens,
        p.block_tables, step_info, p.num_seqs, p.max_blocks_per_seq, p.num_blocks, p.block_size,
        p.num_heads, p.num_kv_heads, p.head_dim, q_stride, p.scale);
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
