#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/layer_norm_cuda.h"

namespace phishard {
namespace {

constexpr int kThreads = 256;
// Vector path: threads per row at most kVecMaxThreads, each holding up to kVecMaxPer 16-byte packs
// of x (and of weight and bias) in registers.
constexpr int kVecMaxThreads = 512;
constexpr int kVecMaxPer = 4;

template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// One block per row, blockDim.x = a multiple of 32 covering the row's cols / N 16-byte packs,
// kPer packs per thread (thread i owns packs i, i + blockDim.x, ...). x, weight and bias are all
// loaded up front (weight/bias do not wait on the statistics), the row stays in registers, and the
// mean and the centred variance are two block sums in float32 (as the fallback kernel below).
// kFold (LayerNormParams::fold_delta): each pack of x first becomes x + delta (float32, one
// rounding), written back to x, and the statistics are of that rounded row.
template <typename T, int kPer, bool kFold = false>
__global__ void __launch_bounds__(kVecMaxThreads)
    LayerNormVecKernel(const T* x, const T* __restrict__ w, const T* __restrict__ b, T* y, int cols,
                       float eps, const float* __restrict__ delta = nullptr, int ld_delta = 0) {
  // A programmatic dependent (a bulk GEMV, kernels/cuda/gemv_bulk.cu) may start loading its
  // weights now; it waits for this grid to finish before reading y.
  asm volatile("griddepcontrol.launch_dependents;" :::);
  using P = Pack16<T>;
  constexpr int N = P::kN;
  __shared__ float scratch[32];
  const int packs = cols / N;
  const size_t row = blockIdx.x;
  const P* xr = reinterpret_cast<const P*>(x + row * cols);
  P* yr = reinterpret_cast<P*>(y + row * cols);
  P xv[kPer], wv[kPer], bv[kPer];
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < packs) {
      wv[c] = reinterpret_cast<const P*>(w)[i];
      bv[c] = reinterpret_cast<const P*>(b)[i];
    }
  }
  // Launched as a programmatic dependent (LayerNormParams::programmatic_launch): x is the kernel
  // before's output; the weights above are not. (A no-op otherwise.)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < packs) xv[c] = xr[i];
  }
  if constexpr (kFold) {  // delta rows are 16-byte aligned (checked by the launch)
    const float4* dr = reinterpret_cast<const float4*>(delta + row * ld_delta);
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int i = threadIdx.x + c * blockDim.x;
      if (i < packs) {
        float d[N];
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
          const float4 v = dr[i * (N / 4) + q];
          d[4 * q] = v.x, d[4 * q + 1] = v.y, d[4 * q + 2] = v.z, d[4 * q + 3] = v.w;
        }
#pragma unroll
        for (int e = 0; e < N; ++e)
          xv[c].v[e] = cuda::FromFloat<T>(cuda::ToFloat(xv[c].v[e]) + d[e]);
        const_cast<P*>(xr)[i] = xv[c];
      }
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    if (threadIdx.x + c * blockDim.x < packs) {
#pragma unroll
      for (int e = 0; e < N; ++e) sum += cuda::ToFloat(xv[c].v[e]);
    }
  }
  const float mean = cuda::BlockSum(sum, scratch) / cols;
  float sq = 0.0f;
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    if (threadIdx.x + c * blockDim.x < packs) {
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float d = cuda::ToFloat(xv[c].v[e]) - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(cuda::BlockSum(sq, scratch) / cols + eps);
  // A thread writes only the packs it read itself, so y == x (in place) is safe.
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < packs) {
      P o;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        o.v[e] = cuda::FromFloat<T>((cuda::ToFloat(xv[c].v[e]) - mean) * rstd *
                                        cuda::ToFloat(wv[c].v[e]) +
                                    cuda::ToFloat(bv[c].v[e]));
      }
      yr[i] = o;
    }
  }
}

// Prefill sizes (>= kWarpRowMinRows rows): one warp per row, kWarpRowsPerBlock rows a block, lane l
// owning packs l, l + 32, ... (up to kPer) of x in registers; mean and centred variance are warp
// sums (shuffles, no barrier), and weight/bias are read only for the output (they stay in L1/L2
// across the rows). The block-per-row kernel above moves 10 KB a block between two block-wide
// reductions and reached 0.5 of the copy bandwidth at 2048 x 2560 (10.4 us).
// pre2 run 1 (docs/perf-log.md), Phi-2 bf16 rows of 2560: 2048 rows 6.81 us against the vector
// kernel's 9.03; 256 rows 5.48 against 4.27, 64 rows 5.27 against 5.08. Not measured in between.
constexpr int kWarpRowMinRows = 1024;
constexpr int kWarpRowsPerBlock = 4;

