// Greedy token choice on the device (kernels/greedy_pick.h): GreedyPickCuda against the CPU
// reference GreedyPickCpu (itself checked against NextTokenChooser in
// tests/server/greedy_pick_chooser_test.cc), and CudaPhiModel::ForwardGreedy against Forward's
// full logits rows.
//
// Ids must be equal (both compare the same floats exactly). Logprobs: both sum exp in double and
// round x[id] - lse to float once; only the summation order differs (~1e-16 relative in lse), so
// the results are at most one float ulp apart: checked at 1e-6 x max(1, |logprob|), about 8 ulp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda/greedy_pick_cuda.h"
#include "kernels/greedy_pick.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "tests/gpu/gpu_test_util.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using gpu_test::DeviceBuffer;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

void ExpectSamePick(const GreedyPick& got, const GreedyPick& want, const std::string& where) {
  EXPECT_EQ(got.id, want.id) << where;
  if (std::isnan(want.logprob)) {
    EXPECT_TRUE(std::isnan(got.logprob)) << where << ": " << got.logprob;
  } else if (std::isinf(want.logprob)) {
    EXPECT_EQ(got.logprob, want.logprob) << where;
  } else {
    EXPECT_NEAR(got.logprob, want.logprob, 1e-6 * std::max(1.0f, std::fabs(want.logprob))) << where;
  }
}

// Rows of `cols` floats exercising the rules: ties of the max (first index wins), NaN entries
// (skipped), -inf entries (left out of the sum), +inf (wins, logprob +inf), all-NaN (id 0, NaN),
// all -inf (id 0, NaN), one finite among -inf (logprob 0), large values (max subtraction).
std::vector<std::vector<float>> SpecialRows(int cols, uint64_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-8.0f, 8.0f);
  std::uniform_int_distribution<int> at(0, cols - 1);
  auto random_row = [&] {
    std::vector<float> r(cols);
    for (float& x : r) x = u(rng);
    return r;
  };
  std::vector<std::vector<float>> rows;
  rows.push_back(random_row());
  {  // ties: the max value at three places, the lowest index must win
    std::vector<float> r = random_row();
    const int a = at(rng), b = at(rng), c = at(rng);
    r[a] = r[b] = r[c] = 9.5f;
    rows.push_back(r);
  }
  {  // ties in different chunks of the CUDA kernel: the lowest index wins
    std::vector<float> r = random_row();
    r[cols - 1] = r[cols / 2] = r[cols / 3] = 8.75f;
    rows.push_back(r);
  }
  {  // every entry equal: id 0, logprob -log(cols)
    rows.push_back(std::vector<float>(cols, 1.25f));
  }
  {  // NaNs and -infs sprinkled, the max among them
    std::vector<float> r = random_row();
    for (int i = 0; i < cols; i += 3) r[i] = kNaN;
    for (int i = 1; i < cols; i += 5) r[i] = -kInf;
    rows.push_back(r);
  }
  {  // NaN at index 0 and at the would-be max
    std::vector<float> r = random_row();
    r[0] = kNaN;
    r[at(rng)] = kNaN;
    rows.push_back(r);
  }
  {  // +inf twice: the first wins, logprob +inf
    std::vector<float> r = random_row();
    r[cols - 1] = kInf;
    r[cols / 2] = kInf;
    rows.push_back(r);
  }
  rows.push_back(std::vector<float>(cols, kNaN));   // id 0, NaN
  rows.push_back(std::vector<float>(cols, -kInf));  // id 0, -inf - -inf = NaN
  {                                                 // one finite among -inf: logprob 0
    std::vector<float> r(cols, -kInf);
    r[at(rng)] = -3.0f;
    rows.push_back(r);
  }
  {  // large logits (no max subtraction would overflow exp)
    std::vector<float> r = random_row();
    for (float& x : r) x = x * 10.0f + 1000.0f;
    rows.push_back(r);
  }
  return rows;
}

struct PickShape {
  int cols;
  int parts;     // > 1: the tensor-parallel all-gather layout
  int reps = 1;  // the special rows repeated (rows of several chunk and merge blocks)
};

class CudaGreedyPick : public ::testing::TestWithParam<PickShape> {};

