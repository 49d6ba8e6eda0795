// Shared pieces of the two-rank all-reduce tests (custom_all_reduce_test.cc,
// copy_engine_all_reduce_test.cc): each rank's random partial and the float sum of both, rounded
// once to the element type; a rank's set-up (rendezvous and communicator) and the two forked
// ranks; the abort and deadline cases both paths must pass; the ranks' exit codes read as a gtest
// result.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kernels/dtype.h"
#include "parallel/nccl_communicator.h"
#include "parallel/rendezvous.h"
#include "tests/parallel/parallel_test_util.h"

namespace phishard::peer_test {

// Rank `rank`'s partial for call `seed`: `count` random values of `dtype` as raw little-endian
// bytes, and the same values as floats (exact: they are dtype values).
struct Partial {
  std::vector<unsigned char> bytes;
  std::vector<float> values;
};

inline Partial MakePartial(int rank, uint32_t seed, size_t count, DataType dtype) {
  std::mt19937 rng(seed * 7919u + static_cast<uint32_t>(rank) * 104729u + 17u);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-12, 12);
  Partial p;
  p.bytes.resize(count * DataTypeSize(dtype));
  p.values.resize(count);
  for (size_t i = 0; i < count; ++i) {
    const float x = std::ldexp(normal(rng), exponent(rng));
    if (dtype == DataType::kBF16) {
      const __nv_bfloat16 b = __float2bfloat16(x);
      std::memcpy(&p.bytes[2 * i], &b, 2);
      p.values[i] = __bfloat162float(b);
    } else if (dtype == DataType::kF16) {
      const __half h = __float2half(x);
      std::memcpy(&p.bytes[2 * i], &h, 2);
      p.values[i] = __half2float(h);
    } else {
      std::memcpy(&p.bytes[4 * i], &x, 4);
      p.values[i] = x;
    }
  }
  return p;
}

// The naive reference: both partials as floats, added once, rounded once to dtype.
inline std::vector<unsigned char> ReferenceSum(size_t count, DataType dtype, uint32_t seed) {
  const Partial a = MakePartial(0, seed, count, dtype), b = MakePartial(1, seed, count, dtype);
  std::vector<unsigned char> out(count * DataTypeSize(dtype));
  for (size_t i = 0; i < count; ++i) {
    const float s = a.values[i] + b.values[i];
    if (dtype == DataType::kBF16) {
      const __nv_bfloat16 r = __float2bfloat16(s);
      std::memcpy(&out[2 * i], &r, 2);
    } else if (dtype == DataType::kF16) {
      const __half r = __float2half(s);
      std::memcpy(&out[2 * i], &r, 2);
    } else {
      std::memcpy(&out[4 * i], &s, 4);
    }
  }
  return out;
}

// First element where two raw arrays differ, or -1.
inline long FirstDiff(const std::vector<unsigned char>& x, const std::vector<unsigned char>& y,
                      size_t esize) {
  for (size_t i = 0; i < x.size(); i += esize) {
    if (std::memcmp(&x[i], &y[i], esize) != 0) return static_cast<long>(i / esize);
  }
  return -1;
}

constexpr int kSkip = 77;   // a rank's exit code: fewer than two GPUs
constexpr int kNoP2p = 78;  // a rank's exit code: the GPUs cannot use the path under test

// A rank's failure: the reason on stderr, exit code 1.
inline int Fail(int rank, const std::string& what) {
  std::fprintf(stderr, "rank %d: %s\n", rank, what.c_str());
  std::fflush(stderr);
  return 1;
}

// A rank's communicator and the control channel it was set up over (kept alive beside it).
struct RankComm {
  std::unique_ptr<ControlChannel> control;
  std::unique_ptr<NcclCommunicator> comm;
};

// Rank `rank` of two meets the other over loopback `port` and creates its NcclCommunicator (setup
// timeout 60 s; collective timeout 2 s when `short_op_timeout`, for the deadline cases, else
// 30 s). Returns kSkip with fewer than two visible GPUs, Fail's 1 when the rendezvous or the
// communicator fails, else 0 with *out set.
inline int ConnectRank(int rank, int port, bool short_op_timeout, RankComm* out) {
  int visible = 0;
  if (cudaGetDeviceCount(&visible) != cudaSuccess || visible < 2) return kSkip;
  auto control = Rendezvous(::phishard::testing::LoopbackOptions(rank, 2, port, absl::Seconds(60)));
  if (!control.ok()) return Fail(rank, std::string(control.status().message()));
  const absl::Duration op_timeout = short_op_timeout ? absl::Seconds(2) : absl::Seconds(30);
  auto comm = NcclCommunicator::Create(**control, absl::Seconds(60), op_timeout);
  if (!comm.ok()) return Fail(rank, std::string(comm.status().message()));
  out->control = *std::move(control);
  out->comm = *std::move(comm);
  return 0;
}

