// Faults a production shard meets, against the real `phishard serve` process (CPU, demo model).
// Each test's outcome is the documented behaviour of docs/reliability.md ("Faults"):
//   - SIGTERM with work in flight and queued: admitted RPCs finish, new ones get UNAVAILABLE,
//     exit status 0, socket removed;
//   - SIGKILL leaves the socket file behind; a new server on the same path replaces it and serves
//     the router's whole startup sequence;
//   - a step that stalls (test hook PHISHARD_TEST_STALL_MS): Health, Info and grpc.health.v1
//     still answer within 500 ms, queued work runs after it, a client that gave up leaves
//     nothing behind;
//   - Warmup that cannot get its KV pool (--max-kv-blocks too small, or over the backend's
//     allocation limit): RESOURCE_EXHAUSTED with a message naming the knob, the process keeps
//     serving, and a smaller Warmup succeeds.
// Plus the security defaults: api_token never reaches the logs (DownloadAdapter / LoadAdapter at
// TRACE level), no TCP listener unless asked.
#include <poll.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
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
#include "proto/health.grpc.pb.h"
#include "server/client.h"
#include "tests/integration/raw_grpc.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;
namespace fs = std::filesystem;
using integration::DemoShard;
using integration::IsSocket;
using integration::TempDir;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void Warm(ShardClient& c) {
  absl::StatusOr<pb::WarmupResponse> w = c.Warmup(RouterWarmupRequest(64, 100, 65));
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE(w->has_max_supported_total_tokens());
}

pb::PrefillRequest SmallPrefill(uint64_t batch_id, uint64_t request_id, uint32_t max_new) {
  pb::PrefillRequest p;
  p.mutable_batch()->set_id(batch_id);
  *p.mutable_batch()->add_requests() =
      RouterRequest(request_id, "def f(x):\n", {100, 200, 300, 400}, 4, max_new);
  p.mutable_batch()->mutable_requests(0)->mutable_stopping_parameters()->set_ignore_eos_token(true);
  p.mutable_batch()->set_size(1);
  return p;
}

