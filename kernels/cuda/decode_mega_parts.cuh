// Internal to kernels/cuda/decode_mega.cu (the persistent 1-row decode kernel): its constants,
// launch arguments, block plan, grid barrier, shared-memory layout and the stage loop's dot
// products. Included by decode_mega.cu and decode_mega_attention.cuh only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/decode_mega_cuda.h"
#include "kernels/cuda/gemv_common.cuh"
#include "kernels/cuda/sm90_ptx.cuh"
#include "kernels/cuda/spin_wait.cuh"  // cuda::GlobalTimerNs
#include "kernels/kv_layout.h"

namespace phishard {
namespace decode_mega {

using cuda::Activate;
using cuda::Dot8;
using sm90::BulkLoad;
using sm90::BulkPrefetchL2;
using sm90::MbarArrive;
using sm90::MbarExpect;
using sm90::MbarInit;
using sm90::MbarWait;

constexpr int kConsumerWarps = 8;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // + the producer warp
constexpr int kMaxRows = 8;                // weight rows a ring stage holds (at most)
constexpr int kMaxStages = 16;
constexpr int kStageTarget = 40960;  // smallest stage in bytes, unless one row is longer
// Element pairs of x a consumer thread holds (XRegs): K <= 2 kConsumers kMaxPairs.
constexpr int kMaxPairs = 20;
constexpr int kItemChunk = kConsumers;  // cache positions an attention item scores at a time
// sync words: [0] arrivals, [kGenWord] barrier generation, [kHeadWord + h] head h's finished splits
constexpr int kGenWord = 32;
constexpr int kHeadWord = 64;
constexpr int kDefaultPrefetchKb = 0;  // DecodeMegaParams::prefetch_kb = 0
// DecodeMegaParams::form < 0: form 75 (perf-log, mega5 run 1, H200 b1 ms at ctx 128 / 1024 /
// 4096, two rounds: 1.883 / 2.045 / 2.733 against form 11's 1.978 / 2.131 / 2.940).
constexpr int kDefaultForm = 75;
// Ring stages when DecodeMegaParams::stages = 0 (fewer where they do not fit). perf-log, mega4 run
// 2 (H200, form 11, b1 ms at ctx 128 / 1024 / 4096, two rounds): 3 stages 1.975 / 2.136 / 2.941
// against 2.019 / 2.173 / 3.205 with the 5 that fit Phi-2's 40 KB stages.
constexpr int kDefaultStages = 3;

struct Args {
  DecodeMegaParams p;
  int stages, stage_bytes, nsplit;
  int pf_stages;  // L2 prefetch lookahead in stages past the ring's next one (0: none)
  int form;       // kDecodeMegaForm* bits
  // Shared memory offsets (bytes): ring at 0, then these.
  int off_x, off_head, off_out, off_part, off_q, off_o, off_scores, off_red2, off_scratch,
      off_blocks, off_bars, off_rowoff;
};

// Which rows of each matrix block b of `blocks` owns: q/k/v heads [qkv0 / hd, qkv1 / hd) as qkv
// rows, fc1 rows [fc1_0, fc1_1) (together about ((nH + 2 nKV) hd + I) / blocks rows), output
// rows [out0, out1) of fc2 and dense.
struct BlockPlan {
  int qkv0, qkv1, fc1_0, fc1_1, out0, out1;
};

// fc1 end candidate of block j: its share of all phase-A rows less the qkv rows of blocks <= j,
// in [0, I]. A block's fc1 end is the maximum over j <= b (non-decreasing even when a block holds
// more qkv rows than its share).
__host__ __device__ inline int Fc1EndCandidate(const DecodeMegaParams& p, int j, int blocks) {
  const int64_t heads = p.num_heads + 2 * p.num_kv_heads;
  const int64_t total = heads * p.head_dim + p.intermediate;
  const int64_t v = total * (j + 1) / blocks - p.head_dim * (heads * (j + 1) / blocks);
  return static_cast<int>(v < 0 ? 0 : (v > p.intermediate ? p.intermediate : v));
}

// All threads of the block; ends with __syncthreads. `ends` is 2 ints of shared memory.
__device__ BlockPlan MakePlan(const DecodeMegaParams& p, int* ends) {
  const int b = blockIdx.x, blocks = gridDim.x, hd = p.head_dim;
  const int64_t heads = p.num_heads + 2 * p.num_kv_heads;
  if (threadIdx.x < 2) ends[threadIdx.x] = 0;
  __syncthreads();
  int prev = 0, cur = 0;  // max over j < b, j <= b
  for (int j = threadIdx.x; j <= b; j += blockDim.x) {
    const int v = Fc1EndCandidate(p, j, blocks);
    if (j < b) prev = max(prev, v);
    cur = max(cur, v);
  }
  atomicMax(&ends[0], prev);
  atomicMax(&ends[1], cur);
  __syncthreads();
  BlockPlan bp;
  bp.qkv0 = hd * static_cast<int>(heads * b / blocks);
  bp.qkv1 = hd * static_cast<int>(heads * (b + 1) / blocks);
  bp.fc1_0 = b == 0 ? 0 : ends[0];
  bp.fc1_1 = b == blocks - 1 ? p.intermediate : ends[1];
  bp.out0 = static_cast<int>(static_cast<int64_t>(p.hidden) * b / blocks);
  bp.out1 = static_cast<int>(static_cast<int64_t>(p.hidden) * (b + 1) / blocks);
  return bp;
}

// A power of two (so that kConsumerWarps / rows warps share each row of a full tile).
__host__ __device__ inline int RowsPerStage(int stage_bytes, int row_bytes) {
  int r = 1;
  while (2 * r <= kMaxRows && 2 * r * row_bytes <= stage_bytes) r *= 2;
  return r;
}

// Rows of the tile starting at row r of [r, r1); with split > 0 a tile never crosses a multiple
// of split (q/k/v tiles stay inside one head).
__device__ __forceinline__ int TileRows(int r, int r1, int rps, int split) {
  int n = r1 - r < rps ? r1 - r : rps;
  if (split > 0 && split - r % split < n) n = split - r % split;
  return n;
}

// The timeline row of this block's layer l (consumer thread 0 / the producer thread only), or
// null: timeline off, block or layer past its extent.
__device__ __forceinline__ uint64_t* TimelineRow(const DecodeMegaParams& p, int l) {
  if (p.timeline == nullptr || blockIdx.x >= p.timeline_blocks || l >= p.timeline_layers) {
    return nullptr;
  }
  return p.timeline +
         (static_cast<size_t>(blockIdx.x) * (p.timeline_layers + 1) + l) * kDecodeMegaEvents;
}
__device__ __forceinline__ void Stamp(uint64_t* row, int e) {
  if (row != nullptr) row[e] = clock64();
}

// The consumer warps' own barrier (the producer warp never joins it).
__device__ __forceinline__ void ConsumerSync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
}

// Sum / max over the consumer threads, the same value in all of them. scratch: 8 floats.
__device__ __forceinline__ float ConsumerSum(float v, float* scratch) {
  v = cuda::WarpSum(v);
  ConsumerSync();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  ConsumerSync();
  float s = 0.0f;
#pragma unroll
  for (int w = 0; w < kConsumerWarps; ++w) s += scratch[w];
  return s;
}
__device__ __forceinline__ float ConsumerMax(float v, float* scratch) {
  v = cuda::WarpMax(v);
  ConsumerSync();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  ConsumerSync();
  float m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kConsumerWarps; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// Data written during the launch by other blocks is read through L2 only (ld.global.cg).
template <typename T>
__device__ __forceinline__ float LoadCg(const T* p) {
  const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
  T v;
  memcpy(&v, &bits, 2);
  return cuda::ToFloat(v);
}

__device__ __forceinline__ uint32_t LoadAcquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Every consumer of every block arrives; the last one releases the generation. Writes before it
// are visible to reads (ld.cg) after it in every block. kDecodeMegaFormBarrier: fewer memory round
// trips in thread 0 - the generation read before the CTA barrier (it cannot move before this
// block arrives), one acq_rel atomic for fence + arrival, the reset ordered by the release of the
// new generation, no fence after the acquire.
__device__ __forceinline__ void GridSync(uint32_t* sync, int form) {
  if ((form & kDecodeMegaFormBarrier) != 0) {
    uint32_t gen = 0;
    if (threadIdx.x == 0) {
      asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];"
                   : "=r"(gen)
                   : "l"(sync + kGenWord)
                   : "memory");
    }
    ConsumerSync();
    if (threadIdx.x == 0) {
      uint32_t old;
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                   : "=r"(old)
                   : "l"(sync)
                   : "memory");
      if (old == gridDim.x - 1) {
        asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(sync) : "memory");
        asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(sync + kGenWord), "r"(gen + 1)
                     : "memory");
      } else {
        while (LoadAcquire(sync + kGenWord) == gen) {
        }
      }
    }
    ConsumerSync();
    return;
  }
  ConsumerSync();
  if (threadIdx.x == 0) {
    __threadfence();
    const uint32_t gen = LoadAcquire(sync + kGenWord);
    if (atomicAdd(sync, 1u) == gridDim.x - 1) {
      atomicExch(sync, 0u);
      __threadfence();
      asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(sync + kGenWord), "r"(gen + 1)
                   : "memory");
    } else {
      while (LoadAcquire(sync + kGenWord) == gen) {
      }
    }
    __threadfence();
  }
  ConsumerSync();
}

