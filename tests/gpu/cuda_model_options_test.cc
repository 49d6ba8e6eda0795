// CudaPhiModel's switches against its default path, end to end on tiny-phi-code and the GQA
// head-dim-80 fixture model: the MLP branch on its own stream, the prefill K/V store in the
// attention kernel, the warp-specialised prefill attention, the prefill MLP fork and GELU split,
// the trimmed last layer, the bulk GEMV on decode steps, recorded cuBLASLt algorithm choices and
// the decode GEMMs' warm-up tuning.
// A switch that runs the same kernels on the same inputs in the same order must give bit-identical
// logits; one that changes a summation order or adds a bf16 rounding gets the bf16 bounds of
// cuda_model_test_util.h (ExpectLogitsClose). Moved from cuda_model_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/paged_attention_cuda.h"
#include "model/cpu_phi_model.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "tests/gpu/cuda_model_test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace phishard {
namespace {

using namespace model_test;  // NOLINT: test helpers

// The MLP branch on its own stream (CudaModelOptions::mlp_stream): a 3-sequence prefill and 6
// decode steps (graphs replayed from the second step of each bucket) per mode on one model.
// Mode 1 runs the same kernels on the same inputs with the same accumulation order as mode 0, so
// its logits must be bit-identical; mode 2 adds the two residual terms in the other order (one
// bf16 rounding of h differs per layer), so it gets the bf16 bounds against mode 0.
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
  for (auto& [model, m] : FixtureModelsBf16()) {
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
  for (auto& [model, m] : FixtureModelsBf16()) {
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
// takes from 1024 query tokens) in the model: prefill logits close to kAuto's tiling (another
// kernel: other accumulation order and P rounding, so close, not equal) and, from a cache refilled
// with random values in between, the decode steps after it close too: they read the K/V that its
// fused store wrote.
TEST(CudaPhiModel, PrefillWarpSpecialisedAttentionCloseAndStoresTheCache) {
  PHI_REQUIRE_GPU();
  if (!PagedAttentionPrefillWgmmaAvailable()) GTEST_SKIP() << "kWgmmaWs needs an sm_90a device";
  for (auto& [model, m] : FixtureModelsBf16()) {
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
  for (auto& [model, m] : FixtureModelsBf16()) {
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
// |gelu'| <= 1.13: the same size as the roundings the bf16 golden bounds allow
// against float32 references, and the LoRA fc1 split has it too. So the prefill's logits, and the
// decode steps' after it (they read the K/V the prefill wrote), get those bounds against the
// epilogue's; the split must also have run (its step counter).
TEST(CudaPhiModel, PrefillGeluSplitCloseToEpilogue) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsBf16()) {
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
// attention, GEMMs of 3 rows instead of 62), so they get the bf16 bounds against the full
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
// the LayerNorm folded in, the normed rows' statistics too: the bf16 bounds. A graph
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
  for (auto& [model, m] : FixtureModelsBf16()) {
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

// A decode switch with a row range, on RunModeSteps' 3-row steps: set(kOff) the path without it,
// set(kOutside) on with a range that leaves these steps out, set(kInside) on for them. Steps
// outside the range must be bit for bit the ones without the switch; inside, graph replays must
// equal eager steps bit for bit and stay within the bf16 bounds of the path without it.
enum RangeSetting { kOff, kOutside, kInside };
void ExpectRowRangeSwitchClose(CudaPhiModel& m, const std::string& what,
                               const std::function<void(RangeSetting)>& set) {
  set(kOff);
  const auto base = RunModeSteps(m);
  set(kOutside);
  const auto outside = RunModeSteps(m);
  set(kInside);
  const auto inside = RunModeSteps(m);
  m.set_cuda_graphs(false);
  const auto eager = RunModeSteps(m);
  m.set_cuda_graphs(true);
  ASSERT_EQ(outside.size(), base.size());
  ASSERT_EQ(inside.size(), base.size());
  for (size_t i = 0; i < base.size(); ++i) {
    const std::string step = what + " step " + std::to_string(i);
    EXPECT_TRUE(outside[i] == base[i]) << step << ": changed outside the row range";
    EXPECT_TRUE(inside[i] == eager[i]) << step << ": graph != eager";
    ExpectLogitsClose(inside[i], std::vector<double>(base[i].begin(), base[i].end()), step);
  }
}

// RunModeSteps with graphs, then with eager launches; `count` reads one of the model's step
// counters: how far each run moved it (an eager step enqueues once; with graphs a variant's first
// step enqueues twice, eagerly and in its capture, and its replays not at all).
struct GraphEagerRuns {
  std::vector<std::vector<float>> graph, eager;
  int64_t graph_count = 0, eager_count = 0;
};
GraphEagerRuns RunGraphThenEager(CudaPhiModel& m, const std::function<int64_t()>& count) {
  GraphEagerRuns r;
  const int64_t start = count();
  r.graph = RunModeSteps(m);
  r.graph_count = count() - start;
  m.set_cuda_graphs(false);
  const int64_t before = count();
  r.eager = RunModeSteps(m);
  r.eager_count = count() - before;
  m.set_cuda_graphs(true);
  return r;
}

// fc1's cuBLASLt SM count target in base decode steps (set_decode_fc1_sms): only the steps in
// its row range take it (3-row steps with the default range 5-16 are bit for bit the untargeted
// ones); where it applies (range widened to 1-256), cuBLASLt may pick another kernel for fc1, so
// the steps get the bf16 bounds.
TEST(CudaPhiModel, Fc1SmTargetCloseAndOnlyInItsRows) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsBf16()) {
    EXPECT_EQ(m->decode_fc1_sms(), kDecodeFc1SmsDefault);
    const int min_kv = m->decode_fc1_sms_min_kv_tokens();
    m->set_decode_fc1_sms_min_kv_tokens(0);  // the K/V bound: Fc1SmTargetOnlyWithEnoughKv
    ExpectRowRangeSwitchClose(*m, std::string(model) + " fc1 on 24 SMs", [&](RangeSetting r) {
      if (r == kOff) m->set_decode_fc1_sms(0);
      if (r == kOutside) m->set_decode_fc1_sms(24);  // rows 5-16
      if (r == kInside) m->set_decode_fc1_sms(24, 1, 256);
    });
    m->set_decode_fc1_sms(kDecodeFc1SmsDefault);
    m->set_decode_fc1_sms_min_kv_tokens(min_kv);
  }
}

// The SM target's K/V bound (set_decode_fc1_sms_min_kv_tokens): in its row range a step takes the
// target only when its live sequences' context lengths sum to at least the bound. With the bound
// between RunModeSteps' decode steps (contexts 62 + 3 (d + 1)), one bucket's steps switch from
// variant 0's graph (bit for bit the untargeted step) to variant 1's (bf16 bounds) and both
// replays equal eager steps bit for bit.
TEST(CudaPhiModel, Fc1SmTargetOnlyWithEnoughKv) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsBf16()) {
    const PhiConfig& c = m->config();
    EXPECT_EQ(m->decode_fc1_sms_min_kv_tokens(),
              DecodeFc1SmsMinKvTokensDefault(c.hidden_size, c.intermediate_size,
                                             c.num_key_value_heads, c.head_dim));
    const int min_kv = m->decode_fc1_sms_min_kv_tokens();
    m->set_decode_fc1_sms(0);
    const auto off = RunModeSteps(*m);
    m->set_decode_fc1_sms(24, 1, 256);
    const int bound = std::accumulate(kThreeLens.begin(), kThreeLens.end(), 0) + 3 * 4;  // d >= 3
    m->set_decode_fc1_sms_min_kv_tokens(bound);
    const GraphEagerRuns r = RunGraphThenEager(*m, [&] { return m->decode_fc1_sms_steps(); });
    EXPECT_GT(r.graph_count, 0) << model << ": no graph step took the target";
    EXPECT_EQ(r.eager_count, 3) << model << ": decode steps 3-5 only";
    ASSERT_EQ(r.graph.size(), off.size());
    ASSERT_EQ(r.eager.size(), off.size());
    for (size_t i = 0; i < off.size(); ++i) {
      const std::string step = std::string(model) + " step " + std::to_string(i);
      EXPECT_TRUE(r.graph[i] == r.eager[i]) << step << ": graph != eager";
      if (i < 4) {  // the prefill and decode steps 0-2: below the bound
        EXPECT_TRUE(r.graph[i] == off[i]) << step << ": changed below the K/V bound";
      } else {
        ExpectLogitsClose(r.graph[i], std::vector<double>(off[i].begin(), off[i].end()), step);
      }
    }
    m->set_decode_fc1_sms(kDecodeFc1SmsDefault);
    m->set_decode_fc1_sms_min_kv_tokens(min_kv);
  }
}

// The fold of short-context steps beyond decode_attention_fold_rows (set_decode_fold_short): with
// the fold's row bound 1, RunModeSteps' 3-row decode steps fold only while their mean context
// (20.67 + d + 1) is at most the bound (here 22: step d = 0 alone), in their bucket's variant
// graph. The fold is bit-identical to the unfused launches, so every step equals the run without
// any fold, graph replays equal eager steps, and only that one step enqueues the fold.
TEST(CudaPhiModel, FoldShortOnlyForShortContexts) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsBf16()) {
    EXPECT_EQ(m->decode_fold_short_rows(), kDecodeFoldShortRowsDefault);
    EXPECT_EQ(m->decode_fold_short_ctx(), kDecodeFoldShortCtxDefault);
    const int fold_rows = m->decode_attention_fold_rows();
    m->set_decode_attention_fold_rows(1);
    m->set_decode_fold_short(0, kDecodeFoldShortCtxDefault);
    const int64_t off_before = m->decode_attention_fold_steps();
    const auto off = RunModeSteps(*m);
    EXPECT_EQ(m->decode_attention_fold_steps(), off_before) << model << ": folded with it off";
    m->set_decode_fold_short(32, 22);
    const GraphEagerRuns r =
        RunGraphThenEager(*m, [&] { return m->decode_attention_fold_steps(); });
    EXPECT_GT(r.graph_count, 0) << model << ": no graph step folded";
    EXPECT_EQ(r.eager_count, 1) << model << ": decode step 0 only";
    ASSERT_EQ(r.graph.size(), off.size());
    ASSERT_EQ(r.eager.size(), off.size());
    for (size_t i = 0; i < off.size(); ++i) {
      const std::string step = std::string(model) + " step " + std::to_string(i);
      EXPECT_TRUE(r.graph[i] == r.eager[i]) << step << ": graph != eager";
      EXPECT_TRUE(r.graph[i] == off[i]) << step << ": the fold changed the logits";
    }
    m->set_decode_attention_fold_rows(fold_rows);
    m->set_decode_fold_short(kDecodeFoldShortRowsDefault, kDecodeFoldShortCtxDefault);
  }
}

// RunModeSteps with a decode attention switch off, then on (graph replays, then eager steps): an
// MHA model takes it in some graph step and in eager decode step 0 only (the callers' bounds), its
// logits within the bf16 bounds of the run without it (another kernel, another summation order),
// graph replays equal to eager steps; a GQA model never takes it, bit for bit.
void ExpectMhaOnlyAttentionSwitch(const std::string& model, CudaPhiModel& m,
                                  const std::function<void(bool)>& set,
                                  const std::function<int64_t()>& count) {
  const bool is_mha = m.config().num_key_value_heads == m.config().num_attention_heads;
  set(false);
  const int64_t off_before = count();
  const auto off = RunModeSteps(m);
  EXPECT_EQ(count(), off_before) << model << ": took it while off";
  set(true);
  const GraphEagerRuns r = RunGraphThenEager(m, count);
  if (is_mha) {
    EXPECT_GT(r.graph_count, 0) << model << ": no graph step took it";
    EXPECT_EQ(r.eager_count, 1) << model << ": decode step 0 only";
  } else {
    EXPECT_EQ(r.graph_count + r.eager_count, 0) << model << ": a GQA model took it";
  }
  ASSERT_EQ(r.graph.size(), off.size());
  ASSERT_EQ(r.eager.size(), off.size());
  for (size_t i = 0; i < off.size(); ++i) {
    const std::string step = model + " step " + std::to_string(i);
    EXPECT_TRUE(r.graph[i] == r.eager[i]) << step << ": graph != eager";
    if (is_mha) {
      ExpectLogitsClose(r.graph[i], std::vector<double>(off[i].begin(), off[i].end()), step);
    } else {
      EXPECT_TRUE(r.graph[i] == off[i]) << step << ": changed a GQA model's logits";
    }
  }
}

// The bf16 fixtures and the MHA golden fixture (head_dim 64).
std::vector<FixtureModel> FixtureModelsWithMha() {
  std::vector<FixtureModel> models = FixtureModelsBf16();
  std::unique_ptr<CudaPhiModel> mha = LoadCuda(kRepo / "tests/golden/phi-mha-hd64", "bfloat16");
  EXPECT_NE(mha, nullptr);
  if (mha != nullptr) {
    EXPECT_TRUE(mha->AllocateKvCache(16, kKvBlockSize).ok());
    models.push_back({"tests/golden/phi-mha-hd64", std::move(mha)});
  }
  return models;
}

// The register-staged decode attention for short-context steps above the fold's rows
// (set_decode_short_regs_rows), MHA models only: with both fold bounds 0, RunModeSteps' 3-row
// steps take it only while their mean context (20.67 + d + 1) is at most 22
// (set_decode_short_regs_ctx; step d = 0 alone), in their bucket's short-context variant graph.
TEST(CudaPhiModel, ShortRegsOnlyForShortMhaSteps) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsWithMha()) {
    EXPECT_EQ(m->decode_short_regs_rows(), kDecodeShortRegsRowsDefault);
    const int short_regs_ctx = m->decode_short_regs_ctx();
    EXPECT_EQ(short_regs_ctx, DecodeShortRegsCtxDefault(m->config().head_dim));
    const int fold_rows = m->decode_attention_fold_rows();
    m->set_decode_attention_fold_rows(0);
    m->set_decode_fold_short(0, 22);
    m->set_decode_short_regs_ctx(22);
    m->set_decode_warp_heads(false);
    ExpectMhaOnlyAttentionSwitch(
        model, *m, [&](bool on) { m->set_decode_short_regs_rows(on ? 32 : 0); },
        [&] { return m->decode_short_regs_steps(); });
    m->set_decode_attention_fold_rows(fold_rows);
    m->set_decode_fold_short(kDecodeFoldShortRowsDefault, kDecodeFoldShortCtxDefault);
    m->set_decode_short_regs_rows(kDecodeShortRegsRowsDefault);
    m->set_decode_short_regs_ctx(short_regs_ctx);
    m->set_decode_warp_heads(kDecodeWarpHeadsDefault != 0);
  }
}

