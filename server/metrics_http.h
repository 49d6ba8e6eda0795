// A minimal HTTP/1.1 server for Prometheus scrapes: `GET /metrics` (and HEAD) answers the
// registry's text; any other path is 404, any other method 405. One thread polling the listener
// and every connection still sending its request, `Connection: close`. Requests are bounded
// (8 KiB of headers, 2 s in total from accept to send them; a slow or silent client is dropped,
// at most 64 wait at once, the oldest dropped first), so idle or trickling connections cannot
// hold up a scrape; rendering only reads atomics, so a scrape never waits for an engine step
// and an engine step never waits for a scrape.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include "absl/status/statusor.h"

namespace phishard {

// "9400" -> host 127.0.0.1 (loopback when only a port is given); "HOST:PORT"; "[v6]:PORT".
// Port 0 picks a free port. Anything else is INVALID_ARGUMENT naming --metrics-addr.
struct MetricsAddress {
  std::string host;
  int port = 0;
};
absl::StatusOr<MetricsAddress> ParseMetricsAddress(std::string_view address);

class MetricsHttpServer {
 public:
  // Binds and listens before returning (so port() is the real one), then serves `render()` from
  // its own thread. Errors (address in use, bad host) name the address.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      std::string_view address, std::function<std::string()> render);
  ~MetricsHttpServer();  // stops the thread and closes the socket
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;
  void Loop();
  // The whole response to one complete request head.
  std::string Answer(const std::string& request);

  std::function<std::string()> render_;
  int listen_fd_ = -1;
  int wake_pipe_[2] = {-1, -1};  // a byte on [1] ends Loop()
  int port_ = 0;
  std::thread thread_;
};

}  // namespace phishard
