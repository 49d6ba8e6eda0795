// SgmvDecodeFusedCuda (kernels/cuda/sgmv_cuda.h): the LoRA of decode steps with shrink and expand
// in one kernel, so a layer's adapters cost one launch per input instead of a shrink grid, a wait
// for all of it, and an expand grid.
//
// A block owns (tile, column block, op) and a tile's rows one after the other (decode tiles are
// single rows). Per row and term it first computes the rank-r intermediate of the row itself,
// t = x[row] · Aᵀ: the 256 threads stride over `in` in 8-element chunks, each holding 16 rank
// partial sums (16 A loads of 16 bytes in flight a thread), then a warp-shuffle + shared-memory
// reduction in a fixed order puts t (float32, <= kSgmvFusedMaxRank values) in shared memory. Then
// each thread owns groups of 8 consecutive output columns of the block's column range, reads y
// (one 16-byte load) and their B rows (8 x rank contiguous values) with 16-byte loads, and adds
// Σ_terms scale · t · Bᵀ to y with one rounding (the activation after, if any).
// Every block of a row recomputes that row's t (the A rows come from L2 after the first): the
// host picks the column blocks per op so that the grid stays about one wave of 2 blocks an SM.
//
// Launched as a programmatic dependent (Hopper PDL): the tile, the table entries and an L2
// prefetch of the block's A and B rows happen before griddepcontrol.wait (no kernel of the step
// writes them); x and y are read after it. It releases its own dependents at once (they wait for
// all of this grid at their griddepcontrol.wait).
//
// Per row, the result does not depend on the batch: the reduction order is fixed by the thread
// and warp layout alone, so a row gives the same bits alone and in any mix.
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
using cuda::SgmvAct;
using cuda::ToFloat;
using cuda::Unpack8;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 16;  // ranks per shrink pass
// Consecutive output columns of one thread group: for 16-bit y one 16-byte load and store
// (Unpack8, the uint4 store; with 4 columns those read and wrote 8 columns, the next group's
// too, and overran yv / packed: correct only while the neighbour's store landed last).
constexpr int kCols = 8;
static_assert(kCols * 2 == 16);
constexpr int kBlockColsHint = 1024;  // column blocks per op: at most out / this
constexpr int kMaxGridY = 65535;

struct Args {
  SgmvFusedOp ops[kSgmvMaxOps];
  int col_blocks[kSgmvMaxOps];
  SgmvTableRef ref;
};

// One term of the block's op, resolved for the tile's slot (block-uniform).
template <typename T>
struct Term {
  const T* x = nullptr;
  const T* a = nullptr;
  const T* b = nullptr;
  int in = 0, ldx = 0, rank = 0;
  float scale = 0.0f;
};

