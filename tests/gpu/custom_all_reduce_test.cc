// The custom peer-to-peer all-reduce (parallel/custom_all_reduce.h) of NcclCommunicator across two
// processes, one GPU each (needs >= 2 visible GPUs with peer access; skips otherwise). Each rank is
// a forked child: the parent (the gtest process) never touches CUDA.
//
// Tolerance: none. A two-rank sum is one rounding of float(a) + float(b) on every path (the
// custom kernel, NCCL's ring, this file's naive host reference), and that is commutative, so the
// two ranks and the two implementations must agree bit for bit, on random values whose exponents
// span 2^-12..2^12 (sums that round, cancel and carry).
#include "parallel/custom_all_reduce.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "parallel/nccl_communicator.h"
#include "tests/gpu/peer_all_reduce_test_util.h"

namespace phishard {
namespace {

enum class Case { kCollectives, kAbort, kDeadline };

using peer_test::FirstDiff;
using peer_test::kNoP2p;
using peer_test::MakePartial;
using peer_test::Partial;
using peer_test::ReferenceSum;

class Rank {
 public:
  Rank(int rank, int port) : rank_(rank), port_(port) {}

  int Run(Case which) {
    // The deadline case needs a short collective timeout, the others a generous one.
    peer_test::RankComm rc;
    if (int code = peer_test::ConnectRank(rank_, port_, which == Case::kDeadline, &rc); code != 0) {
      return code;
    }
    NcclCommunicator& c = *rc.comm;
    if (!c.custom_all_reduce_ready()) {
      std::fprintf(stderr, "rank %d: custom all-reduce unavailable (see the log line)\n", rank_);
      return kNoP2p;
    }
    if (cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) != cudaSuccess) {
      return Fail("stream");
    }
    auto enqueue = [&c](void* d, size_t count, cudaStream_t s) {
      return c.EnqueueAllReduceSum(d, count, DataType::kBF16, s);
    };
    int code = 0;
    switch (which) {
      case Case::kCollectives:
        code = Collectives(c);
        if (code == 0) code = Graph(c);
        if (code == 0) code = Timing(c);
        break;
      case Case::kAbort:
        // The custom kernel spins on rank 1's flag until the abort flag ends it.
        c.set_all_reduce_mode(AllReduceMode::kCustom);
        code = peer_test::AbortCase(c, rank_, 128 * 2560, stream_, enqueue);
        break;
      case Case::kDeadline:
        c.set_all_reduce_mode(AllReduceMode::kCustom);
        code = peer_test::DeadlineCase(c, rank_, stream_, enqueue);
        break;
    }
    return code;
  }

 private:
  int Fail(const std::string& what) { return peer_test::Fail(rank_, what); }

  // One all-reduce of this rank's partial for `seed` through `mode`; the result downloaded.
  int Reduce(NcclCommunicator& c, AllReduceMode mode, void* d, size_t count, DataType dtype,
             uint32_t seed, std::vector<unsigned char>* out) {
    const Partial mine = MakePartial(rank_, seed, count, dtype);
    c.set_all_reduce_mode(mode);
    const bool custom = mode != AllReduceMode::kNccl &&
                        count * DataTypeSize(dtype) <= CustomAllReduce::kDefaultCapacityBytes;
    if (c.UsesCustomAllReduce(count, dtype) != custom) return Fail("wrong path chosen");
    cudaMemcpy(d, mine.bytes.data(), mine.bytes.size(), cudaMemcpyHostToDevice);
    if (absl::Status s = c.EnqueueAllReduceSum(d, count, dtype, stream_); !s.ok()) {
      return Fail("enqueue: " + s.ToString());
    }
    if (absl::Status s = c.SyncStream(stream_); !s.ok()) return Fail("sync: " + s.ToString());
    out->resize(mine.bytes.size());
    cudaMemcpy(out->data(), d, out->size(), cudaMemcpyDeviceToHost);
    return 0;
  }

