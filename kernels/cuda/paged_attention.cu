#include <algorithm>
#include <type_traits>

#include "kernels/cuda/attention_dispatch.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_attention_cuda.h"
#include "kernels/cuda/paged_attention_generic_cuda.h"
#include "kernels/cuda/paged_attention_prefill.cuh"
#include "kernels/kv_layout.h"

namespace phishard {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxSplits = 16;

// Reads 8 consecutive elements (16 bytes), dims [col, col + 8), of key `key`'s K and V for KV
// head kvh (cache layout [num_blocks, num_kv_heads, block_size, head_dim], kernels/kv_layout.h),
// or zeros when the key is past the end or its block id is out of range.
template <typename T>
__device__ __forceinline__ void LoadKv16(const T* __restrict__ k_cache,
                                         const T* __restrict__ v_cache,
                                         const int32_t* __restrict__ table, int key, int n_keys,
                                         int num_blocks, int block_size, int num_kv_heads, int kvh,
                                         int head_dim, int col, uint4* kv, uint4* vv) {
  *kv = make_uint4(0, 0, 0, 0);
  *vv = make_uint4(0, 0, 0, 0);
  if (key >= n_keys) return;
  const int blk = table[key / block_size];
  if (blk < 0 || blk >= num_blocks) return;
  const int64_t off =
      KvOffset(blk, key % block_size, kvh, block_size, num_kv_heads, head_dim) + col;
  *kv = *reinterpret_cast<const uint4*>(k_cache + off);
  *vv = *reinterpret_cast<const uint4*>(v_cache + off);
}

// ------------------------------------------------------------------------------------------------
// Decode: one block of 4 warps per (split, sequence, KV head), serving the G = nH / nKV query
// heads of that KV head. The split's keys are walked in 64-key tiles staged in shared memory;
// thread roles per tile: scores (one (head, key) pair per thread), softmax (one warp per head),
// weighted sum (one (head, dim) accumulator per thread, kept in shared memory).
constexpr int kDecodeThreads = 128;
constexpr int kDecodeTile = 64;

template <int HD>
struct DecodeSmem {
  // K rows are padded to an odd number of 32-bit words so a warp reading 32 different keys at
  // the same dim hits 32 different banks.
  static constexpr int kKWords = HD / 2 + 1;
  static size_t Bytes(int group) {
    return size_t{kDecodeTile} * HD * 2                    // V tile (16-byte aligned, first)
           + size_t{kDecodeTile} * kKWords * 4             // K tile
           + (size_t{2} * static_cast<size_t>(group) * HD  // q (pre-scaled), accumulators
              + static_cast<size_t>(group) * kDecodeTile   // scores / probabilities
              + size_t{3} * static_cast<size_t>(group)) *
                 4;  // m, l, alpha
  }
};

template <typename T, int HD>
__global__ void __launch_bounds__(kDecodeThreads)
    DecodeAttentionKernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                          const T* __restrict__ v_cache, T* __restrict__ out,
                          float* __restrict__ partial_o, float* __restrict__ partial_ml,
                          const int32_t* __restrict__ cu_q_lens,
                          const int32_t* __restrict__ context_lens,
                          const int32_t* __restrict__ block_tables, int max_blocks_per_seq,
                          int num_blocks, int block_size, int num_heads, int num_kv_heads,
                          int q_stride, float scale_log2, int split_len, int num_splits) {
  using L = DecodeSmem<HD>;
  constexpr int kChunks = HD / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const int group = num_heads / num_kv_heads;
  T* sV = reinterpret_cast<T*>(smem);
  uint32_t* sK = reinterpret_cast<uint32_t*>(smem + size_t{kDecodeTile} * HD * 2);
  float* sQ = reinterpret_cast<float*>(sK + kDecodeTile * L::kKWords);
  float* sAcc = sQ + group * HD;
  float* sS = sAcc + group * HD;
  float* sM = sS + group * kDecodeTile;
  float* sL = sM + group;
  float* sAlpha = sL + group;

  const int sp = blockIdx.x;
  const int s = blockIdx.y;
  const int kvh = blockIdx.z;
  const int t = cu_q_lens[s];
  const int ctx = context_lens[s];
  const int k_begin = sp * split_len;
  if (k_begin >= ctx) return;  // this sequence needs fewer splits; the merge skips this one
  const int k_end = min(ctx, k_begin + split_len);
  const int32_t* table = block_tables + static_cast<size_t>(s) * max_blocks_per_seq;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;

  for (int i = tid; i < group * HD; i += kDecodeThreads) {
    const int g = i / HD;
    const int d = i - g * HD;
    sQ[i] = cuda::ToFloat(q[static_cast<size_t>(t) * q_stride + (kvh * group + g) * HD + d]) *
            scale_log2;
    sAcc[i] = 0.0f;
  }
  for (int g = tid; g < group; g += kDecodeThreads) {
    sM[g] = -INFINITY;
    sL[g] = 0.0f;
  }

  for (int k0 = k_begin; k0 < k_end; k0 += kDecodeTile) {
    const int n = min(kDecodeTile, k_end - k0);
    __syncthreads();  // previous tile fully consumed (and q / state initialised)
    // Item i = (key r, chunk c), row-major: within one block the keys of head kvh are one
    // contiguous run (kv_layout.h), so a warp's 32 loads cover 512 consecutive bytes of it.
    for (int i = tid; i < kDecodeTile * kChunks; i += kDecodeThreads) {
      const int r = i / kChunks;
      const int c = i - r * kChunks;
      uint4 kv, vv;
      LoadKv16(k_cache, v_cache, table, k0 + r, k_end, num_blocks, block_size, num_kv_heads, kvh,
               HD, c * 8, &kv, &vv);
      uint32_t* kd = sK + r * L::kKWords + c * 4;
      kd[0] = kv.x;
      kd[1] = kv.y;
      kd[2] = kv.z;
      kd[3] = kv.w;
      *reinterpret_cast<uint4*>(sV + r * HD + c * 8) = vv;
    }
    __syncthreads();
    for (int e = tid; e < group * kDecodeTile; e += kDecodeThreads) {
      const int g = e / kDecodeTile;
      const int r = e - g * kDecodeTile;
      float dot = -INFINITY;
      if (r < n) {
        const uint32_t* kr = sK + r * L::kKWords;
        const float* qg = sQ + g * HD;
        dot = 0.0f;
#pragma unroll
        for (int i = 0; i < HD / 2; ++i) {
          const float2 kf = cuda::Word2ToFloat2<T>(kr[i]);
          dot = fmaf(qg[2 * i], kf.x, dot);
          dot = fmaf(qg[2 * i + 1], kf.y, dot);
        }
      }
      sS[e] = dot;
    }
    __syncthreads();
    for (int g = warp; g < group; g += kDecodeThreads / 32) {
      float* sg = sS + g * kDecodeTile;
      const float s0 = sg[lane];
      const float s1 = sg[lane + 32];
      const float m_old = sM[g];
      const float m_new = fmaxf(m_old, cuda::WarpMax(fmaxf(s0, s1)));  // finite: key k0 exists
      const float p0 = exp2f(s0 - m_new);
      const float p1 = exp2f(s1 - m_new);
      sg[lane] = p0;
      sg[lane + 32] = p1;
      const float sum = cuda::WarpSum(p0 + p1);
      __syncwarp();  // every lane has read sM[g] (racecheck flagged the read/write pair)
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);
        sAlpha[g] = alpha;
        sL[g] = sL[g] * alpha + sum;
        sM[g] = m_new;
      }
    }
    __syncthreads();
    for (int e = tid; e < group * HD; e += kDecodeThreads) {
      const int g = e / HD;
      const int d = e - g * HD;
      const float* pg = sS + g * kDecodeTile;
      float a = sAcc[e] * sAlpha[g];
      for (int r = 0; r < n; ++r) a = fmaf(pg[r], cuda::ToFloat(sV[r * HD + d]), a);
      sAcc[e] = a;
    }
  }
  __syncthreads();

  for (int e = tid; e < group * HD; e += kDecodeThreads) {
    const int g = e / HD;
    const int d = e - g * HD;
    const int h = kvh * group + g;
    const float o = sAcc[e] / sL[g];
    if (num_splits == 1) {
      out[static_cast<size_t>(t) * num_heads * HD + h * HD + d] = cuda::FromFloat<T>(o);
    } else {
      const size_t idx = (static_cast<size_t>(t) * num_heads + h) * num_splits + sp;
      partial_o[idx * HD + d] = o;
      if (d == 0) {
        partial_ml[idx * 2] = sM[g];
        partial_ml[idx * 2 + 1] = sL[g];
      }
    }
  }
}

