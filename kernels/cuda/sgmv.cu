#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/sgmv_cuda.h"

namespace phishard {
namespace {

using cuda::FromFloat;
using cuda::ToFloat;

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

// Tiled shrink: a block owns 32 rows x 32 rank columns of t; K is walked in chunks of 32.
constexpr int kShrinkTileRows = 32;
constexpr int kShrinkTileRanks = 32;
constexpr int kShrinkTileK = 32;
// Per-row shrink: a block owns one row x 32 rank columns, one warp per column at a time.
constexpr int kShrinkRowRanks = 32;
// Tiled expand: a block owns 32 rows x 64 output columns; the rank is walked in chunks of 32.
constexpr int kExpandTileRows = 32;
constexpr int kExpandTileCols = 64;
constexpr int kExpandTileK = 32;
// Per-row expand: a block owns one row x 256 output columns (one per thread); t's row is staged
// in chunks of 128 ranks.
constexpr int kExpandRowCols = kThreads;
constexpr int kExpandRowK = 128;

// The segment holding `row` (seg_starts[s] <= row < seg_starts[s + 1]): the last s with
// seg_starts[s] <= row. -1 when row precedes every segment, num_segments when it is at or past
// the end of the last one. seg_starts [num_segments + 1] device.
__device__ __forceinline__ int FindSegment(const int32_t* __restrict__ seg_starts, int num_segments,
                                           int row) {
  int lo = 0, hi = num_segments + 1;  // upper_bound over seg_starts[0 .. num_segments]
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (seg_starts[mid] <= row) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo - 1;
}

// One run of rows of a tile that belong to one segment.
struct Piece {
  int seg;    // segment index, or -1 when [begin, end) lies outside every segment
  int begin;  // first row
  int end;    // one past the last row (> begin)
};

// The piece of [row, tile_end) that starts at `row`. Every thread of a block computes the same
// answer from the same memory, so loops over pieces are block-uniform (barriers inside are safe).
// Always makes progress (end > row), even over a table that is not non-decreasing.
__device__ __forceinline__ Piece NextPiece(const int32_t* __restrict__ seg_starts, int num_segments,
                                           int row, int tile_end) {
  const int s = FindSegment(seg_starts, num_segments, row);
  if (s < 0) return {-1, row, max(row + 1, min(seg_starts[0], tile_end))};
  if (s >= num_segments) return {-1, row, tile_end};
  return {s, row, min(max(seg_starts[s + 1], row + 1), tile_end)};
}

__device__ __forceinline__ int ClampRank(const int32_t* __restrict__ ranks, int s, int ldt) {
  return min(max(ranks[s], 0), ldt);
}

// ---- shrink: t[rows of s, 0:r_s] = x[rows of s, :] · A_sᵀ ------------------------------------

// Block: 32 rows x 32 rank columns of t; thread (ty = tid / 16, tx = tid % 16) accumulates rows
// {ty, ty + 16} x columns {tx, tx + 16} in float32 registers. Shared memory holds a 32 x 32 chunk
// of x and of A as float32 (rows padded to 33 floats so column reads hit 32 distinct banks).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ShrinkTiledKernel(const T* __restrict__ x, float* __restrict__ t,
                      const int32_t* __restrict__ seg_starts, const void* const* __restrict__ a,
                      const int32_t* __restrict__ ranks, int num_segments, int num_rows, int in,
                      int ldx, int ldt) {
  __shared__ float xs[kShrinkTileRows][kShrinkTileK + 1];
  __shared__ float as[kShrinkTileRanks][kShrinkTileK + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int tile_end = min(static_cast<int>(blockIdx.x + 1) * kShrinkTileRows, num_rows);
  const int c0 = blockIdx.y * kShrinkTileRanks;
  for (int row = blockIdx.x * kShrinkTileRows; row < tile_end;) {
    const Piece piece = NextPiece(seg_starts, num_segments, row, tile_end);
    row = piece.end;
    if (piece.seg < 0) continue;
    const int r = ClampRank(ranks, piece.seg, ldt);
    const T* A = static_cast<const T*>(a[piece.seg]);
    if (A == nullptr || c0 >= r) continue;
    const int m = piece.end - piece.begin;         // rows of this piece, <= 32
    const int nc = min(kShrinkTileRanks, r - c0);  // rank columns of this block, <= 32
    const T* xp = x + static_cast<size_t>(piece.begin) * ldx;
    const T* ap = A + static_cast<size_t>(c0) * in;  // A [r, in] row-major
    float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    for (int k0 = 0; k0 < in; k0 += kShrinkTileK) {
      __syncthreads();  // the previous chunk (or piece) is no longer being read
      for (int e = tid; e < kShrinkTileRows * kShrinkTileK; e += kThreads) {
        const int i = e / kShrinkTileK, kk = e % kShrinkTileK, k = k0 + kk;
        const bool in_k = k < in;
        xs[i][kk] = (i < m && in_k) ? ToFloat(xp[static_cast<size_t>(i) * ldx + k]) : 0.0f;
        as[i][kk] = (i < nc && in_k) ? ToFloat(ap[static_cast<size_t>(i) * in + k]) : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kShrinkTileK; ++kk) {
        const float x0 = xs[ty][kk], x1 = xs[ty + 16][kk];
        const float a0 = as[tx][kk], a1 = as[tx + 16][kk];
        acc[0][0] += x0 * a0;
        acc[0][1] += x0 * a1;
        acc[1][0] += x1 * a0;
        acc[1][1] += x1 * a1;
      }
    }
#pragma unroll
    for (int qi = 0; qi < 2; ++qi) {
#pragma unroll
      for (int qj = 0; qj < 2; ++qj) {
        const int i = ty + 16 * qi, j = tx + 16 * qj;
        if (i < m && j < nc) t[static_cast<size_t>(piece.begin + i) * ldt + c0 + j] = acc[qi][qj];
      }
    }
  }
}

// Block: one row x 32 rank columns; warp w computes columns c0 + w, c0 + w + 8, ...: its lanes
// stride over `in` and a warp sum finishes each dot product. x's row is re-read by every warp
// (from L1).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ShrinkPerRowKernel(const T* __restrict__ x, float* __restrict__ t,
                       const int32_t* __restrict__ seg_starts, const void* const* __restrict__ a,
                       const int32_t* __restrict__ ranks, int num_segments, int in, int ldx,
                       int ldt) {
  const int row = blockIdx.x;
  const int s = FindSegment(seg_starts, num_segments, row);
  if (s < 0 || s >= num_segments || row >= seg_starts[s + 1]) return;
  const T* A = static_cast<const T*>(a[s]);
  const int r = ClampRank(ranks, s, ldt);
  const int c0 = blockIdx.y * kShrinkRowRanks;
  if (A == nullptr || c0 >= r) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c_end = min(c0 + kShrinkRowRanks, r);
  const T* xr = x + static_cast<size_t>(row) * ldx;
  for (int j = c0 + warp; j < c_end; j += kThreads / 32) {  // warp-uniform
    const T* ar = A + static_cast<size_t>(j) * in;
    float acc = 0.0f;
    for (int k = lane; k < in; k += 32) acc += ToFloat(xr[k]) * ToFloat(ar[k]);
    acc = cuda::WarpSum(acc);
    if (lane == 0) t[static_cast<size_t>(row) * ldt + j] = acc;
  }
}

// ---- expand: y[rows of s, :] += scale_s · t[rows of s, 0:r_s] · B_sᵀ -------------------------

// Block: 32 rows x 64 output columns; thread tid owns column j = tid % 64 and rows
// tid / 64 + 4q (q < 8), accumulated in float32. Shared memory: a 32 x 32 chunk of t and the
// matching 64 x 32 chunk of B (B [out, r] row-major, so rows n0.. of B are contiguous).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ExpandTiledKernel(const float* __restrict__ t, T* __restrict__ y,
                      const int32_t* __restrict__ seg_starts, const void* const* __restrict__ b,
                      const int32_t* __restrict__ ranks, const float* __restrict__ scales,
                      int num_segments, int num_rows, int out, int ldy, int ldt) {
  constexpr int kRowsPerThread = kExpandTileRows * kExpandTileCols / kThreads;  // 8
  __shared__ float ts[kExpandTileRows][kExpandTileK + 1];
  __shared__ float bs[kExpandTileCols][kExpandTileK + 1];
  const int tid = threadIdx.x, j = tid % kExpandTileCols, i0 = tid / kExpandTileCols;
  const int tile_end = min(static_cast<int>(blockIdx.x + 1) * kExpandTileRows, num_rows);
  const int n0 = blockIdx.y * kExpandTileCols;
  const int nn = min(kExpandTileCols, out - n0);  // columns of this block
  for (int row = blockIdx.x * kExpandTileRows; row < tile_end;) {
    const Piece piece = NextPiece(seg_starts, num_segments, row, tile_end);
    row = piece.end;
    if (piece.seg < 0) continue;
    const int r = ClampRank(ranks, piece.seg, ldt);
    const T* B = static_cast<const T*>(b[piece.seg]);
    if (B == nullptr || r == 0) continue;
    const float scale = scales == nullptr ? 1.0f : scales[piece.seg];
    const int m = piece.end - piece.begin;
    const float* tp = t + static_cast<size_t>(piece.begin) * ldt;
    const T* bp = B + static_cast<size_t>(n0) * r;
    float acc[kRowsPerThread];
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) acc[q] = 0.0f;
    for (int k0 = 0; k0 < r; k0 += kExpandTileK) {
      __syncthreads();  // the previous chunk (or piece) is no longer being read
      for (int e = tid; e < kExpandTileRows * kExpandTileK; e += kThreads) {
        const int i = e / kExpandTileK, kk = e % kExpandTileK, k = k0 + kk;
        ts[i][kk] = (i < m && k < r) ? tp[static_cast<size_t>(i) * ldt + k] : 0.0f;
      }
      for (int e = tid; e < kExpandTileCols * kExpandTileK; e += kThreads) {
        const int jj = e / kExpandTileK, kk = e % kExpandTileK, k = k0 + kk;
        bs[jj][kk] = (jj < nn && k < r) ? ToFloat(bp[static_cast<size_t>(jj) * r + k]) : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kExpandTileK; ++kk) {
        const float bv = bs[j][kk];
#pragma unroll
        for (int q = 0; q < kRowsPerThread; ++q) acc[q] += ts[i0 + 4 * q][kk] * bv;
      }
    }
    if (j < nn) {
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) {
        const int i = i0 + 4 * q;
        if (i < m) {
          T* dst = y + static_cast<size_t>(piece.begin + i) * ldy + n0 + j;
          *dst = FromFloat<T>(ToFloat(*dst) + scale * acc[q]);
        }
      }
    }
  }
}