// ts[0, rank) = x_row · Aᵀ in float32, every thread of the block taking part; red is
// [kWarps][kGroup] scratch. Ends with a barrier (ts is then readable by all threads).
template <typename T>
__device__ void ShrinkRow(const Term<T>& tm, const T* x, float* ts, float* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  bool vec = false;
  if constexpr (sizeof(T) == 2) {
    vec = ((tm.in | tm.ldx) & 7) == 0 && Aligned16(x) && Aligned16(tm.a);
  }
  for (int g0 = 0; g0 < tm.rank; g0 += kGroup) {
    const int nr = min(kGroup, tm.rank - g0);
    const T* A = tm.a + static_cast<size_t>(g0) * tm.in;
    float acc[kGroup];
#pragma unroll
    for (int q = 0; q < kGroup; ++q) acc[q] = 0.0f;
    if (vec) {
      if constexpr (sizeof(T) == 2) {
        const int n8 = tm.in / 8;
        for (int c = threadIdx.x; c < n8; c += kThreads) {
          uint4 ra[kGroup];
#pragma unroll
          for (int q = 0; q < kGroup; ++q) {
            ra[q] =
                q < nr
                    ? __ldg(reinterpret_cast<const uint4*>(A + static_cast<size_t>(q) * tm.in) + c)
                    : make_uint4(0, 0, 0, 0);
          }
          float fx[8];
          Unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x) + c), fx);
#pragma unroll
          for (int q = 0; q < kGroup; ++q) {
            float fa[8];
            Unpack8<T>(ra[q], fa);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[q] += fx[e] * fa[e];
          }
        }
      }
    } else {
      for (int k = threadIdx.x; k < tm.in; k += kThreads) {
        const float fx = ToFloat(x[k]);
#pragma unroll
        for (int q = 0; q < kGroup; ++q) {
          if (q < nr) acc[q] += fx * ToFloat(A[static_cast<size_t>(q) * tm.in + k]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      const float v = cuda::WarpSum(acc[q]);
      if (lane == 0) red[warp * kGroup + q] = v;
    }
    __syncthreads();
    if (threadIdx.x < nr) {
      float sum = 0.0f;
      for (int w = 0; w < kWarps; ++w) sum += red[w * kGroup + threadIdx.x];
      ts[g0 + threadIdx.x] = sum;
    }
    __syncthreads();  // red is reused by the next pass; ts complete after the last one
  }
}

// part[c] = Σ_k ts[k] · B[j + c][k] for the thread's ncols columns (kCols rows of B, each rank
// values: one contiguous stretch of kCols x rank).
template <typename T>
__device__ __forceinline__ void ExpandCols(const Term<T>& tm, const float* ts, int j, int ncols,
                                           float part[kCols]) {
  const int rk = tm.rank;
  const T* bp = tm.b + static_cast<size_t>(j) * rk;
  bool vec = false;
  if constexpr (sizeof(T) == 2) vec = (rk & 7) == 0 && Aligned16(tm.b);
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      for (int k8 = 0; k8 < rk; k8 += 8) {
        uint4 bw[kCols];
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          bw[c] = c < ncols
                      ? __ldg(reinterpret_cast<const uint4*>(bp + static_cast<size_t>(c) * rk + k8))
                      : make_uint4(0, 0, 0, 0);
        }
        const float4 lo = *reinterpret_cast<const float4*>(ts + k8);
        const float4 hi = *reinterpret_cast<const float4*>(ts + k8 + 4);
        const float tv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          float fb[8];
          Unpack8<T>(bw[c], fb);
#pragma unroll
          for (int e = 0; e < 8; ++e) part[c] += tv[e] * fb[e];
        }
      }
    }
  } else {
    for (int k = 0; k < rk; ++k) {
      const float tk = ts[k];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        if (c < ncols) part[c] += tk * ToFloat(bp[static_cast<size_t>(c) * rk + k]);
      }
    }
  }
}

