// The 1-row decode layer as one weight stream: kernels/cuda/decode_stream_cuda.h says what it
// computes and how its blocks synchronise; docs/decode-stream-design.md why.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/decode_stream_cuda.h"
#include "kernels/cuda/gelu_math.cuh"
#include "kernels/cuda/sm90_ptx.cuh"
#include "kernels/cuda/spin_wait.cuh"
#include "kernels/cuda/stream_stage.cuh"

namespace phishard {
namespace {

using cuda::AddOnGrid;
using cuda::Axpy;
using cuda::FromFloat;
using cuda::GridMagic;
using cuda::ToFloat;
using cuda::WarpDot;
using cuda::WarpSum;
using cuda::Word2ToFloat2;

constexpr int kMaxStages = 8;
constexpr int kBarrierBytes = 128;  // 2 kMaxStages mbarriers, then the ring (16-byte aligned)

struct StreamShape {
  int q_chunks, m_chunks, d_chunks;  // items of each kind (R rows each)
  int attn_heads;
  bool attn_smem;      // DecodeStreamParams::dense_attn_in_smem (and nH hd == K)
  bool one_in_flight;  // DecodeStreamParams::one_in_flight
  bool poll_attn;      // DecodeStreamParams::dense_poll_attn
  float eps;
  bool gelu_erf;
};

// Dynamic shared memory of a block: barriers, ring [S, R, K], x [K], stage biases [S, R], the MLP
// chunk's activations [2, R], reduction scratch [64], the stages' items [S].
constexpr size_t StreamSmemBytes(int kc, int stages, size_t elem) {
  const size_t k = 256 * static_cast<size_t>(kc);
  return kBarrierBytes + stages * kc * k * elem + k * elem + 4 * (stages * kc + 2 * kc + 64) +
         4 * stages;
}

// DecodeStreamLayer::timeline: the calling thread stamps event e of its block's row.
__device__ __forceinline__ void Stamp(const DecodeStreamLayer& a, int e) {
  if (a.timeline != nullptr && static_cast<int>(blockIdx.x) < a.timeline_blocks) {
    a.timeline[blockIdx.x * kDecodeStreamTimelineEvents + e] = cuda::GlobalTimerNs();
  }
}

// Named barrier 1 over the consumer warps (the producer warp never joins it).
__device__ __forceinline__ void ConsumerSync(int threads) {
  asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}

// The fold of columns 8t .. 8t + 8: dtype(((h + ((S0 + S1) + S2) + S3) + b_dense) + b_fc2), or h
// alone without sums. The same float operations in the layer kernel and DecodeStreamFoldCuda.
template <typename T>
__device__ __forceinline__ void FoldColumns(const T* h_in, const float* sums, const T* dense_b,
                                            const T* fc2_b, int hidden, int t, float (&v)[8]) {
  const uint4 hv = __ldcg(reinterpret_cast<const uint4*>(h_in) + t);
  const uint32_t ha[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 f = Word2ToFloat2<T>(ha[e]);
    v[2 * e] = f.x;
    v[2 * e + 1] = f.y;
  }
  if (sums == nullptr) return;
  float s[8] = {};
#pragma unroll
  for (int c = 0; c < kDecodeStreamCopies; ++c) {
    const float4* src = reinterpret_cast<const float4*>(sums + static_cast<size_t>(c) * hidden);
    const float4 p0 = __ldcg(src + 2 * t), p1 = __ldcg(src + 2 * t + 1);
    s[0] += p0.x, s[1] += p0.y, s[2] += p0.z, s[3] += p0.w;
    s[4] += p1.x, s[5] += p1.y, s[6] += p1.z, s[7] += p1.w;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float x = v[e] + s[e];
    if (dense_b != nullptr) x += ToFloat(dense_b[8 * t + e]);
    if (fc2_b != nullptr) x += ToFloat(fc2_b[8 * t + e]);
    v[e] = ToFloat(FromFloat<T>(x));
  }
}

// The consumers' start of a layer: wait for the layer before, fold h, write it (block 0), the
// LayerNorm of it into sx, and each column's grid constant (GridMagic of max(|h_c|, rms(h))).
template <typename T, int KC>
__device__ __forceinline__ void FoldAndNorm(const DecodeStreamLayer& a, float eps, T* sx,
                                            float* sred, int tid, float (&magic)[8]) {
  constexpr int K = 256 * KC, kConsumers = 32 * KC;
  const int warp = tid >> 5, lane = tid & 31;
  if (a.prev_counters != nullptr && tid == 0) {
    cuda::SpinUntilAtLeast(a.prev_counters + kStreamBlocksDone, static_cast<int>(gridDim.x));
  }
  ConsumerSync(kConsumers);
  float v[8];
  FoldColumns<T>(static_cast<const T*>(a.h_in), a.sums_in, static_cast<const T*>(a.prev_dense_b),
                 static_cast<const T*>(a.prev_fc2_b), K, tid, v);
  float sum = 0.0f;
#pragma unroll
  for (int e = 0; e < 8; ++e) sum += v[e];
  sum = WarpSum(sum);
  if (lane == 0) sred[warp] = sum;
  ConsumerSync(kConsumers);
  float mean = 0.0f;
  for (int w = 0; w < KC; ++w) mean += sred[w];
  mean /= K;
  float sq = 0.0f;
#pragma unroll
  for (int e = 0; e < 8; ++e) sq += (v[e] - mean) * (v[e] - mean);
  sq = WarpSum(sq);
  if (lane == 0) sred[32 + warp] = sq;
  ConsumerSync(kConsumers);
  float var = 0.0f;
  for (int w = 0; w < KC; ++w) var += sred[32 + w];
  var /= K;
  const float rstd = rsqrtf(var + eps);
  const float rms = sqrtf(var + mean * mean);
  const T* w = static_cast<const T*>(a.ln_w);
  const T* b = static_cast<const T*>(a.ln_b);
  alignas(16) T x[8];
  alignas(16) T hn[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    magic[e] = GridMagic(fmaxf(fabsf(v[e]), rms));
    x[e] = FromFloat<T>((v[e] - mean) * rstd * ToFloat(w[8 * tid + e]) + ToFloat(b[8 * tid + e]));
    hn[e] = FromFloat<T>(v[e]);
  }
  reinterpret_cast<uint4*>(sx)[tid] = *reinterpret_cast<const uint4*>(x);
  if (blockIdx.x == 0 && a.h_out != nullptr && a.h_out != a.h_in) {
    reinterpret_cast<uint4*>(a.h_out)[tid] = *reinterpret_cast<const uint4*>(hn);
  }
  if (blockIdx.x == 0 && a.rearm_attn != nullptr) {  // every reader of it is done (the wait)
    reinterpret_cast<uint4*>(a.rearm_attn)[tid] = make_uint4(~0u, ~0u, ~0u, ~0u);
  }
  ConsumerSync(kConsumers);
}

// DecodeStreamParams::dense_poll_attn: whether any 16-bit element of v is the sentinel.
__device__ __forceinline__ bool HasSentinel(const uint4& v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  bool any = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) any |= (w[i] & 0xFFFFu) == 0xFFFFu || (w[i] >> 16) == 0xFFFFu;
  return any;
}

// Re-reads 16 bytes (through L2, a volatile load each round) until no element is the sentinel
// (cuda::SpinUntil: a trap after ~10 s; the attention writing them runs beside).
__device__ __forceinline__ uint4 WaitNoSentinel(const void* p) {
  uint4 v;
  cuda::SpinUntil([&] {
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return !HasSentinel(v);
  });
  return v;
}

enum ItemKind { kItemQkv, kItemMlp, kItemDense, kItemEnd };

__device__ __forceinline__ ItemKind Classify(const StreamShape& sh, int& idx) {
  if (idx < sh.q_chunks) return kItemQkv;
  idx -= sh.q_chunks;
  if (idx < sh.m_chunks) return kItemMlp;
  idx -= sh.m_chunks;
  if (idx < sh.d_chunks) return kItemDense;
  return kItemEnd;
}

// One layer. Warps 0 .. KC - 1 consume, warp KC produces (see the header).
template <typename T, int KC>
__global__ void __launch_bounds__(32 * KC + 32, 1)
    DecodeStreamKernel(const DecodeStreamLayer a, const StreamShape sh, int S) {
  constexpr int K = 256 * KC, R = KC, kConsumers = 32 * KC;
  constexpr uint32_t kStageBytes = R * K * sizeof(T);
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);    // [S]
  uint64_t* empty = full + kMaxStages;                   // [S]
  T* ring = reinterpret_cast<T*>(smem + kBarrierBytes);  // [S, R, K]
  T* sx = ring + static_cast<size_t>(S) * R * K;         // [K]
  float* sb = reinterpret_cast<float*>(sx + K);          // [S, R]
  float* sg = sb + S * R;                                // [2, R]
  float* sred = sg + 2 * R;                              // [64]
  int* item_of = reinterpret_cast<int*>(sred + 64);      // [S]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (tid == 0) Stamp(a, kTlStart);
  if (tid == 0) {
    // Every thread that writes or reads a stage's shared memory arrives itself (an arrive
    // releases only the arriving thread's own accesses): the producer's R bias lanes on `full`
    // (after lane 0 has added the bulk copy's bytes to it), every consumer thread on `empty`.
    for (int s = 0; s < S; ++s) {
      sm90::MbarInit(&full[s], R);
      sm90::MbarInit(&empty[s], kConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == KC) {  // producer: weights never depend on the layer before, so no wait here
    const T* qkv_w = static_cast<const T*>(a.qkv_w);
    const T* qkv_b = static_cast<const T*>(a.qkv_b);
    const T* fc1_w = static_cast<const T*>(a.fc1_w);
    const T* fc1_b = static_cast<const T*>(a.fc1_b);
    const T* fc2_wt = static_cast<const T*>(a.fc2_wt);
    const T* dense_wt = static_cast<const T*>(a.dense_wt);
    int it = 0;
    for (;;) {
      int item = 0;
      if (lane == 0) item = atomicAdd(a.counters + kStreamNext, 1);
      item = __shfl_sync(0xffffffffu, item, 0);
      int idx = item;
      const ItemKind kind = Classify(sh, idx);
      const int stages_of = kind == kItemMlp ? 2 : 1;
      for (int half = 0; half < stages_of; ++half, ++it) {
        const int s = it % S;
        if (it >= S) sm90::MbarWait(&empty[s], ((it / S) & 1) ^ 1);
        // DecodeStreamParams::one_in_flight: the copy before this one has landed.
        if (sh.one_in_flight && it >= 1) sm90::MbarWait(&full[(it - 1) % S], ((it - 1) / S) & 1);
        if (kind == kItemEnd) {  // this block's end of the layer
          if (lane == 0) {
            item_of[s] = -1;
            Stamp(a, kTlProducerEnd);
          }
          if (lane < R) sm90::MbarArrive(&full[s]);
          continue;
        }
        const size_t off = static_cast<size_t>(idx) * R * K;
        const T* src = kind == kItemQkv     ? qkv_w + off
                       : kind == kItemDense ? dense_wt + off
                       : half == 0          ? fc1_w + off
                                            : fc2_wt + off;
        const T* bias = kind == kItemQkv ? qkv_b : kind == kItemMlp && half == 0 ? fc1_b : nullptr;
        if (lane == 0) {  // the copy first (its bytes counted, no arrival yet): the bias loads'
                          // latency must not delay it
          item_of[s] = item;
          sm90::MbarExpectTxOnly(&full[s], kStageBytes);
          sm90::BulkLoad(ring + static_cast<size_t>(s) * R * K, src, kStageBytes, &full[s]);
        }
        if (lane < R) {
          sb[s * R + lane] = a.head_bias != nullptr ? a.head_bias[idx * R + lane]
                             : bias != nullptr      ? ToFloat(bias[idx * R + lane])
                                                    : 0.0f;
          sm90::MbarArrive(&full[s]);
        }
      }
      if (kind == kItemEnd) break;
    }
    return;
  }

  float magic[8];
  FoldAndNorm<T, KC>(a, sh.eps, sx, sred, tid, magic);
  if (tid == 0) Stamp(a, kTlFolded);
  T* qkv = static_cast<T*>(a.qkv);
  const T* attn = static_cast<const T*>(a.attn);
  float acc[8] = {};
  int it = 0, ci = 0, qkv_unsignalled = 0;
  bool attn_ready = sh.attn_heads == 0 && !sh.poll_attn;
  for (;;) {
    int s = it % S;
    sm90::MbarWait(&full[s], (it / S) & 1);
    int idx = item_of[s];
    const ItemKind kind = idx < 0 ? kItemEnd : Classify(sh, idx);
    if (kind != kItemQkv && qkv_unsignalled > 0) {  // this block's q/k/v rows out: release them
      ConsumerSync(kConsumers);
      if (tid == 0) {
        __threadfence();
        atomicAdd(a.counters + kStreamQkvDone, qkv_unsignalled);
        Stamp(a, kTlQkvOut);
      }
      qkv_unsignalled = 0;
    }
    const T* rows = ring + static_cast<size_t>(s) * R * K;
    if (kind == kItemEnd) {
      sm90::MbarArrive(&empty[s]);
      if (tid == 0) Stamp(a, kTlItemsDone);
      break;
    }
    if (kind == kItemQkv) {
      const float d = WarpDot<KC>(rows + warp * K, sx, lane) + sb[s * R + warp];
      sm90::MbarArrive(&empty[s]);
      if (lane == 0) {
        if (a.logits != nullptr) {  // the LM head form: float32 logits
          a.logits[idx * R + warp] = d;
          if (a.logits_host != nullptr) a.logits_host[idx * R + warp] = d;
        } else {
          qkv[idx * R + warp] = FromFloat<T>(d);
        }
      }
      ++qkv_unsignalled;
      ++it;
    } else if (kind == kItemMlp) {
      const float d = WarpDot<KC>(rows + warp * K, sx, lane) + sb[s * R + warp];
      sm90::MbarArrive(&empty[s]);
      if (lane == 0) {
        const float g = sh.gelu_erf ? cuda::GeluErf(d) : cuda::GeluTanh(d);
        sg[(ci & 1) * R + warp] = ToFloat(FromFloat<T>(g));
      }
      ++it;
      s = it % S;
      sm90::MbarWait(&full[s], (it / S) & 1);
      ConsumerSync(kConsumers);  // every warp's activation of the chunk
      float t[8] = {};
      Axpy<R, K>(ring + static_cast<size_t>(s) * R * K, sg + (ci & 1) * R, tid, t);
      AddOnGrid(acc, t, magic);
      sm90::MbarArrive(&empty[s]);
      ++it;
      ++ci;
    } else {  // dense: R rows of dense's transposed weight times the attention output
      if (!attn_ready && sh.poll_attn) {
        // The output itself, into sx: no warp reads sx any more (every warp passed the barrier
        // after its last MLP chunk's fc1 dot, or the q/k/v publish barrier), so each thread
        // stores its 16 bytes as soon as they are in; the barrier after hands them to all.
        if (tid == 0) Stamp(a, kTlDenseWait);
        reinterpret_cast<uint4*>(sx)[tid] =
            WaitNoSentinel(reinterpret_cast<const uint4*>(attn) + tid);
        ConsumerSync(kConsumers);
        if (tid == 0) Stamp(a, kTlDenseGo);
        attn_ready = true;
      }
      if (!attn_ready) {
        if (tid == 0) {
          Stamp(a, kTlDenseWait);
          cuda::SpinUntilAtLeast(a.counters + kStreamHeadsDone, sh.attn_heads);
          Stamp(a, kTlDenseGo);
        }
        ConsumerSync(kConsumers);
        if (sh.attn_smem) {  // the whole output into sx (no q/k/v or MLP item reads it now)
          reinterpret_cast<uint4*>(sx)[tid] = __ldcg(reinterpret_cast<const uint4*>(attn) + tid);
          ConsumerSync(kConsumers);
        }
        attn_ready = true;
      }
      float g[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        g[r] = ToFloat(sh.attn_smem || sh.poll_attn ? sx[idx * R + r] : __ldcg(attn + idx * R + r));
      }
      float t[8] = {};
      Axpy<R, K>(rows, g, tid, t);
      AddOnGrid(acc, t, magic);
      sm90::MbarArrive(&empty[s]);
      ++it;
    }
  }
  if (sh.m_chunks + sh.d_chunks > 0) {  // (the LM head form has no partial S)
    float4* o = reinterpret_cast<float4*>(
                    a.sums + static_cast<size_t>(blockIdx.x % kDecodeStreamCopies) * K) +
                2 * tid;
    atomicAdd(o, make_float4(acc[0], acc[1], acc[2], acc[3]));
    atomicAdd(o + 1, make_float4(acc[4], acc[5], acc[6], acc[7]));
  }
  ConsumerSync(kConsumers);
  if (tid == 0) {
    __threadfence();
    Stamp(a, kTlFlushed);  // before the count: the next layer's fold follows it
    atomicAdd(a.counters + kStreamBlocksDone, 1);
  }
}

template <typename T>
__global__ void DecodeStreamFoldKernel(const DecodeStreamFoldParams p) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= p.hidden / 8) return;
  float v[8];
  FoldColumns<T>(static_cast<const T*>(p.h_in), p.sums, static_cast<const T*>(p.dense_b),
                 static_cast<const T*>(p.fc2_b), p.hidden, t, v);
  alignas(16) T hn[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) hn[e] = FromFloat<T>(v[e]);
  reinterpret_cast<uint4*>(p.h_out)[t] = *reinterpret_cast<const uint4*>(hn);
  if (p.rearm_attn != nullptr) {
    reinterpret_cast<uint4*>(p.rearm_attn)[t] = make_uint4(~0u, ~0u, ~0u, ~0u);
  }
}

