#include "server/shard_server.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "proto/health.grpc.pb.h"

namespace phishard {
namespace {

namespace hv1 = ::grpc::health::v1;
constexpr char kLoraxServiceName[] = "generate.v1.LoraxService";
// sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
constexpr size_t kMaxUnixPath = sizeof(sockaddr_un::sun_path) - 1;

hv1::HealthCheckResponse::ServingStatus ToServing(bool serving) {
  return serving ? hv1::HealthCheckResponse::SERVING : hv1::HealthCheckResponse::NOT_SERVING;
}

}  // namespace

bool IsHealthCheckedService(const std::string& service) {
  return service.empty() || service == kLoraxServiceName;
}

// ---- grpc.health.v1.Health ---------------------------------------------------------------------

class ShardServer::HealthServiceImpl final : public hv1::Health::CallbackService {
 public:
  explicit HealthServiceImpl(LoraxService* lorax) : lorax_(lorax) {}

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* ctx,
                                  const hv1::HealthCheckRequest* req,
                                  hv1::HealthCheckResponse* resp) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    if (!IsHealthCheckedService(req->service())) {
      reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                   absl::StrCat("unknown service '", req->service(), "'")));
      return reactor;
    }
    // The same check as LoraxService.Health: a real Ping when the executor is idle.
    lorax_->CheckHealth([reactor, resp](absl::Status st) {
      resp->set_status(ToServing(st.ok()));
      reactor->Finish(grpc::Status::OK);
    });
    return reactor;
  }

  // Sends the current status, then every change, until the client leaves or the server stops.
  class WatchReactor final : public grpc::ServerWriteReactor<hv1::HealthCheckResponse> {
   public:
    WatchReactor(HealthServiceImpl* owner, bool known) : owner_(owner), known_(known) {}

    void Begin() {
      std::lock_guard<std::mutex> lock(mu_);
      if (!known_) {
        pending_ = hv1::HealthCheckResponse::SERVICE_UNKNOWN;
      } else {
        pending_ = ToServing(owner_->lorax_->health().serving());
      }
      MaybeWriteLocked();
    }
    void Update(bool serving) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!known_) return;
      pending_ = ToServing(serving);
      MaybeWriteLocked();
    }
    void End(grpc::Status status) {
      std::lock_guard<std::mutex> lock(mu_);
      finish_status_ = std::move(status);
      finish_wanted_ = true;
      MaybeWriteLocked();
    }
    void OnWriteDone(bool ok) override {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) finish_wanted_ = true;  // stream broken; finishing is all that is left
      MaybeWriteLocked();
    }
    void OnCancel() override { End(grpc::Status::CANCELLED); }
    void OnDone() override {
      owner_->RemoveWatcher(this);
      delete this;
    }

   private:
    // One write in flight at a time; Finish only once no write is outstanding.
    void MaybeWriteLocked() {
      if (writing_ || finished_) return;
      if (finish_wanted_) {
        finished_ = true;
        Finish(finish_status_);
        return;
      }
      if (pending_.has_value() && pending_ != last_sent_) {
        last_sent_ = pending_;
        response_.set_status(*pending_);
        writing_ = true;
        StartWrite(&response_);
      }
    }

    HealthServiceImpl* owner_;
    const bool known_;
    std::mutex mu_;
    std::optional<hv1::HealthCheckResponse::ServingStatus> pending_, last_sent_;
    hv1::HealthCheckResponse response_;
    bool writing_ = false;
    bool finish_wanted_ = false;
    bool finished_ = false;
    grpc::Status finish_status_;
  };

  grpc::ServerWriteReactor<hv1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* /*ctx*/, const hv1::HealthCheckRequest* req) override {
    auto* watcher = new WatchReactor(this, IsHealthCheckedService(req->service()));
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ended_) {
        watcher->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
        return watcher;
      }
      watchers_.insert(watcher);
    }
    watcher->Begin();
    return watcher;
  }

  void Subscribe() {
    subscription_ = lorax_->health().Subscribe([this](bool serving) {
      std::lock_guard<std::mutex> lock(mu_);
      for (WatchReactor* w : watchers_) w->Update(serving);
    });
  }

  void Unsubscribe() {
    if (subscription_ >= 0) lorax_->health().Unsubscribe(subscription_);
    subscription_ = -1;
  }

  // Ends every Watch stream (the server's Shutdown waits for open streams).
  void EndAll() {
    Unsubscribe();
    std::lock_guard<std::mutex> lock(mu_);
    ended_ = true;
    for (WatchReactor* w : watchers_) w->End(grpc::Status::OK);
  }

  void RemoveWatcher(WatchReactor* w) {
    std::lock_guard<std::mutex> lock(mu_);
    watchers_.erase(w);
  }

 private:
  LoraxService* lorax_;
  int subscription_ = -1;
  std::mutex mu_;
  bool ended_ = false;
  std::set<WatchReactor*> watchers_;
};

// ---- addresses ---------------------------------------------------------------------------------

