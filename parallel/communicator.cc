#include "parallel/communicator.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace phishard {

absl::Status Communicator::EnqueueAllReduceSum(void*, size_t, DataType, void*) {
  return absl::UnimplementedError(
      "stream-ordered all-reduce needs a device communicator (NCCL); this one works on host "
      "memory");
}

absl::Status Communicator::EnqueueAllGather(const void*, void*, size_t, DataType, void*) {
  return absl::UnimplementedError(
      "stream-ordered all-gather needs a device communicator (NCCL); this one works on host "
      "memory");
}

absl::Status Communicator::SyncStream(void*) {
  return absl::UnimplementedError("SyncStream needs a device communicator (NCCL)");
}

absl::Status LocalCommunicator::CheckAborted() const {
  absl::MutexLock lock(&mu_);
  if (!abort_reason_.empty()) return absl::AbortedError(abort_reason_);
  return absl::OkStatus();
}

absl::Status LocalCommunicator::AllReduceSum(float*, size_t) { return CheckAborted(); }

absl::Status LocalCommunicator::AllGather(const float* send, float* recv, size_t count) {
  if (absl::Status s = CheckAborted(); !s.ok()) return s;
  if (send != recv) std::memmove(recv, send, count * sizeof(float));
  return absl::OkStatus();
}

absl::Status LocalCommunicator::Broadcast(void*, size_t, int root) {
  if (absl::Status s = CheckAborted(); !s.ok()) return s;
  if (root != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("broadcast root must be 0 in a world of 1, got ", root));
  }
  return absl::OkStatus();
}

absl::Status LocalCommunicator::Barrier() { return CheckAborted(); }

void LocalCommunicator::Abort(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  abort_reason_ = reason.empty() ? "communicator aborted" : reason;
}

}  // namespace phishard
