#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "kernels/kv_layout.h"

namespace phishard {
namespace {

constexpr int kThreads = 256;
// From this many tokens on, a block takes a whole token row (bounded by kMaxRowSmem bytes of
// shared memory), ~4 Packs per thread; below it, ~1 Pack per thread and several blocks per token.
// Measured with ncu in the Phi-2 bench (docs/perf-log.md, kern runs 1-2): with 12-head blocks a
// 2048-token prefill took 34.6 us (0.4 of copy bandwidth: each block moves ~3.5 KB per round of
// dependent latencies, position -> cos/sin, load -> barrier -> store), with whole-row blocks
// 25.2 us. Below 512 tokens the small blocks stay, so that a few tokens still spread over the
// SMs (whole-row blocks were not measured there).
constexpr int kRowBlockMinTokens = 512;
constexpr size_t kMaxRowSmem = 32 * 1024;

// N consecutive elements moved as one load/store: 16 bytes on the vector path, one element on the
// scalar fallback (head_dim, qkv_stride or a pointer not aligned to 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Byte offset of the cos/sin table in the kernel's dynamic shared memory (after the heads).
__host__ __device__ inline size_t TrigOffset(size_t elem_bytes, int heads_per_block, int head_dim) {
  return (elem_bytes * heads_per_block * head_dim + 15) / 16 * 16;
}

// KvSlotOffset(slot, 0, ...) for slot in [0, num_slots), the division in 32 bits when the slots
// fit in 32 bits (any real cache): a 64-bit division by a runtime block_size is a long dependent
// chain ahead of the kernel's first cache store.
__device__ __forceinline__ int64_t SlotHead0Offset(int64_t slot, int64_t num_slots, int block_size,
                                                   int num_kv_heads, int head_dim) {
  if (num_slots <= static_cast<int64_t>(UINT32_MAX)) {
    const uint32_t s = static_cast<uint32_t>(slot);
    const uint32_t bs = static_cast<uint32_t>(block_size);
    const uint32_t blk = s / bs;
    return KvOffset(blk, static_cast<int>(s - blk * bs), 0, block_size, num_kv_heads, head_dim);
  }
  return KvSlotOffset(slot, 0, block_size, num_kv_heads, head_dim);
}

// Grid (tokens, head groups), kThreads threads. The row of token t is the concatenation of
// num_heads Q heads, num_kv_heads K heads and num_kv_heads V heads; block (t, g) owns the
// heads_per_block heads [g * heads_per_block, ...) of that list.
//   1. Its threads copy those heads (global -> shared, Packs strided over the threads, the loads
//      of a thread issued together) and the first `half` threads compute cos/sin of
//      (position, j) once for all of the block's heads.
//   2. After a barrier, each thread takes its Packs of N elements at (head, dim d0): the Q/K dims
//      below rotary_dim are rotated from shared memory (partner at j +- half) and stored back to
//      qkv (only those dims: the rest of the row is left as it is); the K (rotated) and V Packs
//      of KV head kvh are stored to the cache at KvSlotOffset(slot, kvh, block_size, ...) + d0
//      (kernels/kv_layout.h: each head's head_dim values of the slot are contiguous, the heads
//      block_size x head_dim apart), unless the slot is outside [0, num_slots) (padding rows:
//      rotated, nothing cached).
// Dynamic shared memory: [heads_per_block * head_dim] T, then (at a 16-byte boundary) cos[half],
// sin[half] float32.
// kFold (RotaryKvWriteParams::fold_delta): step 1 stores qkv + delta (float32 add, one rounding)
// into shared memory, and step 2 writes every Pack of the block's heads back to qkv.
// write_cache = false: step 2 stores nothing to the cache (slots are not read).
// kNorm (RotaryKvWriteParams::q_norm_w): between steps 1 and 2 each warp takes Q / K heads of the
// block and normalises them in shared memory (float32 mean, then centred variance over head_dim,
// rsqrtf as kernels/cuda/layer_norm.cu, one rounding to T); step 2 then writes every Pack of the
// Q and K heads back to qkv.
template <typename T, int N, bool kFold = false, bool kNorm = false>
__global__ void __launch_bounds__(kThreads)
    RotaryKvWriteKernel(T* __restrict__ qkv, const int32_t* __restrict__ positions,
                        const int64_t* __restrict__ slots, T* __restrict__ k_cache,
                        T* __restrict__ v_cache, int64_t num_slots, int block_size, int stride,
                        int num_heads, int num_kv_heads, int head_dim, int rotary_dim, float theta,
                        float rope_factor, int heads_per_block, bool write_cache,
                        const float* __restrict__ delta = nullptr, int ld_delta = 0,
                        const float* __restrict__ q_norm_w = nullptr,
                        const float* __restrict__ q_norm_b = nullptr,
                        const float* __restrict__ k_norm_w = nullptr,
                        const float* __restrict__ k_norm_b = nullptr, float norm_eps = 0.0f) {
  extern __shared__ __align__(16) unsigned char smem[];
  using P = Pack<T, N>;
  const int t = blockIdx.x;
  const int total_heads = num_heads + 2 * num_kv_heads;
  const int head0 = blockIdx.y * heads_per_block;
  const int heads = min(heads_per_block, total_heads - head0);
  const int packs_per_head = head_dim / N;
  const int packs = heads * packs_per_head;
  T* seg = qkv + static_cast<size_t>(t) * stride + static_cast<size_t>(head0) * head_dim;
  P* sh = reinterpret_cast<P*>(smem);
  float* sh_cos = reinterpret_cast<float*>(smem + TrigOffset(sizeof(T), heads_per_block, head_dim));
  const int half = rotary_dim / 2;
  const int64_t slot = write_cache ? slots[t] : -1;  // loaded now: overlaps the loads below
  // Only Q and K heads rotate: skip the trig for a block of V heads.
  const bool rotates = half > 0 && head0 < num_heads + num_kv_heads;
  if (rotates && threadIdx.x < half) {
    // As the Hugging Face reference (cuda::RopeCosSin, shared with the fused decode attention).
    const int j = threadIdx.x;
    float s, c;
    cuda::RopeCosSin(positions[t], j, rotary_dim, theta, &c, &s, rope_factor);
    sh_cos[j] = c;
    sh_cos[half + j] = s;
  }
  if constexpr (kFold) {
    const float* dseg =
        delta + static_cast<size_t>(t) * ld_delta + static_cast<size_t>(head0) * head_dim;
#pragma unroll 4
    for (int i = threadIdx.x; i < packs; i += kThreads) {
      P v = reinterpret_cast<const P*>(seg)[i];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        v.v[e] = cuda::FromFloat<T>(cuda::ToFloat(v.v[e]) + dseg[i * N + e]);
      }
      sh[i] = v;
    }
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < packs; i += kThreads) sh[i] = reinterpret_cast<const P*>(seg)[i];
  }
  const bool cached = slot >= 0 && slot < num_slots;
  // The slot's KV head 0 in the cache; head kvh's row is kvh runs (block_size x head_dim) further
  // (kernels/kv_layout.h). One division a thread, not one a Pack, before the barrier (the loads
  // above are in flight).
  const int64_t slot_off =
      cached ? SlotHead0Offset(slot, num_slots, block_size, num_kv_heads, head_dim) : 0;
  const int64_t head_run = KvHeadRunElems(block_size, head_dim);
  __syncthreads();
  if constexpr (kNorm) {
    T* xs = reinterpret_cast<T*>(smem);
    const int lane = threadIdx.x % 32;
    for (int hl = threadIdx.x / 32; hl < heads; hl += kThreads / 32) {
      const int head = head0 + hl;
      if (head >= num_heads + num_kv_heads) break;  // V heads: the block's heads ascend
      const bool is_q = head < num_heads;
      const float* w = is_q ? q_norm_w : k_norm_w;
      const float* b = is_q ? q_norm_b : k_norm_b;
      T* xh = xs + hl * head_dim;
      float sum = 0.0f;
      for (int d = lane; d < head_dim; d += 32) sum += cuda::ToFloat(xh[d]);
      const float mean = cuda::WarpSum(sum) / head_dim;
      float sq = 0.0f;
      for (int d = lane; d < head_dim; d += 32) {
        const float c = cuda::ToFloat(xh[d]) - mean;
        sq += c * c;
      }
      const float rstd = rsqrtf(cuda::WarpSum(sq) / head_dim + norm_eps);
      for (int d = lane; d < head_dim; d += 32) {
        xh[d] = cuda::FromFloat<T>((cuda::ToFloat(xh[d]) - mean) * rstd * w[d] + b[d]);
      }
    }
    __syncthreads();
  }
  const T* shx = reinterpret_cast<const T*>(smem);
  for (int i = threadIdx.x; i < packs; i += kThreads) {
    const int hl = i / packs_per_head;  // head within the block
    const int d0 = (i - hl * packs_per_head) * N;
    const int head = head0 + hl;
    P out = sh[i];
    if (head < num_heads + num_kv_heads && d0 < rotary_dim) {
      const T* x = shx + hl * head_dim;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const int d = d0 + e;
        if (d < rotary_dim) {
          const int j = d < half ? d : d - half;
          const float c = sh_cos[j];
          const float s = sh_cos[half + j];
          const float x1 = cuda::ToFloat(x[j]);
          const float x2 = cuda::ToFloat(x[j + half]);
          out.v[e] = cuda::RopeRotate<T>(x1, x2, c, s, d < half);
        }
      }
      T* dst = seg + hl * head_dim + d0;
      if (kFold || kNorm || d0 + N <= rotary_dim) {
        *reinterpret_cast<P*>(dst) = out;
      } else {
        for (int e = 0; e < N && d0 + e < rotary_dim; ++e) dst[e] = out.v[e];
      }
    } else if (kFold || (kNorm && head < num_heads + num_kv_heads)) {
      // the folded / normalised Packs that do not rotate
      *reinterpret_cast<P*>(seg + hl * head_dim + d0) = out;
    }
    if (cached && head >= num_heads) {
      const bool is_k = head < num_heads + num_kv_heads;
      const int kv_head = is_k ? head - num_heads : head - num_heads - num_kv_heads;
      T* cache = is_k ? k_cache : v_cache;
      *reinterpret_cast<P*>(cache + slot_off + kv_head * head_run + d0) = out;
    }
  }
}