struct Smem {
  unsigned char* ring;
  void* x;          // [H] dtype: the LayerNorm output (phase A's input vector)
  float* head;      // [hd] the q/k/v head being produced, rounded to dtype
  float* out;       // [out rows] fc2 sums of the block's output rows
  float* part;      // [most rows of a head / segment][kConsumerWarps] per-warp row partials
  float* q;         // [hd] the attention item's query (scaled)
  float* o;         // [hd] its running output
  float* scores;    // [kItemChunk]
  float* red2;      // [kConsumers * 8] per-group output sums of an attention chunk
  float* scratch;   // [32] reductions, [16] flag, [24, 26) plan
  int* blocks;      // [kItemChunk + 1] block ids of an attention chunk
  int64_t* rowoff;  // [kItemChunk] kDecodeMegaFormLeanAttn: a chunk's keys' KvOffset (-1: none)
  uint64_t* full;   // [kMaxStages] stage loaded
  uint64_t* empty;  // [kMaxStages] stage consumed (kConsumerWarps arrivals)
};

// Row i's sum over the consumer warps' partials (fixed warp order: the same bits every launch).
__device__ __forceinline__ float RowSum(const Smem& sm, int i) {
  const float4* q = reinterpret_cast<const float4*>(sm.part + i * kConsumerWarps);
  const float4 u = q[0], v = q[1];
  return ((u.x + u.y) + (u.z + u.w)) + ((v.x + v.y) + (v.z + v.w));
}

