// CudaPhiModel end to end: the golden fixtures of tests/golden (Hugging Face transformers in
// float32 from the same bf16 weights; format in tests/model/golden_test.cc) and the float32 CPU
// backend on the same batches, through prefill, batched decode and cached-prefix prefill.
//
// bf16 tolerances. The CUDA backend rounds every activation to bf16 (unit 2^-9) after each op, so
// it cannot match float32 to the CPU golden test's 1e-4. The bounds below come from a numpy
// emulation of exactly this backend's rounding schedule (bf16 after LN, each GEMM, rotary, the
// attention probabilities and output, each residual add; float32 logits) on all 17 fixture
// cases, which also reproduced HF's float32 logits to 6e-6:
//   max |logit - ref| / max(1, max |ref|)   worst 0.0074   -> kLogitFrac 0.02
//   ‖logits - ref‖ / ‖ref‖                   worst 0.0055   -> kLogitNormRel 0.015
//   |Δ(top1) - Δ(top2)| / max |ref|          worst 0.0054   -> kTieFrac 0.008
//   |logprob - ref| of the chosen tokens     worst 0.076    -> kLogprobTol 0.2
// A greedy decision whose float32 top1-top2 gap is below kTieFrac x scale is a genuine near-tie
// that bf16 may flip: a case whose recorded min_top2_gap is under it skips the full greedy-sequence
// equality (said on stdout) and checks it only up to the first step that is a near-tie in our own
// logits; every case still gets the teacher-forced top-1 check at every step, which allows a
// different argmax only when the reference token is within that near-tie margin of ours.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/paged_attention_cuda.h"
#include "model/cpu_phi_model.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "nlohmann/json.hpp"
#include "tests/gpu/gpu_test_util.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();
const fs::path kGolden = kRepo / "tests" / "golden";

constexpr double kLogitFrac = 0.02;
constexpr double kLogitNormRel = 0.015;
constexpr double kTieFrac = 0.008;
constexpr double kLogprobTol = 0.2;

