// The `phishard serve` process as the LoRAX launcher sees it: socket readiness and permissions,
// signals, the launcher's command lines, refusals before binding, download-weights exit codes,
// TCP, big requests, Health/Info during a long prefill, and the local tool subcommands.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <future>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "model/model_factory.h"
#include "nlohmann/json.hpp"
#include "server/client.h"
#include "tests/integration/golden_check.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;
namespace fs = std::filesystem;
using integration::BinaryPath;
using integration::DemoModel;
using integration::DemoShard;
using integration::IsSocket;
using integration::ShardProcess;
using integration::TempDir;
using Clock = std::chrono::steady_clock;

const std::map<std::string, std::string> kCleanEnv = integration::CleanEnv();

// Small warmup (one forward) so the KV pool exists; the values only size the warmup batch.
void Warm(ShardClient& c) {
  absl::StatusOr<pb::WarmupResponse> w = c.Warmup(RouterWarmupRequest(64, 100, 65));
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE(w->has_max_supported_total_tokens());
}

// `n` requests of 1000 prompt ids each (0.2-2 s of CPU prefill apiece on the demo model, with
// attention being the O(P^2) part), with the router's blocks: 1000 + 2 - 1 tokens are 63 blocks,
// request i gets ids 1 + 63 i .. 63 (i + 1) (more than the tail kept for requests without blocks
// holds).
pb::PrefillRequest LongPrefill(uint64_t batch_id, int n) {
  pb::PrefillRequest p;
  p.mutable_batch()->set_id(batch_id);
  for (int i = 0; i < n; ++i) {
    std::vector<uint32_t> ids;
    for (int k = 0; k < 1000; ++k) ids.push_back(static_cast<uint32_t>(100 + (k * 7 + i) % 3000));
    pb::Request* r = p.mutable_batch()->add_requests();
    *r = RouterRequest(i, "x", ids, 1000, 2);
    for (uint32_t b = 0; b < 63; ++b) r->add_blocks(1 + 63 * i + b);
  }
  return p;
}

TEST(ServeProcess, SocketAppearsOnlyOnceServingWithMode0660) {
  TempDir dir;
  const std::string uds = dir / "s";
  ShardProcess p(BinaryPath(), integration::ServeArgs(DemoModel(), uds), dir.path(), kCleanEnv);
  ASSERT_TRUE(p.WaitForSocket(uds + "-0")) << p.Logs();
  // The router dials once, without retries, the moment the file exists (spec §1.6): the very
  // first call must succeed.
  auto channel = grpc::CreateChannel("unix:" + uds + "-0", grpc::InsecureChannelCredentials());
  auto stub = pb::LoraxService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_wait_for_ready(false);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  pb::InfoResponse info;
  const grpc::Status st = stub->Info(&ctx, pb::InfoRequest(), &info);
  EXPECT_TRUE(st.ok()) << st.error_message();

  struct stat s {};
  ASSERT_EQ(::stat((uds + "-0").c_str(), &s), 0);
  EXPECT_EQ(s.st_mode & 0777, 0660u);
  for (const auto& e : fs::directory_iterator(dir.path())) {
    EXPECT_EQ(e.path().filename().string().rfind(".s-0", 0), std::string::npos)
        << "temporary socket left behind: " << e.path();
  }
  p.Signal(SIGTERM);
  EXPECT_EQ(p.Wait(30), 0) << p.Logs();
}