std::string ShardSocketPath(const ShardServerOptions& options) {
  return absl::StrCat(options.uds_path, "-", options.sharded ? options.rank : 0);
}

std::vector<std::string> ShardUrls(const ShardServerOptions& options) {
  std::vector<std::string> urls;
  const int n = options.sharded ? options.world_size : 1;
  for (int r = 0; r < n; ++r) urls.push_back(absl::StrCat("unix://", options.uds_path, "-", r));
  return urls;
}

absl::StatusOr<std::string> NormalizeTcpAddress(std::string_view address_sv) {
  // Debian's Abseil does not alias absl::string_view to std::string_view.
  const absl::string_view address(address_sv.data(), address_sv.size());
  uint32_t port = 0;
  if (absl::SimpleAtoi(address, &port)) {
    if (port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrFormat("--listen-tcp: port %d is out of range [0, 65535]", port));
    }
    return absl::StrCat("127.0.0.1:", port);
  }
  const size_t colon = address.rfind(':');
  if (colon == std::string_view::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port > 65535) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--listen-tcp: '%s' is neither PORT nor HOST:PORT (e.g. 50051 or 0.0.0.0:50051)",
        std::string(address)));
  }
  return std::string(address);
}

// ---- ShardServer -------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<ShardServer>> ShardServer::Start(const ShardServerOptions& options,
                                                                LoraxService* service) {
  namespace fs = std::filesystem;
  std::unique_ptr<ShardServer> s(new ShardServer());
  s->options_ = options;
  s->service_ = service;
  s->socket_path_ = ShardSocketPath(options);

  const fs::path final_path(s->socket_path_);
  fs::path dir = final_path.parent_path();
  if (dir.empty()) dir = ".";
  std::error_code ec;
  // A missing directory is created 0750 (owner and group: the router runs as the same uid/gid);
  // only its last level, so a typo deep in the path is still an error. An existing directory is
  // the operator's and keeps its mode. EEXIST: the other ranks of a launch create it too.
  if (!fs::is_directory(dir, ec)) {
    if (::mkdir(dir.c_str(), 0750) == 0) {
      ::chmod(dir.c_str(), 0750);  // whatever the umask took away
    } else if (errno != EEXIST) {
      return absl::FailedPreconditionError(
          absl::StrFormat("--uds-path: cannot create directory '%s' of socket '%s': %s",
                          dir.string(), s->socket_path_, std::strerror(errno)));
    }
    if (!fs::is_directory(dir, ec)) {
      return absl::FailedPreconditionError(
          absl::StrFormat("--uds-path: '%s' (directory of socket '%s') is not a directory",
                          dir.string(), s->socket_path_));
    }
  }
  if (s->socket_path_.size() > kMaxUnixPath) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--uds-path: socket path '%s' is %d bytes; unix sockets allow at most %d",
                        s->socket_path_, s->socket_path_.size(), kMaxUnixPath));
  }
  // Temporary name next to the final one (rename() must not cross filesystems); short enough
  // whenever the final path is.
  std::string tmp =
      (dir / absl::StrFormat(".%s.%d", final_path.filename().string(), getpid())).string();
  if (tmp.size() > kMaxUnixPath) tmp = (dir / absl::StrFormat(".p%d", getpid())).string();
  if (tmp.size() > kMaxUnixPath) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--uds-path: no room for a temporary socket name next to '%s' (%d-byte limit)",
        s->socket_path_, kMaxUnixPath));
  }
  ::unlink(tmp.c_str());  // a leftover of a crashed process with our pid

  s->health_service_ = std::make_unique<HealthServiceImpl>(service);
  s->health_service_->Subscribe();

  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // Big prefill batches (long prompts, text + ids) exceed gRPC's 4 MiB default (spec §2.1).
  builder.SetMaxReceiveMessageSize(INT_MAX);
  // Two servers silently sharing one TCP port would split the router's calls between them.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort("unix:" + tmp, grpc::InsecureServerCredentials());
  std::string tcp;
  if (!options.listen_tcp.empty()) {
    absl::StatusOr<std::string> addr = NormalizeTcpAddress(options.listen_tcp);
    if (!addr.ok()) return addr.status();
    tcp = *addr;
    builder.AddListeningPort(tcp, grpc::InsecureServerCredentials(), &s->tcp_port_);
  }
  builder.RegisterService(service);
  builder.RegisterService(s->health_service_.get());
  // bind() creates the socket file with mode 0777 & ~umask; under umask 0 it would be connectable
  // by anyone until the chmod below. Born 0660 instead (the process umask is restored at once;
  // nothing else creates files during startup).
  const mode_t old_umask = ::umask(0117);
  s->server_ = builder.BuildAndStart();
  ::umask(old_umask);
  if (s->server_ == nullptr) {
    ::unlink(tmp.c_str());
    return absl::UnavailableError(absl::StrFormat(
        "could not start the gRPC server on unix:%s%s (see the gRPC log line above)", tmp,
        tcp.empty() ? "" : absl::StrCat(" and ", tcp)));
  }
  if (!tcp.empty() && s->tcp_port_ == 0) {
    s->server_->Shutdown();
    ::unlink(tmp.c_str());
    return absl::UnavailableError(absl::StrFormat("--listen-tcp: could not bind %s", tcp));
  }
  // 0660: the launcher/router run as the same user or group; nobody else may drive the model.
  if (::chmod(tmp.c_str(), 0660) != 0 || ::rename(tmp.c_str(), s->socket_path_.c_str()) != 0) {
    const int err = errno;
    s->server_->Shutdown();
    ::unlink(tmp.c_str());
    return absl::InternalError(
        absl::StrFormat("could not publish socket %s: %s", s->socket_path_, std::strerror(err)));
  }
  struct stat st {};
  if (::stat(s->socket_path_.c_str(), &st) == 0) {
    s->socket_dev_ = st.st_dev;
    s->socket_ino_ = st.st_ino;
  }
  PHI_LOG(INFO) << "Server started at unix://" << s->socket_path_
                << (tcp.empty()
                        ? ""
                        : absl::StrCat(" and ", tcp.substr(0, tcp.rfind(':')), ":", s->tcp_port_));
  return s;
}

