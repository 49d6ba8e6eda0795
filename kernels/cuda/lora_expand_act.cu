// fc1's LoRA delta + activation (kernels/lora_expand_act.h) as one memory-bound pass: the
// pre-activation y is read once into the mma accumulators, T · Bᵀ added by tensor cores, the
// activation applied and y written once.
//
// Grid: x = column blocks of kBlockCols, y = row blocks of kRowIters x kTileRows rows, each
// inside one segment (tile_start gives each segment's first row block). A block is kWarps warps
// side by side along the columns; a warp owns kGroups groups of 32 columns for the tile's rows, as
// kMi m16 tiles. Within a group the mma's 4 n8 sub-tiles are permuted so that thread (g = lane / 4,
// q = lane % 4) holds columns 8q .. 8q + 7 of rows g and g + 8: logical column n of sub-tile j is
// column 8 (n / 2) + 2 j + n % 2 of the group, so the accumulator pair (c0, c1) of sub-tile j is
// columns 8q + 2j, 8q + 2j + 1 and one 16-byte load / store covers a thread's row of the group.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/gelu_math.cuh"
#include "kernels/cuda/lora_expand_act_cuda.h"

namespace phishard {
namespace {

constexpr int kWarps = 4;
constexpr int kGroups = 2;
constexpr int kMi = 2;
constexpr int kTileRows = 16 * kMi;
constexpr int kBlockCols = kWarps * kGroups * 32;

struct ExpandActArgs {
  void* y;
  int64_t ldy;
  int n;
  const void* t;
  int64_t ldt;
  int t_col;
  const void* b;
  int64_t ldb;
  LoraExpandActSegment segments[kLoraExpandActMaxSegments];
  int tile_start[kLoraExpandActMaxSegments + 1];
  int num_segments;
};


// kAct: 0 none, 1 tanh GELU, 2 erf GELU: kernels/cuda/gelu_math.cuh's float formulas (those of
// GeluInPlaceCuda), used for act-only segments (base rows: exactly GeluInPlaceCuda's values).
template <int kAct>
__device__ __forceinline__ float Act(float x) {
  return cuda::GeluAct<kAct>(x);
}

// The rows with a delta: the same tanh GELU as x / (1 + 2^z), z = -2 log2(e) sqrt(2/pi) (x +
// 0.044715 x^3) (0.5 (1 + tanh u) = 1 / (1 + e^-2u)), on the ex2 / rcp units: 5 float ops and 2
// MUFU instead of tanhf's ~25 (a branchy polynomial), which made the pass issue-bound (84 us
// against cuBLASLt's 67 at 4096 x 10240). Relative error ~2^-20 (z rounded at |z| < 64, ex2.approx
// and rcp.approx to ~2^-22 each), far below a bf16 / fp16 half-ulp; x -> -inf gives -0.
template <int kAct>
__device__ __forceinline__ float ActFast(float x) {
  if constexpr (kAct == 1) {
    const float z = x * fmaf(-0.1029432395800235f, x * x, -2.302208198144325f);
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(z));
    return __fdividef(x, 1.0f + e);
  } else {
    return Act<kAct>(x);
  }
}

// One mma k16 step of a warp's kMi x kGroups x 4 tiles. The k axis is permuted within a chunk
// (the same for A and B, so the sum is unchanged): thread q's A words a_lo / a_hi of each row and
// B words b_lo / b_hi of each column are the fragment's k = 2q, 2q + 1 and 2q + 8, 2q + 9.
template <typename T>
__device__ __forceinline__ void MmaStep(float (&acc)[kMi][kGroups][4][4],
                                        const uint32_t (&a_lo)[kMi][2],
                                        const uint32_t (&a_hi)[kMi][2], uint32_t b_lo,
                                        uint32_t b_hi, int gi, int j) {
#pragma unroll
  for (int mi = 0; mi < kMi; ++mi) {
    const uint32_t a[4] = {a_lo[mi][0], a_lo[mi][1], a_hi[mi][0], a_hi[mi][1]};
    mma::Mma16816<T>(acc[mi][gi][j], a, b_lo, b_hi);
  }
}

template <typename T, int kAct, int kRowIters>
__global__ void __launch_bounds__(kWarps * 32, 4)
    LoraExpandActKernel(const __grid_constant__ ExpandActArgs args) {
  const int tile = blockIdx.y;
  int s = 0;
  while (s + 1 < args.num_segments && tile >= args.tile_start[s + 1]) ++s;
  const LoraExpandActSegment seg = args.segments[s];
  const int block_row0 = seg.row + (tile - args.tile_start[s]) * kTileRows * kRowIters;
  const int row_end = seg.row + seg.rows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const int col0 = blockIdx.x * kBlockCols + warp * kGroups * 32;
  auto* y = static_cast<T*>(args.y);
  const auto* t16 = static_cast<const uint16_t*>(args.t);
  const auto* b16 = static_cast<const uint16_t*>(args.b);
  // kRowIters tiles of kTileRows rows one after the other: the B fragments' second and later
  // reads hit L1 (B [kBlockCols, k] is read once per block from L2, not once per tile).
  for (int it = 0; it < kRowIters; ++it) {
    const int row0 = block_row0 + it * kTileRows;
    if (row0 >= row_end) break;

    // acc[mi][gi][j][e]: rows row0 + 16 mi + g (e 0, 1) and + 8 (e 2, 3), columns col0 + 32 gi +
    // 8 q + 2 j + e % 2. Started from y (zero for rows / columns outside the window).
    float acc[kMi][kGroups][4][4];
#pragma unroll
    for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        const int c = col0 + 32 * gi + 8 * q;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = row0 + 16 * mi + g + 8 * h;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (r < row_end && c < args.n) {
            v = *reinterpret_cast<const uint4*>(y + r * args.ldy + c);
          }
          const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 f = cuda::Word2ToFloat2<T>(w[j]);
            acc[mi][gi][j][2 * h] = f.x;
            acc[mi][gi][j][2 * h + 1] = f.y;
          }
        }
      }
    }

    // Rows of T (A) and columns of B (n = g of sub-tile j is group column 8 (g / 2) + 2 j + g % 2)
    // this thread reads; invalid ones read as zeros.
    int64_t a_at[kMi][2];
    bool a_ok[kMi][2];
