// phishard_attn_load_probe: how long one sequence's decode attention takes alone and beside a
// stream that keeps DRAM busy, for the library's kernel and for a "one-shot" form whose every
// block asks for all of its K/V at once (measurement only; docs/performance.md, decode b1).
//
// At batch 1 the attention sits on the decode step's critical path between the qkv GEMV and
// dense, and it slows ~2x beside the MLP branch's streaming GEMVs (perf-log 2026-11-30 14:38):
// its blocks walk a chain of dependent DRAM round trips (context length / block table -> K/V
// stages -> partial -> merge), each slower under a loaded memory system. The one-shot form cuts
// the chain to four round trips: {block table, context length, q} -> every K/V row of the block
// (cp.async, 20-40 KB a block in flight) -> the split counter's atomic -> the partials (last
// block only). If it stays short beside a saturating stream, the schedule "qkv first, then the
// attention beside fc1 / fc2" (stop 22's split design) has its attention.
// Measured (docs/perf-log.md 2026-11-30 16:22, ctx 1024): the library kernel 9.9 us alone, 17.5
// beside (its 123-register blocks fit 3 an SM beside the background's registers: 512 blocks in two
// waves); the one-shot form 11.5 alone, 11.6 beside, its K/V landed 4.9 / 6.7 us after its start.
// In the model the one-shot form (branch oneshot, 16:31) gained nothing: there the attention runs
// beside cuBLASLt's m = 1 CTAs, each of which holds a whole SM (384 threads x 168 registers,
// 164-225 KB of shared memory), and ends when fc2's do, whichever kernel it is.
//
// Shape: Phi-2's layer (32 MHA heads x 80, bf16), one sequence of CTX tokens in blocks of 16
// (consecutive in the pool), as bench/bench_device.h lays it out. Each case: 400 launches back to
// back between two events (the mean includes the launch gaps, the same for every kernel), alone,
// then beside, on another stream:
//   1. a read kernel of 132 x 256 threads (8 x 16-byte loads in flight a thread, 32 registers, no
//      shared memory) over a 4 GiB buffer: room for attention blocks on every SM;
//   2. a read kernel holding N whole SMs (ReadStream<16>: 512 threads, 16 loads in flight a thread,
//      200 KB of shared memory), the attention on the 132 - N others;
//   3. a 1-row fc1 GEMV (10240 x 2560) back to back over 8 distinct weight copies: LightGemv
//      (persistent, 256 threads, ~40 registers, 1-3 blocks an SM; optionally each warp asking the
//      row it takes D columns later into L2 first) and the bulk GEMV (kernels/cuda/gemv_bulk.cu)
//      at its defaults;
// then the one-shot chain taken apart by %globaltimer, alone and beside 1.
// Measured (perf-log 2026-11-30 16:22-16:36, ctx 1024): beside 1, see above; beside 2, the stream
// reads 4.50 / 4.25 / 4.00 / 3.59 TB/s on 132 / 100 / 84 / 68 SMs, the attention on the other 32
// / 48 / 64 SMs takes 29-52 / 23-47 / 16-33 us; beside 3, the GEMVs stream 2.9-3.3 TB/s alone and
// 2.2-3.2 beside, the attention takes 13-26 us (the library kernel 13.0 beside one LightGemv block
// an SM). The attention keeps its time only beside a stream far lighter than a GEMV's.
// Those GEMV rates read one 52 MB copy back to back, part of it still in the 50 MB L2; over 8
// copies (perf-log 2026-11-30 17:44, session 26) LightGemv reads 2.6 / 3.3 TB/s at 1 / 3 blocks an
// SM (3.40-3.49 at 4-8), the bulk GEMV 2.7, and asking rows into L2 ahead lowers it (2.1-2.6 TB/s
// at D = 1-8, 1-2 blocks an SM: 4.45 on the one copy, which was L2 reuse); LightGemv2 (two rows in
// flight a warp, one block an SM) 3.40 (perf-log 17:55). Every form tops out at ~3.5 TB/s a 52 MB
// launch (15 us against 11.7 at the read rate: each launch's start, ramp and tail).
// Usage: phishard_attn_load_probe [ctx (default 1024)]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <type_traits>
#include <vector>

#include "bench/bench_device.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/sm90_ptx.cuh"

