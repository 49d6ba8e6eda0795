// Shared by the CudaPhiModel end-to-end tests (cuda_model_test.cc: goldens, CPU comparison, input
// checks; cuda_model_options_test.cc: the model's switches against its default path): models
// loaded on the GPU, one-sequence and three-sequence batches, and the bf16 closeness check.
//
// bf16 tolerances. The CUDA backend rounds every activation to bf16 (unit 2^-9) after each op, so
// it cannot match float32 to the CPU golden test's 1e-4. The bounds below come from a numpy
// emulation of exactly this backend's rounding schedule (bf16 after LN, each GEMM, rotary, the
// attention probabilities and output, each residual add; float32 logits) on all 17 fixture
// cases, which also reproduced HF's float32 logits to 6e-6:
//   max |logit - ref| / max(1, max |ref|)   worst 0.0074   -> kLogitFrac 0.02
//   ‖logits - ref‖ / ‖ref‖                   worst 0.0055   -> kLogitNormRel 0.015
// (cuda_model_test.cc adds the near-tie and logprob bounds of its golden checks.)
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "model/model_backend.h"

namespace phishard::model_test {

namespace fs = std::filesystem;

inline const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();

inline constexpr double kLogitFrac = 0.02;
inline constexpr double kLogitNormRel = 0.015;

inline std::unique_ptr<CudaPhiModel> LoadCuda(const fs::path& dir, const std::string& dtype = "") {
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> m =
      CudaPhiModel::Load(dir, {.dtype = dtype, .device = 0, .reserve_tokens = 256});
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

// The two fixture models (tiny-phi-code; the GQA head-dim-80 one) in bf16 with a 16-block KV
// cache, each with its folder under the repo; one that does not load fails the test (LoadCuda's
// EXPECT) and is left out.
struct FixtureModel {
  std::string name;
  std::unique_ptr<CudaPhiModel> m;
};
inline std::vector<FixtureModel> FixtureModelsBf16() {
  std::vector<FixtureModel> out;
  for (const char* name : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / name, "bfloat16");
    if (m == nullptr) continue;
    const absl::Status st = m->AllocateKvCache(16, kKvBlockSize);
    EXPECT_TRUE(st.ok()) << name << ": " << st;
    if (st.ok()) out.push_back({name, std::move(m)});
  }
  return out;
}

inline double Scale(const std::vector<double>& ref) {
  double s = 1.0;
  for (double x : ref) s = std::max(s, std::fabs(x));
  return s;
}

// `ours` against `ref` (same length) within kLogitFrac and kLogitNormRel; prints the errors.
inline void ExpectLogitsClose(const std::vector<float>& ours, const std::vector<double>& ref,
                              const std::string& what) {
  ASSERT_EQ(ours.size(), ref.size()) << what;
  double num = 0, den = 0, worst = 0;
  size_t nonfinite = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(ours[i])) {
      ++nonfinite;
      continue;
    }
    const double d = ours[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
    worst = std::max(worst, std::fabs(d));
  }
  const double scale = Scale(ref);
  EXPECT_EQ(nonfinite, 0u) << what;
  EXPECT_LE(worst, kLogitFrac * scale) << what << " (logit scale " << scale << ")";
  EXPECT_LE(std::sqrt(num / std::max(den, 1e-30)), kLogitNormRel) << what;
  std::printf("  %-48s max|d| %.4f (%.4f of scale %.1f), norm rel %.4f\n", what.c_str(), worst,
              worst / scale, scale, std::sqrt(num / std::max(den, 1e-30)));
}

// One sequence of `ids` after `past` cached tokens; logits of every row or of the last one.
inline ForwardBatch OneSequence(const std::vector<int32_t>& ids, int past,
                                const std::vector<int32_t>& blocks, bool all_rows) {
  ForwardBatch b;
  b.token_ids = ids;
  const int n = static_cast<int>(ids.size());
  for (int i = 0; i < n; ++i) b.positions.push_back(past + i);
  b.seqs.push_back({.num_new_tokens = n, .context_len = past + n, .block_table = blocks});
  if (all_rows) {
    b.logit_rows.resize(n);
    std::iota(b.logit_rows.begin(), b.logit_rows.end(), 0);
  } else {
    b.logit_rows = {n - 1};
  }
  return b;
}

// Consecutive block ids from `first`, enough for `tokens` tokens.
inline std::vector<int32_t> Blocks(int first, int tokens) {
  std::vector<int32_t> b(KvBlockAllocator::BlocksFor(tokens));
  std::iota(b.begin(), b.end(), first);
  return b;
}

// The batches CompareWithCpu and MlpStreamModesAgree run: a prefill of three sequences of
// kThreeLens tokens (every row's logits), then decode step d of all three (ctx: their context
// lengths, advanced by one).
inline const std::vector<int> kThreeLens = {5, 17, 40};

inline ForwardBatch ThreeSequencePrefill(int V, const std::vector<std::vector<int32_t>>& tables) {
  const std::vector<int>& lens = kThreeLens;
  ForwardBatch b;
  for (int s = 0; s < 3; ++s) {
    for (int i = 0; i < lens[s]; ++i) {
      b.token_ids.push_back((s * 977 + i * 131 + 7) % V);
      b.positions.push_back(i);
    }
    b.seqs.push_back({.num_new_tokens = lens[s], .context_len = lens[s], .block_table = tables[s]});
  }
  b.logit_rows.resize(b.token_ids.size());
  std::iota(b.logit_rows.begin(), b.logit_rows.end(), 0);
  return b;
}

inline ForwardBatch ThreeSequenceDecode(int V, int d,
                                        const std::vector<std::vector<int32_t>>& tables,
                                        std::vector<int>* ctx_out) {
  std::vector<int>& ctx = *ctx_out;
  ForwardBatch dec;
  for (int s = 0; s < 3; ++s) {
    dec.token_ids.push_back((d * 53 + s * 11 + 1) % V);
    dec.positions.push_back(ctx[s]);
    ++ctx[s];
    dec.seqs.push_back({.num_new_tokens = 1, .context_len = ctx[s], .block_table = tables[s]});
  }
  dec.logit_rows = {0, 1, 2};
  return dec;
}

}  // namespace phishard::model_test
