// Communicator: the collectives one tensor-parallel rank needs. LocalCommunicator is world 1
// (every collective is the identity); GlooCommunicator (gloo_communicator.h) runs over TCP on host
// buffers; NcclCommunicator (nccl_communicator.h, CUDA builds) runs on device buffers.
// Buffers are host memory for CPU communicators and device memory for device ones (memory_space()).
// Every rank must call the same collectives in the same order. A collective that fails (timeout,
// dead peer, Abort) leaves the group unusable: the communicator aborts itself so that the peers'
// pending collectives fail promptly too. Errors: ABORTED after Abort(), DEADLINE_EXCEEDED when a
// peer did not join in time, UNAVAILABLE when a peer went away, INTERNAL for library faults.
#pragma once

#include <cstddef>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kernels/dtype.h"

namespace phishard {

enum class MemorySpace { kHost, kDevice };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // Where the buffers passed to the collectives live.
  virtual MemorySpace memory_space() const { return MemorySpace::kHost; }
  // Device communicators: the stream the collectives run on (a cudaStream_t, kept opaque so that
  // this header needs no CUDA). Collectives return once the work on it has completed, so inputs
  // must be ready when a collective is called (produce them on this stream, or synchronise).
  // nullptr for host communicators.
  virtual void* stream() const { return nullptr; }
  // In-place sum over ranks of `count` floats.
  virtual absl::Status AllReduceSum(float* data, size_t count) = 0;
  // recv[r * count .. (r+1) * count) = send of rank r. recv holds world_size * count floats;
  // send may be recv + rank * count (in place), otherwise the two must not overlap.
  virtual absl::Status AllGather(const float* send, float* recv, size_t count) = 0;
  // `bytes` bytes of root's `data` to every rank.
  virtual absl::Status Broadcast(void* data, size_t bytes, int root) = 0;
  virtual absl::Status Barrier() = 0;

  // --- Stream-ordered collectives (device communicators; UNIMPLEMENTED elsewhere) ---
  // These enqueue the collective on `stream` (a cudaStream_t, which may be capturing a CUDA
  // graph) after the work already there and return without waiting for it, so a model step can
  // put them between its kernels and into its decode graphs. `dtype` is kF32, kF16 or kBF16.
  // Every rank must enqueue the same collectives in the same order, and either all ranks capture
  // an operation into a graph or none do (then all replay that graph together).
  // In-place sum over ranks of `count` elements.
  virtual absl::Status EnqueueAllReduceSum(void* data, size_t count, DataType dtype, void* stream);
  // The same all-reduce, for a side stream that runs beside compute kernels (the overlapped
  // prefill's): a communicator may pick an implementation that takes fewer SMs from them
  // (NcclCommunicator: the copy-engine all-reduce under PHISHARD_TP_ALLREDUCE=copy). Not
  // capturable into CUDA graphs. Default: EnqueueAllReduceSum.
  virtual absl::Status EnqueueOverlappedAllReduceSum(void* data, size_t count, DataType dtype,
                                                     void* stream) {
    return EnqueueAllReduceSum(data, count, dtype, stream);
  }
  // recv[r * count .. (r+1) * count) = send of rank r (in place when send = recv + rank * count).
  virtual absl::Status EnqueueAllGather(const void* send, void* recv, size_t count, DataType dtype,
                                        void* stream);
  // Waits until everything enqueued on `stream` has completed. Unlike a plain stream
  // synchronisation it never hangs on a dead or aborted peer: it watches Abort(), the library's
  // asynchronous errors and the collective timeout, and aborts the communicator (which ends its
  // kernels) before returning the error.
  virtual absl::Status SyncStream(void* stream);

  // Tears the communicator down so every pending and future collective fails instead of hanging,
  // here and (through the closed connections) on the peers. Any thread may call it, also while
  // another thread is inside a collective.
  virtual void Abort(const std::string& reason) = 0;
};

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  absl::Status AllReduceSum(float* data, size_t count) override;
  absl::Status AllGather(const float* send, float* recv, size_t count) override;
  absl::Status Broadcast(void* data, size_t bytes, int root) override;
  absl::Status Barrier() override;
  void Abort(const std::string& reason) override;

 private:
  absl::Status CheckAborted() const;
  mutable absl::Mutex mu_;
  std::string abort_reason_ ABSL_GUARDED_BY(mu_);
};

}  // namespace phishard