ino_t Inode(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

// Occurrences of `needle` in `text`.
int Count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

// Waits until the server's log shows `n` lines "<method> admitted to the executor" (TRACE level):
// the RPC reached the server and sits in its queue. Sleeping a fixed time instead raced on a
// loaded CI machine (the call had not arrived when SIGTERM was sent and got UNAVAILABLE).
bool WaitAdmitted(const integration::ShardProcess& p, const std::string& method, int n,
                  double timeout_s = 30) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  while (Clock::now() < deadline) {
    if (Count(p.out() + p.err(), method + " admitted to the executor") >= n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

TEST(Faults, SigtermWithWorkInFlightAndQueuedFinishesItAll) {
  TempDir dir;
  // The first Prefill/Decode stalls 3 s: the "in flight" step, without depending on how fast
  // this machine runs a long prefill. Everything before the signal waits for events (the server
  // logging that it admitted each call), not for fixed times, so only the 3 s must cover the
  // admission of two more calls.
  DemoShard shard(dir, {"--logger-level", "TRACE"},
                  integration::CleanEnv({{"PHISHARD_TEST_STALL_MS", "3000"}}));
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  const std::string target = "unix:" + shard.socket;
  auto a = ShardClient::Connect(target, 60), b = ShardClient::Connect(target, 60),
       c = ShardClient::Connect(target, 60);
  Warm(*a);

  const auto t_first = Clock::now();
  auto in_flight =
      std::async(std::launch::async, [&] { return a->Prefill(SmallPrefill(1, 1, 8)); });
  ASSERT_TRUE(WaitAdmitted(*shard.process, "Prefill", 1)) << shard.process->Logs();
  // Queued behind it on the executor, in this order.
  auto queued_prefill =
      std::async(std::launch::async, [&] { return b->Prefill(SmallPrefill(2, 2, 8)); });
  ASSERT_TRUE(WaitAdmitted(*shard.process, "Prefill", 2)) << shard.process->Logs();
  auto queued_decode = std::async(std::launch::async, [&] {
    pb::DecodeRequest d;
    d.add_batches()->set_id(1);
    return c->Decode(d);
  });
  ASSERT_TRUE(WaitAdmitted(*shard.process, "Decode", 1)) << shard.process->Logs();
  ASSERT_EQ(in_flight.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout)
      << "the stalled step finished after " << Seconds(t_first)
      << " s, before the queued calls were admitted; the test hook did not stall";
  const auto signalled = Clock::now();
  shard.process->Signal(SIGTERM);
  // The signal is handled on its own thread, which logs and then closes the door to new calls
  // (a few instructions later; the 200 ms only cover a descheduled thread).
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (Clock::now() < deadline &&
         shard.process->out().find("Signal 15 received") == std::string::npos) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));

  // A call that arrives after the signal is refused (UNAVAILABLE), never half-run.
  auto late = ShardClient::Connect(target, 5);
  absl::StatusOr<pb::PrefillResponse> refused = late->Prefill(SmallPrefill(3, 3, 2));
  EXPECT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();

  // Every call admitted before the signal completes with its normal answer.
  absl::StatusOr<pb::PrefillResponse> r1 = in_flight.get();
  ASSERT_TRUE(r1.ok()) << r1.status();
  ASSERT_EQ(r1->generations_size(), 1);
  EXPECT_EQ(r1->generations(0).request_id(), 1u);
  EXPECT_TRUE(r1->has_batch());
  EXPECT_GE(Seconds(t_first), 2.9) << "the in-flight step is the stalled one";
  absl::StatusOr<pb::PrefillResponse> r2 = queued_prefill.get();
  ASSERT_TRUE(r2.ok()) << r2.status();
  ASSERT_EQ(r2->generations_size(), 1);
  EXPECT_EQ(r2->generations(0).request_id(), 2u);
  absl::StatusOr<pb::DecodeResponse> r3 = queued_decode.get();
  ASSERT_TRUE(r3.ok()) << r3.status();
  ASSERT_EQ(r3->generations_size(), 1);
  EXPECT_EQ(r3->generations(0).request_id(), 1u);
  EXPECT_EQ(r3->generations(0).next_tokens().ids_size(), 1) << "request 1's second token";
  std::printf(
      "SIGTERM drain: 3 of 3 admitted calls completed (1 running, 2 queued), 1 late call "
      "refused with UNAVAILABLE\n");

  EXPECT_EQ(shard.process->Wait(60), 0) << shard.process->Logs();
  EXPECT_LT(Seconds(signalled), 30) << "shutdown waited for its grace period";
  EXPECT_FALSE(fs::exists(shard.socket)) << "socket left behind";
  EXPECT_NE(shard.process->out().find("Signal 15 received"), std::string::npos)
      << shard.process->Logs();
}

TEST(Faults, SigkillLeavesTheSocketAndARestartReplacesIt) {
  TempDir dir;
  ino_t stale = 0;
  {
    DemoShard first(dir, {}, integration::CleanEnv());
    ASSERT_TRUE(first.ready) << first.process->Logs();
    Warm(*ShardClient::Connect("unix:" + first.socket, 30));
    first.process->Signal(SIGKILL);
    EXPECT_EQ(first.process->Wait(30), 128 + SIGKILL);
    ASSERT_TRUE(IsSocket(first.socket)) << "SIGKILL cannot clean up; the file must still be there";
    stale = Inode(first.socket);
    // Nobody listens on it any more.
    EXPECT_FALSE(ShardClient::Connect("unix:" + first.socket, 2)->Health().ok());
  }

  // Same path, like a launcher that restarts the shard without deleting the file itself.
  integration::ShardProcess second(integration::BinaryPath(),
                                   integration::ServeArgs(integration::DemoModel(), dir / "s"),
                                   dir.path(), integration::CleanEnv());
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (Clock::now() < deadline && second.running() && Inode(dir / "s-0") == stale) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_NE(Inode(dir / "s-0"), stale) << "the stale socket was not replaced\n" << second.Logs();
  ASSERT_TRUE(IsSocket(dir / "s-0"));

  // The router's whole startup, then a request, on the new server.
  absl::StatusOr<std::unique_ptr<RouterSession>> session =
      RouterSession::Connect("unix:" + dir / "s-0", 60);
  ASSERT_TRUE(session.ok()) << session.status();
  ASSERT_TRUE((*session)->ClearCache(std::nullopt).ok());
  ASSERT_TRUE((*session)->Info().ok());
  absl::StatusOr<std::optional<uint32_t>> tokens =
      (*session)->Warmup(RouterWarmupRequest(64, 100, 65));
  ASSERT_TRUE(tokens.ok() && tokens->has_value()) << tokens.status();
  pb::Batch batch = SmallPrefill(0, 7, 5).batch();
  absl::StatusOr<std::vector<RequestOutcome>> out = RunBatchToCompletion(**session, batch);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 1u);
  EXPECT_EQ((*out)[0].ids.size(), 5u);

  second.Signal(SIGTERM);
  EXPECT_EQ(second.Wait(30), 0) << second.Logs();
  EXPECT_FALSE(fs::exists(dir / "s-0"));
}

