#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/custom_all_reduce_cuda.h"
#include "kernels/cuda/peer_sync.cuh"

namespace phishard {
namespace {

using cuda::AddPack;
using cuda::Pack;

// One block: thread 0 signals the peer's block and waits for it; returns false when the wait was
// given up (abort or timeout; the error code is written).
__device__ bool Barrier(const CustomAllReduceParams& p, uint32_t epoch) {
  __shared__ int ok_s;
  __syncthreads();  // every thread's pushes are issued before the release below
  if (threadIdx.x == 0) {
    const int b = blockIdx.x;
    __threadfence_system();
    cuda::StoreReleaseSys(p.peer_flags + b, epoch);
    const int status = cuda::WaitPeerFlag(p.own_flags + b, epoch, p.abort_flag, p.timeout_ns);
    if (status != kCustomAllReduceOk) {
      *static_cast<volatile int*>(p.error) = status;
      __threadfence_system();
    }
    ok_s = status == kCustomAllReduceOk;
  }
  __syncthreads();
  return ok_s != 0;
}

// kVec elements of T per pack; `packs` packs in `data` (16-byte packs or single elements).
template <typename T, int kVec>
__global__ void __launch_bounds__(kCustomAllReduceThreads)
    CustomAllReduceKernel(CustomAllReduceParams p, size_t packs) {
  using P = Pack<T, kVec>;
  __shared__ uint32_t epoch_s;
  if (threadIdx.x == 0) {
    epoch_s = p.epochs[blockIdx.x] + 1;  // only this block of this rank touches its counter
    p.epochs[blockIdx.x] = epoch_s;
  }
  __syncthreads();
  const uint32_t epoch = epoch_s;
  const size_t half = static_cast<size_t>(epoch & 1) * p.capacity_bytes;
  P* data = static_cast<P*>(p.data);
  P* peer = reinterpret_cast<P*>(static_cast<char*>(p.peer_recv) + half);
  const P* own = reinterpret_cast<const P*>(static_cast<const char*>(p.own_recv) + half);
  const size_t first = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = first; i < packs; i += stride) peer[i] = data[i];
  if (!Barrier(p, epoch)) return;
  // The peer wrote `own` over NVLink after this kernel began: read it from L2, not L1.
  for (size_t i = first; i < packs; i += stride) {
    P r;
    if constexpr (sizeof(P) == 16) {
      const uint4 w = __ldcg(reinterpret_cast<const uint4*>(own + i));
      r = *reinterpret_cast<const P*>(&w);
    } else {
      r = own[i];
      static_assert(sizeof(P) == 16 || kVec == 1, "packs are 16 bytes or one element");
    }
    data[i] = AddPack<T, kVec>(data[i], r);
  }
}

}  // namespace

KernelStatus CustomAllReduceCuda(const CustomAllReduceParams& p, cudaStream_t stream) {
  if (p.count == 0) return KernelStatus::kOk;
  if (p.data == nullptr || p.peer_recv == nullptr || p.own_recv == nullptr ||
      p.peer_flags == nullptr || p.own_flags == nullptr || p.epochs == nullptr ||
      p.abort_flag == nullptr || p.error == nullptr) {
    return KernelStatus::kNullPointer;
  }
  const size_t es = DataTypeSize(p.dtype);
  if (p.blocks < 1 || p.blocks > kCustomAllReduceMaxBlocks || p.count > p.capacity_bytes / es ||
      p.capacity_bytes % 16 != 0) {
    return KernelStatus::kInvalidShape;
  }
  const size_t bytes = p.count * es;
  const bool packed = reinterpret_cast<uintptr_t>(p.data) % 16 == 0 && bytes % 16 == 0;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec16 = 16 / sizeof(T);
    if (packed) {
      CustomAllReduceKernel<T, kVec16>
          <<<p.blocks, kCustomAllReduceThreads, 0, stream>>>(p, bytes / 16);
    } else {
      CustomAllReduceKernel<T, 1><<<p.blocks, kCustomAllReduceThreads, 0, stream>>>(p, p.count);
    }
    return cuda::LaunchStatus();
  });
}

KernelStatus LoadCustomAllReduceKernelsCuda() {
  return cuda::LoadKernels(CustomAllReduceKernel<float, 4>, CustomAllReduceKernel<float, 1>,
                           CustomAllReduceKernel<__half, 8>, CustomAllReduceKernel<__half, 1>,
                           CustomAllReduceKernel<__nv_bfloat16, 8>,
                           CustomAllReduceKernel<__nv_bfloat16, 1>);
}

}  // namespace phishard
