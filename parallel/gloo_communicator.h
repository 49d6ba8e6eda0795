// GlooCommunicator: collectives on host float buffers over Gloo's TCP transport (Debian libgloo).
// Used for tensor parallelism without GPUs and to test the TP code paths on CPU. Gloo headers stay
// in the .cc file.
//
// Every collective is bounded by `op_timeout`: a peer that never joins gives DEADLINE_EXCEEDED,
// a peer that dies or aborts gives UNAVAILABLE/ABORTED as soon as its connections close. After any
// failure the communicator aborts itself (closing its connections), which in turn fails the
// peers' pending collectives, so one dead rank brings the whole group down in bounded time.
// Collectives are serialised (one at a time per communicator); Abort() may come from any thread.
// Creating one sets SIGPIPE to ignored if it has its default action (Gloo's writes would otherwise
// kill the process when a peer goes away).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/communicator.h"
#include "parallel/control_channel.h"

namespace phishard {

class GlooCommunicator final : public Communicator {
 public:
  // Connects a full mesh of Gloo TCP pairs bound to control.local_host(); the pair addresses are
  // exchanged over `control`, which is needed only during this call. `setup_timeout` bounds the
  // exchange and the connects, `op_timeout` every later collective.
  static absl::StatusOr<std::unique_ptr<GlooCommunicator>> Create(ControlChannel& control,
                                                                  absl::Duration setup_timeout,
                                                                  absl::Duration op_timeout);
  ~GlooCommunicator() override;

  int rank() const override;
  int world_size() const override;
  absl::Status AllReduceSum(float* data, size_t count) override;
  absl::Status AllGather(const float* send, float* recv, size_t count) override;
  absl::Status Broadcast(void* data, size_t bytes, int root) override;
  absl::Status Barrier() override;
  void Abort(const std::string& reason) override;

 private:
  struct Impl;
  explicit GlooCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace phishard
