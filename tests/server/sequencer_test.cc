// RpcSequencer (server/sequencer.h) over real control channels on 127.0.0.1, ranks as threads,
// each with its own SerialExecutor: RPCs that arrive in different orders run in rank 0's order on
// every rank; an RPC that reaches only some ranks, or differs between them, runs nowhere and fails
// after about the timeout; identical failures keep the group, a failure on some ranks only breaks
// it on every rank; shutdown fails what has not started.
#include "server/sequencer.h"

#include <gtest/gtest.h>

#include <atomic>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "parallel/rendezvous.h"
#include "server/lorax_service.h"
#include "tests/parallel/parallel_test_util.h"

namespace phishard {
namespace {

using Clock = std::chrono::steady_clock;
constexpr absl::Duration kTimeout = absl::Milliseconds(600);

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// One rank: channel, executor, sequencer, and what ran there in which order.
struct Rank {
  std::unique_ptr<ControlChannel> channel;
  std::unique_ptr<SerialExecutor> executor;
  std::unique_ptr<RpcSequencer> sequencer;
  std::mutex mu;
  std::vector<std::string> ran;
  std::string broken;  // on_broken's reason
  absl::Notification broken_seen;
};

class Group {
 public:
  explicit Group(int world) : ranks_(world) {
    const int port = testing::FreeLoopbackPort();
    auto channels = testing::RunRanks<absl::StatusOr<std::unique_ptr<ControlChannel>>>(
        world, [&](int r) { return Rendezvous(testing::LoopbackOptions(r, world, port)); });
    for (int r = 0; r < world; ++r) {
      EXPECT_TRUE(channels[r].ok()) << channels[r].status();
      ranks_[r] = std::make_unique<Rank>();
      Rank* k = ranks_[r].get();
      k->channel = std::move(*channels[r]);
      k->executor = std::make_unique<SerialExecutor>();
      k->sequencer = std::make_unique<RpcSequencer>(
          k->channel.get(), SequencerOptions{.timeout = kTimeout}, [k](const std::string& why) {
            {
              std::lock_guard<std::mutex> lock(k->mu);
              k->broken = why;
            }
            k->sequencer->Break(why);
            k->channel->Close();  // what ShardGroup does: the peers notice
            if (!k->broken_seen.HasBeenNotified()) k->broken_seen.Notify();
          });
      k->sequencer->Start([k](std::function<void()> work, std::function<void()> then) {
        return k->executor->Submit(std::move(work), std::move(then));
      });
    }
  }
  ~Group() {
    for (auto& k : ranks_) k->sequencer->Stop();
    for (auto& k : ranks_) k->executor->Stop();
    for (auto& k : ranks_) k->channel->Close();
  }
  Rank& rank(int r) { return *ranks_[r]; }
  int size() const { return static_cast<int>(ranks_.size()); }

  // Admits `id` on rank r; `fails` makes its run return INVALID_ARGUMENT. The returned
  // notification fires with the call's final status.
  struct Pending {
    absl::Notification done;
    absl::Status status;
  };
  std::shared_ptr<Pending> Admit(int r, const std::string& id, uint64_t digest = 1,
                                 bool fails = false) {
    auto p = std::make_shared<Pending>();
    Rank* k = ranks_[r].get();
    k->sequencer->Admit(RpcSequencer::Call{
        .id = id,
        .digest = digest,
        .run =
            [k, id, fails] {
              std::lock_guard<std::mutex> lock(k->mu);
              k->ran.push_back(id);
              return fails ? absl::InvalidArgumentError("bad request") : absl::OkStatus();
            },
        .finish =
            [p](absl::Status st) {
              p->status = std::move(st);
              p->done.Notify();
            }});
    return p;
  }
  std::vector<std::string> Ran(int r) {
    std::lock_guard<std::mutex> lock(ranks_[r]->mu);
    return ranks_[r]->ran;
  }