#pragma unroll
    for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row0 + 16 * mi + g + 8 * h;
        a_ok[mi][h] = r < row_end;
        a_at[mi][h] = r * args.ldt + args.t_col;
      }
    }
    auto b_col = [&](int gi, int j) { return col0 + 32 * gi + 8 * (g / 2) + 2 * j + g % 2; };
    int k0 = 0;
    // Chunks of 32 k: thread q reads k0 + 8q .. 8q + 7 of each row / column as one 16-byte load;
    // words 0, 1 are step one's lo / hi, words 2, 3 step two's.
    for (; k0 + 32 <= seg.k; k0 += 32) {
      uint32_t a[kMi][2][4];
#pragma unroll
      for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint4 v = make_uint4(0, 0, 0, 0);
          if (a_ok[mi][h]) v = *reinterpret_cast<const uint4*>(t16 + a_at[mi][h] + k0 + 8 * q);
          a[mi][h][0] = v.x, a[mi][h][1] = v.y, a[mi][h][2] = v.z, a[mi][h][3] = v.w;
        }
      }
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = b_col(gi, j);
          uint4 v = make_uint4(0, 0, 0, 0);
          if (c < args.n) {
            v = *reinterpret_cast<const uint4*>(b16 + c * args.ldb + seg.b_col + k0 + 8 * q);
          }
#pragma unroll
          for (int st = 0; st < 2; ++st) {
            uint32_t lo[kMi][2], hi[kMi][2];
#pragma unroll
            for (int mi = 0; mi < kMi; ++mi) {
              lo[mi][0] = a[mi][0][2 * st], lo[mi][1] = a[mi][1][2 * st];
              hi[mi][0] = a[mi][0][2 * st + 1], hi[mi][1] = a[mi][1][2 * st + 1];
            }
            MmaStep<T>(acc, lo, hi, st == 0 ? v.x : v.z, st == 0 ? v.y : v.w, gi, j);
          }
        }
      }
    }
    // A chunk of 16 (4 k a thread, one 8-byte load) or of 8 (2 k a thread; hi words zero).
    const int rest = seg.k - k0;
    if (rest > 0) {
      const int per = rest >= 16 ? 4 : 2;
      uint32_t lo[kMi][2], hi[kMi][2];
#pragma unroll
      for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint16_t* src = t16 + a_at[mi][h] + k0 + per * q;
          uint2 v = make_uint2(0, 0);
          if (a_ok[mi][h]) {
            v = per == 4 ? *reinterpret_cast<const uint2*>(src)
                         : make_uint2(*reinterpret_cast<const uint32_t*>(src), 0u);
          }
          lo[mi][h] = v.x, hi[mi][h] = v.y;
        }
      }
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = b_col(gi, j);
          uint2 v = make_uint2(0, 0);
          if (c < args.n) {
            const uint16_t* src = b16 + c * args.ldb + seg.b_col + k0 + per * q;
            v = per == 4 ? *reinterpret_cast<const uint2*>(src)
                         : make_uint2(*reinterpret_cast<const uint32_t*>(src), 0u);
          }
          MmaStep<T>(acc, lo, hi, v.x, v.y, gi, j);
        }
      }
      // 16 + 8: one more chunk of 8 after the 16.
      if (rest == 24) {
#pragma unroll
        for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            lo[mi][h] =
                a_ok[mi][h]
                    ? *reinterpret_cast<const uint32_t*>(t16 + a_at[mi][h] + k0 + 16 + 2 * q)
                    : 0u;
            hi[mi][h] = 0u;
          }
        }
