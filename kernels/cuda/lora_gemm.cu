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

// Block (chunk, adapter, job); every thread writes 8 consecutive 16-bit values (one uint4) of
// the adapter's part of the job's destination, grid-striding over it.
//   A: the part is rows [base + col, + width) x dim: chunk e -> row e / (dim / 8), 8 columns;
//   B: the part is dim rows x columns [base + col, + width): chunk e -> row e / (width / 8).
__global__ void __launch_bounds__(kThreads) GatherKernel(const GatherArgs args) {
  const LoraGatherJob& job = args.jobs[blockIdx.z];
  const LoraStepAdapter ad = args.adapters[blockIdx.y];
  const SgmvWeight* w = Weight(args.table, args.stride, args.num_slots, ad.slot, job.entry);
  const int width = ad.width;
  const int rank = w == nullptr ? 0 : min(max(w->rank, 0), width);
  const uint16_t* src =
      w == nullptr ? nullptr : static_cast<const uint16_t*>(job.is_b ? w->b : w->a);
  const int per_row = job.is_b ? width / 8 : job.dim / 8;
  const int64_t chunks = static_cast<int64_t>(job.is_b ? job.dim : width) * per_row;
  uint16_t* dst = static_cast<uint16_t*>(job.dst);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < chunks;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int row = static_cast<int>(e / per_row), c8 = static_cast<int>(e % per_row) * 8;
    uint16_t v[8];
    if (!job.is_b) {
      // A row `row` of the adapter, columns c8 .. c8 + 7 (A rows are 16-byte aligned: dim % 8).
      uint4 q = make_uint4(0, 0, 0, 0);
      if (row < rank && src != nullptr) {
        q = __ldg(reinterpret_cast<const uint4*>(src + static_cast<size_t>(row) * job.dim + c8));
      }
      *reinterpret_cast<uint4*>(dst + static_cast<size_t>(job.base + ad.col + row) * job.dim + c8) =
          q;
      continue;
    }
    // B row `row`, ranks c8 .. c8 + 7.
    const uint16_t* s = src == nullptr ? nullptr : src + static_cast<size_t>(row) * rank + c8;
    if (src != nullptr && (rank & 7) == 0 && c8 + 8 <= rank) {
      *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(s));
    } else {
#pragma unroll
      for (int q = 0; q < 8; ++q) v[q] = (src != nullptr && c8 + q < rank) ? s[q] : uint16_t{0};
    }
    *reinterpret_cast<uint4*>(dst + static_cast<size_t>(row) * job.ld + job.base + ad.col + c8) =
        *reinterpret_cast<const uint4*>(v);
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

// The same, 8 consecutive columns a thread (rank_cols, the adapters' windows and every column
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
          const float4* src =
              reinterpret_cast<const float4*>(p.t + static_cast<size_t>(i) * p.ldt + tc);
          const float4 lo = src[0], hi = src[1];
          const float tv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int q = 0; q < 8; ++q) v[q] = k + q < w->rank ? tv[q] * w->scale : 0.0f;
        }
      }
    }
    alignas(16) T hi8[8];
    alignas(16) T lo8[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      hi8[q] = cuda::FromFloat<T>(v[q]);
      lo8[q] = cuda::FromFloat<T>(v[q] - cuda::ToFloat(hi8[q]));
    }
    T* o = static_cast<T*>(p.out) + static_cast<size_t>(i) * p.ldo + oc;
    *reinterpret_cast<uint4*>(o) = *reinterpret_cast<const uint4*>(hi8);
    if (p.split) *reinterpret_cast<uint4*>(o + p.rank_cols) = *reinterpret_cast<const uint4*>(lo8);
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
    if (job.dim <= 0 || job.base < 0 || (job.base & 7) != 0 ||
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
  // Widths live on the device: blocks for the largest part (max_width x the largest dim).
  const dim3 grid(Blocks(most * p.max_width / 8), p.num_adapters, p.num_jobs);
  GatherKernel<<<grid, kThreads, 0, stream>>>(args);
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
      static_cast<int64_t>(p.first_block + p.num_blocks) * p.rank_cols * (p.split ? 2 : 1) >
          p.ldo ||
      p.num_adapters < 0) {
    return KernelStatus::kInvalidShape;
  }
  if (p.t_per_module) {
    for (int b = p.first_block; b < p.first_block + p.num_blocks; ++b) {
      if (p.t_block_col[b] < 0 || p.t_block_col[b] >= p.ldt) return KernelStatus::kInvalidShape;
    }
  }
  if (p.rows == 0 || p.num_blocks == 0 || p.rank_cols == 0) return KernelStatus::kOk;
  if (p.t == nullptr || p.out == nullptr || p.row_adapter == nullptr ||
      (p.num_adapters > 0 && (p.adapters == nullptr || p.table == nullptr))) {
    return KernelStatus::kNullPointer;
  }
  MaskArgs args{p};
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

}  // namespace phishard