// 32 x 32 tiles through shared memory (a padded row: no bank conflicts), 32 x 8 threads.
template <typename T>
__global__ void TransposeKernel(const T* __restrict__ src, int rows, int cols,
                                T* __restrict__ dst) {
  __shared__ T tile[32][33];
  const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = src[static_cast<size_t>(r) * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) dst[static_cast<size_t>(c) * rows + r] = tile[threadIdx.x][i];
  }
}

// The concurrency probe (DecodeStreamCudaConcurrencyProbe): every block waits for the dependent's
// flag (scratch[0]) up to ~200 ms and counts a give-up into scratch[1].
__global__ void ProbeWaiterKernel(int* scratch) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (threadIdx.x != 0) return;
  const uint64_t start = cuda::GlobalTimerNs();
  while (cuda::LoadAcquireGpu(scratch) == 0) {
    __nanosleep(256);
    if (cuda::GlobalTimerNs() - start > 200000000ull) {
      atomicAdd(scratch + 1, 1);
      return;
    }
  }
}

__global__ void ProbeSetterKernel(int* scratch) {
  if (threadIdx.x == 0) atomicExch(scratch, 1);
}

int StreamKc(int hidden) {
  if (hidden <= 0 || hidden % 256 != 0) return 0;
  const int kc = hidden / 256;
  return kc == 1 || kc == 2 || kc == 4 || kc == 8 || kc == 10 || kc == 12 ? kc : 0;
}