// kAct: 0 none, 1 GELU tanh, 2 GELU erf.
template <typename T, int kAct>
__global__ void __launch_bounds__(kThreads, 2) FusedKernel(const Args args) {
  __shared__ __align__(16) float ts[kSgmvMaxTerms][kSgmvFusedMaxRank];
  __shared__ float red[kWarps * kGroup];
  asm volatile("griddepcontrol.launch_dependents;" :::);
  // Every thread waits for the previous kernel before it exits, also when it has nothing to do,
  // so this grid never completes before that kernel has (later kernels wait on this one only).
  const SgmvTableRef& r = args.ref;
  const int count = min(max(*r.num_tiles, 0), r.max_tiles);
  if (static_cast<int>(blockIdx.x) >= count) return GridDepWait();
  const SgmvTile tile = r.tiles[blockIdx.x];
  const int begin = min(max(tile.begin, 0), r.num_rows);
  const int end = min(max(min(tile.end, tile.begin + kSgmvTileRows), begin), r.num_rows);
  const SgmvFusedOp& op = args.ops[blockIdx.z];
  const int nb = args.col_blocks[blockIdx.z];
  if (end <= begin || static_cast<int>(blockIdx.y) >= nb) return GridDepWait();
  const int groups = (op.out + kCols - 1) / kCols;
  const int grp_begin = static_cast<int>(static_cast<int64_t>(blockIdx.y) * groups / nb);
  const int grp_end = static_cast<int>(static_cast<int64_t>(blockIdx.y + 1) * groups / nb);
  const bool slot_ok = tile.slot >= 0 && tile.slot < r.num_slots;

  Term<T> terms[kSgmvMaxTerms];
  bool touched = false;
#pragma unroll
  for (int k = 0; k < kSgmvMaxTerms; ++k) {
    if (k >= op.num_terms || !slot_ok) continue;
    const SgmvFusedTerm& ft = op.terms[k];
    if (ft.entry < 0 || ft.entry >= r.stride) continue;
    const SgmvWeight w = r.table[static_cast<size_t>(tile.slot) * r.stride + ft.entry];
    const int rk = min(max(w.rank, 0), r.max_rank);
    if (w.a == nullptr || w.b == nullptr || rk == 0) continue;
    Term<T>& tm = terms[k];
    tm.x = static_cast<const T*>(ft.x);
    tm.a = static_cast<const T*>(w.a);
    tm.b = static_cast<const T*>(w.b);
    tm.in = ft.in;
    tm.ldx = ft.ldx == 0 ? ft.in : ft.ldx;
    tm.rank = rk;
    tm.scale = w.scale;
    touched = true;
    // A (rank x in) and this block's B rows into L2, 128-byte lines.
    const char* a = static_cast<const char*>(w.a);
    const int64_t a_bytes = static_cast<int64_t>(rk) * ft.in * static_cast<int64_t>(sizeof(T));
    for (int64_t o = static_cast<int64_t>(threadIdx.x) * 128; o < a_bytes; o += kThreads * 128) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(a + o));
    }
    const char* b = static_cast<const char*>(w.b) +
                    static_cast<int64_t>(grp_begin) * kCols * rk * static_cast<int64_t>(sizeof(T));
    const int64_t b_bytes = static_cast<int64_t>(min(grp_end * kCols, op.out) - grp_begin * kCols) *
                            rk * static_cast<int64_t>(sizeof(T));
    for (int64_t o = static_cast<int64_t>(threadIdx.x) * 128; o < b_bytes; o += kThreads * 128) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(b + o));
    }
  }
  GridDepWait();  // x and y are the previous kernels' outputs
  // Delta-only ops (SgmvFusedOp::delta) write -0.0f rows for tiles they do not adapt.
  if (!touched && kAct == 0 && op.delta == nullptr) return;  // block-uniform

  const int ldy = op.ldy == 0 ? op.out : op.ldy;
  const int ldd = op.ld_delta == 0 ? op.out : op.ld_delta;
  for (int row = begin; row < end; ++row) {
#pragma unroll
    for (int k = 0; k < kSgmvMaxTerms; ++k) {
      if (terms[k].rank > 0) {
        ShrinkRow<T>(terms[k], terms[k].x + static_cast<size_t>(row) * terms[k].ldx, ts[k], red);
      }
    }
    for (int grp = grp_begin + threadIdx.x; grp < grp_end; grp += kThreads) {
      const int j = grp * kCols, ncols = min(kCols, op.out - j);
      if (op.delta != nullptr) {  // the float32 sum the branch below adds to y, stored as is
        float acc[kCols] = {};
#pragma unroll
        for (int k = 0; k < kSgmvMaxTerms; ++k) {
          if (terms[k].rank == 0) continue;
          float part[kCols] = {};
          ExpandCols<T>(terms[k], ts[k], j, ncols, part);
#pragma unroll
          for (int c = 0; c < kCols; ++c) acc[c] += terms[k].scale * part[c];
        }
        float* d = op.delta + static_cast<size_t>(row) * ldd + j;
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[c] = touched ? acc[c] : -0.0f;
        if (ncols == kCols && Aligned16(d)) {
          reinterpret_cast<float4*>(d)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
          reinterpret_cast<float4*>(d)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
        } else {
          for (int c = 0; c < ncols; ++c) d[c] = acc[c];
        }
        continue;
      }
      T* y = static_cast<T*>(op.y) + static_cast<size_t>(row) * ldy + j;
      // y first (it does not depend on B): one 16-byte load for a full group of 16-bit values.
      bool yvec = false;
      if constexpr (sizeof(T) == 2) yvec = ncols == kCols && Aligned16(y);
      float yv[kCols];
      if (yvec) {
        if constexpr (sizeof(T) == 2) Unpack8<T>(*reinterpret_cast<const uint4*>(y), yv);
      } else {
#pragma unroll
        for (int c = 0; c < kCols; ++c) yv[c] = c < ncols ? ToFloat(y[c]) : 0.0f;
      }
      float acc[kCols] = {};
#pragma unroll
      for (int k = 0; k < kSgmvMaxTerms; ++k) {
        if (terms[k].rank == 0) continue;
        float part[kCols] = {};
        ExpandCols<T>(terms[k], ts[k], j, ncols, part);
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[c] += terms[k].scale * part[c];
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) yv[c] = SgmvAct<kAct>(touched ? yv[c] + acc[c] : yv[c]);
      if (yvec) {
        alignas(16) T packed[kCols];
#pragma unroll
        for (int c = 0; c < kCols; ++c) packed[c] = FromFloat<T>(yv[c]);
        *reinterpret_cast<uint4*>(y) = *reinterpret_cast<const uint4*>(packed);
      } else {
        for (int c = 0; c < ncols; ++c) y[c] = FromFloat<T>(yv[c]);
      }
    }
    if (row + 1 < end) __syncthreads();  // ts is rewritten by the next row's shrink
  }
}

