#include "parallel/rendezvous.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "parallel/tcp_socket.h"

namespace phishard {
namespace {

constexpr uint32_t kHelloMagic = 0x50485344;  // "PHSD"
constexpr uint32_t kProtocolVersion = 1;

std::string Seconds(absl::Duration d) {
  return absl::StrFormat("%.3g s", absl::ToDoubleSeconds(d));
}

std::string Where(const RendezvousOptions& o) {
  return absl::StrCat("MASTER_ADDR=", o.master_addr, " MASTER_PORT=", o.master_port);
}

std::string LocalHostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "unknown-host";
  return buf;
}

absl::Status Validate(const RendezvousOptions& o) {
  if (o.world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("WORLD_SIZE must be >= 1, got ", o.world_size));
  }
  if (o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("RANK must be in [0, WORLD_SIZE=", o.world_size, "), got ", o.rank));
  }
  if (o.world_size == 1) return absl::OkStatus();
  if (o.master_addr.empty()) return absl::InvalidArgumentError("MASTER_ADDR is empty");
  if (o.master_port < 1 || o.master_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("MASTER_PORT must be in [1, 65535], got ", o.master_port));
  }
  if (o.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("rendezvous timeout must be positive");
  }
  return absl::OkStatus();
}

// The reason a group cannot form, as rank 0 tells it to everyone.
struct Verdict {
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string reason;
};

std::string EncodeError(const Verdict& v) {
  std::string p;
  WireAppendU32(&p, static_cast<uint32_t>(v.code));
  WireAppendString(&p, v.reason);
  return p;
}

absl::Status Failure(int rank, absl::StatusCode code, const std::string& reason) {
  return absl::Status(code,
                      absl::StrCat("rank ", rank, ": tensor-parallel rendezvous failed: ", reason));
}

// ---------------------------------------------------------------- rank 0