int Stages(const DecodeStreamParams& p) { return p.stages > 0 ? p.stages : 2; }

int MaxOptinSmem() {
  int dev = 0, smem = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    return 0;
  }
  return smem;
}

// Attributes once per instantiation and size (the largest so far): the dynamic shared memory,
// and the largest carveout — blocks of kernels whose carveouts differ never share an SM, and the
// attention kernel beside this one asks for the same (docs/decode-stream-design.md). The first
// call also loads the kernel (and the fold kernel of T).
template <typename T, int KC>
KernelStatus PrepareLayer(const DecodeStreamParams& p) {
  const size_t smem = StreamSmemBytes(KC, Stages(p), sizeof(T));
  static std::atomic<size_t> set_smem{0};
  if (smem > set_smem.load()) {
    if (cudaFuncSetAttribute(DecodeStreamKernel<T, KC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess ||
        cudaFuncSetAttribute(DecodeStreamKernel<T, KC>,
                             cudaFuncAttributePreferredSharedMemoryCarveout, 100) != cudaSuccess ||
        cuda::LoadKernels(DecodeStreamFoldKernel<T>) != KernelStatus::kOk) {
      return KernelStatus::kDeviceError;
    }
    set_smem.store(smem);
  }
  return KernelStatus::kOk;
}

template <typename T, int KC>
KernelStatus LaunchLayer(const DecodeStreamParams& p, cudaStream_t stream) {
  const int S = Stages(p);
  const size_t smem = StreamSmemBytes(KC, S, sizeof(T));
  if (KernelStatus st = PrepareLayer<T, KC>(p); st != KernelStatus::kOk) return st;
  int blocks = p.blocks;
  if (blocks <= 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&blocks, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      return KernelStatus::kDeviceError;
    }
  }
  const int R = KC, nq = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim;
  const bool head = p.head_vocab > 0;  // the LM head form: its rows only
  const StreamShape sh{head ? p.head_vocab / R : nq / R,
                       head ? 0 : p.intermediate / R,
                       head ? 0 : p.num_heads * p.head_dim / R,
                       p.attn_heads,
                       p.dense_attn_in_smem && p.num_heads * p.head_dim == p.hidden &&
                           reinterpret_cast<uintptr_t>(p.layer.attn) % 16 == 0,
                       p.one_in_flight,
                       p.dense_poll_attn,
                       p.eps,
                       p.act == GemmEpilogue::kGeluErf};
  return cuda::LaunchMaybeProgrammatic(DecodeStreamKernel<T, KC>, dim3(blocks), dim3(32 * KC + 32),
                                       smem, stream, p.programmatic_launch, p.layer, sh, S);
}

