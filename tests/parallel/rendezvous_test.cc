// Rendezvous of 2-4 ranks (threads) on 127.0.0.1: the group forms, and every way it cannot form
// (mismatched WORLD_SIZE, duplicate rank, a missing rank, a missing rank 0, bad options, port in
// use) is a clear error on every rank within the timeout.
#include "parallel/rendezvous.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "parallel/tcp_socket.h"
#include "tests/parallel/parallel_test_util.h"

namespace phishard {
namespace {

using ::phishard::testing::FreeLoopbackPort;
using ::phishard::testing::LoopbackOptions;
using ::phishard::testing::RunRanks;
using ::phishard::testing::SecondsSince;
using ::testing::HasSubstr;
using ChannelOr = absl::StatusOr<std::unique_ptr<ControlChannel>>;

class RendezvousWorldTest : public ::testing::TestWithParam<int> {};

TEST_P(RendezvousWorldTest, GroupForms) {
  const int world = GetParam();
  const int port = FreeLoopbackPort();
  auto channels = RunRanks<ChannelOr>(world, [&](int r) {
    // Rank 0 comes last, so the others exercise their connect retries.
    if (r == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    return Rendezvous(LoopbackOptions(r, world, port));
  });
  for (int r = 0; r < world; ++r) {
    ASSERT_TRUE(channels[r].ok()) << channels[r].status();
    const ControlChannel& c = **channels[r];
    EXPECT_EQ(c.rank(), r);
    EXPECT_EQ(c.world_size(), world);
    ASSERT_EQ(c.hostnames().size(), static_cast<size_t>(world));
    // All threads share one host: local rank = rank.
    EXPECT_EQ(c.local_rank(), r);
    EXPECT_EQ(c.local_world_size(), world);
    EXPECT_EQ(c.local_host(), "127.0.0.1");
  }
}

INSTANTIATE_TEST_SUITE_P(Worlds, RendezvousWorldTest, ::testing::Values(2, 4));

TEST(RendezvousTest, WorldOfOneOpensNoSocket) {
  RendezvousOptions o = LoopbackOptions(0, 1, /*port=*/0);  // port 0 would be rejected for W > 1
  auto c = Rendezvous(o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->world_size(), 1);
  EXPECT_EQ((*c)->local_rank(), 0);
}

TEST(RendezvousTest, WorldSizeMismatchIsTheSameErrorOnEveryRank) {
  // Rank 1 has WORLD_SIZE=3, rank 0 has 2.
  const int port = FreeLoopbackPort();
  const int sizes[] = {2, 3};
  const absl::Time start = absl::Now();
  auto channels = RunRanks<ChannelOr>(
      2, [&](int r) { return Rendezvous(LoopbackOptions(r, sizes[r], port, absl::Seconds(10))); });
  EXPECT_LT(SecondsSince(start), 5.0) << "a mismatch must not wait for the timeout";
  for (int r = 0; r < 2; ++r) {
    ASSERT_FALSE(channels[r].ok()) << "rank " << r;
    EXPECT_EQ(channels[r].status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(channels[r].status().message(), HasSubstr(absl::StrCat("rank ", r, ": ")));
    EXPECT_THAT(channels[r].status().message(),
                HasSubstr("WORLD_SIZE mismatch: rank 1 has WORLD_SIZE=3 but rank 0 has "
                          "WORLD_SIZE=2"));
  }
}

TEST(RendezvousTest, MismatchReachesRanksThatAlreadyJoined) {
  // Ranks 1 and 2 agree with rank 0 (W=4); rank 3 says W=5. Ranks 1 and 2 joined first and must
  // hear the reason too.
  const int port = FreeLoopbackPort();
  const int sizes[] = {4, 4, 4, 5};
  auto channels = RunRanks<ChannelOr>(4, [&](int r) {
    if (r == 3) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    return Rendezvous(LoopbackOptions(r, sizes[r], port, absl::Seconds(10)));
  });
  for (int r = 0; r < 4; ++r) {
    ASSERT_FALSE(channels[r].ok()) << "rank " << r;
    EXPECT_EQ(channels[r].status().code(), absl::StatusCode::kFailedPrecondition) << r;
    EXPECT_THAT(channels[r].status().message(), HasSubstr("rank 3 has WORLD_SIZE=5")) << r;
  }
}

TEST(RendezvousTest, TwoProcessesWithOneRankFailEverywhere) {
  const int port = FreeLoopbackPort();
  const int ranks[] = {0, 1, 1};
  auto channels = RunRanks<ChannelOr>(3, [&](int i) {
    if (i == 2) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    return Rendezvous(LoopbackOptions(ranks[i], 3, port, absl::Seconds(10)));
  });
  for (int i = 0; i < 3; ++i) {
    ASSERT_FALSE(channels[i].ok()) << i;
    EXPECT_THAT(channels[i].status().message(), HasSubstr("two processes claim RANK=1")) << i;
  }
}

TEST(RendezvousTest, MissingRankIsReportedByRankZeroToEveryone) {
  const int port = FreeLoopbackPort();
  const absl::Duration timeout = absl::Seconds(1);
  const absl::Time start = absl::Now();
  // World of 3, rank 2 never starts.
  auto channels = RunRanks<ChannelOr>(
      2, [&](int r) { return Rendezvous(LoopbackOptions(r, 3, port, timeout)); });
  const double took = SecondsSince(start);
  EXPECT_GE(took, 0.9);
  EXPECT_LT(took, 1.0 + 0.25 + 1.0) << "timeout plus the peers' grace plus slack";
  for (int r = 0; r < 2; ++r) {
    ASSERT_FALSE(channels[r].ok()) << r;
    EXPECT_EQ(channels[r].status().code(), absl::StatusCode::kDeadlineExceeded) << r;
    EXPECT_THAT(channels[r].status().message(), HasSubstr("rank 2 never came")) << r;
    EXPECT_THAT(channels[r].status().message(),
                HasSubstr(absl::StrCat("MASTER_ADDR=127.0.0.1 MASTER_PORT=", port)));
  }
}

TEST(RendezvousTest, MissingRankZeroTimesOutWithTheAddress) {
  const int port = FreeLoopbackPort();
  const absl::Time start = absl::Now();
  auto c = Rendezvous(LoopbackOptions(1, 2, port, absl::Milliseconds(500)));
  const double took = SecondsSince(start);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(c.status().message(),
              HasSubstr(absl::StrCat("rank 1: peer rank 0 never came (MASTER_ADDR=127.0.0.1 "
                                     "MASTER_PORT=",
                                     port, ", waited 0.5 s")));
  EXPECT_THAT(c.status().message(), HasSubstr("Connection refused"));
  EXPECT_GE(took, 0.45);
  EXPECT_LT(took, 2.0);
}

TEST(RendezvousTest, BadOptionsNameTheVariable) {
  auto bad_rank = Rendezvous(LoopbackOptions(2, 2, 29500));
  EXPECT_EQ(bad_rank.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_rank.status().message(), HasSubstr("RANK must be in [0, WORLD_SIZE=2), got 2"));
  auto bad_world = Rendezvous(LoopbackOptions(0, 0, 29500));
  EXPECT_THAT(bad_world.status().message(), HasSubstr("WORLD_SIZE must be >= 1"));
  auto bad_port = Rendezvous(LoopbackOptions(0, 2, 70000));
  EXPECT_THAT(bad_port.status().message(), HasSubstr("MASTER_PORT must be in [1, 65535]"));
  RendezvousOptions no_addr = LoopbackOptions(1, 2, 29500);
  no_addr.master_addr = "";
  EXPECT_THAT(Rendezvous(no_addr).status().message(), HasSubstr("MASTER_ADDR is empty"));
}

TEST(RendezvousTest, PortInUseIsAnErrorOnRankZero) {
  auto taken = TcpListener::Listen("127.0.0.1", 0);
  ASSERT_TRUE(taken.ok()) << taken.status();
  auto c = Rendezvous(LoopbackOptions(0, 2, (*taken)->port(), absl::Seconds(5)));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(c.status().message(), HasSubstr("rank 0: cannot listen"));
  EXPECT_THAT(c.status().message(), HasSubstr("Address already in use"));
}

TEST(RendezvousTest, StrayConnectionsDoNotBreakTheGroup) {
  const int port = FreeLoopbackPort();
  std::thread stray([&] {
    // Something that is not a shard: it connects and speaks HTTP.
    auto conn = ConnectWithRetry("127.0.0.1", port, absl::Now() + absl::Seconds(10));
    if (!conn.ok()) return;
    const char req[] = "GET / HTTP/1.1\r\n\r\n";
    ::send((*conn)->fd(), req, sizeof(req) - 1, MSG_NOSIGNAL);
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  });
  auto channels = RunRanks<ChannelOr>(2, [&](int r) {
    if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    return Rendezvous(LoopbackOptions(r, 2, port, absl::Seconds(10)));
  });
  stray.join();
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(channels[r].ok()) << channels[r].status();
}

}  // namespace
}  // namespace phishard
