#include "parallel/abort_watch.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "parallel/tcp_socket.h"

namespace phishard {

absl::StatusOr<std::unique_ptr<AbortWatch>> AbortWatch::Create(ControlChannel& control,
                                                               absl::Duration timeout,
                                                               Callback on_abort) {
  const int rank = control.rank();
  const int world = control.world_size();
  const absl::Time deadline = absl::Now() + timeout;
  const std::string me = absl::StrCat("rank ", rank, ": abort watch: ");
  std::vector<std::unique_ptr<TcpConnection>> peers(world);
  const auto hello_type = static_cast<uint8_t>(ControlFrame::kHello);
  const auto welcome_type = static_cast<uint8_t>(ControlFrame::kWelcome);

  if (world > 1 && rank == 0) {
    auto listener = TcpListener::Listen(control.local_host(), 0);
    if (!listener.ok()) {
      return absl::UnavailableError(absl::StrCat(me, listener.status().message()));
    }
    std::string where;
    WireAppendString(&where, control.local_host());
    WireAppendU32(&where, static_cast<uint32_t>((*listener)->port()));
    if (auto sent = control.BroadcastBlob(where, timeout); !sent.ok()) return sent.status();
    std::vector<std::unique_ptr<TcpConnection>> pending;
    int joined = 0;
    while (joined < world - 1) {
      for (;;) {
        auto conn = (*listener)->AcceptPending();
        if (!conn.ok()) return absl::UnavailableError(absl::StrCat(me, conn.status().message()));
        if (*conn == nullptr) break;
        pending.push_back(std::move(*conn));
      }
      for (auto& conn : pending) {
        absl::Status read = conn->ReadAvailable();
        if (!conn->HasFrame()) {
          if (!read.ok()) conn.reset();
          continue;
        }
        Frame f = conn->PopFrame();
        uint32_t peer = 0;
        WireReader r(f.payload);
        if (f.type != hello_type || !r.ReadU32(&peer) || peer == 0 ||
            peer >= static_cast<uint32_t>(world) || peers[peer] != nullptr) {
          return absl::InternalError(absl::StrCat(me, "unexpected hello"));
        }
        peers[peer] = std::move(conn);
        ++joined;
      }
      std::erase(pending, nullptr);
      if (joined == world - 1) break;
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat(me, world - 1 - joined, " rank(s) did not connect in time"));
      }
      std::vector<pollfd> fds{{(*listener)->fd(), POLLIN, 0}};
      for (auto& conn : pending) fds.push_back(pollfd{conn->fd(), POLLIN, 0});
      ::poll(fds.data(), fds.size(), PollMillis(deadline, absl::Milliseconds(200)));
    }
    for (int r = 1; r < world; ++r) {
      absl::Status s = peers[r]->SendFrame(welcome_type, "", deadline);
      if (!s.ok()) return absl::UnavailableError(absl::StrCat(me, "rank ", r, ": ", s.message()));
    }
  } else if (world > 1) {
    auto where = control.BroadcastBlob("", timeout);
    if (!where.ok()) return where.status();
    std::string host;
    uint32_t port = 0;
    WireReader r(*where);
    if (!r.ReadString(&host) || !r.ReadU32(&port)) {
      return absl::InternalError(absl::StrCat(me, "malformed address from rank 0"));
    }
    auto conn = ConnectWithRetry(host, static_cast<int>(port), deadline);
    if (!conn.ok()) return absl::UnavailableError(absl::StrCat(me, conn.status().message()));
    std::string hello;
    WireAppendU32(&hello, static_cast<uint32_t>(rank));
    if (absl::Status s = (*conn)->SendFrame(hello_type, hello, deadline); !s.ok()) {
      return absl::UnavailableError(absl::StrCat(me, s.message()));
    }
    auto welcome = (*conn)->RecvFrame(deadline);
    if (!welcome.ok() || welcome->type != welcome_type) {
      return absl::UnavailableError(absl::StrCat(
          me, "rank 0 did not confirm: ",
          welcome.ok() ? "unexpected frame" : std::string(welcome.status().message())));
    }
    peers[0] = std::move(*conn);
  }
  return std::unique_ptr<AbortWatch>(new AbortWatch(rank, std::move(peers), std::move(on_abort)));
}

AbortWatch::AbortWatch(int rank, std::vector<std::unique_ptr<TcpConnection>> peers,
                       Callback on_abort)
    : rank_(rank), peers_(std::move(peers)), on_abort_(std::move(on_abort)) {
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  PHI_CHECK(wake_fd_ >= 0) << "eventfd failed";
  thread_ = std::thread([this] { Run(); });
}

AbortWatch::~AbortWatch() {
  if (!done_.exchange(true)) TellAndClose(absl::StrCat("rank ", rank_, " left the group"), -1);
  uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof(one));
  thread_.join();
  ::close(wake_fd_);
}

void AbortWatch::Trigger(const std::string& reason) {
  if (done_.exchange(true)) return;
  TellAndClose(absl::StrCat("rank ", rank_, " aborted: ", reason), -1);
  uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof(one));
}

void AbortWatch::TellAndClose(const std::string& reason, int skip) {
  absl::MutexLock lock(&send_mu_);
  const absl::Time deadline = absl::Now() + absl::Milliseconds(200);
  for (int r = 0; r < static_cast<int>(peers_.size()); ++r) {
    if (peers_[r] == nullptr) continue;
    if (r != skip) {
      peers_[r]
          ->SendFrame(static_cast<uint8_t>(ControlFrame::kMessage), reason, deadline)
          .IgnoreError();
    }
    peers_[r]->Shutdown();
  }
}

void AbortWatch::Run() {
  std::vector<pollfd> fds{{wake_fd_, POLLIN, 0}};
  std::vector<int> ranks{-1};
  for (int r = 0; r < static_cast<int>(peers_.size()); ++r) {
    if (peers_[r] == nullptr) continue;
    fds.push_back(pollfd{peers_[r]->fd(), POLLIN, 0});
    ranks.push_back(r);
  }
  for (;;) {
    if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) return;
    if (done_.load() || fds[0].revents != 0) return;
    for (size_t i = 1; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      TcpConnection& conn = *peers_[ranks[i]];
      absl::Status read = conn.ReadAvailable();
      std::string reason;
      if (conn.HasFrame()) {
        reason = conn.PopFrame().payload;
      } else if (!read.ok()) {
        reason = absl::StrCat("rank ", rank_, " lost its connection to rank ", ranks[i], " (",
                              read.message(), "; did that process exit or crash?)");
      } else {
        continue;  // part of a message; the rest follows
      }
      if (done_.exchange(true)) return;
      PHI_LOG(WARNING) << "rank " << rank_ << ": tensor-parallel group broken: " << reason;
      on_abort_(reason);
      TellAndClose(reason, ranks[i]);  // rank 0 relays to everyone else
      return;
    }
  }
}

}  // namespace phishard
