// AbortWatch: spreads "this group is broken" to every rank without relying on the collective
// library to notice. NCCL over NVLink/PCIe peer-to-peer has no socket between the ranks, so when
// one rank aborts or its process dies, the others' kernels keep waiting for data that will never
// come until a timeout. AbortWatch keeps a star of plain TCP connections through rank 0 (separate
// from the ControlChannel, so it never mixes with sequencer messages) and one thread per rank that
// sleeps on them. When a rank aborts, it sends its reason and closes its connections; when a
// process dies, the kernel closes them. The watch thread on each rank that sees this calls
// `on_abort(reason)` once and closes its own connections, which relays the news through rank 0,
// so every rank hears within two hops, in milliseconds.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "parallel/control_channel.h"

namespace phishard {

class TcpConnection;

class AbortWatch {
 public:
  using Callback = std::function<void(const std::string& reason)>;

  // Every rank calls this together (it uses `control` for one set-up exchange). Rank 0 listens on
  // an ephemeral port at control.local_host(); the others connect within `timeout`.
  // `on_abort` runs on the watch thread, at most once, and never after the destructor returns.
  static absl::StatusOr<std::unique_ptr<AbortWatch>> Create(ControlChannel& control,
                                                            absl::Duration timeout,
                                                            Callback on_abort);
  // Leaving the group counts as aborting it: peers are told "rank r left the group".
  ~AbortWatch();
  AbortWatch(const AbortWatch&) = delete;
  AbortWatch& operator=(const AbortWatch&) = delete;

  // This rank aborts: tell every connected rank why and close. Does not call on_abort. Idempotent.
  void Trigger(const std::string& reason);
  // Whether the watch has fired or been triggered.
  bool fired() const { return done_.load(); }

 private:
  AbortWatch(int rank, std::vector<std::unique_ptr<TcpConnection>> peers, Callback on_abort);
  void Run();
  // Sends `reason` to every connection still open (except `skip`) and shuts them all down.
  void TellAndClose(const std::string& reason, int skip);

  const int rank_;
  std::vector<std::unique_ptr<TcpConnection>> peers_;  // by rank; null where not connected
  Callback on_abort_;
  std::atomic<bool> done_{false};
  int wake_fd_ = -1;  // eventfd that ends the watch thread
  absl::Mutex send_mu_;
  std::thread thread_;
};

}  // namespace phishard
