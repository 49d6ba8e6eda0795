#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/lora_gemm_cuda.h"

namespace phishard {
namespace {

constexpr int kThreads = 256;

struct GatherArgs {
  LoraGatherJob jobs[kLoraGatherMaxJobs];
  const SgmvWeight* table;
  int stride, num_slots;
  const LoraStepAdapter* adapters;
};

__device__ __forceinline__ const SgmvWeight* Weight(const SgmvWeight* table, int stride,
                                                    int num_slots, int slot, int entry) {
  if (slot < 0 || slot >= num_slots || entry < 0 || entry >= stride) return nullptr;
  return table + static_cast<size_t>(slot) * stride + entry;
}

// Block (chunk group, adapter, job); every thread copies kIlp chunks of 8 consecutive 16-bit
// values (one uint4 each) of the adapter's part of the job's destination, chunks e = base + u x
// kThreads for u < kIlp (coalesced for each u), all loads issued before the stores, grid-striding
// over the part:
//   A: the part is rows [base + col, + width) x dim: chunk e -> row e / (dim / 8), 8 columns;
//   B: the part is dim rows x columns [base + col, + width): chunk e -> row e / (width / 8).
// A part is at most a few hundred KB, so one chunk a thread (kIlp 1) made thousands of short
// blocks each waiting on one load; kIlp 8 keeps 8 loads in flight per thread with 8x fewer blocks.
template <int kIlp>
__global__ void __launch_bounds__(kThreads) GatherKernel(const GatherArgs args) {
  const LoraGatherJob& job = args.jobs[blockIdx.z];
  const LoraStepAdapter ad = args.adapters[blockIdx.y];
  const SgmvWeight* w = Weight(args.table, args.stride, args.num_slots, ad.slot, job.entry);
  const int width = ad.width;
  const int rank = w == nullptr ? 0 : min(max(w->rank, 0), width);
  const uint16_t* src =
      w == nullptr ? nullptr : static_cast<const uint16_t*>(job.is_b ? w->b : w->a);
  const int per_row = job.is_b ? width / 8 : job.dim / 8;
  const int chunks = (job.is_b ? job.dim : width) * per_row;  // < 2^31 (LoraGatherCuda)
  const bool b_vec = (rank & 7) == 0;
  const int part = job.base + job.col_mul * ad.col + job.width_slot * width +
                   job.index_mul * static_cast<int>(blockIdx.y);
  uint16_t* dst = static_cast<uint16_t*>(job.dst);
  for (int first = blockIdx.x * kThreads * kIlp + threadIdx.x; first < chunks;
       first += gridDim.x * kThreads * kIlp) {
    uint4 v[kIlp];
    size_t at[kIlp];
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const int e = first + u * kThreads;
      v[u] = make_uint4(0, 0, 0, 0);
      at[u] = 0;
      if (e >= chunks) continue;
      const int row = e / per_row, c8 = (e % per_row) * 8;
      if (!job.is_b) {
        // A row `row` of the adapter, columns c8 .. c8 + 7 (A rows are 16-byte aligned: dim % 8).
        if (row < rank && src != nullptr) {
          v[u] =
              __ldg(reinterpret_cast<const uint4*>(src + static_cast<size_t>(row) * job.dim + c8));
        }
        at[u] = static_cast<size_t>(part + row) * job.dim + c8;
        continue;
      }
      // B row `row`, ranks c8 .. c8 + 7.
      const uint16_t* s = src == nullptr ? nullptr : src + static_cast<size_t>(row) * rank + c8;
      if (src != nullptr && b_vec && c8 + 8 <= rank) {
        v[u] = __ldg(reinterpret_cast<const uint4*>(s));
      } else if (src != nullptr) {
        alignas(16) uint16_t h[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) h[q] = c8 + q < rank ? s[q] : uint16_t{0};
        v[u] = *reinterpret_cast<const uint4*>(h);
      }
      at[u] = static_cast<size_t>(row) * job.ld + part + c8;
    }
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      if (first + u * kThreads < chunks) *reinterpret_cast<uint4*>(dst + at[u]) = v[u];
    }
  }
}

struct MaskArgs {
  LoraMaskParams p;
};