 private:
  std::vector<std::unique_ptr<Rank>> ranks_;
};

bool Wait(const std::shared_ptr<Group::Pending>& p, double seconds = 10) {
  return p->done.WaitForNotificationWithTimeout(absl::Seconds(seconds));
}

TEST(Sequencer, RunsEveryRankInRankZerosOrder) {
  Group g(3);
  // Rank 0 sees A, B, C; rank 1 C, B, A; rank 2 B, C, A (with gaps, so they really are late).
  const std::vector<std::vector<std::string>> arrival = {
      {"Prefill batch 1", "Decode batches 7", "ClearCache all"},
      {"ClearCache all", "Decode batches 7", "Prefill batch 1"},
      {"Decode batches 7", "ClearCache all", "Prefill batch 1"}};
  std::vector<std::shared_ptr<Group::Pending>> all;
  std::vector<std::thread> threads;
  std::mutex mu;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      for (const std::string& id : arrival[r]) {
        auto p = g.Admit(r, id);
        {
          std::lock_guard<std::mutex> lock(mu);
          all.push_back(p);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20 * (r + 1)));
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& p : all) {
    ASSERT_TRUE(Wait(p));
    EXPECT_TRUE(p->status.ok()) << p->status;
  }
  for (int r = 0; r < 3; ++r) EXPECT_EQ(g.Ran(r), arrival[0]) << "rank " << r;
}

// Back-to-back calls like a decode loop (each admitted on both ranks, the next only after the
// previous finished): all run, in order; prints the sequencing cost per call.
TEST(Sequencer, DecodeLoopRunsInOrderAndReportsItsCost) {
  Group g(2);
  const int n = 200;
  const Clock::time_point t = Clock::now();
  for (int i = 0; i < n; ++i) {
    const std::string id = "Decode batches " + std::to_string(i);
    auto a = g.Admit(0, id), b = g.Admit(1, id);
    ASSERT_TRUE(Wait(a) && Wait(b));
    ASSERT_TRUE(a->status.ok() && b->status.ok()) << a->status << b->status;
  }
  const double per_call_ms = SecondsSince(t) * 1e3 / n;
  std::cout << "sequenced call over loopback, 2 ranks: " << per_call_ms << " ms per call\n";
  ::testing::Test::RecordProperty("per_call_ms", std::to_string(per_call_ms));
  EXPECT_EQ(g.Ran(0).size(), static_cast<size_t>(n));
  EXPECT_EQ(g.Ran(0), g.Ran(1));
  EXPECT_LT(per_call_ms, 50.0) << "a handshake is three small messages over loopback";
}

TEST(Sequencer, RpcOnRankZeroOnlyFailsEverywhereAfterTheTimeout) {
  Group g(2);
  const Clock::time_point t = Clock::now();
  auto p = g.Admit(0, "Warmup batch 0");
  ASSERT_TRUE(Wait(p));
  EXPECT_EQ(p->status.code(), absl::StatusCode::kAborted) << p->status;
  EXPECT_NE(p->status.message().find("rank 1 did not receive Warmup batch 0"), std::string::npos)
      << p->status;
  EXPECT_GE(SecondsSince(t), 0.5);
  EXPECT_LT(SecondsSince(t), 5.0);
  EXPECT_TRUE(g.Ran(0).empty()) << "refused calls do not run";
  // The group goes on.
  auto a = g.Admit(0, "Decode batches 1"), b = g.Admit(1, "Decode batches 1");
  ASSERT_TRUE(Wait(a) && Wait(b));
  EXPECT_TRUE(a->status.ok() && b->status.ok()) << a->status << b->status;
  EXPECT_EQ(g.Ran(1), std::vector<std::string>{"Decode batches 1"});
}

TEST(Sequencer, RpcOnAnotherRankOnlyExpires) {
  Group g(2);
  const Clock::time_point t = Clock::now();
  auto p = g.Admit(1, "Prefill batch 3");
  ASSERT_TRUE(Wait(p));
  EXPECT_EQ(p->status.code(), absl::StatusCode::kAborted) << p->status;
  EXPECT_NE(p->status.message().find("rank 0 did not announce it"), std::string::npos) << p->status;
  EXPECT_GE(SecondsSince(t), 0.5);
  EXPECT_LT(SecondsSince(t), 5.0);
  EXPECT_TRUE(g.Ran(1).empty());
}

// Under load (rank 0 announcing call after call) a call that only rank 1 got still fails fast:
// each announcement carries rank 0's queue, and the call is not in it.
TEST(Sequencer, RpcOnAnotherRankOnlyExpiresUnderLoadToo) {
  Group g(2);
  auto lonely = g.Admit(1, "Prefill batch 99");
  const Clock::time_point t = Clock::now();
  int i = 0;
  while (!lonely->done.HasBeenNotified() && SecondsSince(t) < 5.0) {
    const std::string id = "Decode batches " + std::to_string(i++);
    auto a = g.Admit(0, id), b = g.Admit(1, id);
    ASSERT_TRUE(Wait(a) && Wait(b));
    ASSERT_TRUE(a->status.ok() && b->status.ok()) << a->status << b->status;
  }
  ASSERT_TRUE(lonely->done.HasBeenNotified()) << "still pending after " << i << " other calls";
  EXPECT_LT(SecondsSince(t), 2.0);
  EXPECT_GT(i, 10) << "rank 0 was busy all along";
  EXPECT_EQ(lonely->status.code(), absl::StatusCode::kAborted);
  EXPECT_NE(lonely->status.message().find("rank 0 does not have it"), std::string::npos)
      << lonely->status;
}

TEST(Sequencer, DifferentRequestBytesRunNowhere) {
  Group g(2);
  auto a = g.Admit(0, "Warmup batch 0", /*digest=*/1);
  auto b = g.Admit(1, "Warmup batch 0", /*digest=*/2);
  ASSERT_TRUE(Wait(a) && Wait(b));
  EXPECT_EQ(a->status.code(), absl::StatusCode::kAborted);
  EXPECT_EQ(b->status.code(), absl::StatusCode::kAborted);
  EXPECT_NE(a->status.message().find("different request bytes"), std::string::npos) << a->status;
  EXPECT_TRUE(g.Ran(0).empty() && g.Ran(1).empty());
}

TEST(Sequencer, SameFailureEverywhereKeepsTheGroup) {
  Group g(2);
  auto a = g.Admit(0, "Prefill batch 1", 1, /*fails=*/true);
  auto b = g.Admit(1, "Prefill batch 1", 1, /*fails=*/true);
  ASSERT_TRUE(Wait(a) && Wait(b));
  EXPECT_EQ(a->status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(b->status.code(), absl::StatusCode::kInvalidArgument);
  auto c = g.Admit(0, "Prefill batch 2"), d = g.Admit(1, "Prefill batch 2");
  ASSERT_TRUE(Wait(c) && Wait(d));
  EXPECT_TRUE(c->status.ok() && d->status.ok()) << c->status << d->status;
  EXPECT_FALSE(g.rank(0).broken_seen.HasBeenNotified());
  EXPECT_FALSE(g.rank(1).broken_seen.HasBeenNotified());
}

TEST(Sequencer, FailureOnSomeRanksOnlyBreaksTheGroup) {
  Group g(2);
  const Clock::time_point t = Clock::now();
  auto a = g.Admit(0, "Decode batches 4", 1, /*fails=*/false);
  auto b = g.Admit(1, "Decode batches 4", 1, /*fails=*/true);
  ASSERT_TRUE(Wait(a) && Wait(b));
  EXPECT_TRUE(a->status.ok());
  EXPECT_FALSE(b->status.ok());
  // Rank 1 failed a call rank 0 completed: it finds out within ~2 x timeout + slack.
  ASSERT_TRUE(g.rank(1).broken_seen.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_LT(SecondsSince(t), 5.0);
  {
    std::lock_guard<std::mutex> lock(g.rank(1).mu);
    EXPECT_NE(g.rank(1).broken.find("diverged"), std::string::npos) << g.rank(1).broken;
  }
  // Rank 0 learns it at its next call at the latest (in a server the abort watch tells it at
  // once); broken, every later call is refused.
  auto c = g.Admit(0, "Decode batches 5");
  ASSERT_TRUE(Wait(c));
  EXPECT_EQ(c->status.code(), absl::StatusCode::kAborted) << c->status;
  EXPECT_TRUE(g.rank(0).broken_seen.WaitForNotificationWithTimeout(absl::Seconds(10)));
  auto d = g.Admit(0, "Decode batches 6");
  ASSERT_TRUE(Wait(d, 2));
  EXPECT_NE(d->status.message().find("tensor-parallel group is broken"), std::string::npos)
      << d->status;
}

// Rank 0 failed a call that rank 1 completed: rank 0's error round times out and breaks it.
TEST(Sequencer, FailureOnRankZeroOnlyBreaksTheGroup) {
  Group g(2);
  auto a = g.Admit(0, "Decode batches 4", 1, /*fails=*/true);
  auto b = g.Admit(1, "Decode batches 4", 1, /*fails=*/false);
  ASSERT_TRUE(Wait(a) && Wait(b));
  ASSERT_TRUE(g.rank(0).broken_seen.WaitForNotificationWithTimeout(absl::Seconds(10)));
  std::lock_guard<std::mutex> lock(g.rank(0).mu);
  EXPECT_NE(g.rank(0).broken.find("failed on rank 0"), std::string::npos) << g.rank(0).broken;
}

TEST(Sequencer, ShutdownFailsWhatHasNotStarted) {
  Group g(2);
  auto p = g.Admit(1, "Prefill batch 9");
  g.rank(1).sequencer->Shutdown();
  ASSERT_TRUE(Wait(p, 2));
  EXPECT_EQ(p->status.code(), absl::StatusCode::kUnavailable);
  // Rank 0 asks; rank 1 answers "shutting down" instead of leaving it waiting.
  auto q = g.Admit(0, "Prefill batch 10");
  ASSERT_TRUE(Wait(q));
  EXPECT_EQ(q->status.code(), absl::StatusCode::kAborted);
  EXPECT_NE(q->status.message().find("shutting down"), std::string::npos) << q->status;
  EXPECT_FALSE(g.rank(0).broken_seen.HasBeenNotified());
}

TEST(Sequencer, DigestIsStable) {
  EXPECT_EQ(RequestDigest(""), 0xcbf29ce484222325ull);  // FNV-1a offset basis
  EXPECT_EQ(RequestDigest("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_NE(RequestDigest("Decode 1"), RequestDigest("Decode 2"));
}

}  // namespace
}  // namespace phishard
