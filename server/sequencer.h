// RpcSequencer: lock-step execution of the collective RPCs of a tensor-parallel group (spec §2.1,
// "TP ordering hazard"). The router sends every model RPC (Warmup, Prefill, Decode, FilterBatch,
// ClearCache, Load/OffloadAdapter) to all ranks concurrently, and its independent loops (batching,
// health probe, adapter loader) can make two RPCs arrive in different orders on different ranks;
// their collectives would then pair up wrongly and deadlock. So rank 0 decides the order:
//
//   rank 0 (executor thread, in its arrival order)      ranks k > 0 (follower thread)
//   R seq digest id queue ----------------------------> waits up to T for its own copy of `id`
//                     <-------------------------------- A seq ok | missing why | mismatch why
//   all ok ? G seq : X seq why ----------------------->
//   run on G (collectives pair up)                      run on G, on its executor
//   failed? gather F seq from all, then V seq  <------> failed? F seq, wait for V seq
//
// `id` is the method and its batch ids ("Decode batches 7,9"), `digest` a hash of the request
// bytes. So an RPC runs on every rank or on none:
//   - an RPC that reached only rank 0 fails there (and nowhere runs) after T: "missing";
//   - an RPC that reached only rank k fails there after T without an announcement, or at the
//     first announcement whose `queue` (rank 0's admitted, not yet started calls) lacks it;
//   - same id but other bytes on some rank: fails on every rank ("mismatch");
//   - identical failures everywhere (a bad request, the usual case) are fine: the engine leaves its
//     state unchanged on failure. A call that failed on some ranks but not on others (or whose
//     failure left a peer waiting in a collective) means the ranks diverged: the F/V round finds
//     it within T and the group is declared broken (`on_broken`), which ends every rank.
// Ranks > 0 keep RPCs that rank 0 has not announced yet in arrival order; several calls with the
// same id (two ClearCache(all)) match first come, first served.
// With W = 1 there is no sequencer: the service runs calls on its executor directly.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "parallel/control_channel.h"

namespace phishard {

struct SequencerOptions {
  // How long a rank waits for its copy of an announced RPC, and how long an RPC that only some
  // ranks received may wait before it fails: the "bounded time" of a partial fan-out.
  absl::Duration timeout = absl::Seconds(30);
};

// 64-bit FNV-1a of the request bytes (stable across processes, unlike absl::Hash).
uint64_t RequestDigest(std::string_view bytes);

class RpcSequencer {
 public:
  // Queues `work` on the service's executor with `then` run after it (SerialExecutor::Submit);
  // false when the executor no longer accepts work.
  using SubmitFn = std::function<bool(std::function<void()> work, std::function<void()> then)>;

  struct Call {
    std::string id;       // method + batch ids; must be equal on every rank
    uint64_t digest = 0;  // RequestDigest of the request bytes; must be equal too
    // Executes the RPC on the executor thread; returns its status.
    std::function<absl::Status()> run;
    // Completes the gRPC call with `status`: run's result, or why the sequencer did not run it.
    // Called exactly once, on the executor thread or (refusals) on the caller's or follower's.
    std::function<void(absl::Status)> finish;
  };

  // `control` (not owned) must outlive the sequencer. `on_broken(reason)` is called at most once
  // when the ranks can no longer agree (control channel failure, diverged results); it must tear
  // the group down (and call Break).
  RpcSequencer(ControlChannel* control, SequencerOptions options,
               std::function<void(const std::string&)> on_broken);
  ~RpcSequencer();  // Stop()
  RpcSequencer(const RpcSequencer&) = delete;
  RpcSequencer& operator=(const RpcSequencer&) = delete;

  int rank() const { return control_->rank(); }
  int world_size() const { return control_->world_size(); }

  // Attaches the executor; ranks > 0 start their follower thread.
  void Start(SubmitFn submit);
  // Admits one collective RPC (any thread).
  void Admit(Call call);
  // No new calls; calls not started yet fail with UNAVAILABLE. Ranks > 0 keep answering rank 0's
  // announcements (with "missing") so that rank 0's last calls end cleanly.
  void Shutdown();
  // The group is broken: every call not started and every later one fails with ABORTED naming
  // `reason`. Idempotent; the first reason is kept.
  void Break(const std::string& reason);
  // Ends the follower thread and detaches the executor (calls still pending fail). Idempotent.
  void Stop();

 private:
  struct Pending {
    Call call;
    absl::Time arrived;
  };

  // Rank 0, executor thread: announce, collect acks, run or refuse, error round.
  absl::Status Lead(Call& call);
  // Ranks > 0: the follower thread's loop and one announcement.
  void FollowLoop();
  void FollowOne(const std::string& announcement);
  // After a failed call: every rank must have failed it too (see the header comment).
  void ErrorRound(uint64_t seq, const std::string& id);
  // Ranks > 0 fail the calls rank 0 will never announce: after `timeout` without any
  // announcement (ExpireStale), or at once when an announcement shows that rank 0 has not queued
  // them (ExpireAbsent; rank 0's queue rides on every announcement), so that a partial fan-out
  // fails in bounded time under load too.
  void ExpireStale() ABSL_LOCKS_EXCLUDED(mu_);
  void ExpireAbsent(const absl::flat_hash_set<uint64_t>& root_waiting, uint64_t announced)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Reports a broken group once.
  void Broken(const std::string& reason);
  absl::Status Refusal() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  ControlChannel* const control_;
  const SequencerOptions options_;
  const std::function<void(const std::string&)> on_broken_;

  mutable absl::Mutex mu_;
  absl::CondVar cv_;  // pending_ grew, or the sequencer is breaking/stopping
  SubmitFn submit_ ABSL_GUARDED_BY(mu_);
  std::deque<Pending> pending_ ABSL_GUARDED_BY(mu_);         // ranks > 0: not yet announced
  std::vector<uint64_t> root_waiting_ ABSL_GUARDED_BY(mu_);  // rank 0: admitted, not started
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;               // Shutdown()
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;                // Stop()
  std::string broken_ ABSL_GUARDED_BY(mu_);                  // Break() reason
  bool reported_broken_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time last_activity_ ABSL_GUARDED_BY(mu_);    // last announcement handled (ranks > 0)
  bool follower_busy_ ABSL_GUARDED_BY(mu_) = false;  // ranks > 0: a sequenced call is running
  uint64_t next_seq_ = 0;                            // rank 0, executor thread only
  std::thread follower_;
};

}  // namespace phishard