// f(std::integral_constant<int, KC>) for the instantiated KC of p.hidden, else kInvalidShape.
template <typename F>
KernelStatus DispatchKc(int hidden, F&& f) {
  switch (StreamKc(hidden)) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 10:
      return f(std::integral_constant<int, 10>{});
    case 12:
      return f(std::integral_constant<int, 12>{});
  }
  return KernelStatus::kInvalidShape;
}

}  // namespace

bool DecodeStreamCudaSupports(const DecodeStreamParams& p) {
  if (p.dtype != DataType::kBF16 && p.dtype != DataType::kF16) return false;
  const int kc = StreamKc(p.hidden);
  if (kc == 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.intermediate <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return false;
  }
  if (p.act != GemmEpilogue::kGeluTanh && p.act != GemmEpilogue::kGeluErf) return false;
  const int nq = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim;
  if (nq % kc != 0 || p.intermediate % kc != 0 || (p.num_heads * p.head_dim) % kc != 0) {
    return false;
  }
  const int S = Stages(p);
  if (S < 2 || S > kMaxStages || p.attn_heads < 0 || p.blocks < 0) return false;
  if (p.head_vocab < 0 || p.head_vocab % kc != 0) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      major < 9) {
    return false;
  }
  return StreamSmemBytes(kc, S, 2) <= static_cast<size_t>(MaxOptinSmem());
}