TEST(Faults, HealthAnswersWhileAStepStalls) {
  TempDir dir;
  // The stall (4 s) is 4x the bound on one probe (1 s): a Health that queued behind the step
  // would take the rest of the stall, while one answered from its own thread takes milliseconds
  // (tens under a loaded 2-core CI). Probes run for as long as the step stalls; at least three
  // must land inside it.
  constexpr int kStallMs = 4000;
  constexpr double kProbeBoundS = 1.0;
  DemoShard shard(dir, {"--logger-level", "TRACE"},
                  integration::CleanEnv({{"PHISHARD_TEST_STALL_MS", std::to_string(kStallMs)}}));
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  const std::string target = "unix:" + shard.socket;
  auto router = ShardClient::Connect(target, 60);
  Warm(*router);

  const auto t0 = Clock::now();
  auto stalled =
      std::async(std::launch::async, [&] { return router->Prefill(SmallPrefill(1, 1, 4)); });
  ASSERT_TRUE(WaitAdmitted(*shard.process, "Prefill", 1)) << shard.process->Logs();

  // A client that gives up on a queued step (deadline) must not hurt anything.
  auto impatient = ShardClient::Connect(target, 0.3);
  absl::StatusOr<pb::PrefillResponse> gave_up = impatient->Prefill(SmallPrefill(2, 2, 4));
  EXPECT_EQ(gave_up.status().code(), absl::StatusCode::kDeadlineExceeded) << gave_up.status();

  // Health (LoraxService and grpc.health.v1) and Info answer from their own threads.
  auto probe = ShardClient::Connect(target, 5);
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto hstub = grpc::health::v1::Health::NewStub(channel);
  int during_stall = 0;
  double slowest = 0;
  while (stalled.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout) {
    const auto h0 = Clock::now();
    const absl::Status health = probe->Health();
    absl::StatusOr<pb::InfoResponse> info = probe->Info();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::health::v1::HealthCheckResponse hr;
    const grpc::Status hs = hstub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &hr);
    const double s = Seconds(h0);
    const bool still_stalled =
        stalled.wait_for(std::chrono::milliseconds(0)) == std::future_status::timeout;
    EXPECT_TRUE(health.ok()) << health;
    EXPECT_TRUE(info.ok()) << info.status();
    EXPECT_TRUE(hs.ok() && hr.status() == grpc::health::v1::HealthCheckResponse::SERVING);
    if (still_stalled) {  // answered while the step was still running
      ++during_stall;
      slowest = std::max(slowest, s);
      EXPECT_LT(s, kProbeBoundS) << "Health/Info waited behind the stalled step";
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::printf("%d Health+Info+grpc.health probes during a %d ms stall, slowest %.1f ms\n",
              during_stall, kStallMs, slowest * 1000);
  EXPECT_GE(during_stall, 3) << "the step did not stall long enough to probe";

  absl::StatusOr<pb::PrefillResponse> r = stalled.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GE(Seconds(t0), kStallMs / 1000.0 - 0.1) << "the step did not stall";
  // The abandoned Prefill still ran after the stall (the executor does not know the client left);
  // the router would ClearCache it, and that must leave the shard able to reuse the id.
  ASSERT_TRUE(router->ClearCache(2).ok());
  pb::DecodeRequest d;
  d.add_batches()->set_id(1);
  const auto d0 = Clock::now();
  absl::StatusOr<pb::DecodeResponse> dec = router->Decode(d);
  ASSERT_TRUE(dec.ok()) << dec.status();
  // A one-request decode of the demo model takes milliseconds; the bound only has to tell it
  // from a second 4 s stall.
  EXPECT_LT(Seconds(d0), kStallMs / 2000.0) << "the stall is one step, once";
  absl::StatusOr<pb::PrefillResponse> again = router->Prefill(SmallPrefill(2, 2, 1));
  EXPECT_TRUE(again.ok()) << again.status();
  EXPECT_NE(shard.process->out().find("test hook"), std::string::npos)
      << "the hook must announce itself in the log";
}

TEST(Faults, BadStallHookValueIsRefusedAtStartup) {
  TempDir dir;
  integration::ShardProcess p(
      integration::BinaryPath(), integration::ServeArgs(integration::DemoModel(), dir / "s"),
      dir.path(), integration::CleanEnv({{"PHISHARD_TEST_STALL_MS", "soon"}}));
  EXPECT_EQ(p.Wait(60), 1) << p.Logs();
  EXPECT_NE(p.err().find("PHISHARD_TEST_STALL_MS"), std::string::npos) << p.Logs();
  EXPECT_FALSE(fs::exists(dir / "s-0"));
}

// The CUDA tuning switches (LoRA, MLP stream, TP prefill chunks) are read when the model is made;
// a typo must not quietly mean the default: serve refuses it before loading, on any device.
TEST(Faults, BadLoraTuningValueIsRefusedAtStartup) {
  for (const auto& [name, value] :
       std::vector<std::pair<std::string, std::string>>{{"PHISHARD_LORA_OVERLAP", "off"},
                                                        {"PHISHARD_LORA_GEMM_MIN_ROWS", "-1"},
                                                        {"PHISHARD_LORA_FUSED", "yes"},
                                                        {"PHISHARD_MLP_STREAM", "3"},
                                                        {"PHISHARD_MLP_STREAM_TP", "2"},
                                                        {"PHISHARD_MLP_JOIN_TP", "3"},
                                                        {"PHISHARD_TP_PREFILL_CHUNKS", "0"}}) {
    TempDir dir;
    integration::ShardProcess p(integration::BinaryPath(),
                                integration::ServeArgs(integration::DemoModel(), dir / "s"),
                                dir.path(), integration::CleanEnv({{name, value}}));
    EXPECT_EQ(p.Wait(60), 1) << p.Logs();
    EXPECT_NE(p.err().find(name), std::string::npos) << p.Logs();
    EXPECT_FALSE(fs::exists(dir / "s-0"));
  }
}

TEST(Faults, WarmupWithoutRoomForTheKvPoolFailsCleanlyAndTheShardKeepsServing) {
  TempDir dir;
  // A pool of 4 blocks, 1 of them kept for requests without blocks (SmallPrefill's below).
  DemoShard shard(dir, {"--max-kv-blocks", "4", "--unrouted-kv-blocks", "1"},
                  integration::CleanEnv());
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  auto c = ShardClient::Connect("unix:" + shard.socket, 60);

  // 100 prefill tokens need 7 blocks; the router's part of the pool may hold 3.
  absl::StatusOr<pb::WarmupResponse> w = c->Warmup(RouterWarmupRequest(64, 100, 65));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kResourceExhausted) << w.status();
  EXPECT_NE(w.status().message().find("KV cache too small"), std::string::npos) << w.status();
  EXPECT_NE(w.status().message().find("--max-batch-prefill-tokens"), std::string::npos);

  EXPECT_TRUE(c->Health().ok());
  EXPECT_TRUE(c->Info().ok());
  absl::StatusOr<pb::PrefillResponse> early = c->Prefill(SmallPrefill(1, 1, 2));
  EXPECT_EQ(early.status().code(), absl::StatusCode::kFailedPrecondition) << early.status();
  EXPECT_NE(early.status().message().find("Warmup must succeed first"), std::string::npos);

  // A router restarted with a smaller --max-batch-prefill-tokens gets a working shard.
  absl::StatusOr<pb::WarmupResponse> w2 = c->Warmup(RouterWarmupRequest(16, 32, 17));
  ASSERT_TRUE(w2.ok()) << w2.status();
  EXPECT_EQ(w2->max_supported_total_tokens(), 3u * 16);
  absl::StatusOr<pb::PrefillResponse> p = c->Prefill(SmallPrefill(1, 1, 2));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(shard.process->running());
}

