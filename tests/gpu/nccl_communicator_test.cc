// NcclCommunicator across two processes, one GPU each (needs >= 2 visible GPUs; skips otherwise).
// Each rank is a forked child: CUDA must not be initialised in a process that forks, so the parent
// (the gtest process) never touches CUDA and only collects the children's exit codes.
//
// Values are small integers (< 2^24), so float sums are exact in any reduction order and results
// are compared with ==.
#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "parallel/rendezvous.h"
#include "tests/parallel/parallel_test_util.h"

namespace phishard {
namespace {

constexpr int kSkip = 77;  // child exit code: fewer than two GPUs

using ::phishard::testing::ExitCodes;
using ::phishard::testing::ForkRanks;
using ::phishard::testing::FreeLoopbackPort;
using ::phishard::testing::LoopbackOptions;

float Value(int rank, size_t i) {
  return static_cast<float>((rank + 1) * (static_cast<int>(i % 97) + 1));
}

// Runs in a child process; returns its exit code after printing the first failure.
class Rank {
 public:
  Rank(int rank, int port) : rank_(rank), port_(port) {}

  int Run(bool abort_test) {
    int visible = 0;
    if (cudaGetDeviceCount(&visible) != cudaSuccess || visible < 2) return kSkip;
    auto control = Rendezvous(LoopbackOptions(rank_, 2, port_, absl::Seconds(60)));
    if (!control.ok()) return Fail(std::string(control.status().message()));
    auto comm = NcclCommunicator::Create(**control, absl::Seconds(60), absl::Seconds(30));
    if (!comm.ok()) return Fail(std::string(comm.status().message()));
    NcclCommunicator& c = **comm;
    if (c.device() != rank_ % visible) return Fail("wrong device");
    if (c.memory_space() != MemorySpace::kDevice || c.stream() == nullptr) {
      return Fail("not a device communicator");
    }
    return abort_test ? AbortCase(c) : Collectives(c);
  }

 private:
  int Fail(const std::string& what) {
    std::fprintf(stderr, "rank %d: %s\n", rank_, what.c_str());
    return 1;
  }

  int Collectives(NcclCommunicator& c) {
    for (size_t count : {size_t{1}, size_t{7}, size_t{1} << 20}) {
      const std::string at = absl::StrCat(" (count ", count, ")");
      std::vector<float> host(count), back(2 * count);
      for (size_t i = 0; i < count; ++i) host[i] = Value(rank_, i);
      float* d = nullptr;
      float* d_all = nullptr;
      if (cudaMalloc(&d, count * sizeof(float)) != cudaSuccess ||
          cudaMalloc(&d_all, 2 * count * sizeof(float)) != cudaSuccess) {
        return Fail("cudaMalloc" + at);
      }
      // All-reduce: k * (1 + 2).
      cudaMemcpy(d, host.data(), count * sizeof(float), cudaMemcpyHostToDevice);
      if (absl::Status s = c.AllReduceSum(d, count); !s.ok()) return Fail(s.ToString() + at);
      cudaMemcpy(back.data(), d, count * sizeof(float), cudaMemcpyDeviceToHost);
      for (size_t i = 0; i < count; ++i) {
        if (back[i] != 3.0f * static_cast<float>(i % 97 + 1)) return Fail("all-reduce" + at);
      }
      // All-gather out of place into a NaN-poisoned buffer (0xFF bytes are a NaN pattern).
      cudaMemcpy(d, host.data(), count * sizeof(float), cudaMemcpyHostToDevice);
      cudaMemset(d_all, 0xFF, 2 * count * sizeof(float));
      if (absl::Status s = c.AllGather(d, d_all, count); !s.ok()) return Fail(s.ToString() + at);
      cudaMemcpy(back.data(), d_all, 2 * count * sizeof(float), cudaMemcpyDeviceToHost);
      for (int k = 0; k < 2; ++k) {
        for (size_t i = 0; i < count; ++i) {
          if (back[k * count + i] != Value(k, i)) return Fail("all-gather" + at);
        }
      }
      // All-gather in place.
      cudaMemset(d_all, 0xFF, 2 * count * sizeof(float));
      cudaMemcpy(d_all + rank_ * count, host.data(), count * sizeof(float), cudaMemcpyHostToDevice);
      if (absl::Status s = c.AllGather(d_all + rank_ * count, d_all, count); !s.ok()) {
        return Fail(s.ToString() + at);
      }
      cudaMemcpy(back.data(), d_all, 2 * count * sizeof(float), cudaMemcpyDeviceToHost);
      for (int k = 0; k < 2; ++k) {
        for (size_t i = 0; i < count; ++i) {
          if (back[k * count + i] != Value(k, i)) return Fail("in-place all-gather" + at);
        }
      }
      // Broadcast of an odd number of bytes from each root.
      const size_t bytes = count * sizeof(float) - (count > 1 ? 1 : 0);
      for (int root = 0; root < 2; ++root) {
        std::vector<unsigned char> b(bytes, 0xEE), got(bytes);
        if (rank_ == root) {
          for (size_t i = 0; i < bytes; ++i) b[i] = static_cast<unsigned char>(i * 7 + root);
        }
        cudaMemcpy(d, b.data(), bytes, cudaMemcpyHostToDevice);
        if (absl::Status s = c.Broadcast(d, bytes, root); !s.ok()) return Fail(s.ToString() + at);
        cudaMemcpy(got.data(), d, bytes, cudaMemcpyDeviceToHost);
        for (size_t i = 0; i < bytes; ++i) {
          if (got[i] != static_cast<unsigned char>(i * 7 + root)) return Fail("broadcast" + at);
        }
      }
      cudaFree(d);
      cudaFree(d_all);
    }
    if (absl::Status s = c.Barrier(); !s.ok()) return Fail(s.ToString());
    return StreamOrdered(c);
  }