template <typename T, int kPer>
__global__ void __launch_bounds__(32 * kWarpRowsPerBlock)
    LayerNormWarpKernel(const T* x, const T* __restrict__ w, const T* __restrict__ b, T* y,
                        int rows, int cols, float eps) {
  using P = Pack16<T>;
  constexpr int N = P::kN;
  const int row = blockIdx.x * kWarpRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps: the shuffles below see full warps only
  const int lane = threadIdx.x & 31;
  const int packs = cols / N;
  const P* xr = reinterpret_cast<const P*>(x + static_cast<size_t>(row) * cols);
  P* yr = reinterpret_cast<P*>(y + static_cast<size_t>(row) * cols);
  P xv[kPer];
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    if (lane + 32 * c < packs) xv[c] = xr[lane + 32 * c];
  }
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    if (lane + 32 * c < packs) {
#pragma unroll
      for (int e = 0; e < N; ++e) sum += cuda::ToFloat(xv[c].v[e]);
    }
  }
  const float mean = cuda::WarpSum(sum) / cols;
  float sq = 0.0f;
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    if (lane + 32 * c < packs) {
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float d = cuda::ToFloat(xv[c].v[e]) - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(cuda::WarpSum(sq) / cols + eps);
  // A lane writes only the packs it read itself, so y == x (in place) is safe.
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int i = lane + 32 * c;
    if (i < packs) {
      const P wv = reinterpret_cast<const P*>(w)[i];
      const P bv = reinterpret_cast<const P*>(b)[i];
      P o;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        o.v[e] =
            cuda::FromFloat<T>((cuda::ToFloat(xv[c].v[e]) - mean) * rstd * cuda::ToFloat(wv.v[e]) +
                               cuda::ToFloat(bv.v[e]));
      }
      yr[i] = o;
    }
  }
}

// Fallback (rows not in 16-byte packs, or too long for the vector kernel's registers): one block
// per row. Each thread keeps its strided elements of the row in registers when the row
// fits (cols <= kThreads * kCache), so x is read from memory once; longer rows re-read x.
template <typename T, int kCache>
__global__ void __launch_bounds__(kThreads)
    LayerNormKernel(const T* x, const T* __restrict__ w, const T* __restrict__ b, T* y, int cols,
                    float eps) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  float cache[kCache];
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kCache; ++c) {
    const int i = threadIdx.x + c * kThreads;
    cache[c] = i < cols ? cuda::ToFloat(xr[i]) : 0.0f;
    sum += cache[c];
  }
  for (int i = threadIdx.x + kCache * kThreads; i < cols; i += kThreads)
    sum += cuda::ToFloat(xr[i]);
  const float mean = cuda::BlockSum(sum, scratch) / cols;
  float sq = 0.0f;
#pragma unroll
  for (int c = 0; c < kCache; ++c) {
    const int i = threadIdx.x + c * kThreads;
    const float d = cache[c] - mean;
    sq += i < cols ? d * d : 0.0f;
  }
  for (int i = threadIdx.x + kCache * kThreads; i < cols; i += kThreads) {
    const float d = cuda::ToFloat(xr[i]) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(cuda::BlockSum(sq, scratch) / cols + eps);
  // Every read of x above precedes the barrier inside the last BlockSum, so writing y == x is safe.
#pragma unroll
  for (int c = 0; c < kCache; ++c) {
    const int i = threadIdx.x + c * kThreads;
    if (i < cols) {
      yr[i] =
          cuda::FromFloat<T>((cache[c] - mean) * rstd * cuda::ToFloat(w[i]) + cuda::ToFloat(b[i]));
    }
  }
  for (int i = threadIdx.x + kCache * kThreads; i < cols; i += kThreads) {
    yr[i] = cuda::FromFloat<T>((cuda::ToFloat(xr[i]) - mean) * rstd * cuda::ToFloat(w[i]) +
                               cuda::ToFloat(b[i]));
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The residual fold alone (LayerNormParams::fold_delta) for the launches whose kernels do not take
// it: x[r, c] = x[r, c] + delta[r, c], one rounding; grid (column blocks, rows).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    FoldRowsKernel(T* x, const float* __restrict__ delta, int cols, int ld_delta) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c >= cols) return;
  const size_t row = blockIdx.y;
  T* xr = x + row * cols + c;
  *xr = cuda::FromFloat<T>(cuda::ToFloat(*xr) + delta[row * ld_delta + c]);
}

}  // namespace

