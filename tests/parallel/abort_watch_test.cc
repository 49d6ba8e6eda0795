// AbortWatch with 2-4 ranks on 127.0.0.1: an abort on any rank, a rank leaving, or a killed
// process reaches every other rank exactly once, within a second; an idle group never fires.
#include "parallel/abort_watch.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "parallel/rendezvous.h"
#include "tests/parallel/parallel_test_util.h"

namespace phishard {
namespace {

using ::phishard::testing::FreeLoopbackPort;
using ::phishard::testing::LoopbackOptions;
using ::phishard::testing::RunRanks;
using ::phishard::testing::SecondsSince;
using ::testing::HasSubstr;

// What one rank's callback saw.
struct Fired {
  absl::Mutex mu;
  int count = 0;
  std::string reason;
  absl::Time when;

  void Record(const std::string& r) {
    absl::MutexLock lock(&mu);
    ++count;
    reason = r;
    when = absl::Now();
  }
  // Waits up to `timeout` for the first call.
  bool Wait(absl::Duration timeout) {
    absl::MutexLock lock(&mu);
    auto fired = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu) { return count > 0; };
    return mu.AwaitWithTimeout(absl::Condition(&fired), timeout);
  }
};

struct Group {
  std::vector<std::unique_ptr<ControlChannel>> control;
  std::vector<std::unique_ptr<Fired>> fired;
  std::vector<std::unique_ptr<AbortWatch>> watch;
};

Group MakeGroup(int world) {
  Group g;
  g.control.resize(world);
  g.watch.resize(world);
  for (int r = 0; r < world; ++r) g.fired.push_back(std::make_unique<Fired>());
  const int port = FreeLoopbackPort();
  RunRanks<bool>(world, [&](int r) {
    auto c = Rendezvous(LoopbackOptions(r, world, port));
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok()) return false;
    g.control[r] = std::move(*c);
    Fired* f = g.fired[r].get();
    auto w = AbortWatch::Create(*g.control[r], absl::Seconds(20),
                                [f](const std::string& reason) { f->Record(reason); });
    EXPECT_TRUE(w.ok()) << w.status();
    if (w.ok()) g.watch[r] = std::move(*w);
    return w.ok();
  });
  return g;
}

class AbortWatchTest : public ::testing::TestWithParam<int> {};

TEST_P(AbortWatchTest, TriggerOnAnyRankReachesAllOthersOnce) {
  const int world = 4;
  const int aborter = GetParam();
  Group g = MakeGroup(world);
  for (auto& w : g.watch) ASSERT_NE(w, nullptr);
  const absl::Time start = absl::Now();
  g.watch[aborter]->Trigger("boom");
  for (int r = 0; r < world; ++r) {
    if (r == aborter) continue;
    ASSERT_TRUE(g.fired[r]->Wait(absl::Seconds(5))) << "rank " << r << " never heard";
    absl::MutexLock lock(&g.fired[r]->mu);
    EXPECT_LT(absl::ToDoubleSeconds(g.fired[r]->when - start), 1.0) << r;
    EXPECT_THAT(g.fired[r]->reason, HasSubstr(absl::StrCat("rank ", aborter, " aborted: boom")));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  for (int r = 0; r < world; ++r) {
    absl::MutexLock lock(&g.fired[r]->mu);
    EXPECT_EQ(g.fired[r]->count, r == aborter ? 0 : 1) << "rank " << r;
  }
  EXPECT_TRUE(g.watch[aborter]->fired());
}

INSTANTIATE_TEST_SUITE_P(Aborters, AbortWatchTest, ::testing::Values(0, 2));

TEST(AbortWatchTest, IdleGroupNeverFiresAndShutsDownCleanly) {
  Group g = MakeGroup(3);
  for (auto& w : g.watch) ASSERT_NE(w, nullptr);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (auto& f : g.fired) {
    absl::MutexLock lock(&f->mu);
    EXPECT_EQ(f->count, 0);
  }
}

TEST(AbortWatchTest, RankLeavingTheGroupIsNoticed) {
  Group g = MakeGroup(2);
  for (auto& w : g.watch) ASSERT_NE(w, nullptr);
  g.watch[1].reset();
  ASSERT_TRUE(g.fired[0]->Wait(absl::Seconds(5)));
  absl::MutexLock lock(&g.fired[0]->mu);
  EXPECT_THAT(g.fired[0]->reason, HasSubstr("rank 1 left the group"));
}

TEST(AbortWatchTest, KilledProcessIsNoticed) {
  const int port = FreeLoopbackPort();
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto c = Rendezvous(LoopbackOptions(1, 2, port));
    if (!c.ok()) _exit(2);
    auto w = AbortWatch::Create(**c, absl::Seconds(20), [](const std::string&) {});
    if (!w.ok()) _exit(3);
    for (;;) pause();
  }
  auto c = Rendezvous(LoopbackOptions(0, 2, port));
  ASSERT_TRUE(c.ok()) << c.status();
  Fired fired;
  auto w = AbortWatch::Create(**c, absl::Seconds(20),
                              [&](const std::string& reason) { fired.Record(reason); });
  ASSERT_TRUE(w.ok()) << w.status();
  const absl::Time start = absl::Now();
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  ASSERT_TRUE(fired.Wait(absl::Seconds(5)));
  EXPECT_LT(SecondsSince(start), 1.0);
  absl::MutexLock lock(&fired.mu);
  EXPECT_THAT(fired.reason, HasSubstr("rank 0 lost its connection to rank 1"));
}

}  // namespace
}  // namespace phishard