absl::StatusOr<std::unique_ptr<ControlChannel>> RendezvousRoot(const RendezvousOptions& o) {
  const int world = o.world_size;
  auto listener = TcpListener::Listen(o.master_addr, o.master_port);
  if (!listener.ok()) {
    return absl::UnavailableError(absl::StrCat("rank 0: cannot listen for the tensor-parallel ",
                                               "rendezvous (", Where(o),
                                               "): ", listener.status().message()));
  }
  PHI_LOG(DEBUG) << "rank 0: rendezvous listening on " << o.master_addr << ":" << o.master_port
                 << " for " << world - 1 << " peer(s)";
  const absl::Time deadline = absl::Now() + o.timeout;
  std::vector<std::unique_ptr<TcpConnection>> peers(world);
  std::vector<std::string> hostnames(world);
  hostnames[0] = LocalHostname();
  std::vector<std::unique_ptr<TcpConnection>> pending;   // accepted, no hello yet
  std::vector<std::unique_ptr<TcpConnection>> rejected;  // told why, below
  Verdict verdict;
  int joined = 0;

  auto handle_hello = [&](std::unique_ptr<TcpConnection> conn, const Frame& f) {
    uint32_t magic = 0, version = 0, rank = 0, size = 0;
    std::string host;
    WireReader r(f.payload);
    if (f.type != static_cast<uint8_t>(ControlFrame::kHello) || !r.ReadU32(&magic) ||
        magic != kHelloMagic) {
      PHI_LOG(WARNING) << "rank 0: dropped a connection on MASTER_PORT " << o.master_port
                       << " that is not a phishard shard";
      return;
    }
    if (!r.ReadU32(&version) || version != kProtocolVersion || !r.ReadU32(&rank) ||
        !r.ReadU32(&size) || !r.ReadString(&host)) {
      verdict = {absl::StatusCode::kFailedPrecondition,
                 absl::StrCat("a peer speaks rendezvous protocol version ", version,
                              ", rank 0 speaks ", kProtocolVersion, " (mixed phishard builds?)")};
    } else if (static_cast<int>(size) != world) {
      verdict = {absl::StatusCode::kFailedPrecondition,
                 absl::StrCat("WORLD_SIZE mismatch: rank ", static_cast<int>(rank),
                              " has WORLD_SIZE=", static_cast<int>(size),
                              " but rank 0 has WORLD_SIZE=", world)};
    } else if (static_cast<int>(rank) < 1 || static_cast<int>(rank) >= world) {
      verdict = {absl::StatusCode::kFailedPrecondition,
                 absl::StrCat("a peer claims RANK=", static_cast<int>(rank),
                              ", which is not in [1, WORLD_SIZE=", world, ")",
                              rank == 0 ? " (two processes with RANK=0?)" : "")};
    } else if (peers[rank] != nullptr) {
      verdict = {absl::StatusCode::kFailedPrecondition,
                 absl::StrCat("two processes claim RANK=", rank, " (hosts ", hostnames[rank],
                              " and ", host, ")")};
    } else {
      hostnames[rank] = host;
      peers[rank] = std::move(conn);
      ++joined;
      return;
    }
    rejected.push_back(std::move(conn));
  };

  std::vector<pollfd> fds;
  while (joined < world - 1 && verdict.reason.empty()) {
    for (;;) {
      auto conn = listener.value()->AcceptPending();
      if (!conn.ok()) {
        verdict = {absl::StatusCode::kUnavailable, std::string(conn.status().message())};
        break;
      }
      if (*conn == nullptr) break;
      pending.push_back(std::move(*conn));
    }
    for (auto& conn : pending) {
      if (!verdict.reason.empty()) break;
      absl::Status read = conn->ReadAvailable();
      if (conn->HasFrame()) {
        Frame f = conn->PopFrame();
        handle_hello(std::move(conn), f);
      } else if (!read.ok()) {
        conn.reset();  // gone before saying who it is
      }
    }
    std::erase(pending, nullptr);
    if (joined == world - 1 || !verdict.reason.empty()) break;
    if (absl::Now() >= deadline) {
      std::vector<int> missing;
      for (int r = 1; r < world; ++r) {
        if (peers[r] == nullptr) missing.push_back(r);
      }
      verdict = {absl::StatusCode::kDeadlineExceeded,
                 absl::StrCat(missing.size() > 1 ? "ranks " : "rank ", absl::StrJoin(missing, ", "),
                              " never came (", Where(o), ", WORLD_SIZE=", world, ", rank 0 waited ",
                              Seconds(o.timeout), ")")};
      break;
    }
    fds.assign(1, pollfd{listener.value()->fd(), POLLIN, 0});
    for (auto& conn : pending) fds.push_back(pollfd{conn->fd(), POLLIN, 0});
    ::poll(fds.data(), fds.size(), PollMillis(deadline, absl::Milliseconds(200)));
  }

  // Everyone connected hears the verdict, so the error reads the same on every rank.
  const absl::Time reply_deadline = absl::Now() + absl::Seconds(2);
  if (verdict.reason.empty()) {
    std::string welcome;
    WireAppendU32(&welcome, static_cast<uint32_t>(world));
    for (const std::string& h : hostnames) WireAppendString(&welcome, h);
    for (int r = 1; r < world && verdict.reason.empty(); ++r) {
      absl::Status s = peers[r]->SendFrame(static_cast<uint8_t>(ControlFrame::kWelcome), welcome,
                                           reply_deadline);
      if (!s.ok()) {
        verdict = {absl::StatusCode::kUnavailable,
                   absl::StrCat("rank ", r, " went away during the rendezvous: ", s.message())};
      }
    }
    if (verdict.reason.empty()) {
      std::string local_host = peers[1]->LocalHost();
      PHI_LOG(DEBUG) << "rank 0: rendezvous complete, " << world << " ranks, local address "
                     << local_host;
      return std::make_unique<ControlChannel>(0, world, std::move(hostnames), std::move(local_host),
                                              std::move(peers));
    }
  }
  std::string error = EncodeError(verdict);
  auto tell = [&](TcpConnection* c) {
    if (c != nullptr) {
      c->SendFrame(static_cast<uint8_t>(ControlFrame::kError), error, reply_deadline).IgnoreError();
    }
  };
  for (auto& c : peers) tell(c.get());
  for (auto& c : rejected) tell(c.get());
  for (auto& c : pending) tell(c.get());
  return Failure(0, verdict.code, verdict.reason);
}