enum : int { kEpiQkv = 0, kEpiFc1 = 1, kEpiFc2 = 2, kEpiDense = 3 };

struct LayerPtrs {
  DecodeMegaLayer w;
  char* k_cache;  // [num_blocks, nKV, block_size, hd] dtype, device (kernels/kv_layout.h)
  char* v_cache;  // the same
};

// q/k/v head hh is complete: sm.part holds its rows' per-warp partials; `bias` is this thread's
// bias of the head (t < hd). dtype(sum + bias), rotated (q, k), to q (rows < nH) or to the cache:
// the slot's hd contiguous values in its (block, KV head) run (kernels/kv_layout.h).
template <typename T>
__device__ void FinishHead(const Args& a, const Smem& sm, const LayerPtrs& lp, int hh, int pos,
                           int64_t slot, float bias) {
  const DecodeMegaParams& p = a.p;
  const int t = threadIdx.x, hd = p.head_dim, nH = p.num_heads, nKV = p.num_kv_heads;
  if (t < hd) sm.head[t] = cuda::ToFloat(cuda::FromFloat<T>(RowSum(sm, t) + bias));
  ConsumerSync();
  T* dst = nullptr;
  const bool valid_slot = slot >= 0 && slot < static_cast<int64_t>(p.num_blocks) * p.block_size;
  if (hh < nH) {
    dst = static_cast<T*>(p.q) + static_cast<size_t>(hh) * hd;
  } else if (valid_slot) {
    const bool is_k = hh < nH + nKV;
    const int kvh = is_k ? hh - nH : hh - nH - nKV;
    // KvSlotOffset with the slot in 32 bits (num_blocks x block_size < 2^31 slots:
    // DecodeMegaCudaSupports), so no 64-bit division.
    const int s = static_cast<int>(slot);
    dst = reinterpret_cast<T*>(is_k ? lp.k_cache : lp.v_cache) +
          KvOffset(s / p.block_size, s % p.block_size, kvh, p.block_size, nKV, hd);
  }
  if (dst == nullptr) return;
  const int half = hh < nH + nKV ? p.rotary_dim / 2 : 0;
  if (t < half) {
    // As RotaryKvWriteCuda: inv_freq = 1 / theta^(2j / rotary_dim), angle in float32, sincosf.
    const float inv_freq =
        1.0f / powf(p.theta, static_cast<float>(2 * t) / static_cast<float>(p.rotary_dim));
    float s, c;
    sincosf(static_cast<float>(pos) * inv_freq, &s, &c);
    const float x1 = sm.head[t], x2 = sm.head[t + half];
    dst[t] = cuda::FromFloat<T>(x1 * c - x2 * s);
    dst[t + half] = cuda::FromFloat<T>(x2 * c + x1 * s);
  } else if (t >= 2 * half && t < hd) {
    dst[t] = cuda::FromFloat<T>(sm.head[t]);
  }
}