// Block: one row x 256 output columns, one per thread: y[row, j] += scale · Σ_k t[row, k] B[j, k].
// t's row is staged in shared memory 128 ranks at a time; each thread reads its own B row
// (adjacent threads read adjacent, contiguous rows).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ExpandPerRowKernel(const float* __restrict__ t, T* __restrict__ y,
                       const int32_t* __restrict__ seg_starts, const void* const* __restrict__ b,
                       const int32_t* __restrict__ ranks, const float* __restrict__ scales,
                       int num_segments, int out, int ldy, int ldt) {
  __shared__ float ts[kExpandRowK];
  const int row = blockIdx.x;
  const int s = FindSegment(seg_starts, num_segments, row);
  if (s < 0 || s >= num_segments || row >= seg_starts[s + 1]) return;
  const T* B = static_cast<const T*>(b[s]);
  const int r = ClampRank(ranks, s, ldt);
  if (B == nullptr || r == 0) return;
  const float scale = scales == nullptr ? 1.0f : scales[s];
  const int j = blockIdx.y * kExpandRowCols + threadIdx.x;
  const float* tr = t + static_cast<size_t>(row) * ldt;
  const T* br = B + static_cast<size_t>(j) * r;
  float acc = 0.0f;
  for (int k0 = 0; k0 < r; k0 += kExpandRowK) {
    __syncthreads();  // block-uniform: every thread of the block runs this loop
    for (int kk = threadIdx.x; kk < kExpandRowK; kk += kThreads) {
      ts[kk] = k0 + kk < r ? tr[k0 + kk] : 0.0f;
    }
    __syncthreads();
    if (j < out) {
      const int kn = min(kExpandRowK, r - k0);
      for (int kk = 0; kk < kn; ++kk) acc += ts[kk] * ToFloat(br[k0 + kk]);
    }
  }
  if (j < out) {
    T* dst = y + static_cast<size_t>(row) * ldy + j;
    *dst = FromFloat<T>(ToFloat(*dst) + scale * acc);
  }
}

