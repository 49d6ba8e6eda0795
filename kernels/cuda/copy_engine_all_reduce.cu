#include <cstdint>

#include "kernels/cuda/copy_engine_all_reduce_cuda.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/peer_sync.cuh"

namespace phishard {
namespace {

constexpr int kAddThreads = 512;

// One warp; lane 0 waits for the peer's arrival flag (the other lanes idle: a warp is the
// smallest unit the SM schedules anyway).
__global__ void PeerArrivalWaitKernel(CopyEngineAddParams p) {
  if (threadIdx.x != 0) return;
  const int status = cuda::WaitPeerFlag(p.own_flag, p.epoch, p.abort_flag, p.timeout_ns);
  if (status != kCustomAllReduceOk) {
    *static_cast<volatile int*>(p.error) = status;
    __threadfence_system();
  }
}

// Each thread: packs first, first + stride, ... of `packs` (kVec elements of T each).
template <typename T, int kVec>
__global__ void __launch_bounds__(kAddThreads)
    ReceivedAddKernel(void* data_v, const void* received_v, size_t packs) {
  using P = cuda::Pack<T, kVec>;
  P* data = static_cast<P*>(data_v);
  const P* received = static_cast<const P*>(received_v);
  const size_t first = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = first; i < packs; i += stride) {
    // The peer's copy engine wrote `received` after earlier kernels may have cached it: L2 only.
    P r;
    if constexpr (sizeof(P) == 16) {
      const uint4 w = __ldcg(reinterpret_cast<const uint4*>(received + i));
      r = *reinterpret_cast<const P*>(&w);
    } else {
      static_assert(sizeof(P) == 16 || kVec == 1, "packs are 16 bytes or one element");
      r = received[i];
    }
    data[i] = cuda::AddPack<T, kVec>(data[i], r);
  }
}

}  // namespace

KernelStatus CopyEngineWaitAddCuda(const CopyEngineAddParams& p, cudaStream_t stream) {
  if (p.count == 0) return KernelStatus::kOk;
  if (p.data == nullptr || p.received == nullptr || p.own_flag == nullptr ||
      p.abort_flag == nullptr || p.error == nullptr) {
    return KernelStatus::kNullPointer;
  }
  if (p.blocks < 1) return KernelStatus::kInvalidShape;
  PeerArrivalWaitKernel<<<1, 32, 0, stream>>>(p);
  if (KernelStatus k = cuda::LaunchStatus(); k != KernelStatus::kOk) return k;
  const size_t bytes = p.count * DataTypeSize(p.dtype);
  const bool packed = reinterpret_cast<uintptr_t>(p.data) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(p.received) % 16 == 0 && bytes % 16 == 0;
  return cuda::DispatchAllTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec16 = 16 / sizeof(T);
    const size_t packs = packed ? bytes / 16 : p.count;
    const size_t want = (packs + kAddThreads - 1) / kAddThreads;
    const int grid = static_cast<int>(want < static_cast<size_t>(p.blocks) ? want : p.blocks);
    if (packed) {
      ReceivedAddKernel<T, kVec16><<<grid, kAddThreads, 0, stream>>>(p.data, p.received, packs);
    } else {
      ReceivedAddKernel<T, 1><<<grid, kAddThreads, 0, stream>>>(p.data, p.received, packs);
    }
    return cuda::LaunchStatus();
  });
}

KernelStatus LoadCopyEngineKernelsCuda() {
  return cuda::LoadKernels(PeerArrivalWaitKernel, ReceivedAddKernel<float, 4>,
                           ReceivedAddKernel<float, 1>, ReceivedAddKernel<__half, 8>,
                           ReceivedAddKernel<__half, 1>, ReceivedAddKernel<__nv_bfloat16, 8>,
                           ReceivedAddKernel<__nv_bfloat16, 1>);
}

}  // namespace phishard
