// Control channel between ranks (threads) on 127.0.0.1: ordered delivery, timeouts that lose
// nothing, peers going away, Close() from another thread, and the rank-0 sequencer handshake that
// makes an RPC reaching only some ranks fail on all of them in bounded time.
#include "parallel/control_channel.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "parallel/rendezvous.h"
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

std::vector<std::unique_ptr<ControlChannel>> MakeGroup(int world) {
  const int port = FreeLoopbackPort();
  auto ors = RunRanks<ChannelOr>(
      world, [&](int r) { return Rendezvous(LoopbackOptions(r, world, port)); });
  std::vector<std::unique_ptr<ControlChannel>> out;
  for (auto& c : ors) {
    EXPECT_TRUE(c.ok()) << c.status();
    out.push_back(c.ok() ? std::move(*c) : nullptr);
  }
  return out;
}

TEST(ControlChannelTest, BroadcastArrivesInOrderOnEveryRank) {
  const int world = 4;
  auto group = MakeGroup(world);
  ASSERT_NE(group[world - 1], nullptr);
  const int n = 200;
  auto received = RunRanks<std::vector<std::string>>(world, [&](int r) {
    std::vector<std::string> got;
    for (int i = 0; i < n; ++i) {
      if (r == 0) {
        EXPECT_TRUE(group[0]->BroadcastFromRoot(absl::StrCat("Decode ", i)).ok());
      } else {
        auto m = group[r]->ReceiveFromRoot(absl::Seconds(10));
        EXPECT_TRUE(m.ok()) << m.status();
        got.push_back(m.ok() ? *m : "");
      }
    }
    return got;
  });
  for (int r = 1; r < world; ++r) {
    ASSERT_EQ(received[r].size(), static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) EXPECT_EQ(received[r][i], absl::StrCat("Decode ", i)) << r;
  }
}

TEST(ControlChannelTest, GatherReturnsEveryRanksMessageByRank) {
  const int world = 4;
  auto group = MakeGroup(world);
  ASSERT_NE(group[world - 1], nullptr);
  for (int round = 0; round < 3; ++round) {
    auto gathered = RunRanks<std::vector<std::string>>(world, [&](int r) {
      if (r != 0) {
        EXPECT_TRUE(group[r]->SendToRoot(absl::StrCat("rank ", r, " round ", round)).ok());
        return std::vector<std::string>();
      }
      auto all = group[0]->GatherToRoot(absl::Seconds(10));
      EXPECT_TRUE(all.ok()) << all.status();
      return all.ok() ? *all : std::vector<std::string>();
    });
    ASSERT_EQ(gathered[0].size(), static_cast<size_t>(world));
    EXPECT_EQ(gathered[0][0], "");
    for (int r = 1; r < world; ++r) {
      EXPECT_EQ(gathered[0][r], absl::StrCat("rank ", r, " round ", round));
    }
  }
}

TEST(ControlChannelTest, TimeoutLosesNothing) {
  auto group = MakeGroup(2);
  ASSERT_NE(group[1], nullptr);
  absl::Time start = absl::Now();
  auto none = group[1]->ReceiveFromRoot(absl::Milliseconds(200));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(SecondsSince(start), 0.19);
  EXPECT_LT(SecondsSince(start), 1.0);
  ASSERT_TRUE(group[0]->BroadcastFromRoot("after a timeout").ok());
  auto m = group[1]->ReceiveFromRoot(absl::Seconds(5));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(*m, "after a timeout");
}