bool UsePerRow(SgmvCudaPath path, int num_rows, int num_segments) {
  if (path == SgmvCudaPath::kAuto) {
    return static_cast<int64_t>(num_rows) <= 2 * static_cast<int64_t>(num_segments);
  }
  return path == SgmvCudaPath::kPerRow;
}

}  // namespace

KernelStatus SgmvShrinkCuda(const SgmvShrinkParams& p, cudaStream_t stream, SgmvCudaPath path) {
  if (p.dtype != DataType::kF32 && p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (p.in <= 0 || p.ldt <= 0 || p.num_segments < 0 || p.num_rows < 0) {
    return KernelStatus::kInvalidShape;
  }
  const int ldx = p.ldx == 0 ? p.in : p.ldx;
  if (ldx < p.in) return KernelStatus::kInvalidShape;
  if (p.num_segments == 0 || p.num_rows == 0) return KernelStatus::kOk;
  if (!p.x || !p.t || !p.seg_starts || !p.a || !p.ranks) return KernelStatus::kNullPointer;
  const bool per_row = UsePerRow(path, p.num_rows, p.num_segments);
  const int col_tiles = cuda::CeilDiv(p.ldt, per_row ? kShrinkRowRanks : kShrinkTileRanks);
  if (col_tiles > kMaxGridY) return KernelStatus::kInvalidShape;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(p.x);
    if (per_row) {
      ShrinkPerRowKernel<T><<<dim3(p.num_rows, col_tiles), kThreads, 0, stream>>>(
          x, p.t, p.seg_starts, p.a, p.ranks, p.num_segments, p.in, ldx, p.ldt);
    } else {
      ShrinkTiledKernel<T>
          <<<dim3(cuda::CeilDiv(p.num_rows, kShrinkTileRows), col_tiles), kThreads, 0, stream>>>(
              x, p.t, p.seg_starts, p.a, p.ranks, p.num_segments, p.num_rows, p.in, ldx, p.ldt);
    }
    return cuda::LaunchStatus();
  });
}