// The one-warp-a-head decode attention (set_decode_warp_heads; bounds moved down so the fixtures'
// 3-row steps reach them: from 1 live query head, mean context at most 22 — RunModeSteps' decode
// step d = 0 alone; the second tier out of reach), MHA models only, above the fold's rows (both
// fold bounds 0, ShortRegs off), in its own graph variant.
TEST(CudaPhiModel, WarpHeadsOnlyForMhaStepsInItsBounds) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsWithMha()) {
    EXPECT_EQ(m->decode_warp_heads(), kDecodeWarpHeadsDefault != 0);
    const int fold_rows = m->decode_attention_fold_rows();
    m->set_decode_attention_fold_rows(0);
    m->set_decode_fold_short(0, 22);
    m->set_decode_short_regs_rows(0);
    m->set_decode_warp_heads_bounds(1, 22, std::numeric_limits<int64_t>::max(), 0);
    ExpectMhaOnlyAttentionSwitch(
        model, *m, [&](bool on) { m->set_decode_warp_heads(on); },
        [&] { return m->decode_warp_heads_steps(); });
    m->set_decode_attention_fold_rows(fold_rows);
    m->set_decode_fold_short(kDecodeFoldShortRowsDefault, kDecodeFoldShortCtxDefault);
    m->set_decode_short_regs_rows(kDecodeShortRegsRowsDefault);
    m->set_decode_warp_heads(kDecodeWarpHeadsDefault != 0);
    m->set_decode_warp_heads_default_bounds();
  }
}

