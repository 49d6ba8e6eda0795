#include "kernels/device_info.h"

#if defined(PHISHARD_HAVE_CUDA) && PHISHARD_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace phishard {

int CudaDeviceCount() {
#if defined(PHISHARD_HAVE_CUDA) && PHISHARD_HAVE_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error so later calls start clean
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

}  // namespace phishard
