// The bulk GEMV (GemvParams::bulk, kernels/cuda/gemv_cuda.h): weight rows stream through a ring
// of shared-memory stages filled by Hopper bulk copies (cp.async.bulk + mbarrier), so each SM
// keeps up to stages x stage_bytes of weights in flight with no registers held, and the first
// stages are requested before griddepcontrol.wait when the kernel is launched as a programmatic
// dependent (weights never depend on the kernel before it).
//
// Grid: blocks_per_sm blocks per SM (never more than n). Block b owns the contiguous output
// columns [n*b/nb, n*(b+1)/nb) - so every block streams the same number of bytes, +-1 row - in
// stages of R columns (R a power of two); a stage holds R rows of w [R, k] then R rows of
// w2 [R, k2] (row-major, as in global memory, so each segment's stage is one bulk copy). Shared
// memory also holds x (all m rows, both segments), the block's bias sums and, accumulating, its
// old y values, so a stage's epilogue touches global memory only to store y. With ln_weight set
// the x rows are LayerNorm(x) rounded to the dtype, computed by every block after its wait.
// Inside a stage, warps take (column, k slice) items: 8 / R warps share a column, each lane reads
// 16-byte units of the row from shared memory; the slices' sums meet in shared memory and are
// added in a fixed order: deterministic, no atomics.
// Measured (docs/perf-log.md, dec1 run 2): level with cuBLASLt at m = 1 when chained as
// programmatic dependents; the time per stage is bound by its consumer (one dependent chain of
// loads, FMAs, warp sums and a barrier), not by the bytes in flight.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemv_common.cuh"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/sm90_ptx.cuh"

