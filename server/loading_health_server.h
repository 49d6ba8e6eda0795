// The `--listen-tcp` port while the model loads: a gRPC server holding only grpc.health.v1.Health,
// which answers NOT_SERVING (Check, for "" and generate.v1.LoraxService; other names NOT_FOUND),
// so an orchestrator's gRPC probe sees "loading" rather than "connection refused", and a port
// that cannot be bound fails startup before a long load instead of after it. Watch sends
// NOT_SERVING and ends the stream with UNAVAILABLE ("watch again"): the real server takes the port
// over once loading is done (stop this one first; spec §1.7 keeps the unix socket absent until
// then, so nothing else listens early).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace grpc {
class Server;
}

namespace phishard {

class LoadingHealthServer {
 public:
  // `listen_tcp` as --listen-tcp takes it (PORT or HOST:PORT). Port 0 starts nothing (nullptr).
  // Errors name --listen-tcp.
  static absl::StatusOr<std::unique_ptr<LoadingHealthServer>> Start(const std::string& listen_tcp);
  ~LoadingHealthServer();  // stops listening; the port is free again when this returns

  int port() const { return port_; }

 private:
  class Service;
  LoadingHealthServer();
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace phishard