// --uds-path in a directory that does not exist yet: serve creates it 0750 (even under umask 0),
// the socket inside is 0660, and nobody else may even look into the directory. A missing parent
// of that directory is still an error naming it.
TEST(ServeProcess, MissingSocketDirectoryIsCreated0750) {
  TempDir dir;
  const std::string sock_dir = dir / "run";
  const mode_t old_umask = ::umask(0);  // inherited by the child forked here
  ShardProcess p(BinaryPath(),
                 {"serve", DemoModel(), "--uds-path", sock_dir + "/s", "--device", "cpu"},
                 dir.path(), kCleanEnv);
  ::umask(old_umask);
  ASSERT_TRUE(p.WaitForSocket(sock_dir + "/s-0")) << p.Logs();
  struct stat d {
  }, s{};
  ASSERT_EQ(::stat(sock_dir.c_str(), &d), 0);
  EXPECT_TRUE(S_ISDIR(d.st_mode));
  EXPECT_EQ(d.st_mode & 0777, 0750u);
  ASSERT_EQ(::stat((sock_dir + "/s-0").c_str(), &s), 0);
  EXPECT_EQ(s.st_mode & 0777, 0660u);
  EXPECT_TRUE(ShardClient::Connect("unix:" + sock_dir + "/s-0", 10)->Health().ok());
  p.Signal(SIGTERM);
  EXPECT_EQ(p.Wait(30), 0) << p.Logs();

  ShardProcess deep(BinaryPath(),
                    {"serve", DemoModel(), "--uds-path", dir / "a/b/s", "--device", "cpu"},
                    dir.path(), kCleanEnv);
  EXPECT_EQ(deep.Wait(60), 1) << deep.Logs();
  const std::string missing = dir / "a";
  EXPECT_NE(deep.err().find("cannot create directory '" + missing + "/b'"), std::string::npos)
      << deep.Logs();
}

TEST(ServeProcess, SigtermAndSigintExitZeroAndRemoveTheSocket) {
  for (int sig : {SIGTERM, SIGINT}) {
    TempDir dir;
    DemoShard shard(dir, {}, kCleanEnv);
    ASSERT_TRUE(shard.ready) << shard.process->Logs();
    shard.process->Signal(sig);
    EXPECT_EQ(shard.process->Wait(30), 0) << shard.process->Logs();
    EXPECT_FALSE(fs::exists(shard.socket)) << "socket left behind after signal " << sig;
  }
}

TEST(ServeProcess, StaleSocketFileIsReplaced) {
  TempDir dir;
  {
    std::ofstream stale(dir / "s-0");
    stale << "not a socket";
  }
  DemoShard shard(dir, {}, kCleanEnv);
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  EXPECT_TRUE(ShardClient::Connect("unix:" + shard.socket, 10)->Health().ok());
}

