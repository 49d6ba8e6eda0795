// The persistent 1-row decode kernel (kernels/cuda/decode_mega_cuda.h): a producer warp streams
// the block's weight rows through a ring of bulk copies across every phase and layer; 8 consumer
// warps compute, meeting the other blocks at grid barriers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/decode_mega_cuda.h"
#include "kernels/cuda/gemv_common.cuh"
#include "kernels/cuda/sm90_ptx.cuh"

namespace phishard {
namespace {

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
// DecodeMegaParams::form < 0 (perf-log 04:27: b1 ctx1024 2.17 ms against 2.68 for form 3).
constexpr int kDefaultForm = 11;

struct Args {
  DecodeMegaParams p;
  int stages, stage_bytes, nsplit;
  int pf_stages;  // L2 prefetch lookahead in stages past the ring's next one (0: none)
  int form;       // kDecodeMegaForm* bits
  // Shared memory offsets (bytes): ring at 0, then these.
  int off_x, off_head, off_out, off_part, off_q, off_o, off_scores, off_red2, off_scratch,
      off_blocks, off_bars;
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

__device__ __forceinline__ uint64_t GlobalTimer() {
  uint64_t v;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(v));
  return v;
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
        uint32_t now;
        do {
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                       : "=r"(now)
                       : "l"(sync + kGenWord)
                       : "memory");
        } while (now == gen);
      }
    }
    ConsumerSync();
    return;
  }
  ConsumerSync();
  if (threadIdx.x == 0) {
    __threadfence();
    uint32_t gen;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                 : "=r"(gen)
                 : "l"(sync + kGenWord)
                 : "memory");
    if (atomicAdd(sync, 1u) == gridDim.x - 1) {
      atomicExch(sync, 0u);
      __threadfence();
      asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(sync + kGenWord), "r"(gen + 1)
                   : "memory");
    } else {
      uint32_t now;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                     : "=r"(now)
                     : "l"(sync + kGenWord)
                     : "memory");
      } while (now == gen);
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
  char* k_cache;
  char* v_cache;
};

// q/k/v head hh is complete: sm.part holds its rows' per-warp partials; `bias` is this thread's
// bias of the head (t < hd). dtype(sum + bias), rotated (q, k), to q (rows < nH) or to the cache
// slot.
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
    dst = reinterpret_cast<T*>(is_k ? lp.k_cache : lp.v_cache) +
          (static_cast<size_t>(slot) * nKV + kvh) * hd;
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

// Rows [r0, r1) of a [*, K] weight matrix through the ring, multiplied by x. No barrier across
// the consumer warps per stage: each warp multiplies its lanes' element pairs of every row of the
// stage (the pairs x holds), sums each row over its lanes (TileDot), writes its partial to
// sm.part[row - base][warp] and releases the stage on its own (one mbarrier arrive a warp). The
// warps meet once per head (q/k/v: FinishHead) or at the end of the rows (fc1 / dense epilogue,
// fc2 sums to sm.out), where the 8 partials of a row are summed. Epilogue operands are loaded
// before the stage loop: a global load there would put one memory latency on a stage.
// Cycles consumer thread 0 spent waiting for ring stages and in FinishHead (timeline only).
struct PhaseCycles {
  long long wait = 0, finish = 0;
};

template <typename T, int kEpi, bool kTl, int kForm>
__device__ PhaseCycles ConsumeRows(const Args& a, const Smem& sm, uint32_t& it, const LayerPtrs& lp,
                                   const T* bias, int r0, int r1, int K, int split, int out0,
                                   int pos, int64_t slot, const XRegs& x, int epi_rt = -1) {
  // kEpi < 0: the epilogue kind is epi_rt (one inlined copy of the loop for every matrix).
  const int epi = kEpi >= 0 ? kEpi : epi_rt;
  const DecodeMegaParams& p = a.p;
  const int rps = RowsPerStage(a.stage_bytes, K * static_cast<int>(sizeof(T)));
  const int npairs = K / 2;
  const int t = threadIdx.x, lane = t & 31;
  // This thread's first epilogue operands (row r0 + t), loaded ahead.
  float pre_b = 0.0f, pre_b2 = 0.0f, pre_h = 0.0f;
  if (epi == kEpiFc1 || epi == kEpiDense) {
    if (r0 + t < r1) pre_b = cuda::ToFloat(bias[r0 + t]);
  }
  if (epi == kEpiDense) {
    if (r0 + t < r1) {
      pre_b2 = cuda::ToFloat(static_cast<const T*>(lp.w.fc2_b)[r0 + t]);
      pre_h = LoadCg(static_cast<const T*>(p.h) + r0 + t);
    }
  }
  float head_bias = 0.0f;  // q/k/v: this thread's bias of the current head
  PhaseCycles cyc;
  const bool timed = kTl && t == 0;
  for (int r = r0; r < r1;) {
    if (epi == kEpiQkv) {
      if (r % split == 0 && t < split) head_bias = cuda::ToFloat(bias[r + t]);
    }
    const int n = TileRows(r, r1, rps, split);
    const int s = static_cast<int>(it % a.stages);
    if (timed) {
      const long long c0 = clock64();
      MbarWait(&sm.full[s], (it / a.stages) & 1);
      cyc.wait += clock64() - c0;
    } else {
      MbarWait(&sm.full[s], (it / a.stages) & 1);
    }
    // [n, K] dtype rows of the stage, as 32-bit words (element pairs).
    const uint32_t* wt =
        reinterpret_cast<const uint32_t*>(sm.ring + static_cast<size_t>(s) * a.stage_bytes);
    // Partials go to rows of the head (q/k/v) or of [r0, r1); the tile as 8 / 4 / 2 / 1 rows.
    float* part = sm.part + (epi == kEpiQkv ? r % split : r - r0) * kConsumerWarps;
    if constexpr ((kForm & kDecodeMegaFormPipe) != 0) {
      StageDot<T, true>(wt, n, npairs, x, part);
    } else {
      StageDot<T, false>(wt, n, npairs, x, part);
    }
    __syncwarp();
    if (lane == 0) MbarArrive(&sm.empty[s]);  // this warp is done with the stage
    ++it;
    r += n;
    if (epi == kEpiQkv) {
      if (r % split == 0) {
        const long long c0 = timed ? clock64() : 0;
        ConsumerSync();
        FinishHead<T>(a, sm, lp, r / split - 1, pos, slot, head_bias);
        if (timed) cyc.finish += clock64() - c0;
      }
    }
  }
  if (epi == kEpiFc2) {
    ConsumerSync();
    for (int i = t; i < r1 - r0; i += kConsumers) sm.out[r0 + i - out0] = RowSum(sm, i);
    // (the grid barrier after this phase publishes sm.out and frees sm.part)
  }
  if (epi == kEpiFc1 || epi == kEpiDense) {
    ConsumerSync();
    for (int i = t; i < r1 - r0; i += kConsumers) {
      const int g = r0 + i;
      const float b = i == t ? pre_b : cuda::ToFloat(bias[g]);
      if (epi == kEpiFc1) {
        static_cast<T*>(p.act)[g] =
            cuda::FromFloat<T>(Activate(RowSum(sm, i) + b, static_cast<int>(p.act_fn)));
      } else {
        // fc2's sum and bias in the same float32 sum: one rounding of h a layer.
        const float b2 = i == t ? pre_b2 : cuda::ToFloat(static_cast<const T*>(lp.w.fc2_b)[g]);
        T* h = static_cast<T*>(p.h);
        const float hv = i == t ? pre_h : LoadCg(h + g);
        h[g] = cuda::FromFloat<T>(hv + RowSum(sm, i) + b + sm.out[g - out0] + b2);
      }
    }
  }
  return cyc;
}

