// NcclCommunicator: collectives on device buffers through NCCL, one GPU per rank. Built only with
// the CUDA backend (PHISHARD_HAVE_NCCL); this header itself needs no CUDA or NCCL headers.
//
// Device: cuda:{rank % visible devices} (spec §1.5). Collectives run on the communicator's own
// high-priority stream (stream()) and return once they have completed; while waiting, the host
// polls the stream and ncclCommGetAsyncError, so a dead peer, an NCCL fault, Abort() from another
// thread, or `op_timeout` ends the wait with an error (the communicator is then aborted with
// ncclCommAbort) instead of hanging. The communicator is created non-blocking
// (ncclConfig_t.blocking = 0) for the same reason: initialisation is bounded by `setup_timeout`.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/communicator.h"
#include "parallel/control_channel.h"

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
  void Abort(const std::string& reason) override;

 private:
  struct Impl;
  explicit NcclCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace phishard