// ---------------------------------------------------------------- ranks 1..W-1

absl::StatusOr<std::unique_ptr<ControlChannel>> RendezvousPeer(const RendezvousOptions& o) {
  const absl::Time deadline = absl::Now() + o.timeout;
  auto conn = ConnectWithRetry(o.master_addr, o.master_port, deadline);
  if (!conn.ok()) {
    return absl::DeadlineExceededError(
        absl::StrCat("rank ", o.rank, ": peer rank 0 never came (", Where(o), ", waited ",
                     Seconds(o.timeout), "; last attempt: ", conn.status().message(), ")"));
  }
  std::string hello;
  WireAppendU32(&hello, kHelloMagic);
  WireAppendU32(&hello, kProtocolVersion);
  WireAppendU32(&hello, static_cast<uint32_t>(o.rank));
  WireAppendU32(&hello, static_cast<uint32_t>(o.world_size));
  WireAppendString(&hello, LocalHostname());
  absl::Status sent = (*conn)->SendFrame(static_cast<uint8_t>(ControlFrame::kHello), hello,
                                         std::max(deadline, absl::Now() + absl::Seconds(1)));
  if (!sent.ok()) {
    return Failure(o.rank, absl::StatusCode::kUnavailable,
                   absl::StrCat("cannot talk to rank 0 (", Where(o), "): ", sent.message()));
  }
  // Rank 0 answers only once the whole group is there (or cannot be); its own deadline may end a
  // little after ours, so wait a grace period for its verdict.
  const absl::Duration grace = std::min(o.timeout / 4, absl::Seconds(5));
  auto reply = (*conn)->RecvFrame(deadline + grace);
  if (!reply.ok()) {
    if (absl::IsDeadlineExceeded(reply.status())) {
      return Failure(
          o.rank, absl::StatusCode::kDeadlineExceeded,
          absl::StrCat("connected to rank 0 (", Where(o), ") but the group did not form within ",
                       Seconds(o.timeout + grace), " (other ranks missing?)"));
    }
    return Failure(o.rank, absl::StatusCode::kUnavailable,
                   absl::StrCat("rank 0 (", Where(o),
                                ") hung up during the rendezvous: ", reply.status().message()));
  }
  WireReader r(reply->payload);
  if (reply->type == static_cast<uint8_t>(ControlFrame::kError)) {
    uint32_t code = 0;
    std::string reason;
    if (!r.ReadU32(&code) || !r.ReadString(&reason)) reason = "(unreadable reason)";
    if (code == 0 || code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) {
      code = static_cast<uint32_t>(absl::StatusCode::kUnknown);
    }
    return Failure(o.rank, static_cast<absl::StatusCode>(code), reason);
  }
  uint32_t world = 0;
  std::vector<std::string> hostnames;
  bool ok = reply->type == static_cast<uint8_t>(ControlFrame::kWelcome) && r.ReadU32(&world) &&
            static_cast<int>(world) == o.world_size;
  for (uint32_t i = 0; ok && i < world; ++i) ok = r.ReadString(&hostnames.emplace_back());
  if (!ok) {
    return Failure(o.rank, absl::StatusCode::kInternal,
                   absl::StrCat("malformed answer from rank 0 (", Where(o),
                                "; is something else listening there?)"));
  }
  std::string local_host = (*conn)->LocalHost();
  std::vector<std::unique_ptr<TcpConnection>> peers(o.world_size);
  peers[0] = std::move(*conn);
  return std::make_unique<ControlChannel>(o.rank, o.world_size, std::move(hostnames),
                                          std::move(local_host), std::move(peers));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ControlChannel>> Rendezvous(const RendezvousOptions& opts) {
  if (absl::Status s = Validate(opts); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", opts.rank, ": ", s.message()));
  }
  if (opts.world_size == 1) {
    std::vector<std::unique_ptr<TcpConnection>> none(1);
    return std::make_unique<ControlChannel>(0, 1, std::vector<std::string>{LocalHostname()},
                                            "127.0.0.1", std::move(none));
  }
  return opts.rank == 0 ? RendezvousRoot(opts) : RendezvousPeer(opts);
}

}  // namespace phishard
