#include <mma.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/sgmv_common.cuh"
#include "kernels/cuda/sgmv_cuda.h"

namespace phishard {
namespace {

using cuda::Aligned16;
using cuda::FromFloat;
using cuda::GridDepWait;
using cuda::ToFloat;
using cuda::Unpack8;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRanksPerWarp = 2;
constexpr int kRanksPerBlock = kWarps * kRanksPerWarp;  // shrink: rank rows of one block (16)
constexpr int kExpandCols = kThreads;                   // expand: output columns of one block
constexpr int kExpandK = 32;                            // expand: ranks staged per round
constexpr int kMaxGridY = 65535;
constexpr int kTileRows = kSgmvTileRows;

struct ShrinkArgs {
  SgmvShrinkOp ops[kSgmvMaxOps];
  float* t;
  int ldt;
  SgmvTableRef ref;
};

struct ExpandArgs {
  SgmvExpandOp ops[kSgmvMaxOps];
  const float* t;
  int ldt;
  SgmvTableRef ref;
};

// The tile of this block, its rows clamped to [0, num_rows) and to kTileRows; false when the
// block has nothing to do (tile past the count, slot outside the table, no rows). Block-uniform.
__device__ __forceinline__ bool LoadTile(const SgmvTableRef& r, int index, SgmvTile* tile,
                                         int* begin, int* rows) {
  const int count = min(max(*r.num_tiles, 0), r.max_tiles);
  if (index >= count) return false;
  *tile = r.tiles[index];
  if (tile->slot < 0 || tile->slot >= r.num_slots) return false;
  const int b = min(max(tile->begin, 0), r.num_rows);
  const int e = min(max(min(tile->end, tile->begin + kTileRows), b), r.num_rows);
  *begin = b;
  *rows = e - b;
  return e > b;
}

__device__ __forceinline__ const SgmvWeight* WeightAt(const SgmvTableRef& r, int slot, int entry) {
  if (entry < 0 || entry >= r.stride) return nullptr;
  return r.table + static_cast<size_t>(slot) * r.stride + entry;
}

// ---- shrink: t[rows, t_col + j] = x[rows, :] · A[j, :] -----------------------------------------
// A block owns (tile, op, rank group z = ranks 16 z .. 16 z + 15). Three paths, chosen per block:
//  * few rows (m <= kFewRows, decode): all 256 threads stride over `in` in 8-element chunks, each
//    loading the chunk of all 16 A rows at once (16 x 16 bytes in flight a thread), partial sums
//    reduced over warps in shared memory. A is read once at full width by many loads in flight.
//  * full tiles (m == 16, 16-bit, a full rank group, 32-byte aligned rows): tensor cores, WMMA
//    16x16x16 with float32 accumulation; the 8 warps split `in`, their 16x16 partial tiles are
//    summed in shared memory.
//  * otherwise: warp w computes rank rows 16 z + 2 w and + 1 for all m rows, lanes striding over
//    `in`, a warp sum per dot product (any shape, alignment and dtype).
constexpr int kFewRows = 2;

struct ShrinkJob {
  const SgmvShrinkOp* op;
  int begin, m, rank, g;  // tile rows [begin, begin + m), rank, rank group
  const void* a;
};

template <typename T>
__device__ void ShrinkWarpRows(const ShrinkArgs& args, const ShrinkJob& job) {
  const SgmvShrinkOp& op = *job.op;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j0 = job.g * kRanksPerBlock + warp * kRanksPerWarp;
  if (j0 >= job.rank) return;  // warp-uniform; no barriers below
  const int m = job.m;
  const bool has1 = j0 + 1 < job.rank;
  const int in = op.in, ldx = op.ldx == 0 ? op.in : op.ldx;
  const T* x = static_cast<const T*>(op.x) + static_cast<size_t>(job.begin) * ldx;
  const T* A = static_cast<const T*>(job.a);
  const T* a0 = A + static_cast<size_t>(j0) * in;
  const T* a1 = has1 ? a0 + in : a0;
  float acc0[kTileRows], acc1[kTileRows];
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) acc0[i] = acc1[i] = 0.0f;
  bool vec = false;
  if constexpr (sizeof(T) == 2) {
    vec = ((in | ldx) & 7) == 0 && Aligned16(x) && Aligned16(A);
  }
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      const int n8 = in / 8;
      const uint4* va0 = reinterpret_cast<const uint4*>(a0);
      const uint4* va1 = reinterpret_cast<const uint4*>(a1);
#pragma unroll 2
      for (int k8 = lane; k8 < n8; k8 += 32) {
        float f0[8], f1[8];
        Unpack8<T>(__ldg(va0 + k8), f0);
        Unpack8<T>(__ldg(va1 + k8), f1);
#pragma unroll
        for (int i = 0; i < kTileRows; ++i) {
          if (i < m) {
            float fx[8];
            Unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(i) * ldx) + k8),
                       fx);
#pragma unroll
            for (int q = 0; q < 8; ++q) {
              acc0[i] += fx[q] * f0[q];
              acc1[i] += fx[q] * f1[q];
            }
          }
        }
      }
    }
  } else {
    for (int k = lane; k < in; k += 32) {
      const float f0 = ToFloat(a0[k]), f1 = ToFloat(a1[k]);
#pragma unroll
      for (int i = 0; i < kTileRows; ++i) {
        if (i < m) {
          const float fx = ToFloat(x[static_cast<size_t>(i) * ldx + k]);
          acc0[i] += fx * f0;
          acc1[i] += fx * f1;
        }
      }
    }
  }
  float* t = args.t + static_cast<size_t>(job.begin) * args.ldt + op.t_col + j0;
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) {
    if (i < m) {
      const float s0 = cuda::WarpSum(acc0[i]);
      const float s1 = cuda::WarpSum(acc1[i]);
      if (lane == 0) {
        t[static_cast<size_t>(i) * args.ldt] = s0;
        if (has1) t[static_cast<size_t>(i) * args.ldt + 1] = s1;
      }
    }
  }
}

