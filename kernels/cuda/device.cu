#include <cuda_runtime.h>

#include <atomic>

#include "kernels/device.h"
#include "kernels/device_event.h"

namespace phishard {
namespace {
__global__ void ProbeKernel(int* p) {
  if (p) *p = 1;
}
}  // namespace

int DeviceCheckKernelImage() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, ProbeKernel);
}

int DeviceGetCount(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // "no device" is sticky in the runtime's last-error slot; clear it
    *count = 0;
  }
  return err;
}

int DeviceSet(int device) { return cudaSetDevice(device); }
int DeviceGetCurrent(int* device) { return cudaGetDevice(device); }

int DeviceGetProps(int device, DeviceProps* props) {
  cudaDeviceProp p;
  const cudaError_t err = cudaGetDeviceProperties(&p, device);
  if (err != cudaSuccess) return err;
  props->name = p.name;
  props->cc_major = p.major;
  props->cc_minor = p.minor;
  props->multiprocessors = p.multiProcessorCount;
  props->total_memory = p.totalGlobalMem;
  props->max_smem_per_block = p.sharedMemPerBlockOptin;
  props->l2_bytes = static_cast<size_t>(p.l2CacheSize);
  return cudaSuccess;
}

int DeviceMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  return cudaMemGetInfo(free_bytes, total_bytes);
}

namespace {
std::atomic<long long> g_allocation_calls{0};
}  // namespace

int DeviceMalloc(void** ptr, size_t bytes) {
  g_allocation_calls.fetch_add(1, std::memory_order_relaxed);
  return cudaMalloc(ptr, bytes);
}
int DeviceFree(void* ptr) { return cudaFree(ptr); }
int DeviceMallocHost(void** ptr, size_t bytes) {
  g_allocation_calls.fetch_add(1, std::memory_order_relaxed);
  return cudaMallocHost(ptr, bytes);
}
long long DeviceAllocationCalls() { return g_allocation_calls.load(std::memory_order_relaxed); }
int DeviceFreeHost(void* ptr) { return cudaFreeHost(ptr); }

int DeviceCopyToDevice(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream);
}
int DeviceCopyToHost(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream);
}
int DeviceCopyOnDevice(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream);
}
int DeviceCopy2DToHost(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                       size_t row_bytes, size_t rows, cudaStream_t stream) {
  return cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows, cudaMemcpyDeviceToHost,
                           stream);
}
int DeviceMemset(void* ptr, int byte_value, size_t bytes, cudaStream_t stream) {
  return cudaMemsetAsync(ptr, byte_value, bytes, stream);
}

int DeviceStreamCreate(cudaStream_t* stream) {
  return cudaStreamCreateWithFlags(stream, cudaStreamNonBlocking);
}
int DeviceStreamCreateHighPriority(cudaStream_t* stream) {
  int least = 0, greatest = 0;
  if (cudaError_t e = cudaDeviceGetStreamPriorityRange(&least, &greatest); e != cudaSuccess) {
    return e;
  }
  return cudaStreamCreateWithPriority(stream, cudaStreamNonBlocking, greatest);
}
int DeviceStreamDestroy(cudaStream_t stream) { return cudaStreamDestroy(stream); }
int DeviceStreamSync(cudaStream_t stream) { return cudaStreamSynchronize(stream); }
int DeviceSynchronize() { return cudaDeviceSynchronize(); }
int DeviceGetLastError() { return cudaGetLastError(); }
const char* DeviceErrorString(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

struct DeviceTimer {
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
};

int DeviceTimerCreate(DeviceTimer** timer) {
  auto* t = new DeviceTimer;
  cudaError_t err = cudaEventCreate(&t->start);
  if (err == cudaSuccess) err = cudaEventCreate(&t->stop);
  if (err != cudaSuccess) {
    if (t->start) cudaEventDestroy(t->start);
    delete t;
    *timer = nullptr;
    return err;
  }
  *timer = t;
  return cudaSuccess;
}
int DeviceTimerDestroy(DeviceTimer* timer) {
  if (!timer) return cudaSuccess;
  cudaEventDestroy(timer->start);
  const cudaError_t err = cudaEventDestroy(timer->stop);
  delete timer;
  return err;
}
int DeviceTimerStart(DeviceTimer* timer, cudaStream_t stream) {
  return cudaEventRecord(timer->start, stream);
}
int DeviceTimerStop(DeviceTimer* timer, cudaStream_t stream) {
  return cudaEventRecord(timer->stop, stream);
}
int DeviceTimerElapsedMs(DeviceTimer* timer, float* ms) {
  const cudaError_t err = cudaEventSynchronize(timer->stop);
  if (err != cudaSuccess) return err;
  return cudaEventElapsedTime(ms, timer->start, timer->stop);
}

struct DeviceEvent {
  cudaEvent_t event = nullptr;
};
int DeviceEventCreate(DeviceEvent** event) {
  *event = nullptr;
  auto* e = new DeviceEvent;
  if (cudaError_t err = cudaEventCreateWithFlags(&e->event, cudaEventDisableTiming);
      err != cudaSuccess) {
    delete e;
    return err;
  }
  *event = e;
  return cudaSuccess;
}
int DeviceEventDestroy(DeviceEvent* event) {
  if (!event) return cudaSuccess;
  const cudaError_t err = cudaEventDestroy(event->event);
  delete event;
  return err;
}
int DeviceEventRecord(DeviceEvent* event, cudaStream_t stream) {
  return cudaEventRecord(event->event, stream);
}
int DeviceStreamWaitEvent(cudaStream_t waiter, DeviceEvent* event) {
  return cudaStreamWaitEvent(waiter, event->event, 0);
}

}  // namespace phishard
