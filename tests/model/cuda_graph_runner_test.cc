// CudaGraphRunner's bookkeeping (model/cuda_graph_runner.h): buckets, variants and the errors of
// a replay without a graph — host code, no GPU (capturing and replaying graphs is tested on the
// device by tests/gpu/cuda_graph_test.cc).
#include <string>
#include <vector>

#include "gtest/gtest.h"

#ifdef PHISHARD_HAVE_CUDA
#include "absl/status/status.h"
#include "model/cuda_graph_runner.h"
#endif

namespace phishard {
namespace {

#ifdef PHISHARD_HAVE_CUDA

TEST(CudaGraphRunner, BucketsArePowersOfTwoThenTheMax) {
  CudaGraphRunner r(48);
  EXPECT_EQ(r.buckets(), (std::vector<int>{1, 2, 4, 8, 16, 32, 48}));
  EXPECT_EQ(r.max_batch(), 48);
  EXPECT_EQ(r.Bucket(0), 0);
  EXPECT_EQ(r.Bucket(1), 1);
  EXPECT_EQ(r.Bucket(3), 4);
  EXPECT_EQ(r.Bucket(33), 48);
  EXPECT_EQ(r.Bucket(48), 48);
  EXPECT_EQ(r.Bucket(49), 0) << "above the largest bucket: no graph";
  CudaGraphRunner one(0);  // clamped to one bucket of 1
  EXPECT_EQ(one.buckets(), (std::vector<int>{1}));
}

TEST(CudaGraphRunner, EmptyRunnerHasNoGraphInAnyVariant) {
  CudaGraphRunner r(8, /*variants=*/4);
  EXPECT_EQ(r.num_graphs(), 0);
  for (int b : r.buckets()) {
    for (int v = -1; v <= 4; ++v) EXPECT_FALSE(r.Has(b, v)) << "bucket " << b << " variant " << v;
  }
  EXPECT_FALSE(r.Has(3)) << "3 is not a bucket";
}

TEST(CudaGraphRunner, ReplayWithoutAGraphNamesBucketAndVariant) {
  CudaGraphRunner r(8, /*variants=*/2);
  const absl::Status st = r.Replay(8, nullptr, 1);
  EXPECT_TRUE(absl::IsFailedPrecondition(st)) << st;
  EXPECT_NE(std::string(st.message()).find("batch size 8 (variant 1)"), std::string::npos) << st;
  // A variant past the runner's count, or a non-bucket size, is the same refusal.
  EXPECT_TRUE(absl::IsFailedPrecondition(r.Replay(8, nullptr, 2)));
  EXPECT_TRUE(absl::IsFailedPrecondition(r.Replay(5, nullptr)));
  EXPECT_EQ(r.replays(), 0);
  r.Clear();  // nothing to destroy
  EXPECT_EQ(r.num_graphs(), 0);
  EXPECT_EQ(r.total_nodes(), 0u);
}

#else

TEST(CudaGraphRunner, NeedsTheCudaBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace phishard