TEST(Faults, WarmupWhoseKvAllocationFailsIsResourceExhausted) {
  TempDir dir;
  // 100,000 blocks of the demo model are 12.5 GiB, over the CPU backend's 4 GiB KV limit: the
  // allocation itself fails (the same path as a failed cudaMalloc on a GPU). On CUDA (bf16,
  // 64 KiB a block) 40,000,000 blocks are 2.4 TiB, more than any GPU: cudaMalloc fails.
  const std::string blocks = integration::TestOnCuda() ? "40000000" : "100000";
  DemoShard shard(dir, {"--max-kv-blocks", blocks}, integration::CleanEnv());
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  auto c = ShardClient::Connect("unix:" + shard.socket, 60);
  absl::StatusOr<pb::WarmupResponse> w = c->Warmup(RouterWarmupRequest(64, 100, 65));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kResourceExhausted) << w.status();
  EXPECT_NE(w.status().message().find("Allocating the KV cache of " + blocks + " blocks failed"),
            std::string::npos)
      << w.status();
  EXPECT_TRUE(c->Health().ok()) << "an allocation failure is not a device fault";
  EXPECT_EQ(c->Prefill(SmallPrefill(1, 1, 2)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(shard.process->running());
  shard.process->Signal(SIGTERM);
  EXPECT_EQ(shard.process->Wait(30), 0) << shard.process->Logs();
}

// ---- security defaults -------------------------------------------------------------------------

TEST(Security, ApiTokenNeverReachesTheLogs) {
  TempDir dir;
  const std::string kToken = "hf_SECRETtoken1234567890abcdef";
  DemoShard shard(dir, {"--logger-level", "TRACE", "--json-output"}, integration::CleanEnv());
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  auto c = ShardClient::Connect("unix:" + shard.socket, 30);
  Warm(*c);
  // Base model, an adapter that does not exist, and one that exists under the model directory:
  // success and failure paths alike.
  const std::vector<std::string> ids = {"__base_model__", "no-org/no-such-adapter",
                                        fs::path(integration::DemoModel()) / "adapters" / "prose"};
  for (const std::string& id : ids) {
    for (pb::AdapterSource source : {pb::HUB, pb::LOCAL, pb::S3}) {
      pb::DownloadAdapterRequest d;
      d.mutable_adapter_parameters()->add_adapter_ids(id);
      d.set_adapter_source(source);
      d.set_api_token(kToken);
      grpc::ClientContext ctx;
      pb::DownloadAdapterResponse dr;
      (void)c->stub()->DownloadAdapter(&ctx, d, &dr);
      pb::LoadAdapterRequest l;
      l.mutable_adapter_parameters()->add_adapter_ids(id);
      l.set_adapter_source(source);
      l.set_adapter_index(3);
      l.set_api_token(kToken);
      grpc::ClientContext ctx2;
      pb::LoadAdapterResponse lr;
      const grpc::Status st = c->stub()->LoadAdapter(&ctx2, l, &lr);
      EXPECT_EQ(st.error_message().find(kToken), std::string::npos) << "token in a status";
    }
  }
  // A DownloadAdapter whose api_token is not UTF-8: the parse error names the field, not the
  // bytes. Wire format by hand: field 1 (adapter_parameters{adapter_ids: "a"}), field 3 (token).
  const std::string bad_token = kToken + "\xff";
  std::string raw = std::string("\x0a\x03\x0a\x01") + "a";
  raw += '\x1a';
  raw += static_cast<char>(bad_token.size());
  raw += bad_token;
  auto channel = grpc::CreateChannel("unix:" + shard.socket, grpc::InsecureChannelCredentials());
  const grpc::Status bad =
      integration::RawUnary(channel, "/generate.v1.LoraxService/DownloadAdapter", raw, nullptr, 10);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad.error_message();
  EXPECT_NE(bad.error_message().find("api_token"), std::string::npos) << bad.error_message();
  EXPECT_EQ(bad.error_message().find("SECRET"), std::string::npos) << bad.error_message();

  shard.process->Signal(SIGTERM);
  ASSERT_EQ(shard.process->Wait(30), 0) << shard.process->Logs();
  const std::string logs = shard.process->out() + shard.process->err();
  EXPECT_EQ(logs.find(kToken), std::string::npos) << "api_token printed:\n" << logs;
  EXPECT_EQ(logs.find("SECRETtoken"), std::string::npos) << "part of api_token printed";
}

TEST(Security, NoTcpListenerUnlessAskedAndLoopbackByDefault) {
  TempDir dir;
  DemoShard shard(dir, {}, integration::CleanEnv());
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  // Every socket the process holds: only unix ones may be listening.
  std::ifstream tcp("/proc/" + std::to_string(shard.process->pid()) + "/net/tcp");
  std::ifstream tcp6("/proc/" + std::to_string(shard.process->pid()) + "/net/tcp6");
  // /proc/PID/net/tcp lists the network namespace's sockets, not only ours: match our inodes.
  std::set<std::string> inodes;
  for (const auto& e :
       fs::directory_iterator("/proc/" + std::to_string(shard.process->pid()) + "/fd")) {
    std::error_code ec;
    const std::string link = fs::read_symlink(e.path(), ec).string();
    if (link.rfind("socket:[", 0) == 0) inodes.insert(link.substr(8, link.size() - 9));
  }
  ASSERT_FALSE(inodes.empty());
  for (std::ifstream* f : {&tcp, &tcp6}) {
    std::string line;
    std::getline(*f, line);  // header
    while (std::getline(*f, line)) {
      std::istringstream ss(line);
      std::string sl, local, remote, state, queues, tr, retr, uid, timeout, inode;
      ss >> sl >> local >> remote >> state >> queues >> tr >> retr >> uid >> timeout >> inode;
      EXPECT_FALSE(inodes.count(inode) && state == "0A")
          << "a TCP listener on " << local << " without --listen-tcp";
    }
  }
  // With a bare port the listener binds loopback only.
  TempDir dir2;
  DemoShard tcp_shard(dir2, {"--listen-tcp", "0"}, integration::CleanEnv());
  ASSERT_TRUE(tcp_shard.ready) << tcp_shard.process->Logs();
  EXPECT_FALSE(tcp_shard.process->WaitForStdout(std::regex("and 127\\.0\\.0\\.1:")).empty())
      << tcp_shard.process->out();
}

TEST(Security, HostilePickleModelIsRefused) {
  // A model directory whose weights exist only as a PyTorch checkpoint whose pickle calls
  // posix.system (tests/data/torch/misc/evil.bin): the restricted reader
  // (model/torch_checkpoint.h) runs nothing and refuses it by name, before any socket exists.
  TempDir dir;
  const fs::path model = fs::path(dir.path()) / "model";
  fs::create_directories(model);
  for (const char* f :
       {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}) {
    fs::copy_file(fs::path(integration::DemoModel()) / f, model / f);
  }
  fs::copy_file(fs::path(integration::DemoModel()).parent_path().parent_path() / "tests" / "data" /
                    "torch" / "misc" / "evil.bin",
                model / "pytorch_model.bin");
  fs::remove("/tmp/phishard-pwned");
  integration::ShardProcess p(integration::BinaryPath(),
                              integration::ServeArgs(model.string(), dir / "s"), dir.path(),
                              integration::CleanEnv());
  EXPECT_EQ(p.Wait(60), 1) << p.Logs();
  EXPECT_NE(p.err().find("posix.system is not allowed"), std::string::npos) << p.Logs();
  EXPECT_FALSE(fs::exists(dir / "s-0"));
  EXPECT_FALSE(fs::exists("/tmp/phishard-pwned"));
}

TEST(Security, SocketIsNeverConnectableByOthersEvenUnderUmaskZero) {
  // The socket is bound on a temporary name and chmod'ed to 0660 before it is renamed into place.
  // bind() applies the umask, so under umask 0 the temporary file would be 0777 (anyone may
  // connect) until the chmod — unless the server narrows the umask around bind(). Watch the
  // directory with inotify; when the temporary socket appears, SIGSTOP the server, stat the
  // file, SIGCONT. The server runs at nice 19 to widen the window; a run may still miss it, so
  // it tries a few times and skips (never passes vacuously) if it never sees the file.
  int seen_mode = -1;
  for (int attempt = 0; attempt < 8 && seen_mode < 0; ++attempt) {
    TempDir dir;
    const int fd = ::inotify_init1(IN_CLOEXEC);
    ASSERT_GE(fd, 0);
    ASSERT_GE(::inotify_add_watch(fd, dir.path().c_str(), IN_CREATE), 0);
    const mode_t old_umask = ::umask(0);  // inherited by the child forked below
    integration::ShardProcess p(integration::BinaryPath(),
                                integration::ServeArgs(integration::DemoModel(), dir / "s"),
                                dir.path(), integration::CleanEnv());
    ::umask(old_umask);
    ::setpriority(PRIO_PROCESS, p.pid(), 19);
    alignas(inotify_event) char buf[4096];
    bool temp_seen = false;
    while (!temp_seen) {
      pollfd pfd{fd, POLLIN, 0};
      if (::poll(&pfd, 1, 60000) <= 0) break;
      const ssize_t n = ::read(fd, buf, sizeof(buf));
      for (ssize_t off = 0; off < n;) {
        const auto* ev = reinterpret_cast<const inotify_event*>(buf + off);
        off += static_cast<ssize_t>(sizeof(inotify_event) + ev->len);
        if (ev->len == 0) continue;
        const std::string name = ev->name;
        if (name == "s-0") break;      // renamed already: missed this time
        if (name[0] != '.') continue;  // the temporary name starts with '.'
        p.Signal(SIGSTOP);
        struct stat st {};
        if (::lstat((dir / name).c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
          seen_mode = static_cast<int>(st.st_mode & 0777);
        }
        p.Signal(SIGCONT);
        temp_seen = true;
        break;
      }
      if (IsSocket(dir / "s-0")) break;
    }
    ::close(fd);
    ASSERT_TRUE(p.WaitForSocket(dir / "s-0")) << p.Logs();
    struct stat st {};
    ASSERT_EQ(::stat((dir / "s-0").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0660u);
    p.Signal(SIGTERM);
    EXPECT_EQ(p.Wait(30), 0) << p.Logs();
  }
  if (seen_mode < 0) GTEST_SKIP() << "never caught the temporary socket before its rename";
  EXPECT_EQ(seen_mode & 0007, 0) << "temporary socket was mode " << std::oct << seen_mode;
  EXPECT_EQ(seen_mode, 0660) << std::oct << seen_mode;
}

}  // namespace
}  // namespace phishard