// sm.x = dtype(LayerNorm(h) * w + b), as LayerNormCuda (float32 mean, centred variance).
template <typename T>
__device__ void LayerNormRow(const Args& a, const Smem& sm, const T* w, const T* b) {
  const DecodeMegaParams& p = a.p;
  const int t = threadIdx.x, chunks = p.hidden / 8;
  uint4* x = static_cast<uint4*>(sm.x);
  const uint4* h = static_cast<const uint4*>(p.h);
  // The weight and bias of this thread's first two chunks load with h (one round trip).
  uint4 wpre[2], bpre[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int c = t + k * kConsumers;
    if (c < chunks) {
      wpre[k] = __ldg(reinterpret_cast<const uint4*>(w) + c);
      bpre[k] = __ldg(reinterpret_cast<const uint4*>(b) + c);
    }
  }
  float sum = 0.0f;
  for (int c = t; c < chunks; c += kConsumers) {
    const uint4 v = __ldcg(h + c);
    x[c] = v;
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += cuda::ToFloat(e[i]);
  }
  const float mean = ConsumerSum(sum, sm.scratch) / p.hidden;
  float sq = 0.0f;
  for (int c = t; c < chunks; c += kConsumers) {
    const uint4 v = x[c];
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float d = cuda::ToFloat(e[i]) - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(ConsumerSum(sq, sm.scratch) / p.hidden + a.p.eps);
  for (int c = t; c < chunks; c += kConsumers) {  // each thread rewrites only its own chunks
    uint4 v = x[c];
    T* e = reinterpret_cast<T*>(&v);
    const int k = (c - t) / kConsumers;
    const uint4 wv = k == 0   ? wpre[0]
                     : k == 1 ? wpre[1]
                              : __ldg(reinterpret_cast<const uint4*>(w) + c);
    const uint4 bv = k == 0   ? bpre[0]
                     : k == 1 ? bpre[1]
                              : __ldg(reinterpret_cast<const uint4*>(b) + c);
    const T* we = reinterpret_cast<const T*>(&wv);
    const T* be = reinterpret_cast<const T*>(&bv);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      e[i] = cuda::FromFloat<T>((cuda::ToFloat(e[i]) - mean) * rstd * cuda::ToFloat(we[i]) +
                                cuda::ToFloat(be[i]));
    }
    x[c] = v;
  }
  ConsumerSync();
}

// Cache row of position c0 + i of KV head kvh (sm.blocks holds the block ids of the chunk from
// c0 on), or null when its block id is out of range (reads as zero K/V, as PagedDecodeCuda).
template <typename T>
__device__ __forceinline__ const uint4* CacheRow(const Args& a, const Smem& sm, const char* cache,
                                                 int c0, int i, int kvh) {
  const DecodeMegaParams& p = a.p;
  const int pos = c0 + i;
  const int blk = sm.blocks[pos / p.block_size - c0 / p.block_size];
  if (blk < 0 || blk >= p.num_blocks) return nullptr;
  const size_t slot = static_cast<size_t>(blk) * p.block_size + pos % p.block_size;
  return reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(cache) +
                                        (slot * p.num_kv_heads + kvh) * p.head_dim);
}