// Merges the splits of one (sequence, head): out = sum_i w_i o_i / sum_i w_i with
// w_i = l_i 2^(m_i - max m) (o_i already normalised by l_i).
template <typename T>
__global__ void DecodeMergeKernel(const float* __restrict__ partial_o,
                                  const float* __restrict__ partial_ml, T* __restrict__ out,
                                  const int32_t* __restrict__ cu_q_lens,
                                  const int32_t* __restrict__ context_lens, int num_heads,
                                  int head_dim, int split_len, int num_splits) {
  const int s = blockIdx.x;
  const int h = blockIdx.y;
  const int t = cu_q_lens[s];
  const int n = min(num_splits, (context_lens[s] + split_len - 1) / split_len);
  const size_t base = (static_cast<size_t>(t) * num_heads + h) * num_splits;
  float m = -INFINITY;
  for (int i = 0; i < n; ++i) m = fmaxf(m, partial_ml[(base + i) * 2]);
  float wsum = 0.0f;
  for (int i = 0; i < n; ++i) {
    wsum += partial_ml[(base + i) * 2 + 1] * exp2f(partial_ml[(base + i) * 2] - m);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float w = partial_ml[(base + i) * 2 + 1] * exp2f(partial_ml[(base + i) * 2] - m);
      acc = fmaf(w, partial_o[(base + i) * head_dim + d], acc);
    }
    out[static_cast<size_t>(t) * num_heads * head_dim + h * head_dim + d] =
        cuda::FromFloat<T>(acc / wsum);
  }
}

