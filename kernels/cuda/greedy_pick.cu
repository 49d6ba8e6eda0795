#include <climits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/greedy_pick_cuda.h"

namespace phishard {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = kGreedyPickChunk / kThreads;  // 16 columns a thread
static_assert(kGreedyPickChunk % kThreads == 0);

// A candidate of the argmax: idx == INT_MAX means "no non-NaN entry seen".
struct Best {
  float val;
  int idx;
};

// The better of two candidates: larger value, then lower index (the host's first-index rule).
__device__ __forceinline__ Best Better(Best a, Best b) {
  if (b.idx == INT_MAX) return a;
  if (a.idx == INT_MAX) return b;
  if (a.val > b.val) return a;
  if (b.val > a.val) return b;
  return a.idx < b.idx ? a : b;
}

__device__ __forceinline__ Best WarpBest(Best v) {
  for (int o = 16; o > 0; o >>= 1) {
    Best other{__shfl_xor_sync(0xffffffffu, v.val, o), __shfl_xor_sync(0xffffffffu, v.idx, o)};
    v = Better(v, other);
  }
  return v;
}

__device__ __forceinline__ double WarpSumD(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block (chunk, row): columns [chunk * kGreedyPickChunk, +kGreedyPickChunk) of one part of the
// row. Thread t owns columns t, t + 256, ... (coalesced); its 16 loads are issued together, then
// argmax and finite max, then the sum of exp(x - max) in double from the registers (one pass
// over memory). Fixed reduction order: the same bits on every launch and every rank.
__global__ void __launch_bounds__(kThreads)
    GreedyChunkKernel(const float* __restrict__ logits, GreedyPickPartial* __restrict__ partials,
                      int part_cols, int chunks_per_part, int64_t part_stride, int64_t row_stride) {
  __shared__ Best best_s[kWarps];
  __shared__ float max_s[kWarps];
  __shared__ double sum_s[kWarps];
  // The merge kernel may launch now; it waits for this grid before reading the partials.
  asm volatile("griddepcontrol.launch_dependents;" :::);
  const int row = blockIdx.y;
  const int part = blockIdx.x / chunks_per_part;
  const int j0 = (blockIdx.x % chunks_per_part) * kGreedyPickChunk;
  const float* xp = logits + part * part_stride + row * row_stride;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  float x[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int j = j0 + k * kThreads + threadIdx.x;
    x[k] = j < part_cols ? xp[j] : NAN;  // NaN: ignored like the row's own NaNs
  }
  Best best{-INFINITY, INT_MAX};
  float mx = -INFINITY;  // over finite entries
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {  // increasing columns: keeps the first of equal values
    const float s = x[k];
    if (isnan(s)) continue;
    if (best.idx == INT_MAX || s > best.val)
      best = {s, part * part_cols + j0 + k * kThreads + static_cast<int>(threadIdx.x)};
    if (isfinite(s)) mx = fmaxf(mx, s);
  }
  best = WarpBest(best);
  mx = cuda::WarpMax(mx);
  if (lane == 0) {
    best_s[warp] = best;
    max_s[warp] = mx;
  }
  __syncthreads();
  best = lane < kWarps ? best_s[lane] : Best{-INFINITY, INT_MAX};
  mx = lane < kWarps ? max_s[lane] : -INFINITY;
  best = WarpBest(best);
  mx = cuda::WarpMax(mx);  // every warp holds the chunk's result

  double sum = 0.0;
  if (isfinite(mx)) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      if (isfinite(x[k])) sum += exp(static_cast<double>(x[k]) - mx);
    }
  }
  sum = WarpSumD(sum);
  if (lane == 0) sum_s[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += sum_s[w];
    partials[static_cast<int64_t>(row) * gridDim.x + blockIdx.x] =
        GreedyPickPartial{best.val, best.idx, mx, total};
  }
}

// One warp a row: lane c takes chunks c, c + 32, ... (their best, max and rescaled sums), the warp
// reduces them in a fixed shuffle order (the sums in double), then logprob = x[id] - lse with
// x[id] the chunk's own best value (the same float the logits hold; no second read). Launched as
// a programmatic dependent of the chunk kernel: it waits for it before reading the partials.
__global__ void GreedyMergeKernel(const GreedyPickPartial* __restrict__ partials,
                                  GreedyPick* __restrict__ out, int rows, int chunks) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int row = blockIdx.x * (blockDim.x / 32) + static_cast<int>(threadIdx.x / 32);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const GreedyPickPartial* p = partials + static_cast<int64_t>(row) * chunks;
  Best best{-INFINITY, INT_MAX};
  float mx = -INFINITY;
  for (int c = lane; c < chunks; c += 32) {
    best = Better(best, Best{p[c].best_val, p[c].best_idx});
    mx = fmaxf(mx, p[c].max);
  }
  best = WarpBest(best);
  mx = cuda::WarpMax(mx);
  double total = 0.0;
  if (isfinite(mx)) {
    for (int c = lane; c < chunks; c += 32) {
      if (isfinite(p[c].max)) total += p[c].sum * exp(static_cast<double>(p[c].max) - mx);
    }
  }
  total = WarpSumD(total);
  if (lane != 0) return;
  const double lse = isfinite(mx) ? mx + log(total) : -INFINITY;
  // No non-NaN entry: id 0, whose value is NaN.
  out[row] = best.idx == INT_MAX
                 ? GreedyPick{0, NAN}
                 : GreedyPick{best.idx, static_cast<float>(static_cast<double>(best.val) - lse)};
}

}  // namespace

KernelStatus GreedyPickCuda(const GreedyPickParams& p, cudaStream_t stream) {
  if (KernelStatus st = GreedyPickCheck(p); st != KernelStatus::kOk) return st;
  if (p.rows == 0) return KernelStatus::kOk;
  if (p.workspace == nullptr) return KernelStatus::kNullPointer;
  if (p.rows > 65535) return KernelStatus::kInvalidShape;  // rows are grid.y
  const int chunks_per_part = (p.part_cols + kGreedyPickChunk - 1) / kGreedyPickChunk;
  const int chunks = GreedyPickChunksPerRow(p.cols, p.part_cols);
  const int64_t part_stride = p.cols == p.part_cols ? 0 : p.part_stride;
  auto* partials = static_cast<GreedyPickPartial*>(p.workspace);
  GreedyChunkKernel<<<dim3(chunks, p.rows), kThreads, 0, stream>>>(
      p.logits, partials, p.part_cols, chunks_per_part, part_stride, p.row_stride);
  if (KernelStatus st = cuda::LaunchStatus(); st != KernelStatus::kOk) return st;
  constexpr int kMergeRows = 4;  // warps a block
  return cuda::LaunchMaybeProgrammatic(
      GreedyMergeKernel, dim3((p.rows + kMergeRows - 1) / kMergeRows), dim3(32 * kMergeRows), 0,
      stream, /*programmatic=*/true, static_cast<const GreedyPickPartial*>(partials), p.out, p.rows,
      chunks);
}

}  // namespace phishard
