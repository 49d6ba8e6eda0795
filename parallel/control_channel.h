// ControlChannel: small messages between rank 0 and the other ranks of one tensor-parallel group,
// over the TCP connections that Rendezvous() opened (a star: rank 0 holds one connection per peer).
//
// Its main job is the sequencer of spec §2.1: the router sends each collective RPC (Prefill,
// Decode, Warmup, ...) to every shard concurrently, so two RPCs can arrive in different orders on
// different ranks and their NCCL collectives would then deadlock. Rank 0 decides the order and
// tells the others. Recommended use by the server, per collective RPC:
//   rank 0:  BroadcastFromRoot(id)              id = method + batch ids, e.g. "Decode 7,9"
//   rank k:  id = ReceiveFromRoot(T)             rank 0's next decision
//            SendToRoot("ok" | "missing ...")    after waiting up to T for its own copy of `id`
//   rank 0:  replies = GatherToRoot(T)           DEADLINE_EXCEEDED names the ranks that stayed
//   silent
//            BroadcastFromRoot(all ok ? "go" : "abort ...")
//   all:     run the RPC (and its collectives) only on "go"
// so an RPC that reached only some ranks fails on every rank within about 2T instead of hanging
// inside a collective.
//
// Messages arrive in the order they were sent. A timeout never loses or splits a message: the next
// call returns it. A broken connection is UNAVAILABLE naming the peer, for this and every later
// call. Thread safety: sends are serialised and receives are serialised internally; Close() may be
// called from any thread and makes blocked and later calls fail promptly.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace phishard {

class TcpConnection;

// Frame types on a rendezvous/control connection (see tcp_socket.h for the frame layout).
enum class ControlFrame : uint8_t {
  kHello = 1,    // peer -> rank 0: magic, version, rank, world size, hostname
  kWelcome = 2,  // rank 0 -> peer: hostnames of all ranks
  kError = 3,    // rank 0 -> peer: status code + reason; the rendezvous failed
  kBlob = 4,     // set-up exchanges (AllGather, BroadcastBlob)
  kMessage = 5,  // user messages (BroadcastFromRoot, ReceiveFromRoot, SendToRoot, GatherToRoot)
};

class ControlChannel {
 public:
  // Made by Rendezvous(). `peers` has world_size entries: on rank 0 every r != 0 is set, on the
  // other ranks only entry 0. `hostnames` has world_size entries.
  ControlChannel(int rank, int world_size, std::vector<std::string> hostnames,
                 std::string local_host, std::vector<std::unique_ptr<TcpConnection>> peers);
  ~ControlChannel();
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  const std::vector<std::string>& hostnames() const { return hostnames_; }
  // Position of this rank among the ranks that share its hostname, and how many share it.
  int local_rank() const;
  int local_world_size() const;
  // Numeric address this rank used to reach rank 0 (rank 0: the one it was reached at); the CPU
  // collectives bind their own sockets there. "127.0.0.1" in a world of 1.
  const std::string& local_host() const { return local_host_; }

  // Rank 0 only: sends `msg` to every other rank.
  absl::Status BroadcastFromRoot(std::string_view msg, absl::Duration timeout = absl::Seconds(30));
  // Rank 0 only: the next message of every other rank, indexed by rank ([0] is empty). Nothing is
  // consumed unless every rank's message is there before the timeout.
  absl::StatusOr<std::vector<std::string>> GatherToRoot(absl::Duration timeout);
  // Other ranks only: the next message from rank 0.
  absl::StatusOr<std::string> ReceiveFromRoot(absl::Duration timeout);
  // Other ranks only: sends `msg` to rank 0.
  absl::Status SendToRoot(std::string_view msg, absl::Duration timeout = absl::Seconds(30));

  // Set-up exchanges that every rank calls in the same order (Gloo addresses, the NCCL unique id).
  // AllGather returns every rank's `mine`, indexed by rank; BroadcastBlob returns rank 0's blob
  // (`root_blob` is ignored on other ranks).
  absl::StatusOr<std::vector<std::string>> AllGather(std::string_view mine, absl::Duration timeout);
  absl::StatusOr<std::string> BroadcastBlob(std::string_view root_blob, absl::Duration timeout);

  // Shuts every connection down: blocked and later calls fail, and peers see the channel close.
  void Close();

 private:
  absl::Status CheckRole(bool want_root, const char* what) const;
  absl::Status SendTo(int peer, ControlFrame type, std::string_view payload, absl::Time deadline);
  // Waits until every rank in `from` has a complete frame buffered, then pops one from each.
  absl::StatusOr<std::vector<std::string>> RecvFromAll(const std::vector<int>& from,
                                                       ControlFrame type, absl::Time deadline,
                                                       const char* what);
  absl::Status PeerError(int peer, const absl::Status& s, const char* what) const;

  const int rank_;
  const int world_size_;
  const std::vector<std::string> hostnames_;
  const std::string local_host_;
  std::vector<std::unique_ptr<TcpConnection>> peers_;
  std::atomic<bool> closed_{false};
  absl::Mutex send_mu_;
  absl::Mutex recv_mu_;
};

}  // namespace phishard