std::unique_ptr<CudaPhiModel> LoadCuda(const fs::path& dir, const std::string& dtype = "") {
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> m =
      CudaPhiModel::Load(dir, {.dtype = dtype, .device = 0, .reserve_tokens = 256});
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

json ReadJson(const fs::path& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return json::parse(in);
}

double Scale(const std::vector<double>& ref) {
  double s = 1.0;
  for (double x : ref) s = std::max(s, std::fabs(x));
  return s;
}

void ExpectLogitsClose(const std::vector<float>& ours, const std::vector<double>& ref,
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

ForwardBatch OneSequence(const std::vector<int32_t>& ids, int past,
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

std::vector<int32_t> Blocks(int first, int tokens) {
  std::vector<int32_t> b(KvBlockAllocator::BlocksFor(tokens));
  std::iota(b.begin(), b.end(), first);
  return b;
}

struct Greedy {
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
};

int Argmax(const float* row, int v) {
  return static_cast<int>(std::max_element(row, row + v) - row);
}

float LogProb(const float* row, int v, int token) {
  const float mx = *std::max_element(row, row + v);
  double sum = 0;
  for (int i = 0; i < v; ++i) sum += std::exp(static_cast<double>(row[i]) - mx);
  return static_cast<float>(row[token] - mx - std::log(sum));
}

// Prefill of the prompt (last row), then one-token decode steps: the serving path.
Greedy RunGreedy(ModelBackend& m, const std::vector<int32_t>& prompt, int steps, int first_block) {
  const int V = m.config().vocab_size;
  const std::vector<int32_t> blocks = Blocks(first_block, static_cast<int>(prompt.size()) + steps);
  Greedy g;
  ForwardBatch b = OneSequence(prompt, 0, blocks, false);
  int ctx = static_cast<int>(prompt.size());
  for (int s = 0; s < steps; ++s) {
    std::vector<float> logits;
    absl::Status st = m.Forward(b, &logits);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return g;
    const int best = Argmax(logits.data(), V);
    g.ids.push_back(best);
    g.logprobs.push_back(LogProb(logits.data(), V, best));
    b = OneSequence({best}, ctx, blocks, false);
    ++ctx;
  }
  return g;
}

// Checks one fixture case: logits of every prompt row (when the fixture has them), teacher-forced
// top-1 along the reference path, the greedy sequence (unless a genuine near-tie), logprobs.
void CheckCase(ModelBackend& m, const json& c, const std::vector<double>& ref_logits,
               bool ref_is_last_row_only, const std::string& what) {
  const int V = m.config().vocab_size;
  const std::vector<int32_t> prompt = c.at("prompt_ids").get<std::vector<int32_t>>();
  const std::vector<int32_t> greedy = c.at("greedy_ids").get<std::vector<int32_t>>();
  const std::vector<double> greedy_lp = c.at("greedy_logprobs").get<std::vector<double>>();
  const int P = static_cast<int>(prompt.size()), G = static_cast<int>(greedy.size());
  const double scale = Scale(ref_logits);

  // One prefill of prompt + reference continuation (minus the last token), all rows.
  std::vector<int32_t> path = prompt;
  path.insert(path.end(), greedy.begin(), greedy.end() - 1);
  std::vector<float> logits;
  ASSERT_TRUE(
      m.Forward(OneSequence(path, 0, Blocks(0, static_cast<int>(path.size())), true), &logits)
          .ok());
  ASSERT_EQ(logits.size(), path.size() * V);
  if (ref_is_last_row_only) {
    ExpectLogitsClose(std::vector<float>(logits.begin() + (P - 1) * V, logits.begin() + P * V),
                      ref_logits, what + " last prompt row");
  } else {
    ExpectLogitsClose(std::vector<float>(logits.begin(), logits.begin() + P * V), ref_logits,
                      what + " prompt rows");
  }
  int flips = 0;
  int clear_prefix = G;  // steps before the first one that is a near-tie in our own logits
  for (int i = 0; i < G; ++i) {
    const float* row = logits.data() + static_cast<size_t>(P - 1 + i) * V;
    const int ours = Argmax(row, V);
    float second = -INFINITY;
    for (int v = 0; v < V; ++v) {
      if (v != ours) second = std::max(second, row[v]);
    }
    // Our gap is within the bf16 error of the reference's, so 2x the near-tie margin is safe.
    if (row[ours] - second < 2 * kTieFrac * scale) clear_prefix = std::min(clear_prefix, i);
    if (ours == greedy[i]) continue;
    ++flips;
    EXPECT_GE(row[greedy[i]], row[ours] - kTieFrac * scale)
        << what << " step " << i << ": reference token " << greedy[i] << " is "
        << row[ours] - row[greedy[i]] << " below our top token " << ours
        << ", more than a bf16 near-tie";
  }
  const double gap = c.value("min_top2_gap", 0.0);
  const double tie = kTieFrac * scale;
  const Greedy g = RunGreedy(m, prompt, G, 8);
  // Up to the first near-tie the serving path (prefill + decode steps) must follow the reference.
  ASSERT_EQ(g.ids.size(), greedy.size()) << what;
  EXPECT_TRUE(std::equal(greedy.begin(), greedy.begin() + clear_prefix, g.ids.begin()))
      << what << ": greedy tokens differ within the first " << clear_prefix
      << " steps, none of which is a near-tie";
  if (gap < tie) {
    std::printf(
        "  %s: full greedy-sequence equality SKIPPED: min_top2_gap %.4f < bf16 near-tie %.4f "
        "(checked the first %d of %d steps; ours %s the reference; teacher-forced flips %d)\n",
        what.c_str(), gap, tie, clear_prefix, G, g.ids == greedy ? "equals" : "differs from",
        flips);
    return;
  }
  EXPECT_EQ(g.ids, greedy) << what << " (min_top2_gap " << gap << ")";
  if (g.ids == greedy) {
    for (int i = 0; i < G; ++i) {
      EXPECT_NEAR(g.logprobs[i], greedy_lp[i], kLogprobTol) << what << " greedy step " << i;
    }
  }
}

class CudaGoldenRandom : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaGoldenRandom, MatchesTransformersWithinBf16) {
  PHI_REQUIRE_GPU();
  const fs::path dir = kGolden / GetParam();
  const json golden = ReadJson(dir / "golden.json");
  std::unique_ptr<CudaPhiModel> m = LoadCuda(dir);
  ASSERT_TRUE(m);
  ASSERT_EQ(m->dtype_name(), "torch.bfloat16");
  ASSERT_TRUE(m->AllocateKvCache(64, kKvBlockSize).ok());
  const int V = m->config().vocab_size;
  const json& cases = golden.at("cases");
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const json& c = cases[ci];
    std::vector<double> ref;
    for (const json& row : c.at("logits")) {
      ASSERT_EQ(row.size(), static_cast<size_t>(V));
      for (const json& x : row) ref.push_back(x.get<double>());
    }
    CheckCase(*m, c, ref, false, GetParam() + " case " + std::to_string(ci));
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaGoldenRandom,
                         ::testing::Values("phi-mha-hd64", "phi-gqa-hd80"));

TEST(CudaGoldenTiny, MatchesTransformersWithinBf16) {
  PHI_REQUIRE_GPU();
  const json golden = ReadJson(kGolden / "tiny-phi-code.json");
  std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / golden.at("model_dir").get<std::string>());
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->AllocateKvCache(64, kKvBlockSize).ok());
  const int V = m->config().vocab_size;
  const json& cases = golden.at("cases");
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const json& c = cases[ci];
    const std::string what = "tiny-phi-code case " + std::to_string(ci);
    const std::vector<double> last = c.at("last_logits").get<std::vector<double>>();
    CheckCase(*m, c, last, true, what);
    // Prefill logprobs of the prompt tokens (row k-1 scores token k).
    const std::vector<int32_t> prompt = c.at("prompt_ids").get<std::vector<int32_t>>();
    std::vector<float> logits;
    ASSERT_TRUE(m->Forward(OneSequence(prompt, 0, Blocks(0, static_cast<int>(prompt.size())), true),
                           &logits)
                    .ok());
    const json& want = c.at("prefill_logprobs");
    for (size_t k = 1; k < prompt.size(); ++k) {
      EXPECT_NEAR(LogProb(logits.data() + (k - 1) * V, V, prompt[k]), want[k].get<double>(),
                  kLogprobTol)
          << what << " prefill logprob of prompt token " << k;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The batches CompareWithCpu and MlpStreamModesAgree run: a prefill of three sequences of
// kThreeLens tokens (every row's logits), then decode step d of all three (ctx: their context
// lengths, advanced by one).
const std::vector<int> kThreeLens = {5, 17, 40};

ForwardBatch ThreeSequencePrefill(int V, const std::vector<std::vector<int32_t>>& tables) {
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

ForwardBatch ThreeSequenceDecode(int V, int d, const std::vector<std::vector<int32_t>>& tables,
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

// The same batches through the CPU float32 backend and the CUDA backend: a 3-sequence prefill
// (all rows), 6 batched decode steps, then a cached-prefix prefill on one sequence.
void CompareWithCpu(const fs::path& dir, const std::string& dtype) {
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> cpu = CpuPhiModel::Load(dir);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  std::unique_ptr<CudaPhiModel> gpu = LoadCuda(dir, dtype);
  ASSERT_TRUE(gpu);
  const int blocks = 40;
  ASSERT_TRUE((*cpu)->AllocateKvCache(blocks, kKvBlockSize).ok());
  ASSERT_TRUE(gpu->AllocateKvCache(blocks, kKvBlockSize).ok());
  const int V = gpu->config().vocab_size;
  const std::vector<int>& lens = kThreeLens;
  // Block tables from the top, interleaved, so sequences do not own contiguous ranges.
  std::vector<std::vector<int32_t>> tables(3);
  for (int i = 0, next = blocks - 1; i < 8; ++i) {
    for (auto& t : tables) t.push_back(next--);
  }
  const ForwardBatch b = ThreeSequencePrefill(V, tables);
  auto step = [&](const ForwardBatch& batch, const std::string& what) {
    std::vector<float> a, g;
    absl::Status sa = (*cpu)->Forward(batch, &a);
    absl::Status sg = gpu->Forward(batch, &g);
    ASSERT_TRUE(sa.ok()) << sa;
    ASSERT_TRUE(sg.ok()) << sg;
    ExpectLogitsClose(g, std::vector<double>(a.begin(), a.end()), dtype + " " + what);
  };
  step(b, "3-sequence prefill");
  std::vector<int> ctx = lens;
  for (int d = 0; d < 6; ++d) {
    const ForwardBatch dec = ThreeSequenceDecode(V, d, tables, &ctx);
    step(dec, "decode step " + std::to_string(d));
  }
  // Cached prefix: 9 more tokens on sequence 1 (context 23 -> 32, crossing a block boundary).
  ForwardBatch more;
  for (int i = 0; i < 9; ++i) {
    more.token_ids.push_back((i * 71 + 3) % V);
    more.positions.push_back(ctx[1] + i);
  }
  more.seqs.push_back({.num_new_tokens = 9, .context_len = ctx[1] + 9, .block_table = tables[1]});
  more.logit_rows = {0, 4, 8};
  step(more, "cached-prefix prefill");
}

TEST(CudaVsCpu, TinyPhiCodeBf16) {
  PHI_REQUIRE_GPU();
  CompareWithCpu(kRepo / "models" / "tiny-phi-code", "bfloat16");
}
TEST(CudaVsCpu, TinyPhiCodeFp16) {
  PHI_REQUIRE_GPU();
  CompareWithCpu(kRepo / "models" / "tiny-phi-code", "float16");
}
TEST(CudaVsCpu, GqaHd80Bf16) {
  PHI_REQUIRE_GPU();
  CompareWithCpu(kGolden / "phi-gqa-hd80", "bfloat16");
}
TEST(CudaVsCpu, MhaHd64Fp16) {
  PHI_REQUIRE_GPU();
  CompareWithCpu(kGolden / "phi-mha-hd64", "float16");
}

// ---------------------------------------------------------------------------------------------
// The MLP branch on its own stream (CudaModelOptions::mlp_stream): a 3-sequence prefill and 6
// decode steps (graphs replayed from the second step of each bucket) per mode on one model.
// Mode 1 runs the same kernels on the same inputs with the same accumulation order as mode 0, so
// its logits must be bit-identical; mode 2 adds the two residual terms in the other order (one
// bf16 rounding of h differs per layer), so it gets the bf16 bounds of this file against mode 0.
std::vector<std::vector<float>> RunModeSteps(CudaPhiModel& m) {
  const int V = m.config().vocab_size;
  const std::vector<std::vector<int32_t>> tables = {Blocks(0, 60), Blocks(4, 60), Blocks(8, 60)};
  std::vector<std::vector<float>> out(1);
  EXPECT_TRUE(m.Forward(ThreeSequencePrefill(V, tables), &out.back()).ok());
  std::vector<int> ctx = kThreeLens;
  for (int d = 0; d < 6; ++d) {
    const ForwardBatch dec = ThreeSequenceDecode(V, d, tables, &ctx);
    out.emplace_back();
    EXPECT_TRUE(m.Forward(dec, &out.back()).ok());
  }
  return out;
}

TEST(CudaPhiModel, MlpStreamModesAgree) {
  PHI_REQUIRE_GPU();
  for (const char* model : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / model, "bfloat16");
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->AllocateKvCache(16, kKvBlockSize).ok());
    EXPECT_TRUE(absl::IsInvalidArgument(m->set_mlp_stream_mode(3)));
    std::vector<std::vector<std::vector<float>>> runs;
    for (int mode : {kMlpStreamOff, kMlpStreamFc1, kMlpStreamFc1Fc2}) {
      ASSERT_TRUE(m->set_mlp_stream_mode(mode).ok());
      runs.push_back(RunModeSteps(*m));
    }
    ASSERT_EQ(runs[0].size(), runs[1].size());
    for (size_t i = 0; i < runs[0].size(); ++i) {
      EXPECT_TRUE(runs[1][i] == runs[0][i]) << model << " step " << i << ": mode 1 != mode 0";
      ExpectLogitsClose(runs[2][i], std::vector<double>(runs[0][i].begin(), runs[0][i].end()),
                        std::string(model) + " mode 2 vs 0, step " + std::to_string(i));
    }
  }
}

// The prefill K/V store in the attention kernel (set_prefill_kv_store): the same attention on the
// same K/V values (read from the qkv rows instead of the cache) and the same cache contents for
// the decode steps after it, so the prefill's and every decode step's logits are bit-identical.
TEST(CudaPhiModel, PrefillKvStoreModesAgree) {
  PHI_REQUIRE_GPU();
  for (const char* model : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / model, "bfloat16");
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->AllocateKvCache(16, kKvBlockSize).ok());
    EXPECT_TRUE(m->prefill_kv_store());  // the default
    m->set_prefill_kv_store(false);
    const std::vector<std::vector<float>> off = RunModeSteps(*m);
    ASSERT_TRUE(m->FillKvCacheRandom(5).ok());  // nothing of the first run left to read
    m->set_prefill_kv_store(true);
    const std::vector<std::vector<float>> on = RunModeSteps(*m);
    ASSERT_EQ(on.size(), off.size());
    for (size_t i = 0; i < on.size(); ++i) {
      EXPECT_TRUE(on[i] == off[i]) << model << " step " << i << ": store on != off";
    }
  }
}