// SgmvFoldCuda: a block owns (tile, kFoldCols columns, op), a thread kCols consecutive columns
// of each of the tile's rows: y = act(float(y) + delta), one rounding.
constexpr int kFoldCols = kThreads * kCols;

struct FoldArgs {
  SgmvFoldOp ops[kSgmvMaxOps];
  SgmvTableRef ref;
};

template <typename T, int kAct>
__global__ void __launch_bounds__(kThreads) FoldKernel(const FoldArgs args) {
  asm volatile("griddepcontrol.launch_dependents;" :::);
  const SgmvTableRef& r = args.ref;
  const int count = min(max(*r.num_tiles, 0), r.max_tiles);
  const SgmvFoldOp& op = args.ops[blockIdx.z];
  const int j = (static_cast<int>(blockIdx.y) * kThreads + static_cast<int>(threadIdx.x)) * kCols;
  if (static_cast<int>(blockIdx.x) >= count || j >= op.out) return GridDepWait();
  const SgmvTile tile = r.tiles[blockIdx.x];
  const int begin = min(max(tile.begin, 0), r.num_rows);
  const int end = min(max(min(tile.end, tile.begin + kSgmvTileRows), begin), r.num_rows);
  const int ncols = min(kCols, op.out - j);
  const int ldy = op.ldy == 0 ? op.out : op.ldy;
  const int ldd = op.ld_delta == 0 ? op.out : op.ld_delta;
  GridDepWait();  // y and delta are the previous kernels' outputs
  for (int row = begin; row < end; ++row) {
    T* y = static_cast<T*>(op.y) + static_cast<size_t>(row) * ldy + j;
    const float* d = op.delta + static_cast<size_t>(row) * ldd + j;
    float yv[kCols], dv[kCols];
    bool yvec = false;
    if constexpr (sizeof(T) == 2) yvec = ncols == kCols && Aligned16(y);
    if (yvec) {
      if constexpr (sizeof(T) == 2) Unpack8<T>(*reinterpret_cast<const uint4*>(y), yv);
    } else {
#pragma unroll
      for (int c = 0; c < kCols; ++c) yv[c] = c < ncols ? ToFloat(y[c]) : 0.0f;
    }
    if (ncols == kCols && Aligned16(d)) {
      const float4 lo = reinterpret_cast<const float4*>(d)[0];
      const float4 hi = reinterpret_cast<const float4*>(d)[1];
      dv[0] = lo.x, dv[1] = lo.y, dv[2] = lo.z, dv[3] = lo.w;
      dv[4] = hi.x, dv[5] = hi.y, dv[6] = hi.z, dv[7] = hi.w;
    } else {
#pragma unroll
      for (int c = 0; c < kCols; ++c) dv[c] = c < ncols ? d[c] : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) yv[c] = SgmvAct<kAct>(yv[c] + dv[c]);
    if (yvec) {
      alignas(16) T packed[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) packed[c] = FromFloat<T>(yv[c]);
      *reinterpret_cast<uint4*>(y) = *reinterpret_cast<const uint4*>(packed);
    } else {
      for (int c = 0; c < ncols; ++c) y[c] = FromFloat<T>(yv[c]);
    }
  }
}

