// NcclCommunicator: collectives on device buffers through NCCL, one GPU per rank. Built only with
// the CUDA backend (PHISHARD_HAVE_NCCL); this header itself needs no CUDA or NCCL headers.
//
// Device: cuda:{rank % visible devices} (spec §1.5). The blocking collectives run on the
// communicator's own high-priority stream (stream()) and return once they have completed; the
// Enqueue* ones run on the caller's stream (a model step, or its graph capture); while waiting, the
// host polls the stream and ncclCommGetAsyncError, so a dead peer, an NCCL fault, Abort() from
// another thread, or `op_timeout` ends the wait with an error (the communicator is then aborted
// with ncclCommAbort) instead of hanging. The communicator is created non-blocking
// (ncclConfig_t.blocking = 0) for the same reason: initialisation is bounded by `setup_timeout`.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/communicator.h"
#include "parallel/control_channel.h"
#include "parallel/custom_all_reduce.h"

namespace phishard {

class NcclCommunicator final : public Communicator {
 public:
  // Rank 0's ncclUniqueId travels over `control` (needed only during this call).
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(ControlChannel& control,
                                                                  absl::Duration setup_timeout,
                                                                  absl::Duration op_timeout);
  ~NcclCommunicator() override;

  int rank() const override;
  int world_size() const override;
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  void* stream() const override;  // cudaStream_t
  int device() const;             // the CUDA ordinal this rank uses

  absl::Status AllReduceSum(float* data, size_t count) override;
  absl::Status AllGather(const float* send, float* recv, size_t count) override;
  absl::Status Broadcast(void* data, size_t bytes, int root) override;
  // NCCL has no barrier: a one-float all-reduce on a scratch device buffer.
  absl::Status Barrier() override;
  // Stream-ordered (communicator.h): NCCL on the caller's stream, capturable in CUDA graphs; each
  // returns once NCCL has posted the operation (the non-blocking communicator may take a moment).
  absl::Status EnqueueAllReduceSum(void* data, size_t count, DataType dtype, void* stream) override;
  // Under PHISHARD_TP_ALLREDUCE=copy (and the custom all-reduce ready): the copy-engine
  // all-reduce (parallel/copy_engine_all_reduce.h); otherwise EnqueueAllReduceSum.
  absl::Status EnqueueOverlappedAllReduceSum(void* data, size_t count, DataType dtype,
                                             void* stream) override;
  absl::Status EnqueueAllGather(const void* send, void* recv, size_t count, DataType dtype,
                                void* stream) override;
  // Polls `stream` and ncclCommGetAsyncError (yielding, no sleep for the first 200 ms) until the
  // stream is idle; Abort() from any thread (the abort watch calls it when a peer dies), an NCCL
  // error or the collective timeout abort the communicator and end the wait with the reason.
  absl::Status SyncStream(void* stream) override;
  void Abort(const std::string& reason) override;

  // The stream-ordered all-reduces of a two-rank group on one host whose GPUs reach each other
  // run our own peer-to-peer kernel (parallel/custom_all_reduce.h) when PHISHARD_TP_ALLREDUCE (read
  // by Create) is auto or custom and the size fits its buffers; NCCL otherwise.
  bool custom_all_reduce_ready() const;
  // Whether EnqueueAllReduceSum(count, dtype) would run the custom kernel now.
  bool UsesCustomAllReduce(size_t count, DataType dtype) const;
  bool copy_engine_all_reduce_ready() const;
  // Whether EnqueueOverlappedAllReduceSum would run the copy-engine all-reduce now.
  bool UsesCopyEngineAllReduce() const;
  // Tests: the copy-engine all-reduce's piece size (CopyEngineAllReduce::set_piece_bytes).
  void set_copy_engine_piece_bytes(size_t bytes);
  // Switches the mode after set-up (tests, benchmarks). Every rank must switch alike between the
  // same two collectives, or their all-reduces would not pair up.
  void set_all_reduce_mode(AllReduceMode mode);

 private:
  struct Impl;
  explicit NcclCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace phishard
