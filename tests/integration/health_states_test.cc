// grpc.health.v1 over `--listen-tcp` through a real process's life: NOT_SERVING while the model
// loads (the port answers before the unix socket exists, server/loading_health_server.h), then
// SERVING on the same port once the shard serves. Loading is held still without any test hook:
// the model directory's tokenizer.json is a FIFO, and reading it blocks until the test writes it.
// (NOT_SERVING after a device fault: InProcessShard.DeviceFaultMakesTheShardUnhealthyEverywhere,
// tests/server/lorax_service_executor_test.cc, drives the real service and gRPC server with a
// model whose step and ping fail.)
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "proto/health.grpc.pb.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
namespace hv1 = ::grpc::health::v1;
using integration::BinaryPath;
using integration::DemoModel;
using integration::IsSocket;
using integration::ReadFile;
using integration::ShardProcess;
using integration::TempDir;

const std::map<std::string, std::string> kCleanEnv = integration::CleanEnv();

int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

// Check(service) over `channel`; the gRPC status in `*st`.
hv1::HealthCheckResponse::ServingStatus Check(const std::shared_ptr<grpc::Channel>& channel,
                                              const std::string& service, grpc::Status* st) {
  auto stub = hv1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  hv1::HealthCheckRequest req;
  req.set_service(service);
  hv1::HealthCheckResponse resp;
  *st = stub->Check(&ctx, req, &resp);
  return resp.status();
}

TEST(HealthStates, NotServingWhileLoadingThenServingOnTheSamePort) {
  TempDir dir;
  // The demo model, with tokenizer.json replaced by a FIFO: loading stops at it.
  const fs::path model = dir / "model";
  fs::create_directory(model);
  for (const fs::directory_entry& e : fs::directory_iterator(DemoModel())) {
    if (e.path().filename() != "tokenizer.json") {
      fs::create_symlink(e.path(), model / e.path().filename());
    }
  }
  const std::string fifo = (model / "tokenizer.json").string();
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);

  const int port = FreePort();
  ASSERT_GT(port, 0);
  const std::string uds = dir / "s";
  ShardProcess shard(BinaryPath(),
                     {"serve", model.string(), "--uds-path", uds, "--device", "cpu", "--listen-tcp",
                      std::to_string(port)},
                     dir.path(), kCleanEnv);
  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());

  // Loading: the port answers NOT_SERVING (for "" and the LoRAX service), the socket is absent.
  grpc::Status st;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  hv1::HealthCheckResponse::ServingStatus s = hv1::HealthCheckResponse::UNKNOWN;
  while (std::chrono::steady_clock::now() < deadline && shard.running()) {
    s = Check(channel, "", &st);
    if (st.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(st.ok()) << st.error_message() << "\n" << shard.Logs();
  EXPECT_EQ(s, hv1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Check(channel, "generate.v1.LoraxService", &st), hv1::HealthCheckResponse::NOT_SERVING);
  EXPECT_TRUE(st.ok());
  Check(channel, "no.such.Service", &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  {  // Watch: NOT_SERVING, then the stream ends ("watch again").
    auto stub = hv1::Health::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    hv1::HealthCheckRequest req;
    auto reader = stub->Watch(&ctx, req);
    hv1::HealthCheckResponse update;
    ASSERT_TRUE(reader->Read(&update));
    EXPECT_EQ(update.status(), hv1::HealthCheckResponse::NOT_SERVING);
    EXPECT_FALSE(reader->Read(&update));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  EXPECT_FALSE(IsSocket(uds + "-0")) << "the unix socket means ready (spec §1.7)";

  // Let loading go on: write the real tokenizer.json into the FIFO.
  {
    std::ofstream out(fifo, std::ios::binary);
    out << ReadFile(DemoModel() + "/tokenizer.json");
  }
  ASSERT_TRUE(shard.WaitForSocket(uds + "-0", 60)) << shard.Logs();
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  do {
    s = Check(channel, "", &st);
    if (st.ok() && s == hv1::HealthCheckResponse::SERVING) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  } while (std::chrono::steady_clock::now() < deadline);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(s, hv1::HealthCheckResponse::SERVING) << shard.Logs();
  EXPECT_NE(shard.out().find("NOT_SERVING on 127.0.0.1:" + std::to_string(port)), std::string::npos)
      << shard.Logs();

  shard.Signal(SIGTERM);
  EXPECT_EQ(shard.Wait(), 0) << shard.Logs();
}

TEST(HealthStates, ABusyTcpPortFailsStartupBeforeLoading) {
  TempDir dir;
  // Hold the port (bound and listening) so the shard cannot have it.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);
  ShardProcess shard(BinaryPath(),
                     {"serve", DemoModel(), "--uds-path", dir / "s", "--device", "cpu",
                      "--listen-tcp", std::to_string(port), "--json-output"},
                     dir.path(), kCleanEnv);
  EXPECT_EQ(shard.Wait(60), 1) << shard.Logs();
  ::close(fd);
  EXPECT_NE(shard.err().find("--listen-tcp: could not bind"), std::string::npos) << shard.Logs();
  EXPECT_EQ(shard.out().find("Loading "), std::string::npos) << "the port is checked first";
  // gRPC core's own complaint is a JSON line with the rank too (server/grpc_log_sink.h), not
  // gRPC's "E1128 18:52:20.880068018 12332 chttp2_server.cc:1045] ..." format.
  bool grpc_line = false;
  std::istringstream lines(shard.out());
  for (std::string line; std::getline(lines, line);) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(j.is_object()) << "not JSON: " << line;
    EXPECT_EQ(j["record"]["extra"].value("rank", -1), 0) << line;
    const std::string text = j.value("text", "");
    if (text.rfind("grpc ", 0) == 0 && text.find("Address already in use") != std::string::npos) {
      grpc_line = j["record"]["level"].value("name", "") == "ERROR";
    }
  }
  EXPECT_TRUE(grpc_line) << shard.Logs();
  EXPECT_FALSE(std::regex_search(shard.err(), std::regex("(^|\\n)E[0-9]{4} ")))
      << "a raw gRPC log line on stderr:\n"
      << shard.err();
}

}  // namespace
}  // namespace phishard