  // Custom vs NCCL vs the host reference over sizes: one element, odd counts (single-element
  // path), a decode b128 partial (128 x 2560 bf16 = 655 KB), a 1 x 2048 prefill's (10.5 MB), and
  // one element more than the buffers hold (NCCL then runs it: same bits).
  int Collectives(NcclCommunicator& c) {
    struct Size {
      size_t count;
      DataType dtype;
    };
    const size_t over = CustomAllReduce::kDefaultCapacityBytes / 2 + 1;
    const std::vector<Size> sizes = {
        {1, DataType::kBF16},    {7, DataType::kBF16},          {4097, DataType::kBF16},
        {2560, DataType::kBF16}, {128 * 2560, DataType::kBF16}, {2048 * 2560, DataType::kBF16},
        {over, DataType::kBF16}, {7, DataType::kF16},           {128 * 2560, DataType::kF16},
        {1, DataType::kF32},     {4099, DataType::kF32},        {128 * 2560, DataType::kF32}};
    uint32_t seed = 1;
    for (const Size& s : sizes) {
      const size_t es = DataTypeSize(s.dtype);
      const std::string at = absl::StrCat(" (", s.count, " ", DataTypeName(s.dtype), ")");
      void* d = nullptr;
      if (cudaMalloc(&d, s.count * es) != cudaSuccess) return Fail("cudaMalloc" + at);
      std::vector<unsigned char> custom, nccl;
      if (Reduce(c, AllReduceMode::kCustom, d, s.count, s.dtype, seed, &custom) != 0 ||
          Reduce(c, AllReduceMode::kNccl, d, s.count, s.dtype, seed, &nccl) != 0) {
        return Fail("all-reduce" + at);
      }
      const std::vector<unsigned char> want = ReferenceSum(s.count, s.dtype, seed);
      if (long i = FirstDiff(custom, want, es); i >= 0) {
        return Fail(absl::StrCat("custom != reference at ", i, at));
      }
      if (long i = FirstDiff(nccl, want, es); i >= 0) {
        return Fail(absl::StrCat("NCCL != reference at ", i, at));
      }
      cudaFree(d);
      ++seed;
    }
    return 0;
  }

  // A graph of three custom all-reduces, as a decode step's graph holds them: a decode-sized one,
  // an odd-sized one, then the first buffer again (sum of equal halves: exactly twice the sum).
  // Replayed 100 times with new inputs uploaded before each replay.
  int Graph(NcclCommunicator& c) {
    const size_t na = 128 * 2560, nb = 3 * 2560 + 5;
    const DataType dt = DataType::kBF16;
    void* a = nullptr;
    void* b = nullptr;
    if (cudaMalloc(&a, na * 2) != cudaSuccess || cudaMalloc(&b, nb * 2) != cudaSuccess) {
      return Fail("cudaMalloc");
    }
    c.set_all_reduce_mode(AllReduceMode::kCustom);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
      return Fail("begin capture");
    }
    absl::Status enq = c.EnqueueAllReduceSum(a, na, dt, stream_);
    if (enq.ok()) enq = c.EnqueueAllReduceSum(b, nb, dt, stream_);
    if (enq.ok()) enq = c.EnqueueAllReduceSum(a, na, dt, stream_);
    if (cudaStreamEndCapture(stream_, &graph) != cudaSuccess || !enq.ok()) {
      return Fail("capture: " + enq.ToString());
    }
    if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) return Fail("graph instantiate");
    std::vector<unsigned char> got_a(na * 2), got_b(nb * 2);
    for (uint32_t replay = 0; replay < 100; ++replay) {
      const uint32_t seed = 1000 + replay;
      const Partial pa = MakePartial(rank_, seed, na, dt),
                    pb = MakePartial(rank_, seed + 500, nb, dt);
      cudaMemcpyAsync(a, pa.bytes.data(), pa.bytes.size(), cudaMemcpyHostToDevice, stream_);
      cudaMemcpyAsync(b, pb.bytes.data(), pb.bytes.size(), cudaMemcpyHostToDevice, stream_);
      if (cudaGraphLaunch(exec, stream_) != cudaSuccess) return Fail("graph launch");
      if (absl::Status s = c.SyncStream(stream_); !s.ok()) return Fail("sync: " + s.ToString());
      cudaMemcpy(got_a.data(), a, got_a.size(), cudaMemcpyDeviceToHost);
      cudaMemcpy(got_b.data(), b, got_b.size(), cudaMemcpyDeviceToHost);
      std::vector<unsigned char> want_a = ReferenceSum(na, dt, seed);
      for (size_t i = 0; i < na; ++i) {  // s + s = 2s: exact in bf16 (barring overflow: none here)
        __nv_bfloat16 v;
        std::memcpy(&v, &want_a[2 * i], 2);
        v = __float2bfloat16(2.0f * __bfloat162float(v));
        std::memcpy(&want_a[2 * i], &v, 2);
      }
      if (long i = FirstDiff(got_a, want_a, 2); i >= 0) {
        return Fail(absl::StrCat("graph replay ", replay, ": decode-sized sum differs at ", i));
      }
      if (long i = FirstDiff(got_b, ReferenceSum(nb, dt, seed + 500), 2); i >= 0) {
        return Fail(absl::StrCat("graph replay ", replay, ": odd-sized sum differs at ", i));
      }
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaFree(a);
    cudaFree(b);
    return 0;
  }