// One thread per (row, column) of the launched blocks.
template <typename T>
__global__ void __launch_bounds__(kThreads) MaskKernel(const MaskArgs args) {
  const LoraMaskParams& p = args.p;
  const int cols = p.num_blocks * p.rank_cols;
  const int64_t total = static_cast<int64_t>(p.rows) * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int i = static_cast<int>(e / cols), cc = static_cast<int>(e % cols);
    const int b = p.first_block + cc / p.rank_cols, c = b * p.rank_cols + cc % p.rank_cols;
    const int oc = p.split ? 2 * b * p.rank_cols + cc % p.rank_cols : c;
    float v = 0.0f;
    const int a = p.row_adapter[i];
    if (a >= 0 && a < p.num_adapters) {
      const LoraStepAdapter ad = p.adapters[a];
      const int k = cc % p.rank_cols - ad.col;
      if (k >= 0 && k < ad.width) {
        const SgmvWeight* w = Weight(p.table, p.stride, p.num_slots, ad.slot, p.entries[b]);
        if (w != nullptr && k < w->rank) {
          const int tc = p.t_per_module ? p.t_block_col[b] + k : c;
          v = p.t[static_cast<size_t>(i) * p.ldt + tc] * w->scale;
        }
      }
    }
    T* o = static_cast<T*>(p.out) + static_cast<size_t>(i) * p.ldo + oc;
    const T hi = cuda::FromFloat<T>(v);
    o[0] = hi;
    if (p.split) o[p.rank_cols] = cuda::FromFloat<T>(v - cuda::ToFloat(hi));
  }
}

// v[q] = t[i, tc + q] x w.scale for the 8 columns k .. k + 7 of a rank window (two float4 loads:
// tc is a multiple of 8), 0 past the module's rank (those t columns lie inside the window's memory
// but are never used).
__device__ __forceinline__ void ScaledT8(const LoraMaskParams& p, int i, int tc, int k,
                                         const SgmvWeight& w, float v[8]) {
  const float4* src = reinterpret_cast<const float4*>(p.t + static_cast<size_t>(i) * p.ldt + tc);
  const float4 lo = src[0], hi = src[1];
  const float tv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int q = 0; q < 8; ++q) v[q] = k + q < w.rank ? tv[q] * w.scale : 0.0f;
}

// o[0..8) = the 16-bit rounding (hi) of v, and where lo_offset >= 0, o[lo_offset ..] = the
// rounding of what hi missed (lo), each as one 16-byte store (o 16-byte aligned).
template <typename T>
__device__ __forceinline__ void StoreHiLo8(T* o, const float v[8], int lo_offset) {
  alignas(16) T hi8[8];
  alignas(16) T lo8[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    hi8[q] = cuda::FromFloat<T>(v[q]);
    lo8[q] = cuda::FromFloat<T>(v[q] - cuda::ToFloat(hi8[q]));
  }
  *reinterpret_cast<uint4*>(o) = *reinterpret_cast<const uint4*>(hi8);
  if (lo_offset >= 0) {
    *reinterpret_cast<uint4*>(o + lo_offset) = *reinterpret_cast<const uint4*>(lo8);
  }
}

// MaskKernel with 8 consecutive columns a thread (rank_cols, the adapters' windows and every column
// offset are multiples of 8, so a chunk lies wholly inside one window or outside all): t read
// as two float4, hi and lo stored as one 16-byte word each. Elements past the module's rank read
// t (inside the window's memory) but select 0, so nothing outside a rank window leaks.
template <typename T>
__global__ void __launch_bounds__(kThreads) MaskKernel8(const MaskArgs args) {
  const LoraMaskParams& p = args.p;
  const int chunks = p.num_blocks * p.rank_cols / 8;  // per row
  const int64_t total = static_cast<int64_t>(p.rows) * chunks;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int i = static_cast<int>(e / chunks), cc = static_cast<int>(e % chunks) * 8;
    const int b = p.first_block + cc / p.rank_cols, c = b * p.rank_cols + cc % p.rank_cols;
    const int oc = p.split ? 2 * b * p.rank_cols + cc % p.rank_cols : c;
    float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const int a = p.row_adapter[i];
    if (a >= 0 && a < p.num_adapters) {
      const LoraStepAdapter ad = p.adapters[a];
      const int k = cc % p.rank_cols - ad.col;
      if (k >= 0 && k < ad.width) {
        const SgmvWeight* w = Weight(p.table, p.stride, p.num_slots, ad.slot, p.entries[b]);
        if (w != nullptr && k < w->rank) {
          const int tc = p.t_per_module ? p.t_block_col[b] + k : c;
          ScaledT8(p, i, tc, k, *w, v);
        }
      }
    }
    StoreHiLo8(static_cast<T*>(p.out) + static_cast<size_t>(i) * p.ldo + oc, v,
               p.split ? p.rank_cols : -1);
  }
}