// The warp-specialised prefill attention (set_prefill_attention_tiling(4), kWgmmaWs, which kAuto
// takes from 4096 query tokens) in the model: prefill logits close to kAuto's tiling (another
// kernel: other accumulation order and P rounding, so close, not equal) and, from a cache refilled
// with random values in between, the decode steps after it close too: they read the K/V that its
// fused store wrote.
TEST(CudaPhiModel, PrefillWarpSpecialisedAttentionCloseAndStoresTheCache) {
  PHI_REQUIRE_GPU();
  if (!PagedAttentionPrefillWgmmaAvailable()) GTEST_SKIP() << "kWgmmaWs needs an sm_90a device";
  for (const char* model : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / model, "bfloat16");
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->AllocateKvCache(16, kKvBlockSize).ok());
    ASSERT_TRUE(m->prefill_kv_store());
    const std::vector<std::vector<float>> ref = RunModeSteps(*m);
    ASSERT_TRUE(m->FillKvCacheRandom(5).ok());
    ASSERT_TRUE(m->set_prefill_attention_tiling(static_cast<int>(PrefillTiling::kWgmmaWs)).ok());
    const std::vector<std::vector<float>> ws = RunModeSteps(*m);
    ASSERT_EQ(ws.size(), ref.size());
    for (size_t i = 0; i < ws.size(); ++i) {
      ExpectLogitsClose(ws[i], std::vector<double>(ref[i].begin(), ref[i].end()),
                        std::string(model) + " kWgmmaWs vs kAuto, step " + std::to_string(i));
    }
  }
}