KernelStatus LayerNormCuda(const LayerNormParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols <= 0 || !(p.eps >= 0.0f)) return KernelStatus::kInvalidShape;
  if (p.rows == 0) return KernelStatus::kOk;
  if (!p.x || !p.weight || !p.bias || !p.y) return KernelStatus::kNullPointer;
  const int ld_fold = p.ld_fold == 0 ? p.cols : p.ld_fold;
  if (p.fold_delta != nullptr && (p.x == p.y || ld_fold < p.cols || p.rows > 65535)) {
    return KernelStatus::kInvalidShape;
  }
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int N = Pack16<T>::kN;
    const int packs = p.cols / N;
    const bool vec = p.cols % N == 0 && Aligned16(p.x) && Aligned16(p.y) && Aligned16(p.weight) &&
                     Aligned16(p.bias) && packs <= kVecMaxThreads * kVecMaxPer;
    const bool fold_vec =
        vec && p.rows < kWarpRowMinRows && Aligned16(p.fold_delta) && ld_fold % 4 == 0;
    if (p.fold_delta != nullptr && fold_vec) {
      // The vector kernel below with the fold: the same launch shape, so the same statistics'
      // order and bits as the fold followed by a plain LayerNorm.
      int per = 1;
      while (cuda::CeilDiv(packs, per) > kVecMaxThreads) per *= 2;
      const int threads = cuda::CeilDiv(cuda::CeilDiv(packs, per), 32) * 32;
      const T* x = static_cast<const T*>(p.x);
      const T* w = static_cast<const T*>(p.weight);
      const T* b = static_cast<const T*>(p.bias);
      T* y = static_cast<T*>(p.y);
      const float* d = p.fold_delta;
      switch (per) {
        case 1:
          LayerNormVecKernel<T, 1, true>
              <<<p.rows, threads, 0, stream>>>(x, w, b, y, p.cols, p.eps, d, ld_fold);
          break;
        case 2:
          LayerNormVecKernel<T, 2, true>
              <<<p.rows, threads, 0, stream>>>(x, w, b, y, p.cols, p.eps, d, ld_fold);
          break;
        default:
          LayerNormVecKernel<T, kVecMaxPer, true>
              <<<p.rows, threads, 0, stream>>>(x, w, b, y, p.cols, p.eps, d, ld_fold);
          break;
      }
      return cuda::LaunchStatus();
    }
    if (p.fold_delta != nullptr) {  // the fold first, then the LayerNorm below
      FoldRowsKernel<T><<<dim3(cuda::CeilDiv(p.cols, kThreads), p.rows), kThreads, 0, stream>>>(
          static_cast<T*>(const_cast<void*>(p.x)), p.fold_delta, p.cols, ld_fold);
      if (const KernelStatus st = cuda::LaunchStatus(); st != KernelStatus::kOk) return st;
    }
    if (vec && p.rows >= kWarpRowMinRows && packs <= 32 * 16) {
      const T* x = static_cast<const T*>(p.x);
      const T* w = static_cast<const T*>(p.weight);
      const T* b = static_cast<const T*>(p.bias);
      T* y = static_cast<T*>(p.y);
      const int blocks = cuda::CeilDiv(p.rows, kWarpRowsPerBlock);
      const int threads = 32 * kWarpRowsPerBlock;
      if (packs <= 32 * 8) {  // Phi-1.5 bf16: 2048 / 8 = 256 packs
        LayerNormWarpKernel<T, 8>
            <<<blocks, threads, 0, stream>>>(x, w, b, y, p.rows, p.cols, p.eps);
      } else if (packs <= 32 * 10) {  // Phi-2 bf16: 2560 / 8 = 320 packs
        LayerNormWarpKernel<T, 10>
            <<<blocks, threads, 0, stream>>>(x, w, b, y, p.rows, p.cols, p.eps);
      } else {
        LayerNormWarpKernel<T, 16>
            <<<blocks, threads, 0, stream>>>(x, w, b, y, p.rows, p.cols, p.eps);
      }
      return cuda::LaunchStatus();
    }
    if (vec) {
      // The fewest packs per thread that fit in kVecMaxThreads threads (Phi-2 bf16, 320 packs: one
      // per thread), the most loads in flight for a decode step's handful of rows. Measured
      // (docs/perf-log.md, kern runs 1-2): 2048 rows took the same with 4 packs a thread
      // (96-thread blocks) as with 1 (10.4 vs 10.3 us), so rows count does not change it.
      int per = 1;
      while (cuda::CeilDiv(packs, per) > kVecMaxThreads) per *= 2;
      const int threads = cuda::CeilDiv(cuda::CeilDiv(packs, per), 32) * 32;
      const T* x = static_cast<const T*>(p.x);
      const T* w = static_cast<const T*>(p.weight);
      const T* b = static_cast<const T*>(p.bias);
      T* y = static_cast<T*>(p.y);
      auto launch = [&](auto kernel) {
        return cuda::LaunchMaybeProgrammatic(kernel, dim3(p.rows), dim3(threads), 0, stream,
                                             p.programmatic_launch, x, w, b, y, p.cols, p.eps,
                                             nullptr, 0);
      };
      switch (per) {
        case 1:
          return launch(LayerNormVecKernel<T, 1>);
        case 2:
          return launch(LayerNormVecKernel<T, 2>);
        default:
          return launch(LayerNormVecKernel<T, kVecMaxPer>);
      }
    }
    // 16 cached elements per thread cover rows up to 4096 (Phi-2: 2560) from registers.
    LayerNormKernel<T, 16><<<p.rows, kThreads, 0, stream>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<const T*>(p.bias),
        static_cast<T*>(p.y), p.cols, p.eps);
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
