// Named metrics_process_test: tests/server/metrics_test.cc already owns the target metrics_test.
// `phishard serve --metrics-addr 127.0.0.1:0` on the demo model: the router's startup and one
// batch run to completion over the real unix socket (server/client.h), then GET /metrics over
// HTTP, checked with the strict exposition-format parser and against what the client saw.
#include <signal.h>

#include <cmath>
#include <regex>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/client.h"
#include "tests/integration/shard_process.h"
#include "tests/server/prom_text_test_util.h"

namespace phishard {
namespace integration {
namespace {

namespace pb = ::generate::v1;
using ::phishard::testing::HttpGet;
using ::phishard::testing::ParsePromText;
using ::phishard::testing::PromParse;

// The port `serve` logged for --metrics-addr (port 0 lets the kernel pick a free one); 0 if none.
int LoggedMetricsPort(const std::string& log) {
  std::smatch m;
  static const std::regex kLine(R"(Prometheus metrics on \S+ \(port (\d+)\))");
  return std::regex_search(log, m, kLine) ? std::stoi(m[1].str()) : 0;
}

PromParse Scrape(int port) {
  std::string status;
  const std::string body = HttpGet(port, "/metrics", &status);
  EXPECT_EQ(status, "HTTP/1.1 200 OK");
  PromParse p = ParsePromText(body);
  EXPECT_EQ(p.error, "") << body;
  return p;
}

TEST(MetricsProcess, CountersFollowARouterSessionAndTheTextParses) {
  TempDir dir;
  DemoShard shard(dir, {"--metrics-addr", "127.0.0.1:0"});
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  const int port = LoggedMetricsPort(shard.process->out());
  ASSERT_GT(port, 0) << shard.process->Logs();

  PromParse p = Scrape(port);
  EXPECT_EQ(p.Value("phishard_health_state", "phishard_health_state", {{"rank", "0"}}), 1);
  EXPECT_EQ(p.Value("phishard_load_progress_ratio", "phishard_load_progress_ratio"), 1);
  EXPECT_EQ(p.Value("phishard_generated_tokens_total", "phishard_generated_tokens_total"), 0);
  // The CPU backend applies adapters: the registry exists, nothing is loaded without flags.
  EXPECT_EQ(p.Value("phishard_adapters_loaded", "phishard_adapters_loaded"), 0);

  absl::StatusOr<std::unique_ptr<RouterSession>> session =
      RouterSession::Connect(UdsTarget(shard.uds), /*timeout_s=*/120);
  ASSERT_TRUE(session.ok()) << session.status();
  ASSERT_TRUE((*session)->ClearCache(std::nullopt).ok());
  absl::StatusOr<std::optional<uint32_t>> w = (*session)->Warmup(RouterWarmupRequest(64, 128, 96));
  ASSERT_TRUE(w.ok()) << w.status();

  // Two requests of 5 and 3 prompt ids (the second truncated from 6 to 3), 4 new tokens at most.
  pb::Batch batch;
  batch.set_id(7);
  *batch.add_requests() = RouterRequest(1, "", {10, 11, 12, 13, 14}, 0, 4);
  *batch.add_requests() = RouterRequest(2, "", {20, 21, 22, 23, 24, 25}, 3, 4);
  batch.set_size(2);
  absl::StatusOr<std::vector<RequestOutcome>> out = RunBatchToCompletion(**session, batch);
  ASSERT_TRUE(out.ok()) << out.status();
  double generated = 0;
  std::map<std::string, double> finished;
  for (const RequestOutcome& o : *out) {
    generated += static_cast<double>(o.ids.size());
    ASSERT_TRUE(o.generated_text.has_value());
    static const char* kReasons[] = {"length", "eos_token", "stop_sequence"};
    finished[kReasons[o.generated_text->finish_reason()]] += 1;
  }
  // An unknown batch: NOT_FOUND, counted as an error of Decode.
  pb::DecodeRequest bad;
  bad.add_batches()->set_id(424242);
  EXPECT_EQ((*session)->shard(0).Decode(bad).status().code(), absl::StatusCode::kNotFound);

  p = Scrape(port);
  EXPECT_EQ(p.Value("phishard_prompt_tokens_total", "phishard_prompt_tokens_total"), 8);
  EXPECT_EQ(p.Value("phishard_generated_tokens_total", "phishard_generated_tokens_total"),
            generated);
  EXPECT_GE(generated, 2);
  for (const auto& [reason, n] : finished) {
    EXPECT_EQ(p.Value("phishard_requests_finished_total", "phishard_requests_finished_total",
                      {{"reason", reason}}),
              n)
        << reason;
  }
  EXPECT_EQ(p.Value("phishard_step_seconds", "phishard_step_seconds_count", {{"kind", "prefill"}}),
            1);
  const double decodes =
      p.Value("phishard_step_seconds", "phishard_step_seconds_count", {{"kind", "decode"}});
  EXPECT_EQ(decodes,
            p.Value("phishard_rpcs_total", "phishard_rpcs_total", {{"method", "Decode"}}) - 1)
      << "every Decode but the failed one is a step";
  EXPECT_GE(decodes, 1);
  EXPECT_GT(p.Value("phishard_step_seconds", "phishard_step_seconds_sum", {{"kind", "prefill"}}),
            0);
  EXPECT_EQ(p.Value("phishard_batch_size", "phishard_batch_size_bucket",
                    {{"kind", "prefill"}, {"le", "2"}}),
            1);
  EXPECT_EQ(p.Value("phishard_batch_size", "phishard_batch_size_bucket",
                    {{"kind", "prefill"}, {"le", "1"}}),
            0);
  EXPECT_EQ(p.Value("phishard_rpcs_total", "phishard_rpcs_total", {{"method", "Prefill"}}), 1);
  EXPECT_EQ(p.Value("phishard_rpcs_total", "phishard_rpcs_total", {{"method", "Warmup"}}), 1);
  EXPECT_EQ(p.Value("phishard_rpc_errors_total", "phishard_rpc_errors_total",
                    {{"method", "Decode"}, {"code", "NOT_FOUND"}}),
            1);
  // After the batch finished every KV block is free again; Warmup sized the pool.
  const double free_blocks =
      p.Value("phishard_kv_blocks", "phishard_kv_blocks", {{"state", "free"}});
  EXPECT_GT(free_blocks, 0);
  EXPECT_EQ(p.Value("phishard_kv_blocks", "phishard_kv_blocks", {{"state", "used"}}), 0);

  std::string status;
  EXPECT_EQ(HttpGet(port, "/", &status), "");
  EXPECT_EQ(status, "HTTP/1.1 404 Not Found");

  // Startup progress in the log.
  const std::string log = shard.process->out();
  EXPECT_TRUE(std::regex_search(log, std::regex(R"(Weights loaded: ([0-9.]+)/\1 GB \(100%\))")))
      << log;
  EXPECT_NE(log.find("Warmup started"), std::string::npos) << log;
  EXPECT_NE(log.find("Warmup finished"), std::string::npos) << log;

  shard.process->Signal(SIGTERM);
  EXPECT_EQ(shard.process->Wait(30), 0) << shard.process->Logs();
}

TEST(MetricsProcess, ABusyMetricsPortIsAStartupErrorNamingTheFlag) {
  TempDir dir;
  DemoShard first(dir, {"--metrics-addr", "127.0.0.1:0"});
  ASSERT_TRUE(first.ready) << first.process->Logs();
  const int port = LoggedMetricsPort(first.process->out());
  ASSERT_GT(port, 0);
  TempDir dir2;
  ShardProcess second(BinaryPath(), integration::ServeArgs(DemoModel(), dir2 / "s"), dir2.path(),
                      {{"PHISHARD_METRICS_ADDR", std::to_string(port)}});  // env twin, port only
  EXPECT_EQ(second.Wait(60), 1) << second.Logs();
  EXPECT_NE(second.err().find("--metrics-addr"), std::string::npos) << second.Logs();
  EXPECT_FALSE(IsSocket(dir2 / "s-0"));
}

}  // namespace
}  // namespace integration
}  // namespace phishard