// The prefill MLP fork (set_prefill_mlp_fork): fc1 on the MLP stream with its own cuBLASLt
// workspace (the same plan for the same shape), dense + fc2 after the join in the same order as on
// one stream, so the prefill's and every decode step's logits must be bit-identical.
TEST(CudaPhiModel, PrefillMlpForkIsBitIdentical) {
  PHI_REQUIRE_GPU();
  for (const char* model : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / model, "bfloat16");
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->AllocateKvCache(16, kKvBlockSize).ok());
    EXPECT_TRUE(m->prefill_mlp_fork());  // the default
    m->set_prefill_mlp_fork(false);
    const std::vector<std::vector<float>> off = RunModeSteps(*m);
    ASSERT_TRUE(m->FillKvCacheRandom(5).ok());  // nothing of the first run left to read
    m->set_prefill_mlp_fork(true);
    const int64_t before = m->prefill_mlp_fork_steps();
    const std::vector<std::vector<float>> on = RunModeSteps(*m);
    EXPECT_EQ(m->prefill_mlp_fork_steps() - before, 1) << model << ": the prefill did not fork";
    ASSERT_EQ(on.size(), off.size());
    for (size_t i = 0; i < on.size(); ++i) {
      EXPECT_TRUE(on[i] == off[i]) << model << " step " << i << ": fork on != off";
    }
  }
}