ShardServer::~ShardServer() {
  Shutdown();
  if (health_service_) health_service_->Unsubscribe();  // also when Start() failed half-way
}

void ShardServer::Shutdown() {
  if (shut_down_ || server_ == nullptr) return;
  shut_down_ = true;
  // 1. Our handlers answer every new RPC with UNAVAILABLE while the admitted work drains (gRPC's
  //    own shutdown would instead cancel new calls with an arbitrary code).
  service_->BeginShutdown();
  health_service_->EndAll();
  if (!service_->WaitIdle(absl::ToDoubleSeconds(options_.shutdown_grace))) {
    PHI_LOG(WARNING) << "shutdown grace period over with model work still running";
  }
  // 2. Stop gRPC. The model work is done, so nothing slow is left; a short deadline also keeps
  //    gRPC from waiting out its graceful-GOAWAY ping on idle client connections (5 s when the
  //    client does not poll).
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  service_->StopExecutor();
  server_->Wait();
  // Remove the socket only if it is still ours (a new shard may have replaced it meanwhile).
  struct stat st {};
  if (::stat(socket_path_.c_str(), &st) == 0 && st.st_dev == socket_dev_ &&
      st.st_ino == socket_ino_) {
    ::unlink(socket_path_.c_str());
  }
  PHI_LOG(INFO) << "Server stopped; removed " << socket_path_;
}

// ---- signals -----------------------------------------------------------------------------------

namespace {
// Self-pipe: the handler only write()s the signal number (async-signal-safe); the watcher thread
// does everything else. A handler rather than a blocked mask + sigwait, because libraries start
// threads before main (OpenBLAS's pool) that would not inherit a mask and would take the default
// action (terminate) for a process-directed SIGTERM.
int g_signal_pipe[2] = {-1, -1};

void OnTermSignal(int signo) {
  const int saved_errno = errno;
  const unsigned char c = static_cast<unsigned char>(signo);
  [[maybe_unused]] ssize_t n = ::write(g_signal_pipe[1], &c, 1);
  errno = saved_errno;
}
}  // namespace

struct TermSignalWatcher::State {
  std::mutex mu;
  std::condition_variable cv;
  bool exit_on_signal = true;
  int signo = 0;
};

TermSignalWatcher::TermSignalWatcher() : state_(std::make_shared<State>()) {
  signal(SIGPIPE, SIG_IGN);  // a client vanishing mid-write must not kill the shard
  PHI_CHECK(g_signal_pipe[0] < 0) << "one TermSignalWatcher per process";
  PHI_CHECK(::pipe2(g_signal_pipe, O_CLOEXEC) == 0) << std::strerror(errno);
  struct sigaction sa {};
  sa.sa_handler = OnTermSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  // Detached: the thread reads the pipe for the life of the process and holds the state by
  // shared_ptr, so it outlives this object safely.
  std::thread([state = state_] {
    for (;;) {
      unsigned char c = 0;
      const ssize_t n = ::read(g_signal_pipe[0], &c, 1);
      if (n < 0 && errno == EINTR) continue;
      if (n != 1) return;
      const int sig = c;
      std::lock_guard<std::mutex> lock(state->mu);
      if (state->exit_on_signal) {
        PHI_LOG(INFO) << "Signal " << sig << " received during startup; exiting";
        std::fflush(stdout);
        std::fflush(stderr);
        std::_Exit(0);
      }
      if (state->signo == 0) state->signo = sig;
      state->cv.notify_all();
    }
  }).detach();
}

TermSignalWatcher::~TermSignalWatcher() = default;

void TermSignalWatcher::set_exit_on_signal(bool exit_on_signal) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->exit_on_signal = exit_on_signal;
}

int TermSignalWatcher::Wait() {
  std::unique_lock<std::mutex> lock(state_->mu);
  state_->cv.wait(lock, [this] { return state_->signo != 0; });
  return state_->signo;
}

}  // namespace phishard