// Attention of query head `head` over split `split` of the context: writes its (m, l, o)
// partial; the block finishing a head's last split merges them into attn (in split order).
// Positions go in chunks of kItemChunk (one a thread for the scores), every load of a pass
// issued before its arithmetic (one memory round trip a pass for head_dim <= 128).
template <typename T, int kForm>
__device__ void AttentionItem(const Args& a, const Smem& sm, const LayerPtrs& lp, int head,
                              int split, int ctx) {
  const DecodeMegaParams& p = a.p;
  const int t = threadIdx.x, hd = p.head_dim, chunks = hd / 8;
  const int kvh = head / (p.num_heads / p.num_kv_heads);
  const int split_len = (ctx + a.nsplit - 1) / a.nsplit;
  const int p0 = split * split_len;
  const int p1 = min(ctx, p0 + split_len);
  if (t < hd) {
    sm.q[t] = LoadCg(static_cast<const T*>(p.q) + static_cast<size_t>(head) * hd + t) * p.scale;
    sm.o[t] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int c0 = p0; c0 < p1; c0 += kItemChunk) {
    const int len = min(kItemChunk, p1 - c0);
    const int b0 = c0 / p.block_size, nb = (c0 + len - 1) / p.block_size - b0 + 1;
    for (int j = t; j < nb; j += kConsumers) sm.blocks[j] = __ldg(p.block_table + b0 + j);
    ConsumerSync();  // q, o (first chunk) and the block ids
    // This thread's V rows of its first P V batch (thread (group g, chunk c) sums positions g,
    // g + G, ... of the chunk's 8 dims), loaded with the keys: they do not depend on the scores,
    // so the chunk waits one memory round trip for K and V instead of two.
    constexpr int kPvBatch = 12;
    constexpr int kKBatch = 10;  // 16-byte chunks of a key in flight (head_dim 80: all)
    const int groups = kConsumers / chunks, g = t / chunks, c = t % chunks;
    uint4 vpre[kPvBatch];
#pragma unroll
    for (int u = 0; u < kPvBatch; ++u) {
      const int i = g + u * groups;
      const uint4* vr =
          g < groups && i < len ? CacheRow<T>(a, sm, lp.v_cache, c0, i, kvh) : nullptr;
      vpre[u] = vr != nullptr ? __ldcg(vr + c) : make_uint4(0, 0, 0, 0);
    }
    float d = -INFINITY;
    if (t < len) {
      const uint4* kr = CacheRow<T>(a, sm, lp.k_cache, c0, t, kvh);
      d = 0.0f;
      if (kr != nullptr) {
        for (int k0 = 0; k0 < chunks; k0 += kKBatch) {
          uint4 kv[kKBatch];
#pragma unroll
          for (int u = 0; u < kKBatch; ++u) {
            kv[u] = k0 + u < chunks ? __ldcg(kr + k0 + u) : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int u = 0; u < kKBatch; ++u) {
            if (k0 + u < chunks) {
              const T* e = reinterpret_cast<const T*>(&kv[u]);
#pragma unroll
              for (int jj = 0; jj < 8; ++jj)
                d = fmaf(sm.q[(k0 + u) * 8 + jj], cuda::ToFloat(e[jj]), d);
            }
          }
        }
      }
    }
    const float m_new = fmaxf(m, ConsumerMax(d, sm.scratch));
    const float alpha = m == -INFINITY ? 0.0f : expf(m - m_new);
    const float e = t < len ? expf(d - m_new) : 0.0f;
    if (t < len) sm.scores[t] = e;
    l = l * alpha + ConsumerSum(e, sm.scratch);  // its barriers publish sm.scores
    // P V, up to kPvBatch loads in flight (the first batch is vpre).
    float o8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (g < groups) {
      for (int i0 = g; i0 < len; i0 += kPvBatch * groups) {
        uint4 vv[kPvBatch];
#pragma unroll
        for (int u = 0; u < kPvBatch; ++u) {
          const int i = i0 + u * groups;
          const uint4* vr =
              i0 == g || i >= len ? nullptr : CacheRow<T>(a, sm, lp.v_cache, c0, i, kvh);
          vv[u] = i0 == g ? vpre[u] : vr != nullptr ? __ldcg(vr + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kPvBatch; ++u) {
          const int i = i0 + u * groups;
          if (i < len) {
            const T* ev = reinterpret_cast<const T*>(&vv[u]);
            const float pw = sm.scores[i];
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) o8[jj] = fmaf(pw, cuda::ToFloat(ev[jj]), o8[jj]);
          }
        }
      }
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) sm.red2[g * hd + c * 8 + jj] = o8[jj];
    }
    ConsumerSync();
    if (t < hd) {
      float sum = 0.0f;
      for (int gg = 0; gg < groups; ++gg) sum += sm.red2[gg * hd + t];
      sm.o[t] = sm.o[t] * alpha + sum;
    }
    ConsumerSync();  // scores, red2 and the block ids are rewritten by the next chunk
    m = m_new;
  }
  if (p0 >= p1) ConsumerSync();  // (no chunk) q and o written
  // Partial [m, l, o[hd]] of (head, split), then count it.
  float* part =
      a.p.partials + (static_cast<size_t>(head) * kDecodeMegaMaxSplits + split) * (hd + 2);
  if (t < hd) part[2 + t] = sm.o[t];
  if (t == 0) {
    part[0] = m;
    part[1] = l;
  }
  int* flag = reinterpret_cast<int*>(sm.scratch + 16);
  if constexpr ((kForm & kDecodeMegaFormAttnTail) != 0) {
    // One acq_rel atomic of thread 0 after the CTA barrier (fence + count); the last split's
    // block loads every split's (m, l, o) at once and merges in split order (the same sums).
    ConsumerSync();
    if (t == 0) {
      uint32_t old;
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                   : "=r"(old)
                   : "l"(p.sync + kHeadWord + head)
                   : "memory");
      const bool last = old == static_cast<uint32_t>(a.nsplit - 1);
      // (reset for the next layer: ordered before it by the grid barriers in between)
      if (last)
        asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(p.sync + kHeadWord + head)
                     : "memory");
      *flag = last ? 1 : 0;
    }
    ConsumerSync();
    if (*flag != 0) {  // (the same in every consumer thread)
      // Thread t < nsplit brings split t's (m, l) to shared memory with the o loads in flight.
      const float* base =
          a.p.partials + static_cast<size_t>(head) * kDecodeMegaMaxSplits * (hd + 2);
      float os[kDecodeMegaMaxSplits];
#pragma unroll
      for (int s = 0; s < kDecodeMegaMaxSplits; ++s) {
        if (s < a.nsplit && t < hd) os[s] = __ldcg(base + s * (hd + 2) + 2 + t);
      }
      if (t < a.nsplit) {
        sm.scores[t] = __ldcg(base + t * (hd + 2));
        sm.scores[kDecodeMegaMaxSplits + t] = __ldcg(base + t * (hd + 2) + 1);
      }
      ConsumerSync();
      if (t < hd) {
        float mm = -INFINITY;
        for (int s = 0; s < a.nsplit; ++s) mm = fmaxf(mm, sm.scores[s]);
        float lsum = 0.0f, osum = 0.0f;
        if (mm != -INFINITY) {
#pragma unroll
          for (int s = 0; s < kDecodeMegaMaxSplits; ++s) {
            const float ms = s < a.nsplit ? sm.scores[s] : -INFINITY;
            if (ms != -INFINITY) {
              const float wgt = expf(ms - mm);
              lsum += sm.scores[kDecodeMegaMaxSplits + s] * wgt;
              osum += os[s] * wgt;
            }
          }
        }
        static_cast<T*>(p.attn)[static_cast<size_t>(head) * hd + t] =
            cuda::FromFloat<T>(lsum > 0.0f ? osum / lsum : 0.0f);
      }
    }
    ConsumerSync();  // flag, scores and q / o are rewritten by the next item
    return;
  }
  __threadfence();
  ConsumerSync();
  if (t == 0) {
    uint32_t* counter = p.sync + kHeadWord + head;
    const bool last = atomicAdd(counter, 1u) == static_cast<uint32_t>(a.nsplit - 1);
    if (last) {
      atomicExch(counter, 0u);  // every split arrived: ready for the next layer
      __threadfence();
    }
    *flag = last ? 1 : 0;
  }
  ConsumerSync();
  if (*flag != 0 && t < hd) {
    const float* base = a.p.partials + static_cast<size_t>(head) * kDecodeMegaMaxSplits * (hd + 2);
    float mm = -INFINITY;
    for (int s = 0; s < a.nsplit; ++s) mm = fmaxf(mm, __ldcg(base + s * (hd + 2)));
    float lsum = 0.0f, osum = 0.0f;
    if (mm != -INFINITY) {
      for (int s = 0; s < a.nsplit; ++s) {
        const float ms = __ldcg(base + s * (hd + 2));
        if (ms == -INFINITY) continue;
        const float wgt = expf(ms - mm);
        lsum += __ldcg(base + s * (hd + 2) + 1) * wgt;
        osum += __ldcg(base + s * (hd + 2) + 2 + t) * wgt;
      }
    }
    static_cast<T*>(p.attn)[static_cast<size_t>(head) * hd + t] =
        cuda::FromFloat<T>(lsum > 0.0f ? osum / lsum : 0.0f);
  }
  ConsumerSync();  // flag and q / o are rewritten by the next item
}