#pragma unroll
        for (int gi = 0; gi < kGroups; ++gi) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int c = b_col(gi, j);
            const uint32_t v = c < args.n ? *reinterpret_cast<const uint32_t*>(
                                                b16 + c * args.ldb + seg.b_col + k0 + 16 + 2 * q)
                                          : 0u;
            MmaStep<T>(acc, lo, hi, v, 0u, gi, j);
          }
        }
      }
    }

    const bool fast = seg.k > 0;  // act-only rows: GeluInPlaceCuda's formula
#pragma unroll
    for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        const int c = col0 + 32 * gi + 8 * q;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = row0 + 16 * mi + g + 8 * h;
          if (r >= row_end || c >= args.n) continue;
          alignas(16) T out[8];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float v = acc[mi][gi][j][2 * h + e];
              out[2 * j + e] = cuda::FromFloat<T>(fast ? ActFast<kAct>(v) : Act<kAct>(v));
            }
          }
          *reinterpret_cast<uint4*>(y + r * args.ldy + c) = *reinterpret_cast<const uint4*>(out);
        }
      }
    }
  }
}

bool Aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace

KernelStatus LoraExpandActCuda(const LoraExpandActParams& p, cudaStream_t stream) {
  if (KernelStatus st = LoraExpandActCheck(p); st != KernelStatus::kOk) return st;
  if (p.dtype != DataType::kBF16 && p.dtype != DataType::kF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (p.n % 8 != 0 || p.ldy % 8 != 0 || (p.y != nullptr && !Aligned(p.y, 16)) || p.ldt % 8 != 0 ||
      p.t_col % 8 != 0 || p.ldb % 8 != 0 || (p.t != nullptr && !Aligned(p.t, 16)) ||
      (p.b != nullptr && !Aligned(p.b, 16))) {
    return KernelStatus::kInvalidShape;
  }
  ExpandActArgs args;
  args.y = p.y;
  args.ldy = p.ldy;
  args.n = p.n;
  args.t = p.t;
  args.ldt = p.ldt;
  args.t_col = p.t_col;
  args.b = p.b;
  args.ldb = p.ldb;
  const int iters = p.rows_per_block == 0 ? 1 : p.rows_per_block / kTileRows;
  if (p.rows_per_block != 0 && p.rows_per_block != 32 && p.rows_per_block != 64 &&
      p.rows_per_block != 128) {
    return KernelStatus::kInvalidShape;
  }
  const int block_rows = iters * kTileRows;
  int tiles = 0, num = 0;
  for (int s = 0; s < p.num_segments; ++s) {
    const LoraExpandActSegment& g = p.segments[s];
    if (g.rows == 0) continue;
    if (g.b_col % 8 != 0) return KernelStatus::kInvalidShape;
    args.segments[num] = g;
    args.tile_start[num++] = tiles;
    tiles += (g.rows + block_rows - 1) / block_rows;
  }
  args.tile_start[num] = tiles;
  args.num_segments = num;
  if (tiles == 0 || p.n == 0) return KernelStatus::kOk;
  if (tiles > 65535) return KernelStatus::kInvalidShape;
  const dim3 grid((p.n + kBlockCols - 1) / kBlockCols, tiles);
  return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto act) {
      constexpr int kAct = decltype(act)::value;
      switch (iters) {
        case 1:
          LoraExpandActKernel<T, kAct, 1><<<grid, kWarps * 32, 0, stream>>>(args);
          break;
        case 2:
          LoraExpandActKernel<T, kAct, 2><<<grid, kWarps * 32, 0, stream>>>(args);
          break;
        default:
          LoraExpandActKernel<T, kAct, 4><<<grid, kWarps * 32, 0, stream>>>(args);
          break;
      }
      return cuda::LaunchStatus();
    };
    switch (p.act) {
      case GemmEpilogue::kNone:
        return launch(std::integral_constant<int, 0>{});
      case GemmEpilogue::kGeluTanh:
        return launch(std::integral_constant<int, 1>{});
      case GemmEpilogue::kGeluErf:
        return launch(std::integral_constant<int, 2>{});
    }
    return KernelStatus::kInvalidShape;
  });
}

}  // namespace phishard
