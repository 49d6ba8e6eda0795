#include "server/launch.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"

extern char** environ;

namespace phishard {
namespace {

using Clock = std::chrono::steady_clock;

// SIGINT/SIGTERM: the handler only writes the signal number to a pipe the loop polls.
int g_launch_pipe[2] = {-1, -1};

void OnLaunchSignal(int signo) {
  const int saved = errno;
  const unsigned char c = static_cast<unsigned char>(signo);
  [[maybe_unused]] ssize_t n = ::write(g_launch_pipe[1], &c, 1);
  errno = saved;
}

bool IsSocket(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

// A TCP port that is free on `addr` right now (the kernel picks it; released at once, so the
// rendezvous can bind it a moment later). 0 when none could be found.
int FreePort(const std::string& addr) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  if (::getaddrinfo(addr.c_str(), "0", &hints, &res) != 0 || res == nullptr) return 0;
  int port = 0;
  for (addrinfo* a = res; a != nullptr && port == 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    sockaddr_storage bound{};
    socklen_t len = sizeof(bound);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
      port = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6&>(bound).sin6_port)
                                         : ntohs(reinterpret_cast<sockaddr_in&>(bound).sin_port);
    }
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return port;
}

std::string DescribeStatus(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exit status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return absl::StrCat("killed by signal ", WTERMSIG(status), " (", strsignal(WTERMSIG(status)),
                        ")");
  }
  return "stopped";
}

struct Rank {
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;  // waitpid status once exited
  std::string socket;
};

// Starts one rank: fork + exec with everything prepared before fork (the parent may have
// threads, so the child only makes async-signal-safe calls).
pid_t Spawn(const std::vector<std::string>& argv_strings,
            const std::vector<std::string>& env_strings) {
  std::vector<std::string> args = argv_strings, env = env_strings;
  std::vector<char*> argv, envp;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  // Child. Own process group (a terminal's Ctrl-C goes to the launcher, which forwards it), and
  // die with the launcher even if it is SIGKILLed.
  ::setpgid(0, 0);
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(127);  // the launcher died before prctl
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  ::execve(argv[0], argv.data(), envp.data());
  ::_exit(127);
}

}  // namespace

