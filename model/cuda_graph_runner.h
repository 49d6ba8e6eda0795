// CudaGraphRunner: one captured CUDA graph of a decode step per batch-size bucket (and variant). A
// decode step of S sequences runs as the graph of the smallest bucket >= S (the rows past S are
// padding rows the kernels skip), so a handful of graphs (1, 2, 4, ..., max_batch) cover every
// batch size and a step costs one graph launch instead of ~300 kernel launches.
//
// The runner only records and replays: what a step computes is the caller's `enqueue`, which
// must read every per-step input from device buffers whose addresses never change while the
// graphs live (the graph keeps the pointers and launch shapes it saw). Whoever moves such a
// buffer calls Clear(). Built only when PHISHARD_HAVE_CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "kernels/device.h"

namespace phishard {

struct DeviceGraph;

class CudaGraphRunner {
 public:
  // Buckets: powers of two below max_batch, then max_batch (>= 1). `variants` (>= 1) graphs per
  // bucket: steps of one bucket that enqueue different work (e.g. another launch configuration
  // chosen by the step's context) each replay their own; variant 0 is the default one.
  explicit CudaGraphRunner(int max_batch, int variants = 1);
  ~CudaGraphRunner();
  CudaGraphRunner(const CudaGraphRunner&) = delete;
  CudaGraphRunner& operator=(const CudaGraphRunner&) = delete;

  int max_batch() const { return buckets_.back(); }
  const std::vector<int>& buckets() const { return buckets_; }
  // Smallest bucket >= batch, or 0 when batch > max_batch() (or batch < 1).
  int Bucket(int batch) const;

  bool Has(int bucket, int variant = 0) const;
  // Records what `enqueue` puts on `stream` as the graph of `bucket` (replacing any). `enqueue`
  // must only enqueue work (no allocation, no synchronisation); its error, or the capture's,
  // comes back and leaves no graph for the bucket.
  absl::Status Capture(int bucket, cudaStream_t stream, absl::FunctionRef<absl::Status()> enqueue,
                       int variant = 0);
  // Launches the graph of `bucket` on `stream` (FAILED_PRECONDITION if there is none).
  absl::Status Replay(int bucket, cudaStream_t stream, int variant = 0);
  // Drops every graph (a buffer they point into moved).
  void Clear();
  // Graphs captured from now on replay each kernel at the priority of the stream it was captured
  // on (DeviceGraphEndCapture's node_priority); off: all at the launch stream's.
  void set_node_priority(bool on) { node_priority_ = on; }

  int num_graphs() const;
  size_t total_nodes() const { return total_nodes_; }
  int64_t replays() const { return replays_; }
  int64_t captures() const { return captures_; }

 private:
  int Index(int bucket, int variant) const;

  std::vector<int> buckets_;
  int variants_ = 1;
  std::vector<DeviceGraph*> graphs_;  // [bucket index * variants_ + variant], null: not captured
  std::vector<size_t> nodes_;
  size_t total_nodes_ = 0;
  int64_t replays_ = 0;
  int64_t captures_ = 0;
  bool node_priority_ = false;
};

}  // namespace phishard