// A message that is only half there when the receiver's deadline passes must come out whole on
// the next call. Rank 0's end is a raw socket here, so the test decides where the message breaks.
TEST(ControlChannelTest, MessageCutByTheDeadlineArrivesWholeLater) {
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
  std::vector<std::unique_ptr<TcpConnection>> peers(2);
  peers[0] = std::make_unique<TcpConnection>(fds[0]);
  ControlChannel rank1(1, 2, {"h", "h"}, "127.0.0.1", std::move(peers));
  const int root_end = fds[1];

  std::string payload(100000, '\0');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 131 + 7);
  std::string wire = {static_cast<char>(ControlFrame::kMessage), 0, 0, 0};
  WireAppendU32(&wire, static_cast<uint32_t>(payload.size()));
  wire += payload;
  wire += wire;  // the same message twice, back to back
  const size_t first_end = wire.size() / 2;

  std::thread writer([&] {
    // Cuts: inside the first header, twice inside the first payload, across both messages.
    for (size_t from = 0;
         size_t cut : {size_t{3}, size_t{30000}, size_t{80000}, first_end + 6, wire.size()}) {
      for (size_t done = from; done < cut;) {
        ssize_t n = ::send(root_end, wire.data() + done, cut - done, MSG_NOSIGNAL);
        if (n <= 0) return;
        done += static_cast<size_t>(n);
      }
      from = cut;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  int timeouts = 0;
  std::vector<std::string> got;
  while (got.size() < 2 && timeouts < 1000) {
    auto m = rank1.ReceiveFromRoot(absl::Milliseconds(5));
    if (absl::IsDeadlineExceeded(m.status())) {
      ++timeouts;
      continue;
    }
    if (!m.ok()) {
      ADD_FAILURE() << m.status();
      rank1.Close();  // unblocks the writer
      break;
    }
    got.push_back(*m);
  }
  writer.join();
  ::close(root_end);
  EXPECT_GE(timeouts, 3) << "every cut should have cost the receiver a timeout";
  ASSERT_EQ(got.size(), 2u);
  EXPECT_TRUE(got[0] == payload) << "first message corrupted";
  EXPECT_TRUE(got[1] == payload) << "second message corrupted";
}

TEST(ControlChannelTest, GatherTimeoutNamesSilentRanksAndKeepsTheOthersReplies) {
  const int world = 3;
  auto group = MakeGroup(world);
  ASSERT_NE(group[2], nullptr);
  ASSERT_TRUE(group[1]->SendToRoot("one").ok());
  auto partial = group[0]->GatherToRoot(absl::Milliseconds(300));
  EXPECT_EQ(partial.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(partial.status().message(), HasSubstr("rank 0: no message from rank 2"));
  // Rank 2 answers late; rank 1's earlier reply was kept for the next gather.
  ASSERT_TRUE(group[2]->SendToRoot("two").ok());
  auto all = group[0]->GatherToRoot(absl::Seconds(5));
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ((*all)[1], "one");
  EXPECT_EQ((*all)[2], "two");
}

TEST(ControlChannelTest, PeerGoneIsUnavailableNamingThePeer) {
  auto group = MakeGroup(3);
  ASSERT_NE(group[2], nullptr);
  group[2].reset();  // rank 2's process "dies": its sockets close
  absl::Time start = absl::Now();
  auto all = group[0]->GatherToRoot(absl::Seconds(20));
  EXPECT_LT(SecondsSince(start), 2.0) << "a closed peer must not wait for the timeout";
  EXPECT_EQ(all.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(all.status().message(), HasSubstr("control channel to rank 2"));

  // Rank 0 goes away: rank 1 learns at once.
  group[0].reset();
  start = absl::Now();
  auto m = group[1]->ReceiveFromRoot(absl::Seconds(20));
  EXPECT_LT(SecondsSince(start), 2.0);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr("rank 1: control channel to rank 0"));
  // ... and for good.
  EXPECT_EQ(group[1]->ReceiveFromRoot(absl::Seconds(1)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(ControlChannelTest, CloseWakesABlockedReceiver) {
  auto group = MakeGroup(2);
  ASSERT_NE(group[1], nullptr);
  absl::Time start = absl::Now();
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    group[1]->Close();
  });
  auto m = group[1]->ReceiveFromRoot(absl::Seconds(20));
  closer.join();
  EXPECT_LT(SecondsSince(start), 2.0);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr("closed"));
  // Rank 0 sees its peer's channel close.
  auto g = group[0]->GatherToRoot(absl::Seconds(20));
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnavailable);
}

TEST(ControlChannelTest, RootOnlyAndPeerOnlyCallsAreChecked) {
  auto group = MakeGroup(2);
  ASSERT_NE(group[1], nullptr);
  EXPECT_EQ(group[0]->ReceiveFromRoot(absl::Milliseconds(1)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(group[0]->SendToRoot("x").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(group[1]->BroadcastFromRoot("x").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(group[1]->GatherToRoot(absl::Milliseconds(1)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ControlChannelTest, AllGatherAndBroadcastBlob) {
  const int world = 4;
  auto group = MakeGroup(world);
  ASSERT_NE(group[world - 1], nullptr);
  auto all = RunRanks<std::vector<std::string>>(world, [&](int r) {
    auto g = group[r]->AllGather(std::string(r * 3, static_cast<char>('a' + r)), absl::Seconds(10));
    EXPECT_TRUE(g.ok()) << g.status();
    auto b = group[r]->BroadcastBlob(r == 0 ? "unique-id" : "ignored", absl::Seconds(10));
    EXPECT_TRUE(b.ok()) << b.status();
    std::vector<std::string> out = g.ok() ? *g : std::vector<std::string>();
    out.push_back(b.ok() ? *b : "");
    return out;
  });
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(all[r].size(), static_cast<size_t>(world + 1)) << r;
    for (int k = 0; k < world; ++k) EXPECT_EQ(all[r][k], std::string(k * 3, 'a' + k));
    EXPECT_EQ(all[r][world], "unique-id");
  }
}

TEST(ControlChannelTest, FrameTypeMismatchIsReportedNotMisread) {
  auto group = MakeGroup(2);
  ASSERT_NE(group[1], nullptr);
  // Rank 0 sends a user message where rank 1 expects a set-up blob.
  ASSERT_TRUE(group[0]->BroadcastFromRoot("Prefill 3").ok());
  auto b = group[1]->BroadcastBlob("", absl::Seconds(5));
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(b.status().message(), HasSubstr("out of sync"));
}

// The sequencer handshake from control_channel.h, as the server would run it: rank 0 announces
// each collective RPC, the others confirm that they have it. "Decode 8" reaches rank 0 and rank 1
// but never rank 2, so every rank must give up on it within about two waits, not hang.
TEST(ControlChannelTest, SequencerFailsAnRpcThatReachedOnlySomeRanks) {
  const int world = 3;
  auto group = MakeGroup(world);
  ASSERT_NE(group[world - 1], nullptr);
  const absl::Duration wait = absl::Milliseconds(300);
  const std::vector<std::vector<std::string>> arrived = {
      {"Decode 7", "Decode 8"}, {"Decode 8", "Decode 7"}, {"Decode 7"}};
  const absl::Time start = absl::Now();
  auto outcome = RunRanks<std::vector<std::string>>(world, [&](int r) {
    std::vector<std::string> log;
    ControlChannel& c = *group[r];
    for (int step = 0; step < 2; ++step) {
      std::string id, verdict;
      if (r == 0) {
        id = arrived[0][step];  // rank 0's arrival order is the order
        EXPECT_TRUE(c.BroadcastFromRoot(id).ok());
        auto replies = c.GatherToRoot(2 * wait);
        bool all_ok = replies.ok();
        for (int k = 1; all_ok && k < world; ++k) all_ok = (*replies)[k] == "ok";
        verdict = all_ok ? "go" : "abort";
        EXPECT_TRUE(c.BroadcastFromRoot(verdict).ok());
      } else {
        auto next = c.ReceiveFromRoot(absl::Seconds(5));
        EXPECT_TRUE(next.ok()) << next.status();
        id = *next;
        // "Wait up to `wait` for our own copy of the RPC": here it either arrived or never will.
        const auto& mine = arrived[r];
        bool have = std::find(mine.begin(), mine.end(), id) != mine.end();
        if (!have) std::this_thread::sleep_for(absl::ToChronoMilliseconds(wait));
        EXPECT_TRUE(c.SendToRoot(have ? "ok" : "missing").ok());
        auto v = c.ReceiveFromRoot(absl::Seconds(5));
        EXPECT_TRUE(v.ok()) << v.status();
        verdict = *v;
      }
      log.push_back(absl::StrCat(id, ":", verdict));
    }
    return log;
  });
  EXPECT_LT(SecondsSince(start), 3.0);
  for (int r = 0; r < world; ++r) {
    EXPECT_THAT(outcome[r], ::testing::ElementsAre("Decode 7:go", "Decode 8:abort")) << r;
  }
}

}  // namespace
}  // namespace phishard