// The block's weight stream, stage by stage, in the consumers' program order: per layer its q/k/v
// heads, fc1 rows, fc2 rows and dense rows. `m` and `l` name the matrix (0 qkv, 1 fc1, 2 fc2,
// 3 dense) and layer of the stage Next returned last.
struct StreamCursor {
  int l = 0, m = -1;
  int r = 0, r1 = 0, row_bytes = 0, split = 0, rps = 0;
  const char* w = nullptr;
};

template <typename T>
__device__ __forceinline__ bool NextStage(const Args& a, const BlockPlan& bp, StreamCursor& c,
                                          const char** src, uint32_t* bytes) {
  const DecodeMegaParams& p = a.p;
  while (c.r >= c.r1) {
    if (++c.m == 4) {
      c.m = 0;
      ++c.l;
    }
    if (c.l >= p.num_layers) return false;
    const DecodeMegaLayer& w = p.layers[c.l];
    int K = p.hidden;
    c.split = 0;
    if (c.m == 0) {
      c.w = static_cast<const char*>(w.qkv_w), c.r = bp.qkv0, c.r1 = bp.qkv1;
      c.split = p.head_dim;
    } else if (c.m == 1) {
      c.w = static_cast<const char*>(w.fc1_w), c.r = bp.fc1_0, c.r1 = bp.fc1_1;
    } else if (c.m == 2) {
      c.w = static_cast<const char*>(w.fc2_w), c.r = bp.out0, c.r1 = bp.out1;
      K = p.intermediate;
    } else {
      c.w = static_cast<const char*>(w.dense_w), c.r = bp.out0, c.r1 = bp.out1;
      K = p.num_heads * p.head_dim;
    }
    c.row_bytes = K * static_cast<int>(sizeof(T));
    c.rps = RowsPerStage(a.stage_bytes, c.row_bytes);
  }
  const int n = TileRows(c.r, c.r1, c.rps, c.split);
  *src = c.w + static_cast<size_t>(c.r) * c.row_bytes;
  *bytes = static_cast<uint32_t>(n) * c.row_bytes;
  c.r += n;
  return true;
}