// The phase's input vector in registers: thread t holds the element pairs t + kConsumers i
// (i < kMaxPairs) as float32, [2 i] the even element. The same pairs of every weight row are
// what the thread multiplies, so no stage reads x from shared memory.
struct XRegs {
  float v[2 * kMaxPairs];
};

// This thread's pairs of src[0, k) (k elements of dtype; from shared memory, or from device
// memory written during the launch, through L2) as raw words; pairs past k read as 0.
template <bool kGlobal>
__device__ __forceinline__ void LoadXWords(const void* src, int k, uint32_t (&raw)[kMaxPairs]) {
  const uint32_t* w = static_cast<const uint32_t*>(src);
  const int npairs = k / 2;
#pragma unroll
  for (int i = 0; i < kMaxPairs; ++i) {
    const int pi = threadIdx.x + kConsumers * i;
    raw[i] = 0;
    if (pi < npairs) raw[i] = kGlobal ? __ldcg(w + pi) : w[pi];
  }
}

template <typename T>
__device__ __forceinline__ XRegs ToX(const uint32_t (&raw)[kMaxPairs]) {
  XRegs x;
#pragma unroll
  for (int i = 0; i < kMaxPairs; ++i) {
    const float2 f = cuda::Word2ToFloat2<T>(raw[i]);
    x.v[2 * i] = f.x;
    x.v[2 * i + 1] = f.y;
  }
  return x;
}

template <typename T, bool kGlobal>
__device__ __forceinline__ XRegs LoadX(const void* src, int k) {
  uint32_t raw[kMaxPairs];
  LoadXWords<kGlobal>(src, k, raw);
  return ToX<T>(raw);
}