// Compact: one thread per (row, launched block, 8 columns of [0, compact_width)); a row writes
// only chunks inside its adapter's width (base rows nothing), hi and lo at their part's columns.
template <typename T>
__global__ void __launch_bounds__(kThreads) MaskCompactKernel(const MaskArgs args) {
  const LoraMaskParams& p = args.p;
  const int per_block = p.compact_width / 8;
  const int chunks = p.num_blocks * per_block;  // per row
  const int w = p.split ? 2 : 1;
  const int64_t total = static_cast<int64_t>(p.rows) * chunks;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int i = static_cast<int>(e / chunks), cc = static_cast<int>(e % chunks);
    const int a = p.row_adapter[i];
    if (a < 0 || a >= p.num_adapters) continue;
    const LoraStepAdapter ad = p.adapters[a];
    const int b = p.first_block + cc / per_block, k = (cc % per_block) * 8;
    if (k >= ad.width) continue;
    float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const SgmvWeight* wt = Weight(p.table, p.stride, p.num_slots, ad.slot, p.entries[b]);
    if (wt != nullptr && k < wt->rank) {
      const int tc = p.t_per_module ? p.t_block_col[b] + p.t_block_slot[b] * ad.width + k
                                    : b * p.rank_cols + ad.col + k;
      ScaledT8(p, i, tc, k, *wt, v);
    }
    StoreHiLo8(static_cast<T*>(p.out) + static_cast<size_t>(i) * p.ldo + p.out_block_col[b] +
                   p.out_block_slot[b] * w * ad.width + k,
               v, p.split ? ad.width : -1);
  }
}

int Blocks(int64_t work) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 4096)));
}

}  // namespace

