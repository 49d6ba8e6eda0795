#include "server/sequencer_group.h"

#include <cstdio>
#include <cstdlib>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace phishard {

// Forwards to the group's communicator; a failed collective breaks the group at once, so that no
// rank waits for a peer that gave up (and the sequencer stops admitting work).
class ShardGroup::WatchedCommunicator final : public Communicator {
 public:
  WatchedCommunicator(Communicator* inner, ShardGroup* group) : inner_(inner), group_(group) {}

  int rank() const override { return inner_->rank(); }
  int world_size() const override { return inner_->world_size(); }
  MemorySpace memory_space() const override { return inner_->memory_space(); }
  void* stream() const override { return inner_->stream(); }
  absl::Status AllReduceSum(float* data, size_t count) override {
    return Watch(inner_->AllReduceSum(data, count));
  }
  absl::Status AllGather(const float* send, float* recv, size_t count) override {
    return Watch(inner_->AllGather(send, recv, count));
  }
  absl::Status Broadcast(void* data, size_t bytes, int root) override {
    return Watch(inner_->Broadcast(data, bytes, root));
  }
  absl::Status Barrier() override { return Watch(inner_->Barrier()); }
  absl::Status EnqueueAllReduceSum(void* data, size_t count, DataType dtype,
                                   void* stream) override {
    return Watch(inner_->EnqueueAllReduceSum(data, count, dtype, stream));
  }
  absl::Status EnqueueAllGather(const void* send, void* recv, size_t count, DataType dtype,
                                void* stream) override {
    return Watch(inner_->EnqueueAllGather(send, recv, count, dtype, stream));
  }
  absl::Status SyncStream(void* stream) override { return Watch(inner_->SyncStream(stream)); }
  void Abort(const std::string& reason) override { inner_->Abort(reason); }

 private:
  absl::Status Watch(absl::Status st) {
    if (!st.ok()) group_->OnBroken(absl::StrCat("a collective failed: ", st.message()), false);
    return st;
  }
  Communicator* inner_;
  ShardGroup* group_;
};

absl::StatusOr<std::unique_ptr<ShardGroup>> ShardGroup::Create(const ShardGroupOptions& options) {
  if (options.comm.world_size < 2) {
    return absl::InvalidArgumentError("a ShardGroup is for world sizes > 1");
  }
  std::unique_ptr<ShardGroup> g(new ShardGroup());
  absl::StatusOr<ParallelGroup> parallel = CreateParallelGroup(options.comm);
  if (!parallel.ok()) return parallel.status();
  g->control_ = std::move(parallel->control);
  g->comm_ = std::move(parallel->comm);
  g->watched_ = std::make_unique<WatchedCommunicator>(g->comm_.get(), g.get());
  ShardGroup* self = g.get();
  // The sequencer first: the watch thread may call OnBroken as soon as it exists.
  g->sequencer_ = std::make_unique<RpcSequencer>(
      g->control_.get(), options.sequencer,
      [self](const std::string& reason) { self->OnBroken(reason, /*from_peer=*/false); });
  absl::StatusOr<std::unique_ptr<AbortWatch>> watch = AbortWatch::Create(
      *g->control_, options.comm.timeout,
      [self](const std::string& reason) { self->OnBroken(reason, /*from_peer=*/true); });
  if (!watch.ok()) return watch.status();
  g->watch_ = *std::move(watch);
  PHI_LOG(INFO) << "Joined the tensor-parallel group: rank " << g->rank() << " of "
                << g->world_size() << " (" << CommBackendName(options.comm.backend)
                << " collectives, " << g->ranks_on_host() << " rank(s) on this host)";
  return g;
}

Communicator* ShardGroup::comm() { return watched_.get(); }

ShardGroup::~ShardGroup() {
  // The sequencer's follower must be gone before the channel it reads; the service stopped it.
  sequencer_.reset();
  watch_.reset();  // "rank N left the group" to the peers (a no-op when it fired already)
  if (comm_ != nullptr) comm_->Abort("rank left the group");
  comm_.reset();
  if (control_ != nullptr) control_->Close();
}

absl::Status ShardGroup::WaitForAllLoaded() {
  absl::Status st = watched_->Barrier();
  if (st.ok()) {
    absl::MutexLock lock(&mu_);
    if (!broken_) return absl::OkStatus();
  }
  const std::string why = reason().empty() ? std::string(st.message()) : reason();
  return absl::UnavailableError(
      absl::StrCat("the tensor-parallel group broke while the ranks loaded the model: ", why));
}

void ShardGroup::Abandon(const std::string& reason) { OnBroken(reason, /*from_peer=*/false); }

void ShardGroup::SetServing(std::function<void()> wake, absl::Duration grace) {
  bool already = false;
  {
    absl::MutexLock lock(&mu_);
    serving_ = true;
    wake_ = std::move(wake);
    grace_ = grace;
    already = broken_;
  }
  if (already) OnBroken("", false);  // re-run the serving part of it
}

bool ShardGroup::broken() const {
  absl::MutexLock lock(&mu_);
  return broken_;
}

std::string ShardGroup::reason() const {
  absl::MutexLock lock(&mu_);
  return reason_;
}

int ShardGroup::ExitCode() const {
  absl::MutexLock lock(&mu_);
  return broken_ && !clean_leave_ ? 1 : 0;
}

void ShardGroup::OnBroken(const std::string& reason, bool from_peer) {
  bool first = false, clean = false;
  std::function<void()> wake;
  absl::Duration grace;
  std::string why;
  {
    absl::MutexLock lock(&mu_);
    first = !broken_;
    if (first) {
      broken_ = true;
      reason_ = reason;
      // AbortWatch's words for a peer that destroyed its watch on the way out (and rank 0's relay
      // of them); every failure reads differently ("aborted: ...", "lost its connection").
      clean_leave_ = from_peer && absl::EndsWith(reason, " left the group");
    }
    clean = clean_leave_;
    why = reason_;
    if (serving_ && wake_) {
      wake = std::move(wake_);
      wake_ = nullptr;
      grace = grace_;
    }
  }
  if (first) {
    if (clean) {
      PHI_LOG(INFO) << "tensor-parallel group ended: " << why;
    } else {
      PHI_LOG(CRITICAL) << "tensor-parallel group broken: " << why;
    }
    if (!from_peer && watch_ != nullptr) watch_->Trigger(why);
    comm_->Abort(why);  // collectives in flight here fail now
    if (sequencer_ != nullptr) sequencer_->Break(why);
    control_->Close();
  }
  if (wake) {
    const int code = clean ? 0 : 1;
    wake();
    std::thread([grace, code] {
      absl::SleepFor(grace);
      PHI_LOG(CRITICAL) << "shutdown after the tensor-parallel group ended took longer than "
                        << absl::FormatDuration(grace) << "; exiting with status " << code;
      std::fflush(stdout);
      std::fflush(stderr);
      std::_Exit(code);
    }).detach();
  }
}

}  // namespace phishard
