// Helpers for the tensor-parallel tests: every rank is a thread of the test process (or a forked
// child where a test needs a process to die), all traffic on 127.0.0.1.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <functional>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "parallel/rendezvous.h"

namespace phishard::testing {

// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it; we release it at once).
inline int FreeLoopbackPort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return -1;
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

inline RendezvousOptions LoopbackOptions(int rank, int world_size, int port,
                                         absl::Duration timeout = absl::Seconds(20)) {
  RendezvousOptions o;
  o.rank = rank;
  o.world_size = world_size;
  o.master_addr = "127.0.0.1";
  o.master_port = port;
  o.timeout = timeout;
  return o;
}

// Runs fn(rank) for every rank in its own thread and returns the results indexed by rank.
template <typename T>
std::vector<T> RunRanks(int world_size, const std::function<T(int)>& fn) {
  std::vector<T> out(world_size);
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] { out[r] = fn(r); });
  }
  for (auto& t : threads) t.join();
  return out;
}

// Seconds since `start`.
inline double SecondsSince(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

}  // namespace phishard::testing