namespace phishard::bench {
namespace {

constexpr const char* kProg = "phishard_attn_load_probe";
constexpr int kHd = 80;
constexpr int kBs = 16;
constexpr int kThreads = 128;

#define ALP_CHECK(call) PHI_BENCH_CHECK(kProg, call)

struct OneShotArgs {
  const __nv_bfloat16* q;  // [1, q_stride]: q of head h at h * 80
  const __nv_bfloat16* k;  // [blocks, heads, 16, 80]
  const __nv_bfloat16* v;
  __nv_bfloat16* out;  // [heads * 80]
  const int32_t* ctx_lens;
  const int32_t* table;  // [max_blocks]
  int max_blocks, heads;
  float scale_log2;
  float* partials;    // [heads, splits, 80 + 2]
  int32_t* counters;  // [heads], zero; left zero
  // Null, or %globaltimer stamps: [0] min over blocks of the start, [1] max of "K/V landed",
  // [2] max of the end (the merging blocks' store).
  unsigned long long* stamps;
};

__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(smem))),
               "l"(gmem)
               : "memory");
}

// Block (h, split): keys [split * KEYS, split * KEYS + KEYS) of head h. Thread t owns key t (and
// key t + 128 at KEYS = 256): one table entry, then its key's 10 + 10 16-byte chunks of K and V.
template <int KEYS>
__global__ void __launch_bounds__(kThreads) OneShotAttn(const OneShotArgs a) {
  static_assert((KEYS % kThreads == 0 || KEYS < kThreads) && KEYS % kBs == 0);
  constexpr int kPer = (KEYS + kThreads - 1) / kThreads;  // keys a thread (threads >= KEYS: none)
  constexpr int kChunks = kHd / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem);  // [KEYS, 80]
  __nv_bfloat16* sV = sK + KEYS * kHd;
  float* sP = reinterpret_cast<float*>(sV + KEYS * kHd);  // [KEYS]
  __shared__ float sQ[kHd];
  __shared__ float sRed[8];
  __shared__ int sLast;
  const int h = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
  if (a.stamps != nullptr && tid == 0) atomicMin(a.stamps, GlobalTimer());
  // Round trip 1: the table entries, the context length and q, all at once.
  int blk[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int key = split * KEYS + tid + i * kThreads;
    blk[i] =
        tid + i * kThreads < KEYS && key / kBs < a.max_blocks ? __ldg(a.table + key / kBs) : -1;
  }
  const int ctx = __ldg(a.ctx_lens);
  if (tid < kHd) sQ[tid] = __bfloat162float(a.q[h * kHd + tid]);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {  // round trip 2: every K/V row of the block
    const int r = tid + i * kThreads;
    if (blk[i] < 0) continue;
    const size_t off =
        ((static_cast<size_t>(blk[i]) * a.heads + h) * kBs + (split * KEYS + r) % kBs) * kHd;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      CpAsync16(sK + r * kHd + c * 8, a.k + off + c * 8);
      CpAsync16(sV + r * kHd + c * 8, a.v + off + c * 8);
    }
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();
  if (a.stamps != nullptr && tid == 0) atomicMax(a.stamps + 1, GlobalTimer());
  // Scores (log2 domain), the block's max and sum.
  float s[kPer];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int r = tid + i * kThreads;
    const int key = split * KEYS + r;
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {  // 16-byte reads: 2-way bank conflicts at a 160-byte row
      const uint4 u = *reinterpret_cast<const uint4*>(sK + r * kHd + c * 8);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const __nv_bfloat162 kv = *reinterpret_cast<const __nv_bfloat162*>(&w[e]);
        dot = fmaf(sQ[c * 8 + 2 * e], __low2float(kv), dot);
        dot = fmaf(sQ[c * 8 + 2 * e + 1], __high2float(kv), dot);
      }
    }
    s[i] = key < ctx && blk[i] >= 0 ? dot * a.scale_log2 : -INFINITY;  // (blk < 0: no such key)
    mx = fmaxf(mx, s[i]);
  }
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((tid & 31) == 0) sRed[tid >> 5] = mx;
  __syncthreads();
  mx = fmaxf(fmaxf(sRed[0], sRed[1]), fmaxf(sRed[2], sRed[3]));
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const float p = mx == -INFINITY ? 0.0f : exp2f(s[i] - mx);
    if (tid + i * kThreads < KEYS) sP[tid + i * kThreads] = p;
    sum += p;
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  __syncthreads();  // sRed's max read by all before the sums overwrite it; sP complete
  if ((tid & 31) == 0) sRed[4 + (tid >> 5)] = sum;
  __syncthreads();
  const float l = sRed[4] + sRed[5] + sRed[6] + sRed[7];
  // O[d] = sum_k p_k V[k][d]: threads 0..79 a dimension each.
  float* part = a.partials + (static_cast<size_t>(h) * gridDim.y + split) * (kHd + 2);
  if (tid < kHd) {
    float o0 = 0.0f, o1 = 0.0f;
#pragma unroll 8
    for (int r = 0; r < KEYS; r += 2) {
      o0 = fmaf(sP[r], __bfloat162float(sV[r * kHd + tid]), o0);
      o1 = fmaf(sP[r + 1], __bfloat162float(sV[(r + 1) * kHd + tid]), o1);
    }
    part[tid] = o0 + o1;
  }
  if (tid == 0) {
    part[kHd] = mx;
    part[kHd + 1] = l;
  }
  // Round trip 3: the split counter; round trip 4 (last block): every split's partial.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int done = atomicAdd(a.counters + h, 1);
    sLast = done == static_cast<int>(gridDim.y) - 1;
  }
  __syncthreads();
  if (!sLast) return;
  __threadfence();
  if (tid < kHd) {
    const float* base = a.partials + static_cast<size_t>(h) * gridDim.y * (kHd + 2);
    float m_all = -INFINITY;
    for (int sp = 0; sp < static_cast<int>(gridDim.y); ++sp) {
      m_all = fmaxf(m_all, __ldcg(base + sp * (kHd + 2) + kHd));
    }
    float acc = 0.0f, l_all = 0.0f;
    for (int sp = 0; sp < static_cast<int>(gridDim.y); ++sp) {
      const float* ps = base + sp * (kHd + 2);
      const float m = __ldcg(ps + kHd);
      const float w = m == -INFINITY ? 0.0f : exp2f(m - m_all);
      acc = fmaf(w, __ldcg(ps + tid), acc);
      l_all = fmaf(w, __ldcg(ps + kHd + 1), l_all);
    }
    a.out[h * kHd + tid] = __float2bfloat16(acc / l_all);
  }
  if (tid == 0) a.counters[h] = 0;
  __syncthreads();
  if (a.stamps != nullptr && tid == 0) atomicMax(a.stamps + 2, GlobalTimer());
}

