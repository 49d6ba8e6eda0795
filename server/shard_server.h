// The gRPC server of one shard: generate.v1.LoraxService (server/lorax_service.h), the standard
// grpc.health.v1.Health, and server reflection, on the unix socket `{uds_path}-{rank}` (spec
// §1.6) and optionally a TCP address.
//
// Readiness (spec §1.7): the LoRAX launcher treats "socket file exists" as "shard ready" and the
// router connects at once without retries. So the server is started on a temporary socket name in
// the same directory, chmod'ed to 0660, and rename()d onto the final path: the path appears
// atomically, only once the server accepts, and a stale file there is replaced in the same step.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "server/lorax_service.h"

namespace phishard {

struct ShardServerOptions {
  std::string uds_path = "/tmp/lorax-server";  // socket path prefix
  int rank = 0;
  int world_size = 1;
  bool sharded = false;    // false: always rank 0's socket name (upstream behaviour)
  std::string listen_tcp;  // "" = no TCP; "PORT" binds 127.0.0.1:PORT; "HOST:PORT" as given
  absl::Duration shutdown_grace = absl::Seconds(30);  // in-flight RPCs get this long
};

// `{uds_path}-{rank}` (rank 0 unless sharded).
std::string ShardSocketPath(const ShardServerOptions& options);
// ServiceDiscovery answer: `unix://{uds_path}-{r}` for r in [0, world_size) (one URL unsharded).
std::vector<std::string> ShardUrls(const ShardServerOptions& options);
// "50051" -> "127.0.0.1:50051"; "HOST:PORT" and "[v6]:PORT" unchanged; anything else is
// INVALID_ARGUMENT naming --listen-tcp.
absl::StatusOr<std::string> NormalizeTcpAddress(std::string_view address);

// The services grpc.health.v1.Health answers for: "" (the whole server) and
// generate.v1.LoraxService; any other name is NOT_FOUND (ShardServer and LoadingHealthServer).
bool IsHealthCheckedService(const std::string& service);

class ShardServer {
 public:
  // Starts serving `service`; when this returns OK the socket exists at its final path.
  static absl::StatusOr<std::unique_ptr<ShardServer>> Start(const ShardServerOptions& options,
                                                            LoraxService* service);
  ~ShardServer();  // Shutdown() if not done yet

  // Graceful stop: new RPCs get UNAVAILABLE, admitted ones finish (up to shutdown_grace), health
  // watchers end, the executor drains, and the socket file is removed. Idempotent.
  void Shutdown();

  const std::string& socket_path() const { return socket_path_; }
  int tcp_port() const { return tcp_port_; }  // 0 without --listen-tcp

  class HealthServiceImpl;

 private:
  ShardServer() = default;

  ShardServerOptions options_;
  LoraxService* service_ = nullptr;
  std::unique_ptr<HealthServiceImpl> health_service_;
  std::unique_ptr<grpc::Server> server_;
  std::string socket_path_;
  dev_t socket_dev_ = 0;
  ino_t socket_ino_ = 0;
  int tcp_port_ = 0;
  bool shut_down_ = false;
};

// SIGINT/SIGTERM: a handler that only writes to a pipe, and a watcher thread that reads it.
class TermSignalWatcher {
 public:
  // Installs the handlers and starts the watcher thread (one per process). While `exit_on_signal`
  // is set (model loading: nothing to clean up, no socket yet) a signal ends the process at once
  // with status 0.
  TermSignalWatcher();
  ~TermSignalWatcher();
  void set_exit_on_signal(bool exit_on_signal);
  // Blocks until SIGINT or SIGTERM arrives; returns the signal number.
  int Wait();

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace phishard
