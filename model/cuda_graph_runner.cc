#ifdef PHISHARD_HAVE_CUDA

#include "model/cuda_graph_runner.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "kernels/device_graph.h"

namespace phishard {

CudaGraphRunner::CudaGraphRunner(int max_batch, int variants) : variants_(std::max(variants, 1)) {
  max_batch = std::max(max_batch, 1);
  for (int b = 1; b < max_batch; b *= 2) buckets_.push_back(b);
  buckets_.push_back(max_batch);
  graphs_.assign(buckets_.size() * variants_, nullptr);
  nodes_.assign(buckets_.size() * variants_, 0);
}

CudaGraphRunner::~CudaGraphRunner() { Clear(); }

int CudaGraphRunner::Bucket(int batch) const {
  if (batch < 1) return 0;
  for (int b : buckets_) {
    if (b >= batch) return b;
  }
  return 0;
}

int CudaGraphRunner::Index(int bucket, int variant) const {
  const auto it = std::find(buckets_.begin(), buckets_.end(), bucket);
  if (it == buckets_.end() || variant < 0 || variant >= variants_) return -1;
  return static_cast<int>(it - buckets_.begin()) * variants_ + variant;
}

bool CudaGraphRunner::Has(int bucket, int variant) const {
  const int i = Index(bucket, variant);
  return i >= 0 && graphs_[i] != nullptr;
}

int CudaGraphRunner::num_graphs() const {
  return static_cast<int>(std::count_if(graphs_.begin(), graphs_.end(),
                                        [](const DeviceGraph* g) { return g != nullptr; }));
}

absl::Status CudaGraphRunner::Capture(int bucket, cudaStream_t stream,
                                      absl::FunctionRef<absl::Status()> enqueue, int variant) {
  const int i = Index(bucket, variant);
  PHI_CHECK(i >= 0) << "batch size " << bucket << " variant " << variant
                    << " is not a graph bucket";
  if (graphs_[i] != nullptr) {
    DeviceGraphDestroy(graphs_[i]);
    graphs_[i] = nullptr;
    total_nodes_ -= nodes_[i];
    nodes_[i] = 0;
  }
  if (int err = DeviceGraphBeginCapture(stream); err != 0) {
    DeviceGetLastError();
    return absl::InternalError(
        absl::StrFormat("CUDA graph capture of the batch-%d decode step "
                        "could not begin: %s",
                        bucket, DeviceErrorString(err)));
  }
  const absl::Status enqueued = enqueue();
  DeviceGraph* graph = nullptr;
  size_t nodes = 0;
  // Always ends the capture.
  const int err = DeviceGraphEndCapture(stream, &graph, &nodes, node_priority_);
  if (!enqueued.ok()) {
    DeviceGraphDestroy(graph);
    return enqueued;
  }
  if (err != 0) {
    DeviceGetLastError();
    return absl::InternalError(
        absl::StrFormat("CUDA graph capture of the batch-%d decode step failed: %s", bucket,
                        DeviceErrorString(err)));
  }
  graphs_[i] = graph;
  nodes_[i] = nodes;
  total_nodes_ += nodes;
  ++captures_;
  PHI_LOG(DEBUG) << "captured the batch-" << bucket << " decode step (variant " << variant
                 << ") as a CUDA graph of " << nodes << " nodes";
  return absl::OkStatus();
}

absl::Status CudaGraphRunner::Replay(int bucket, cudaStream_t stream, int variant) {
  const int i = Index(bucket, variant);
  if (i < 0 || graphs_[i] == nullptr) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no CUDA graph captured for decode batch size %d (variant %d)", bucket, variant));
  }
  if (int err = DeviceGraphLaunch(graphs_[i], stream); err != 0) {
    DeviceGetLastError();
    return absl::InternalError(absl::StrFormat("CUDA graph launch (decode batch %d) failed: %s",
                                               bucket, DeviceErrorString(err)));
  }
  ++replays_;
  return absl::OkStatus();
}

void CudaGraphRunner::Clear() {
  for (size_t i = 0; i < graphs_.size(); ++i) {
    if (graphs_[i] != nullptr) DeviceGraphDestroy(graphs_[i]);
    graphs_[i] = nullptr;
    nodes_[i] = 0;
  }
  total_nodes_ = 0;
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