// fc1's GELU off the GEMM in prefill forks (set_prefill_gelu_split): the same fc1 product and
// bias, rounded to bf16 once more before the GELU (the GELU kernel reads the stored
// pre-activation; cuBLASLt's epilogue reads the float32 accumulator), so each layer's MLP
// activations differ by up to one bf16 rounding (2^-9 relative) of the pre-activation times
// |gelu'| <= 1.13: the same size as the roundings the bf16 golden bounds of this file allow
// against float32 references, and the LoRA fc1 split has it too. So the prefill's logits, and the
// decode steps' after it (they read the K/V the prefill wrote), get those bounds against the
// epilogue's; the split must also have run (its step counter).
TEST(CudaPhiModel, PrefillGeluSplitCloseToEpilogue) {
  PHI_REQUIRE_GPU();
  for (const char* model : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / model, "bfloat16");
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->AllocateKvCache(16, kKvBlockSize).ok());
    ASSERT_TRUE(m->prefill_mlp_fork());
    EXPECT_FALSE(m->prefill_gelu_split());  // the default
    m->set_prefill_gelu_split(false);
    int64_t before = m->prefill_gelu_split_steps();
    const std::vector<std::vector<float>> epi = RunModeSteps(*m);
    EXPECT_EQ(m->prefill_gelu_split_steps(), before) << model << ": split while off";
    ASSERT_TRUE(m->FillKvCacheRandom(5).ok());  // nothing of the first run left to read
    m->set_prefill_gelu_split(true);
    before = m->prefill_gelu_split_steps();
    const std::vector<std::vector<float>> split = RunModeSteps(*m);
    EXPECT_EQ(m->prefill_gelu_split_steps() - before, 1) << model << ": the prefill did not split";
    ASSERT_EQ(split.size(), epi.size());
    for (size_t i = 0; i < split.size(); ++i) {
      ExpectLogitsClose(split[i], std::vector<double>(epi[i].begin(), epi[i].end()),
                        std::string(model) + " gelu split vs epilogue, step " + std::to_string(i));
    }
  }
}