TEST(ServeProcess, HealthAndInfoAnswerWhileALongPrefillRuns) {
  TempDir dir;
  // On CUDA these 4,000 tokens of the demo model take milliseconds: the test hook holds the
  // executor in that prefill for 1.5 s instead (server/batch_engine.h), as a long step would.
  DemoShard shard(dir, {},
                  integration::TestOnCuda()
                      ? integration::CleanEnv({{"PHISHARD_TEST_STALL_MS", "1500"}})
                      : kCleanEnv);
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  auto client = ShardClient::Connect("unix:" + shard.socket, 120);
  Warm(*client);
  auto prefill = std::async(std::launch::async, [&] { return client->Prefill(LongPrefill(1, 4)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the prefill is now running
  auto other = ShardClient::Connect("unix:" + shard.socket, 120);
  const auto t0 = Clock::now();
  const absl::Status health = other->Health();
  absl::StatusOr<pb::InfoResponse> info = other->Info();
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  const bool prefill_still_running =
      prefill.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout;
  EXPECT_TRUE(health.ok()) << health;
  EXPECT_TRUE(info.ok()) << info.status();
  EXPECT_LT(s, 0.5) << "Health/Info waited behind the prefill";
  EXPECT_TRUE(prefill_still_running) << "prefill too short to show anything; make it longer";
  absl::StatusOr<pb::PrefillResponse> r = prefill.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generations_size(), 4);
}

// Warmup prepares the decode steps (CUDA: captures every decode graph bucket) while Health and Info
// keep answering; afterwards no step captures anything (DEBUG logs each capture).
TEST(ServeProcess, WarmupPreparesDecodeStepsAndHealthAnswersMeanwhile) {
  TempDir dir;
  DemoShard shard(dir, {"--logger-level", "DEBUG"}, kCleanEnv);
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  auto client = ShardClient::Connect("unix:" + shard.socket, 120);
  auto other = ShardClient::Connect("unix:" + shard.socket, 120);
  auto warm = std::async(std::launch::async,
                         [&] { return client->Warmup(RouterWarmupRequest(1023, 1073, 1024)); });
  double worst_s = 0;
  int probes = 0;
  do {
    const auto t0 = Clock::now();
    EXPECT_TRUE(other->Health().ok());
    EXPECT_TRUE(other->Info().ok());
    worst_s = std::max(worst_s, std::chrono::duration<double>(Clock::now() - t0).count());
    ++probes;
  } while (warm.wait_for(std::chrono::milliseconds(5)) == std::future_status::timeout);
  absl::StatusOr<pb::WarmupResponse> w = warm.get();
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_LT(worst_s, 0.5) << "Health/Info waited behind the warmup (" << probes << " probes)";
  const std::string at_warmup = shard.process->Logs();
  ASSERT_NE(at_warmup.find("decode steps prepared"), std::string::npos) << at_warmup;
  auto captures = [](const std::string& log) {
    int n = 0;
    for (size_t at = log.find("captured the batch-"); at != std::string::npos;
         at = log.find("captured the batch-", at + 1)) {
      ++n;
    }
    return n;
  };
  if (integration::TestOnCuda()) {
    EXPECT_GT(captures(at_warmup), 0) << at_warmup;
  }

  // Batches of 1 and 3 sequences (graph buckets 1 and 4), a few decode steps each.
  for (int n : {1, 3}) {
    pb::PrefillRequest p;
    p.mutable_batch()->set_id(static_cast<uint64_t>(n));
    for (int i = 0; i < n; ++i) {
      *p.mutable_batch()->add_requests() =
          RouterRequest(static_cast<uint64_t>(10 * n + i), "x", {100, 200, 300}, 8, 4);
      p.mutable_batch()->mutable_requests(i)->mutable_stopping_parameters()->set_ignore_eos_token(
          true);
    }
    absl::StatusOr<pb::PrefillResponse> r = client->Prefill(p);
    ASSERT_TRUE(r.ok()) << r.status();
    for (int step = 0; step < 3; ++step) {
      pb::DecodeRequest d;
      d.add_batches()->set_id(static_cast<uint64_t>(n));
      absl::StatusOr<pb::DecodeResponse> dr = client->Decode(d);
      ASSERT_TRUE(dr.ok()) << dr.status();
      EXPECT_EQ(dr->generations_size(), n);
    }
  }
  const std::string after = shard.process->Logs();
  EXPECT_EQ(captures(after), captures(at_warmup)) << "a decode step captured a graph:\n" << after;
}

TEST(ServeProcess, SigtermLetsTheRpcInFlightFinish) {
  TempDir dir;
  // CUDA: the test hook makes the prefill last (see HealthAndInfoAnswerWhileALongPrefillRuns).
  DemoShard shard(dir, {},
                  integration::TestOnCuda()
                      ? integration::CleanEnv({{"PHISHARD_TEST_STALL_MS", "1000"}})
                      : kCleanEnv);
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  auto client = ShardClient::Connect("unix:" + shard.socket, 120);
  Warm(*client);
  auto prefill = std::async(std::launch::async, [&] { return client->Prefill(LongPrefill(1, 4)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  shard.process->Signal(SIGTERM);
  EXPECT_EQ(prefill.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout)
      << "prefill finished before the signal; make it longer";
  absl::StatusOr<pb::PrefillResponse> r = prefill.get();
  EXPECT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(shard.process->Wait(60), 0) << shard.process->Logs();
  EXPECT_FALSE(fs::exists(shard.socket));
}

TEST(ServeProcess, AcceptsAFiveMebibytePrefillRequest) {
  TempDir dir;
  DemoShard shard(dir, {}, kCleanEnv);
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  auto client = ShardClient::Connect("unix:" + shard.socket, 120);
  Warm(*client);
  // 2.7 M token ids (2 varint bytes each) truncated to the last 8: gRPC's 4 MiB default
  // receive limit would reject this before the handler ever ran.
  std::vector<uint32_t> ids(2'700'000);
  for (size_t k = 0; k < ids.size(); ++k) ids[k] = 200 + k % 3000;
  pb::PrefillRequest p;
  p.mutable_batch()->set_id(3);
  *p.mutable_batch()->add_requests() = RouterRequest(1, "x", ids, 8, 1);
  ASSERT_GT(p.ByteSizeLong(), 5u << 20);
  absl::StatusOr<pb::PrefillResponse> r = client->Prefill(p);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->generations_size(), 1);
  EXPECT_EQ(r->generations(0).prefill_tokens_length(), 8u);
}

TEST(ServeProcess, LauncherCommandLineStartsWithJsonLogs) {
  TempDir dir;
  const std::string uds = dir / "x";
  // Exactly what the LoRAX launcher runs (spec §10), through the lorax-server name.
  ShardProcess p(BinaryPath("lorax-server"),
                 {"serve", DemoModel(), "--uds-path", uds, "--logger-level", "INFO",
                  "--json-output", "--source", "hub", "--adapter-source", "hub", "--compile",
                  "--no-trust-remote-code", "--otlp-endpoint", "http://localhost:4317"},
                 dir.path(), kCleanEnv);
  ASSERT_TRUE(p.WaitForSocket(uds + "-0")) << p.Logs();
  EXPECT_TRUE(ShardClient::Connect("unix:" + uds + "-0", 10)->Health().ok());
  p.Signal(SIGTERM);
  ASSERT_EQ(p.Wait(30), 0) << p.Logs();
  const std::string out = p.out();
  std::istringstream lines(out);
  std::string line;
  int n = 0;
  const std::set<std::string> levels = {"TRACE",   "DEBUG", "INFO",    "SUCCESS",
                                        "WARNING", "ERROR", "CRITICAL"};
  while (std::getline(lines, line)) {
    ++n;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(j.is_discarded()) << "not JSON: " << line;
    ASSERT_TRUE(j.contains("text") && j["text"].is_string()) << line;
    ASSERT_TRUE(levels.count(j["record"]["level"]["name"].get<std::string>())) << line;
  }
  EXPECT_GE(n, 3) << out;
  EXPECT_NE(out.find("Server started at unix://" + uds + "-0"), std::string::npos) << out;
}

struct Refusal {
  std::vector<std::string> extra_args;
  std::map<std::string, std::string> env;
  std::string stderr_contains;
  std::string or_contains = "";  // an equally right refusal on a CUDA shard (TestOnCuda())
};

TEST(ServeProcess, RefusesWhatItCannotHonourBeforeBinding) {
  const std::vector<Refusal> cases = {
      {{"--sharded"}, {}, "--sharded requires the environment variables RANK, WORLD_SIZE"},
      // CUDA ranks without a usable CUDA backend (this test runs on CPU hosts) are refused before
      // the rendezvous; with one they shard over NCCL (tests/gpu/cuda_tp_model_test.cc).
      {{"--sharded", "--device", "cuda"},
       {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "localhost"}, {"MASTER_PORT", "29500"}},
       "on device 'cuda' needs"},
      {{}, {{"WORLD_SIZE", "2"}}, "WORLD_SIZE=2 but --sharded is not set"},
      {{"--sharded", "--sequencer-timeout-s", "0"},
       {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "localhost"}, {"MASTER_PORT", "29500"}},
       "--sequencer-timeout-s must be > 0"},
      {{}, {{"PREFIX_CACHING", "1"}}, "PREFIX_CACHING=1"},
      {{}, {{"CHUNKED_PREFILL", "1"}}, "CHUNKED_PREFILL=1"},
      {{"--speculative-tokens", "2"}, {}, "speculative decoding is not supported"},
      {{"--quantize", "gptq"}, {}, "--quantize gptq"},
      // A CUDA shard without adapter support refuses every adapter before looking for it.
      {{"--adapter-id", "some/adapter"},
       {},
       "not in the local cache",
       "--adapter-id some/adapter: the cuda backend does not apply LoRA adapters"},
      {{"--preloaded-adapter-ids", "a"},
       {},
       "not in the local cache",
       "--preloaded-adapter-ids a: the cuda backend does not apply LoRA adapters"},
      {{"--source", "s3"}, {}, "--source s3"},
      {{}, {{"CUDA_MEMORY_FRACTION", "lots"}}, "CUDA_MEMORY_FRACTION"},
      {{"--logger-level", "LOUD"}, {}, "--logger-level"},
      {{"--no-such-flag"}, {}, "no-such-flag"},
      {{"--listen-tcp", "not-an-address"}, {}, "--listen-tcp"},
      {{"--unrouted-kv-blocks", "-2"}, {}, "--unrouted-kv-blocks -2 must be >= 0"},
      {{}, {{"PHISHARD_UNROUTED_KV_BLOCKS", "-7"}}, "--unrouted-kv-blocks -7 must be >= 0"},
      {{}, {{"PHISHARD_UNROUTED_KV_BLOCKS", "many"}}, "--unrouted-kv-blocks"},
      {{"--max-kv-blocks", "40", "--unrouted-kv-blocks", "40"},
       {},
       "--unrouted-kv-blocks 40 must be below --max-kv-blocks 40"},
  };
  for (const Refusal& c : cases) {
    // On a GPU host the CUDA case is no refusal: rank 0 would wait in the rendezvous for rank 1.
    if (c.stderr_contains == "on device 'cuda' needs" && CudaBackendUsable()) continue;
    TempDir dir;
    std::vector<std::string> args = {"serve", DemoModel(), "--uds-path", dir / "s"};
    args.insert(args.end(), c.extra_args.begin(), c.extra_args.end());
    // The device under test, unless the case names one (without it "auto" picks CUDA on a GPU
    // machine whatever PHISHARD_TEST_DEVICE says).
    if (std::find(args.begin(), args.end(), "--device") == args.end()) {
      for (const std::string& a : integration::DeviceArgs()) args.push_back(a);
    }
    ShardProcess p(BinaryPath("lorax-server"), args, dir.path(), integration::CleanEnv(c.env));
    const int code = p.Wait(60);
    SCOPED_TRACE(c.stderr_contains);
    EXPECT_NE(code, 0) << p.Logs();
    EXPECT_NE(code, -1) << "still running";
    const bool refused_as_expected = p.err().find(c.stderr_contains) != std::string::npos ||
                                     (integration::TestOnCuda() && !c.or_contains.empty() &&
                                      p.err().find(c.or_contains) != std::string::npos);
    EXPECT_TRUE(refused_as_expected) << p.Logs();
    EXPECT_FALSE(fs::exists(dir / "s-0")) << "a refused shard must not create its socket";
  }
  // A model that does not exist locally.
  TempDir dir;
  ShardProcess p(BinaryPath(), {"serve", "no-org/no-such-model", "--uds-path", dir / "s"},
                 dir.path(), integration::CleanEnv({{"HUGGINGFACE_HUB_CACHE", dir / "hub"}}));
  EXPECT_NE(p.Wait(60), 0);
  EXPECT_NE(p.err().find("no-org/no-such-model"), std::string::npos) << p.Logs();
  EXPECT_FALSE(fs::exists(dir / "s-0"));
}

TEST(ServeProcess, DownloadWeightsExitCodes) {
  TempDir dir;
  const std::vector<std::string> launcher = {"--extension", ".safetensors",     "--logger-level",
                                             "INFO",        "--json-output",    "--source",
                                             "hub",         "--adapter-source", "hub"};
  auto run = [&](const std::string& model, std::map<std::string, std::string> env = {}) {
    std::vector<std::string> args = {"download-weights", model};
    args.insert(args.end(), launcher.begin(), launcher.end());
    auto p = std::make_unique<ShardProcess>(BinaryPath("lorax-server"), args, dir.path(),
                                            integration::CleanEnv(std::move(env)));
    p->Wait(60);
    return p;
  };
  // A local directory with weights.
  auto ok = run(DemoModel());
  EXPECT_EQ(ok->Wait(), 0) << ok->Logs();
  EXPECT_NE(ok->out().find("Files are already present on the host. Skipping download."),
            std::string::npos)
      << ok->Logs();
  // Nowhere to be found (no network access): non-zero with the reason on stderr.
  auto missing = run("no-org/no-model", {{"HUGGINGFACE_HUB_CACHE", dir / "hub"}});
  EXPECT_NE(missing->Wait(), 0);
  EXPECT_NE(missing->err().find("no-org/no-model"), std::string::npos) << missing->Logs();
  // A directory without weight files.
  fs::create_directories(dir / "empty");
  auto empty = run(dir / "empty");
  EXPECT_NE(empty->Wait(), 0);
  EXPECT_NE(empty->err().find("safetensors"), std::string::npos) << empty->Logs();
  // The Hugging Face cache layout: models--ORG--NAME/snapshots/REV via refs/main.
  const fs::path repo = fs::path(dir / "hub") / "models--acme--tiny";
  fs::create_directories(repo / "snapshots" / "abc123");
  fs::create_directories(repo / "refs");
  std::ofstream(repo / "refs" / "main") << "abc123";
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"}) {
    fs::create_symlink(fs::path(DemoModel()) / f, repo / "snapshots" / "abc123" / f);
  }
  auto cached = run("acme/tiny", {{"HUGGINGFACE_HUB_CACHE", dir / "hub"}});
  EXPECT_EQ(cached->Wait(), 0) << cached->Logs();
  // The launcher's static adapter check resolves --adapter-id as serve will: a LOCAL id relative
  // to the model directory (the default adapter root) is there; one that is not, or a hub id not
  // in the cache, fails naming it.
  auto with_adapter = [&](const std::string& source, const std::string& id) {
    std::vector<std::string> args = {"download-weights", DemoModel(), "--adapter-source", source,
                                     "--adapter-id",     id};
    auto p = std::make_unique<ShardProcess>(
        BinaryPath("lorax-server"), args, dir.path(),
        integration::CleanEnv({{"HUGGINGFACE_HUB_CACHE", dir / "hub"}}));
    p->Wait(60);
    return p;
  };
  auto local_adapter = with_adapter("local", "adapters/prose");
  EXPECT_EQ(local_adapter->Wait(), 0) << local_adapter->Logs();
  for (const auto& [source, id] : std::vector<std::pair<std::string, std::string>>{
           {"local", "adapters/nope"}, {"hub", "adapters/prose"}}) {
    auto bad = with_adapter(source, id);
    EXPECT_NE(bad->Wait(), 0) << source << " " << id;
    EXPECT_NE(bad->err().find(id), std::string::npos) << bad->Logs();
  }
  // Re-saved unsharded next to a stale index whose shards are gone: model.safetensors wins, as
  // in Hugging Face; without it the missing shard is named.
  const fs::path stale_dir = fs::path(dir / "stale");
  fs::create_directories(stale_dir);
  fs::copy_file(fs::path(DemoModel()) / "model.safetensors", stale_dir / "model.safetensors");
  std::ofstream(stale_dir / "model.safetensors.index.json")
      << R"({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})";
  auto stale = run(stale_dir);
  EXPECT_EQ(stale->Wait(), 0) << stale->Logs();
  fs::remove(stale_dir / "model.safetensors");
  auto shardless = run(stale_dir);
  EXPECT_NE(shardless->Wait(), 0);
  EXPECT_NE(shardless->err().find("model-00002-of-00002.safetensors"), std::string::npos)
      << shardless->Logs();
}

TEST(ServeProcess, ListensOnTcpWhenAsked) {
  TempDir dir;
  DemoShard shard(dir, {"--listen-tcp", "0"}, kCleanEnv);  // port 0: any free port
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  // The "listening" line may follow the unix socket's appearance by a few milliseconds.
  const std::string port = shard.process->WaitForStdout(std::regex("and 127\\.0\\.0\\.1:([0-9]+)"));
  ASSERT_FALSE(port.empty()) << shard.process->Logs();
  auto tcp = ShardClient::Connect("127.0.0.1:" + port, 10);
  absl::StatusOr<pb::InfoResponse> info = tcp->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->block_size(), 16u);
}

