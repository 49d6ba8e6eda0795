// Helpers for the tensor-parallel tests: every rank is a thread of the test process (or a forked
// child where a test needs a process to die), all traffic on 127.0.0.1.
#pragma once

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
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

// How a forked rank ended (ForkRanks).
struct RankExit {
  int code = -1;         // exit code; -1 when killed by a signal (or by ForkRanks at the limit)
  double seconds = 0.0;  // from the fork to the exit
};

// Forks one child process per rank that runs body(rank) and _exits with its result (stdout and
// stderr flushed), waits for all of them, and SIGKILLs any still running `limit` after the fork.
// For tests where a rank owns a GPU or must be able to die (threads cannot do either).
inline std::vector<RankExit> ForkRanks(int world_size, const std::function<int(int)>& body,
                                       absl::Duration limit) {
  std::vector<pid_t> kids;
  const absl::Time start = absl::Now();
  for (int r = 0; r < world_size; ++r) {
    std::fflush(stdout);
    std::fflush(stderr);
    const pid_t pid = ::fork();
    if (pid == 0) {
      const int code = body(r);
      std::fflush(stdout);
      std::fflush(stderr);
      ::_exit(code);
    }
    kids.push_back(pid);
  }
  std::vector<RankExit> exits(world_size);
  std::vector<bool> done(world_size, false);
  for (int left = world_size; left > 0;) {
    for (int r = 0; r < world_size; ++r) {
      if (done[r]) continue;
      int status = 0;
      if (::waitpid(kids[r], &status, WNOHANG) == kids[r]) {
        exits[r].code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      } else if (absl::Now() - start > limit) {
        ::kill(kids[r], SIGKILL);
        ::waitpid(kids[r], &status, 0);
      } else {
        continue;
      }
      exits[r].seconds = absl::ToDoubleSeconds(absl::Now() - start);
      done[r] = true;
      --left;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return exits;
}

// Exit codes of ForkRanks' result, by rank.
inline std::vector<int> ExitCodes(const std::vector<RankExit>& exits) {
  std::vector<int> codes;
  for (const RankExit& e : exits) codes.push_back(e.code);
  return codes;
}

// Seconds since `start`.
inline double SecondsSince(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

}  // namespace phishard::testing