// The read streams: every thread keeps U 16-byte loads in flight over `n` vectors, `passes`
// times. The background of 1: 132 blocks of 256 threads, U = 8 (32 registers, no shared memory).
// The stream of 2: one block of 512 threads an SM, U = 16, kHoldSmem of dynamic shared memory
// (unused: it keeps other blocks off the SM), as cuBLASLt's m = 1 CTAs hold theirs (perf-log
// 2026-11-30 16:25).
constexpr int kHoldSmem = 200 * 1024;
template <int U>
__global__ void __launch_bounds__(512)
    ReadStream(const uint4* buf, size_t n, int passes, uint32_t* sink) {
  uint32_t acc = 0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (int p = 0; p < passes; ++p) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += U * stride) {
      uint4 r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const size_t j = i + u * stride;
        r[u] = j < n ? __ldcg(buf + j) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) acc ^= r[u].x ^ r[u].y ^ r[u].z ^ r[u].w;
    }
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;  // keeps the loads
}

// A warp's 1-row GEMV pieces: lane l's chunks l, l + 32, ... of column col's weight row
// (K = 256 KC elements) into registers, and their products with x (shared memory) summed over the
// warp into y[col].
template <int KC>
__device__ __forceinline__ void LoadRow(const __nv_bfloat16* w, int col, int lane, uint4 (&r)[KC]) {
  const uint4* row = reinterpret_cast<const uint4*>(w + static_cast<size_t>(col) * 256 * KC);
#pragma unroll
  for (int c = 0; c < KC; ++c) r[c] = __ldcs(row + lane + 32 * c);
}
template <int KC>
__device__ __forceinline__ void DotRow(const uint4 (&r)[KC], const __nv_bfloat16* sx, int lane,
                                       int col, __nv_bfloat16* y) {
  float acc = 0.0f;
#pragma unroll
  for (int c = 0; c < KC; ++c) {
    const uint4 xv = reinterpret_cast<const uint4*>(sx)[lane + 32 * c];
    const uint32_t wa[4] = {r[c].x, r[c].y, r[c].z, r[c].w};
    const uint32_t xa[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 wf = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wa[e]));
      const float2 xf = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&xa[e]));
      acc = fmaf(wf.x, xf.x, fmaf(wf.y, xf.y, acc));
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) y[col] = __float2bfloat16(acc);
}
// x [K] into the block's shared copy (every thread of the block, then a barrier).
template <int K>
__device__ __forceinline__ void StageX(const __nv_bfloat16* x, __nv_bfloat16* sx) {
  for (int i = threadIdx.x; i < K / 8; i += blockDim.x) {
    reinterpret_cast<uint4*>(sx)[i] = reinterpret_cast<const uint4*>(x)[i];
  }
  __syncthreads();
}

