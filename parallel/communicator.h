// Communicator: the collectives one tensor-parallel rank needs. LocalCommunicator is world 1
// (every collective is the identity); NCCL and a CPU implementation come with tensor parallelism.
// Buffers are host memory for CPU communicators and device memory for device ones.
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/status.h"

namespace phishard {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // In-place sum over ranks of `count` floats.
  virtual absl::Status AllReduceSum(float* data, size_t count) = 0;
  // recv[r * count .. (r+1) * count) = send of rank r.
  virtual absl::Status AllGather(const float* send, float* recv, size_t count) = 0;
  virtual absl::Status Broadcast(void* data, size_t bytes, int root) = 0;
  virtual absl::Status Barrier() = 0;
  // Tears the communicator down so every pending and future collective fails instead of hanging.
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
  std::string abort_reason_;
};

}  // namespace phishard
