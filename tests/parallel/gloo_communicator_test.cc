// GlooCommunicator with 2 and 4 ranks (threads, or a forked process where one must die) on
// 127.0.0.1: collectives give exact results for 1, 7 and 1<<20 floats, and a missing, aborted or
// dead rank makes the others' pending collective fail in bounded time instead of hanging.
//
// Exactness: every value is a small integer (< 2^24), so float sums are exact whatever order Gloo
// adds in, and the tests compare with ==.
#include "parallel/gloo_communicator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "parallel/rendezvous.h"
#include "tests/parallel/parallel_test_util.h"

namespace phishard {
namespace {

using ::phishard::testing::FreeLoopbackPort;
using ::phishard::testing::LoopbackOptions;
using ::phishard::testing::RunRanks;
using ::phishard::testing::SecondsSince;
using ::testing::HasSubstr;

struct Rank {
  std::unique_ptr<ControlChannel> control;
  std::unique_ptr<GlooCommunicator> comm;
};

// Connects `world` ranks; each thread keeps its own rank's objects.
std::vector<Rank> MakeGroup(int world, absl::Duration op_timeout = absl::Seconds(30)) {
  const int port = FreeLoopbackPort();
  return RunRanks<Rank>(world, [&](int r) {
    Rank out;
    auto control = Rendezvous(LoopbackOptions(r, world, port));
    EXPECT_TRUE(control.ok()) << control.status();
    if (!control.ok()) return out;
    out.control = std::move(*control);
    auto comm = GlooCommunicator::Create(*out.control, absl::Seconds(20), op_timeout);
    EXPECT_TRUE(comm.ok()) << comm.status();
    if (comm.ok()) out.comm = std::move(*comm);
    return out;
  });
}

bool AllReady(const std::vector<Rank>& group) {
  for (const Rank& r : group) {
    if (r.comm == nullptr) return false;
  }
  return true;
}

float Value(int rank, size_t i) {
  return static_cast<float>((rank + 1) * (static_cast<int>(i % 97) + 1));
}

class GlooCollectivesTest : public ::testing::TestWithParam<std::tuple<int, size_t>> {};

TEST_P(GlooCollectivesTest, AllReduceAllGatherBroadcastBarrier) {
  const auto [world, count] = GetParam();
  auto group = MakeGroup(world);
  ASSERT_TRUE(AllReady(group));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto ok = RunRanks<bool>(world, [&, world = world, count = count](int r) {
    GlooCommunicator& comm = *group[r].comm;
    EXPECT_EQ(comm.rank(), r);
    EXPECT_EQ(comm.world_size(), world);
    EXPECT_EQ(comm.memory_space(), MemorySpace::kHost);
    bool good = true;

    // All-reduce: sum over ranks of (rank+1) * k = k * W(W+1)/2.
    std::vector<float> data(count);
    for (size_t i = 0; i < count; ++i) data[i] = Value(r, i);
    absl::Status s = comm.AllReduceSum(data.data(), count);
    EXPECT_TRUE(s.ok()) << s;
    const float ranks_sum = static_cast<float>(world * (world + 1) / 2);
    for (size_t i = 0; i < count && good; ++i) {
      good = data[i] == ranks_sum * static_cast<float>(i % 97 + 1);
      EXPECT_TRUE(good) << "all-reduce rank " << r << " i " << i << " got " << data[i];
    }

    // All-gather, out of place, output poisoned with NaN: rank k's block is rank k's input.
    std::vector<float> send(count), recv(world * count, nan);
    for (size_t i = 0; i < count; ++i) send[i] = Value(r, i);
    s = comm.AllGather(send.data(), recv.data(), count);
    EXPECT_TRUE(s.ok()) << s;
    for (int k = 0; k < world && good; ++k) {
      for (size_t i = 0; i < count && good; ++i) {
        good = recv[k * count + i] == Value(k, i);
        EXPECT_TRUE(good) << "all-gather rank " << r << " block " << k << " i " << i;
      }
    }

    // All-gather in place: our input already sits in our block.
    std::vector<float> inplace(world * count, nan);
    for (size_t i = 0; i < count; ++i) inplace[r * count + i] = Value(r, i) + 1;
    s = comm.AllGather(inplace.data() + r * count, inplace.data(), count);
    EXPECT_TRUE(s.ok()) << s;
    for (int k = 0; k < world && good; ++k) {
      for (size_t i = 0; i < count && good; ++i) {
        good = inplace[k * count + i] == Value(k, i) + 1;
        EXPECT_TRUE(good) << "in-place all-gather rank " << r << " block " << k << " i " << i;
      }
    }

    // Broadcast from every root, of an odd number of bytes.
    const size_t bytes = count * sizeof(float) - (count > 1 ? 1 : 0);
    for (int root = 0; root < world; ++root) {
      std::vector<unsigned char> buf(bytes, 0xEE);
      if (r == root) {
        for (size_t i = 0; i < bytes; ++i) buf[i] = static_cast<unsigned char>(i * 7 + root);
      }
      s = comm.Broadcast(buf.data(), bytes, root);
      EXPECT_TRUE(s.ok()) << s;
      for (size_t i = 0; i < bytes && good; ++i) {
        good = buf[i] == static_cast<unsigned char>(i * 7 + root);
        EXPECT_TRUE(good) << "broadcast root " << root << " rank " << r << " byte " << i;
      }
    }

    s = comm.Barrier();
    EXPECT_TRUE(s.ok()) << s;
    return good && s.ok();
  });
  for (int r = 0; r < world; ++r) EXPECT_TRUE(ok[r]) << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(WorldsAndSizes, GlooCollectivesTest,
                         ::testing::Combine(::testing::Values(2, 4),
                                            ::testing::Values(size_t{1}, size_t{7},
                                                              size_t{1} << 20)),
                         [](const auto& info) {
                           return absl::StrCat("world", std::get<0>(info.param), "_count",
                                               std::get<1>(info.param));
                         });

TEST(GlooCommunicatorTest, BarrierHoldsEveryoneUntilTheLastArrives) {
  const int world = 4;
  auto group = MakeGroup(world);
  ASSERT_TRUE(AllReady(group));
  const absl::Time start = absl::Now();
  auto times = RunRanks<std::pair<double, double>>(world, [&](int r) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100 * r));
    double entered = SecondsSince(start);
    EXPECT_TRUE(group[r].comm->Barrier().ok());
    return std::make_pair(entered, SecondsSince(start));
  });
  const double last_entry = times[world - 1].first;
  for (int r = 0; r < world; ++r) {
    EXPECT_GE(times[r].second, last_entry) << "rank " << r << " left the barrier early";
  }
}