// Few rows: see above. red [kWarps][kRanksPerBlock * kFewRows] float32 partial sums.
template <typename T>
__device__ void ShrinkFewRows(const ShrinkArgs& args, const ShrinkJob& job, float* red) {
  const SgmvShrinkOp& op = *job.op;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j0 = job.g * kRanksPerBlock;
  const int nr = min(kRanksPerBlock, job.rank - j0), m = job.m;
  const int in = op.in, ldx = op.ldx == 0 ? op.in : op.ldx, n8 = in / 8;
  const T* x = static_cast<const T*>(op.x) + static_cast<size_t>(job.begin) * ldx;
  const T* A = static_cast<const T*>(job.a) + static_cast<size_t>(j0) * in;
  float acc[kRanksPerBlock][kFewRows];
#pragma unroll
  for (int q = 0; q < kRanksPerBlock; ++q) acc[q][0] = acc[q][1] = 0.0f;
  // A never depends on the previous kernel: the first chunk is loaded before the wait (PDL), the
  // next one at the end of each round.
  uint4 ra[kRanksPerBlock];
  auto load_a = [&](int c) {
#pragma unroll
    for (int q = 0; q < kRanksPerBlock; ++q) {
      ra[q] = (q < nr && c < n8)
                  ? __ldg(reinterpret_cast<const uint4*>(A + static_cast<size_t>(q) * in) + c)
                  : make_uint4(0, 0, 0, 0);
    }
  };
  load_a(threadIdx.x);
  GridDepWait();
  for (int c = threadIdx.x; c < n8; c += kThreads) {
    float fx[kFewRows][8];
#pragma unroll
    for (int i = 0; i < kFewRows; ++i) {
      if (i < m) {
        Unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(i) * ldx) + c),
                   fx[i]);
      }
    }
#pragma unroll
    for (int q = 0; q < kRanksPerBlock; ++q) {
      if (q < nr) {
        float fa[8];
        Unpack8<T>(ra[q], fa);
#pragma unroll
        for (int i = 0; i < kFewRows; ++i) {
          if (i < m) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[q][i] += fx[i][e] * fa[e];
          }
        }
      }
    }
    if (c + kThreads < n8) load_a(c + kThreads);
  }
