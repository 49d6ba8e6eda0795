// Ordering between streams with device events (no timing), over the CUDA runtime like
// kernels/device.h (int results, 0 = success; implemented in kernels/cuda/device.cu): work
// enqueued on `waiter` after DeviceStreamWaitEvent runs after the work enqueued on the recording
// stream before DeviceEventRecord. Works inside a stream capture (a fork / join of the graph).
#pragma once

#include "kernels/device.h"

namespace phishard {

struct DeviceEvent;
int DeviceEventCreate(DeviceEvent** event);
int DeviceEventDestroy(DeviceEvent* event);  // nullptr: nothing
int DeviceEventRecord(DeviceEvent* event, cudaStream_t stream);
int DeviceStreamWaitEvent(cudaStream_t waiter, DeviceEvent* event);

}  // namespace phishard