  // Informational (no assertion beyond the calls succeeding): microseconds per all-reduce, custom
  // vs NCCL, each inside a graph of 20 back-to-back calls on one zeroed buffer (sums stay 0),
  // replayed 10 times after 2 warm-up replays; rank 0 prints the table. Sizes: a decode b1, a
  // decode b128 and a 1 x 2048 prefill partial of Phi-2 (2560 columns, bf16). "skewed": rank 1
  // copies 64 MB on the device before each call (~45 us), so rank 0 always waits for it, as a
  // model step's ranks wait for each other: the per-call time should be the copy + the same
  // all-reduce cost for both implementations (a wait that stalls the early rank would show).
  int Timing(NcclCommunicator& c) {
    constexpr int kCalls = 20, kReplays = 10;
    constexpr size_t kSkewBytes = size_t{64} << 20;
    void* skew_src = nullptr;
    void* skew_dst = nullptr;
    if (cudaMalloc(&skew_src, kSkewBytes) != cudaSuccess ||
        cudaMalloc(&skew_dst, kSkewBytes) != cudaSuccess) {
      return Fail("cudaMalloc");
    }
    for (bool skewed : {false, true}) {
      for (size_t count : {size_t{2560}, size_t{128} * 2560, size_t{2048} * 2560}) {
        void* d = nullptr;
        if (cudaMalloc(&d, count * 2) != cudaSuccess) return Fail("cudaMalloc");
        cudaMemset(d, 0, count * 2);
        double us[2] = {0, 0};
        for (int m = 0; m < 2; ++m) {
          c.set_all_reduce_mode(m == 0 ? AllReduceMode::kCustom : AllReduceMode::kNccl);
          cudaGraph_t graph = nullptr;
          cudaGraphExec_t exec = nullptr;
          if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
            return Fail("begin capture");
          }
          absl::Status enq;
          for (int i = 0; i < kCalls && enq.ok(); ++i) {
            if (skewed && rank_ == 1) {
              cudaMemcpyAsync(skew_dst, skew_src, kSkewBytes, cudaMemcpyDeviceToDevice, stream_);
            }
            enq = c.EnqueueAllReduceSum(d, count, DataType::kBF16, stream_);
          }
          if (cudaStreamEndCapture(stream_, &graph) != cudaSuccess || !enq.ok()) {
            return Fail("capture: " + enq.ToString());
          }
          if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) return Fail("instantiate");
          cudaEvent_t t0, t1;
          cudaEventCreate(&t0);
          cudaEventCreate(&t1);
          for (int r = 0; r < 2 + kReplays; ++r) {
            if (r == 2) cudaEventRecord(t0, stream_);
            if (cudaGraphLaunch(exec, stream_) != cudaSuccess) return Fail("graph launch");
          }
          cudaEventRecord(t1, stream_);
          if (absl::Status s = c.SyncStream(stream_); !s.ok()) {
            return Fail("sync: " + s.ToString());
          }
          float ms = 0;
          cudaEventElapsedTime(&ms, t0, t1);
          us[m] = 1000.0 * ms / (kCalls * kReplays);
          cudaEventDestroy(t0);
          cudaEventDestroy(t1);
          cudaGraphExecDestroy(exec);
          cudaGraphDestroy(graph);
        }
        if (rank_ == 0) {
          std::printf("  %s all-reduce of %8zu bf16 (%9zu B): custom %8.2f us, NCCL %8.2f us\n",
                      skewed ? "skewed " : "aligned", count, count * 2, us[0], us[1]);
        }
        cudaFree(d);
      }
    }
    cudaFree(skew_src);
    cudaFree(skew_dst);
    return 0;
  }

  // Waits up to `limit` for the stream to go idle; false if it did not (a kernel still spinning).
  const int rank_;
  const int port_;
  cudaStream_t stream_ = nullptr;
};

std::vector<int> RunTwoRanks(Case which, absl::Duration limit) {
  return peer_test::RunTwoRanks<Rank>(which, limit);
}

void Check(const std::vector<int>& codes) { peer_test::CheckTwoRanks(codes, "custom all-reduce"); }

TEST(CustomAllReduceTest, ParsesTheModeNamingTheVariable) {
  EXPECT_EQ(*ParseAllReduceMode("AUTO"), AllReduceMode::kAuto);
  EXPECT_EQ(*ParseAllReduceMode("nccl"), AllReduceMode::kNccl);
  EXPECT_EQ(*ParseAllReduceMode("Custom"), AllReduceMode::kCustom);
  absl::StatusOr<AllReduceMode> bad = ParseAllReduceMode("p2p");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("PHISHARD_TP_ALLREDUCE=p2p"), std::string::npos);
}

TEST(CustomAllReduceTest, BitIdenticalToNcclOverSizesAndInAGraphReplayed100Times) {
  Check(RunTwoRanks(Case::kCollectives, absl::Seconds(150)));
}

TEST(CustomAllReduceTest, AbortEndsThePeersSpinningKernel) {
  Check(RunTwoRanks(Case::kAbort, absl::Seconds(60)));
}

TEST(CustomAllReduceTest, MissingPeerTimesOutOnTheDevice) {
  Check(RunTwoRanks(Case::kDeadline, absl::Seconds(60)));
}

}  // namespace
}  // namespace phishard