#pragma unroll
  for (int q = 0; q < kRanksPerBlock; ++q) {
#pragma unroll
    for (int i = 0; i < kFewRows; ++i) {
      const float v = cuda::WarpSum(acc[q][i]);
      if (lane == 0) red[warp * kRanksPerBlock * kFewRows + q * kFewRows + i] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x < kRanksPerBlock * kFewRows) {
    const int q = threadIdx.x / kFewRows, i = threadIdx.x % kFewRows;
    if (q < nr && i < m) {
      float sum = 0.0f;
      for (int w = 0; w < kWarps; ++w) sum += red[w * kRanksPerBlock * kFewRows + threadIdx.x];
      args.t[static_cast<size_t>(job.begin + i) * args.ldt + op.t_col + j0 + q] = sum;
    }
  }
}

// Full tile on tensor cores: see above. red [kWarps][16 x 16] float32.
template <typename T>
__device__ void ShrinkWmma(const ShrinkArgs& args, const ShrinkJob& job, float* red) {
  using namespace nvcuda;
  const SgmvShrinkOp& op = *job.op;
  const int warp = threadIdx.x / 32;
  const int j0 = job.g * kRanksPerBlock;
  const int in = op.in, ldx = op.ldx == 0 ? op.in : op.ldx;
  const T* x = static_cast<const T*>(op.x) + static_cast<size_t>(job.begin) * ldx;
  const T* A = static_cast<const T*>(job.a) + static_cast<size_t>(j0) * in;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k = warp * 16; k < in; k += kWarps * 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, x + k, ldx);  // x[16 rows][k .. k + 16)
    wmma::load_matrix_sync(fb, A + k, in);   // element (k', j) = A[j0 + j][k + k']
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(red + warp * 256, acc, 16, wmma::mem_row_major);
  __syncthreads();
  const int i = threadIdx.x / 16, j = threadIdx.x % 16;  // 256 threads = the 16 x 16 tile
  float sum = 0.0f;
  for (int w = 0; w < kWarps; ++w) sum += red[w * 256 + threadIdx.x];
  args.t[static_cast<size_t>(job.begin + i) * args.ldt + op.t_col + j0 + j] = sum;
}

__device__ __forceinline__ bool Aligned32(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 31) == 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) GroupedShrinkKernel(const ShrinkArgs args) {
  __shared__ __align__(32) float red[kWarps * 256];
  // The expand that reads t may launch now and load its B rows while this grid runs (its
  // griddepcontrol.wait still waits for all of this grid).
  asm volatile("griddepcontrol.launch_dependents;" :::);
  const SgmvTableRef& r = args.ref;
  // Every block waits for the previous kernel before it exits, also when it has nothing to do,
  // so this grid never completes before that kernel has (later kernels wait on this one only).
  SgmvTile tile;
  int begin = 0, m = 0;
  if (!LoadTile(r, blockIdx.x, &tile, &begin, &m)) return GridDepWait();
  const SgmvShrinkOp& op = args.ops[blockIdx.y];
  const SgmvWeight* wp = WeightAt(r, tile.slot, op.entry);
  if (wp == nullptr || wp->a == nullptr) return GridDepWait();
  const int rank = min(max(wp->rank, 0), r.max_rank);
  const int g = blockIdx.z;
  if (g * kRanksPerBlock >= rank) return GridDepWait();  // block-uniform
  const ShrinkJob job{&op, begin, m, rank, g, wp->a};
  if constexpr (sizeof(T) == 2) {
    const int ldx = op.ldx == 0 ? op.in : op.ldx;
    const T* x = static_cast<const T*>(op.x) + static_cast<size_t>(begin) * ldx;
    if (m <= kFewRows && ((op.in | ldx) & 7) == 0 && Aligned16(x) && Aligned16(wp->a)) {
      ShrinkFewRows<T>(args, job, red);  // waits after its first A loads
      return;
    }
  }
  GridDepWait();
  if constexpr (sizeof(T) == 2) {
    const int ldx = op.ldx == 0 ? op.in : op.ldx;
    const T* x = static_cast<const T*>(op.x) + static_cast<size_t>(begin) * ldx;
    if (m == kTileRows && (g + 1) * kRanksPerBlock <= rank && ((op.in | ldx) & 15) == 0 &&
        Aligned32(x) && Aligned32(wp->a)) {
      ShrinkWmma<T>(args, job, red);
      return;
    }
  }
  ShrinkWarpRows<T>(args, job);
}

