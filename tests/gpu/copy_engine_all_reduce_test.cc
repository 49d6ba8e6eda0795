// The copy-engine all-reduce (parallel/copy_engine_all_reduce.h) of NcclCommunicator across two
// processes, one GPU each (needs >= 2 visible GPUs with peer access; skips otherwise). Each rank
// is a forked child: the parent (the gtest process) never touches CUDA.
//
// Tolerance: none. A two-rank sum is one rounding of float(a) + float(b) on every path (the copy
// engine + add kernel, the custom kernel, NCCL's ring, this file's naive host reference), and that
// is commutative, so ranks and implementations must agree bit for bit (random values with
// exponents 2^-12..2^12: sums that round, cancel and carry).
#include "parallel/copy_engine_all_reduce.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "parallel/nccl_communicator.h"
#include "tests/gpu/peer_all_reduce_test_util.h"

namespace phishard {
namespace {

using peer_test::FirstDiff;
using peer_test::kNoP2p;
using peer_test::MakePartial;
using peer_test::Partial;
using peer_test::ReferenceSum;

enum class Case { kCollectives, kAbort, kDeadline };

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
    if (!c.copy_engine_all_reduce_ready()) {
      std::fprintf(stderr, "rank %d: copy-engine all-reduce unavailable (see the log)\n", rank_);
      return kNoP2p;
    }
    if (cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) != cudaSuccess ||
        cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking) != cudaSuccess) {
      return Fail("stream");
    }
    c.set_all_reduce_mode(AllReduceMode::kCopy);
    if (!c.UsesCopyEngineAllReduce()) return Fail("mode copy does not pick the copy engine");
    auto overlapped = [&c](void* d, size_t count, cudaStream_t s) {
      return c.EnqueueOverlappedAllReduceSum(d, count, DataType::kBF16, s);
    };
    switch (which) {
      case Case::kCollectives: {
        int code = Sizes(c);
        if (code == 0) code = Chunked(c);
        if (code == 0) code = CaptureRefused(c);
        if (code == 0) code = Timing(c);
        return code;
      }
      case Case::kAbort:
        // The side stream waits on rank 1's arrival flag until the abort flag ends it.
        return peer_test::AbortCase(c, rank_, 1024 * 2560, side_, overlapped);
      case Case::kDeadline:
        return peer_test::DeadlineCase(c, rank_, side_, overlapped);
    }
    return 1;
  }

 private:
  int Fail(const std::string& what) { return peer_test::Fail(rank_, what); }

  // One all-reduce of this rank's partial for `seed`: the copy engine (EnqueueOverlapped under
  // kCopy) or the custom kernel (EnqueueAllReduceSum under kCustom); the result downloaded.
  int Reduce(NcclCommunicator& c, bool copy_engine, void* d, size_t count, DataType dtype,
             uint32_t seed, std::vector<unsigned char>* out) {
    const Partial mine = MakePartial(rank_, seed, count, dtype);
    cudaMemcpy(d, mine.bytes.data(), mine.bytes.size(), cudaMemcpyHostToDevice);
    c.set_all_reduce_mode(copy_engine ? AllReduceMode::kCopy : AllReduceMode::kCustom);
    absl::Status s = copy_engine ? c.EnqueueOverlappedAllReduceSum(d, count, dtype, stream_)
                                 : c.EnqueueAllReduceSum(d, count, dtype, stream_);
    if (!s.ok()) return Fail("enqueue: " + s.ToString());
    if (absl::Status w = c.SyncStream(stream_); !w.ok()) return Fail("sync: " + w.ToString());
    out->resize(mine.bytes.size());
    cudaMemcpy(out->data(), d, out->size(), cudaMemcpyDeviceToHost);
    c.set_all_reduce_mode(AllReduceMode::kCopy);
    return 0;
  }

  // Copy engine vs the custom kernel vs the host reference over sizes (single-element path for odd
  // byte counts; a 1 x 2048 Phi-2 prefill partial and its halves; one element more than a receive
  // half, i.e. two pieces; f16 and f32), then the same with small pieces: 64 KiB (a 10.5 MB call
  // in 160 pieces) and 48 bytes (an odd count in pieces of 24 bf16).
  int Sizes(NcclCommunicator& c) {
    struct Size {
      size_t count;
      DataType dtype;
      size_t piece_bytes;  // 0: the default (a whole receive half)
    };
    const size_t over = CustomAllReduce::kDefaultCapacityBytes / 2 + 1;
    const std::vector<Size> sizes = {
        {1, DataType::kBF16, 0},
        {7, DataType::kBF16, 0},
        {4097, DataType::kBF16, 0},
        {1024 * 2560, DataType::kBF16, 0},
        {2048 * 2560, DataType::kBF16, 0},
        {over, DataType::kBF16, 0},
        {7, DataType::kF16, 0},
        {128 * 2560, DataType::kF16, 0},
        {4099, DataType::kF32, 0},
        {128 * 2560, DataType::kF32, 0},
        {2048 * 2560, DataType::kBF16, 64 << 10},
        {4097, DataType::kBF16, 48},
    };
    uint32_t seed = 1;
    for (const Size& s : sizes) {
      const size_t es = DataTypeSize(s.dtype);
      const std::string at = absl::StrCat(" (", s.count, " ", DataTypeName(s.dtype), ", pieces of ",
                                          s.piece_bytes, " B)");
      void* d = nullptr;
      if (cudaMalloc(&d, s.count * es) != cudaSuccess) return Fail("cudaMalloc" + at);
      c.set_copy_engine_piece_bytes(s.piece_bytes == 0 ? CustomAllReduce::kDefaultCapacityBytes
                                                       : s.piece_bytes);
      std::vector<unsigned char> ce, custom;
      if (Reduce(c, true, d, s.count, s.dtype, seed, &ce) != 0) return Fail("copy engine" + at);
      const bool fits = s.count * es <= CustomAllReduce::kDefaultCapacityBytes;
      if (fits && Reduce(c, false, d, s.count, s.dtype, seed, &custom) != 0) {
        return Fail("custom" + at);
      }
      const std::vector<unsigned char> want = ReferenceSum(s.count, s.dtype, seed);
      if (long i = FirstDiff(ce, want, es); i >= 0) {
        return Fail(absl::StrCat("copy engine != reference at ", i, at));
      }
      if (fits) {
        if (long i = FirstDiff(custom, want, es); i >= 0) {
          return Fail(absl::StrCat("custom != reference at ", i, at));
        }
      }
      cudaFree(d);
      ++seed;
    }
    c.set_copy_engine_piece_bytes(CustomAllReduce::kDefaultCapacityBytes);
    return 0;
  }

  // The overlapped prefill's pattern: a [rows, 2560] bf16 buffer in 1, 2 and 3 row chunks (16-row
  // boundaries as SplitPrefillRows makes them), each chunk's all-reduce on a side stream after an
  // event on the main stream, 33 all-reduces per "step" (a Phi-2 step: embedding + 32 layers),
  // 20 steps per chunk count. Inputs cycle through 3 seeds, so a call that read the receive half
  // of two calls before (same half, other seed) would differ from its reference.
  int Chunked(NcclCommunicator& c) {
    const int rows = 600, cols = 2560, kSeeds = 3;
    const size_t n = static_cast<size_t>(rows) * cols;
    void* d = nullptr;
    if (cudaMalloc(&d, n * 2) != cudaSuccess) return Fail("cudaMalloc");
    cudaEvent_t ready;
    cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
    std::vector<Partial> mine;
    std::vector<std::vector<unsigned char>> want;
    for (int k = 0; k < kSeeds; ++k) {
      mine.push_back(MakePartial(rank_, 5000 + k, n, DataType::kBF16));
      want.push_back(ReferenceSum(n, DataType::kBF16, 5000 + k));
    }
    std::vector<unsigned char> got(n * 2);
    int call_no = 0;
    for (int chunks : {1, 2, 3}) {
      std::vector<int> begin = {0};
      for (int k = 1; k < chunks; ++k) begin.push_back(rows * k / chunks / 16 * 16);
      begin.push_back(rows);
      for (int step = 0; step < 20; ++step) {
        for (int call = 0; call < 33; ++call, ++call_no) {
          const int which = call_no % kSeeds;
          cudaMemcpyAsync(d, mine[which].bytes.data(), n * 2, cudaMemcpyHostToDevice, stream_);
          for (int k = 0; k < chunks; ++k) {
            cudaEventRecord(ready, stream_);
            cudaStreamWaitEvent(side_, ready, 0);
            char* at = static_cast<char*>(d) + static_cast<size_t>(begin[k]) * cols * 2;
            const size_t count = static_cast<size_t>(begin[k + 1] - begin[k]) * cols;
            if (absl::Status s = c.EnqueueOverlappedAllReduceSum(at, count, DataType::kBF16, side_);
                !s.ok()) {
              return Fail("enqueue: " + s.ToString());
            }
          }
          if (absl::Status s = c.SyncStream(side_); !s.ok()) return Fail("sync: " + s.ToString());
          cudaMemcpy(got.data(), d, got.size(), cudaMemcpyDeviceToHost);
          if (long i = FirstDiff(got, want[which], 2); i >= 0) {
            return Fail(absl::StrCat(chunks, " chunks, step ", step, ", call ", call,
                                     ": sum differs at ", i));
          }
        }
      }
    }
    cudaEventDestroy(ready);
    cudaFree(d);
    return 0;
  }

  // Capturing it into a graph is refused (FAILED_PRECONDITION naming the graph) without breaking
  // the group: an all-reduce after it still pairs up and is exact.
  int CaptureRefused(NcclCommunicator& c) {
    const size_t n = 4096;
    void* d = nullptr;
    if (cudaMalloc(&d, n * 2) != cudaSuccess) return Fail("cudaMalloc");
    if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
      return Fail("begin capture");
    }
    absl::Status s = c.EnqueueOverlappedAllReduceSum(d, n, DataType::kBF16, stream_);
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (s.code() != absl::StatusCode::kFailedPrecondition ||
        s.message().find("CUDA graph") == std::string::npos) {
      return Fail("capture: want FAILED_PRECONDITION naming the graph, got " + s.ToString());
    }
    std::vector<unsigned char> got;
    if (Reduce(c, true, d, n, DataType::kBF16, 77, &got) != 0) return Fail("after the capture");
    if (long i = FirstDiff(got, ReferenceSum(n, DataType::kBF16, 77), 2); i >= 0) {
      return Fail(absl::StrCat("after the capture: differs at ", i));
    }
    cudaFree(d);
    return 0;
  }

  // Informational (no assertion beyond the calls succeeding): microseconds per all-reduce of a
  // zeroed buffer, 20 back-to-back eager calls after 5 warm-up ones, copy engine vs custom kernel,
  // at a decode b128, half a 1 x 2048 prefill and a whole one (Phi-2, bf16); rank 0 prints.
  int Timing(NcclCommunicator& c) {
    constexpr int kWarm = 5, kCalls = 20;
    for (size_t count : {size_t{128} * 2560, size_t{1024} * 2560, size_t{2048} * 2560}) {
      void* d = nullptr;
      if (cudaMalloc(&d, count * 2) != cudaSuccess) return Fail("cudaMalloc");
      cudaMemset(d, 0, count * 2);
      double us[2] = {0, 0};
      for (int m = 0; m < 2; ++m) {
        c.set_all_reduce_mode(m == 0 ? AllReduceMode::kCopy : AllReduceMode::kCustom);
        cudaEvent_t t0, t1;
        cudaEventCreate(&t0);
        cudaEventCreate(&t1);
        for (int i = 0; i < kWarm + kCalls; ++i) {
          if (i == kWarm) cudaEventRecord(t0, stream_);
          absl::Status s = c.EnqueueOverlappedAllReduceSum(d, count, DataType::kBF16, stream_);
          if (!s.ok()) return Fail("enqueue: " + s.ToString());
        }
        cudaEventRecord(t1, stream_);
        if (absl::Status s = c.SyncStream(stream_); !s.ok()) return Fail("sync: " + s.ToString());
        float ms = 0;
        cudaEventElapsedTime(&ms, t0, t1);
        us[m] = 1000.0 * ms / kCalls;
        cudaEventDestroy(t0);
        cudaEventDestroy(t1);
      }
      if (rank_ == 0) {
        std::printf("  all-reduce of %8zu bf16 (%9zu B): copy engine %8.2f us, custom %8.2f us\n",
                    count, count * 2, us[0], us[1]);
      }
      cudaFree(d);
    }
    c.set_all_reduce_mode(AllReduceMode::kCopy);
    return 0;
  }

  const int rank_;
  const int port_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t side_ = nullptr;
};

std::vector<int> RunTwoRanks(Case which, absl::Duration limit) {
  return peer_test::RunTwoRanks<Rank>(which, limit);
}

void Check(const std::vector<int>& codes) {
  peer_test::CheckTwoRanks(codes, "copy-engine all-reduce");
}

TEST(CopyEngineAllReduceTest, ParsesCopyMode) {
  EXPECT_EQ(*ParseAllReduceMode("COPY"), AllReduceMode::kCopy);
  EXPECT_STREQ(AllReduceModeName(AllReduceMode::kCopy), "copy");
}

TEST(CopyEngineAllReduceTest, BitIdenticalOverSizesPiecesAndRowChunksRepeated) {
  Check(RunTwoRanks(Case::kCollectives, absl::Seconds(150)));
}

TEST(CopyEngineAllReduceTest, AbortEndsThePeersWait) {
  Check(RunTwoRanks(Case::kAbort, absl::Seconds(60)));
}

TEST(CopyEngineAllReduceTest, MissingPeerTimesOutOnTheDevice) {
  Check(RunTwoRanks(Case::kDeadline, absl::Seconds(60)));
}

}  // namespace
}  // namespace phishard