KernelStatus LoraGatherCuda(const LoraGatherParams& p, cudaStream_t stream) {
  if (p.dtype != DataType::kBF16 && p.dtype != DataType::kF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (p.num_jobs < 0 || p.num_jobs > kLoraGatherMaxJobs || p.num_adapters < 0 ||
      p.num_adapters > 65535 || p.stride < 0 || p.num_slots < 0) {
    return KernelStatus::kInvalidShape;
  }
  int64_t most = 0;
  for (int j = 0; j < p.num_jobs; ++j) {
    const LoraGatherJob& job = p.jobs[j];
    if (job.dim <= 0 || job.base < 0 || (job.base & 7) != 0 || job.col_mul < 0 ||
        job.width_slot < 0 || job.index_mul < 0 || (job.index_mul & 7) != 0 ||
        (job.is_b ? ((job.ld & 7) != 0 || job.ld <= 0) : (job.dim & 7) != 0)) {
      return KernelStatus::kInvalidShape;
    }
    most = std::max<int64_t>(most, job.dim);
  }
  if (p.num_jobs == 0 || p.num_adapters == 0) return KernelStatus::kOk;
  for (int j = 0; j < p.num_jobs; ++j) {
    if (p.jobs[j].dst == nullptr) return KernelStatus::kNullPointer;
  }
  if (p.table == nullptr || p.adapters == nullptr) return KernelStatus::kNullPointer;
  GatherArgs args;
  for (int j = 0; j < kLoraGatherMaxJobs; ++j) args.jobs[j] = p.jobs[j];
  args.table = p.table;
  args.stride = p.stride;
  args.num_slots = p.num_slots;
  args.adapters = p.adapters;
  if (p.max_width <= 0 || (p.max_width & 7) != 0) return KernelStatus::kInvalidShape;
  if (most * p.max_width / 8 >= (int64_t{1} << 30)) return KernelStatus::kInvalidShape;
  if (p.chunks_per_thread != 1 && p.chunks_per_thread != 8) return KernelStatus::kInvalidShape;
  // Widths live on the device: blocks for the largest part (max_width x the largest dim).
  const int64_t part_chunks = most * p.max_width / 8;
  if (p.chunks_per_thread == 1) {
    const dim3 grid(Blocks(part_chunks), p.num_adapters, p.num_jobs);
    GatherKernel<1><<<grid, kThreads, 0, stream>>>(args);
  } else {
    const dim3 grid(Blocks((part_chunks + 7) / 8), p.num_adapters, p.num_jobs);
    GatherKernel<8><<<grid, kThreads, 0, stream>>>(args);
  }
  return cuda::LaunchStatus();
}

KernelStatus LoraMaskCuda(const LoraMaskParams& p, cudaStream_t stream) {
  if (p.dtype != DataType::kBF16 && p.dtype != DataType::kF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (p.rows < 0 || p.rank_cols < 0 || p.first_block < 0 || p.num_blocks < 0 ||
      p.first_block + p.num_blocks > 6 ||
      (!p.t_per_module &&
       static_cast<int64_t>(p.first_block + p.num_blocks) * p.rank_cols > p.ldt) ||
      (!p.compact &&
       static_cast<int64_t>(p.first_block + p.num_blocks) * p.rank_cols * (p.split ? 2 : 1) >
           p.ldo) ||
      p.num_adapters < 0) {
    return KernelStatus::kInvalidShape;
  }
  if (p.t_per_module) {
    for (int b = p.first_block; b < p.first_block + p.num_blocks; ++b) {
      if (p.t_block_col[b] < 0 || p.t_block_col[b] >= p.ldt) return KernelStatus::kInvalidShape;
    }
  }
  if (p.compact) {
    // Widths live on the device; the caller keeps each row's block inside ldo (compact_width).
    bool ok = p.compact_width > 0 && p.compact_width % 8 == 0 && p.ldo % 8 == 0 && p.ldt % 4 == 0 &&
              p.rank_cols % 8 == 0;
    for (int b = p.first_block; b < p.first_block + p.num_blocks; ++b) {
      const int64_t end = p.out_block_col[b] + static_cast<int64_t>(p.out_block_slot[b] + 1) *
                                                   (p.split ? 2 : 1) * p.compact_width;
      const int64_t t_end =
          p.t_block_col[b] + static_cast<int64_t>(p.t_block_slot[b] + 1) * p.compact_width;
      ok = ok && p.out_block_col[b] >= 0 && p.out_block_col[b] % 8 == 0 &&
           p.out_block_slot[b] >= 0 && end <= p.ldo &&
           (!p.t_per_module ||
            (p.t_block_col[b] % 8 == 0 && p.t_block_slot[b] >= 0 && t_end <= p.ldt));
    }
    if (!ok) return KernelStatus::kInvalidShape;
  }
  if (p.rows == 0 || p.num_blocks == 0 || p.rank_cols == 0) return KernelStatus::kOk;
  if (p.t == nullptr || p.out == nullptr || p.row_adapter == nullptr ||
      (p.num_adapters > 0 && (p.adapters == nullptr || p.table == nullptr))) {
    return KernelStatus::kNullPointer;
  }
  MaskArgs args{p};
  if (p.compact) {
    if ((reinterpret_cast<uintptr_t>(p.t) & 15) != 0 ||
        (reinterpret_cast<uintptr_t>(p.out) & 15) != 0) {
      return KernelStatus::kInvalidShape;
    }
    const int blocks = Blocks(static_cast<int64_t>(p.rows) * p.num_blocks * (p.compact_width / 8));
    return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      MaskCompactKernel<T><<<blocks, kThreads, 0, stream>>>(args);
      return cuda::LaunchStatus();
    });
  }
  // 8 columns a thread where every offset it forms is a multiple of 8 (16-byte aligned).
  bool vec = p.rank_cols % 8 == 0 && p.ldt % 4 == 0 && p.ldo % 8 == 0 &&
             (reinterpret_cast<uintptr_t>(p.t) & 15) == 0 &&
             (reinterpret_cast<uintptr_t>(p.out) & 15) == 0;
  for (int b = 0; b < 6 && p.t_per_module; ++b) vec = vec && p.t_block_col[b] % 4 == 0;
  const int64_t elements = static_cast<int64_t>(p.rows) * p.num_blocks * p.rank_cols;
  const int blocks = Blocks(vec ? elements / 8 : elements);
  return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (vec) {
      MaskKernel8<T><<<blocks, kThreads, 0, stream>>>(args);
    } else {
      MaskKernel<T><<<blocks, kThreads, 0, stream>>>(args);
    }
    return cuda::LaunchStatus();
  });
}

namespace {

// Runs make(first, count) (a GemmParams for segments [first, first + count) as one strided
// batch; count 1: a plain GEMM) over every run of segments that follow each other at a constant
// step: as many rows, as wide, each right after the previous one in rows and in the rank axis
// (adapters numbered in order of first use, one per sequence: the usual prefill batch) -> one
// launch with enough CTAs to fill the GPU instead of one small GEMM each. If cuBLASLt has no
// batched algorithm for a run (nothing was launched), one GEMM per segment instead.
template <typename Make>
KernelStatus RunSegments(CudaGemm& gemm, const LoraSegment* segs, int num_segments,
                         DataType y_dtype, const Make& make, cudaStream_t stream) {
  for (int s = 0; s < num_segments;) {
    const LoraSegment& g = segs[s];
    int count = 1;
    while (s + count < num_segments) {
      const LoraSegment& h = segs[s + count];
      if (h.rows != g.rows || h.width != g.width || h.row != g.row + count * g.rows ||
          h.col != g.col + count * g.width) {
        break;
      }
      ++count;
    }
    if (g.rows > 0) {
      KernelStatus st = gemm.Run(make(s, count), y_dtype, stream);
      if (st != KernelStatus::kOk && count > 1) {
        for (int i = 0; i < count; ++i) {
          if ((st = gemm.Run(make(s + i, 1), y_dtype, stream)) != KernelStatus::kOk) return st;
        }
      }
      if (st != KernelStatus::kOk) return st;
    }
    s += count;
  }
  return KernelStatus::kOk;
}

bool SegmentOk(const LoraSegment& g) {
  return g.row >= 0 && g.rows >= 0 && g.col >= 0 && g.width > 0;
}

}  // namespace