// ---- expand: y[rows, j] += Σ_terms scale · Σ_k t[rows, t_col + k] · B[j, k]
// ---------------------- Block (tile, column block, op): thread tid owns column j = 256 y + tid for
// all m rows of the tile (float32 accumulators acc[kTileRows]); t's rows are staged in shared
// memory kExpandK ranks at a time (read back as float4 broadcasts), B's row j is read with 16-byte
// loads. y is read, summed and rounded once, and only when some term applied.
template <typename T, typename Y>
__device__ __forceinline__ void AddRows(Y* y, int ldy, int j, int m, const float* acc) {
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) {
    if (i < m) {
      Y* p = y + static_cast<size_t>(i) * ldy + j;
      *p = FromFloat<Y>(ToFloat(*p) + acc[i]);
    }
  }
}

// Full 16-row tiles on tensor cores (16-bit storage, every applied rank a multiple of 16 up to
// kWmmaMaxRank, the block's 256 columns inside `out`): the tile's t rows are staged in shared
// memory rounded to the storage type (what a 16-bit PyTorch LoRA computes too), warp w owns
// columns j0 + 32 w .. + 31 as two 16x16 float32 WMMA accumulators over all terms (scale applied
// per term), then adds them to y with one rounding. ts16 [16][kWmmaLd] T, ys [kWarps][16][32].
constexpr int kWmmaMaxRank = 256;
constexpr int kWmmaLd = kWmmaMaxRank + 8;

template <typename T, typename Y>
__device__ void AddWarpTile(Y* y, int ldy, const float* ys) {
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < kTileRows * 32; e += 32) {
    Y* p = y + static_cast<size_t>(e / 32) * ldy + e % 32;
    *p = FromFloat<Y>(ToFloat(*p) + ys[e]);
  }
}