int DecodeSplits(const PagedAttentionParams& p, const PagedAttentionCudaPlan& plan) {
  int splits = 1;
  if (plan.force_splits > 0) {
    splits = plan.force_splits;
  } else {
    const int blocks = p.num_seqs * p.num_kv_heads;
    // ~4 blocks per SM: a split walks its keys serially (load, scores, softmax, sum per 64-key
    // tile), so more, shorter splits hide more latency; the merge costs one small launch.
    const int target = 4 * std::max(plan.num_multiprocessors, 1);
    if (blocks < target) splits = std::min(kMaxSplits, cuda::CeilDiv(target, blocks));
  }
  splits = std::min(splits, cuda::CeilDiv(plan.max_context_len, kDecodeTile));
  if (splits > 1) {
    const size_t per_split =
        static_cast<size_t>(p.num_tokens) * p.num_heads * (p.head_dim + 2) * sizeof(float);
    const size_t fit = plan.workspace ? plan.workspace_bytes / per_split : 0;
    splits = static_cast<int>(std::min<size_t>(splits, fit));
  }
  return std::max(splits, 1);
}

}  // namespace

bool PagedAttentionCudaSupportsHeadDim(int head_dim) {
  return cuda::AttentionHeadDims::Contains(head_dim);
}

size_t PagedAttentionCudaWorkspaceBytes(int num_tokens, int num_heads, int head_dim,
                                        int max_splits) {
  return static_cast<size_t>(num_tokens) * num_heads * max_splits * (head_dim + 2) * sizeof(float);
}