TEST(GlooCommunicatorTest, CollectivesRepeatWithoutCrosstalk) {
  // Many small all-reduces back to back: each result must belong to its own round.
  const int world = 2;
  auto group = MakeGroup(world);
  ASSERT_TRUE(AllReady(group));
  auto ok = RunRanks<bool>(world, [&](int r) {
    for (int round = 0; round < 200; ++round) {
      float v[3] = {float(round), float(r), 1.0f};
      if (!group[r].comm->AllReduceSum(v, 3).ok()) return false;
      if (v[0] != 2.0f * round || v[1] != 1.0f || v[2] != 2.0f) return false;
    }
    return true;
  });
  EXPECT_TRUE(ok[0]);
  EXPECT_TRUE(ok[1]);
}

TEST(GlooCommunicatorTest, RankThatNeverJoinsIsADeadlineNotAHang) {
  const int world = 2;
  auto group = MakeGroup(world, /*op_timeout=*/absl::Milliseconds(500));
  ASSERT_TRUE(AllReady(group));
  float x = 1;
  const absl::Time start = absl::Now();
  absl::Status s = group[0].comm->AllReduceSum(&x, 1);  // rank 1 never calls
  const double took = SecondsSince(start);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_THAT(s.message(), HasSubstr("rank 0: Gloo all-reduce of 1 floats failed"));
  EXPECT_GE(took, 0.4);
  EXPECT_LT(took, 3.0);
  // The failed communicator tore itself down; later calls fail at once.
  EXPECT_EQ(group[0].comm->Barrier().code(), absl::StatusCode::kAborted);
  // ... and so does the peer's next collective. Usually at once (rank 0 shut its sockets), but
  // Gloo 0.5 does not fail an unbound send still queued on a pair when the pair breaks, so in an
  // unlucky interleaving the peer only gives up at its own op timeout (0.5 s): allow that.
  const absl::Time peer_start = absl::Now();
  absl::Status peer = group[1].comm->AllReduceSum(&x, 1);
  EXPECT_FALSE(peer.ok());
  EXPECT_LT(SecondsSince(peer_start), 2.0) << peer;
}

