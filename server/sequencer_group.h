// ShardGroup: one serving rank's membership in its tensor-parallel group (spec §1.5, §2.1): the
// rendezvous with the other ranks (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), the communicator
// the model's collectives run on, the abort watch, and the RPC sequencer (server/sequencer.h).
//
// The group breaks when a peer dies or aborts (the abort watch hears it within milliseconds), a
// collective fails, or the sequencer finds the ranks out of step. Breaking aborts the
// communicator (collectives in flight fail instead of hanging), closes the control channel, fails
// every queued collective RPC, tells the peers (unless they told us), and, once serving, wakes
// the main thread to shut the shard down; a watchdog ends the process if that shutdown takes too
// long. The exit code is then 1, except when a peer left the group on purpose (a clean shutdown
// of the whole group, which reaches the peers as "rank N left the group"): 0.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "parallel/abort_watch.h"
#include "parallel/communicator.h"
#include "parallel/control_channel.h"
#include "parallel/parallel_group.h"
#include "server/sequencer.h"

namespace phishard {

struct ShardGroupOptions {
  CommOptions comm;  // world_size > 1
  SequencerOptions sequencer;
};

class ShardGroup {
 public:
  // Joins the group: returns once every rank checked in (bounded by comm.timeout) and the
  // communicator and abort watch are up. Errors as CreateParallelGroup / AbortWatch::Create.
  static absl::StatusOr<std::unique_ptr<ShardGroup>> Create(const ShardGroupOptions& options);
  // Leaves the group: the peers hear "rank N left the group", then the connections close.
  ~ShardGroup();
  ShardGroup(const ShardGroup&) = delete;
  ShardGroup& operator=(const ShardGroup&) = delete;

  int rank() const { return control_->rank(); }
  int world_size() const { return control_->world_size(); }
  // Ranks of this group on this host (they share its memory).
  int ranks_on_host() const { return control_->local_world_size(); }
  // The communicator for the model: any failed collective breaks the group.
  Communicator* comm();
  RpcSequencer* sequencer() { return sequencer_.get(); }

  // After this rank loaded its model: waits (a barrier, bounded by the collective timeout) until
  // every rank did. An error names why (e.g. another rank could not load its weights).
  absl::Status WaitForAllLoaded();
  // This rank cannot go on (a startup error): the peers hear "rank N aborted: <reason>" at once.
  void Abandon(const std::string& reason);
  // From now on a broken group calls `wake` (once), and the process exits with ExitCode() if it
  // is still running `grace` later.
  void SetServing(std::function<void()> wake, absl::Duration grace);

  bool broken() const;
  std::string reason() const;  // why it broke; "" while intact
  // 1 when the group broke (other than by a peer's clean leave), else 0.
  int ExitCode() const;

  class WatchedCommunicator;

 private:
  ShardGroup() = default;
  void OnBroken(const std::string& reason, bool from_peer);

  std::unique_ptr<ControlChannel> control_;
  std::unique_ptr<Communicator> comm_;  // the real one (Gloo / NCCL)
  std::unique_ptr<WatchedCommunicator> watched_;
  std::unique_ptr<AbortWatch> watch_;
  std::unique_ptr<RpcSequencer> sequencer_;

  mutable absl::Mutex mu_;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool clean_leave_ ABSL_GUARDED_BY(mu_) = false;
  std::string reason_ ABSL_GUARDED_BY(mu_);
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void()> wake_ ABSL_GUARDED_BY(mu_);
  absl::Duration grace_ ABSL_GUARDED_BY(mu_);
};

}  // namespace phishard
