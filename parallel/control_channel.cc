#include "parallel/control_channel.h"

#include <poll.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "parallel/tcp_socket.h"

namespace phishard {

ControlChannel::ControlChannel(int rank, int world_size, std::vector<std::string> hostnames,
                               std::string local_host,
                               std::vector<std::unique_ptr<TcpConnection>> peers)
    : rank_(rank),
      world_size_(world_size),
      hostnames_(std::move(hostnames)),
      local_host_(std::move(local_host)),
      peers_(std::move(peers)) {
  PHI_CHECK(world_size_ >= 1 && rank_ >= 0 && rank_ < world_size_) << rank_ << "/" << world_size_;
  PHI_CHECK(static_cast<int>(peers_.size()) == world_size_) << "one connection slot per rank";
  PHI_CHECK(static_cast<int>(hostnames_.size()) == world_size_) << "one hostname per rank";
  for (int r = 0; r < world_size_; ++r) {
    bool want = rank_ == 0 ? r != 0 : r == 0;
    PHI_CHECK((peers_[r] != nullptr) == want) << "rank " << rank_ << ": connection slot " << r;
  }
}

ControlChannel::~ControlChannel() = default;

int ControlChannel::local_rank() const {
  int n = 0;
  for (int r = 0; r < rank_; ++r) n += hostnames_[r] == hostnames_[rank_];
  return n;
}

int ControlChannel::local_world_size() const {
  int n = 0;
  for (const std::string& h : hostnames_) n += h == hostnames_[rank_];
  return n;
}

void ControlChannel::Close() {
  closed_.store(true);
  for (auto& p : peers_) {
    if (p) p->Shutdown();
  }
}

absl::Status ControlChannel::CheckRole(bool want_root, const char* what) const {
  if ((rank_ == 0) != want_root) {
    return absl::FailedPreconditionError(absl::StrCat("rank ", rank_, ": ", what, " is for ",
                                                      want_root ? "rank 0" : "ranks other than 0"));
  }
  if (closed_.load()) {
    return absl::UnavailableError(absl::StrCat("rank ", rank_, ": control channel closed"));
  }
  return absl::OkStatus();
}

absl::Status ControlChannel::PeerError(int peer, const absl::Status& s, const char* what) const {
  if (closed_.load()) {
    return absl::UnavailableError(
        absl::StrCat("rank ", rank_, ": control channel closed (during ", what, ")"));
  }
  return absl::Status(s.code(), absl::StrCat("rank ", rank_, ": control channel to rank ", peer,
                                             ": ", s.message(), " (during ", what, ")"));
}

absl::Status ControlChannel::SendTo(int peer, ControlFrame type, std::string_view payload,
                                    absl::Time deadline) {
  absl::Status s = peers_[peer]->SendFrame(static_cast<uint8_t>(type), payload, deadline);
  if (!s.ok()) return PeerError(peer, s, "send");
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ControlChannel::RecvFromAll(const std::vector<int>& from,
                                                                     ControlFrame type,
                                                                     absl::Time deadline,
                                                                     const char* what) {
  absl::MutexLock lock(&recv_mu_);
  std::vector<int> missing;
  std::vector<pollfd> fds;
  for (;;) {
    if (closed_.load()) {
      return absl::UnavailableError(
          absl::StrCat("rank ", rank_, ": control channel closed (during ", what, ")"));
    }
    missing.clear();
    for (int r : from) {
      TcpConnection& c = *peers_[r];
      if (c.HasFrame()) continue;
      absl::Status s = c.ReadAvailable();
      if (c.HasFrame()) continue;
      if (!s.ok()) return PeerError(r, s, what);
      missing.push_back(r);
    }
    if (missing.empty()) break;
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("rank ", rank_, ": no ", what, " from rank", missing.size() > 1 ? "s " : " ",
                       absl::StrJoin(missing, ", "), " before the deadline"));
    }
    fds.clear();
    for (int r : missing) fds.push_back(pollfd{peers_[r]->fd(), POLLIN, 0});
    ::poll(fds.data(), fds.size(), PollMillis(deadline, absl::Milliseconds(200)));
  }
  // Every frame is there: only now consume, so a timeout above leaves the streams untouched.
  std::vector<std::string> out;
  out.reserve(from.size());
  for (int r : from) {
    Frame f = peers_[r]->PopFrame();
    if (f.type != static_cast<uint8_t>(type)) {
      return absl::InternalError(absl::StrCat(
          "rank ", rank_, ": control channel out of sync with rank ", r, ": expected frame type ",
          static_cast<int>(type), ", got ", static_cast<int>(f.type), " (during ", what, ")"));
    }
    out.push_back(std::move(f.payload));
  }
  return out;
}

