#include <cuda_runtime.h>

#include "kernels/device_graph.h"

namespace phishard {

struct DeviceGraph {
  cudaGraphExec_t exec = nullptr;
};

int DeviceGraphBeginCapture(cudaStream_t stream) {
  return cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
}

int DeviceGraphEndCapture(cudaStream_t stream, DeviceGraph** graph, size_t* num_nodes,
                          bool node_priority) {
  *graph = nullptr;
  if (num_nodes) *num_nodes = 0;
  cudaGraph_t g = nullptr;
  cudaError_t err = cudaStreamEndCapture(stream, &g);
  if (err != cudaSuccess) {
    if (g) cudaGraphDestroy(g);
    return err;
  }
  if (num_nodes) cudaGraphGetNodes(g, nullptr, num_nodes);
  cudaGraphExec_t exec = nullptr;
  err = cudaGraphInstantiate(&exec, g, node_priority ? cudaGraphInstantiateFlagUseNodePriority : 0);
  cudaGraphDestroy(g);  // the executable graph is independent of the template
  if (err != cudaSuccess) return err;
  err = cudaGraphUpload(exec, stream);
  if (err != cudaSuccess) {
    cudaGraphExecDestroy(exec);
    return err;
  }
  *graph = new DeviceGraph{exec};
  return cudaSuccess;
}

int DeviceGraphLaunch(DeviceGraph* graph, cudaStream_t stream) {
  return cudaGraphLaunch(graph->exec, stream);
}

int DeviceGraphDestroy(DeviceGraph* graph) {
  if (graph == nullptr) return cudaSuccess;
  const cudaError_t err = cudaGraphExecDestroy(graph->exec);
  delete graph;
  return err;
}

}  // namespace phishard