template <typename T>
__device__ void ExpandWmma(const ExpandArgs& args, const SgmvExpandOp& op, int slot, int begin,
                           int j0, T* ts16, float* ys) {
  using namespace nvcuda;
  const SgmvTableRef& r = args.ref;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  const float* tb = args.t + static_cast<size_t>(begin) * args.ldt;
  for (int term = 0; term < op.num_terms; ++term) {  // block-uniform
    const SgmvWeight* wp = WeightAt(r, slot, op.terms[term].entry);
    if (wp == nullptr || wp->b == nullptr) continue;
    const int rank = min(max(wp->rank, 0), r.max_rank);
    if (rank == 0) continue;
    const float scale = wp->scale;
    const T* B = static_cast<const T*>(wp->b);
    __syncthreads();  // the previous term's ts16 is no longer read
    for (int e = threadIdx.x; e < kTileRows * rank; e += kThreads) {
      const int i = e / rank, k = e % rank;
      ts16[i * kWmmaLd + k] =
          FromFloat<T>(tb[static_cast<size_t>(i) * args.ldt + op.terms[term].t_col + k]);
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      const int jc = j0 + warp * 32 + f * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> part;
      wmma::fill_fragment(part, 0.0f);
      for (int k = 0; k < rank; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, ts16 + k, kWmmaLd);
        wmma::load_matrix_sync(fb, B + static_cast<size_t>(jc) * rank + k, rank);  // (k', j)
        wmma::mma_sync(part, fa, fb, part);
      }
#pragma unroll
      for (int e = 0; e < part.num_elements; ++e) acc[f].x[e] += scale * part.x[e];
    }
  }
  float* mine = ys + warp * kTileRows * 32;
  wmma::store_matrix_sync(mine, acc[0], 32, wmma::mem_row_major);
  wmma::store_matrix_sync(mine + 16, acc[1], 32, wmma::mem_row_major);
  __syncwarp();
  const int ldy = op.ldy == 0 ? op.out : op.ldy;
  const size_t at = static_cast<size_t>(begin) * ldy + j0 + warp * 32;
  if (op.y_f32) {
    AddWarpTile<T>(static_cast<float*>(op.y) + at, ldy, mine);
  } else {
    AddWarpTile<T>(static_cast<T*>(op.y) + at, ldy, mine);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) GroupedExpandKernel(const ExpandArgs args) {
  __shared__ __align__(16) float ts[kTileRows][kExpandK];
  __shared__ __align__(32) T ts16[kTileRows * kWmmaLd];
  __shared__ __align__(32) float ys[kWarps * kTileRows * 32];
  const SgmvTableRef& r = args.ref;
  SgmvTile tile;
  int begin = 0, m = 0;
  if (!LoadTile(r, blockIdx.x, &tile, &begin, &m)) return;
  const SgmvExpandOp& op = args.ops[blockIdx.z];
  const int j0 = blockIdx.y * kExpandCols;
  if (j0 >= op.out) return;  // block-uniform
  if constexpr (sizeof(T) == 2) {
    if (m == kTileRows && j0 + kExpandCols <= op.out) {
      bool ok = true, any = false;
      for (int term = 0; term < op.num_terms; ++term) {
        const SgmvWeight* wp = WeightAt(r, tile.slot, op.terms[term].entry);
        if (wp == nullptr || wp->b == nullptr) continue;
        const int rank = min(max(wp->rank, 0), r.max_rank);
        if (rank == 0) continue;
        any = true;
        ok = ok && rank % 16 == 0 && rank <= kWmmaMaxRank && Aligned32(wp->b);
      }
      if (ok) {
        if (any) ExpandWmma<T>(args, op, tile.slot, begin, j0, ts16, ys);
        return;
      }
    }
  }
  const int j = j0 + threadIdx.x;
  const bool live = j < op.out;
  float acc[kTileRows];
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) acc[i] = 0.0f;
  bool touched = false;
  const float* tb = args.t + static_cast<size_t>(begin) * args.ldt;
  for (int term = 0; term < op.num_terms; ++term) {  // block-uniform
    const SgmvWeight* wp = WeightAt(r, tile.slot, op.terms[term].entry);
    if (wp == nullptr) continue;
    const T* B = static_cast<const T*>(wp->b);
    const int rank = min(max(wp->rank, 0), r.max_rank);
    if (B == nullptr || rank == 0) continue;
    touched = true;
    const float scale = wp->scale;
    const float* tt = tb + op.terms[term].t_col;
    const T* br = B + static_cast<size_t>(live ? j : j0) * rank;
    bool vec = false;
    if constexpr (sizeof(T) == 2) vec = (rank & 7) == 0 && Aligned16(B);
    float part[kTileRows];
#pragma unroll
    for (int i = 0; i < kTileRows; ++i) part[i] = 0.0f;
    for (int k0 = 0; k0 < rank; k0 += kExpandK) {
      __syncthreads();  // the previous round's ts is no longer read
      for (int e = threadIdx.x; e < kTileRows * kExpandK; e += kThreads) {
        const int i = e / kExpandK, kk = e % kExpandK;
        ts[i][kk] =
            (i < m && k0 + kk < rank) ? tt[static_cast<size_t>(i) * args.ldt + k0 + kk] : 0.0f;
      }
      __syncthreads();
      if (!live) continue;
      const int kn = min(kExpandK, rank - k0);
      if (vec) {
        if constexpr (sizeof(T) == 2) {
          for (int kk = 0; kk < kn; kk += 8) {
            float fb[8];
            Unpack8<T>(__ldg(reinterpret_cast<const uint4*>(br + k0 + kk)), fb);
#pragma unroll
            for (int i = 0; i < kTileRows; ++i) {
              if (i < m) {
                const float4 lo = *reinterpret_cast<const float4*>(&ts[i][kk]);
                const float4 hi = *reinterpret_cast<const float4*>(&ts[i][kk + 4]);
                part[i] += lo.x * fb[0] + lo.y * fb[1] + lo.z * fb[2] + lo.w * fb[3] +
                           hi.x * fb[4] + hi.y * fb[5] + hi.z * fb[6] + hi.w * fb[7];
              }
            }
          }
        }
      } else {
        for (int kk = 0; kk < kn; ++kk) {
          const float fb = ToFloat(br[k0 + kk]);
#pragma unroll
          for (int i = 0; i < kTileRows; ++i) {
            if (i < m) part[i] += ts[i][kk] * fb;
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kTileRows; ++i) acc[i] += scale * part[i];
  }
  if (!touched || !live) return;
  const int ldy = op.ldy == 0 ? op.out : op.ldy;
  if (op.y_f32) {
    AddRows<T>(static_cast<float*>(op.y) + static_cast<size_t>(begin) * ldy, ldy, j, m, acc);
  } else {
    AddRows<T>(static_cast<T*>(op.y) + static_cast<size_t>(begin) * ldy, ldy, j, m, acc);
  }
}

bool SupportedDtype(DataType t) {
  return t == DataType::kF32 || t == DataType::kF16 || t == DataType::kBF16;
}

// Shared host checks; *empty = nothing to launch.
KernelStatus CheckRef(const SgmvTableRef& r, int num_ops, bool* empty) {
  if (num_ops < 0 || num_ops > kSgmvMaxOps || r.num_rows < 0 || r.max_rank < 0 ||
      r.max_rank > kSgmvCudaMaxRank || r.max_tiles < 0 || r.stride < 0 || r.num_slots < 0) {
    return KernelStatus::kInvalidShape;
  }
  *empty = num_ops == 0 || r.max_tiles == 0 || r.num_rows == 0 || r.max_rank == 0;
  return KernelStatus::kOk;
}

// After the shapes: the pointers a non-empty launch reads.
bool RefPointersSet(const SgmvTableRef& r) { return r.num_tiles && r.tiles && r.table; }

}  // namespace

KernelStatus SgmvGroupedShrinkCuda(const SgmvGroupedShrinkParams& p, cudaStream_t stream) {
  if (!SupportedDtype(p.dtype)) return KernelStatus::kUnsupportedDtype;
  bool empty = false;
  if (KernelStatus st = CheckRef(p.ref, p.num_ops, &empty); st != KernelStatus::kOk) return st;
  for (int o = 0; o < p.num_ops; ++o) {
    const SgmvShrinkOp& op = p.ops[o];
    if (op.in <= 0 || (op.ldx != 0 && op.ldx < op.in) || op.t_col < 0 ||
        static_cast<int64_t>(op.t_col) + p.ref.max_rank > p.ldt) {
      return KernelStatus::kInvalidShape;
    }
    if (!empty && op.x == nullptr) return KernelStatus::kNullPointer;
  }
  if (empty) return KernelStatus::kOk;
  if (p.t == nullptr || !RefPointersSet(p.ref)) return KernelStatus::kNullPointer;
  const dim3 grid(p.ref.max_tiles, p.num_ops, cuda::CeilDiv(p.ref.max_rank, kRanksPerBlock));
  ShrinkArgs args;
  for (int o = 0; o < kSgmvMaxOps; ++o) args.ops[o] = p.ops[o];
  args.t = p.t;
  args.ldt = p.ldt;
  args.ref = p.ref;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return cuda::LaunchProgrammatic(GroupedShrinkKernel<T>, grid, dim3(kThreads), stream, args);
  });
}

