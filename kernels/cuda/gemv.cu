#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemv_common.cuh"
#include "kernels/cuda/gemv_cuda.h"

namespace phishard {
namespace {

using cuda::Activate;
using cuda::Dot8;
using cuda::LoadStreaming;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16-byte weight loads in flight per lane, and the smallest k slice (in 16-byte chunks) a row is
// split into across warps. Measured on the H200 at m = 1 (docs/perf-log.md, decode-graph runs 1
// and 2): 4 loads and slices >= 320 chunks gave 0.56-0.92 of the copy bandwidth (dense + fc2
// fused 22.4 us, lm_head 67 us); 8 loads with slices <= 256 chunks (one round of loads per warp,
// more warps) was slower on every shape (0.50-0.65).
constexpr int kDefaultUnroll = 4;
constexpr int kMinSliceChunks = 320;

struct Args {
  const void* x;
  const void* w;
  const void* bias;
  const void* x2;
  const void* w2;
  const void* bias2;
  void* y;
  int n;
  int c1, c2;    // 16-byte chunks (8 elements) of a weight row in each segment
  int xs1, xs2;  // row strides of x and x2 in chunks
  int ldy;       // elements
  int ksplit;    // warps sharing one output column, a power of two dividing kWarps
  int epilogue;  // GemmEpilogue as int
  bool accumulate;
  bool y_f32;
  bool pdl;  // launched as a programmatic dependent: prefetch weights, then wait
};

// Block: kWarps warps = kWarps / ksplit output columns. Warp `warp` owns column
// n = blockIdx.x * (kWarps / ksplit) + warp / ksplit and the slice (warp % ksplit) of its
// c1 + c2 chunks; lane l reads chunks slice_begin + l, + 32, ... (coalesced 512-byte rows).
template <typename T, int M, int kUnroll>
__global__ void __launch_bounds__(kThreads) GemvKernel(const Args a) {
  __shared__ float partial[kWarps][M];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int slice = warp % a.ksplit;
  const int n = blockIdx.x * (kWarps / a.ksplit) + warp / a.ksplit;
  const int total = a.c1 + a.c2;
  const int begin = static_cast<int>(static_cast<int64_t>(total) * slice / a.ksplit);
  const int end = static_cast<int>(static_cast<int64_t>(total) * (slice + 1) / a.ksplit);
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  const uint4* w1 = static_cast<const uint4*>(a.w) + static_cast<size_t>(n) * a.c1;
  const uint4* w2 = static_cast<const uint4*>(a.w2) + static_cast<size_t>(n) * a.c2;
  if (a.pdl) {
    // Weights never depend on the previous kernel: stream this warp's slice into L2 while that
    // kernel finishes, then wait for it (its writes to x, and its reads of y, are then done).
    if (n < a.n) {
      for (int c = begin + lane; c < end; c += 32) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"(c < a.c1 ? w1 + c : w2 + (c - a.c1)));
      }
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  if (n < a.n) {
    const uint4* x1 = static_cast<const uint4*>(a.x);
    const uint4* x2 = static_cast<const uint4*>(a.x2);
    for (int c0 = begin + lane; c0 < end; c0 += 32 * kUnroll) {
      uint4 wv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + 32 * u;
        wv[u] = make_uint4(0, 0, 0, 0);
        if (c < end) wv[u] = LoadStreaming(c < a.c1 ? w1 + c : w2 + (c - a.c1));
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + 32 * u;
        if (c < end) {
          const bool first = c < a.c1;
          const uint4* xp = first ? x1 + c : x2 + (c - a.c1);
          const int xs = first ? a.xs1 : a.xs2;
#pragma unroll
          for (int m = 0; m < M; ++m) acc[m] = Dot8<T>(wv[u], __ldg(xp + m * xs), acc[m]);
        }
      }
    }
  }
  // Every weight is loaded: a next kernel launched as a programmatic dependent may start now.
  asm volatile("griddepcontrol.launch_dependents;" :::);
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = cuda::WarpSum(acc[m]);
  if (a.ksplit > 1) {
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) partial[warp][m] = acc[m];
    }
    __syncthreads();
    if (slice != 0) return;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int j = 0; j < a.ksplit; ++j) s += partial[warp + j][m];
      acc[m] = s;
    }
  }
  if (n >= a.n || lane != 0) return;
  float b = 0.0f;
  if (a.y_f32) {
    if (a.bias) b += static_cast<const float*>(a.bias)[n];
    if (a.bias2) b += static_cast<const float*>(a.bias2)[n];
  } else {
    if (a.bias) b += cuda::ToFloat(static_cast<const T*>(a.bias)[n]);
    if (a.bias2) b += cuda::ToFloat(static_cast<const T*>(a.bias2)[n]);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const size_t at = static_cast<size_t>(m) * a.ldy + n;
    if (a.y_f32) {
      float* y = static_cast<float*>(a.y);
      const float v = acc[m] + b + (a.accumulate ? y[at] : 0.0f);
      y[at] = Activate(v, a.epilogue);
    } else {
      T* y = static_cast<T*>(a.y);
      const float v = acc[m] + b + (a.accumulate ? cuda::ToFloat(y[at]) : 0.0f);
      y[at] = cuda::FromFloat<T>(Activate(v, a.epilogue));
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int M, int kUnroll>
KernelStatus Launch(const Args& a, cudaStream_t stream) {
  const int cols_per_block = kWarps / a.ksplit;
  const int blocks = cuda::CeilDiv(a.n, cols_per_block);
  return cuda::LaunchMaybeProgrammatic(GemvKernel<T, M, kUnroll>, dim3(blocks), dim3(kThreads), 0,
                                       stream, a.pdl, a);
}

template <typename T, int kUnroll>
KernelStatus DispatchRows(int m, const Args& a, cudaStream_t stream) {
  return cuda::DispatchGemvRows(
      m, [&](auto rows) { return Launch<T, decltype(rows)::value, kUnroll>(a, stream); });
}

}  // namespace

bool GemvCudaSupports(const GemvParams& p) {
  const GemmParams& g = p.a;
  if (g.dtype != DataType::kF16 && g.dtype != DataType::kBF16) return false;
  if (p.y_dtype != g.dtype && p.y_dtype != DataType::kF32) return false;
  if (g.m < 1 || g.m > kGemvMaxRows || g.n < 1 || g.k < 1 || g.k % 8 != 0) return false;
  const int ldx = g.ldx == 0 ? g.k : g.ldx;
  const int ldy = g.ldy == 0 ? g.n : g.ldy;
  if (ldx < g.k || ldx % 8 != 0 || ldy < g.n) return false;
  if (!Aligned16(g.x) || !Aligned16(g.w)) return false;
  if (p.ksplit != 0 && p.ksplit != 1 && p.ksplit != 2 && p.ksplit != 4 && p.ksplit != 8) {
    return false;
  }
  if (p.unroll != 0 && p.unroll != 4 && p.unroll != 8) return false;
  if (p.x2 != nullptr) {
    const int ldx2 = p.ldx2 == 0 ? p.k2 : p.ldx2;
    if (p.k2 < 1 || p.k2 % 8 != 0 || ldx2 < p.k2 || ldx2 % 8 != 0) return false;
    if (!Aligned16(p.x2) || !Aligned16(p.w2)) return false;
  }
  if (p.bulk) return GemvBulkFits(p);
  return p.ln_weight == nullptr;  // LayerNorm-fused x: bulk kernel only
}

KernelStatus GemvCuda(const GemvParams& p, cudaStream_t stream) {
  const GemmParams& g = p.a;
  if (g.dtype != DataType::kF16 && g.dtype != DataType::kBF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (p.y_dtype != g.dtype && p.y_dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (g.accumulate && g.epilogue != GemmEpilogue::kNone) return KernelStatus::kInvalidShape;
  if (!g.x || !g.w || !g.y || (p.x2 != nullptr && p.w2 == nullptr)) {
    return KernelStatus::kNullPointer;
  }
  if (!GemvCudaSupports(p)) return KernelStatus::kInvalidShape;
  if (p.bulk) return GemvBulkCuda(p, stream);
  Args a;
  a.x = g.x;
  a.w = g.w;
  a.bias = g.bias;
  a.x2 = p.x2;
  a.w2 = p.x2 ? p.w2 : nullptr;
  a.bias2 = p.x2 ? p.bias2 : nullptr;
  a.y = g.y;
  a.n = g.n;
  a.c1 = g.k / 8;
  a.c2 = p.x2 ? p.k2 / 8 : 0;
  a.xs1 = (g.ldx == 0 ? g.k : g.ldx) / 8;
  a.xs2 = p.x2 ? (p.ldx2 == 0 ? p.k2 : p.ldx2) / 8 : 0;
  a.ldy = g.ldy == 0 ? g.n : g.ldy;
  if (p.ksplit > 0) {
    a.ksplit = p.ksplit;
  } else {
    // kern runs 1-2 (docs/perf-log.md) also tried a wave-count rule here: it picked ksplit 4 for
    // the LM head (107 us against 67 at 1), so the slice-length rule stays.
    a.ksplit = 1;
    while (a.ksplit < kWarps && (a.c1 + a.c2) / (2 * a.ksplit) >= kMinSliceChunks) a.ksplit *= 2;
  }
  a.epilogue = static_cast<int>(g.epilogue);
  a.accumulate = g.accumulate;
  a.y_f32 = p.y_dtype == DataType::kF32;
  a.pdl = p.programmatic_launch;
  const int unroll = p.unroll > 0 ? p.unroll : kDefaultUnroll;
  return cuda::DispatchHalfTypes(g.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return unroll == 8 ? DispatchRows<T, 8>(g.m, a, stream) : DispatchRows<T, 4>(g.m, a, stream);
  });
}

}  // namespace phishard