  // The stream-ordered API a model step uses: bf16 all-reduce and f32 all-gather enqueued on the
  // caller's stream, then the same all-reduce captured in a CUDA graph and replayed twice (each
  // replay doubles the sum of the two ranks: 3k, then 2 x 3k = 6k... exact small integers).
  int StreamOrdered(NcclCommunicator& c) {
    constexpr size_t kCount = 4096;
    cudaStream_t stream = nullptr;
    float* d = nullptr;
    uint16_t* h16 = nullptr;
    if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess ||
        cudaMalloc(&d, 2 * kCount * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&h16, kCount * sizeof(uint16_t)) != cudaSuccess) {
      return Fail("stream/cudaMalloc");
    }
    // bf16 of a small integer = the top half of its float bits.
    auto bf16 = [](float f) {
      uint32_t u;
      std::memcpy(&u, &f, 4);
      return static_cast<uint16_t>(u >> 16);
    };
    std::vector<uint16_t> in16(kCount), out16(kCount);
    for (size_t i = 0; i < kCount; ++i) in16[i] = bf16(static_cast<float>((rank_ + 1) * (i % 7)));
    cudaMemcpy(h16, in16.data(), kCount * 2, cudaMemcpyHostToDevice);
    if (absl::Status s = c.EnqueueAllReduceSum(h16, kCount, DataType::kBF16, stream); !s.ok()) {
      return Fail("enqueue bf16 all-reduce: " + s.ToString());
    }
    if (absl::Status s = c.SyncStream(stream); !s.ok()) return Fail("sync: " + s.ToString());
    cudaMemcpy(out16.data(), h16, kCount * 2, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < kCount; ++i) {
      if (out16[i] != bf16(3.0f * static_cast<float>(i % 7))) return Fail("bf16 all-reduce");
    }
    // In-place f32 all-gather on the stream.
    std::vector<float> mine(kCount), all(2 * kCount);
    for (size_t i = 0; i < kCount; ++i) mine[i] = Value(rank_, i);
    cudaMemcpy(d + rank_ * kCount, mine.data(), kCount * 4, cudaMemcpyHostToDevice);
    if (absl::Status s = c.EnqueueAllGather(d + rank_ * kCount, d, kCount, DataType::kF32, stream);
        !s.ok()) {
      return Fail("enqueue all-gather: " + s.ToString());
    }
    if (absl::Status s = c.SyncStream(stream); !s.ok()) return Fail("sync: " + s.ToString());
    cudaMemcpy(all.data(), d, 2 * kCount * 4, cudaMemcpyDeviceToHost);
    for (int k = 0; k < 2; ++k) {
      for (size_t i = 0; i < kCount; ++i) {
        if (all[k * kCount + i] != Value(k, i)) return Fail("stream all-gather");
      }
    }
    // Captured (thread-local mode, as the model's decode graphs are) and replayed.
    cudaMemcpy(d, mine.data(), kCount * 4, cudaMemcpyHostToDevice);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
      return Fail("begin capture");
    }
    absl::Status enq = c.EnqueueAllReduceSum(d, kCount, DataType::kF32, stream);
    if (cudaStreamEndCapture(stream, &graph) != cudaSuccess || !enq.ok()) {
      return Fail("capture of an all-reduce: " + enq.ToString());
    }
    if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) return Fail("graph instantiate");
    for (int replay = 1; replay <= 2; ++replay) {
      if (cudaGraphLaunch(exec, stream) != cudaSuccess) return Fail("graph launch");
      if (absl::Status s = c.SyncStream(stream); !s.ok()) return Fail("sync: " + s.ToString());
      cudaMemcpy(all.data(), d, kCount * 4, cudaMemcpyDeviceToHost);
      const float factor = replay == 1 ? 3.0f : 6.0f;  // (1 + 2) k, then 2 x 3k
      for (size_t i = 0; i < kCount; ++i) {
        if (all[i] != factor * static_cast<float>(i % 97 + 1)) {
          return Fail(absl::StrCat("graph all-reduce replay ", replay, " at ", i, ": ", all[i]));
        }
      }
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaFree(d);
    cudaFree(h16);
    cudaStreamDestroy(stream);
    return 0;
  }