// A light 1-row GEMV (y[n] = w[n, :] . x, bf16, float32 sums; no bias): a persistent grid of
// blocks of 256 threads, no shared memory beyond x, ~40 registers, so it leaves most of every SM
// to other kernels; warp w of block b takes output columns b * 8 + w, + 8 x gridDim, ...; a lane
// reads 16-byte chunks l, l + 32, ... of the column's weight row (K / 256 of them, all in flight)
// against x from shared memory.
// With D > 0 lane 0 of each warp also asks the weight row it will take D columns later into L2
// (cp.async.bulk.prefetch.L2: no registers or shared memory held for those bytes), so the row's
// own loads hit L2 and the DRAM stream keeps D rows a warp in flight beyond them.
template <int KC, int D = 0>  // 16-byte chunks a lane (K = 256 KC); rows asked ahead a warp
__global__ void __launch_bounds__(256)
    LightGemv(const __nv_bfloat16* w, const __nv_bfloat16* x, __nv_bfloat16* y, int n) {
  constexpr int K = 256 * KC;
  __shared__ __align__(16) __nv_bfloat16 sx[K];
  StageX<K>(x, sx);
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * 8;
  const int col0 = blockIdx.x * 8 + (threadIdx.x >> 5);
  if constexpr (D > 0) {
    if (lane == 0) {
      for (int d = 0; d < D && col0 + d * warps < n; ++d) {
        sm90::BulkPrefetchL2(w + static_cast<size_t>(col0 + d * warps) * K, K * 2);
      }
    }
  }
  for (int col = col0; col < n; col += warps) {
    if constexpr (D > 0) {
      if (lane == 0 && col + D * warps < n) {
        sm90::BulkPrefetchL2(w + static_cast<size_t>(col + D * warps) * K, K * 2);
      }
    }
    uint4 r[KC];
    LoadRow<KC>(w, col, lane, r);
    DotRow<KC>(r, sx, lane, col, y);
  }
}

// LightGemv with two weight rows in flight a warp: the next column's loads go out before the
// current column's products, so a warp's stream has no gap while it computes (184 registers: one
// block an SM).
template <int KC>
__global__ void __launch_bounds__(256)
    LightGemv2(const __nv_bfloat16* w, const __nv_bfloat16* x, __nv_bfloat16* y, int n) {
  constexpr int K = 256 * KC;
  __shared__ __align__(16) __nv_bfloat16 sx[K];
  StageX<K>(x, sx);
  const int lane = threadIdx.x & 31;
  const int W = gridDim.x * 8;
  const int c0 = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (c0 >= n) return;
  uint4 a[KC], b[KC];
  LoadRow<KC>(w, c0, lane, a);
  for (int c = c0; c < n; c += 2 * W) {
    if (c + W < n) LoadRow<KC>(w, c + W, lane, b);
    DotRow<KC>(a, sx, lane, c, y);
    if (c + W >= n) break;
    if (c + 2 * W < n) LoadRow<KC>(w, c + 2 * W, lane, a);
    DotRow<KC>(b, sx, lane, c + W, y);
  }
}

float ElapsedMs(cudaEvent_t a, cudaEvent_t b) { return ElapsedMsOrDie(a, b, kProg); }