// The trimmed last layer (set_prefill_last_rows): a prefill returning each sequence's last row
// runs the last layer's attention (as decode queries) and MLP on those rows only. Its K/V cache is
// written by the same kernels from the same rows as the full layer's, so the decode steps after
// it must be bit-identical; the prefill logits differ only in summation order (split-key decode
// attention, GEMMs of 3 rows instead of 62), so they get this file's bf16 bounds against the full
// layer and against the CPU float32 model. A cached-prefix prefill (1 of 9 rows) gets the same
// bound against the full layer.
TEST(CudaPhiModel, PrefillLastRowsMatchFullLastLayer) {
  PHI_REQUIRE_GPU();
  for (const char* model : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    SCOPED_TRACE(model);
    absl::StatusOr<std::unique_ptr<CpuPhiModel>> cpu = CpuPhiModel::Load(kRepo / model);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    ASSERT_TRUE((*cpu)->AllocateKvCache(16, kKvBlockSize).ok());
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / model, "bfloat16");
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->AllocateKvCache(16, kKvBlockSize).ok());
    EXPECT_TRUE(m->prefill_last_rows());  // the default
    const int V = m->config().vocab_size;
    const std::vector<std::vector<int32_t>> tables = {Blocks(0, 60), Blocks(4, 60), Blocks(8, 60)};
    ForwardBatch prefill = ThreeSequencePrefill(V, tables);
    prefill.logit_rows = {kThreeLens[0] - 1, kThreeLens[0] + kThreeLens[1] - 1,
                          static_cast<int32_t>(prefill.token_ids.size()) - 1};
    auto run = [&](bool trimmed) {
      m->set_prefill_last_rows(trimmed);
      const int64_t before = m->prefill_last_rows_steps();
      std::vector<std::vector<float>> out(1);
      EXPECT_TRUE(m->Forward(prefill, &out.back()).ok());
      EXPECT_EQ(m->prefill_last_rows_steps() - before, trimmed ? 1 : 0);  // the path was taken
      std::vector<int> ctx = kThreeLens;
      for (int d = 0; d < 6; ++d) {
        out.emplace_back();
        EXPECT_TRUE(m->Forward(ThreeSequenceDecode(V, d, tables, &ctx), &out.back()).ok());
      }
      // A cached-prefix prefill: 9 more tokens on sequence 1 (context 23 -> 32, across a block
      // edge), its last row's query over cached and new keys; then one more decode step.
      ForwardBatch more;
      for (int i = 0; i < 9; ++i) {
        more.token_ids.push_back((i * 71 + 3) % V);
        more.positions.push_back(ctx[1] + i);
      }
      ctx[1] += 9;
      more.seqs.push_back({.num_new_tokens = 9, .context_len = ctx[1], .block_table = tables[1]});
      more.logit_rows = {8};
      out.emplace_back();
      EXPECT_TRUE(m->Forward(more, &out.back()).ok());
      EXPECT_EQ(m->prefill_last_rows_steps() - before, trimmed ? 2 : 0);
      out.emplace_back();
      EXPECT_TRUE(m->Forward(ThreeSequenceDecode(V, 6, tables, &ctx), &out.back()).ok());
      return out;
    };
    const std::vector<std::vector<float>> full = run(false);
    ASSERT_TRUE(m->FillKvCacheRandom(5).ok());  // nothing of the first run left to read
    const std::vector<std::vector<float>> trimmed = run(true);
    std::vector<float> ref;
    ASSERT_TRUE((*cpu)->Forward(prefill, &ref).ok());
    ExpectLogitsClose(trimmed[0], std::vector<double>(ref.begin(), ref.end()), "trimmed vs CPU");
    ExpectLogitsClose(trimmed[0], std::vector<double>(full[0].begin(), full[0].end()),
                      "trimmed vs full last layer");
    ASSERT_EQ(trimmed.size(), full.size());
    ASSERT_EQ(full.size(), 9u);
    ExpectLogitsClose(trimmed[7], std::vector<double>(full[7].begin(), full[7].end()),
                      "cached-prefix prefill, trimmed vs full last layer");
    for (size_t i : {1, 2, 3, 4, 5, 6, 8}) {
      EXPECT_TRUE(trimmed[i] == full[i]) << "step " << i << " (a decode step after a prefill)";
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The bulk GEMV on decode steps (CudaModelOptions::bulk_gemv_*), in every MLP stream mode: the
// three-sequence batches above (decode steps of 3 rows, bucket 4) and one sequence of 1-row
// decode steps, with graphs (replays from each bucket's second step). Against the default path
// (cuBLASLt / column GEMV, a separate LayerNorm kernel) the sums run in another order and, with
// the LayerNorm folded in, the normed rows' statistics too: the bf16 bounds of this file. A graph
// replay runs the eager step's very launches (fork, qkv-done event, PDL edges): bit-identical.
std::vector<std::vector<float>> RunOneSequenceSteps(CudaPhiModel& m) {
  const int V = m.config().vocab_size;
  std::vector<int32_t> ids;
  for (int i = 0; i < 19; ++i) ids.push_back((i * 389 + 5) % V);
  const std::vector<int32_t> table = Blocks(12, 40);
  std::vector<std::vector<float>> out(1);
  EXPECT_TRUE(m.Forward(OneSequence(ids, 0, table, false), &out.back()).ok());
  for (int d = 0; d < 6; ++d) {
    out.emplace_back();
    EXPECT_TRUE(m.Forward(OneSequence({(d * 97 + 3) % V}, 19 + d, table, false), &out.back()).ok());
  }
  return out;
}

TEST(CudaPhiModel, BulkGemvStepsAgree) {
  PHI_REQUIRE_GPU();
  for (const char* model : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / model, "bfloat16");
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->AllocateKvCache(16, kKvBlockSize).ok());
    EXPECT_TRUE(absl::IsInvalidArgument(m->set_bulk_gemv(kGemvMaxRows + 1, true, false)));
    for (int mode : {kMlpStreamOff, kMlpStreamFc1, kMlpStreamFc1Fc2}) {
      ASSERT_TRUE(m->set_mlp_stream_mode(mode).ok());
      ASSERT_TRUE(m->set_bulk_gemv(0, false, false).ok());
      const auto base3 = RunModeSteps(*m), base1 = RunOneSequenceSteps(*m);
      for (bool ln : {false, true}) {
        const std::string what = std::string(model) + " mode " + std::to_string(mode) +
                                 (ln ? " bulk + LayerNorm" : " bulk");
        ASSERT_TRUE(m->set_bulk_gemv(kGemvMaxRows, true, ln).ok());
        const auto bulk3 = RunModeSteps(*m), bulk1 = RunOneSequenceSteps(*m);
        m->set_cuda_graphs(false);
        const auto eager3 = RunModeSteps(*m), eager1 = RunOneSequenceSteps(*m);
        m->set_cuda_graphs(true);
        ASSERT_EQ(bulk3.size(), base3.size());
        ASSERT_EQ(bulk1.size(), base1.size());
        for (size_t i = 0; i < bulk3.size(); ++i) {
          EXPECT_TRUE(bulk3[i] == eager3[i]) << what << ": 3 rows, step " << i << " graph != eager";
          ExpectLogitsClose(bulk3[i], std::vector<double>(base3[i].begin(), base3[i].end()),
                            what + ", 3 rows, step " + std::to_string(i));
        }
        for (size_t i = 0; i < bulk1.size(); ++i) {
          EXPECT_TRUE(bulk1[i] == eager1[i]) << what << ": 1 row, step " << i << " graph != eager";
          ExpectLogitsClose(bulk1[i], std::vector<double>(base1[i].begin(), base1[i].end()),
                            what + ", 1 row, step " + std::to_string(i));
        }
      }
    }
    ASSERT_TRUE(m->set_bulk_gemv(0, false, false).ok());
  }
}