absl::Status ControlChannel::BroadcastFromRoot(std::string_view msg, absl::Duration timeout) {
  if (absl::Status s = CheckRole(true, "BroadcastFromRoot"); !s.ok()) return s;
  absl::MutexLock lock(&send_mu_);
  absl::Time deadline = absl::Now() + timeout;
  for (int r = 1; r < world_size_; ++r) {
    if (absl::Status s = SendTo(r, ControlFrame::kMessage, msg, deadline); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ControlChannel::GatherToRoot(absl::Duration timeout) {
  if (absl::Status s = CheckRole(true, "GatherToRoot"); !s.ok()) return s;
  std::vector<int> from;
  for (int r = 1; r < world_size_; ++r) from.push_back(r);
  auto got = RecvFromAll(from, ControlFrame::kMessage, absl::Now() + timeout, "message");
  if (!got.ok()) return got.status();
  std::vector<std::string> out(world_size_);
  for (int r = 1; r < world_size_; ++r) out[r] = std::move((*got)[r - 1]);
  return out;
}

absl::StatusOr<std::string> ControlChannel::ReceiveFromRoot(absl::Duration timeout) {
  if (absl::Status s = CheckRole(false, "ReceiveFromRoot"); !s.ok()) return s;
  auto got = RecvFromAll({0}, ControlFrame::kMessage, absl::Now() + timeout, "message");
  if (!got.ok()) return got.status();
  return std::move((*got)[0]);
}

absl::Status ControlChannel::SendToRoot(std::string_view msg, absl::Duration timeout) {
  if (absl::Status s = CheckRole(false, "SendToRoot"); !s.ok()) return s;
  absl::MutexLock lock(&send_mu_);
  return SendTo(0, ControlFrame::kMessage, msg, absl::Now() + timeout);
}

absl::StatusOr<std::vector<std::string>> ControlChannel::AllGather(std::string_view mine,
                                                                   absl::Duration timeout) {
  if (closed_.load()) {
    return absl::UnavailableError(absl::StrCat("rank ", rank_, ": control channel closed"));
  }
  absl::Time deadline = absl::Now() + timeout;
  std::vector<std::string> all(world_size_);
  if (world_size_ == 1) {
    all[0] = std::string(mine);
    return all;
  }
  if (rank_ != 0) {
    {
      absl::MutexLock lock(&send_mu_);
      if (absl::Status s = SendTo(0, ControlFrame::kBlob, mine, deadline); !s.ok()) return s;
    }
    auto got = RecvFromAll({0}, ControlFrame::kBlob, deadline, "all-gather result");
    if (!got.ok()) return got.status();
    WireReader reader((*got)[0]);
    for (std::string& blob : all) {
      if (!reader.ReadString(&blob)) {
        return absl::InternalError(
            absl::StrCat("rank ", rank_, ": malformed all-gather result from rank 0"));
      }
    }
    return all;
  }
  std::vector<int> from;
  for (int r = 1; r < world_size_; ++r) from.push_back(r);
  auto got = RecvFromAll(from, ControlFrame::kBlob, deadline, "all-gather contribution");
  if (!got.ok()) return got.status();
  all[0] = std::string(mine);
  for (int r = 1; r < world_size_; ++r) all[r] = std::move((*got)[r - 1]);
  std::string packed;
  for (const std::string& blob : all) WireAppendString(&packed, blob);
  absl::MutexLock lock(&send_mu_);
  for (int r = 1; r < world_size_; ++r) {
    if (absl::Status s = SendTo(r, ControlFrame::kBlob, packed, deadline); !s.ok()) return s;
  }
  return all;
}

absl::StatusOr<std::string> ControlChannel::BroadcastBlob(std::string_view root_blob,
                                                          absl::Duration timeout) {
  if (closed_.load()) {
    return absl::UnavailableError(absl::StrCat("rank ", rank_, ": control channel closed"));
  }
  absl::Time deadline = absl::Now() + timeout;
  if (rank_ == 0) {
    absl::MutexLock lock(&send_mu_);
    for (int r = 1; r < world_size_; ++r) {
      if (absl::Status s = SendTo(r, ControlFrame::kBlob, root_blob, deadline); !s.ok()) return s;
    }
    return std::string(root_blob);
  }
  auto got = RecvFromAll({0}, ControlFrame::kBlob, deadline, "broadcast blob");
  if (!got.ok()) return got.status();
  return std::move((*got)[0]);
}

}  // namespace phishard