// Rotation only (RotaryKvWriteParams::write_cache = false), 16-byte packs, half = rotary_dim / 2
// a multiple of N (and <= 128): grid (token groups), kThreads threads. Block b owns the rotation
// pairs of the Q and K heads of tokens [b * tokens_per_block, ...): (num_heads + num_kv_heads) x
// half / N items of two packs a token (dims d0 and d0 + half, d0 < half). Each thread loads its
// items (up to kInPlaceItems a round) before the barrier that publishes the group's cos/sin
// (float32, shared; the loads overlap the trigonometry), rotates them in registers and stores them
// back. Nothing else of the row is touched: Phi-2 moves 8 KB a token (the prefill attention kernel
// stores K/V). tokens_per_block fills a round (Phi-2: 8 tokens, 4 items a thread, 256 blocks for
// 2048 tokens: one wave; one token a block measured 17.1 us there, pre2 run 2).
constexpr int kInPlaceItems = 4;
constexpr int kInPlaceMaxTokens = 8;  // tokens a block at most (the shared cos/sin table)

template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    RotaryInPlaceKernel(T* __restrict__ qkv, const int32_t* __restrict__ positions, int stride,
                        int num_tokens, int tokens_per_block, int num_heads, int num_kv_heads,
                        int head_dim, int rotary_dim, float theta, float rope_factor) {
  __shared__ float sh_trig[kInPlaceMaxTokens][2 * 128];  // per token: cos[half], sin[half]
  using P = Pack<T, N>;
  const int half = rotary_dim / 2;
  const int pairs_per_head = half / N;
  const int per_token = (num_heads + num_kv_heads) * pairs_per_head;
  const int t0 = blockIdx.x * tokens_per_block;
  const int tokens = min(tokens_per_block, num_tokens - t0);
  const int items = tokens * per_token;
  if (threadIdx.x < tokens * half) {
    // Same float32 formula as RotaryKvWriteKernel and the Hugging Face reference.
    const int tl = threadIdx.x / half;
    const int j = threadIdx.x - tl * half;
    float sn, cs;
    cuda::RopeCosSin(positions[t0 + tl], j, rotary_dim, theta, &cs, &sn, rope_factor);
    sh_trig[tl][j] = cs;
    sh_trig[tl][half + j] = sn;
  }
  // Uniform trip count over the block, so the barrier in the first round is reached by all.
  const int rounds = (items + kThreads * kInPlaceItems - 1) / (kThreads * kInPlaceItems);
  for (int r = 0; r < rounds; ++r) {
    P x1[kInPlaceItems], x2[kInPlaceItems];
    T* at[kInPlaceItems];  // the item's first pack; null: no item
    int tl[kInPlaceItems], d0[kInPlaceItems];
#pragma unroll
    for (int k = 0; k < kInPlaceItems; ++k) {
      const int i = (r * kInPlaceItems + k) * kThreads + threadIdx.x;
      at[k] = nullptr;
      tl[k] = d0[k] = 0;
      if (i < items) {
        tl[k] = i / per_token;
        const int w = i - tl[k] * per_token;
        const int head = w / pairs_per_head;
        d0[k] = (w - head * pairs_per_head) * N;
        at[k] = qkv + static_cast<size_t>(t0 + tl[k]) * stride + head * head_dim + d0[k];
        x1[k] = *reinterpret_cast<const P*>(at[k]);
        x2[k] = *reinterpret_cast<const P*>(at[k] + half);
      }
    }
    if (r == 0) __syncthreads();  // cos/sin published
#pragma unroll
    for (int k = 0; k < kInPlaceItems; ++k) {
      if (at[k] == nullptr) continue;
      const float* trig = sh_trig[tl[k]];
      P o1, o2;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float cs = trig[d0[k] + e];
        const float sn = trig[half + d0[k] + e];
        const float a = cuda::ToFloat(x1[k].v[e]);
        const float b = cuda::ToFloat(x2[k].v[e]);
        o1.v[e] = cuda::RopeRotate<T>(a, b, cs, sn, true);
        o2.v[e] = cuda::RopeRotate<T>(a, b, cs, sn, false);
      }
      *reinterpret_cast<P*>(at[k]) = o1;
      *reinterpret_cast<P*>(at[k] + half) = o2;
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int N>
KernelStatus Launch(const RotaryKvWriteParams& p, int stride, cudaStream_t stream) {
  const int half = p.rotary_dim / 2;
  const bool norm = p.q_norm_w != nullptr;
  if (!p.write_cache && half == 0 && p.fold_delta == nullptr && !norm) return KernelStatus::kOk;
  // The rotation-only kernel has no fold and no norm: those launches take the row kernel below.
  if (!p.write_cache && p.fold_delta == nullptr && !norm && N > 1 && half % N == 0 && half <= 128) {
    const int per_token = (p.num_heads + p.num_kv_heads) * (half / N);
    // Tokens filling one round of the block's threads, their trig computable by one pass of them.
    const int tokens_per_block = std::max(
        1, std::min({kInPlaceMaxTokens, kThreads * kInPlaceItems / per_token, kThreads / half}));
    RotaryInPlaceKernel<T, N>
        <<<cuda::CeilDiv(p.num_tokens, tokens_per_block), kThreads, 0, stream>>>(
            static_cast<T*>(p.qkv), p.positions, stride, p.num_tokens, tokens_per_block,
            p.num_heads, p.num_kv_heads, p.head_dim, p.rotary_dim, p.theta, p.rope_factor);
    return cuda::LaunchStatus();
  }
  const int total_heads = p.num_heads + 2 * p.num_kv_heads;
  // Phi-2 bf16 (96 heads of 80 = 10 Packs): decode, 25 heads a block (4 blocks a token); prefill,
  // the whole 15 KB row in one block. (Before: one 128-thread block a token, a serial loop.)
  const int packs_per_head = p.head_dim / N;
  const size_t head_bytes = sizeof(T) * static_cast<size_t>(p.head_dim);
  int heads_per_block = std::max(1, kThreads / packs_per_head);
  if (p.num_tokens >= kRowBlockMinTokens) {
    heads_per_block = std::max<int>(heads_per_block, kMaxRowSmem / head_bytes);
  }
  heads_per_block = std::min(heads_per_block, total_heads);
  const int groups = cuda::CeilDiv(total_heads, heads_per_block);
  const size_t smem = TrigOffset(sizeof(T), heads_per_block, p.head_dim) +
                      sizeof(float) * static_cast<size_t>(p.rotary_dim);
  // head_dim * sizeof(T) is at most a few KiB for any real model; beyond 48 KiB the launch would
  // need an opt-in attribute, so refuse it explicitly.
  if (smem > 48 * 1024) return KernelStatus::kInvalidShape;
  const dim3 grid(p.num_tokens, groups);
  const int ld_fold = p.ld_fold == 0 ? total_heads * p.head_dim : p.ld_fold;
  auto launch = [&](auto fold_tag, auto norm_tag) {
    RotaryKvWriteKernel<T, N, decltype(fold_tag)::value, decltype(norm_tag)::value>
        <<<grid, kThreads, smem, stream>>>(
            static_cast<T*>(p.qkv), p.positions, p.slots, static_cast<T*>(p.k_cache),
            static_cast<T*>(p.v_cache), p.num_slots, p.block_size, stride, p.num_heads,
            p.num_kv_heads, p.head_dim, p.rotary_dim, p.theta, p.rope_factor, heads_per_block,
            p.write_cache, p.fold_delta, ld_fold, p.q_norm_w, p.q_norm_b, p.k_norm_w, p.k_norm_b,
            p.norm_eps);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (p.fold_delta != nullptr) {
    norm ? launch(Yes{}, Yes{}) : launch(Yes{}, No{});
  } else {
    norm ? launch(No{}, Yes{}) : launch(No{}, No{});
  }
  return cuda::LaunchStatus();
}

}  // namespace

KernelStatus RotaryKvWriteCuda(const RotaryKvWriteParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.num_slots < 0 || p.rotary_dim < 0 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0 ||
      !(p.rope_factor > 0.0f)) {
    return KernelStatus::kInvalidShape;
  }
  // As RotaryKvWriteCpu: the cache layout needs the block size (kernels/kv_layout.h).
  if (p.write_cache && (p.block_size <= 0 || p.num_slots % p.block_size != 0)) {
    return KernelStatus::kInvalidShape;
  }
  const int qkv_width = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim;
  const int stride = p.qkv_stride == 0 ? qkv_width : p.qkv_stride;
  if (stride < qkv_width) return KernelStatus::kInvalidShape;
  if (p.fold_delta != nullptr && p.ld_fold != 0 && p.ld_fold < qkv_width) {
    return KernelStatus::kInvalidShape;
  }
  if (p.num_tokens == 0) return KernelStatus::kOk;
  if (!p.qkv || !p.positions || (p.write_cache && (!p.slots || !p.k_cache || !p.v_cache))) {
    return KernelStatus::kNullPointer;
  }
  if (p.q_norm_w != nullptr && (!p.q_norm_b || !p.k_norm_w || !p.k_norm_b)) {
    return KernelStatus::kNullPointer;
  }
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    // Every row start and head start must sit on 16 bytes for the vector path (in the cache a
    // head's row starts at a multiple of head_dim elements, kernels/kv_layout.h).
    const bool vec = p.head_dim % kVec == 0 && stride % kVec == 0 && Aligned16(p.qkv) &&
                     (!p.write_cache || (Aligned16(p.k_cache) && Aligned16(p.v_cache)));
    return vec ? Launch<T, kVec>(p, stride, stream) : Launch<T, 1>(p, stride, stream);
  });
}

}  // namespace phishard
