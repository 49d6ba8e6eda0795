#include "parallel/parallel_group.h"

#include <cstdlib>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "parallel/gloo_communicator.h"
#include "parallel/rendezvous.h"
#ifdef PHISHARD_HAVE_NCCL
#include "parallel/nccl_communicator.h"
#endif

namespace phishard {
namespace {

absl::Status ReadIntEnv(const char* name, int* out) {
  const char* v = std::getenv(name);
  if (v == nullptr) return absl::OkStatus();
  if (!absl::SimpleAtoi(v, out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable ", name, "='", v, "' is not an integer"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CommBackend> ParseCommBackend(std::string_view name) {
  std::string n = absl::AsciiStrToLower(std::string(name));
  if (n == "local") return CommBackend::kLocal;
  if (n == "gloo") return CommBackend::kGloo;
  if (n == "nccl") return CommBackend::kNccl;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown communicator backend '", std::string(name), "' (want local, gloo or nccl)"));
}

std::string_view CommBackendName(CommBackend backend) {
  switch (backend) {
    case CommBackend::kLocal:
      return "local";
    case CommBackend::kGloo:
      return "gloo";
    case CommBackend::kNccl:
      return "nccl";
  }
  return "unknown";
}

CommBackend DefaultCommBackend() {
#ifdef PHISHARD_HAVE_NCCL
  return CommBackend::kNccl;
#else
  return CommBackend::kGloo;
#endif
}

bool CommBackendAvailable(CommBackend backend) {
#ifndef PHISHARD_HAVE_NCCL
  if (backend == CommBackend::kNccl) return false;
#endif
  (void)backend;
  return true;
}

absl::StatusOr<CommOptions> CommOptionsFromEnv(CommOptions defaults) {
  CommOptions o = std::move(defaults);
  if (absl::Status s = ReadIntEnv("RANK", &o.rank); !s.ok()) return s;
  if (absl::Status s = ReadIntEnv("WORLD_SIZE", &o.world_size); !s.ok()) return s;
  if (absl::Status s = ReadIntEnv("MASTER_PORT", &o.master_port); !s.ok()) return s;
  if (const char* addr = std::getenv("MASTER_ADDR"); addr != nullptr) o.master_addr = addr;
  if (o.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable WORLD_SIZE=", o.world_size, " must be >= 1"));
  }
  if (o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "environment variable RANK=", o.rank, " must be in [0, WORLD_SIZE=", o.world_size, ")"));
  }
  if (o.world_size > 1 && (o.master_port < 1 || o.master_port > 65535)) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable MASTER_PORT=", o.master_port, " must be in [1, 65535]"));
  }
  if (o.world_size > 1 && o.master_addr.empty()) {
    return absl::InvalidArgumentError("environment variable MASTER_ADDR is empty");
  }
  return o;
}

absl::StatusOr<ParallelGroup> CreateParallelGroup(const CommOptions& opts) {
  if (!CommBackendAvailable(opts.backend)) {
    return absl::UnimplementedError(absl::StrCat("communicator backend '",
                                                 std::string(CommBackendName(opts.backend)),
                                                 "' is not available: phishard was built without "
                                                 "CUDA/NCCL"));
  }
  if (opts.backend == CommBackend::kLocal && opts.world_size != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("communicator backend 'local' needs WORLD_SIZE=1, got ", opts.world_size));
  }
  if (opts.collective_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("collective timeout must be positive");
  }
  RendezvousOptions ro;
  ro.rank = opts.rank;
  ro.world_size = opts.world_size;
  ro.master_addr = opts.master_addr;
  ro.master_port = opts.master_port;
  ro.timeout = opts.timeout;
  auto control = Rendezvous(ro);
  if (!control.ok()) return control.status();

  ParallelGroup group;
  group.control = std::move(*control);
  if (opts.world_size == 1) {
    group.comm = std::make_unique<LocalCommunicator>();
    return group;
  }
  switch (opts.backend) {
    case CommBackend::kGloo: {
      auto comm = GlooCommunicator::Create(*group.control, opts.timeout, opts.collective_timeout);
      if (!comm.ok()) return comm.status();
      group.comm = std::move(*comm);
      break;
    }
    case CommBackend::kNccl: {
#ifdef PHISHARD_HAVE_NCCL
      auto comm = NcclCommunicator::Create(*group.control, opts.timeout, opts.collective_timeout);
      if (!comm.ok()) return comm.status();
      group.comm = std::move(*comm);
#endif
      break;
    }
    case CommBackend::kLocal:
      break;  // rejected above for world size > 1
  }
  return group;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateCommunicator(const CommOptions& opts) {
  auto group = CreateParallelGroup(opts);
  if (!group.ok()) return group.status();
  return std::move(group->comm);
}

}  // namespace phishard
