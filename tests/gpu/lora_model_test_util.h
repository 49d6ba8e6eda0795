// Shared by the multi-LoRA model tests (cuda_lora_model_test.cc, cuda_lora_prefill_test.cc): the
// peft golden fixture (tests/golden/tiny-phi-code-adapters.json, peft 0.21 float32) and its
// adapters, models loaded on the GPU, the mixed batches and the bf16 closeness check.
//
// bf16 tolerances: the same bounds as cuda_model_test_util.h's (max |logit - ref| <= 0.02 x scale,
// ‖d‖/‖ref‖ <= 0.015; derived there from an emulation of this backend's rounding schedule, worst
// 0.0074 / 0.0055). LoRA adds the rounding of A and B to bf16 (relative 2^-9 per element, averaged
// over r x in terms) and one rounding of each adapted output, which is small against the base
// model's rounding after every op; a wrong scale (rsLoRA's alpha/sqrt(r) vs alpha/r is 4x here), a
// missing module or the fc1 delta after the GELU moves logits by far more (the adapters change the
// greedy tokens of every case, see greedy_differs_from_base in the fixture).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "model/adapter_registry.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "model/model_backend.h"
#include "nlohmann/json.hpp"

namespace phishard::lora_test {

namespace fs = std::filesystem;
using json = nlohmann::json;

inline const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();
inline constexpr double kLogitFrac = 0.02;
inline constexpr double kLogitNormRel = 0.015;
inline constexpr double kTieFrac = 0.008;

inline json ReadGolden() {
  std::ifstream in(kRepo / "tests" / "golden" / "tiny-phi-code-adapters.json");
  EXPECT_TRUE(in.good());
  return json::parse(in);
}

inline std::unique_ptr<CudaPhiModel> LoadCuda(const fs::path& dir, bool graphs = true) {
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> m = CudaPhiModel::Load(
      dir, {.dtype = "bfloat16", .device = 0, .reserve_tokens = 256, .cuda_graphs = graphs});
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return nullptr;
  EXPECT_TRUE((*m)->AllocateKvCache(256, kKvBlockSize).ok());
  return *std::move(m);
}

inline std::unique_ptr<AdapterRegistry> MakeRegistry(int bytes_per_param, int slots = 8) {
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> r =
      AdapterRegistry::Create(slots, int64_t{256} << 20, bytes_per_param);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *std::move(r) : nullptr;
}

inline LoraAdapter LoadAdapter(const json& a, const PhiConfig& c) {
  absl::StatusOr<LoraAdapter> ad = LoraAdapter::LoadDir(kRepo / a.at("path").get<std::string>(), c);
  EXPECT_TRUE(ad.ok()) << ad.status();
  return ad.ok() ? *std::move(ad) : LoraAdapter("failed", 0);
}

// The base model of the adapter fixtures.
inline fs::path TinyPhiDir() { return kRepo / "models" / "tiny-phi-code"; }

// A registry holding the golden fixture's adapters at indices 3, 4, 5, ... (fixture order);
// nullptr (and a failed expectation) when one does not load.
inline std::unique_ptr<AdapterRegistry> GoldenAdapters(const PhiConfig& c,
                                                       int bytes_per_param = 2) {
  std::unique_ptr<AdapterRegistry> reg = MakeRegistry(bytes_per_param);
  if (!reg) return nullptr;
  // The fixture is held by name: a range-for over ReadGolden().at(...) would iterate a destroyed
  // temporary (C++20 extends only the range's own lifetime) and load nothing.
  const json golden = ReadGolden();
  const json& adapters = golden.at("adapters");
  EXPECT_GE(adapters.size(), 3u) << "the adapter fixture lists too few adapters";
  if (adapters.size() < 3) return nullptr;
  uint32_t idx = 3;
  for (const json& a : adapters) {
    const absl::StatusOr<AdapterLoadResult> st = reg->Load(idx++, LoadAdapter(a, c));
    EXPECT_TRUE(st.ok()) << st.status();
    if (!st.ok()) return nullptr;
  }
  return reg;
}

struct Closeness {
  double worst = 0, rel = 0, scale = 1;
};

inline Closeness Compare(const float* got, const float* want, size_t n) {
  Closeness c;
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) c.scale = std::max(c.scale, std::fabs(double{want[i]}));
  for (size_t i = 0; i < n; ++i) {
    const double d = std::isfinite(got[i]) ? double{got[i]} - want[i] : INFINITY;
    c.worst = std::max(c.worst, std::fabs(d));
    num += d * d;
    den += double{want[i]} * want[i];
  }
  c.rel = std::sqrt(num / std::max(den, 1e-30));
  return c;
}

inline void ExpectClose(const float* got, const float* want, size_t n, const std::string& what) {
  const Closeness c = Compare(got, want, n);
  EXPECT_LE(c.worst, kLogitFrac * c.scale) << what << " (scale " << c.scale << ")";
  EXPECT_LE(c.rel, kLogitNormRel) << what;
}

inline int Argmax(const float* row, int v) {
  return static_cast<int>(std::max_element(row, row + v) - row);
}

inline std::vector<int32_t> Blocks(int first, int tokens) {
  std::vector<int32_t> b(KvBlockAllocator::BlocksFor(tokens));
  std::iota(b.begin(), b.end(), first);
  return b;
}