int RunLaunch(const LaunchOptions& o) {
  SetLogRank(kNoLogRank);  // this process is no rank; each shard logs its own
  if (o.num_shard < 1) {
    std::cerr << "phishard launch: --num-shard must be >= 1, got " << o.num_shard << "\n";
    return 2;
  }
  if (o.serve_args.empty()) {
    std::cerr << "phishard launch: MODEL_ID (and any other `serve` flags) must follow\n";
    return 2;
  }
  std::string binary = o.binary;
  if (binary.empty()) {
    std::error_code ec;
    binary = std::filesystem::read_symlink("/proc/self/exe", ec).string();
    if (ec) {
      std::cerr << "phishard launch: cannot find this executable: " << ec.message() << "\n";
      return 1;
    }
  }
  int port = o.master_port;
  if (port == 0) port = FreePort(o.master_addr);
  if (port <= 0 || port > 65535) {
    std::cerr << "phishard launch: no free TCP port on --master-addr " << o.master_addr << "\n";
    return 1;
  }

  // Signals first, so that none is lost once ranks exist.
  if (g_launch_pipe[0] < 0 && ::pipe2(g_launch_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    std::cerr << "phishard launch: pipe: " << std::strerror(errno) << "\n";
    return 1;
  }
  struct sigaction sa {};
  sa.sa_handler = OnLaunchSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);

  std::vector<std::string> base_env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv(*e);
    const std::string key = kv.substr(0, kv.find('='));
    if (key == "RANK" || key == "WORLD_SIZE" || key == "MASTER_ADDR" || key == "MASTER_PORT") {
      continue;
    }
    base_env.push_back(kv);
  }
  const bool sharded = o.num_shard > 1;
  PHI_LOG(INFO) << "launch: starting " << o.num_shard << " shard(s) of " << binary << " on "
                << o.uds_path << "-{0.." << o.num_shard - 1 << "}"
                << (sharded ? absl::StrCat(", rendezvous at ", o.master_addr, ":", port) : "");

  std::vector<Rank> ranks(o.num_shard);
  for (int r = 0; r < o.num_shard; ++r) {
    Rank& k = ranks[r];
    k.rank = r;
    k.socket = absl::StrCat(o.uds_path, "-", r);
    ::unlink(k.socket.c_str());  // a stale socket would look "ready" (spec §1.7)
  }
  for (Rank& k : ranks) {
    std::vector<std::string> argv = {binary, "serve"};
    argv.insert(argv.end(), o.serve_args.begin(), o.serve_args.end());
    argv.insert(argv.end(), {"--uds-path", o.uds_path});
    if (sharded) argv.push_back("--sharded");
    std::vector<std::string> env = base_env;
    env.push_back(absl::StrCat("RANK=", k.rank));
    env.push_back(absl::StrCat("WORLD_SIZE=", o.num_shard));
    env.push_back(absl::StrCat("MASTER_ADDR=", o.master_addr));
    env.push_back(absl::StrCat("MASTER_PORT=", port));
    k.pid = Spawn(argv, env);
    if (k.pid < 0) {
      PHI_LOG(ERROR) << "launch: cannot start shard " << k.rank << ": " << std::strerror(errno);
      break;
    }
    k.running = true;
    PHI_LOG(INFO) << "launch: shard " << k.rank << " started (pid " << k.pid << ")";
  }

  const auto start = Clock::now();
  bool ready = false;
  bool stopping = false;  // we asked the ranks to stop
  bool failed = false;    // something went wrong: exit 1
  Clock::time_point kill_at{};
  auto stop_all = [&](bool failure, const std::string& why) {
    if (failure) failed = true;
    if (stopping) return;
    stopping = true;
    PHI_LOG(INFO) << "launch: " << why << "; stopping the shards";
    for (Rank& k : ranks) {
      if (k.running) ::kill(k.pid, SIGTERM);
    }
    kill_at =
        Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(o.stop_timeout_s * 1e3));
  };
  for (const Rank& k : ranks) {
    if (k.pid < 0) stop_all(true, "a shard could not be started");
  }

  for (;;) {
    pollfd pfd{g_launch_pipe[0], POLLIN, 0};
    ::poll(&pfd, 1, 50);
    unsigned char sig = 0;
    while (::read(g_launch_pipe[0], &sig, 1) == 1) {
      stop_all(false, absl::StrCat("Signal ", static_cast<int>(sig), " received"));
    }
    for (Rank& k : ranks) {
      if (!k.running) continue;
      int status = 0;
      if (::waitpid(k.pid, &status, WNOHANG) != k.pid) continue;
      k.running = false;
      k.status = status;
      if (stopping) {
        PHI_LOG(INFO) << "launch: shard " << k.rank << " stopped: " << DescribeStatus(status);
        if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) failed = true;
      } else {
        PHI_LOG(ERROR) << "launch: shard " << k.rank << " crashed: " << DescribeStatus(status);
        stop_all(true, absl::StrCat("Shard ", k.rank, " exited"));
      }
    }
    const bool any_running =
        std::any_of(ranks.begin(), ranks.end(), [](const Rank& k) { return k.running; });
    if (!any_running) break;
    if (!ready && !stopping &&
        std::all_of(ranks.begin(), ranks.end(), [](const Rank& k) { return IsSocket(k.socket); })) {
      ready = true;
      PHI_LOG(INFO) << "launch: all " << o.num_shard
                    << " shard(s) ready; the router's master socket is " << ranks[0].socket;
    }
    if (!ready && !stopping && o.ready_timeout_s > 0 &&
        Clock::now() - start >
            std::chrono::milliseconds(static_cast<int64_t>(o.ready_timeout_s * 1e3))) {
      PHI_LOG(ERROR) << "launch: the shards were not ready within " << o.ready_timeout_s << " s";
      stop_all(true, "Startup timed out");
    }
    if (stopping && Clock::now() > kill_at) {
      for (Rank& k : ranks) {
        if (!k.running) continue;
        PHI_LOG(ERROR) << "launch: shard " << k.rank << " did not stop within " << o.stop_timeout_s
                       << " s; killing it";
        ::kill(k.pid, SIGKILL);
      }
      failed = true;
      kill_at = Clock::time_point::max();
    }
  }
  // A rank that was killed leaves its socket file behind.
  for (const Rank& k : ranks) {
    if (k.pid > 0 && !(WIFEXITED(k.status) && WEXITSTATUS(k.status) == 0))
      ::unlink(k.socket.c_str());
  }
  PHI_LOG(INFO) << "launch: all shards exited" << (failed ? " (with a failure)" : "");
  std::fflush(stdout);
  return failed ? 1 : 0;
}

}  // namespace phishard