  // Rank 1 never joins and aborts after 300 ms; rank 0's pending all-reduce must fail long before
  // its 30 s timeout, and both must refuse later collectives.
  int AbortCase(NcclCommunicator& c) {
    float* d = nullptr;
    if (cudaMalloc(&d, 1000 * sizeof(float)) != cudaSuccess) return Fail("cudaMalloc");
    if (rank_ == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      c.Abort("test abort on rank 1");
      absl::Status s = c.AllReduceSum(d, 1000);
      if (s.code() != absl::StatusCode::kAborted) return Fail("after abort: " + s.ToString());
      return 0;
    }
    const absl::Time start = absl::Now();
    absl::Status s = c.AllReduceSum(d, 1000);
    const double took = absl::ToDoubleSeconds(absl::Now() - start);
    if (s.ok()) return Fail("all-reduce succeeded without rank 1");
    if (took > 10.0) return Fail(absl::StrCat("abort took ", took, " s to arrive: ", s.ToString()));
    if (s.message().find("test abort on rank 1") == std::string::npos) {
      return Fail("abort reason lost: " + s.ToString());
    }
    if (c.Barrier().code() != absl::StatusCode::kAborted) return Fail("barrier after abort");
    return 0;
  }

  const int rank_;
  const int port_;
};

// Forks one child per rank and returns their exit codes (-1: killed after `limit`).
std::vector<int> RunTwoRanks(bool abort_test, absl::Duration limit) {
  const int port = FreeLoopbackPort();
  return ExitCodes(ForkRanks(
      2, [&](int r) { return Rank(r, port).Run(abort_test); }, limit));
}

TEST(NcclCommunicatorTest, TwoProcessesAllReduceAllGatherBroadcastBarrier) {
  auto codes = RunTwoRanks(/*abort_test=*/false, absl::Seconds(120));
  if (codes[0] == kSkip && codes[1] == kSkip) GTEST_SKIP() << "needs two visible GPUs";
  EXPECT_EQ(codes[0], 0) << "rank 0 (see stderr)";
  EXPECT_EQ(codes[1], 0) << "rank 1 (see stderr)";
}

TEST(NcclCommunicatorTest, AbortOnOneProcessFailsThePeersPendingCollective) {
  auto codes = RunTwoRanks(/*abort_test=*/true, absl::Seconds(120));
  if (codes[0] == kSkip && codes[1] == kSkip) GTEST_SKIP() << "needs two visible GPUs";
  EXPECT_EQ(codes[0], 0) << "rank 0 (see stderr)";
  EXPECT_EQ(codes[1], 0) << "rank 1 (see stderr)";
}

}  // namespace
}  // namespace phishard