TEST(ServeProcess, ToolSubcommandsMatchTheGolden) {
  TempDir dir;
  nlohmann::json golden = nlohmann::json::parse(integration::ReadFile(
      std::string(PHISHARD_TESTDATA) + "/../tests/golden/tiny-phi-code.json"));
  const auto& c = golden["cases"][0];
  const std::string prompt = c["prompt"];

  ShardProcess tok(BinaryPath(), {"tokenize", "--model", DemoModel(), "--text", prompt}, dir.path(),
                   kCleanEnv);
  ASSERT_EQ(tok.Wait(60), 0) << tok.Logs();
  EXPECT_EQ(nlohmann::json::parse(tok.out())["ids"], c["prompt_ids"]);

  // The device under test's greedy continuation against the golden (golden_check.h: exact on the
  // CPU, bf16 near-tie rule on CUDA); texts compared when the ids are the golden's.
  const integration::GoldenGreedy want = {
      .ids = c["greedy_ids"].get<std::vector<uint32_t>>(),
      .logprobs = {},
      .min_top2_gap = c["min_top2_gap"].get<double>(),
      .scale = integration::LogitScale(c["last_logits"].get<std::vector<float>>())};
  std::vector<std::string> gen_args = {"generate",
                                       "--model",
                                       DemoModel(),
                                       "--prompt",
                                       prompt,
                                       "--max-new-tokens",
                                       std::to_string(want.ids.size()),
                                       "--ignore-eos",
                                       "--json"};
  for (const std::string& a : integration::DeviceArgs()) gen_args.push_back(a);
  ShardProcess gen(BinaryPath(), gen_args, dir.path(), kCleanEnv);
  ASSERT_EQ(gen.Wait(120), 0) << gen.Logs();
  nlohmann::json g = nlohmann::json::parse(gen.out());
  const std::vector<uint32_t> gen_ids = g["ids"].get<std::vector<uint32_t>>();
  ASSERT_EQ(gen_ids.size(), want.ids.size());
  integration::ExpectGreedyMatchesGolden(gen_ids, {}, want, "generate");
  if (gen_ids == want.ids) {
    EXPECT_EQ(g["text"], c["greedy_text"]);
  }
  EXPECT_NE(gen.err().find("tokens/s"), std::string::npos);

  DemoShard shard(dir, {}, kCleanEnv);
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  ShardProcess client(
      BinaryPath(),
      {"client", "generate", "--uds-path", shard.uds, "--prompt", prompt, "--max-new-tokens",
       std::to_string(c["greedy_ids"].size()), "--max-input-length", "128", "--json"},
      dir.path(), kCleanEnv);
  ASSERT_EQ(client.Wait(120), 0) << client.Logs() << shard.process->Logs();
  nlohmann::json cj = nlohmann::json::parse(client.out());
  // The client stops at EOS like the router; the first golden case has none in 16 tokens.
  const std::vector<uint32_t> client_ids = cj["ids"].get<std::vector<uint32_t>>();
  ASSERT_EQ(client_ids.size(), want.ids.size());
  integration::ExpectGreedyMatchesGolden(client_ids, {}, want, "client generate");
  if (client_ids == want.ids) {
    EXPECT_EQ(cj["text"], c["greedy_text"]);
  }
  EXPECT_EQ(cj["finish_reason"], "FINISH_REASON_LENGTH");

  for (const char* sub : {"serve", "download-weights", "tokenize", "generate", "client"}) {
    ShardProcess help(BinaryPath(), {sub, "--help"}, dir.path(), kCleanEnv);
    EXPECT_EQ(help.Wait(30), 0) << sub;
    EXPECT_NE(help.out().find("Usage"), std::string::npos) << sub << help.Logs();
  }
  ShardProcess bare(BinaryPath(), {}, dir.path(), kCleanEnv);
  EXPECT_EQ(bare.Wait(30), 0);
  EXPECT_NE(bare.out().find("serve"), std::string::npos) << bare.Logs();
}