KernelStatus DecodeStreamLayerCuda(const DecodeStreamParams& p, cudaStream_t stream) {
  if (p.dtype != DataType::kBF16 && p.dtype != DataType::kF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (!DecodeStreamCudaSupports(p)) return KernelStatus::kInvalidShape;
  const DecodeStreamLayer& l = p.layer;
  if (p.head_vocab > 0) {  // the LM head form
    if (p.head_vocab % StreamKc(p.hidden) != 0 || p.attn_heads != 0) {
      return KernelStatus::kInvalidShape;
    }
    if (l.ln_w == nullptr || l.ln_b == nullptr || l.qkv_w == nullptr || l.h_in == nullptr ||
        l.logits == nullptr || l.counters == nullptr) {
      return KernelStatus::kNullPointer;
    }
    if (l.qkv_b != nullptr) return KernelStatus::kInvalidShape;  // (its bias: head_bias)
  } else if (l.ln_w == nullptr || l.ln_b == nullptr || l.qkv_w == nullptr || l.fc1_w == nullptr ||
             l.fc2_wt == nullptr || l.dense_wt == nullptr || l.h_in == nullptr ||
             l.qkv == nullptr || l.attn == nullptr || l.sums == nullptr || l.counters == nullptr) {
    return KernelStatus::kNullPointer;
  } else if (l.logits != nullptr || l.head_bias != nullptr || l.logits_host != nullptr) {
    return KernelStatus::kInvalidShape;  // the LM head form's operands without head_vocab
  }
  if (p.dense_poll_attn && (p.head_vocab > 0 || p.num_heads * p.head_dim != p.hidden ||
                            reinterpret_cast<uintptr_t>(l.attn) % 16 != 0 || p.attn_heads != 0)) {
    return KernelStatus::kInvalidShape;
  }
  if (l.rearm_attn != nullptr && (p.num_heads * p.head_dim != p.hidden ||
                                  reinterpret_cast<uintptr_t>(l.rearm_attn) % 16 != 0)) {
    return KernelStatus::kInvalidShape;
  }
  return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return DispatchKc(p.hidden,
                      [&](auto kc) { return LaunchLayer<T, decltype(kc)::value>(p, stream); });
  });
}