namespace phishard {
namespace {

using sm90::BulkLoad;
using sm90::MbarExpect;
using sm90::MbarInit;
using sm90::MbarWait;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRowsPerStage = 16;
constexpr int kMaxStages = 8;
// Defaults (GemvParams::bulk_* = 0), from phishard_kernel_bench on the H200 (docs/perf-log.md, dec1
// run 1: two blocks an SM beat one at every stage size and depth; big stages beat deep rings).
constexpr int kDefaultStageKb = 48;
constexpr int kDefaultStages = 2;
constexpr int kDefaultBlocksPerSm = 2;

struct Args {
  const void* x;
  const void* w;
  const void* bias;
  const void* x2;
  const void* w2;
  const void* bias2;
  const void* ln_w;  // nullptr: x used as is
  const void* ln_b;
  void* y;
  float ln_eps;
  int n, k1, k2;  // elements
  int xs1, xs2;   // row strides of x and x2, elements
  int ldy;        // elements
  int rows_per_stage;
  int slices;  // warps sharing one column of a stage
  int stages;
  int cols_max;                                                  // most output columns a block owns
  int off_x, off_ln, off_bias, off_yold, off_partial, off_bars;  // dynamic shared memory, bytes
  int epilogue;                                                  // GemmEpilogue as int
  bool accumulate;
  bool y_f32;
  bool pdl;
};

// Shared-memory plan of one block: the ring, x [m, k1 + k2], the LayerNorm weight and bias [k1]
// (ln only), the block's bias sums [cols_max] and old y values [m, cols_max] (float32, so the
// per-stage epilogue reads no global memory), two buffers of slice partials
// [rows_per_stage * slices, m] floats, and one mbarrier per stage.
struct Plan {
  int rows_per_stage = 1, slices = kWarps, stages = kDefaultStages, cols_max = 1, blocks = 1;
  int blocks_per_sm = 1;
  int off_x = 0, off_ln = 0, off_bias = 0, off_yold = 0, off_partial = 0, off_bars = 0;
  int64_t bytes = 0;
};

Plan MakePlan(int m, int n, int k1, int k2, int elem, bool ln, int stage_kb, int stages,
              int blocks) {
  Plan p;
  const int64_t row_bytes = static_cast<int64_t>(k1 + k2) * elem;
  const int64_t cap = static_cast<int64_t>(stage_kb) * 1024;
  // A power of two, so the stage's (column, slice) items split evenly over the 8 warps.
  p.rows_per_stage = 1;
  while (2 * p.rows_per_stage <= kMaxRowsPerStage && 2 * p.rows_per_stage * row_bytes <= cap) {
    p.rows_per_stage *= 2;
  }
  p.slices = std::max(1, kWarps / p.rows_per_stage);
  p.stages = stages;
  p.blocks = std::max(1, std::min(n, blocks));
  p.cols_max = (n + p.blocks - 1) / p.blocks;
  auto up16 = [](int64_t b) { return (b + 15) / 16 * 16; };
  int64_t off = static_cast<int64_t>(stages) * p.rows_per_stage * row_bytes;
  const int64_t off_x = off;
  off += m * row_bytes;
  const int64_t off_ln = off;
  if (ln) off += up16(2LL * k1 * elem);
  const int64_t off_bias = off;
  off += up16(4LL * p.cols_max);
  const int64_t off_yold = off;
  off += up16(4LL * m * p.cols_max);
  const int64_t off_partial = off;
  off += up16(2LL * p.rows_per_stage * p.slices * m * 4);
  const int64_t off_bars = off;
  off += 8LL * stages;
  p.bytes = off;
  if (off > INT32_MAX) return p;  // GemvBulkFits refuses it
  p.off_x = static_cast<int>(off_x);
  p.off_ln = static_cast<int>(off_ln);
  p.off_bias = static_cast<int>(off_bias);
  p.off_yold = static_cast<int>(off_yold);
  p.off_partial = static_cast<int>(off_partial);
  p.off_bars = static_cast<int>(off_bars);
  return p;
}

template <typename T, int M>
__global__ void __launch_bounds__(kThreads, 1) GemvBulkKernel(const Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float scratch[32];
  const int R = a.rows_per_stage, S = a.stages;
  const int row_elems = a.k1 + a.k2;
  const int c_begin = static_cast<int>(static_cast<int64_t>(a.n) * blockIdx.x / gridDim.x);
  const int c_end = static_cast<int>(static_cast<int64_t>(a.n) * (blockIdx.x + 1) / gridDim.x);
  const int cols = c_end - c_begin;
  const int num_stages = (cols + R - 1) / R;
  T* ring = reinterpret_cast<T*>(smem);
  T* xs = reinterpret_cast<T*>(smem + a.off_x);                 // [M, k1 + k2]
  T* ln_s = reinterpret_cast<T*>(smem + a.off_ln);              // [2, k1]: weight, bias
  float* bias_s = reinterpret_cast<float*>(smem + a.off_bias);  // [cols]
  float* yold_s = reinterpret_cast<float*>(smem + a.off_yold);  // [M, cols]
  float* partial = reinterpret_cast<float*>(smem + a.off_partial);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + a.off_bars);
  const int tid = threadIdx.x;
  const T* w1 = static_cast<const T*>(a.w);
  const T* w2 = static_cast<const T*>(a.w2);

