// Test helper: runs the real `phishard` binary as a child process (fork/exec, its own stdout and
// stderr files), waits for its socket, signals it, and reaps it. The destructor SIGKILLs a child
// that is still running, so a failing test never leaves a shard behind.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

extern char** environ;

namespace phishard {
namespace integration {

inline std::string BinaryPath(const std::string& name = "phishard") {
  return std::string(PHISHARD_BIN) + "/" + name;
}
inline std::string DemoModel() { return std::string(PHISHARD_MODELS) + "/tiny-phi-code"; }

// The device the suite serves on: PHISHARD_TEST_DEVICE = "cpu" (default: float32, the golden
// comparisons are float32-exact) or "cuda" (bf16 storage: the comparisons use the bf16 bounds of
// tests/integration/golden_check.h). Anything else fails the test that asks.
inline std::string TestDevice() {
  const char* d = std::getenv("PHISHARD_TEST_DEVICE");
  const std::string device = d == nullptr || *d == '\0' ? "cpu" : d;
  EXPECT_TRUE(device == "cpu" || device == "cuda")
      << "PHISHARD_TEST_DEVICE='" << device << "' is not cpu or cuda";
  return device;
}
inline bool TestOnCuda() { return TestDevice() == "cuda"; }
// `serve` flags for the device under test: CUDA runs bf16, the dtype production uses (the demo
// model's config names no torch_dtype, which would pick float16).
inline std::vector<std::string> DeviceArgs() {
  if (TestOnCuda()) return {"--device", "cuda", "--dtype", "bfloat16"};
  return {"--device", "cpu"};
}
// {"serve", model, "--uds-path", uds, <DeviceArgs()>, extra...}
inline std::vector<std::string> ServeArgs(const std::string& model, const std::string& uds,
                                          const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args = {"serve", model, "--uds-path", uds};
  for (const std::string& a : DeviceArgs()) args.push_back(a);
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// A fresh directory under /tmp (short: unix socket paths are limited to 107 bytes).
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/phsXXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline bool IsSocket(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

class ShardProcess {
 public:
  // Starts `binary args...` with the current environment plus `env` (value "" unsets).
  ShardProcess(const std::string& binary, const std::vector<std::string>& args,
               const std::string& log_dir, const std::map<std::string, std::string>& env = {}) {
    stdout_path_ = log_dir + "/stdout." + std::to_string(counter()++);
    stderr_path_ = stdout_path_ + ".err";
    // Everything the child needs is built before fork(): the parent may have other threads (gRPC)
    // and only async-signal-safe calls are allowed between fork() and exec().
    std::map<std::string, std::string> merged;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string kv(*e);
      const size_t eq = kv.find('=');
      if (eq != std::string::npos) merged[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    for (const auto& [k, v] : env) {
      if (v.empty()) {
        merged.erase(k);
      } else {
        merged[k] = v;
      }
    }
    std::vector<std::string> env_strings;
    for (const auto& [k, v] : merged) env_strings.push_back(k + "=" + v);
    std::vector<char*> envp;
    for (std::string& kv : env_strings) envp.push_back(kv.data());
    envp.push_back(nullptr);
    std::vector<std::string> argv_strings = {binary};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& a : argv_strings) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int out = ::open(stdout_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const int err = ::open(stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(out, 1);  // dup2 clears O_CLOEXEC on the new descriptors
      ::dup2(err, 2);
      ::execve(argv[0], argv.data(), envp.data());
      ::_exit(127);
    }
    ::close(out);
    ::close(err);
  }
  ~ShardProcess() {
    if (running()) {
      ::kill(pid_, SIGKILL);
      Wait(10);
    }
  }
  ShardProcess(const ShardProcess&) = delete;
  ShardProcess& operator=(const ShardProcess&) = delete;

  pid_t pid() const { return pid_; }
  bool running() {
    if (exited_) return false;
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) Record(status);
    return !exited_;
  }
  // Polls for `socket` every millisecond; false when the process exits first or on timeout.
  bool WaitForSocket(const std::string& socket, double timeout_s = 60) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    while (std::chrono::steady_clock::now() < deadline) {
      if (IsSocket(socket)) return true;
      if (!running()) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
  }
  void Signal(int sig) { ::kill(pid_, sig); }
  // Waits for the exit; returns the exit status (128 + signal for a signal death), -1 on timeout.
  int Wait(double timeout_s = 60) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    while (running() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return exited_ ? exit_code_ : -1;
  }
  std::string out() const { return ReadFile(stdout_path_); }
  // Polls stdout until `re` matches (its first group, or the whole match, is returned); "" when
  // the process exits first or on timeout. A line logged right after the socket appears may not
  // be in the file yet when WaitForSocket returns.
  std::string WaitForStdout(const std::regex& re, double timeout_s = 10) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    while (true) {
      const std::string text = out();
      std::smatch m;
      if (std::regex_search(text, m, re)) return m.size() > 1 ? m[1].str() : m[0].str();
      if (!running() || std::chrono::steady_clock::now() >= deadline) return "";
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  std::string err() const { return ReadFile(stderr_path_); }
  std::string Logs() const { return "--- stdout ---\n" + out() + "--- stderr ---\n" + err(); }

 private:
  static int& counter() {
    static int n = 0;
    return n;
  }
  void Record(int status) {
    exited_ = true;
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
  std::string stdout_path_, stderr_path_;
};

// A child's environment that does not depend on the caller's: every launcher / shard variable the
// tests' processes read is unset (an empty value unsets), then `extra` applied on top.
inline std::map<std::string, std::string> CleanEnv(
    const std::map<std::string, std::string>& extra = {}) {
  std::map<std::string, std::string> env;
  for (const char* k :
       {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PREFIX_CACHING", "CHUNKED_PREFILL",
        "CUDA_MEMORY_FRACTION", "PHISHARD_MODEL", "PHISHARD_LISTEN_TCP", "PHISHARD_UDS_PATH",
        "PHISHARD_METRICS_ADDR", "PHISHARD_SEQUENCER_TIMEOUT_S", "PHISHARD_TEST_STALL_MS",
        "ADAPTER_MEMORY_FRACTION", "PHISHARD_ADAPTER_ROOT", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
        "PHISHARD_UNROUTED_KV_BLOCKS"}) {
    env[k] = "";
  }
  for (const auto& [k, v] : extra) env[k] = v;
  return env;
}

// `phishard serve` of the demo model on `{dir}/s-0` on TestDevice() (CPU float32 unless
// PHISHARD_TEST_DEVICE=cuda, also on a machine with a GPU), started; `ready` once the socket is up.
struct DemoShard {
  explicit DemoShard(const TempDir& dir, std::vector<std::string> extra = {},
                     const std::map<std::string, std::string>& env = {})
      : uds(dir / "s"), socket(uds + "-0") {
    process = std::make_unique<ShardProcess>(BinaryPath(), ServeArgs(DemoModel(), uds, extra),
                                             dir.path(), env);
    ready = process->WaitForSocket(socket);
  }
  std::string uds;
  std::string socket;
  std::unique_ptr<ShardProcess> process;
  bool ready = false;
};

}  // namespace integration
}  // namespace phishard