KernelStatus DecodeStreamCudaPrepare(const DecodeStreamParams& p) {
  if (!DecodeStreamCudaSupports(p)) return KernelStatus::kInvalidShape;
  return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return DispatchKc(p.hidden, [&](auto kc) { return PrepareLayer<T, decltype(kc)::value>(p); });
  });
}

KernelStatus DecodeStreamCudaConcurrencyProbe(const DecodeStreamParams& p, int* scratch,
                                              cudaStream_t stream, bool* concurrent) {
  *concurrent = false;
  if (!DecodeStreamCudaSupports(p)) return KernelStatus::kInvalidShape;
  if (scratch == nullptr) return KernelStatus::kNullPointer;
  int blocks = p.blocks, dev = 0;
  if (blocks <= 0 &&
      (cudaGetDevice(&dev) != cudaSuccess ||
       cudaDeviceGetAttribute(&blocks, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)) {
    return KernelStatus::kDeviceError;
  }
  const size_t smem = StreamSmemBytes(StreamKc(p.hidden), Stages(p), 2);
  // Loaded first: a first launch under lazy loading would wait for the waiters (a false "no").
  if (cuda::LoadKernels(ProbeWaiterKernel, ProbeSetterKernel) != KernelStatus::kOk ||
      cudaFuncSetAttribute(ProbeWaiterKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess ||
      cudaFuncSetAttribute(ProbeWaiterKernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           100) != cudaSuccess ||
      cudaMemsetAsync(scratch, 0, 2 * sizeof(int), stream) != cudaSuccess) {
    return KernelStatus::kDeviceError;
  }
  ProbeWaiterKernel<<<blocks, 32, smem, stream>>>(scratch);
  if (KernelStatus st = cuda::LaunchStatus(); st != KernelStatus::kOk) return st;
  if (KernelStatus st = cuda::LaunchMaybeProgrammatic(ProbeSetterKernel, dim3(1), dim3(32), 0,
                                                      stream, true, scratch);
      st != KernelStatus::kOk) {
    return st;
  }
  int gave_up = -1;
  if (cudaMemcpyAsync(&gave_up, scratch + 1, sizeof(int), cudaMemcpyDeviceToHost, stream) !=
          cudaSuccess ||
      cudaStreamSynchronize(stream) != cudaSuccess) {
    return KernelStatus::kDeviceError;
  }
  *concurrent = gave_up == 0;
  return KernelStatus::kOk;
}

KernelStatus DecodeStreamFoldCuda(const DecodeStreamFoldParams& p, cudaStream_t stream) {
  if (p.hidden <= 0 || p.hidden % 8 != 0) return KernelStatus::kInvalidShape;
  if (p.h_in == nullptr || p.sums == nullptr || p.h_out == nullptr) {
    return KernelStatus::kNullPointer;
  }
  return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = 128, blocks = cuda::CeilDiv(p.hidden / 8, threads);
    DecodeStreamFoldKernel<T><<<blocks, threads, 0, stream>>>(p);
    return cuda::LaunchStatus();
  });
}

KernelStatus DecodeStreamTransposeCuda(const void* src, int rows, int cols, void* dst,
                                       DataType dtype, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return KernelStatus::kInvalidShape;
  if (src == nullptr || dst == nullptr) return KernelStatus::kNullPointer;
  return cuda::DispatchHalfTypes(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(cuda::CeilDiv(cols, 32), cuda::CeilDiv(rows, 32));
    TransposeKernel<T><<<grid, dim3(32, 8), 0, stream>>>(static_cast<const T*>(src), rows, cols,
                                                         static_cast<T*>(dst));
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
