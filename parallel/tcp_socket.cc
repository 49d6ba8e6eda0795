#include "parallel/tcp_socket.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace phishard {
namespace {

constexpr size_t kFrameHeaderBytes = 8;

std::string ErrnoText(int err) { return std::strerror(err); }

std::string SockaddrHost(const sockaddr* sa, socklen_t len) {
  char host[NI_MAXHOST];
  if (getnameinfo(sa, len, host, sizeof(host), nullptr, 0, NI_NUMERICHOST) != 0) return "";
  return host;
}

std::string SockaddrText(const sockaddr* sa, socklen_t len) {
  char host[NI_MAXHOST];
  char port[NI_MAXSERV];
  if (getnameinfo(sa, len, host, sizeof(host), port, sizeof(port),
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return "?";
  }
  return sa->sa_family == AF_INET6 ? absl::StrCat("[", host, "]:", port)
                                   : absl::StrCat(host, ":", port);
}

void SetNoDelay(int fd) {
  int on = 1;
  // Control messages are tiny and latency-bound (one per collective RPC); Nagle would delay them.
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
}

uint32_t LoadBigEndian32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return (uint32_t{u[0]} << 24) | (uint32_t{u[1]} << 16) | (uint32_t{u[2]} << 8) | uint32_t{u[3]};
}

// True if the socket is connected to itself: a retried connect to a port in the ephemeral range
// on the same host can pick that port as its source and complete a TCP "simultaneous open".
bool IsSelfConnected(int fd) {
  sockaddr_storage a{}, b{};
  socklen_t la = sizeof(a), lb = sizeof(b);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&a), &la) != 0) return false;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&b), &lb) != 0) return false;
  return la == lb && std::memcmp(&a, &b, la) == 0;
}

}  // namespace

int PollMillis(absl::Time deadline, absl::Duration cap) {
  absl::Duration left = std::min(deadline - absl::Now(), cap);
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))));
}

// ---------------------------------------------------------------- TcpConnection

TcpConnection::TcpConnection(int fd) : fd_(fd) { PHI_CHECK(fd >= 0) << "invalid socket"; }

TcpConnection::~TcpConnection() { ::close(fd_); }

absl::Status TcpConnection::SendFrame(uint8_t type, std::string_view payload, absl::Time deadline) {
  if (!send_status_.ok()) return send_status_;
  if (payload.size() > kMaxFramePayload) {
    return absl::InvalidArgumentError(absl::StrCat("control frame of ", payload.size(),
                                                   " bytes exceeds the ", kMaxFramePayload,
                                                   "-byte limit"));
  }
  std::string wire;
  wire.reserve(kFrameHeaderBytes + payload.size());
  wire.push_back(static_cast<char>(type));
  wire.append(3, '\0');
  WireAppendU32(&wire, static_cast<uint32_t>(payload.size()));
  wire.append(payload);

  size_t sent = 0;
  while (sent < wire.size()) {
    ssize_t n = ::send(fd_, wire.data() + sent, wire.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (absl::Now() >= deadline) {
        send_status_ = absl::DeadlineExceededError(
            sent == 0 ? "send timed out (peer not reading)"
                      : "send timed out mid-frame (peer not reading); connection unusable");
        return send_status_;
      }
      pollfd p{fd_, POLLOUT, 0};
      ::poll(&p, 1, PollMillis(deadline));
      continue;
    }
    send_status_ = absl::UnavailableError(
        absl::StrCat("send failed: ", n < 0 ? ErrnoText(errno) : "connection closed"));
    return send_status_;
  }
  return absl::OkStatus();
}

absl::Status TcpConnection::CheckHeader() const {
  if (rx_.size() < kFrameHeaderBytes) return absl::OkStatus();
  uint32_t len = LoadBigEndian32(rx_.data() + 4);
  if (len > kMaxFramePayload || rx_[1] != 0 || rx_[2] != 0 || rx_[3] != 0) {
    return absl::InternalError(
        "received bytes that are not a phishard control frame (protocol mismatch)");
  }
  return absl::OkStatus();
}

bool TcpConnection::HasFrame() const {
  if (rx_.size() < kFrameHeaderBytes || !CheckHeader().ok()) return false;
  return rx_.size() >= kFrameHeaderBytes + LoadBigEndian32(rx_.data() + 4);
}

Frame TcpConnection::PopFrame() {
  PHI_CHECK(HasFrame()) << "PopFrame without a complete frame";
  Frame f;
  f.type = static_cast<uint8_t>(rx_[0]);
  size_t len = LoadBigEndian32(rx_.data() + 4);
  f.payload = rx_.substr(kFrameHeaderBytes, len);
  rx_.erase(0, kFrameHeaderBytes + len);
  return f;
}

absl::Status TcpConnection::ReadAvailable() {
  if (!recv_status_.ok()) return recv_status_;
  char buf[64 * 1024];
  for (;;) {
    ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n > 0) {
      rx_.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) {
      recv_status_ = absl::UnavailableError("connection closed by peer");
      return recv_status_;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    recv_status_ = absl::UnavailableError(absl::StrCat("receive failed: ", ErrnoText(errno)));
    return recv_status_;
  }
  absl::Status header = CheckHeader();
  if (!header.ok()) recv_status_ = header;
  return recv_status_;
}