// fc2's rows into float32, added by the next LayerNorm, so dense does not wait for the MLP branch
// (set_decode_fc2_defer; on by default), only in steps that take fc1's SM target: the 3-row steps
// outside fc1's default row range (5-16) are bit for bit the steps without it; with the range
// widened to them, the other rounding order of the two residual terms (bf16 bounds), graph ==
// eager.
TEST(CudaPhiModel, Fc2DeferCloseAndOnlyWithFc1Target) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsBf16()) {
    EXPECT_EQ(m->decode_fc2_defer(), kDecodeFc2DeferDefault != 0);
    const int min_kv = m->decode_fc1_sms_min_kv_tokens();
    m->set_decode_fc1_sms_min_kv_tokens(0);
    int64_t outside_steps = -1;
    ExpectRowRangeSwitchClose(*m, std::string(model) + " fc2 deferred", [&](RangeSetting r) {
      if (r == kOff) m->set_decode_fc2_defer(false);
      if (r == kOutside) m->set_decode_fc2_defer(true);  // fc1's target: rows 5-16
      if (r == kInside) {
        outside_steps = m->decode_fc2_defer_steps();
        m->set_decode_fc1_sms(kDecodeFc1SmsDefault, 1, 256);
      }
    });
    EXPECT_EQ(outside_steps, 0) << model << ": a step without fc1's target took it";
    EXPECT_GT(m->decode_fc2_defer_steps(), 0) << model << ": no step took it";
    m->set_decode_fc1_sms(kDecodeFc1SmsDefault);
    m->set_decode_fc1_sms_min_kv_tokens(min_kv);
  }
}