KernelStatus LoraSegmentExpandCuda(CudaGemm& gemm, const LoraSegmentExpandParams& p,
                                   cudaStream_t stream) {
  if (p.n <= 0 || p.parts < 1 || p.t_col < 0 || p.ldy < p.n || p.num_segments < 0 ||
      (p.num_segments > 0 && p.segments == nullptr)) {
    return KernelStatus::kInvalidShape;
  }
  for (int s = 0; s < p.num_segments; ++s) {
    const LoraSegment& g = p.segments[s];
    if (!SegmentOk(g) || p.t_col + p.parts * g.width > p.ldt ||
        p.parts * (g.col + g.width) > p.ldb) {
      return KernelStatus::kInvalidShape;
    }
  }
  if (p.num_segments > 0 && (p.t == nullptr || p.b == nullptr || p.y == nullptr)) {
    return KernelStatus::kNullPointer;
  }
  const size_t elem = DataTypeSize(p.dtype);
  auto make = [&](int first, int count) {
    const LoraSegment& g = p.segments[first];
    return GemmParams{
        .x = static_cast<const char*>(p.t) + (static_cast<size_t>(g.row) * p.ldt + p.t_col) * elem,
        .w = static_cast<const char*>(p.b) + static_cast<size_t>(p.parts) * g.col * elem,
        .y = static_cast<char*>(p.y) + static_cast<size_t>(g.row) * p.ldy * elem,
        .m = g.rows,
        .n = p.n,
        .k = p.parts * g.width,
        .ldx = p.ldt,
        .ldy = p.ldy,
        .ldw = p.ldb,
        .accumulate = p.accumulate,
        .epilogue = p.act,
        .dtype = p.dtype,
        .batch = count,
        .batch_stride_x = static_cast<int64_t>(g.rows) * p.ldt,
        .batch_stride_w = static_cast<int64_t>(p.parts) * g.width,
        .batch_stride_y = static_cast<int64_t>(g.rows) * p.ldy};
  };
  return RunSegments(gemm, p.segments, p.num_segments, p.dtype, make, stream);
}

KernelStatus LoraSegmentShrinkCuda(CudaGemm& gemm, const LoraSegmentShrinkParams& p,
                                   cudaStream_t stream) {
  if (p.k <= 0 || p.ldx < p.k || p.blocks < 1 || p.t_col < 0 || p.num_segments < 0 ||
      (p.num_segments > 0 && p.segments == nullptr)) {
    return KernelStatus::kInvalidShape;
  }
  for (int s = 0; s < p.num_segments; ++s) {
    const LoraSegment& g = p.segments[s];
    if (!SegmentOk(g) || p.t_col + p.blocks * g.width > p.ldt) return KernelStatus::kInvalidShape;
  }
  if (p.num_segments > 0 && (p.x == nullptr || p.a == nullptr || p.t == nullptr)) {
    return KernelStatus::kNullPointer;
  }
  const size_t elem = DataTypeSize(p.dtype);
  auto make = [&](int first, int count) {
    const LoraSegment& g = p.segments[first];
    return GemmParams{
        .x = static_cast<const char*>(p.x) + static_cast<size_t>(g.row) * p.ldx * elem,
        .w = static_cast<const char*>(p.a) + static_cast<size_t>(p.blocks) * g.col * p.k * elem,
        .y = p.t + static_cast<size_t>(g.row) * p.ldt + p.t_col,
        .m = g.rows,
        .n = p.blocks * g.width,
        .k = p.k,
        .ldx = p.ldx,
        .ldy = p.ldt,
        .dtype = p.dtype,
        .batch = count,
        .batch_stride_x = static_cast<int64_t>(g.rows) * p.ldx,
        .batch_stride_w = static_cast<int64_t>(p.blocks) * g.width * p.k,
        .batch_stride_y = static_cast<int64_t>(g.rows) * p.ldt};
  };
  return RunSegments(gemm, p.segments, p.num_segments, DataType::kF32, make, stream);
}

}  // namespace phishard