  // Stage `it` of this block into ring slot it % S (thread 0 only).
  auto issue = [&](int it) {
    const int s = it % S;
    const int c0 = c_begin + it * R;
    const int r = min(R, c_end - c0);
    T* dst = ring + static_cast<size_t>(s) * R * row_elems;
    const uint32_t b1 = static_cast<uint32_t>(r) * a.k1 * sizeof(T);
    const uint32_t b2 = static_cast<uint32_t>(r) * a.k2 * sizeof(T);
    MbarExpect(&bars[s], b1 + b2);
    BulkLoad(dst, w1 + static_cast<size_t>(c0) * a.k1, b1, &bars[s]);
    if (b2 > 0) BulkLoad(dst + R * a.k1, w2 + static_cast<size_t>(c0) * a.k2, b2, &bars[s]);
  };
  if (tid == 0) {
    for (int s = 0; s < S; ++s) MbarInit(&bars[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    for (int it = 0; it < min(S, num_stages); ++it) issue(it);
  }
  // Weights only (no kernel of a step writes them): the biases, summed, and the LayerNorm's.
  for (int j = tid; j < cols; j += kThreads) {
    const int n = c_begin + j;
    float b = 0.0f;
    if (a.y_f32) {
      if (a.bias) b += static_cast<const float*>(a.bias)[n];
      if (a.bias2) b += static_cast<const float*>(a.bias2)[n];
    } else {
      if (a.bias) b += cuda::ToFloat(static_cast<const T*>(a.bias)[n]);
      if (a.bias2) b += cuda::ToFloat(static_cast<const T*>(a.bias2)[n]);
    }
    bias_s[j] = b;
  }
  const int u1 = a.k1 / 8, units = row_elems / 8;
  if (a.ln_w != nullptr) {
    for (int u = tid; u < 2 * u1; u += kThreads) {
      const uint4* src = u < u1 ? static_cast<const uint4*>(a.ln_w) + u
                                : static_cast<const uint4*>(a.ln_b) + (u - u1);
      reinterpret_cast<uint4*>(ln_s)[u] = __ldg(src);
    }
  }
  // x (and y, for accumulate) may be written by the kernel before: wait for it only now.
  if (a.pdl) asm volatile("griddepcontrol.wait;" ::: "memory");

  // x rows -> shared memory (16-byte units; segment 2 right after segment 1 in each row).
  for (int i = tid; i < M * units; i += kThreads) {
    const int m = i / units, u = i - m * units;
    const uint4* src =
        u < u1 ? static_cast<const uint4*>(a.x) + (static_cast<size_t>(m) * a.xs1) / 8 + u
               : static_cast<const uint4*>(a.x2) + (static_cast<size_t>(m) * a.xs2) / 8 + (u - u1);
    reinterpret_cast<uint4*>(xs + static_cast<size_t>(m) * row_elems)[u] = *src;
  }
  if (a.accumulate) {
    for (int i = tid; i < M * cols; i += kThreads) {
      const int m = i / cols, j = i - m * cols;
      const size_t at = static_cast<size_t>(m) * a.ldy + c_begin + j;
      yold_s[i] = a.y_f32 ? static_cast<const float*>(a.y)[at]
                          : cuda::ToFloat(static_cast<const T*>(a.y)[at]);
    }
  }
  if (a.ln_w != nullptr) {
    // LayerNorm of each x row over k1 (single segment), as LayerNormCuda: float32 mean, centred
    // variance, (x - mean) * rstd * w + b rounded to T.
    for (int m = 0; m < M; ++m) {
      T* row = xs + static_cast<size_t>(m) * row_elems;
      __syncthreads();
      float sum = 0.0f;
      for (int e = tid; e < a.k1; e += kThreads) sum += cuda::ToFloat(row[e]);
      const float mean = cuda::BlockSum(sum, scratch) / a.k1;
      float sq = 0.0f;
      for (int e = tid; e < a.k1; e += kThreads) {
        const float d = cuda::ToFloat(row[e]) - mean;
        sq += d * d;
      }
      const float rstd = rsqrtf(cuda::BlockSum(sq, scratch) / a.k1 + a.ln_eps);
      for (int e = tid; e < a.k1; e += kThreads) {
        row[e] = cuda::FromFloat<T>((cuda::ToFloat(row[e]) - mean) * rstd * cuda::ToFloat(ln_s[e]) +
                                    cuda::ToFloat(ln_s[a.k1 + e]));
      }
    }
  }
  __syncthreads();

  const int warp = tid >> 5, lane = tid & 31;
  const int items_max = R * a.slices;
  bool triggered = false;
  for (int it = 0; it < num_stages; ++it) {
    if (!triggered && it + S >= num_stages) {
      // Every weight byte of this block is requested: a programmatic dependent may launch.
      asm volatile("griddepcontrol.launch_dependents;" :::);
      triggered = true;
    }
    const int s = it % S;
    const int j0 = it * R;  // first column of the stage, relative to c_begin
    const int r = min(R, cols - j0);
    MbarWait(&bars[s], static_cast<uint32_t>((it / S) & 1));
    const T* st1 = ring + static_cast<size_t>(s) * R * row_elems;
    const T* st2 = st1 + R * a.k1;
    float* part = partial + (it & 1) * items_max * M;
    for (int item = warp; item < r * a.slices; item += kWarps) {
      const int col = item / a.slices, sl = item - col * a.slices;
      const int ub = units * sl / a.slices, ue = units * (sl + 1) / a.slices;
      float acc[M];
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] = 0.0f;
      const uint4* r1 = reinterpret_cast<const uint4*>(st1 + static_cast<size_t>(col) * a.k1);
      const uint4* r2 = reinterpret_cast<const uint4*>(st2 + static_cast<size_t>(col) * a.k2);
      for (int u = ub + lane; u < ue; u += 32) {
        const uint4 wv = u < u1 ? r1[u] : r2[u - u1];
#pragma unroll
        for (int m = 0; m < M; ++m) {
          acc[m] = cuda::Dot8<T>(
              wv, reinterpret_cast<const uint4*>(xs + static_cast<size_t>(m) * row_elems)[u],
              acc[m]);
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        acc[m] = cuda::WarpSum(acc[m]);
        if (lane == 0) part[item * M + m] = acc[m];
      }
    }
    __syncthreads();  // slot s read by every warp; partials written
    if (tid == 0 && it + S < num_stages) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      issue(it + S);
    }
    // Epilogue of the stage's columns from shared memory only (stores do not stall the loop).
    if (tid < r * M) {
      const int j = tid / M, m = tid - j * M;
      float v = 0.0f;
      for (int q = 0; q < a.slices; ++q) v += part[(j * a.slices + q) * M + m];
      v += bias_s[j0 + j];
      if (a.accumulate) v += yold_s[m * cols + j0 + j];
      v = cuda::Activate(v, a.epilogue);
      const size_t at = static_cast<size_t>(m) * a.ldy + c_begin + j0 + j;
      if (a.y_f32) {
        static_cast<float*>(a.y)[at] = v;
      } else {
        static_cast<T*>(a.y)[at] = cuda::FromFloat<T>(v);
      }
    }
  }
  if (!triggered) asm volatile("griddepcontrol.launch_dependents;" :::);
}

struct DeviceLimits {
  int sms = 0;
  int smem_optin = 0;
};

// Per device, queried once (the attribute calls are not stream work; safe during capture).
DeviceLimits Limits() {
  static std::atomic<int> sms[64], optin[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return {};
  if (sms[dev].load() == 0) {
    int v = 0, o = 0, cc = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&o, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev);
    if (cc < 9) v = -1;  // bulk copies and mbarrier transaction counts: sm_90 on
    optin[dev].store(o);
    sms[dev].store(v);
  }
  return {sms[dev].load(), optin[dev].load()};
}

// + 1 KiB a block: the static shared memory (LayerNorm scratch) and the per-block reserve.
bool PlanFits(const Plan& plan, const DeviceLimits& lim) {
  return (plan.bytes + 1024) * plan.blocks_per_sm <= lim.smem_optin;
}

// The plan of `p` on this device: GemvParams::bulk_blocks_per_sm, or by default
// kDefaultBlocksPerSm blocks an SM when that many fit in shared memory, else one.
Plan PlanFor(const GemvParams& p, const DeviceLimits& lim) {
  const GemmParams& g = p.a;
  auto plan = [&](int blocks_per_sm) {
    Plan pl =
        MakePlan(g.m, g.n, g.k, p.x2 != nullptr ? p.k2 : 0, static_cast<int>(DataTypeSize(g.dtype)),
                 p.ln_weight != nullptr, p.bulk_stage_kb > 0 ? p.bulk_stage_kb : kDefaultStageKb,
                 p.bulk_stages > 0 ? p.bulk_stages : kDefaultStages, lim.sms * blocks_per_sm);
    pl.blocks_per_sm = blocks_per_sm;
    return pl;
  };
  if (p.bulk_blocks_per_sm > 0) return plan(p.bulk_blocks_per_sm);
  const Plan preferred = plan(kDefaultBlocksPerSm);
  return PlanFits(preferred, lim) ? preferred : plan(1);
}

template <typename T, int M>
KernelStatus Launch(const Args& a, int blocks, int smem, cudaStream_t stream) {
  auto kernel = GemvBulkKernel<T, M>;
  // The opt-in above 48 KiB, once per device and instantiation.
  static std::atomic<uint64_t> opted{0};
  int dev = 0;
  cudaGetDevice(&dev);
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if ((opted.load() & bit) == 0) {
    const DeviceLimits lim = Limits();
    // (less the static shared memory and a margin, as GemvBulkFits counts it)
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             lim.smem_optin - 1024) != cudaSuccess) {
      return KernelStatus::kDeviceError;
    }
    opted.fetch_or(bit);
  }
  return cuda::LaunchMaybeProgrammatic(kernel, dim3(blocks), dim3(kThreads),
                                       static_cast<size_t>(smem), stream, a.pdl, a);
}