// One thread. Stage `it` goes to ring slot it % stages once the consumers released that slot's
// previous stage; before each stage the L2 prefetch frontier moves to pf_stages stages past it,
// so while the ring is full (consumers in a phase that reads no weights) DRAM keeps streaming.
template <typename T, bool kTl>
__device__ void Produce(const Args& a, const BlockPlan& bp, const Smem& sm) {
  StreamCursor load, pf;
  uint32_t pf_it = 0;  // stages the prefetch cursor has passed
  bool pf_more = a.pf_stages > 0;
  long long blocked[4] = {0, 0, 0, 0};  // cycles waiting on a full ring, per matrix (timeline)
  int cur_l = 0;
  constexpr bool timed = kTl;
  auto flush = [&](int l) {
    uint64_t* row = TimelineRow(a.p, l);
    if (row == nullptr) return;
    for (int m = 0; m < 4; ++m) {
      row[kMegaProdQkv + m] = static_cast<uint64_t>(blocked[m]);
      blocked[m] = 0;
    }
  };
  const char* src;
  uint32_t bytes;
  for (uint32_t it = 0; NextStage<T>(a, bp, load, &src, &bytes); ++it) {
    if (timed && load.l != cur_l) {
      flush(cur_l);
      cur_l = load.l;
    }
    while (pf_more && pf_it <= it + a.pf_stages) {
      const char* ps;
      uint32_t pb;
      if (!NextStage<T>(a, bp, pf, &ps, &pb)) {
        pf_more = false;
        break;
      }
      if (pf_it > it) BulkPrefetchL2(ps, pb);  // (stage it itself is loaded right below)
      ++pf_it;
    }
    const int s = static_cast<int>(it % a.stages);
    if (it >= static_cast<uint32_t>(a.stages)) {
      const long long c0 = timed ? clock64() : 0;
      MbarWait(&sm.empty[s], ((it / a.stages) - 1) & 1);
      if (timed) {
        const long long d = clock64() - c0;
#pragma unroll
        for (int m = 0; m < 4; ++m) blocked[m] += load.m == m ? d : 0;  // (stays in registers)
      }
    }
    MbarExpect(&sm.full[s], bytes);
    BulkLoad(sm.ring + static_cast<size_t>(s) * a.stage_bytes, src, bytes, &sm.full[s]);
  }
  if (timed) flush(cur_l);
}

// Consume in kDecodeMegaFormOneLoop: the same phases in the same order, but the four matrices go
// through ONE call site of ConsumeRows (a runtime epilogue kind, the matrix loop not unrolled), so
// the stage loop's code exists once instead of four times (ncu: ~30 % of the warp stalls wait for
// instruction fetch).
template <typename T, bool kTl, int kForm>
__device__ void ConsumeOneLoop(const Args& a, const BlockPlan& bp, const Smem& sm, int pos, int ctx,
                               int64_t slot) {
  const DecodeMegaParams& p = a.p;
  const int H = p.hidden, I = p.intermediate, A = p.num_heads * p.head_dim;
  uint32_t it = 0;
  for (int l = 0; l < p.num_layers; ++l) {
    uint64_t* tl = kTl && threadIdx.x == 0 ? TimelineRow(p, l) : nullptr;
    Stamp(tl, kMegaLayerStart);
    LayerPtrs lp;
    lp.w = p.layers[l];
    lp.k_cache = static_cast<char*>(p.kv) + 2 * static_cast<size_t>(l) * p.layer_kv_bytes;
    lp.v_cache = lp.k_cache + p.layer_kv_bytes;
    const DecodeMegaLayer& w = lp.w;
    XRegs x;
    PhaseCycles cyc[4];
    int items = 0;
#pragma unroll 1
    for (int m = 0; m < 4; ++m) {
      int r0, r1, K = H, split = 0, out0 = 0;
      const void* bias;
      if (m == 0) {  // A: LayerNorm, q/k/v heads
        LayerNormRow<T>(a, sm, static_cast<const T*>(w.ln_w), static_cast<const T*>(w.ln_b));
        Stamp(tl, kMegaLnEnd);
        x = LoadX<T, false>(sm.x, H);
        r0 = bp.qkv0, r1 = bp.qkv1, split = p.head_dim, bias = w.qkv_b;
      } else if (m == 1) {  // A: fc1 rows (the same x)
        Stamp(tl, kMegaQkvEnd);
        r0 = bp.fc1_0, r1 = bp.fc1_1, bias = w.fc1_b;
      } else if (m == 2) {  // B: attention items, then fc2 rows
        Stamp(tl, kMegaFc1End);
        GridSync(p.sync, kForm);
        Stamp(tl, kMegaBarAEnd);
        for (int item = blockIdx.x; item < p.num_heads * a.nsplit; item += gridDim.x, ++items) {
          AttentionItem<T, kForm>(a, sm, lp, item / a.nsplit, item % a.nsplit, ctx);
        }
        Stamp(tl, kMegaAttnEnd);
        x = LoadX<T, true>(p.act, I);
        r0 = bp.out0, r1 = bp.out1, K = I, out0 = bp.out0, bias = w.fc2_b;
      } else {  // C: dense rows + fc2 + residual -> h
        Stamp(tl, kMegaFc2End);
        GridSync(p.sync, kForm);
        Stamp(tl, kMegaBarBEnd);
        x = LoadX<T, true>(p.attn, A);
        r0 = bp.out0, r1 = bp.out1, K = A, out0 = bp.out0, bias = w.dense_b;
      }
      cyc[m] = ConsumeRows<T, -1, kTl, kForm>(a, sm, it, lp, static_cast<const T*>(bias), r0, r1, K,
                                              split, out0, pos, slot, x, m);
    }
    Stamp(tl, kMegaDenseEnd);
    if (l + 1 < p.num_layers) GridSync(p.sync, kForm);
    Stamp(tl, kMegaBarCEnd);
    if (tl != nullptr) {
      tl[kMegaWaitQkvFc1] = static_cast<uint64_t>(cyc[0].wait + cyc[1].wait);
      tl[kMegaFinishHead] = static_cast<uint64_t>(cyc[0].finish);
      tl[kMegaWaitFc2] = static_cast<uint64_t>(cyc[2].wait);
      tl[kMegaWaitDense] = static_cast<uint64_t>(cyc[3].wait);
      tl[kMegaAttnItems] = static_cast<uint64_t>(items);
    }
  }
}