// `phishard client generate` pointed at a shard a router drives (warmed up, a batch in flight)
// must not send the router's startup: ClearCache would drop the router's batch and Warmup would
// size the cache again. By default it runs the startup only for a shard that was never warmed up
// (the first call below), then leaves warmed shards alone (the second); --startup forces it.
TEST(ServeProcess, ClientGenerateLeavesARoutersBatchAlone) {
  TempDir dir;
  DemoShard shard(dir, {}, kCleanEnv);
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  auto generate = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {
        "client",           "generate", "--uds-path",         shard.uds, "--prompt", "def f(x):",
        "--max-new-tokens", "4",        "--max-input-length", "64",      "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    ShardProcess client(BinaryPath(), args, dir.path(), kCleanEnv);
    const int rc = client.Wait(120);
    EXPECT_EQ(rc, 0) << client.Logs() << shard.process->Logs();
    return rc == 0 ? nlohmann::json::parse(client.out()) : nlohmann::json();
  };
  auto warmups = [&] {
    int n = 0;
    const std::string log = shard.process->Logs();
    for (size_t at = log.find("Warmup finished"); at != std::string::npos;
         at = log.find("Warmup finished", at + 1)) {
      ++n;
    }
    return n;
  };
  // A fresh shard: the startup (ClearCache, Info, Warmup), then the request.
  const nlohmann::json first = generate({});
  ASSERT_FALSE(first.is_null());
  ASSERT_EQ(first["ids"].size(), 4u);
  const int after_first = warmups();

  // A router's batch in flight on the warmed shard (router blocks from 1).
  auto router = ShardClient::Connect("unix:" + shard.socket, 120);
  pb::PrefillRequest p;
  p.mutable_batch()->set_id(3);
  *p.mutable_batch()->add_requests() = RouterRequest(30, "x", {100, 200, 300}, 8, 6);
  p.mutable_batch()->mutable_requests(0)->mutable_stopping_parameters()->set_ignore_eos_token(true);
  p.mutable_batch()->mutable_requests(0)->add_blocks(1);  // 3 + 6 - 1 tokens: one block
  for (uint32_t s = 16; s < 16 + 8; ++s) p.mutable_batch()->mutable_requests(0)->add_slots(s);
  absl::StatusOr<pb::PrefillResponse> r = router->Prefill(p);
  ASSERT_TRUE(r.ok()) << r.status();

  // The default again: no startup; the same greedy continuation from the shard's own blocks.
  const nlohmann::json second = generate({});
  ASSERT_FALSE(second.is_null());
  EXPECT_EQ(second["ids"], first["ids"]);
  EXPECT_EQ(warmups(), after_first) << "a warmed shard got another Warmup";
  pb::DecodeRequest d;
  d.add_batches()->set_id(3);
  absl::StatusOr<pb::DecodeResponse> dr = router->Decode(d);
  ASSERT_TRUE(dr.ok()) << "the router's batch was dropped: " << dr.status();
  EXPECT_EQ(dr->generations_size(), 1);
}

}  // namespace
}  // namespace phishard
