// Rendezvous: how the W shard processes of one tensor-parallel group find each other (spec §1.5).
// Rank 0 listens on MASTER_ADDR:MASTER_PORT (plain TCP); every other rank connects, retrying until
// the deadline, and says who it is (rank, world size, hostname). Rank 0 checks that the world sizes
// agree and that every rank in 1..W-1 came exactly once, then answers every peer with either a
// welcome (the hostnames of all ranks) or the reason the group cannot form, so that a mismatch is
// the same clear error on every rank. The connections stay open as the ControlChannel, over which
// the communicators then exchange their own set-up data (the NCCL unique id, the Gloo addresses).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/control_channel.h"

namespace phishard {

struct RendezvousOptions {
  int rank = 0;                           // RANK
  int world_size = 1;                     // WORLD_SIZE
  std::string master_addr = "localhost";  // MASTER_ADDR: where rank 0 listens and others connect
  int master_port = 29500;                // MASTER_PORT
  // How long to wait for the group; upstream's torch.distributed waits 60 s.
  absl::Duration timeout = absl::Seconds(60);
};

// Returns once every rank has checked in with rank 0. Errors (on every rank that got that far):
//   INVALID_ARGUMENT     bad options on this rank (names the variable)
//   FAILED_PRECONDITION  WORLD_SIZE mismatch, rank out of range, two processes with one rank
//   DEADLINE_EXCEEDED    a rank never came, e.g. "rank 1: peer rank 0 never came (MASTER_ADDR=
//                        localhost MASTER_PORT=29500, waited 60 s; ...)"
//   UNAVAILABLE          rank 0 cannot listen on MASTER_ADDR:MASTER_PORT, or a peer went away
// A rank already connected to rank 0 waits up to a quarter of the timeout (at most 5 s) longer than
// the timeout for rank 0's verdict, so that it reports rank 0's reason rather than its own guess.
// World size 1 opens no socket.
absl::StatusOr<std::unique_ptr<ControlChannel>> Rendezvous(const RendezvousOptions& opts);

}  // namespace phishard