template <typename T, bool kTl, int kForm>
__device__ void Consume(const Args& a, const BlockPlan& bp, const Smem& sm) {
  const DecodeMegaParams& p = a.p;
  const int H = p.hidden, I = p.intermediate, A = p.num_heads * p.head_dim;
  const int pos = __ldg(p.positions), ctx = __ldg(p.context_lens);
  const int64_t slot = __ldg(reinterpret_cast<const long long*>(p.slots));
  if constexpr ((kForm & kDecodeMegaFormOneLoop) != 0) {
    ConsumeOneLoop<T, kTl, kForm>(a, bp, sm, pos, ctx, slot);
    return;
  }
  uint32_t it = 0;
  for (int l = 0; l < p.num_layers; ++l) {
    uint64_t* tl = kTl && threadIdx.x == 0 ? TimelineRow(p, l) : nullptr;
    Stamp(tl, kMegaLayerStart);
    LayerPtrs lp;
    lp.w = p.layers[l];
    lp.k_cache = static_cast<char*>(p.kv) + 2 * static_cast<size_t>(l) * p.layer_kv_bytes;
    lp.v_cache = lp.k_cache + p.layer_kv_bytes;
    const DecodeMegaLayer& w = lp.w;
    // A: LayerNorm, q/k/v heads (rotated, K/V to the cache), fc1 rows.
    LayerNormRow<T>(a, sm, static_cast<const T*>(w.ln_w), static_cast<const T*>(w.ln_b));
    Stamp(tl, kMegaLnEnd);
    {
      const XRegs x = LoadX<T, false>(sm.x, H);
      const PhaseCycles cq =
          ConsumeRows<T, kEpiQkv, kTl, kForm>(a, sm, it, lp, static_cast<const T*>(w.qkv_b),
                                              bp.qkv0, bp.qkv1, H, p.head_dim, 0, pos, slot, x);
      Stamp(tl, kMegaQkvEnd);
      const PhaseCycles cf = ConsumeRows<T, kEpiFc1, kTl, kForm>(
          a, sm, it, lp, static_cast<const T*>(w.fc1_b), bp.fc1_0, bp.fc1_1, H, 0, 0, pos, slot, x);
      Stamp(tl, kMegaFc1End);
      if (tl != nullptr) {
        tl[kMegaWaitQkvFc1] = static_cast<uint64_t>(cq.wait + cf.wait);
        tl[kMegaFinishHead] = static_cast<uint64_t>(cq.finish);
      }
    }
    GridSync(p.sync, kForm);
    Stamp(tl, kMegaBarAEnd);
    // B: attention items, then fc2 rows (sums kept for C). act (fc2's input, in L2) is loaded
    // after the attention: held in registers across it, its 20 words spill the attention's.
    int items = 0;
    for (int item = blockIdx.x; item < p.num_heads * a.nsplit; item += gridDim.x, ++items) {
      AttentionItem<T, kForm>(a, sm, lp, item / a.nsplit, item % a.nsplit, ctx);
    }
    Stamp(tl, kMegaAttnEnd);
    const PhaseCycles c2 = ConsumeRows<T, kEpiFc2, kTl, kForm>(
        a, sm, it, lp, static_cast<const T*>(w.fc2_b), bp.out0, bp.out1, I, 0, bp.out0, pos, slot,
        LoadX<T, true>(p.act, I));
    Stamp(tl, kMegaFc2End);
    GridSync(p.sync, kForm);
    Stamp(tl, kMegaBarBEnd);
    // C: dense rows + fc2 + residual -> h.
    const PhaseCycles cd = ConsumeRows<T, kEpiDense, kTl, kForm>(
        a, sm, it, lp, static_cast<const T*>(w.dense_b), bp.out0, bp.out1, A, 0, bp.out0, pos, slot,
        LoadX<T, true>(p.attn, A));
    Stamp(tl, kMegaDenseEnd);
    if (l + 1 < p.num_layers) GridSync(p.sync, kForm);
    Stamp(tl, kMegaBarCEnd);
    if (tl != nullptr) {
      tl[kMegaWaitFc2] = static_cast<uint64_t>(c2.wait);
      tl[kMegaWaitDense] = static_cast<uint64_t>(cd.wait);
      tl[kMegaAttnItems] = static_cast<uint64_t>(items);
    }
  }
}