// Forks the two ranks, each running `RankT(rank, port).Run(which)` in a child process on one free
// loopback port, and returns their exit codes (killed after `limit`).
template <typename RankT, typename CaseT>
std::vector<int> RunTwoRanks(CaseT which, absl::Duration limit) {
  const int port = ::phishard::testing::FreeLoopbackPort();
  return ::phishard::testing::ExitCodes(::phishard::testing::ForkRanks(
      2, [&](int r) { return RankT(r, port).Run(which); }, limit));
}

// Polls the raw stream (not SyncStream's host deadline) until it is idle or `limit` passes.
inline bool StreamIdleWithin(cudaStream_t s, absl::Duration limit) {
  const absl::Time until = absl::Now() + limit;
  while (absl::Now() < until) {
    if (cudaStreamQuery(s) != cudaErrorNotReady) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

// Enqueues the all-reduce under test of `count` bf16 values at device `d` on `stream`.
using EnqueueBf16 = absl::FunctionRef<absl::Status(void* d, size_t count, cudaStream_t stream)>;

// Rank 1 never joins and aborts after 300 ms: rank 0's device-side wait for rank 1 (a spinning
// kernel or a stream wait on rank 1's arrival flag) must end through the abort flag, the step fail
// with rank 1's reason, and `stream` go idle.
inline int AbortCase(NcclCommunicator& c, int rank, size_t count, cudaStream_t stream,
                     EnqueueBf16 enqueue) {
  void* d = nullptr;
  if (cudaMalloc(&d, count * 2) != cudaSuccess) return Fail(rank, "cudaMalloc");
  if (rank == 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    c.Abort("test abort on rank 1");
    return 0;
  }
  const absl::Time start = absl::Now();
  absl::Status s = enqueue(d, count, stream);
  if (s.ok()) s = c.SyncStream(stream);
  const double took = absl::ToDoubleSeconds(absl::Now() - start);
  if (s.ok()) return Fail(rank, "all-reduce succeeded without rank 1");
  if (took > 10.0) return Fail(rank, absl::StrCat("abort took ", took, " s: ", s.ToString()));
  if (s.message().find("test abort on rank 1") == std::string::npos) {
    return Fail(rank, "abort reason lost: " + s.ToString());
  }
  if (!StreamIdleWithin(stream, absl::Seconds(5))) {
    return Fail(rank, "the device still waits after the abort");
  }
  std::printf("  rank 0: aborted after %.3f s: %s\n", took, s.ToString().c_str());
  return 0;
}

// Rank 1 stays silent (alive, no abort) for 6 s: rank 0's device-side wait must give up by itself
// after the communicator's collective timeout (2 s in these tests; the kernel's %globaltimer: we
// watch the raw stream, not SyncStream's host deadline), and SyncStream then reports
// DEADLINE_EXCEEDED.
inline int DeadlineCase(NcclCommunicator& c, int rank, cudaStream_t stream, EnqueueBf16 enqueue) {
  const size_t count = 2560;
  void* d = nullptr;
  if (cudaMalloc(&d, count * 2) != cudaSuccess) return Fail(rank, "cudaMalloc");
  if (rank == 1) {
    std::this_thread::sleep_for(std::chrono::seconds(6));
    return 0;
  }
  const absl::Time start = absl::Now();
  if (absl::Status s = enqueue(d, count, stream); !s.ok()) {
    return Fail(rank, "enqueue: " + s.ToString());
  }
  if (!StreamIdleWithin(stream, absl::Seconds(10))) {
    return Fail(rank, "the device wait did not give up in 10 s");
  }
  const double took = absl::ToDoubleSeconds(absl::Now() - start);
  absl::Status s = c.SyncStream(stream);
  if (s.code() != absl::StatusCode::kDeadlineExceeded) {
    return Fail(rank, "want DEADLINE_EXCEEDED, got " + s.ToString());
  }
  if (took < 1.9 || took > 5.0) {
    return Fail(rank, absl::StrCat("gave up after ", took, " s, want ~2"));
  }
  std::printf("  rank 0: gave up after %.3f s: %s\n", took, s.ToString().c_str());
  return 0;
}

// The two ranks' exit codes as the test's result: both kSkip / both kNoP2p skip (`path` names
// what the GPUs cannot use), anything else must be 0 on both.
inline void CheckTwoRanks(const std::vector<int>& codes, const char* path) {
  if (codes[0] == kSkip && codes[1] == kSkip) GTEST_SKIP() << "needs two visible GPUs";
  if (codes[0] == kNoP2p && codes[1] == kNoP2p) {
    GTEST_SKIP() << "the two GPUs cannot use the " << path << " (no peer access)";
  }
  EXPECT_EQ(codes[0], 0) << "rank 0 (see stderr)";
  EXPECT_EQ(codes[1], 0) << "rank 1 (see stderr)";
}

}  // namespace phishard::peer_test