absl::Status TcpConnection::WaitFrame(absl::Time deadline) {
  for (;;) {
    if (HasFrame()) return absl::OkStatus();
    // A peer that closed after sending still delivers what it sent, hence HasFrame() first.
    absl::Status read = ReadAvailable();
    if (HasFrame()) return absl::OkStatus();
    if (!read.ok()) return read;
    if (absl::Now() >= deadline) return absl::DeadlineExceededError("no message before deadline");
    pollfd p{fd_, POLLIN, 0};
    ::poll(&p, 1, PollMillis(deadline));
  }
}

absl::StatusOr<Frame> TcpConnection::RecvFrame(absl::Time deadline) {
  absl::Status s = WaitFrame(deadline);
  if (!s.ok()) return s;
  return PopFrame();
}

void TcpConnection::Shutdown() { ::shutdown(fd_, SHUT_RDWR); }

std::string TcpConnection::LocalHost() const {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (getsockname(fd_, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "";
  return SockaddrHost(reinterpret_cast<sockaddr*>(&ss), len);
}

// ---------------------------------------------------------------- TcpListener

absl::StatusOr<std::unique_ptr<TcpListener>> TcpListener::Listen(const std::string& host,
                                                                 int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  std::string port_str = std::to_string(port);
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), port_str.c_str(), &hints, &res);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve '", host, "': ", gai_strerror(rc)));
  }
  std::string last_error = "no address";
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    int fd =
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_error = ErrnoText(errno);
      continue;
    }
    int on = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd, 128) != 0) {
      last_error = absl::StrCat(SockaddrText(ai->ai_addr, ai->ai_addrlen), ": ", ErrnoText(errno));
      ::close(fd);
      continue;
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
    int bound_port = ss.ss_family == AF_INET6
                         ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                         : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    freeaddrinfo(res);
    return std::unique_ptr<TcpListener>(new TcpListener(fd, bound_port));
  }
  freeaddrinfo(res);
  return absl::UnavailableError(
      absl::StrCat("cannot listen on ", host, ":", port, ": ", last_error));
}

TcpListener::~TcpListener() { ::close(fd_); }

absl::StatusOr<std::unique_ptr<TcpConnection>> TcpListener::AcceptPending() {
  for (;;) {
    int fd = ::accept4(fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      SetNoDelay(fd);
      return std::make_unique<TcpConnection>(fd);
    }
    if (errno == EINTR) continue;
    // A connection reset before we accepted it is the peer's problem, not ours.
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED || errno == EPROTO) {
      return std::unique_ptr<TcpConnection>();
    }
    return absl::UnavailableError(absl::StrCat("accept failed: ", ErrnoText(errno)));
  }
}

// ---------------------------------------------------------------- ConnectWithRetry

absl::StatusOr<std::unique_ptr<TcpConnection>> ConnectWithRetry(const std::string& host, int port,
                                                                absl::Time deadline) {
  std::string last_error = "no attempt made";
  std::string port_str = std::to_string(port);
  absl::Duration backoff = absl::Milliseconds(20);
  for (;;) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    int rc = getaddrinfo(host.c_str(), port_str.c_str(), &hints, &res);
    if (rc != 0) {
      last_error = absl::StrCat("cannot resolve '", host, "': ", gai_strerror(rc));
    }
    for (addrinfo* ai = rc == 0 ? res : nullptr; ai != nullptr; ai = ai->ai_next) {
      int fd =
          ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
      if (fd < 0) {
        last_error = ErrnoText(errno);
        continue;
      }
      int err = 0;
      if (::connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        err = errno;
        if (err == EINPROGRESS) {
          pollfd p{fd, POLLOUT, 0};
          int ready = ::poll(&p, 1, PollMillis(deadline, absl::Seconds(2)));
          socklen_t len = sizeof(err);
          if (ready <= 0) {
            err = ETIMEDOUT;
          } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
            err = errno;
          }
        }
      }
      if (err == 0 && IsSelfConnected(fd)) err = ECONNREFUSED;
      if (err == 0) {
        freeaddrinfo(res);
        SetNoDelay(fd);
        return std::make_unique<TcpConnection>(fd);
      }
      last_error = absl::StrCat("connect to ", SockaddrText(ai->ai_addr, ai->ai_addrlen), ": ",
                                ErrnoText(err));
      ::close(fd);
    }
    if (res != nullptr) freeaddrinfo(res);
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return absl::DeadlineExceededError(last_error);
    std::this_thread::sleep_for(absl::ToChronoMilliseconds(std::min(backoff, left)));
    backoff = std::min(backoff * 2, absl::Milliseconds(500));
  }
}

// ---------------------------------------------------------------- wire encoding

void WireAppendU32(std::string* out, uint32_t v) {
  out->push_back(static_cast<char>(v >> 24));
  out->push_back(static_cast<char>(v >> 16));
  out->push_back(static_cast<char>(v >> 8));
  out->push_back(static_cast<char>(v));
}

void WireAppendString(std::string* out, std::string_view s) {
  WireAppendU32(out, static_cast<uint32_t>(s.size()));
  out->append(s);
}

bool WireReader::ReadU32(uint32_t* v) {
  if (data_.size() < 4) return false;
  *v = LoadBigEndian32(data_.data());
  data_.remove_prefix(4);
  return true;
}

bool WireReader::ReadString(std::string* s) {
  uint32_t len = 0;
  if (!ReadU32(&len) || data_.size() < len) return false;
  s->assign(data_.substr(0, len));
  data_.remove_prefix(len);
  return true;
}

}  // namespace phishard
