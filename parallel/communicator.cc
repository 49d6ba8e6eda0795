#include "parallel/communicator.h"

#include <cstring>

namespace phishard {

absl::Status LocalCommunicator::AllReduceSum(float*, size_t) {
  if (!abort_reason_.empty()) return absl::AbortedError(abort_reason_);
  return absl::OkStatus();
}

absl::Status LocalCommunicator::AllGather(const float* send, float* recv, size_t count) {
  if (!abort_reason_.empty()) return absl::AbortedError(abort_reason_);
  if (send != recv) std::memmove(recv, send, count * sizeof(float));
  return absl::OkStatus();
}

absl::Status LocalCommunicator::Broadcast(void*, size_t, int root) {
  if (!abort_reason_.empty()) return absl::AbortedError(abort_reason_);
  if (root != 0) return absl::InvalidArgumentError("broadcast root must be 0 in a world of 1");
  return absl::OkStatus();
}

absl::Status LocalCommunicator::Barrier() {
  if (!abort_reason_.empty()) return absl::AbortedError(abort_reason_);
  return absl::OkStatus();
}

void LocalCommunicator::Abort(const std::string& reason) {
  abort_reason_ = reason.empty() ? "communicator aborted" : reason;
}

}  // namespace phishard
