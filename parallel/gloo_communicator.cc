#include "parallel/gloo_communicator.h"

#include <dirent.h>
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/context.h>
#include <gloo/math.h>
#include <gloo/transport/address.h>
#include <gloo/transport/context.h>
#include <gloo/transport/tcp/address.h>
#include <gloo/transport/tcp/device.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "parallel/tcp_socket.h"

namespace phishard {
namespace {

std::chrono::milliseconds ToMillis(absl::Duration d) {
  return std::chrono::milliseconds(std::max<int64_t>(1, absl::ToInt64Milliseconds(d)));
}

// A gloo::Context whose full mesh is wired through our ControlChannel instead of a gloo Store:
// each rank makes one TCP pair per peer, all-gathers the pair addresses over the control channel
// and connects. (Debian's Gloo has no TCP store; a Redis or file store would be a new dependency.)
class MeshContext : public gloo::Context {
 public:
  using gloo::Context::Context;

  // Throws gloo exceptions on transport errors; returns a status for control-channel errors.
  absl::Status ConnectMesh(ControlChannel& control, std::shared_ptr<gloo::transport::Device> device,
                           absl::Duration timeout) {
    auto transport = device->createContext(rank, size);
    transport->setTimeout(getTimeout());
    // Our blob: the address of the pair meant for each rank, in rank order ("" for ourselves).
    std::string mine;
    for (int peer = 0; peer < size; ++peer) {
      if (peer == rank) {
        WireAppendString(&mine, "");
        continue;
      }
      auto& pair = transport->createPair(peer);
      pair->setLocalRank(control.local_rank());
      std::vector<char> address = pair->address().bytes();
      WireAppendString(&mine, std::string_view(address.data(), address.size()));
    }
    auto all = control.AllGather(mine, timeout);
    if (!all.ok()) return all.status();
    for (int peer = 0; peer < size; ++peer) {
      if (peer == rank) continue;
      WireReader reader((*all)[peer]);
      std::string address;
      for (int i = 0; i <= rank; ++i) {
        if (!reader.ReadString(&address)) {
          return absl::InternalError(absl::StrCat("malformed Gloo address list from rank ", peer));
        }
      }
      transport->getPair(peer)->connect(std::vector<char>(address.begin(), address.end()));
    }
    device_ = std::move(device);
    transportContext_ = std::move(transport);
    return absl::OkStatus();
  }
};

bool SameSocketAddress(const sockaddr_storage& a, const sockaddr_storage& b) {
  if (a.ss_family != b.ss_family) return false;
  if (a.ss_family == AF_INET) {
    const auto& x = reinterpret_cast<const sockaddr_in&>(a);
    const auto& y = reinterpret_cast<const sockaddr_in&>(b);
    return x.sin_port == y.sin_port && x.sin_addr.s_addr == y.sin_addr.s_addr;
  }
  if (a.ss_family == AF_INET6) {
    const auto& x = reinterpret_cast<const sockaddr_in6&>(a);
    const auto& y = reinterpret_cast<const sockaddr_in6&>(b);
    return x.sin6_port == y.sin6_port &&
           std::memcmp(&x.sin6_addr, &y.sin6_addr, sizeof(x.sin6_addr)) == 0;
  }
  return false;
}

// Shuts down (without closing) the TCP socket of every pair of `context`. Gloo's device thread then
// reads EOF on each and fails every operation pending on that pair, ours included, and each peer
// reads EOF too. Why not Context::closeConnections(): in Gloo 0.5 (Debian, 2022-05) it closes the
// sockets without failing the pending operations, so a collective of this rank would sleep until
// its timeout; the pair call that does fail them (tcp::Pair::signalExceptionExternal) is protected
// and its header does not compile from the Debian package (it needs gloo/common/memory.h, which
// is not shipped). A connected pair's address() is its socket's local address, so we find the
// sockets by that among this process's descriptors.
void ShutdownPairSockets(gloo::Context& context) {
  std::vector<sockaddr_storage> locals;
  for (int peer = 0; peer < context.size; ++peer) {
    if (peer == context.rank) continue;
    auto& pair = context.getPair(peer);
    if (!pair) continue;
    const auto* address = dynamic_cast<const gloo::transport::tcp::Address*>(&pair->address());
    if (address != nullptr) locals.push_back(address->getSockaddr());
  }
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return;
  while (dirent* entry = readdir(dir)) {
    int fd = -1;
    if (!absl::SimpleAtoi(entry->d_name, &fd) || fd == dirfd(dir)) continue;
    sockaddr_storage local{};
    socklen_t len = sizeof(local);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0) continue;
    for (const sockaddr_storage& want : locals) {
      if (SameSocketAddress(local, want)) {
        ::shutdown(fd, SHUT_RDWR);
        break;
      }
    }
  }
  closedir(dir);
}

}  // namespace

