// CUDA graphs in plain C++ (no CUDA headers in model/): record the work one thread enqueues on a
// stream, instantiate it once, replay it with one launch. Implemented in
// kernels/cuda/device_graph.cu; every function returns the cudaError_t value as an int.
//
// Capture runs in thread-local mode: only the capturing thread is restricted (it must not call
// synchronising APIs such as cudaMalloc until the capture ends); other threads, e.g. a health
// check copying on its own stream, carry on. Work recorded in a graph keeps the device pointers
// and launch shapes it was captured with, so whatever a replay should see differently must live
// in device memory those pointers address.
#pragma once

#include <cstddef>

#include "kernels/device.h"

namespace phishard {

struct DeviceGraph;  // an instantiated graph (cudaGraphExec_t), opaque

int DeviceGraphBeginCapture(cudaStream_t stream);
// Ends the capture begun on `stream` and instantiates it (and uploads it to the device, so the
// first replay costs what later ones cost). On any error *graph is null and the capture is over,
// whatever state it was in; `num_nodes` (optional) receives the node count. With
// `node_priority`, replays run each kernel node at the priority of the stream it was captured
// on (cudaGraphInstantiateFlagUseNodePriority) instead of the launch stream's.
int DeviceGraphEndCapture(cudaStream_t stream, DeviceGraph** graph, size_t* num_nodes = nullptr,
                          bool node_priority = false);
int DeviceGraphLaunch(DeviceGraph* graph, cudaStream_t stream);
int DeviceGraphDestroy(DeviceGraph* graph);

}  // namespace phishard