template <typename T>
KernelStatus DispatchRows(int m, const Args& a, int blocks, int smem, cudaStream_t stream) {
  return cuda::DispatchGemvRows(
      m, [&](auto rows) { return Launch<T, decltype(rows)::value>(a, blocks, smem, stream); });
}

}  // namespace

bool GemvBulkFits(const GemvParams& p) {
  if (p.bulk_stages < 0 || p.bulk_stages > kMaxStages || p.bulk_stage_kb < 0 ||
      p.bulk_stage_kb > 224 || p.bulk_blocks_per_sm < 0 || p.bulk_blocks_per_sm > 8) {
    return false;
  }
  if (p.ln_weight != nullptr && (p.x2 != nullptr || p.ln_bias == nullptr)) return false;
  const DeviceLimits lim = Limits();
  if (lim.sms <= 0) return false;
  return PlanFits(PlanFor(p, lim), lim);
}

KernelStatus GemvBulkCuda(const GemvParams& p, cudaStream_t stream) {
  const GemmParams& g = p.a;
  const DeviceLimits lim = Limits();
  const Plan plan = PlanFor(p, lim);
  Args a;
  a.x = g.x;
  a.w = g.w;
  a.bias = g.bias;
  a.x2 = p.x2;
  a.w2 = p.x2 ? p.w2 : nullptr;
  a.bias2 = p.x2 ? p.bias2 : nullptr;
  a.ln_w = p.ln_weight;
  a.ln_b = p.ln_bias;
  a.ln_eps = p.ln_eps;
  a.y = g.y;
  a.n = g.n;
  a.k1 = g.k;
  a.k2 = p.x2 ? p.k2 : 0;
  a.xs1 = g.ldx == 0 ? g.k : g.ldx;
  a.xs2 = p.x2 ? (p.ldx2 == 0 ? p.k2 : p.ldx2) : 0;
  a.ldy = g.ldy == 0 ? g.n : g.ldy;
  a.rows_per_stage = plan.rows_per_stage;
  a.slices = plan.slices;
  a.stages = plan.stages;
  a.cols_max = plan.cols_max;
  a.off_x = plan.off_x;
  a.off_ln = plan.off_ln;
  a.off_bias = plan.off_bias;
  a.off_yold = plan.off_yold;
  a.off_partial = plan.off_partial;
  a.off_bars = plan.off_bars;
  a.epilogue = static_cast<int>(g.epilogue);
  a.accumulate = g.accumulate;
  a.y_f32 = p.y_dtype == DataType::kF32;
  a.pdl = p.programmatic_launch;
  return cuda::DispatchHalfTypes(g.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return DispatchRows<T>(g.m, a, plan.blocks, static_cast<int>(plan.bytes), stream);
  });
}

}  // namespace phishard