struct GlooCommunicator::Impl {
  int rank = 0;
  int world_size = 1;
  std::chrono::milliseconds op_timeout{0};
  std::shared_ptr<MeshContext> context;

  absl::Mutex op_mu;  // one collective at a time
  uint32_t next_tag ABSL_GUARDED_BY(op_mu) = 0;
  std::atomic<bool> aborted{false};
  absl::Mutex reason_mu;
  std::string abort_reason ABSL_GUARDED_BY(reason_mu);

  std::string AbortReason() {
    absl::MutexLock lock(&reason_mu);
    return abort_reason;
  }

  void Abort(const std::string& reason) {
    {
      absl::MutexLock lock(&reason_mu);
      if (aborted.load()) return;
      abort_reason = reason.empty() ? "communicator aborted" : reason;
      aborted.store(true);
    }
    // Wakes our own pending operation and, through the closed connections, the peers' pending
    // operations with us. Safe while another thread is inside a collective.
    if (world_size == 1) return;  // no connections (and no transport context)
    ShutdownPairSockets(*context);
  }

  // Runs one collective; `fn` receives the tag that every rank uses for this collective.
  absl::Status Run(const std::string& what, const std::function<void(uint32_t)>& fn) {
    if (aborted.load()) {
      return absl::AbortedError(
          absl::StrCat("rank ", rank, ": ", what, " on an aborted communicator: ", AbortReason()));
    }
    absl::MutexLock lock(&op_mu);
    uint32_t tag = next_tag++;
    std::string error;
    try {
      fn(tag);
      return absl::OkStatus();
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (aborted.load()) {
      return absl::AbortedError(
          absl::StrCat("rank ", rank, ": ", what, " interrupted by abort: ", AbortReason()));
    }
    const std::string lower = absl::AsciiStrToLower(error);
    absl::StatusCode code =
        absl::StrContains(lower, "timed out") || absl::StrContains(lower, "timeout")
            ? absl::StatusCode::kDeadlineExceeded
            : absl::StatusCode::kUnavailable;
    std::string message = absl::StrCat("rank ", rank, ": Gloo ", what, " failed: ", error);
    // The group is out of step now; tear it down so that the peers fail fast as well.
    Abort(message);
    return absl::Status(code, message);
  }
};

GlooCommunicator::GlooCommunicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

GlooCommunicator::~GlooCommunicator() = default;

absl::StatusOr<std::unique_ptr<GlooCommunicator>> GlooCommunicator::Create(
    ControlChannel& control, absl::Duration setup_timeout, absl::Duration op_timeout) {
  auto impl = std::make_unique<Impl>();
  impl->rank = control.rank();
  impl->world_size = control.world_size();
  impl->op_timeout = ToMillis(op_timeout);
  impl->context = std::make_shared<MeshContext>(impl->rank, impl->world_size);
  if (impl->world_size > 1) {
    // Gloo writes with writev(2), which raises SIGPIPE on a connection that a peer (or our own
    // Abort) has shut down, and SIGPIPE's default action kills the process. Ignored, the write
    // fails with EPIPE and Gloo turns that into an error. A handler someone installed is kept.
    struct sigaction current {};
    if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
      signal(SIGPIPE, SIG_IGN);
    }
    try {
      gloo::transport::tcp::attr attr;
      attr.hostname = control.local_host();
      auto device = gloo::transport::tcp::CreateDevice(attr);
      // A pair waits up to 5x its timeout for its connection (Gloo 0.5), so that a peer dying
      // between the address exchange and the connect costs at most `setup_timeout`.
      impl->context->setTimeout(ToMillis(std::max(setup_timeout / 5, absl::Seconds(1))));
      absl::Status s = impl->context->ConnectMesh(control, std::move(device), setup_timeout);
      if (!s.ok()) return s;
      impl->context->setTimeout(impl->op_timeout);
    } catch (const std::exception& e) {
      return absl::UnavailableError(absl::StrCat("rank ", impl->rank,
                                                 ": cannot connect the Gloo mesh on ",
                                                 control.local_host(), ": ", e.what()));
    }
  }
  PHI_LOG(DEBUG) << "rank " << impl->rank << ": Gloo communicator ready, world "
                 << impl->world_size;
  return std::unique_ptr<GlooCommunicator>(new GlooCommunicator(std::move(impl)));
}