// Rows laid out with padded strides (the padding poisoned with +inf, which must never be read)
// in one or several parts, widths around the kernel's 4096-column chunks (a chunk never spans two
// parts); GreedyPickCuda must give GreedyPickCpu's picks on every row.
TEST_P(CudaGreedyPick, MatchesCpuReference) {
  PHI_REQUIRE_GPU();
  const PickShape s = GetParam();
  std::vector<std::vector<float>> rows;
  for (int k = 0; k < s.reps; ++k) {
    for (std::vector<float>& r : SpecialRows(s.cols, s.cols * 7 + s.parts + k)) rows.push_back(r);
  }
  const int R = static_cast<int>(rows.size());
  const int part_cols = s.cols / s.parts;
  const int64_t row_stride = part_cols + 5;
  const int64_t part_stride = R * row_stride + 3;
  std::vector<float> buf(static_cast<size_t>(part_stride) * s.parts, kInf);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < s.cols; ++c) {
      buf[(c / part_cols) * part_stride + r * row_stride + c % part_cols] = rows[r][c];
    }
  }
  GreedyPickParams p{.rows = R,
                     .cols = s.cols,
                     .part_cols = part_cols,
                     .part_stride = part_stride,
                     .row_stride = row_stride};
  std::vector<GreedyPick> want(R);
  p.logits = buf.data();
  p.out = want.data();
  ASSERT_EQ(GreedyPickCpu(p), KernelStatus::kOk);
  // The reference on the rows as plain vectors: the layout must not matter.
  for (int r = 0; r < R; ++r) {
    GreedyPick plain;
    ASSERT_EQ(GreedyPickCpu({.logits = rows[r].data(),
                             .out = &plain,
                             .rows = 1,
                             .cols = s.cols,
                             .part_cols = s.cols,
                             .row_stride = s.cols}),
              KernelStatus::kOk);
    EXPECT_EQ(plain.id, want[r].id);
    EXPECT_TRUE(std::memcmp(&plain.logprob, &want[r].logprob, sizeof(float)) == 0 ||
                (std::isnan(plain.logprob) && std::isnan(want[r].logprob)));
  }
  DeviceBuffer d_logits = DeviceBuffer::From(buf);
  DeviceBuffer d_out(sizeof(GreedyPick) * R);
  DeviceBuffer d_ws(GreedyPickWorkspaceBytes(R, s.cols, part_cols));
  d_out.Poison();
  d_ws.Poison();
  p.logits = d_logits.as<float>();
  p.out = d_out.as<GreedyPick>();
  p.workspace = d_ws.get();
  ASSERT_EQ(GreedyPickCuda(p, nullptr), KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  const std::vector<char> bytes = d_out.DownloadBytes();
  std::vector<GreedyPick> got(R);
  std::memcpy(got.data(), bytes.data(), bytes.size());
  for (int r = 0; r < R; ++r) {
    ExpectSamePick(got[r], want[r],
                   "cols " + std::to_string(s.cols) + " parts " + std::to_string(s.parts) +
                       " row " + std::to_string(r));
  }
  // Deterministic: a second launch gives the same bits (every TP rank must agree).
  DeviceBuffer d_out2(sizeof(GreedyPick) * R);
  p.out = d_out2.as<GreedyPick>();
  ASSERT_EQ(GreedyPickCuda(p, nullptr), KernelStatus::kOk);
  EXPECT_EQ(d_out2.DownloadBytes(), bytes);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaGreedyPick,
                         ::testing::Values(PickShape{1, 1}, PickShape{7, 1}, PickShape{511, 1},
                                           PickShape{513, 1}, PickShape{4095, 1},
                                           PickShape{4096, 1}, PickShape{4097, 1},
                                           PickShape{8194, 2}, PickShape{12288, 3},
                                           PickShape{50257, 1}, PickShape{51200, 1},
                                           PickShape{51200, 2}, PickShape{1026, 3},
                                           PickShape{51200, 1, 24}, PickShape{51200, 4},
                                           // > 32 chunks a row: a merge lane takes several
                                           PickShape{140000, 1}, PickShape{140000, 2}));

TEST(CudaGreedyPickArgs, BadShapesAreRefused) {
  float x = 0;
  GreedyPick out;
  EXPECT_EQ(GreedyPickCuda(
                {.logits = &x, .out = &out, .rows = 1, .cols = 0, .part_cols = 0, .row_stride = 1},
                nullptr),
            KernelStatus::kInvalidShape);
  EXPECT_EQ(GreedyPickCuda({.logits = &x,
                            .out = &out,
                            .rows = 1,
                            .cols = 10,
                            .part_cols = 3,
                            .part_stride = 30,
                            .row_stride = 3},
                           nullptr),
            KernelStatus::kInvalidShape);  // 10 columns are not whole parts of 3
  EXPECT_EQ(
      GreedyPickCuda({.out = &out, .rows = 1, .cols = 4, .part_cols = 4, .row_stride = 4}, nullptr),
      KernelStatus::kNullPointer);
  EXPECT_EQ(GreedyPickCuda(
                {.logits = &x, .out = &out, .rows = 1, .cols = 4, .part_cols = 4, .row_stride = 4},
                nullptr),
            KernelStatus::kNullPointer);  // the CUDA path needs its workspace
}