int Main(int argc, char** argv) {
  const int ctx = argc > 1 ? std::atoi(argv[1]) : 1024;
  const int heads = 32;
  cudaStream_t fg, bg;
  ALP_CHECK(cudaStreamCreateWithFlags(&fg, cudaStreamNonBlocking));
  ALP_CHECK(cudaStreamCreateWithFlags(&bg, cudaStreamNonBlocking));
  DecodeAttentionInputs in = MakeDecodeAttentionInputs(1, ctx, heads, kHd, kBs, fg, kProg);
  const PagedAttentionParams& p = in.p;
  int32_t* counters = static_cast<int32_t*>(DeviceAllocOrDie(4 * 4096, kProg));
  ALP_CHECK(cudaMemset(counters, 0, 4 * 4096));
  float* partials =
      static_cast<float*>(DeviceAllocOrDie(sizeof(float) * heads * 64 * (kHd + 2), kProg));
  __nv_bfloat16* out2 = static_cast<__nv_bfloat16*>(DeviceAllocOrDie(2 * heads * kHd, kProg));
  const size_t bg_bytes = size_t{4} << 30;
  void* bg_buf = DeviceAllocOrDie(bg_bytes, kProg);
  RandomFillOrDie(bg_buf, bg_bytes / 2, 77, DataType::kBF16, fg, kProg);
  uint32_t* sink = static_cast<uint32_t*>(DeviceAllocOrDie(64, kProg));
  ALP_CHECK(cudaDeviceSynchronize());

  const PagedDecodeCudaPlan plan{.workspace = in.workspace,
                                 .workspace_bytes = in.workspace_bytes,
                                 .num_multiprocessors = 132,
                                 .merge_counters = counters + 2048,
                                 .merge_counters_len = 2048};
  auto lib = [&] {
    if (PagedDecodeCuda(p, plan, fg) != KernelStatus::kOk) {
      std::fprintf(stderr, "%s: PagedDecodeCuda failed\n", kProg);
      std::exit(1);
    }
  };
  const OneShotArgs oa{.q = static_cast<const __nv_bfloat16*>(p.q),
                       .k = static_cast<const __nv_bfloat16*>(p.k_cache),
                       .v = static_cast<const __nv_bfloat16*>(p.v_cache),
                       .out = out2,
                       .ctx_lens = p.context_lens,
                       .table = p.block_tables,
                       .max_blocks = p.max_blocks_per_seq,
                       .heads = heads,
                       .scale_log2 = p.scale * 1.4426950408889634f,
                       .partials = partials,
                       .counters = counters,
                       .stamps = nullptr};
  unsigned long long* stamps = static_cast<unsigned long long*>(DeviceAllocOrDie(64, kProg));
  auto oneshot = [&](auto keys_tag, bool stamped = false) {
    constexpr int KEYS = decltype(keys_tag)::value;
    const int smem = 2 * KEYS * kHd * 2 + KEYS * 4;
    static bool set = false;
    if (!set) {
      ALP_CHECK(cudaFuncSetAttribute(OneShotAttn<KEYS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     smem));
      set = true;
    }
    OneShotArgs args = oa;
    if (stamped) args.stamps = stamps;
    return [=] {
      const dim3 grid(heads, (ctx + KEYS - 1) / KEYS);
      OneShotAttn<KEYS><<<grid, kThreads, smem, fg>>>(args);
    };
  };
  struct Case {
    const char* name;
    std::function<void()> launch;
  };
  const std::vector<Case> cases = {
      {"library (kAuto, in-kernel merge)", lib},
      {"one-shot 64 keys a block", oneshot(std::integral_constant<int, 64>{})},
      {"one-shot 128 keys a block", oneshot(std::integral_constant<int, 128>{})},
      {"one-shot 256 keys a block", oneshot(std::integral_constant<int, 256>{})}};

  // The one-shot output against the library's (bf16 roundings of the same softmax).
  lib();
  ALP_CHECK(cudaStreamSynchronize(fg));
  std::vector<__nv_bfloat16> ref(heads * kHd), got(heads * kHd);
  ALP_CHECK(cudaMemcpy(ref.data(), p.out, ref.size() * 2, cudaMemcpyDeviceToHost));
  for (size_t c = 1; c < cases.size(); ++c) {
    ALP_CHECK(cudaMemset(out2, 0xff, 2 * heads * kHd));
    cases[c].launch();
    ALP_CHECK(cudaStreamSynchronize(fg));
    ALP_CHECK(cudaGetLastError());
    ALP_CHECK(cudaMemcpy(got.data(), out2, got.size() * 2, cudaMemcpyDeviceToHost));
    double max_diff = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double d =
          std::fabs(static_cast<double>(__bfloat162float(got[i])) - __bfloat162float(ref[i]));
      max_diff = std::isfinite(d) ? std::max(max_diff, d) : INFINITY;
    }
    std::printf("check %-34s max |out - library| = %.3g\n", cases[c].name, max_diff);
  }

  cudaEvent_t e0, e1, b0, b1;
  ALP_CHECK(cudaEventCreate(&e0));
  ALP_CHECK(cudaEventCreate(&e1));
  ALP_CHECK(cudaEventCreate(&b0));
  ALP_CHECK(cudaEventCreate(&b1));
  const size_t n_vec = bg_bytes / 16;
  constexpr int kLaunches = 400;
  // Mean us a launch of c: 20 warm-up launches, then kLaunches between two events.
  auto time_case = [&](const Case& c) {
    for (int i = 0; i < 20; ++i) c.launch();
    ALP_CHECK(cudaEventRecord(e0, fg));
    for (int i = 0; i < kLaunches; ++i) c.launch();
    ALP_CHECK(cudaEventRecord(e1, fg));
    ALP_CHECK(cudaDeviceSynchronize());
    ALP_CHECK(cudaGetLastError());
    return ElapsedMs(e0, e1) * 1e3 / kLaunches;
  };
  // One row: c alone, then beside stream(units) started first on bg, `units` = units_for(the alone
  // time) so that it outlasts the launches; the stream's GB/s over its run (bytes_per_unit each).
  auto alone_and_beside = [&](const Case& c, const char* name,
                              const std::function<int(double)>& units_for,
                              const std::function<void(int)>& stream, double bytes_per_unit) {
    const double alone_us = time_case(c);
    const int units = units_for(alone_us);
    ALP_CHECK(cudaEventRecord(b0, bg));
    stream(units);
    ALP_CHECK(cudaEventRecord(b1, bg));
    ALP_CHECK(cudaStreamWaitEvent(fg, b0));
    const double beside_us = time_case(c);
    const double gbps = units * bytes_per_unit / (ElapsedMs(b0, b1) * 1e-3) / 1e9;
    std::printf("%-34s %10.2f %10.2f %7.2f %14.0f\n", name, alone_us, beside_us,
                beside_us / alone_us, gbps);
  };
  // A stream's GB/s alone: `units` of it after one to warm up.
  auto stream_alone = [&](const std::function<void(int)>& stream, int units,
                          double bytes_per_unit) {
    stream(1);
    ALP_CHECK(cudaEventRecord(b0, bg));
    stream(units);
    ALP_CHECK(cudaEventRecord(b1, bg));
    ALP_CHECK(cudaStreamSynchronize(bg));
    return units * bytes_per_unit / (ElapsedMs(b0, b1) * 1e-3) / 1e9;
  };
  const double buf_bytes = static_cast<double>(bg_bytes);

  // 1: the light read stream.
  const std::function<void(int)> background = [&](int passes) {
    ReadStream<8><<<132, 256, 0, bg>>>(static_cast<const uint4*>(bg_buf), n_vec, passes, sink);
  };
  const double bg_gbps = stream_alone(background, 8, buf_bytes);
  std::printf("background read alone: %.0f GB/s\n", bg_gbps);
  std::printf("%-34s %10s %10s %7s %14s\n", "kernel (ctx, 1 sequence, 32 x 80)", "alone us",
              "beside us", "ratio", "background GB/s");
  for (const Case& c : cases) {
    alone_and_beside(
        c, c.name,
        [&](double us) {
          return std::max(4, static_cast<int>(us * kLaunches * 3e3 * bg_gbps / buf_bytes) + 2);
        },
        background, buf_bytes);
  }
  // 2: a stream holding N whole SMs, the attention on the other 132 - N (what a b1 step could do
  // with GEMVs that leave SMs free).
  ALP_CHECK(
      cudaFuncSetAttribute(ReadStream<16>, cudaFuncAttributeMaxDynamicSharedMemorySize, kHoldSmem));
  std::printf("%-34s %10s %10s %7s %14s\n", "stream on N SMs; attention beside", "alone us",
              "beside us", "ratio", "stream GB/s");
  for (int n_sms : {132, 116, 100, 84, 68}) {
    const std::function<void(int)> holding = [&, n_sms](int passes) {
      ReadStream<16>
          <<<n_sms, 512, kHoldSmem, bg>>>(static_cast<const uint4*>(bg_buf), n_vec, passes, sink);
    };
    const double hold_gbps = stream_alone(holding, 4, buf_bytes);
    std::printf("stream on %3d SMs alone %*s %14.0f\n", n_sms, 40, "", hold_gbps);
    if (n_sms >= 132) continue;  // no SM left for the attention
    for (const Case& c : cases) {
      char name[64];
      std::snprintf(name, sizeof(name), "%s, %d SMs", c.name, 132 - n_sms);
      alone_and_beside(
          c, name,
          [&](double us) {
            return std::max(4, static_cast<int>(us * kLaunches * 4e3 * hold_gbps / buf_bytes) + 2);
          },
          holding, buf_bytes);
    }
  }

  // Beside the bulk GEMV (kernels/cuda/gemv_bulk.cu) streaming a 1-row fc1 (10240 x 2560 + GELU,
  // Phi-2's) back to back: a real weight stream whose blocks leave room on their SMs, at 1 or 2
  // blocks an SM (GemvParams::bulk_*: blocks an SM, stage KiB, stages).
  {
    const int gn = 10240, gk = 2560;
    // kCopies distinct weight copies, launch i reading copy i % kCopies: 420 MB, so no launch finds
    // the one before's weights in the 50 MB L2 (one copy back to back did: 52 MB).
    constexpr int kCopies = 8;
    const size_t wbytes = size_t{2} * gn * gk;
    char* gw = static_cast<char*>(DeviceAllocOrDie(wbytes * kCopies, kProg));
    void* gx = DeviceAllocOrDie(size_t{2} * gk, kProg);
    void* gb = DeviceAllocOrDie(size_t{2} * gn, kProg);
    void* gy = DeviceAllocOrDie(size_t{2} * gn, kProg);
    RandomFillOrDie(gw, size_t{gn} * gk * kCopies, 41, DataType::kBF16, fg, kProg, 0.05f);
    RandomFillOrDie(gx, gk, 42, DataType::kBF16, fg, kProg);
    RandomFillOrDie(gb, gn, 43, DataType::kBF16, fg, kProg);
    ALP_CHECK(cudaDeviceSynchronize());
    struct GemvForm {
      int blocks_per_sm, stage_kb, stages, ahead = 0;  // ahead: LightGemv's D (-1: LightGemv2)
    };
    std::printf("%-34s %10s %10s %7s %14s\n", "fc1 GEMV (form bpsm.kb.stages.D)", "alone us",
                "beside us", "ratio", "GEMV GB/s");
    // The light GEMV (LightGemv, K = 2560) at 1, 2 and 3 blocks an SM first (form {-B, 0, 0}).
    // Then LightGemv with D rows a warp asked into L2 ahead (form {-B, 0, 0, D}).
    for (const GemvForm& f :
         {GemvForm{-1, 0, 0}, GemvForm{-3, 0, 0}, GemvForm{2, 48, 2}, GemvForm{-1, 0, 0, 1},
          GemvForm{-1, 0, 0, 2}, GemvForm{-1, 0, 0, 4}, GemvForm{-1, 0, 0, 8},
          GemvForm{-2, 0, 0, 2}, GemvForm{-2, 0, 0, 4}, GemvForm{-4, 0, 0}, GemvForm{-5, 0, 0},
          GemvForm{-6, 0, 0}, GemvForm{-8, 0, 0}, GemvForm{-1, 0, 0, -1}}) {
      GemvParams gp{.a = GemmParams{.x = gx,
                                    .w = gw,
                                    .bias = gb,
                                    .y = gy,
                                    .m = 1,
                                    .n = gn,
                                    .k = gk,
                                    .epilogue = GemmEpilogue::kGeluTanh,
                                    .dtype = DataType::kBF16},
                    .y_dtype = DataType::kBF16,
                    .bulk = true,
                    .bulk_stage_kb = f.stage_kb,
                    .bulk_stages = f.stages,
                    .bulk_blocks_per_sm = f.blocks_per_sm};
      const bool light = f.blocks_per_sm < 0;
      if (!light && !GemvCudaSupports(gp)) {
        std::printf("bulk GEMV %d.%d.%d: not supported here\n", f.blocks_per_sm, f.stage_kb,
                    f.stages);
        continue;
      }
      int launch = 0;
      const std::function<void(int)> gemv = [&](int times) {
        for (int i = 0; i < times; ++i) {
          char* const wi = gw + wbytes * (launch++ % kCopies);
          gp.a.w = wi;
          if (light) {
            auto* k = f.ahead < 0    ? LightGemv2<10>
                      : f.ahead == 0 ? LightGemv<10, 0>
                      : f.ahead == 1 ? LightGemv<10, 1>
                      : f.ahead == 2 ? LightGemv<10, 2>
                      : f.ahead == 4 ? LightGemv<10, 4>
                                     : LightGemv<10, 8>;
            k<<<132 * -f.blocks_per_sm, 256, 0, bg>>>(reinterpret_cast<const __nv_bfloat16*>(wi),
                                                      static_cast<const __nv_bfloat16*>(gx),
                                                      static_cast<__nv_bfloat16*>(gy), gn);
          } else if (GemvCuda(gp, bg) != KernelStatus::kOk) {
            std::fprintf(stderr, "%s: GemvCuda failed\n", kProg);
            std::exit(1);
          }
        }
      };
      const double gemv_bytes = 2.0 * gn * gk;
      const double gemv_gbps = stream_alone(gemv, 200, gemv_bytes);
      const double gemv_us = gemv_bytes / (gemv_gbps * 1e9) * 1e6;
      // Forms: blocks an SM < 0 LightGemv (D = ahead; -1: LightGemv2), else the bulk GEMV.
      const char* kind = !light ? "bulk GEMV" : f.ahead < 0 ? "LightGemv2" : "LightGemv";
      std::printf("%s %d.%d.%d.%d alone: %.2f us a launch, %.0f GB/s\n", kind, f.blocks_per_sm,
                  f.stage_kb, f.stages, f.ahead, gemv_us, gemv_gbps);
      for (const Case& c : cases) {
        char name[80];
        std::snprintf(name, sizeof(name), "%s, GEMV %d.%d.%d.%d", c.name, f.blocks_per_sm,
                      f.stage_kb, f.stages, f.ahead);
        alone_and_beside(
            c, name, [&](double us) { return static_cast<int>(us * kLaunches * 3 / gemv_us) + 20; },
            gemv, gemv_bytes);
      }
    }
  }

  // The one-shot chain taken apart beside the background: start -> every block's K/V landed ->
  // the last merge stored (the part a launch made ahead of q, as a programmatic dependent of the
  // qkv GEMV, would still pay), mean over 100 single launches.
  const std::vector<std::pair<const char*, std::function<void()>>> stamped = {
      {"one-shot 64", oneshot(std::integral_constant<int, 64>{}, true)},
      {"one-shot 128", oneshot(std::integral_constant<int, 128>{}, true)},
      {"one-shot 256", oneshot(std::integral_constant<int, 256>{}, true)}};
  for (const auto& [name, launch] : stamped) {
    for (int beside = 0; beside < 2; ++beside) {
      if (beside) background(40);
      double load = 0, rest = 0;
      constexpr int kN = 100;
      for (int i = 0; i < kN; ++i) {
        unsigned long long init[3] = {~0ull, 0, 0}, got_st[3];
        ALP_CHECK(cudaMemcpyAsync(stamps, init, sizeof(init), cudaMemcpyHostToDevice, fg));
        launch();
        ALP_CHECK(cudaMemcpyAsync(got_st, stamps, sizeof(got_st), cudaMemcpyDeviceToHost, fg));
        ALP_CHECK(cudaStreamSynchronize(fg));
        load += (got_st[1] - got_st[0]) * 1e-3;
        rest += (got_st[2] - got_st[1]) * 1e-3;
      }
      ALP_CHECK(cudaDeviceSynchronize());
      std::printf("chain %-14s %-7s start -> K/V landed %6.2f us, -> merged %6.2f us\n", name,
                  beside ? "beside" : "alone", load / kN, rest / kN);
    }
  }
  in.Free();
  return 0;
}

}  // namespace
}  // namespace phishard::bench

int main(int argc, char** argv) { return phishard::bench::Main(argc, argv); }