// kTl: the timeline instance (DecodeMegaParams::timeline set); the other one has no stamp at all.
template <typename T, bool kTl, int kForm>
__global__ void __launch_bounds__(kThreads, 1) DecodeMegaKernel(const Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  Smem sm;
  sm.ring = smem;
  sm.x = smem + a.off_x;
  sm.head = reinterpret_cast<float*>(smem + a.off_head);
  sm.out = reinterpret_cast<float*>(smem + a.off_out);
  sm.part = reinterpret_cast<float*>(smem + a.off_part);
  sm.q = reinterpret_cast<float*>(smem + a.off_q);
  sm.o = reinterpret_cast<float*>(smem + a.off_o);
  sm.scores = reinterpret_cast<float*>(smem + a.off_scores);
  sm.red2 = reinterpret_cast<float*>(smem + a.off_red2);
  sm.scratch = reinterpret_cast<float*>(smem + a.off_scratch);
  sm.blocks = reinterpret_cast<int*>(smem + a.off_blocks);
  sm.full = reinterpret_cast<uint64_t*>(smem + a.off_bars);
  sm.empty = sm.full + kMaxStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < a.stages; ++s) {
      MbarInit(&sm.full[s], 1);
      MbarInit(&sm.empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const BlockPlan bp = MakePlan(a.p, reinterpret_cast<int*>(sm.scratch + 24));
  if (threadIdx.x >= kConsumers) {
    if (threadIdx.x == kConsumers) Produce<T, kTl>(a, bp, sm);
    return;
  }
  // The block's row of the timeline header: clock64 and %globaltimer at its start and end.
  uint64_t* head = nullptr;
  if (kTl && threadIdx.x == 0 && blockIdx.x < a.p.timeline_blocks) {
    head = a.p.timeline +
           (static_cast<size_t>(blockIdx.x) * (a.p.timeline_layers + 1) + a.p.timeline_layers) *
               kDecodeMegaEvents;
    head[0] = clock64();
    head[1] = GlobalTimer();
  }
  Consume<T, kTl, kForm>(a, bp, sm);
  if (head != nullptr) {
    head[2] = clock64();
    head[3] = GlobalTimer();
    head[4] = 1;
    head[5] = gridDim.x;
  }
}

struct DeviceLimits {
  int sms = 0;
  int smem_optin = 0;
  bool ok = false;  // sm_90+ with cooperative launch
};

DeviceLimits Limits() {
  static std::atomic<int> sms[64], optin[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return {};
  if (sms[dev].load() == 0) {
    int v = 0, o = 0, cc = 0, coop = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&o, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
    if (cc < 9 || coop == 0) v = -1;
    optin[dev].store(o);
    sms[dev].store(v);
  }
  DeviceLimits lim;
  lim.sms = sms[dev].load();
  lim.smem_optin = optin[dev].load();
  lim.ok = lim.sms > 0;
  return lim;
}

int RoundUp(int v, int m) { return (v + m - 1) / m * m; }

// The most fc1 rows any block gets (MakePlan's rule, on the host).
int MaxFc1Rows(const DecodeMegaParams& p, int blocks) {
  int prev = 0, most = 0, end = 0;
  for (int b = 0; b < blocks; ++b) {
    end = std::max(end, Fc1EndCandidate(p, b, blocks));
    const int e = b == blocks - 1 ? p.intermediate : end;
    most = std::max(most, e - prev);
    prev = e;
  }
  return most;
}

// Shared-memory layout and ring of `p` on a device with `lim`; stages 0 when it does not fit.
Args MakeArgs(const DecodeMegaParams& p, const DeviceLimits& lim, int* smem_bytes) {
  Args a;
  a.p = p;
  const int es = static_cast<int>(DataTypeSize(p.dtype));
  const int A = p.num_heads * p.head_dim;
  const int max_k = std::max(std::max(p.hidden, p.intermediate), A);
  const int row = max_k * es;
  const int target = p.stage_kb > 0 ? p.stage_kb * 1024 : kStageTarget;
  a.stage_bytes = RoundUp(row * std::max(1, target / row), 128);
  const int blocks = p.blocks > 0 ? std::min(p.blocks, lim.sms) : lim.sms;
  a.p.blocks = blocks;
  const int out_rows = (p.hidden + blocks - 1) / std::max(blocks, 1);
  int off = 0;
  auto take = [&](int bytes) {
    const int at = off;
    off += RoundUp(bytes, 16);
    return at;
  };
  a.off_x = take(p.hidden * es);
  a.off_head = take(p.head_dim * 4);
  a.off_out = take(out_rows * 4);
  a.off_part =
      take(std::max(std::max(out_rows, p.head_dim), MaxFc1Rows(p, blocks)) * kConsumerWarps * 4);
  a.off_q = take(p.head_dim * 4);
  a.off_o = take(p.head_dim * 4);
  a.off_scores = take(kItemChunk * 4);
  a.off_red2 = take(kConsumers * 8 * 4);
  a.off_scratch = take(32 * 4);
  a.off_blocks = take((kItemChunk + 1) * 4);
  a.off_bars = take(2 * kMaxStages * 8);
  const int fixed = off;
  const int avail = lim.smem_optin - 1024 - fixed;  // static shared memory and a margin
  int stages = avail > 0 ? avail / a.stage_bytes : 0;
  stages = std::min(stages, kMaxStages);
  if (p.stages > 0) stages = p.stages <= stages ? p.stages : 0;
  a.stages = stages;
  // Every offset moves past the ring.
  const int ring = stages * a.stage_bytes;
  for (int* o : {&a.off_x, &a.off_head, &a.off_out, &a.off_part, &a.off_q, &a.off_o, &a.off_scores,
                 &a.off_red2, &a.off_scratch, &a.off_blocks, &a.off_bars}) {
    *o += ring;
  }
  a.nsplit = std::max(1, std::min(kDecodeMegaMaxSplits, blocks / std::max(p.num_heads, 1)));
  a.form = p.form < 0 ? kDefaultForm : p.form;
  const int pf_kb = p.prefetch_kb == 0 ? kDefaultPrefetchKb : std::max(p.prefetch_kb, 0);
  a.pf_stages = pf_kb > 0 ? std::max(1, pf_kb * 1024 / a.stage_bytes) : 0;
  *smem_bytes = ring + fixed;
  return a;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, bool kTl, int kForm>
KernelStatus Launch(const Args& a, int smem, cudaStream_t stream) {
  auto kernel = DecodeMegaKernel<T, kTl, kForm>;
  static std::atomic<uint64_t> opted{0};
  int dev = 0;
  cudaGetDevice(&dev);
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if ((opted.load() & bit) == 0) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Limits().smem_optin - 1024) != cudaSuccess) {
      return KernelStatus::kDeviceError;
    }
    opted.fetch_or(bit);
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(a.p.blocks);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;  // all blocks resident: the grid barrier is safe
  attr[0].val.cooperative = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  if (cudaLaunchKernelEx(&config, kernel, a) != cudaSuccess) return KernelStatus::kDeviceError;
  return cuda::LaunchStatus();
}

}  // namespace

