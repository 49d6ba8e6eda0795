// One tensor-parallel group as the server sees it: the options from the launcher's environment
// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; spec §1.4), the rendezvous, the control channel for
// the RPC sequencer (spec §2.1) and the communicator for the model's all-reduce / all-gather
// (spec §6.8-6.9).
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/communicator.h"
#include "parallel/control_channel.h"

namespace phishard {

enum class CommBackend {
  kLocal,  // world size 1 only
  kGloo,   // host buffers, TCP
  kNccl,   // device buffers; only in builds with CUDA (PHISHARD_HAVE_NCCL)
};

// "local" | "gloo" | "nccl" (any case); INVALID_ARGUMENT otherwise.
absl::StatusOr<CommBackend> ParseCommBackend(std::string_view name);
std::string_view CommBackendName(CommBackend backend);
// NCCL in CUDA builds, Gloo otherwise.
CommBackend DefaultCommBackend();
bool CommBackendAvailable(CommBackend backend);

struct CommOptions {
  CommBackend backend = DefaultCommBackend();
  int rank = 0;
  int world_size = 1;
  std::string master_addr = "localhost";
  int master_port = 29500;
  // Rendezvous and communicator set-up (spec §1.5: 60 s upstream).
  absl::Duration timeout = absl::Seconds(60);
  // One collective. Generous because the first collectives wait for peers still loading weights.
  absl::Duration collective_timeout = absl::Minutes(10);
};

// `defaults` overridden by RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT where they are set.
// INVALID_ARGUMENT names the variable and its value when one is not a valid number or in range.
absl::StatusOr<CommOptions> CommOptionsFromEnv(CommOptions defaults = CommOptions());

struct ParallelGroup {
  std::unique_ptr<ControlChannel> control;
  std::unique_ptr<Communicator> comm;
};

// Rendezvous + communicator. World size 1 gives a LocalCommunicator and a control channel with no
// peers, whatever the backend. Errors as in Rendezvous() plus the communicator's set-up errors;
// UNIMPLEMENTED for a backend this build lacks.
absl::StatusOr<ParallelGroup> CreateParallelGroup(const CommOptions& opts);

// The communicator alone (its control channel is closed once the communicator is set up).
absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(const CommOptions& opts);

}  // namespace phishard