// ---------------------------------------------------------------------------------------------
TEST(CudaPhiModel, RejectsBadInputsWithClearErrors) {
  PHI_REQUIRE_GPU();
  const fs::path dir = kRepo / "models" / "tiny-phi-code";
  std::unique_ptr<CudaPhiModel> m = LoadCuda(dir);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->device_type(), "cuda");
  std::vector<float> logits;
  ForwardBatch b = OneSequence({1, 2, 3}, 0, Blocks(0, 3), false);
  absl::Status st = m->Forward(b, &logits);
  EXPECT_TRUE(absl::IsFailedPrecondition(st)) << st;  // no KV cache yet
  ASSERT_TRUE(m->AllocateKvCache(4, kKvBlockSize).ok());
  EXPECT_TRUE(m->Forward(b, &logits).ok());
  EXPECT_EQ(logits.size(), static_cast<size_t>(m->config().vocab_size));

  ForwardBatch bad = b;
  bad.token_ids[1] = m->config().vocab_size;
  st = m->Forward(bad, &logits);
  EXPECT_TRUE(absl::IsInvalidArgument(st) && st.message().find("token_ids[1]") != std::string::npos)
      << st;
  bad = b;
  bad.seqs[0].block_table = {4};
  st = m->Forward(bad, &logits);
  EXPECT_TRUE(absl::IsInvalidArgument(st) && st.message().find("block_table") != std::string::npos)
      << st;
  bad = b;
  bad.logit_rows = {3};
  EXPECT_TRUE(absl::IsInvalidArgument(m->Forward(bad, &logits)));
  bad = b;
  bad.positions[2] = 7;
  EXPECT_TRUE(absl::IsInvalidArgument(m->Forward(bad, &logits)));
  // A rejected batch leaves the model healthy.
  EXPECT_TRUE(m->Forward(b, &logits).ok());
  EXPECT_TRUE(m->Ping().ok());

  absl::StatusOr<std::unique_ptr<CudaPhiModel>> f32 = CudaPhiModel::Load(dir, {.dtype = "float32"});
  EXPECT_TRUE(absl::IsInvalidArgument(f32.status())) << f32.status();

  absl::StatusOr<PhiConfig> cfg = LoadPhiConfig(dir);
  ASSERT_TRUE(cfg.ok());
  absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenDir(dir);
  ASSERT_TRUE(store.ok());
  PhiConfig odd = *cfg;
  odd.head_dim = 96;
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> hd96 = CudaPhiModel::Create(odd, **store, {});
  EXPECT_TRUE(absl::IsUnimplemented(hd96.status()) &&
              hd96.status().message().find("head_dim 96") != std::string::npos)
      << hd96.status();
}

TEST(CudaPhiModel, SizesKvPoolFromDeviceMemory) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / "models" / "tiny-phi-code");
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->AllocateKvCache(8, kKvBlockSize).ok());
  absl::StatusOr<int> all = m->MaxKvBlocks(0.9, 4096);
  ASSERT_TRUE(all.ok()) << all.status();
  absl::StatusOr<int> half = m->MaxKvBlocks(0.45, 4096);
  ASSERT_TRUE(half.ok()) << half.status();
  EXPECT_GT(*all, *half);
  EXPECT_TRUE(absl::IsInvalidArgument(m->MaxKvBlocks(0.0, 16).status()));
  // The reserved 4096-token workspace is taken before the pool, and the pool then fits.
  const int n = std::min(*half, 100000);
  ASSERT_TRUE(m->AllocateKvCache(n, kKvBlockSize).ok());
  EXPECT_GE(m->workspace_tokens(), 4096);
  EXPECT_EQ(m->kv_num_blocks(), n);
  std::vector<float> logits;
  EXPECT_TRUE(m->Forward(OneSequence({5, 6, 7}, 0, {n - 1}, false), &logits).ok());
}