int MultiprocessorCount() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return 132;
  }
  return std::max(sms, 1);
}

}  // namespace

KernelStatus SgmvDecodeFusedCuda(const SgmvFusedParams& p, GemmEpilogue act, cudaStream_t stream) {
  if (p.dtype != DataType::kF32 && p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  const SgmvTableRef& r = p.ref;
  if (p.num_ops < 0 || p.num_ops > kSgmvMaxOps || r.num_rows < 0 || r.max_rank < 0 ||
      r.max_rank > kSgmvFusedMaxRank || r.max_tiles < 0 || r.stride < 0 || r.num_slots < 0) {
    return KernelStatus::kInvalidShape;
  }
  if (act != GemmEpilogue::kNone && p.num_ops != 1) {
    return KernelStatus::kInvalidShape;  // the activation is for fc1's one output
  }
  bool any_delta = false;
  for (int o = 0; o < p.num_ops; ++o) any_delta = any_delta || p.ops[o].delta != nullptr;
  if (any_delta && act != GemmEpilogue::kNone) return KernelStatus::kInvalidShape;
  const bool empty = p.num_ops == 0 || r.max_tiles == 0 || r.num_rows == 0 ||
                     (r.max_rank == 0 && act == GemmEpilogue::kNone && !any_delta);
  for (int o = 0; o < p.num_ops; ++o) {
    const SgmvFusedOp& op = p.ops[o];
    if (op.out <= 0 || (op.ldy != 0 && op.ldy < op.out) || op.num_terms < 1 ||
        op.num_terms > kSgmvMaxTerms || (op.ld_delta != 0 && op.ld_delta < op.out)) {
      return KernelStatus::kInvalidShape;
    }
    for (int k = 0; k < op.num_terms; ++k) {
      const SgmvFusedTerm& t = op.terms[k];
      if (t.in <= 0 || (t.ldx != 0 && t.ldx < t.in)) return KernelStatus::kInvalidShape;
      if (!empty && t.x == nullptr) return KernelStatus::kNullPointer;
    }
    if (!empty && op.y == nullptr && op.delta == nullptr) return KernelStatus::kNullPointer;
  }
  if (empty) return KernelStatus::kOk;
  if (r.num_tiles == nullptr || r.tiles == nullptr || r.table == nullptr) {
    return KernelStatus::kNullPointer;
  }
  // Column blocks per op: enough for ~2 blocks an SM over the whole grid, at most one per 1,024
  // columns. Each recomputes its row's t, re-reading A (rank x Σ in): when the grid is large
  // (batches of tens of rows, where the step is bound by memory traffic) an op gets one block a
  // row per 2 x Σ in output columns (Phi-2: fc1 two, q / k / v, dense and fc2 one), so the A
  // rows re-read stay at most half of the B rows read (perf-log lora3 run 2 -> 3).
  static const int sms = MultiprocessorCount();
  const int rows_ops = std::max(1, r.max_tiles * p.num_ops);
  const int budget = std::max(1, 2 * sms / rows_ops);
  Args args;
  int max_nb = 1;
  for (int o = 0; o < kSgmvMaxOps; ++o) {
    args.ops[o] = p.ops[o];
    args.col_blocks[o] = 0;
    if (o < p.num_ops) {
      int nb = std::clamp(cuda::CeilDiv(p.ops[o].out, kBlockColsHint), 1, budget);
      if (p.col_blocks > 0) {
        nb = std::min(p.col_blocks, cuda::CeilDiv(p.ops[o].out, kCols));
      } else if (4 * rows_ops >= sms) {
        int64_t in_sum = 0;
        for (int k = 0; k < p.ops[o].num_terms; ++k) in_sum += p.ops[o].terms[k].in;
        nb = static_cast<int>(
            std::min<int64_t>(nb, std::max<int64_t>(1, p.ops[o].out / (2 * in_sum))));
      }
      args.col_blocks[o] = nb;
      max_nb = std::max(max_nb, args.col_blocks[o]);
    }
  }
  if (max_nb > kMaxGridY) return KernelStatus::kInvalidShape;
  args.ref = r;
  const dim3 grid = dim3(r.max_tiles, max_nb, p.num_ops);
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto* kernel = act == GemmEpilogue::kGeluTanh  ? FusedKernel<T, 1>
                   : act == GemmEpilogue::kGeluErf ? FusedKernel<T, 2>
                                                   : FusedKernel<T, 0>;
    return cuda::LaunchMaybeProgrammatic(kernel, grid, dim3(kThreads), 0, stream, p.programmatic,
                                         args);
  });
}

