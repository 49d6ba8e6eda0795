// CommOptions from the launcher's environment, the backend choice, and CreateParallelGroup /
// CreateCommunicator end to end (Gloo on 127.0.0.1; world size 1 gives the LocalCommunicator).
#include "parallel/parallel_group.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "tests/parallel/parallel_test_util.h"

namespace phishard {
namespace {

using ::phishard::testing::FreeLoopbackPort;
using ::phishard::testing::RunRanks;
using ::testing::HasSubstr;

// Sets environment variables for one test and restores them afterwards.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value == nullptr) {
      unsetenv(name);
    } else {
      setenv(name, value, 1);
    }
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_, old_.c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

TEST(CommOptionsTest, ReadsTheLauncherVariables) {
  ScopedEnv rank("RANK", "3"), world("WORLD_SIZE", "4"), addr("MASTER_ADDR", "10.1.2.3"),
      port("MASTER_PORT", "29600");
  auto o = CommOptionsFromEnv();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->rank, 3);
  EXPECT_EQ(o->world_size, 4);
  EXPECT_EQ(o->master_addr, "10.1.2.3");
  EXPECT_EQ(o->master_port, 29600);
  EXPECT_EQ(o->timeout, absl::Seconds(60));
}

TEST(CommOptionsTest, UnsetVariablesKeepTheDefaults) {
  ScopedEnv rank("RANK", nullptr), world("WORLD_SIZE", nullptr), addr("MASTER_ADDR", nullptr),
      port("MASTER_PORT", nullptr);
  auto o = CommOptionsFromEnv();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->rank, 0);
  EXPECT_EQ(o->world_size, 1);
  EXPECT_EQ(o->master_addr, "localhost");
  EXPECT_EQ(o->master_port, 29500);
}

TEST(CommOptionsTest, BadValuesNameTheVariable) {
  {
    ScopedEnv world("WORLD_SIZE", "two");
    auto o = CommOptionsFromEnv();
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(o.status().message(), HasSubstr("WORLD_SIZE='two' is not an integer"));
  }
  {
    ScopedEnv rank("RANK", "2"), world("WORLD_SIZE", "2");
    EXPECT_THAT(CommOptionsFromEnv().status().message(),
                HasSubstr("RANK=2 must be in [0, WORLD_SIZE=2)"));
  }
  {
    ScopedEnv rank("RANK", "0"), world("WORLD_SIZE", "2"), port("MASTER_PORT", "0");
    EXPECT_THAT(CommOptionsFromEnv().status().message(), HasSubstr("MASTER_PORT=0"));
  }
}

TEST(CommBackendTest, ParseAndName) {
  for (CommBackend b : {CommBackend::kLocal, CommBackend::kGloo, CommBackend::kNccl}) {
    auto parsed = ParseCommBackend(std::string(CommBackendName(b)));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, b);
  }
  EXPECT_EQ(*ParseCommBackend("GLOO"), CommBackend::kGloo);
  auto bad = ParseCommBackend("mpi");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("'mpi'"));
  EXPECT_TRUE(CommBackendAvailable(DefaultCommBackend()));
}

TEST(ParallelGroupTest, WorldOfOneIsLocalWhateverTheBackend) {
  for (CommBackend b : {CommBackend::kLocal, CommBackend::kGloo, CommBackend::kNccl}) {
    if (!CommBackendAvailable(b)) continue;
    CommOptions o;
    o.backend = b;
    auto comm = CreateCommunicator(o);
    ASSERT_TRUE(comm.ok()) << comm.status();
    EXPECT_EQ((*comm)->world_size(), 1);
    EXPECT_EQ((*comm)->rank(), 0);
    EXPECT_EQ((*comm)->memory_space(), MemorySpace::kHost);
    float v[3] = {1, 2, 3}, out[3] = {0, 0, 0};
    EXPECT_TRUE((*comm)->AllReduceSum(v, 3).ok());
    EXPECT_EQ(v[2], 3.0f);
    EXPECT_TRUE((*comm)->AllGather(v, out, 3).ok());
    EXPECT_EQ(out[1], 2.0f);
    EXPECT_EQ((*comm)->Broadcast(v, 4, 1).code(), absl::StatusCode::kInvalidArgument);
    (*comm)->Abort("done");
    EXPECT_EQ((*comm)->Barrier().code(), absl::StatusCode::kAborted);
  }
}

TEST(ParallelGroupTest, LocalBackendRefusesAWorldOfTwo) {
  CommOptions o;
  o.backend = CommBackend::kLocal;
  o.world_size = 2;
  auto g = CreateParallelGroup(o);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(g.status().message(), HasSubstr("WORLD_SIZE=1"));
}

TEST(ParallelGroupTest, NcclWithoutCudaIsUnimplemented) {
  if (CommBackendAvailable(CommBackend::kNccl)) GTEST_SKIP() << "this build has NCCL";
  CommOptions o;
  o.backend = CommBackend::kNccl;
  o.world_size = 2;
  auto g = CreateParallelGroup(o);
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(g.status().message(), HasSubstr("without CUDA"));
}

TEST(ParallelGroupTest, GlooGroupOfTwoCarriesCollectivesAndControlMessages) {
  const int port = FreeLoopbackPort();
  auto results = RunRanks<std::string>(2, [&](int r) -> std::string {
    CommOptions o;
    o.backend = CommBackend::kGloo;
    o.rank = r;
    o.world_size = 2;
    o.master_addr = "127.0.0.1";
    o.master_port = port;
    o.timeout = absl::Seconds(20);
    auto g = CreateParallelGroup(o);
    if (!g.ok()) return std::string(g.status().message());
    float x = static_cast<float>(r + 1);
    if (absl::Status s = g->comm->AllReduceSum(&x, 1); !s.ok()) return std::string(s.message());
    if (x != 3.0f) return "wrong all-reduce sum";
    if (r == 0) {
      if (!g->control->BroadcastFromRoot("Decode 1").ok()) return "broadcast failed";
      return "ok";
    }
    auto m = g->control->ReceiveFromRoot(absl::Seconds(10));
    if (!m.ok()) return std::string(m.status().message());
    return *m == "Decode 1" ? "ok" : "wrong control message";
  });
  EXPECT_EQ(results[0], "ok");
  EXPECT_EQ(results[1], "ok");
}

TEST(ParallelGroupTest, MissingPeerFailsCreateCommunicatorWithinTheTimeout) {
  CommOptions o;
  o.backend = CommBackend::kGloo;
  o.rank = 1;
  o.world_size = 2;
  o.master_addr = "127.0.0.1";
  o.master_port = FreeLoopbackPort();
  o.timeout = absl::Milliseconds(300);
  auto comm = CreateCommunicator(o);
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(comm.status().message(), HasSubstr("rank 1: peer rank 0 never came"));
}

}  // namespace
}  // namespace phishard
