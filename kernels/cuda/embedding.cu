#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/embedding_cuda.h"

namespace phishard {
namespace {

// One block per output row; threads stride over the row. Rows are copied as 16-byte vectors when
// the row width in bytes and both base pointers allow it, else element by element.
template <typename T, typename V>
__global__ void EmbeddingKernel(const int32_t* __restrict__ ids, const V* __restrict__ table,
                                V* __restrict__ out, int num_rows, int row_offset,
                                int vecs_per_row) {
  const int t = blockIdx.x;
  const int local = ids[t] - row_offset;
  V* dst = out + static_cast<size_t>(t) * vecs_per_row;
  if (local < 0 || local >= num_rows) {
    V zero;
    memset(&zero, 0, sizeof(V));
    for (int i = threadIdx.x; i < vecs_per_row; i += blockDim.x) dst[i] = zero;
    return;
  }
  const V* src = table + static_cast<size_t>(local) * vecs_per_row;
  for (int i = threadIdx.x; i < vecs_per_row; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

KernelStatus EmbeddingCuda(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_rows <= 0 || p.dim <= 0) return KernelStatus::kInvalidShape;
  if (p.num_tokens == 0) return KernelStatus::kOk;
  if (!p.ids || !p.table || !p.out) return KernelStatus::kNullPointer;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const size_t row_bytes = sizeof(T) * static_cast<size_t>(p.dim);
    const bool vec16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p.table) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
    const int threads = 128;
    if (vec16) {
      EmbeddingKernel<T, uint4><<<p.num_tokens, threads, 0, stream>>>(
          p.ids, static_cast<const uint4*>(p.table), static_cast<uint4*>(p.out), p.num_rows,
          p.row_offset, static_cast<int>(row_bytes / 16));
    } else {
      EmbeddingKernel<T, T><<<p.num_tokens, threads, 0, stream>>>(
          p.ids, static_cast<const T*>(p.table), static_cast<T*>(p.out), p.num_rows, p.row_offset,
          p.dim);
    }
    return cuda::LaunchStatus();
  });
}

}  // namespace phishard