int GlooCommunicator::rank() const { return impl_->rank; }
int GlooCommunicator::world_size() const { return impl_->world_size; }

absl::Status GlooCommunicator::AllReduceSum(float* data, size_t count) {
  if (count == 0 || impl_->world_size == 1) return impl_->Run("all-reduce", [](uint32_t) {});
  return impl_->Run(absl::StrCat("all-reduce of ", count, " floats"), [&](uint32_t tag) {
    gloo::AllreduceOptions opts(impl_->context);
    opts.setOutput(data, count);
    opts.setReduceFunction(
        static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
    opts.setTag(tag);
    opts.setTimeout(impl_->op_timeout);
    gloo::allreduce(opts);
  });
}

absl::Status GlooCommunicator::AllGather(const float* send, float* recv, size_t count) {
  const int world = impl_->world_size;
  float* own_slot = recv + static_cast<size_t>(impl_->rank) * count;
  const bool in_place = send == own_slot;
  if (!in_place && send < recv + world * count && recv < send + count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", impl_->rank, ": AllGather send buffer overlaps recv other than in place"));
  }
  if (count == 0 || world == 1) {
    return impl_->Run("all-gather", [&](uint32_t) {
      if (!in_place && count > 0) std::copy(send, send + count, own_slot);
    });
  }
  return impl_->Run(absl::StrCat("all-gather of ", count, " floats"), [&](uint32_t tag) {
    gloo::AllgatherOptions opts(impl_->context);
    // Gloo's allgather works in place when no input is set: it reads rank r's part of the output.
    if (!in_place) std::copy(send, send + count, own_slot);
    opts.setOutput(recv, world * count);
    opts.setTag(tag);
    opts.setTimeout(impl_->op_timeout);
    gloo::allgather(opts);
  });
}

absl::Status GlooCommunicator::Broadcast(void* data, size_t bytes, int root) {
  if (root < 0 || root >= impl_->world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", impl_->rank, ": broadcast root ", root,
                                                   " not in [0, ", impl_->world_size, ")"));
  }
  if (bytes == 0 || impl_->world_size == 1) return impl_->Run("broadcast", [](uint32_t) {});
  return impl_->Run(absl::StrCat("broadcast of ", bytes, " bytes from rank ", root),
                    [&](uint32_t tag) {
                      gloo::BroadcastOptions opts(impl_->context);
                      opts.setOutput(static_cast<uint8_t*>(data), bytes);
                      opts.setRoot(root);
                      opts.setTag(tag);
                      opts.setTimeout(impl_->op_timeout);
                      gloo::broadcast(opts);
                    });
}

absl::Status GlooCommunicator::Barrier() {
  if (impl_->world_size == 1) return impl_->Run("barrier", [](uint32_t) {});
  return impl_->Run("barrier", [&](uint32_t tag) {
    gloo::BarrierOptions opts(impl_->context);
    opts.setTag(tag);
    opts.setTimeout(impl_->op_timeout);
    gloo::barrier(opts);
  });
}

void GlooCommunicator::Abort(const std::string& reason) { impl_->Abort(reason); }

}  // namespace phishard
