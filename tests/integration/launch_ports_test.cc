// `phishard launch --num-shard 2` with --listen-tcp and --metrics-addr: `launch` hands every serve
// flag to every rank, so the ports given are rank 0's and rank r binds PORT + r (each rank is its
// own gRPC and HTTP server). Both ranks answer over TCP, each as itself (ServiceDiscovery from
// either lists both sockets; Prometheus says rank="r").
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <regex>
#include <string>

#include "gtest/gtest.h"
#include "server/client.h"
#include "tests/integration/shard_process.h"
#include "tests/server/prom_text_test_util.h"

namespace phishard {
namespace {

using integration::BinaryPath;
using integration::DemoModel;
using integration::ShardProcess;
using integration::TempDir;
using ::phishard::testing::HttpGet;
using ::phishard::testing::ParsePromText;

const std::map<std::string, std::string> kCleanEnv = integration::CleanEnv();

// A port P such that P and P + 1 are free on 127.0.0.1 right now (both bound, then released).
int TwoFreePorts() {
  for (int attempt = 0; attempt < 50; ++attempt) {
    const int a = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (::bind(a, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        ::getsockname(a, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ::close(a);
      continue;
    }
    const int port = ntohs(addr.sin_port);
    const int b = ::socket(AF_INET, SOCK_STREAM, 0);
    addr.sin_port = htons(static_cast<uint16_t>(port + 1));
    const bool ok =
        port < 65535 && ::bind(b, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    ::close(a);
    ::close(b);
    if (ok) return port;
  }
  return 0;
}

TEST(LaunchPorts, EachRankListensOnTheBasePortPlusItsRank) {
  const int grpc_port = TwoFreePorts();
  const int metrics_port = TwoFreePorts();
  ASSERT_GT(grpc_port, 0);
  ASSERT_GT(metrics_port, 0);
  TempDir dir;
  const std::string uds = dir / "s";
  ShardProcess launch(BinaryPath(),
                      {"launch", "--num-shard", "2", "--uds-path", uds, DemoModel(), "--device",
                       "cpu", "--listen-tcp", std::to_string(grpc_port), "--metrics-addr",
                       "127.0.0.1:" + std::to_string(metrics_port)},
                      dir.path(), kCleanEnv);
  ASSERT_TRUE(launch.WaitForSocket(uds + "-0", 120) && launch.WaitForSocket(uds + "-1", 120))
      << launch.Logs();

  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    auto client = ShardClient::Connect("127.0.0.1:" + std::to_string(grpc_port + rank), 30);
    ASSERT_NE(client, nullptr);
    EXPECT_TRUE(client->Health().ok());
    absl::StatusOr<std::vector<std::string>> urls = client->ServiceDiscovery();
    ASSERT_TRUE(urls.ok()) << urls.status();
    EXPECT_EQ(*urls, (std::vector<std::string>{"unix://" + uds + "-0", "unix://" + uds + "-1"}));
    std::string status;
    const std::string metrics = HttpGet(metrics_port + rank, "/metrics", &status);
    ASSERT_FALSE(metrics.empty()) << status;
    EXPECT_EQ(ParsePromText(metrics).Value("phishard_health_state", "phishard_health_state",
                                           {{"rank", std::to_string(rank)}}),
              1)
        << metrics;
  }
  const std::string out = launch.out();
  EXPECT_NE(out.find("and 127.0.0.1:" + std::to_string(grpc_port + 1)), std::string::npos) << out;

  launch.Signal(SIGTERM);
  EXPECT_EQ(launch.Wait(), 0) << launch.Logs();
}

TEST(LaunchPorts, ARankPortAbove65535IsRefusedNamingTheFlag) {
  TempDir dir;
  ShardProcess launch(BinaryPath(),
                      {"launch", "--num-shard", "2", "--uds-path", dir / "s", DemoModel(),
                       "--device", "cpu", "--listen-tcp", "65535"},
                      dir.path(), kCleanEnv);
  EXPECT_EQ(launch.Wait(120), 1) << launch.Logs();
  EXPECT_NE(launch.err().find("--listen-tcp: port 65535 + rank 1 is above 65535"),
            std::string::npos)
      << launch.Logs();
}

}  // namespace
}  // namespace phishard
