// Load / soak harness: starts `phishard serve` (or connects to a running shard), drives it with
// the router emulator of router_emulator.h for a time budget, samples the server's RSS from
// /proc and Health latency from a second connection every 250 ms, runs the final KV capacity
// probe, stops the server with SIGTERM, and prints a summary. Exit status 1 on any protocol
// violation, failed Health, RSS growth beyond --rss-growth-mib, or an unclean server exit.
//
//   load_harness --bin build/bin/phishard --model models/tiny-phi-code --duration-s 60
//   load_harness --connect unix:/tmp/lorax-server-0 --pid 1234 --model /models/phi-2
//                --duration-s 3600          (a shard started elsewhere, e.g. on a GPU)
//
// RSS bound: the server's RSS is compared between the first and the last quarter of the load
// phase (max of each). Warmup and the first quarter have already grown every arena the workload
// can need (largest prefill, largest batch), so later growth means something accumulates per
// request: leaked batches, token histories, gRPC buffers.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "model/phi_config.h"
#include "model/tokenizer.h"
#include "server/client.h"
#include "tests/integration/shard_process.h"
#include "tests/load/router_emulator.h"

namespace phishard {
namespace load {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string bin = integration::BinaryPath();
  std::string model = integration::DemoModel();
  std::string device = "cpu";
  int max_kv_blocks = 512;
  std::string connect;  // "" = spawn our own server
  int pid = 0;          // with --connect: the server's pid for RSS (0 = no RSS)
  double rss_growth_mib = 64;
  double health_bound_ms = 1000;
  std::vector<std::string> adapter_roots;  // serve --adapter-root (spawned server only)
  WorkloadOptions workload;
};

// The demo model's adapter and the two golden test adapters (tests/golden/adapters): what
// --adapter-every uses unless --adapter-id says otherwise.
const char* kGoldenAdapterRoot = PHISHARD_MODELS "/../tests/golden/adapters";
std::vector<std::string> DefaultAdapterIds() {
  return {"adapters/prose", "lora-r4-qv-fc2", "lora-r16-rslora-all"};
}

// VmRSS of `pid` in MiB, -1 when unreadable.
double RssMiB(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return -1;
}

struct Sample {
  double t_s;
  double rss_mib;
};

// Samples RSS and Health latency in the background.
class Monitor {
 public:
  Monitor(int pid, std::string target) : pid_(pid), target_(std::move(target)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~Monitor() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  std::vector<Sample> samples() {
    std::lock_guard<std::mutex> lock(mu_);
    return samples_;
  }
  LatencyStats health() {
    std::lock_guard<std::mutex> lock(mu_);
    return health_;
  }
  int health_failures() const { return failures_; }
  std::string first_failure() {
    std::lock_guard<std::mutex> lock(mu_);
    return first_failure_;
  }

 private:
  void Loop() {
    auto client = ShardClient::Connect(target_, 10);
    const auto start = Clock::now();
    while (!stop_) {
      const auto t0 = Clock::now();
      const absl::Status h = client->Health();
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      const double t = std::chrono::duration<double>(Clock::now() - start).count();
      {
        std::lock_guard<std::mutex> lock(mu_);
        health_.Add(ms);
        if (!h.ok()) {
          ++failures_;
          if (first_failure_.empty()) first_failure_ = h.ToString();
        }
        if (pid_ > 0) samples_.push_back({t, RssMiB(pid_)});
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
  }

  int pid_;
  std::string target_;
  std::atomic<bool> stop_{false};
  std::atomic<int> failures_{0};
  std::mutex mu_;
  std::vector<Sample> samples_;
  LatencyStats health_;
  std::string first_failure_;
  std::thread thread_;
};

double MaxRss(const std::vector<Sample>& s, double from_s, double to_s) {
  double m = -1;
  for (const Sample& x : s) {
    if (x.t_s >= from_s && x.t_s <= to_s) m = std::max(m, x.rss_mib);
  }
  return m;
}

int Main(int argc, char** argv) {
  Options o;
  CLI::App app("phishard load/soak harness (router emulator + invariant checks)");
  app.add_option("--bin", o.bin, "phishard binary to start");
  app.add_option("--model", o.model, "model directory (served, and its tokenizer used here)");
  app.add_option("--device", o.device, "serve --device");
  app.add_option("--max-kv-blocks", o.max_kv_blocks, "serve --max-kv-blocks (0 = from memory)");
  app.add_option("--connect", o.connect, "gRPC target of a running shard instead of starting one");
  app.add_option("--pid", o.pid, "with --connect: server pid for RSS sampling");
  app.add_option("--duration-s", o.workload.duration_s, "seconds of new requests");
  app.add_option("--requests", o.workload.max_requests, "stop admitting after N requests");
  app.add_option("--seed", o.workload.seed, "workload seed");
  app.add_option("--max-batch-requests", o.workload.max_batch_requests, "per new batch");
  app.add_option("--max-running", o.workload.max_running, "router --max-batch-size");
  app.add_option("--max-prompt-tokens", o.workload.max_prompt_tokens, "longest prompt");
  app.add_option("--max-new-tokens", o.workload.max_new_tokens, "largest max_new_tokens");
  app.add_option("--max-input-length", o.workload.max_input_length, "router --max-input-tokens");
  app.add_option("--max-prefill-tokens", o.workload.max_prefill_tokens,
                 "router --max-batch-prefill-tokens");
  app.add_option("--cancel-per-step", o.workload.cancel_per_step, "client disconnect rate");
  app.add_option("--rss-growth-mib", o.rss_growth_mib, "fail above this RSS growth");
  app.add_option("--health-bound-ms", o.health_bound_ms, "fail when a Health call takes longer");
  app.add_option("--adapter-every", o.workload.adapters.every_requests,
                 "an adapter load or retirement every N requests (0 = no adapters)");
  app.add_option("--max-loaded-adapters", o.workload.adapters.max_loaded,
                 "adapters loaded at once");
  app.add_option("--adapter-id", o.workload.adapters.ids,
                 "LOCAL adapter ids to cycle (default: the demo model's and the golden ones)");
  app.add_option("--adapter-root", o.adapter_roots,
                 "serve --adapter-root (default: the model directory and tests/golden/adapters)");
  CLI11_PARSE(app, argc, argv);

  SetLogLevel(LogLevel::kWarning);
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromDir(o.model);
  absl::StatusOr<PhiConfig> config = LoadPhiConfig(o.model);
  if (!tokenizer.ok() || !config.ok()) {
    std::fprintf(stderr, "load_harness: cannot read %s: %s\n", o.model.c_str(),
                 (!tokenizer.ok() ? tokenizer.status() : config.status()).ToString().c_str());
    return 2;
  }
  if (o.workload.adapters.every_requests > 0 && o.workload.adapters.ids.empty()) {
    o.workload.adapters.ids = DefaultAdapterIds();
    if (o.adapter_roots.empty()) o.adapter_roots = {o.model, kGoldenAdapterRoot};
  }
  std::vector<int32_t> eos(config->eos_token_ids.begin(), config->eos_token_ids.end());
  if (eos.empty() && (*tokenizer)->eos_token_id()) eos.push_back(*(*tokenizer)->eos_token_id());

  std::unique_ptr<integration::TempDir> dir;
  std::unique_ptr<integration::ShardProcess> server;
  std::string target = o.connect;
  std::string socket;
  int pid = o.pid;
  if (target.empty()) {
    dir = std::make_unique<integration::TempDir>();
    socket = *dir / "s-0";
    std::vector<std::string> args = {
        "serve",    o.model,  "--uds-path",      *dir / "s",
        "--device", o.device, "--max-kv-blocks", std::to_string(o.max_kv_blocks)};
    for (const std::string& r : o.adapter_roots) {
      args.push_back("--adapter-root");
      args.push_back(r);
    }
    server = std::make_unique<integration::ShardProcess>(o.bin, args, dir->path());
    if (!server->WaitForSocket(socket, 120)) {
      std::fprintf(stderr, "load_harness: server did not start\n%s\n", server->Logs().c_str());
      return 2;
    }
    target = "unix:" + socket;
    pid = server->pid();
  }

  absl::StatusOr<std::unique_ptr<RouterSession>> session = RouterSession::Connect(target, 600);
  if (!session.ok()) {
    std::fprintf(stderr, "load_harness: %s\n", session.status().ToString().c_str());
    return 2;
  }
  RouterEmulator router(session->get(), tokenizer->get(), eos, config->vocab_size,
                        config->max_position_embeddings, o.workload);
  if (absl::Status s = router.Startup(); !s.ok()) {
    std::fprintf(stderr, "load_harness: startup failed: %s\n", s.ToString().c_str());
    return 1;
  }
  Monitor monitor(pid, target);
  const auto t0 = Clock::now();
  router.Run();
  const double load_s = std::chrono::duration<double>(Clock::now() - t0).count();
  router.CapacityProbe();
  monitor.Stop();

  std::vector<std::string> failures;
  const RunStats& st = router.stats();
  for (const std::string& v : router.violations()) failures.push_back("violation: " + v);
  if (!st.capacity_probe_ok) failures.push_back("KV capacity probe failed");
  if (monitor.health_failures() > 0) {
    failures.push_back(absl::StrFormat("%d Health calls failed (first: %s)",
                                       monitor.health_failures(), monitor.first_failure()));
  }
  const LatencyStats health = monitor.health();
  if (health.Max() > o.health_bound_ms) {
    failures.push_back(
        absl::StrFormat("Health took %.0f ms (bound %.0f ms)", health.Max(), o.health_bound_ms));
  }

  // RSS: first vs last quarter of the load phase.
  const std::vector<Sample> samples = monitor.samples();
  const double rss_early = MaxRss(samples, 0, load_s * 0.25);
  const double rss_late = MaxRss(samples, load_s * 0.75, load_s);
  const double rss_final = samples.empty() ? -1 : samples.back().rss_mib;
  if (pid > 0 && rss_early > 0 && rss_late - rss_early > o.rss_growth_mib) {
    failures.push_back(absl::StrFormat("server RSS grew %.1f MiB (%.1f -> %.1f), bound %.0f MiB",
                                       rss_late - rss_early, rss_early, rss_late,
                                       o.rss_growth_mib));
  }

  int exit_code = 0;
  bool socket_removed = true;
  if (server) {
    server->Signal(SIGTERM);
    exit_code = server->Wait(60);
    socket_removed = !std::filesystem::exists(socket);
    if (exit_code != 0) failures.push_back(absl::StrFormat("server exit status %d", exit_code));
    if (!socket_removed) failures.push_back("socket left behind after SIGTERM");
  }

  const double secs = std::max(load_s, 1e-9);
  std::printf("\n== phishard load harness: %.1f s of load, seed %llu ==\n", load_s,
              static_cast<unsigned long long>(o.workload.seed));
  std::printf("%-34s %12s\n", "metric", "value");
  auto row = [](const char* k, const std::string& v) { std::printf("%-34s %12s\n", k, v.c_str()); };
  auto num = [](double v) { return absl::StrFormat("%.0f", v); };
  auto ms = [](double v) { return absl::StrFormat("%.1f", v); };
  row("requests", num(st.requests));
  row("  finished (length/eos/stop)",
      absl::StrFormat("%d/%d/%d", st.finish_length, st.finish_eos, st.finish_stop));
  row("  cancelled (client left)", num(st.cancelled));
  row("  sampled", num(st.sampled));
  row("tokens generated", num(st.tokens));
  row("tokens/s", ms(st.tokens / secs));
  row("Prefill / Decode calls", absl::StrFormat("%d/%d", st.prefills, st.decodes));
  row("Decode concatenations", num(st.concatenations));
  row("FilterBatch / ClearCache(id)", absl::StrFormat("%d/%d", st.filters, st.clears));
  row("ClearCache(all) / health probes", absl::StrFormat("%d/%d", st.clear_all, st.health_probes));
  row("text-only batches", num(st.text_only_batches));
  row("Prefill ms p50/p99/max", absl::StrFormat("%.1f/%.1f/%.1f", st.prefill_ms.Percentile(50),
                                                st.prefill_ms.Percentile(99), st.prefill_ms.Max()));
  row("Decode ms p50/p99/max", absl::StrFormat("%.1f/%.1f/%.1f", st.decode_ms.Percentile(50),
                                               st.decode_ms.Percentile(99), st.decode_ms.Max()));
  row("Health ms p50/max", absl::StrFormat("%.1f/%.1f", health.Percentile(50), health.Max()));
  row("largest response (bytes)", num(st.max_response_bytes));
  row("KV blocks total (Warmup)", num(st.kv_blocks_total));
  row("KV blocks peak in use", num(st.kv_blocks_peak));
  row("KV capacity probe", st.capacity_probe_ok ? "ok" : "FAILED");
  row("server RSS MiB early/late/final",
      absl::StrFormat("%.1f/%.1f/%.1f", rss_early, rss_late, rss_final));
  const AdapterStats& ad = router.adapter_stats();
  if (o.workload.adapters.every_requests > 0) {
    row("adapter loads (merged) / offloads",
        absl::StrFormat("%d (%d) / %d", ad.loads, ad.merged_loads, ad.offloads));
    row("requests on an adapter", num(ad.adapter_requests));
  }
  row("protocol violations", num(router.violations().size()));
  row("server exit / socket removed",
      server ? absl::StrFormat("%d/%s", exit_code, socket_removed ? "yes" : "NO") : "n/a");
  if (!samples.empty()) {
    std::printf("RSS over time (s: MiB):");
    const size_t step = std::max<size_t>(1, samples.size() / 10);
    for (size_t i = 0; i < samples.size(); i += step) {
      std::printf(" %.0f:%.1f", samples[i].t_s, samples[i].rss_mib);
    }
    std::printf("\n");
  }
  for (size_t i = 0; i < failures.size() && i < 30; ++i) {
    std::printf("FAIL %s\n", failures[i].c_str());
  }
  if (failures.size() > 30) std::printf("FAIL ... and %zu more\n", failures.size() - 30);
  if (!failures.empty() && server)
    std::printf("--- server log tail ---\n%s\n", server->err().c_str());
  if (failures.empty()) {
    std::printf("PASS\n");
  } else {
    std::printf("FAILED (%zu problems)\n", failures.size());
  }
  return failures.empty() ? 0 : 1;
}

}  // namespace
}  // namespace load
}  // namespace phishard

int main(int argc, char** argv) { return phishard::load::Main(argc, argv); }