KernelStatus SgmvExpandCuda(const SgmvExpandParams& p, cudaStream_t stream, SgmvCudaPath path) {
  if (p.dtype != DataType::kF32 && p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (p.out <= 0 || p.ldt <= 0 || p.num_segments < 0 || p.num_rows < 0) {
    return KernelStatus::kInvalidShape;
  }
  const int ldy = p.ldy == 0 ? p.out : p.ldy;
  if (ldy < p.out) return KernelStatus::kInvalidShape;
  if (p.num_segments == 0 || p.num_rows == 0) return KernelStatus::kOk;
  if (!p.t || !p.y || !p.seg_starts || !p.b || !p.ranks) return KernelStatus::kNullPointer;
  const bool per_row = UsePerRow(path, p.num_rows, p.num_segments);
  const int col_tiles = cuda::CeilDiv(p.out, per_row ? kExpandRowCols : kExpandTileCols);
  if (col_tiles > kMaxGridY) return KernelStatus::kInvalidShape;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* y = static_cast<T*>(p.y);
    if (per_row) {
      ExpandPerRowKernel<T><<<dim3(p.num_rows, col_tiles), kThreads, 0, stream>>>(
          p.t, y, p.seg_starts, p.b, p.ranks, p.scales, p.num_segments, p.out, ldy, p.ldt);
    } else {
      ExpandTiledKernel<T>
          <<<dim3(cuda::CeilDiv(p.num_rows, kExpandTileRows), col_tiles), kThreads, 0, stream>>>(
              p.t, y, p.seg_starts, p.b, p.ranks, p.scales, p.num_segments, p.num_rows, p.out, ldy,
              p.ldt);
    }
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