KernelStatus SgmvGroupedExpandCuda(const SgmvGroupedExpandParams& p, cudaStream_t stream) {
  if (!SupportedDtype(p.dtype)) return KernelStatus::kUnsupportedDtype;
  bool empty = false;
  if (KernelStatus st = CheckRef(p.ref, p.num_ops, &empty); st != KernelStatus::kOk) return st;
  int max_out = 0;
  if (KernelStatus st = cuda::CheckExpandOps(p, p.ref.max_rank, empty, &max_out);
      st != KernelStatus::kOk) {
    return st;
  }
  if (empty) return KernelStatus::kOk;
  if (p.t == nullptr || !RefPointersSet(p.ref)) return KernelStatus::kNullPointer;
  const int col_blocks = cuda::CeilDiv(max_out, kExpandCols);
  if (col_blocks > kMaxGridY) return KernelStatus::kInvalidShape;
  const dim3 grid(p.ref.max_tiles, col_blocks, p.num_ops);
  ExpandArgs args;
  for (int o = 0; o < kSgmvMaxOps; ++o) args.ops[o] = p.ops[o];
  args.t = p.t;
  args.ldt = p.ldt;
  args.ref = p.ref;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GroupedExpandKernel<T><<<grid, kThreads, 0, stream>>>(args);
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