TEST(CudaPhiModel, PingAnswersWhileStepsRun) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / "models" / "tiny-phi-code");
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->AllocateKvCache(16, kKvBlockSize).ok());
  std::vector<int32_t> ids(200);
  for (int i = 0; i < 200; ++i) ids[i] = (i * 37) % m->config().vocab_size;
  std::atomic<bool> done{false};
  std::atomic<int> pings{0}, ping_failures{0};
  std::thread pinger([&] {
    while (!done.load()) {
      if (!m->Ping().ok()) ++ping_failures;
      ++pings;
    }
  });
  bool steps_ok = true;
  for (int i = 0; i < 30; ++i) {
    std::vector<float> logits;
    steps_ok &= m->Forward(OneSequence(ids, 0, Blocks(0, 200), true), &logits).ok();
  }
  done = true;
  pinger.join();
  EXPECT_TRUE(steps_ok);
  EXPECT_GT(pings.load(), 0);
  EXPECT_EQ(ping_failures.load(), 0);
}

// Recorded cuBLASLt algorithm choices (set_gemm_algo_choices, model/cuda_gemm_choices.h): every
// prefill GEMM form of the model gets a configuration other than the heuristic's first (the last
// one CudaGemm::ListAlgos offers for it), for prefill-sized steps only. The prefill must take them
// and differ from the heuristic's plans only in summation order (this file's bf16 bounds); the
// decode steps after it read that prefill's K/V, so they get the same bounds.
TEST(CudaPhiModel, PrefillGemmAlgoChoicesTakenAndClose) {
  PHI_REQUIRE_GPU();
  for (const char* model : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / model, "bfloat16");
    ASSERT_TRUE(m);
    ASSERT_TRUE(m->AllocateKvCache(16, kKvBlockSize).ok());
    const PhiConfig& c = m->config();
    const int H = c.hidden_size, I = c.intermediate_size;
    const int qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
    const int T = std::accumulate(kThreeLens.begin(), kThreeLens.end(), 0);
    std::unique_ptr<CudaGemm> g;
    ASSERT_EQ(CudaGemm::Create(size_t{32} << 20, &g), KernelStatus::kOk);
    gpu_test::DeviceBuffer any(size_t{1} << 20);  // ListAlgos reads only its alignment
    const GemmEpilogue act =
        c.hidden_act == Activation::kGeluTanh ? GemmEpilogue::kGeluTanh : GemmEpilogue::kGeluErf;
    struct Form {
      int n, k;
      bool acc;
      GemmEpilogue epi;
    };
    std::vector<GemmAlgoChoice> choices;
    for (const Form& f :
         {Form{qkv, H, false, GemmEpilogue::kNone}, Form{I, H, false, act},
          Form{H, H, true, GemmEpilogue::kNone}, Form{H, I, true, GemmEpilogue::kNone}}) {
      const GemmParams p{.x = any.get(),
                         .w = any.get(),
                         .bias = any.get(),
                         .y = any.get(),
                         .m = T,
                         .n = f.n,
                         .k = f.k,
                         .accumulate = f.acc,
                         .epilogue = f.epi,
                         .dtype = DataType::kBF16};
      std::vector<GemmAlgoConfig> cands;
      ASSERT_EQ(g->ListAlgos(p, DataType::kBF16, 16, true, &cands), KernelStatus::kOk);
      ASSERT_FALSE(cands.empty());
      choices.push_back({.min_m = T,
                         .max_m = T,
                         .n = f.n,
                         .k = f.k,
                         .accumulate = f.acc,
                         .gelu = f.epi == GemmEpilogue::kGeluTanh && g->gelu_tanh_in_epilogue(),
                         .bias = true,
                         .dtype = DataType::kBF16,
                         .config = cands.back()});
    }
    m->set_gemm_algo_choices({});
    const std::vector<std::vector<float>> off = RunModeSteps(*m);
    EXPECT_EQ(m->chosen_gemm_plans(), 0u);
    m->set_gemm_algo_choices(choices);
    const std::vector<std::vector<float>> on = RunModeSteps(*m);
    EXPECT_GE(m->chosen_gemm_plans(), 3u) << model << ": the prefill took too few choices";
    ASSERT_EQ(on.size(), off.size());
    for (size_t i = 0; i < on.size(); ++i) {
      ExpectLogitsClose(on[i], std::vector<double>(off[i].begin(), off[i].end()),
                        std::string(model) + " choices vs heuristic, step " + std::to_string(i));
    }
  }
}

}  // namespace
}  // namespace phishard