size_t DecodeMegaSyncBytes(int num_heads) {
  return sizeof(uint32_t) * static_cast<size_t>(kHeadWord + std::max(num_heads, 0));
}

size_t DecodeMegaPartialsBytes(int num_heads, int head_dim) {
  return sizeof(float) * static_cast<size_t>(num_heads) * kDecodeMegaMaxSplits * (head_dim + 2);
}

bool DecodeMegaCudaSupports(const DecodeMegaParams& p) {
  if (p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) return false;
  if (p.num_layers < 1 || p.hidden < 8 || p.intermediate < 8 || p.num_heads < 1 ||
      p.num_kv_heads < 1 || p.head_dim < 8) {
    return false;
  }
  if (p.hidden % 8 != 0 || p.intermediate % 8 != 0 || p.head_dim % 8 != 0 || p.head_dim > 256 ||
      p.num_heads % p.num_kv_heads != 0 || p.rotary_dim < 0 || p.rotary_dim % 2 != 0 ||
      p.rotary_dim > p.head_dim || p.block_size < 1 || p.num_blocks < 0) {
    return false;
  }
  if (p.blocks < 0 || p.stages < 0 || p.stages > kMaxStages || p.stage_kb < 0) return false;
  if (p.timeline != nullptr && (p.timeline_layers < 0 || p.timeline_blocks < 0)) return false;
  // The forms compiled (DecodeMegaCuda's instances); the timeline in all but form 1.
  const int form = p.form < 0 ? kDefaultForm : p.form;
  if (form != 0 && form != 1 && form != 3 && form != 7 && form != 11) return false;
  if (p.timeline != nullptr && form == 1) return false;
  // Every consumer thread holds its pairs of each phase's input vector (XRegs).
  const int max_k = std::max(std::max(p.hidden, p.intermediate), p.num_heads * p.head_dim);
  if (max_k > 2 * kConsumers * kMaxPairs) return false;
  if (!Aligned16(p.h) || !Aligned16(p.q) || !Aligned16(p.act) || !Aligned16(p.attn) ||
      !Aligned16(p.kv) || p.layer_kv_bytes % 16 != 0) {
    return false;
  }
  const DeviceLimits lim = Limits();
  if (!lim.ok) return false;
  int smem = 0;
  const Args a = MakeArgs(p, lim, &smem);
  if (a.stages < 2 || smem + 1024 > lim.smem_optin) return false;
  // Every block's output rows fit its fc2 sums (out rows is sized by the same rule).
  return a.p.blocks >= 1;
}

KernelStatus DecodeMegaCuda(const DecodeMegaParams& p, cudaStream_t stream) {
  if (!p.layers || !p.kv || !p.positions || !p.slots || !p.context_lens || !p.block_table || !p.h ||
      !p.q || !p.act || !p.attn || !p.partials || !p.sync) {
    return KernelStatus::kNullPointer;
  }
  if (!DecodeMegaCudaSupports(p)) return KernelStatus::kInvalidShape;
  int smem = 0;
  const Args a = MakeArgs(p, Limits(), &smem);
  return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Instances: forms 0, 1, 3, 7 (each adds one change) and 11 (3 + one loop); the timeline
    // for all but 1.
    const bool tl = a.p.timeline != nullptr;
    switch (a.form) {
      case 0:
        return tl ? Launch<T, true, 0>(a, smem, stream) : Launch<T, false, 0>(a, smem, stream);
      case 1:
        return Launch<T, false, 1>(a, smem, stream);
      case 3:
        return tl ? Launch<T, true, 3>(a, smem, stream) : Launch<T, false, 3>(a, smem, stream);
      case 7:
        return tl ? Launch<T, true, 7>(a, smem, stream) : Launch<T, false, 7>(a, smem, stream);
      default:
        return tl ? Launch<T, true, 11>(a, smem, stream) : Launch<T, false, 11>(a, smem, stream);
    }
  });
}

}  // namespace phishard
