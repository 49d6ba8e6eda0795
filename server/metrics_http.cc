#include "server/metrics_http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace phishard {
namespace {

constexpr size_t kMaxRequestBytes = 8 << 10;
constexpr int kIoTimeoutMs = 2000;

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
  while (true) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_pipe_[0], POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      PHI_LOG(ERROR) << "metrics server: poll: " << std::strerror(errno) << "; stopping";
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;  // the client went away, or fd pressure: try again on the next poll
    timeval tv{kIoTimeoutMs / 1000, (kIoTimeoutMs % 1000) * 1000};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    Serve(fd);
    ::close(fd);
  }
}

void MetricsHttpServer::Serve(int fd) {
  // Read up to the end of the headers; the body (none for GET) is ignored.
  std::string req;
  char buf[1024];
  while (req.find("\r\n\r\n") == std::string::npos && req.find("\n\n") == std::string::npos) {
    if (req.size() >= kMaxRequestBytes) {
      SendAll(fd,
              Response(431, "Request Header Fields Too Large", "text/plain", "too large\n", false));
      return;
    }
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // closed, or silent past the timeout
    req.append(buf, static_cast<size_t>(n));
  }
  const std::string_view line = std::string_view(req).substr(0, req.find_first_of("\r\n"));
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || line.substr(sp2 + 1).substr(0, 5) != "HTTP/") {
    SendAll(fd, Response(400, "Bad Request", "text/plain", "bad request line\n", false));
    return;
  }
  const std::string_view method = line.substr(0, sp1);
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  target = target.substr(0, target.find('?'));  // Prometheus may add query parameters
  const bool head = method == "HEAD";
  if (method != "GET" && !head) {
    SendAll(fd, Response(405, "Method Not Allowed", "text/plain", "only GET\n", false));
  } else if (target != "/metrics") {
    SendAll(fd, Response(404, "Not Found", "text/plain", "try /metrics\n", head));
  } else {
    SendAll(fd, Response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", render_(), head));
  }
}

}  // namespace phishard