// Sums of N (1, 2, 4 or 8) values over the warp's lanes, in 5 + N - 1 shuffles: a butterfly
// that halves the values each step (lane bit 16 picks the upper half, then bit 8, then 4). Lane L
// ends with value RowOfLane<N>(L) summed over all 32 lanes.
template <int N>
__device__ __forceinline__ int RowOfLane(int lane) {
  if constexpr (N == 8) return ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
  if constexpr (N == 4) return ((lane >> 4) & 1) * 2 + ((lane >> 3) & 1);
  if constexpr (N == 2) return (lane >> 4) & 1;
  return 0;
}
template <int N>
__device__ __forceinline__ float WarpSumN(float (&v)[N]) {
  static_assert(N == 1 || N == 2 || N == 4 || N == 8, "WarpSumN: N in {1, 2, 4, 8}");
  const int lane = threadIdx.x & 31;
  int mask = 16;
#pragma unroll
  for (int half = N / 2; half >= 1; half /= 2, mask /= 2) {
    const bool hi = (lane & mask) != 0;
#pragma unroll
    for (int k = 0; k < half; ++k) {
      const float send = hi ? v[k] : v[k + half];
      v[k] = (hi ? v[k + half] : v[k]) + __shfl_xor_sync(0xffffffffu, send, mask);
    }
  }
  float c = v[0];
#pragma unroll
  for (; mask >= 1; mask /= 2) c += __shfl_xor_sync(0xffffffffu, c, mask);
  return c;
}

// kRows rows of a stage ([kRows, 2 npairs] dtype at wt, 32-bit words) times x: this warp's
// partial of row j (its lanes' pairs summed) to part[j * kConsumerWarps + warp]. Branch-free
// within a batch: each batch issues 8 shared loads (kRows rows x 8 / kRows pairs) before its
// FMAs, so a warp waits one shared-memory latency a batch, not one a load. Pairs past npairs read
// the row's last pair (in bounds) against x = 0 there: they add 0 for any finite weight.
template <typename T, int kRows, int kLoads = 8>
__device__ __forceinline__ void TileDot(const uint32_t* wt, int npairs, const XRegs& x,
                                        float* part) {
  constexpr int kG = kLoads / kRows;  // pairs a batch
  const int t = threadIdx.x, lane = t & 31;
  float acc[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) acc[j] = 0.0f;
#pragma unroll
  for (int i0 = 0; i0 < kMaxPairs; i0 += kG) {
    if (kConsumers * i0 >= npairs) break;  // the same in every thread
    uint32_t wv[kG][kRows];
#pragma unroll
    for (int u = 0; u < kG; ++u) {
      if (i0 + u >= kMaxPairs) break;  // (known at compile time)
      const int pi = min(t + kConsumers * (i0 + u), npairs - 1);
#pragma unroll
      for (int j = 0; j < kRows; ++j) wv[u][j] = wt[j * npairs + pi];
    }
#pragma unroll
    for (int u = 0; u < kG; ++u) {
      if (i0 + u >= kMaxPairs) break;
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        const float2 f = cuda::Word2ToFloat2<T>(wv[u][j]);
        acc[j] = fmaf(f.x, x.v[2 * (i0 + u)], acc[j]);
        acc[j] = fmaf(f.y, x.v[2 * (i0 + u) + 1], acc[j]);
      }
    }
  }
  const float v = WarpSumN<kRows>(acc);
  if ((lane & (32 / kRows - 1)) == 0) part[RowOfLane<kRows>(lane) * kConsumerWarps + (t >> 5)] = v;
}

// A stage's n rows as tiles of 8 / 4 / 2 / 1 rows; kPipe (kDecodeMegaFormPipe): 16 shared loads a
// batch instead of 8, so a warp waits one shared-memory latency per 16 words (each row's FMAs
// stay in pair order: the same sums).
template <typename T, bool kPipe>
__device__ __forceinline__ void StageDot(const uint32_t* wt, int n, int npairs, const XRegs& x,
                                         float* part) {
  constexpr int kLoads = kPipe ? 16 : 8;
  int j = 0;
  if (n - j >= 8) {
    TileDot<T, 8, kLoads>(wt, npairs, x, part);
    j += 8;
  }
  if (n - j >= 4) {
    TileDot<T, 4, kLoads>(wt + j * npairs, npairs, x, part + j * kConsumerWarps);
    j += 4;
  }
  if (n - j >= 2) {
    TileDot<T, 2, kLoads>(wt + j * npairs, npairs, x, part + j * kConsumerWarps);
    j += 2;
  }
  if (n - j >= 1) TileDot<T, 1, kLoads>(wt + j * npairs, npairs, x, part + j * kConsumerWarps);
}

}  // namespace decode_mega
}  // namespace phishard
