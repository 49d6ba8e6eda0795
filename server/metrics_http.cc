#include "server/metrics_http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace phishard {
namespace {

constexpr size_t kMaxRequestBytes = 8 << 10;
constexpr int kIoTimeoutMs = 2000;  // to deliver a whole request after accept; to send a reply
constexpr size_t kMaxPending = 64;  // connections waiting for their request at once

void SendAll(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // client gone or send timeout: nothing more to do for it
    data.remove_prefix(static_cast<size_t>(n));
  }
}

std::string Response(int code, std::string_view reason, std::string_view content_type,
                     std::string_view body, bool head_only) {
  std::string out = "HTTP/1.1 " + std::to_string(code) + " " + std::string(reason) +
                    "\r\nContent-Type: " + std::string(content_type) +
                    "\r\nContent-Length: " + std::to_string(body.size()) +
                    "\r\nConnection: close\r\n";
  if (code == 405) out += "Allow: GET, HEAD\r\n";
  out += "\r\n";
  if (!head_only) out.append(body);
  return out;
}

}  // namespace

absl::StatusOr<MetricsAddress> ParseMetricsAddress(std::string_view address_view) {
  // absl 20220623 here has its own string_view: StrCat takes std::string.
  const std::string address(address_view);
  auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-addr '", address,
                                                   "': ", std::string(why),
                                                   " (expected PORT, HOST:PORT or [V6]:PORT)"));
  };
  MetricsAddress out;
  std::string_view port_str;
  if (address.find(':') == std::string_view::npos) {
    out.host = "127.0.0.1";
    port_str = address;
  } else if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    if (close == std::string_view::npos || close + 1 >= address.size() ||
        address[close + 1] != ':') {
      return bad("unterminated IPv6 host");
    }
    out.host = std::string(address.substr(1, close - 1));
    port_str = address.substr(close + 2);
  } else {
    const size_t colon = address.rfind(':');
    if (address.find(':') != colon) return bad("an IPv6 host needs brackets");
    out.host = std::string(address.substr(0, colon));
    port_str = address.substr(colon + 1);
  }
  if (out.host.empty()) return bad("empty host");
  if (port_str.empty() || !absl::SimpleAtoi(std::string(port_str), &out.port) || out.port < 0 ||
      out.port > 65535) {
    return bad("port must be a number in [0, 65535]");
  }
  return out;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    std::string_view address_view, std::function<std::string()> render) {
  const std::string address(address_view);
  absl::StatusOr<MetricsAddress> addr = ParseMetricsAddress(address);
  if (!addr.ok()) return addr.status();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(addr->port);
  if (int rc = ::getaddrinfo(addr->host.c_str(), port.c_str(), &hints, &res); rc != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--metrics-addr '", address, "': cannot resolve host: ", std::string(gai_strerror(rc))));
  }
  std::unique_ptr<MetricsHttpServer> s(new MetricsHttpServer());
  std::string last_error = "no address";
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    const int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd, 16) == 0) {
      s->listen_fd_ = fd;
      break;
    }
    last_error = std::strerror(errno);
    ::close(fd);
  }
  ::freeaddrinfo(res);
  if (s->listen_fd_ < 0) {
    return absl::UnavailableError(
        absl::StrCat("--metrics-addr '", address, "': cannot listen: ", last_error));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(s->listen_fd_, reinterpret_cast<sockaddr*>(&bound), &len);
  s->port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  if (::pipe2(s->wake_pipe_, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("metrics server: pipe: ", std::strerror(errno)));
  }
  s->render_ = std::move(render);
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

MetricsHttpServer::~MetricsHttpServer() {
  if (thread_.joinable()) {
    const char b = 0;
    while (::write(wake_pipe_[1], &b, 1) < 0 && errno == EINTR) {
    }
    thread_.join();
  }
  for (int fd : {listen_fd_, wake_pipe_[0], wake_pipe_[1]}) {
    if (fd >= 0) ::close(fd);
  }
}

void MetricsHttpServer::Loop() {
  // Every pending connection is polled together with the listener: one that trickles its
  // request or says nothing holds only its own slot until its deadline (kIoTimeoutMs from
  // accept, in total), never the scrapes queued behind it.
  using Clock = std::chrono::steady_clock;
  struct Pending {
    int fd;
    std::string request;
    Clock::time_point deadline;
  };
  std::vector<Pending> pending;  // oldest first
  auto drop = [&pending](size_t i) {
    ::close(pending[i].fd);
    pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(i));
  };
  while (true) {
    std::vector<pollfd> fds = {{listen_fd_, POLLIN, 0}, {wake_pipe_[0], POLLIN, 0}};
    int timeout_ms = -1;
    const Clock::time_point now = Clock::now();
    for (const Pending& p : pending) {
      fds.push_back({p.fd, POLLIN, 0});
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(p.deadline - now).count();
      const int ms = static_cast<int>(std::max<int64_t>(0, left));
      timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
    }
    if (::poll(fds.data(), fds.size(), timeout_ms) < 0) {
      if (errno == EINTR) continue;
      PHI_LOG(ERROR) << "metrics server: poll: " << std::strerror(errno) << "; stopping";
      break;
    }
    if (fds[1].revents != 0) break;
    // Pending connections, newest first so that erasing keeps the indices of the rest.
    for (size_t i = pending.size(); i-- > 0;) {
      Pending& p = pending[i];
      if (fds[2 + i].revents != 0) {
        char buf[1024];
        const ssize_t n = ::recv(p.fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (n <= 0) {  // closed before a whole request
          drop(i);
          continue;
        }
        p.request.append(buf, static_cast<size_t>(n));
        const bool complete = p.request.find("\r\n\r\n") != std::string::npos ||
                              p.request.find("\n\n") != std::string::npos;
        if (complete || p.request.size() >= kMaxRequestBytes) {
          SendAll(p.fd, complete ? Answer(p.request)
                                 : Response(431, "Request Header Fields Too Large", "text/plain",
                                            "too large\n", false));
          drop(i);
          continue;
        }
      }
      if (Clock::now() >= p.deadline) drop(i);  // silent or too slow: dropped unanswered
    }
    if ((fds[0].revents & POLLIN) != 0) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;  // the client went away, or fd pressure: try again on the next poll
      if (pending.size() >= kMaxPending) drop(0);  // a flood of idle connections: oldest goes
      timeval tv{kIoTimeoutMs / 1000, (kIoTimeoutMs % 1000) * 1000};
      ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
      pending.push_back(
          {fd, std::string(), Clock::now() + std::chrono::milliseconds(kIoTimeoutMs)});
    }
  }
  for (const Pending& p : pending) ::close(p.fd);
}

std::string MetricsHttpServer::Answer(const std::string& req) {
  const std::string_view line = std::string_view(req).substr(0, req.find_first_of("\r\n"));
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || line.substr(sp2 + 1).substr(0, 5) != "HTTP/") {
    return Response(400, "Bad Request", "text/plain", "bad request line\n", false);
  }
  const std::string_view method = line.substr(0, sp1);
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  target = target.substr(0, target.find('?'));  // Prometheus may add query parameters
  const bool head = method == "HEAD";
  if (method != "GET" && !head) {
    return Response(405, "Method Not Allowed", "text/plain", "only GET\n", false);
  }
  if (target != "/metrics") return Response(404, "Not Found", "text/plain", "try /metrics\n", head);
  return Response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", render_(), head);
}

}  // namespace phishard