// How prefill steps with adapters run: the SGMV kernels, or the GEMM form (model/
// cuda_lora_gemm.cc) with the concatenated expands or with one expand GEMM per segment.
enum class Form { kSgmv, kGemm, kSegmented };
inline const char* FormName(Form f) {
  return f == Form::kSgmv ? "SGMV" : f == Form::kGemm ? "GEMM-form" : "segmented GEMM-form";
}

// Sets the environment CudaLora reads at construction for the models loaded in its scope:
// PHISHARD_LORA_GEMM_MIN_ROWS=1 sends every prefill step with adapters through the GEMM form;
// kGemm keeps its concatenated expands (PHISHARD_LORA_GEMM_MAX_SEGMENTS=0), kSegmented takes the
// per-segment expands however short the segments (PHISHARD_LORA_GEMM_SEGMENT_ROWS=1).
class GemmFormEnv {
 public:
  explicit GemmFormEnv(Form form) {
    if (form != Form::kSgmv) setenv("PHISHARD_LORA_GEMM_MIN_ROWS", "1", 1);
    if (form == Form::kGemm) setenv("PHISHARD_LORA_GEMM_MAX_SEGMENTS", "0", 1);
    if (form == Form::kSegmented) setenv("PHISHARD_LORA_GEMM_SEGMENT_ROWS", "1", 1);
  }
  ~GemmFormEnv() {
    unsetenv("PHISHARD_LORA_GEMM_MIN_ROWS");
    unsetenv("PHISHARD_LORA_GEMM_MAX_SEGMENTS");
    unsetenv("PHISHARD_LORA_GEMM_SEGMENT_ROWS");
  }
};

struct Req {
  std::vector<int32_t> prompt;
  uint32_t adapter;
  int id;  // picks the request's decode tokens, the same in a batch and alone
};

// Base, adapter 3, adapter 3 again (one segment over two sequences), an index nobody loaded
// (base), adapter 4, base, adapter 5: prompts of 1..13 tokens (odd lengths, 1-row segments);
// 35 rows, 7 requests.
inline std::vector<Req> MixedRequests() {
  return {{{1932, 221, 17}, 0, 0},
          {{5, 6, 7, 8, 9, 10, 11}, 3, 1},
          {{300}, 3, 2},
          {{44, 45, 46, 47, 48}, 77, 3},
          {{12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24}, 4, 4},
          {{900, 901}, 0, 5},
          {{33, 34, 35, 36}, 5, 6}};
}

// A shorter mix for the decode tests: base rows, an index nobody loaded, adapters 3, 4 (in two
// sequences) and 5.
inline std::vector<Req> ShortMixedRequests() {
  return {{{1932, 221, 17}, 0, 0},       {{5, 6, 7, 8, 9, 10, 11}, 4, 1}, {{300}, 3, 2},
          {{44, 45, 46, 47, 48}, 77, 3}, {{12, 13, 14, 15}, 5, 4},        {{33, 34, 35, 36}, 4, 5}};
}

// Prefill of all requests (every row's logits, or with last_rows_only each request's last row,
// as serving asks), then `steps` decode steps feeding token (7 id + 3 step + 1) % V; returns each
// step's logits (all logit rows of the batch).
inline std::vector<std::vector<float>> RunBatch(ModelBackend& m, const std::vector<Req>& reqs,
                                                int first_block, int steps,
                                                bool last_rows_only = false) {
  const int V = m.config().vocab_size;
  ForwardBatch b;
  std::vector<std::vector<int32_t>> tables;
  std::vector<int> ctx;
  int blk = first_block;
  for (const Req& r : reqs) {
    const int n = static_cast<int>(r.prompt.size());
    tables.push_back(Blocks(blk, n + steps));
    blk += static_cast<int>(tables.back().size());
    for (int i = 0; i < n; ++i) {
      if (!last_rows_only || i == n - 1) b.logit_rows.push_back(b.num_tokens());
      b.token_ids.push_back(r.prompt[i]);
      b.positions.push_back(i);
    }
    b.seqs.push_back({.num_new_tokens = n,
                      .context_len = n,
                      .block_table = tables.back(),
                      .adapter_index = r.adapter});
    ctx.push_back(n);
  }
  std::vector<std::vector<float>> out;
  std::vector<float> logits;
  EXPECT_TRUE(m.Forward(b, &logits).ok());
  out.push_back(logits);
  for (int step = 0; step < steps; ++step) {
    ForwardBatch d;
    for (size_t s = 0; s < reqs.size(); ++s) {
      d.token_ids.push_back(static_cast<int32_t>((7 * reqs[s].id + 3 * step + 1) % V));
      d.positions.push_back(ctx[s]);
      ++ctx[s];
      d.seqs.push_back({.num_new_tokens = 1,
                        .context_len = ctx[s],
                        .block_table = tables[s],
                        .adapter_index = reqs[s].adapter});
      d.logit_rows.push_back(static_cast<int32_t>(s));
    }
    EXPECT_TRUE(m.Forward(d, &logits).ok());
    out.push_back(logits);
  }
  return out;
}

}  // namespace phishard::lora_test