// dense through the bulk GEMV, launched at the fused decode attention's start as its
// programmatic dependent (set_decode_dense_bulk_rows; default 1 row): another summation order
// for dense than cuBLASLt's, so the bf16 bounds where it applies.
TEST(CudaPhiModel, DenseBulkCloseAndOnlyInItsRows) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsBf16()) {
    EXPECT_EQ(m->decode_dense_bulk_rows(), kDecodeDenseBulkRowsDefault);
    int64_t outside_steps = -1;
    ExpectRowRangeSwitchClose(*m, std::string(model) + " dense bulk", [&](RangeSetting r) {
      if (r == kOff) m->set_decode_dense_bulk_rows(0);
      if (r == kOutside) m->set_decode_dense_bulk_rows(2);
      if (r == kInside) {
        outside_steps = m->decode_dense_bulk_steps();
        m->set_decode_dense_bulk_rows(4);
      }
    });
    EXPECT_EQ(outside_steps, 0) << model << ": a step outside the row range took it";
    EXPECT_GT(m->decode_dense_bulk_steps(), 0) << model << ": no step took it";
    m->set_decode_dense_bulk_rows(kDecodeDenseBulkRowsDefault);
  }
}

// Recorded cuBLASLt algorithm choices (set_gemm_algo_choices, model/cuda_gemm_choices.h): every
// prefill GEMM form of the model gets a configuration other than the heuristic's first (the last
// one CudaGemm::ListAlgos offers for it), for prefill-sized steps only. The prefill must take them
// and differ from the heuristic's plans only in summation order (the bf16 bounds); the
// decode steps after it read that prefill's K/V, so they get the same bounds.
TEST(CudaPhiModel, PrefillGemmAlgoChoicesTakenAndClose) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsBf16()) {
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

// The decode GEMMs' warm-up tuning (set_decode_gemm_tune, model/cuda_gemm_tune.cc): off, nothing
// is timed or chosen; from 1 row with a margin of -1 (any finalist up to 2x the heuristic pick's
// time wins, so the test does not depend on which kernel is faster here) PrepareDecode times the
// forms of buckets 1-4 and records choices, which RunModeSteps' 3-row decode steps (bucket 4)
// take: another summation order (bf16 bounds against the heuristic's picks), graph replays equal
// to eager steps. A new setting forgets the choices.
TEST(CudaPhiModel, DecodeGemmTuningTakenAndClose) {
  PHI_REQUIRE_GPU();
  for (auto& [model, m] : FixtureModelsBf16()) {
    EXPECT_EQ(m->decode_gemm_tune_rows(), kDecodeGemmTuneRowsDefault);
    EXPECT_EQ(m->prefill_gemm_tune(), kPrefillGemmTuneDefault != 0);
    m->set_prefill_gemm_tune(false);  // PrefillGemmTuningTakenAndClose
    m->set_decode_gemm_tune(0);
    ASSERT_TRUE(m->PrepareDecode(4).ok());
    EXPECT_EQ(m->tuned_gemm_forms(), 0) << model;
    const std::vector<std::vector<float>> off = RunModeSteps(*m);
    EXPECT_EQ(m->chosen_gemm_plans(), 0u) << model;
    m->set_decode_gemm_tune(1, -1.0);
    ASSERT_TRUE(m->PrepareDecode(4).ok());
    EXPECT_GT(m->tuned_gemm_forms(), 0) << model;
    EXPECT_FALSE(m->tuned_gemm_choices().empty()) << model;
    for (const GemmAlgoChoice& c : m->tuned_gemm_choices()) {
      EXPECT_EQ(c.min_m, c.max_m) << model << ": a choice covers its bucket's rows only";
      EXPECT_LE(c.max_m, 4) << model;
    }
    const GraphEagerRuns r =
        RunGraphThenEager(*m, [&] { return static_cast<int64_t>(m->chosen_gemm_plans()); });
    EXPECT_GT(m->chosen_gemm_plans(), 0u) << model << ": no GEMM took a tuned choice";
    ASSERT_EQ(r.graph.size(), off.size());
    ASSERT_EQ(r.eager.size(), off.size());
    for (size_t i = 0; i < off.size(); ++i) {
      const std::string step = std::string(model) + " tuned, step " + std::to_string(i);
      EXPECT_TRUE(r.graph[i] == r.eager[i]) << step << ": graph != eager";
      ExpectLogitsClose(r.graph[i], std::vector<double>(off[i].begin(), off[i].end()), step);
    }
    // fc2 moved on or off the MLP branch changes the dense / fc2 forms: the choices are
    // forgotten and the next PrepareDecode times the forms again; fc1 alone on the branch or no
    // branch at all issue the same forms and keep them.
    const int mode = m->mlp_stream_mode();
    const int other = mode == kMlpStreamFc1Fc2 ? kMlpStreamFc1 : kMlpStreamFc1Fc2;
    ASSERT_TRUE(m->set_mlp_stream_mode(other).ok());
    EXPECT_TRUE(m->tuned_gemm_choices().empty()) << model << ": mlp stream " << other;
    ASSERT_TRUE(m->PrepareDecode(4).ok());
    EXPECT_GT(m->tuned_gemm_forms(), 0) << model << ": re-timed in mlp stream " << other;
    EXPECT_FALSE(m->tuned_gemm_choices().empty()) << model;
    if (other == kMlpStreamFc1) {
      ASSERT_TRUE(m->set_mlp_stream_mode(kMlpStreamOff).ok());
      EXPECT_FALSE(m->tuned_gemm_choices().empty()) << model << ": the same forms, kept";
    }
    ASSERT_TRUE(m->set_mlp_stream_mode(mode).ok());
    m->set_decode_gemm_tune(kDecodeGemmTuneRowsDefault);
    EXPECT_TRUE(m->tuned_gemm_choices().empty()) << model;
    m->set_prefill_gemm_tune(kPrefillGemmTuneDefault != 0);
  }
}

// The same tuning at prefill sizes (set_prefill_gemm_tune): with the arena grown to 512 rows only
// size 512 is timed, its choices cover rows [384, 768), and a 400-token prefill takes them (a
// margin of -1 forces choices, as above): bf16 bounds against the heuristic's picks.
TEST(CudaPhiModel, PrefillGemmTuningTakenAndClose) {
  PHI_REQUIRE_GPU();
  for (const char* name : {"models/tiny-phi-code", "tests/golden/phi-gqa-hd80"}) {
    std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / name, "bfloat16");
    ASSERT_NE(m, nullptr) << name;
    ASSERT_TRUE(m->AllocateKvCache(32, kKvBlockSize).ok()) << name;
    ASSERT_TRUE(m->ReserveWorkspace(512).ok()) << name;
    const int V = m->config().vocab_size;
    std::vector<int32_t> ids(400);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 7919 + 13) % V);
    const ForwardBatch prefill = OneSequence(ids, 0, Blocks(0, 400), /*all_rows=*/false);
    m->set_decode_gemm_tune(0, -1.0);
    m->set_prefill_gemm_tune(false);
    ASSERT_TRUE(m->PrepareDecode(4).ok());
    EXPECT_EQ(m->tuned_gemm_forms(), 0) << name;
    std::vector<float> off;
    ASSERT_TRUE(m->Forward(prefill, &off).ok()) << name;
    EXPECT_EQ(m->chosen_gemm_plans(), 0u) << name;
    m->set_prefill_gemm_tune(true);
    ASSERT_TRUE(m->PrepareDecode(4).ok());
    EXPECT_GT(m->tuned_gemm_forms(), 0) << name;
    EXPECT_FALSE(m->tuned_gemm_choices().empty()) << name;
    for (const GemmAlgoChoice& c : m->tuned_gemm_choices()) {
      EXPECT_EQ(c.min_m, 384) << name;
      EXPECT_EQ(c.max_m, 767) << name;
    }
    std::vector<float> on;
    ASSERT_TRUE(m->Forward(prefill, &on).ok()) << name;
    EXPECT_GT(m->chosen_gemm_plans(), 0u) << name << ": the prefill took no tuned choice";
    ExpectLogitsClose(on, std::vector<double>(off.begin(), off.end()),
                      std::string(name) + " tuned prefill vs heuristic");
  }
}

}  // namespace
}  // namespace phishard