KernelStatus SgmvFoldCuda(const SgmvFoldParams& p, GemmEpilogue act, cudaStream_t stream) {
  if (p.dtype != DataType::kF32 && p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  const SgmvTableRef& r = p.ref;
  if (p.num_ops < 0 || p.num_ops > kSgmvMaxOps || r.num_rows < 0 || r.max_tiles < 0 ||
      (act != GemmEpilogue::kNone && act != GemmEpilogue::kGeluTanh &&
       act != GemmEpilogue::kGeluErf)) {
    return KernelStatus::kInvalidShape;
  }
  const bool empty = p.num_ops == 0 || r.max_tiles == 0 || r.num_rows == 0;
  int max_nb = 1;
  for (int o = 0; o < p.num_ops; ++o) {
    const SgmvFoldOp& op = p.ops[o];
    if (op.out <= 0 || (op.ldy != 0 && op.ldy < op.out) ||
        (op.ld_delta != 0 && op.ld_delta < op.out)) {
      return KernelStatus::kInvalidShape;
    }
    if (!empty && (op.y == nullptr || op.delta == nullptr)) return KernelStatus::kNullPointer;
    max_nb = std::max(max_nb, cuda::CeilDiv(op.out, kFoldCols));
  }
  if (empty) return KernelStatus::kOk;
  if (r.num_tiles == nullptr || r.tiles == nullptr) return KernelStatus::kNullPointer;
  if (max_nb > kMaxGridY) return KernelStatus::kInvalidShape;
  FoldArgs args;
  for (int o = 0; o < kSgmvMaxOps; ++o) args.ops[o] = o < p.num_ops ? p.ops[o] : SgmvFoldOp{};
  args.ref = r;
  const dim3 grid = dim3(r.max_tiles, max_nb, p.num_ops);
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto* kernel = act == GemmEpilogue::kGeluTanh  ? FoldKernel<T, 1>
                   : act == GemmEpilogue::kGeluErf ? FoldKernel<T, 2>
                                                   : FoldKernel<T, 0>;
    return cuda::LaunchMaybeProgrammatic(kernel, grid, dim3(kThreads), 0, stream, p.programmatic,
                                         args);
  });
}

}  // namespace phishard