// ---------------------------------------------------------------------------------------------
// CudaPhiModel::ForwardGreedy on the tiny model: decode steps (graph replays and their eager
// first steps) with a changing mix of marked rows. A second model runs the same steps through
// Forward; each marked row's pick must be GreedyPickCpu of that row, each unmarked row's logits
// the same bits.
TEST(CudaForwardGreedy, MarkedRowsPickedUnmarkedRowsUnchanged) {
  PHI_REQUIRE_GPU();
  const fs::path dir = fs::path(PHISHARD_MODELS) / "tiny-phi-code";
  std::unique_ptr<CudaPhiModel> full, greedy;
  for (auto* m : {&full, &greedy}) {
    absl::StatusOr<std::unique_ptr<CudaPhiModel>> l =
        CudaPhiModel::Load(dir, {.dtype = "bfloat16", .reserve_tokens = 256});
    ASSERT_TRUE(l.ok()) << l.status();
    *m = *std::move(l);
    ASSERT_TRUE((*m)->AllocateKvCache(8 * 8 + 1, kKvBlockSize).ok());
  }
  const int V = full->config().vocab_size;
  std::vector<int> ctx(8, 0);
  std::vector<std::vector<int32_t>> blocks(8);
  for (int s = 0; s < 8; ++s) {
    blocks[s].resize(8);
    std::iota(blocks[s].begin(), blocks[s].end(), s * 8 + 1);
  }
  // Prefill: every sequence 3 + s tokens; its last row marked greedy on even sequences (a
  // prefill step: the host computes the picks from full rows).
  auto prefill = [&] {
    ForwardBatch b;
    for (int s = 0; s < 8; ++s) {
      for (int i = 0; i < 3 + s; ++i) {
        b.token_ids.push_back((s * 131 + i * 17 + 5) % V);
        b.positions.push_back(i);
      }
      ctx[s] = 3 + s;
      b.logit_rows.push_back(b.num_tokens() - 1);
      b.greedy_rows.push_back(s % 2 == 0);
      b.seqs.push_back({.num_new_tokens = ctx[s], .context_len = ctx[s], .block_table = blocks[s]});
    }
    return b;
  };
  int marked = 0;
  auto check = [&](const ForwardBatch& b, int step) {
    std::vector<float> ref;
    absl::Span<const float> view;
    absl::Span<const GreedyPick> picks;
    ASSERT_TRUE(full->Forward(b, &ref).ok());
    absl::Status st = greedy->ForwardGreedy(b, &view, &picks);
    ASSERT_TRUE(st.ok()) << st;
    const size_t R = b.logit_rows.size();
    ASSERT_EQ(view.size(), R * V);
    ASSERT_EQ(picks.size(), R);
    for (size_t r = 0; r < R; ++r) {
      const std::string where = "step " + std::to_string(step) + " row " + std::to_string(r);
      if (b.greedy_rows[r]) {
        GreedyPick want;
        ASSERT_EQ(GreedyPickCpu({.logits = ref.data() + r * V,
                                 .out = &want,
                                 .rows = 1,
                                 .cols = V,
                                 .part_cols = V,
                                 .row_stride = V}),
                  KernelStatus::kOk);
        ExpectSamePick(picks[r], want, where);
        ++marked;
      } else {
        EXPECT_EQ(std::memcmp(view.data() + r * V, ref.data() + r * V, sizeof(float) * V), 0)
            << where << ": unmarked row's logits differ";
      }
    }
  };
  check(prefill(), -1);
  for (int step = 0; step < 24; ++step) {
    ForwardBatch b;
    const int n = 1 + (step * 5) % 8;  // batch sizes 1..8 across buckets 1, 2, 4, 8
    for (int j = 0; j < n; ++j) {
      const int s = (j + step) % 8;
      b.token_ids.push_back((ctx[s] * 31 + s * 7 + step) % V);
      b.positions.push_back(ctx[s]);
      ++ctx[s];
      b.seqs.push_back({.num_new_tokens = 1, .context_len = ctx[s], .block_table = blocks[s]});
      if (step % 4 == 3 && j % 2 == 1) continue;  // some steps skip rows
      b.logit_rows.push_back(j);
      // All marked, none marked, or a mix, by step.
      b.greedy_rows.push_back(step % 3 == 0 ? 1 : step % 3 == 1 ? 0 : (j + step) % 2);
    }
    check(b, step);
  }
  EXPECT_GT(marked, 40);
  EXPECT_GT(greedy->decode_graph_replays(), 10) << "the greedy steps must run as graph replays";
}

}  // namespace
}  // namespace phishard
