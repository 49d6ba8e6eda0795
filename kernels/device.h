// A tiny plain-C++ API over the CUDA runtime, so that model/ and tests never include CUDA headers.
// Every function returns the cudaError_t value as an int (0 = success); DeviceErrorString names it.
// Implemented in kernels/cuda/device.cu (only built when PHISHARD_HAVE_CUDA).
#pragma once

#include <cstddef>
#include <string>

// The runtime's own stream handle type, declared exactly as cuda_runtime_api.h declares it, so a
// translation unit may include both this header and the CUDA headers.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace phishard {

struct DeviceProps {
  std::string name;
  int cc_major = 0;
  int cc_minor = 0;
  int multiprocessors = 0;
  size_t total_memory = 0;        // bytes
  size_t max_smem_per_block = 0;  // bytes, opt-in maximum for dynamic shared memory
  size_t l2_bytes = 0;
};

int DeviceGetCount(int* count);
int DeviceSet(int device);
int DeviceGetCurrent(int* device);
int DeviceGetProps(int device, DeviceProps* props);
int DeviceMemGetInfo(size_t* free_bytes, size_t* total_bytes);

int DeviceMalloc(void** ptr, size_t bytes);
int DeviceFree(void* ptr);
// Page-locked host memory (needed for truly asynchronous copies).
int DeviceMallocHost(void** ptr, size_t bytes);
int DeviceFreeHost(void* ptr);
// Calls of DeviceMalloc and DeviceMallocHost so far in this process, successful or not (tests:
// steps within the sizes reserved at warmup make none).
long long DeviceAllocationCalls();

// Asynchronous copies on `stream` (nullptr = the legacy default stream).
int DeviceCopyToDevice(void* dst, const void* src, size_t bytes, cudaStream_t stream);
int DeviceCopyToHost(void* dst, const void* src, size_t bytes, cudaStream_t stream);
int DeviceCopyOnDevice(void* dst, const void* src, size_t bytes, cudaStream_t stream);
// rows x row_bytes from a device matrix of pitch src_pitch into a host one of pitch dst_pitch.
int DeviceCopy2DToHost(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                       size_t row_bytes, size_t rows, cudaStream_t stream);
int DeviceMemset(void* ptr, int byte_value, size_t bytes, cudaStream_t stream);

// Non-blocking streams (they never synchronise with the legacy default stream).
int DeviceStreamCreate(cudaStream_t* stream);
// The device's highest stream priority: its blocks are scheduled ahead of queued ones of normal
// streams (collectives beside compute, as NCCL's own streams are).
int DeviceStreamCreateHighPriority(cudaStream_t* stream);
int DeviceStreamDestroy(cudaStream_t stream);
int DeviceStreamSync(cudaStream_t stream);
int DeviceSynchronize();
// cudaSuccess when this binary carries kernels the current device can run, else the runtime's
// error (cudaErrorNoKernelImageForDevice when built for another architecture).
int DeviceCheckKernelImage();
// Returns and clears the last launch error of this thread.
int DeviceGetLastError();
const char* DeviceErrorString(int error);

// Timing with device events: a pair recorded on a stream.
struct DeviceTimer;
int DeviceTimerCreate(DeviceTimer** timer);
int DeviceTimerDestroy(DeviceTimer* timer);
int DeviceTimerStart(DeviceTimer* timer, cudaStream_t stream);
int DeviceTimerStop(DeviceTimer* timer, cudaStream_t stream);
// Waits for the stop event; milliseconds between start and stop.
int DeviceTimerElapsedMs(DeviceTimer* timer, float* ms);

}  // namespace phishard