KernelStatus PagedAttentionCuda(const PagedAttentionParams& p, const PagedAttentionCudaPlan& plan,
                                cudaStream_t stream, int* splits_used) {
  if (splits_used) *splits_used = 0;
  if (p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (!PagedAttentionCudaSupportsHeadDim(p.head_dim)) {  // a head dim of no tuned kernel
    // The plan's rules still hold: no fused store on a decode launch, no wgmma tiling.
    const bool decode = plan.kernel == AttentionKernel::kDecode ||
                        (plan.kernel == AttentionKernel::kAuto && plan.max_q_len == 1);
    const bool wgmma = plan.prefill_tiling == PrefillTiling::kWgmma ||
                       plan.prefill_tiling == PrefillTiling::kWgmmaWs;
    if ((decode && (plan.store_new_k != nullptr || plan.store_new_v != nullptr)) ||
        (!decode && wgmma)) {
      return KernelStatus::kInvalidShape;
    }
    if (splits_used) *splits_used = 1;
    return PagedAttentionGenericCuda(p, plan.store_new_k, plan.store_new_v, nullptr, stream);
  }
  if (p.num_seqs < 0 || p.num_tokens < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 ||
      p.block_size <= 0 || p.num_blocks < 0 || p.max_blocks_per_seq < 0 ||
      p.num_heads % p.num_kv_heads != 0 || !PagedAttentionCudaSupportsHeadDim(p.head_dim)) {
    return KernelStatus::kInvalidShape;
  }
  const int q_stride = p.q_stride == 0 ? p.num_heads * p.head_dim : p.q_stride;
  if (q_stride < p.num_heads * p.head_dim || q_stride % 8 != 0) return KernelStatus::kInvalidShape;
  if (p.num_seqs == 0) return p.num_tokens == 0 ? KernelStatus::kOk : KernelStatus::kInvalidShape;
  if (p.num_seqs > 65535) return KernelStatus::kInvalidShape;  // a grid dimension of both kernels
  if (!p.q || !p.k_cache || !p.v_cache || !p.out || !p.cu_q_lens || !p.context_lens ||
      !p.block_tables) {
    return KernelStatus::kNullPointer;
  }
  if (reinterpret_cast<uintptr_t>(p.q) % 16 || reinterpret_cast<uintptr_t>(p.k_cache) % 16 ||
      reinterpret_cast<uintptr_t>(p.v_cache) % 16) {
    return KernelStatus::kInvalidShape;
  }
  if (plan.max_q_len < 1 || plan.max_q_len > p.num_tokens || plan.max_context_len < 1) {
    return KernelStatus::kInvalidShape;
  }
  const bool decode = plan.kernel == AttentionKernel::kDecode ||
                      (plan.kernel == AttentionKernel::kAuto && plan.max_q_len == 1);
  if (decode &&
      (plan.max_q_len != 1 || plan.store_new_k != nullptr || plan.store_new_v != nullptr)) {
    return KernelStatus::kInvalidShape;
  }
  const float scale_log2 = p.scale * kLog2e;

  if (!decode) return LaunchPagedAttentionPrefill(p, plan, q_stride, stream);

  return cuda::DispatchAttentionHeadDim(p.head_dim, [&](auto hd_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const T* q = static_cast<const T*>(p.q);
      const T* kc = static_cast<const T*>(p.k_cache);
      const T* vc = static_cast<const T*>(p.v_cache);
      T* out = static_cast<T*>(p.out);
      int splits = DecodeSplits(p, plan);
      const int split_len =
          cuda::CeilDiv(cuda::CeilDiv(plan.max_context_len, splits), kDecodeTile) * kDecodeTile;
      splits = cuda::CeilDiv(plan.max_context_len, split_len);
      if (splits_used) *splits_used = splits;
      const int group = p.num_heads / p.num_kv_heads;
      const size_t smem = DecodeSmem<HD>::Bytes(group);
      auto kernel = DecodeAttentionKernel<T, HD>;
      if (smem > 48 * 1024 &&
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)) != cudaSuccess) {
        return KernelStatus::kDeviceError;
      }
      float* partial_o = static_cast<float*>(plan.workspace);
      float* partial_ml =
          splits > 1 ? partial_o + static_cast<size_t>(p.num_tokens) * p.num_heads * splits * HD
                     : nullptr;
      const dim3 grid(splits, p.num_seqs, p.num_kv_heads);
      kernel<<<grid, kDecodeThreads, smem, stream>>>(
          q, kc, vc, out, partial_o, partial_ml, p.cu_q_lens, p.context_lens, p.block_tables,
          p.max_blocks_per_seq, p.num_blocks, p.block_size, p.num_heads, p.num_kv_heads, q_stride,
          scale_log2, split_len, splits);
      if (KernelStatus st = cuda::LaunchStatus(); st != KernelStatus::kOk || splits == 1) {
        return st;
      }
      DecodeMergeKernel<T><<<dim3(p.num_seqs, p.num_heads), 128, 0, stream>>>(
          partial_o, partial_ml, out, p.cu_q_lens, p.context_lens, p.num_heads, HD, split_len,
          splits);
      return cuda::LaunchStatus();
    });
  });
}

}  // namespace phishard
