// SgmvDecodeExpandCuda (kernels/cuda/sgmv_cuda.h): the expand of decode steps, whose tiles are
// single rows. A block owns (tile, 1,024 output columns, op); a thread owns 4 consecutive
// columns (so a warp reads 128 consecutive B rows, one contiguous stretch of memory, and writes
// 256 consecutive bytes of y). Launched as a programmatic dependent (Hopper PDL): the tile and the
// table entries are read and the thread's B rows prefetched into L2 before griddepcontrol.wait,
// i.e. while the shrink that produces t still runs (64 registers: 4 blocks of 256 an SM).
// With an activation, every tile's rows (base tiles, slot < 0, included) get act(y + delta) over
// the block's columns, so the GELU after fc1 needs no launch of its own.
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/sgmv_common.cuh"
#include "kernels/cuda/sgmv_cuda.h"

namespace phishard {
namespace {

using cuda::FromFloat;
using cuda::GridDepWait;
using cuda::SgmvAct;
using cuda::ToFloat;
using cuda::Unpack8;

constexpr int kThreads = 256;
constexpr int kCols = 4;                      // consecutive output columns of one thread
constexpr int kBlockCols = kThreads * kCols;  // 1,024
constexpr int kMaxGridY = 65535;

struct Args {
  SgmvExpandOp ops[kSgmvMaxOps];
  const float* t;
  int ldt;
  SgmvTableRef ref;
};

template <typename Y, int kAct>
__device__ __forceinline__ void Store(Y* y, int n, const float* acc, bool touched) {
  for (int c = 0; c < n; ++c) {
    float v = ToFloat(y[c]);
    if (touched) v += acc[c];
    y[c] = FromFloat<Y>(SgmvAct<kAct>(v));
  }
}

// kAct: 0 none, 1 GELU tanh, 2 GELU erf.
template <typename T, int kAct>
__global__ void __launch_bounds__(kThreads, 4) DecodeExpandKernel(const Args args) {
  // Every thread waits for the previous kernel before it exits, also when it has nothing to do,
  // so this grid never completes before that kernel has (later kernels wait on this one only).
  const SgmvTableRef& r = args.ref;
  const int count = min(max(*r.num_tiles, 0), r.max_tiles);
  if (static_cast<int>(blockIdx.x) >= count) return GridDepWait();
  const SgmvTile tile = r.tiles[blockIdx.x];
  const int begin = min(max(tile.begin, 0), r.num_rows);
  const int end = min(max(min(tile.end, tile.begin + kSgmvTileRows), begin), r.num_rows);
  if (end <= begin) return GridDepWait();
  const SgmvExpandOp& op = args.ops[blockIdx.z];
  const int j = blockIdx.y * kBlockCols + threadIdx.x * kCols;
  if (j >= op.out) return GridDepWait();  // no block-wide synchronisation below
  const int ncols = min(kCols, op.out - j);
  const bool slot_ok = tile.slot >= 0 && tile.slot < r.num_slots;

  const T* bp[kSgmvMaxTerms];
  int rank[kSgmvMaxTerms], tcol[kSgmvMaxTerms];
  float scale[kSgmvMaxTerms];
  bool vec[kSgmvMaxTerms];
  bool touched = false;
#pragma unroll
  for (int term = 0; term < kSgmvMaxTerms; ++term) {
    bp[term] = nullptr;
    rank[term] = 0;
    tcol[term] = 0;
    scale[term] = 0.0f;
    vec[term] = false;
    if (term >= op.num_terms || !slot_ok) continue;
    const int entry = op.terms[term].entry;
    if (entry < 0 || entry >= r.stride) continue;
    const SgmvWeight w = r.table[static_cast<size_t>(tile.slot) * r.stride + entry];
    const int rk = min(max(w.rank, 0), r.max_rank);
    if (w.b == nullptr || rk == 0) continue;
    touched = true;
    bp[term] = static_cast<const T*>(w.b) + static_cast<size_t>(j) * rk;
    rank[term] = rk;
    tcol[term] = op.terms[term].t_col;
    scale[term] = w.scale;
    if constexpr (sizeof(T) == 2) {
      vec[term] = (rk & 7) == 0 && (reinterpret_cast<uintptr_t>(w.b) & 15) == 0;
    }
    // This thread's B rows (ncols x rk contiguous values) into L2, 128-byte lines.
    const char* from = reinterpret_cast<const char*>(bp[term]);
    const int bytes = ncols * rk * static_cast<int>(sizeof(T));
    for (int o = 0; o < bytes; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(from + o));
  }
  GridDepWait();  // t and y are the previous kernels' outputs
  if (!touched && kAct == 0) return;

  for (int row = begin; row < end; ++row) {
    float acc[kCols] = {};
#pragma unroll
    for (int term = 0; term < kSgmvMaxTerms; ++term) {
      if (bp[term] == nullptr) continue;
      const int rk = rank[term];
      const float* tt = args.t + static_cast<size_t>(row) * args.ldt + tcol[term];
      float part[kCols] = {};
      if (vec[term]) {
        if constexpr (sizeof(T) == 2) {
#pragma unroll 2
          for (int k8 = 0; k8 < rk; k8 += 8) {
            uint4 bw[kCols];
#pragma unroll
            for (int c = 0; c < kCols; ++c) {
              bw[c] = c < ncols ? __ldg(reinterpret_cast<const uint4*>(
                                      bp[term] + static_cast<size_t>(c) * rk + k8))
                                : make_uint4(0, 0, 0, 0);
            }
            float tv[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) tv[e] = __ldg(tt + k8 + e);
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
          const float tk = __ldg(tt + k);
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
            if (c < ncols) part[c] += tk * ToFloat(bp[term][static_cast<size_t>(c) * rk + k]);
          }
        }
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[c] += scale[term] * part[c];
    }
    const int ldy = op.ldy == 0 ? op.out : op.ldy;
    const size_t at = static_cast<size_t>(row) * ldy + j;
    if (op.y_f32) {
      Store<float, kAct>(static_cast<float*>(op.y) + at, ncols, acc, touched);
    } else {
      Store<T, kAct>(static_cast<T*>(op.y) + at, ncols, acc, touched);
    }
  }
}

}  // namespace

KernelStatus SgmvDecodeExpandCuda(const SgmvGroupedExpandParams& p, GemmEpilogue act,
                                  cudaStream_t stream) {
  if (p.dtype != DataType::kF32 && p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  const SgmvTableRef& r = p.ref;
  if (p.num_ops < 0 || p.num_ops > kSgmvMaxOps || r.num_rows < 0 || r.max_rank < 0 ||
      r.max_rank > kSgmvCudaMaxRank || r.max_tiles < 0 || r.stride < 0 || r.num_slots < 0) {
    return KernelStatus::kInvalidShape;
  }
  if (act != GemmEpilogue::kNone && (p.num_ops != 1 || p.ops[0].y_f32)) {
    return KernelStatus::kInvalidShape;  // the activation is for fc1's one 16-bit output
  }
  const bool empty = p.num_ops == 0 || r.max_tiles == 0 || r.num_rows == 0 ||
                     (r.max_rank == 0 && act == GemmEpilogue::kNone);
  int max_out = 0;
  if (KernelStatus st = cuda::CheckExpandOps(p, r.max_rank, empty, &max_out);
      st != KernelStatus::kOk) {
    return st;
  }
  if (empty) return KernelStatus::kOk;
  if (p.t == nullptr || r.num_tiles == nullptr || r.tiles == nullptr || r.table == nullptr) {
    return KernelStatus::kNullPointer;
  }
  const int col_blocks = cuda::CeilDiv(max_out, kBlockCols);
  if (col_blocks > kMaxGridY) return KernelStatus::kInvalidShape;
  Args args;
  for (int o = 0; o < kSgmvMaxOps; ++o) args.ops[o] = p.ops[o];
  args.t = p.t;
  args.ldt = p.ldt;
  args.ref = r;
  const dim3 grid = dim3(r.max_tiles, col_blocks, p.num_ops);
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto* kernel = act == GemmEpilogue::kGeluTanh  ? DecodeExpandKernel<T, 1>
                   : act == GemmEpilogue::kGeluErf ? DecodeExpandKernel<T, 2>
                                                   : DecodeExpandKernel<T, 0>;
    return cuda::LaunchProgrammatic(kernel, grid, dim3(kThreads), stream, args);
  });
}

}  // namespace phishard