TEST(GlooCommunicatorTest, AbortOnOneRankFailsTheOthersPendingCollectives) {
  const int world = 4;
  auto group = MakeGroup(world, /*op_timeout=*/absl::Seconds(30));
  ASSERT_TRUE(AllReady(group));
  const absl::Time start = absl::Now();
  auto results = RunRanks<absl::Status>(world, [&](int r) {
    if (r == 3) {
      // Rank 3 never joins; it aborts while the others wait for it.
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      group[r].comm->Abort("test: rank 3 shuts down");
      float y = 0;
      return group[r].comm->AllReduceSum(&y, 1);
    }
    std::vector<float> v(1000, 1.0f);
    return group[r].comm->AllReduceSum(v.data(), v.size());
  });
  const double took = SecondsSince(start);
  EXPECT_LT(took, 5.0) << "pending collectives must fail long before the 30 s op timeout";
  EXPECT_EQ(results[3].code(), absl::StatusCode::kAborted);
  EXPECT_THAT(results[3].message(), HasSubstr("test: rank 3 shuts down"));
  for (int r = 0; r < 3; ++r) {
    EXPECT_FALSE(results[r].ok()) << "rank " << r;
    EXPECT_NE(results[r].code(), absl::StatusCode::kDeadlineExceeded) << results[r];
  }
}

TEST(GlooCommunicatorTest, AbortFromAnotherThreadEndsOwnPendingCollective) {
  const int world = 2;
  auto group = MakeGroup(world, /*op_timeout=*/absl::Seconds(30));
  ASSERT_TRUE(AllReady(group));
  std::thread aborter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    group[0].comm->Abort("server shutting down");
  });
  const absl::Time start = absl::Now();
  float x = 1;
  absl::Status s = group[0].comm->AllReduceSum(&x, 1);  // rank 1 never joins
  aborter.join();
  EXPECT_LT(SecondsSince(start), 5.0);
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_THAT(s.message(), HasSubstr("server shutting down"));
  // Rank 1 learns through the closed connections.
  absl::Status peer = group[1].comm->AllReduceSum(&x, 1);
  EXPECT_FALSE(peer.ok());
}

TEST(GlooCommunicatorTest, BadArgumentsAreRejected) {
  auto group = MakeGroup(2);
  ASSERT_TRUE(AllReady(group));
  std::vector<float> buf(8);
  // send overlaps recv but is not this rank's block.
  EXPECT_EQ(group[0].comm->AllGather(buf.data() + 1, buf.data(), 4).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(group[0].comm->Broadcast(buf.data(), 4, 2).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(group[0].comm->Broadcast(buf.data(), 4, -1).code(), absl::StatusCode::kInvalidArgument);
  // Rejected arguments do not poison the communicator.
  auto ok = RunRanks<bool>(2, [&](int r) { return group[r].comm->Barrier().ok(); });
  EXPECT_TRUE(ok[0] && ok[1]);
}

// A rank whose process is killed (SIGKILL: no goodbye) while rank 0 waits in an all-reduce.
TEST(GlooCommunicatorTest, KilledPeerProcessFailsPendingCollective) {
  const int port = FreeLoopbackPort();
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto control = Rendezvous(LoopbackOptions(1, 2, port));
    if (!control.ok()) _exit(2);
    auto comm = GlooCommunicator::Create(**control, absl::Seconds(20), absl::Seconds(30));
    if (!comm.ok()) _exit(3);
    for (;;) pause();  // never joins a collective; the parent kills us
  }
  auto control = Rendezvous(LoopbackOptions(0, 2, port));
  ASSERT_TRUE(control.ok()) << control.status();
  auto comm = GlooCommunicator::Create(**control, absl::Seconds(20), absl::Seconds(30));
  ASSERT_TRUE(comm.ok()) << comm.status();
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    kill(child, SIGKILL);
  });
  const absl::Time start = absl::Now();
  std::vector<float> v(4096, 1.0f);
  absl::Status s = (*comm)->AllReduceSum(v.data(), v.size());
  killer.join();
  int wstatus = 0;
  waitpid(child, &wstatus, 0);
  EXPECT_TRUE(WIFSIGNALED(wstatus)) << "child exited early with " << WEXITSTATUS(wstatus);
  EXPECT_LT(SecondsSince(start), 5.0) << "a dead peer must not cost the 30 s op timeout";
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(s.message(), HasSubstr("rank 0: Gloo all-reduce"));
}

}  // namespace
}  // namespace phishard
