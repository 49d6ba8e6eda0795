// Multi-LoRA on the CUDA backend (model/cuda_lora.h): the peft golden fixtures
// (tests/golden/tiny-phi-code-adapters.json, peft 0.21 float32), one batch mixing the base model
// and three adapters against each request alone and against the float32 CPU backend (with and
// without decode graphs), the decode-step stream and tuning variants, and 100 load / use /
// offload cycles that leave device memory where it was (cudaMemGetInfo). The prefill paths
// with adapters: cuda_lora_prefill_test.cc.
//
// bf16 tolerances (ExpectClose): as cuda_model_test.cc's, why in tests/gpu/lora_model_test_util.h.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "model/adapter_registry.h"
#include "model/cpu_phi_model.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "nlohmann/json.hpp"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/lora_model_test_util.h"

namespace phishard::lora_test {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// ---- peft golden fixtures --------------------------------------------------------------------
void RunGolden(Form form) {
  const GemmFormEnv env(form);
  const json golden = ReadGolden();
  std::unique_ptr<CudaPhiModel> m = LoadCuda(kRepo / golden.at("base_model").get<std::string>());
  ASSERT_TRUE(m);
  std::unique_ptr<AdapterRegistry> reg = MakeRegistry(2);
  ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
  const int V = m->config().vocab_size;
  std::map<std::string, uint32_t> index_of;
  uint32_t next = 1;
  for (const json& a : golden.at("adapters")) {
    index_of[a.at("name")] = next;
    ASSERT_TRUE(reg->Load(next++, LoadAdapter(a, m->config())).ok());
  }
  ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
  EXPECT_GT(m->adapter_device_bytes(), 0);
  int cases = 0;
  double worst_frac = 0;
  for (const json& cs : golden.at("cases")) {
    const uint32_t idx = index_of.at(cs.at("adapter").get<std::string>());
    const std::vector<int32_t> prompt = cs.at("prompt_ids").get<std::vector<int32_t>>();
    const std::vector<int32_t> greedy = cs.at("greedy_ids").get<std::vector<int32_t>>();
    const std::vector<float> want = cs.at("last_logits").get<std::vector<float>>();
    const std::string what = cs.at("adapter").get<std::string>() + " on " + cs.at("prompt").dump();
    const int P = static_cast<int>(prompt.size()), G = static_cast<int>(greedy.size());
    // Teacher-forced prefill of prompt + reference continuation, every row.
    ForwardBatch b;
    b.token_ids = prompt;
    b.token_ids.insert(b.token_ids.end(), greedy.begin(), greedy.end() - 1);
    const int n = static_cast<int>(b.token_ids.size());
    b.positions.resize(n);
    std::iota(b.positions.begin(), b.positions.end(), 0);
    b.seqs.push_back(
        {.num_new_tokens = n, .context_len = n, .block_table = Blocks(0, n), .adapter_index = idx});
    b.logit_rows.resize(n);
    std::iota(b.logit_rows.begin(), b.logit_rows.end(), 0);
    std::vector<float> logits;
    ASSERT_TRUE(m->Forward(b, &logits).ok()) << what;
    const float* last = logits.data() + static_cast<size_t>(P - 1) * V;
    ExpectClose(last, want.data(), V, what + " last prompt row");
    const Closeness c = Compare(last, want.data(), V);
    worst_frac = std::max(worst_frac, c.worst / c.scale);
    std::printf("  %s: max|d| / scale %.4f, norm rel %.4f\n", what.substr(0, 48).c_str(),
                c.worst / c.scale, c.rel);
    // The base model is much farther from the fixture than the tolerance: the check means
    // something.
    ForwardBatch base = b;
    base.seqs[0].adapter_index = 0;
    std::vector<float> base_logits;
    ASSERT_TRUE(m->Forward(base, &base_logits).ok());
    const Closeness cb =
        Compare(base_logits.data() + static_cast<size_t>(P - 1) * V, want.data(), V);
    EXPECT_GT(cb.worst, 2 * c.worst) << what << ": the adapter barely changes the logits";
    // Top-1 along the reference path, allowing only bf16 near-ties.
    int clear = G;
    for (int i = 0; i < G; ++i) {
      const float* row = logits.data() + static_cast<size_t>(P - 1 + i) * V;
      const int ours = Argmax(row, V);
      float second = -INFINITY;
      for (int v = 0; v < V; ++v) {
        if (v != ours) second = std::max(second, row[v]);
      }
      if (row[ours] - second < 2 * kTieFrac * c.scale) clear = std::min(clear, i);
      if (ours != greedy[i]) {
        EXPECT_GE(row[greedy[i]], row[ours] - kTieFrac * c.scale)
            << what << " step " << i << ": reference token far below ours";
      }
    }
    // The serving path: prefill, then decode steps (graphs), greedy, up to the first near-tie.
    ForwardBatch s;
    s.token_ids = prompt;
    s.positions.resize(P);
    std::iota(s.positions.begin(), s.positions.end(), 0);
    const std::vector<int32_t> blocks = Blocks(64, P + G);
    s.seqs.push_back(
        {.num_new_tokens = P, .context_len = P, .block_table = blocks, .adapter_index = idx});
    s.logit_rows = {P - 1};
    std::vector<int32_t> ids;
    for (int i = 0; i < G; ++i) {
      ASSERT_TRUE(m->Forward(s, &logits).ok());
      ids.push_back(Argmax(logits.data(), V));
      s.token_ids = {ids.back()};
      s.positions = {P + i};
      s.seqs[0].num_new_tokens = 1;
      s.seqs[0].context_len = P + i + 1;
      s.logit_rows = {0};
    }
    EXPECT_TRUE(std::equal(greedy.begin(), greedy.begin() + clear, ids.begin()))
        << what << ": greedy tokens differ within the first " << clear << " steps (no near-tie)";
    ++cases;
  }
  EXPECT_EQ(cases, 12);
  EXPECT_GE(m->num_lora_decode_graphs(), 1);
  std::printf("cuda lora vs peft (%s prefill): %d cases, worst max|d| / scale = %.4f\n",
              FormName(form), cases, worst_frac);
}

TEST(CudaLoraGolden, EachAdapterMatchesPeftWithinBf16) {
  PHI_REQUIRE_GPU();
  RunGolden(Form::kSgmv);
}

// The same fixtures with every prefill step in the GEMM form (gather, cuBLASLt shrink, mask into
// bf16 hi + lo parts, cuBLASLt expand with beta = 1; fc1 with the GELU epilogue on the accumulated
// sum). Measured: worst 0.0112 of the scale (SGMV 0.0103); without the hi + lo split
// (PHISHARD_LORA_GEMM_SPLIT_T=0) one case reaches norm rel 0.019 > 0.015.
TEST(CudaLoraGolden, EachAdapterMatchesPeftWithinBf16ThroughTheGemmForm) {
  PHI_REQUIRE_GPU();
  RunGolden(Form::kGemm);
}

// The same with one expand GEMM per segment against its adapter's columns (compact T): the same
// nonzero products summed in float32 and y rounded once, so the same bounds.
TEST(CudaLoraGolden, EachAdapterMatchesPeftWithinBf16ThroughTheSegmentedGemmForm) {
  PHI_REQUIRE_GPU();
  RunGolden(Form::kSegmented);
}

void RunMixed(Form form) {
  const GemmFormEnv env(form);
  const fs::path dir = TinyPhiDir();
  std::unique_ptr<CudaPhiModel> g = LoadCuda(dir, true);
  std::unique_ptr<CudaPhiModel> e = LoadCuda(dir, false);
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> cpu = CpuPhiModel::Load(dir);
  ASSERT_TRUE(g && e && cpu.ok());
  ASSERT_TRUE((*cpu)->AllocateKvCache(256, kKvBlockSize).ok());
  std::unique_ptr<AdapterRegistry> reg2 = GoldenAdapters(g->config(), 2),
                                   reg4 = GoldenAdapters(g->config(), 4);
  ASSERT_TRUE(reg2 && reg4);
  ASSERT_TRUE(g->SetAdapterRegistry(reg2.get()).ok());
  ASSERT_TRUE(e->SetAdapterRegistry(reg2.get()).ok());
  ASSERT_TRUE((*cpu)->SetAdapterRegistry(reg4.get()).ok());
  const int V = g->config().vocab_size;
  const std::vector<Req> reqs = MixedRequests();
  const int steps = 4;
  const auto mixed_g = RunBatch(*g, reqs, 0, steps);
  const auto mixed_e = RunBatch(*e, reqs, 0, steps);
  const auto mixed_cpu = RunBatch(**cpu, reqs, 0, steps);
  ASSERT_EQ(mixed_g.size(), static_cast<size_t>(steps + 1));
  EXPECT_GE(g->num_lora_decode_graphs(), 1);
  EXPECT_EQ(e->num_lora_decode_graphs(), 0);
  for (int st = 0; st <= steps; ++st) {
    // Graph replays launch exactly the eager step's kernels.
    EXPECT_EQ(mixed_g[st], mixed_e[st]) << "step " << st << ": graph and eager steps differ";
    ASSERT_EQ(mixed_g[st].size(), mixed_cpu[st].size());
  }
  // Each request alone (graphs on) and the CPU on the mixed batch, per request and step.
  int row0 = 0;
  for (size_t s = 0; s < reqs.size(); ++s) {
    const auto alone = RunBatch(*g, {reqs[s]}, 128, steps);
    const int n = static_cast<int>(reqs[s].prompt.size());
    const std::string what =
        "request " + std::to_string(s) + " (adapter index " + std::to_string(reqs[s].adapter) + ")";
    ExpectClose(mixed_g[0].data() + static_cast<size_t>(row0) * V, alone[0].data(),
                static_cast<size_t>(n) * V, what + " prefill vs alone");
    ExpectClose(mixed_g[0].data() + static_cast<size_t>(row0) * V,
                mixed_cpu[0].data() + static_cast<size_t>(row0) * V, static_cast<size_t>(n) * V,
                what + " prefill vs cpu float32");
    for (int st = 1; st <= steps; ++st) {
      ExpectClose(mixed_g[st].data() + s * V, alone[st].data(), V,
                  what + " decode " + std::to_string(st) + " vs alone");
      ExpectClose(mixed_g[st].data() + s * V, mixed_cpu[st].data() + s * V, V,
                  what + " decode " + std::to_string(st) + " vs cpu float32");
    }
    row0 += n;
  }
}

TEST(CudaLoraBatch, MixedBatchEqualsEachRequestAloneAndTheCpuGraphsOnAndOff) {
  PHI_REQUIRE_GPU();
  RunMixed(Form::kSgmv);
}

// The mixed prefill (and each request's own) through the GEMM form: base rows between adapter
// segments, an index nobody loaded, one adapter over two sequences, 1-row segments.
TEST(CudaLoraBatch, MixedBatchThroughTheGemmFormEqualsEachRequestAloneAndTheCpu) {
  PHI_REQUIRE_GPU();
  RunMixed(Form::kGemm);
}

// The same with per-segment expands: base rows between segments get fc1's activation from the
// separate kernel, adapter rows from their segment's GEMM epilogue.
TEST(CudaLoraBatch, MixedBatchThroughTheSegmentedGemmFormEqualsEachRequestAloneAndTheCpu) {
  PHI_REQUIRE_GPU();
  RunMixed(Form::kSegmented);
}

// The shrinks forked onto a side stream beside the base GEMMs (default) against the same
// shrinks on the main stream (PHISHARD_LORA_OVERLAP=0): the same kernels on the same inputs, each
// t element summed by one block in a fixed order, so every logit must be bit-identical (a missing
// join would let an expand read a t window before its shrink wrote it, which shows here, in
// graphs and eagerly). The batch mixes base rows, an unloaded index and the r4 adapter that
// adapts q, v and fc2 only (the k / dense / fc1 launches skip its rows).
TEST(CudaLoraBatch, ShrinksBesideTheBaseGemmsGiveBitIdenticalLogits) {
  PHI_REQUIRE_GPU();
  const fs::path dir = TinyPhiDir();
  std::unique_ptr<CudaPhiModel> on_g = LoadCuda(dir, true), on_e = LoadCuda(dir, false);
  setenv("PHISHARD_LORA_OVERLAP", "0", 1);
  std::unique_ptr<CudaPhiModel> off_g = LoadCuda(dir, true), off_e = LoadCuda(dir, false);
  unsetenv("PHISHARD_LORA_OVERLAP");
  ASSERT_TRUE(on_g && on_e && off_g && off_e);
  std::unique_ptr<AdapterRegistry> reg = GoldenAdapters(on_g->config());
  ASSERT_TRUE(reg);
  const std::vector<Req> reqs = ShortMixedRequests();
  const int steps = 3;
  std::vector<std::vector<std::vector<float>>> runs;
  for (CudaPhiModel* m : {on_g.get(), on_e.get(), off_g.get(), off_e.get()}) {
    ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
    runs.push_back(RunBatch(*m, reqs, 0, steps));
    ASSERT_EQ(runs.back().size(), static_cast<size_t>(steps + 1));
  }
  EXPECT_GE(on_g->num_lora_decode_graphs(), 1);
  for (size_t r = 1; r < runs.size(); ++r) {
    for (int st = 0; st <= steps; ++st) {
      EXPECT_EQ(runs[0][st], runs[r][st]) << "step " << st << ": run " << r
                                          << " (0 overlap+graphs, 1 overlap eager, 2 main-stream "
                                             "shrinks+graphs, 3 main-stream eager) differs";
    }
  }
}

// Decode steps with ranks <= 64 run the fused kernels (SgmvDecodeFusedCuda), and with them the
// MLP branch on its own stream (CudaModelOptions::mlp_stream). Runs that launch the same kernels
// on the same inputs in the same order on each buffer must give bit-identical logits (a missing
// fork / join would let fc1's delta, the GELU or fc2 race the other branch): MLP stream mode 1
// (fc1 on the branch) and LoRA branch mode 0 (PHISHARD_LORA_BRANCH=0: no fork with adapters) as
// mode 0 (one stream); the branch joined before attention (PHISHARD_LORA_JOIN_EARLY=1) as after
// it; the branch at high priority (PHISHARD_LORA_BRANCH_PRIORITY=1, graphs with node priorities)
// as at the default one; LoRA branch mode 3 (fc2's GEMM on the main stream, its delta on the
// branch beside attention) as mode 1. Mode 2 adds fc2 to h on the branch before dense (the
// residual's terms rounded in another order; LoRA branch mode 1 with fc2's delta there too, mode 2
// with it beside dense's after the join) and PHISHARD_LORA_FUSED=0 runs the shrink + expand kernels
// (t summed in another order): those within the bf16 bounds (ExpectClose) of mode 0, graphs on.
TEST(CudaLoraBatch, MlpStreamModesAndFusedKernelsAgree) {
  PHI_REQUIRE_GPU();
  const fs::path dir = TinyPhiDir();
  struct Variant {
    const char* name;
    int mlp_mode;
    const char* branch;          // PHISHARD_LORA_BRANCH
    const char* early;           // PHISHARD_LORA_JOIN_EARLY
    const char* fused;           // PHISHARD_LORA_FUSED
    int same_as;                 // index of a variant it must equal bit for bit, or -1: close to 0
    const char* priority = "0";  // PHISHARD_LORA_BRANCH_PRIORITY
  };
  const Variant variants[] = {
      {"mode 0", kMlpStreamOff, "2", "0", "1", -1},
      {"mode 1", kMlpStreamFc1, "2", "0", "1", 0},
      {"mode 2, LoRA branch 0", kMlpStreamFc1Fc2, "0", "0", "1", 0},
      {"mode 2, LoRA branch 1", kMlpStreamFc1Fc2, "1", "0", "1", -1},
      {"mode 2, LoRA branch 2", kMlpStreamFc1Fc2, "2", "0", "1", -1},
      {"mode 2, LoRA branch 1, early join", kMlpStreamFc1Fc2, "1", "1", "1", 3},
      {"mode 2, LoRA branch 2, early join", kMlpStreamFc1Fc2, "2", "1", "1", 4},
      {"shrink + expand kernels", kMlpStreamFc1Fc2, "2", "0", "0", -1},
      {"mode 2, LoRA branch 1, high priority", kMlpStreamFc1Fc2, "1", "0", "1", 3, "1"},
      {"mode 2, LoRA branch 1, early join, high priority", kMlpStreamFc1Fc2, "1", "1", "1", 5, "1"},
      {"mode 2, LoRA branch 3 (fc2 GEMM before attention)", kMlpStreamFc1Fc2, "3", "1", "1", 3},
  };
  std::vector<std::unique_ptr<CudaPhiModel>> models;
  for (const Variant& v : variants) {
    setenv("PHISHARD_LORA_BRANCH", v.branch, 1);
    setenv("PHISHARD_LORA_JOIN_EARLY", v.early, 1);
    setenv("PHISHARD_LORA_FUSED", v.fused, 1);
    setenv("PHISHARD_LORA_BRANCH_PRIORITY", v.priority, 1);
    models.push_back(LoadCuda(dir, true));
    ASSERT_TRUE(models.back()) << v.name;
    ASSERT_TRUE(models.back()->set_mlp_stream_mode(v.mlp_mode).ok());
  }
  unsetenv("PHISHARD_LORA_BRANCH");
  unsetenv("PHISHARD_LORA_JOIN_EARLY");
  unsetenv("PHISHARD_LORA_FUSED");
  unsetenv("PHISHARD_LORA_BRANCH_PRIORITY");
  std::unique_ptr<AdapterRegistry> reg = GoldenAdapters(models[0]->config());
  ASSERT_TRUE(reg);
  const std::vector<Req> reqs = ShortMixedRequests();
  const int steps = 3;
  std::vector<std::vector<std::vector<float>>> runs;
  for (auto& m : models) {
    ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
    runs.push_back(RunBatch(*m, reqs, 0, steps));
    ASSERT_EQ(runs.back().size(), static_cast<size_t>(steps + 1));
    EXPECT_GE(m->num_lora_decode_graphs(), 1);
  }
  const int V = models[0]->config().vocab_size;
  for (size_t i = 1; i < models.size(); ++i) {
    const Variant& v = variants[i];
    for (int st = 1; st <= steps; ++st) {
      if (v.same_as >= 0) {
        EXPECT_EQ(runs[i][st], runs[v.same_as][st])
            << "decode step " << st << ": " << v.name << " vs " << variants[v.same_as].name;
        continue;
      }
      for (size_t s = 0; s < reqs.size(); ++s) {
        const std::string what = "decode step " + std::to_string(st) + " row " + std::to_string(s);
        ExpectClose(runs[i][st].data() + s * V, runs[0][st].data() + s * V, V,
                    what + ": " + v.name + " vs mode 0");
      }
    }
  }
  // The variants differ where they should: fc2's delta beside dense's (branch 2) is not the same
  // sum as fc2's delta on the branch (branch 1), so a switch that changed nothing shows here.
  bool differs = false;
  for (int st = 1; st <= steps; ++st) differs = differs || runs[3][st] != runs[4][st];
  EXPECT_TRUE(differs) << "LoRA branch modes 1 and 2 gave identical logits";
}

// CudaPhiModel::set_lora_decode_tuning (CudaLora::SetDecodeTuning): column blocks per hook and
// the PDL attribute change only launch shapes (each column block recomputes its row's
// intermediate in the same order), so a mixed batch's decode logits stay bit for bit those of the
// default; malformed specs are INVALID_ARGUMENT naming the spec and leave the tuning as it was.
TEST(CudaLoraBatch, DecodeTuningChangesLaunchShapesNotLogits) {
  PHI_REQUIRE_GPU();
  const fs::path dir = TinyPhiDir();
  std::unique_ptr<CudaPhiModel> plain = LoadCuda(dir, true), tuned = LoadCuda(dir, true);
  ASSERT_TRUE(plain && tuned);
  // The tuned model also turns the beside mode off (fused launches after the GEMMs), the plain
  // one keeps it on (delta-only launches beside them, the q / k / v deltas folded by the rotary,
  // dense's into the next LayerNorm), `dense1` folds dense's delta right after the dense GEMM
  // and the q / k / v deltas before the rotary: the same logits, bit for bit.
  std::unique_ptr<CudaPhiModel> dense1 = LoadCuda(dir, true);
  ASSERT_TRUE(dense1);
  EXPECT_EQ(plain->lora_decode_tuning(), "3:0.0.0.0:1:1:2:1:1:0.0");
  ASSERT_TRUE(dense1->set_lora_decode_tuning("3:0.0.0.0:1:1:1:0").ok());
  EXPECT_EQ(dense1->lora_decode_tuning(), "3:0.0.0.0:1:1:1:0:1:0.0");
  ASSERT_TRUE(tuned->set_lora_decode_tuning("3:3.4.2.2:0").ok());
  EXPECT_EQ(tuned->lora_decode_tuning(), "3:3.4.2.2:0:1:2:1:1:0.0");
  ASSERT_TRUE(tuned->set_lora_decode_tuning("3:3.4.2.2:0:0").ok());
  EXPECT_EQ(tuned->lora_decode_tuning(), "3:3.4.2.2:0:0:2:1:1:0.0");
  for (const char* bad :
       {"9", "x", "3:1.2", "3:0.0.0.-1", "3:0.0.0.0:2", "3:0.0.0.0:1:2", "3:0.0.0.0:1:1:3",
        "3:0.0.0.0:1:1:1:2", "3:0.0.0.0:1:1:1:1:2", "3:0.0.0.0:1:1:1:1:1:1",
        "3:0.0.0.0:1:1:1:1:1:1.1.1", "3:0.0.0.0:1:1:1:1:1:-1.0", "3:0.0.0.0:1:1:1:1:1:0.0:0", ""}) {
    const absl::Status st = tuned->set_lora_decode_tuning(bad);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << "'" << bad << "'";
    EXPECT_NE(st.message().find(std::string("'") + bad + "'"), std::string::npos) << st.message();
  }
  EXPECT_EQ(tuned->lora_decode_tuning(), "3:3.4.2.2:0:0:2:1:1:0.0");
  std::unique_ptr<AdapterRegistry> reg = GoldenAdapters(plain->config());
  ASSERT_TRUE(reg);
  const std::vector<Req> reqs = ShortMixedRequests();
  const int steps = 3;
  ASSERT_TRUE(plain->SetAdapterRegistry(reg.get()).ok());
  ASSERT_TRUE(tuned->SetAdapterRegistry(reg.get()).ok());
  ASSERT_TRUE(dense1->SetAdapterRegistry(reg.get()).ok());
  const auto want = RunBatch(*plain, reqs, 0, steps);
  const auto got = RunBatch(*tuned, reqs, 0, steps);
  const auto got1 = RunBatch(*dense1, reqs, 0, steps);
  ASSERT_EQ(got.size(), want.size());
  ASSERT_EQ(got1.size(), want.size());
  for (int st = 1; st <= steps; ++st) {
    EXPECT_EQ(got[st], want[st]) << "decode step " << st << ": beside off";
    EXPECT_EQ(got1[st], want[st]) << "decode step " << st << ": deltas folded after their GEMMs";
  }
  EXPECT_GE(tuned->num_lora_decode_graphs(), 1);
  // The comparison means something only if the beside mode really ran: its buffer is made when
  // the adapters load (SetAdapterRegistry, before any step here), and every decode step with
  // adapter rows takes it (before the lorafc2 fix none did here: the buffer was never made).
  EXPECT_GE(plain->lora_beside_decode_steps(), steps);
  EXPECT_GE(dense1->lora_beside_decode_steps(), steps);
  EXPECT_EQ(tuned->lora_beside_decode_steps(), 0);
}

// ---- load / use / offload ---------------------------------------------------------------------
// An adapter value past float16's range (finite in float32: 1e5 > 65504) on a float16 model is
// refused at the upload, naming the module and the dtype, instead of becoming inf on the device;
// with it offloaded again the model runs as before (the server's LoadAdapter rolls back so).
TEST(CudaLoraUpload, ValueOutsideTheModelDtypeIsRefused) {
  PHI_REQUIRE_GPU();
  const json golden = ReadGolden();
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> m = CudaPhiModel::Load(
      TinyPhiDir(), {.dtype = "float16", .device = 0, .reserve_tokens = 256});
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_TRUE((*m)->AllocateKvCache(64, kKvBlockSize).ok());
  std::unique_ptr<AdapterRegistry> reg = MakeRegistry(2);
  ASSERT_TRUE(reg);
  LoraAdapter bad = LoadAdapter(golden.at("adapters")[0], (*m)->config());
  const LoraTarget t = LoraTarget::kFc2;
  LoraModule fc2 = bad.module(1, t);
  ASSERT_TRUE(fc2.present());
  fc2.b[3] = 1e5f;
  ASSERT_TRUE(bad.SetModule((*m)->config(), 1, t, std::move(fc2)).ok());
  ForwardBatch one;
  one.token_ids = {5};
  one.positions = {0};
  one.seqs = {{.num_new_tokens = 1, .context_len = 1, .block_table = {0}}};
  one.logit_rows = {0};
  std::vector<float> before, after;
  ASSERT_TRUE((*m)->SetAdapterRegistry(reg.get()).ok());
  ASSERT_TRUE((*m)->Forward(one, &before).ok());
  ASSERT_TRUE(reg->Load(4, std::move(bad)).ok());
  const absl::Status st = (*m)->SetAdapterRegistry(reg.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()),
              AllOf(HasSubstr(LoraModuleName(t, 1)), HasSubstr("lora_B"), HasSubstr("float16")));
  ASSERT_TRUE(reg->Offload(4));
  ASSERT_TRUE((*m)->SetAdapterRegistry(reg.get()).ok());
  ASSERT_TRUE((*m)->Forward(one, &after).ok());
  EXPECT_EQ(after, before);
}

TEST(CudaLoraMemory, HundredLoadUseOffloadCyclesReturnDeviceMemoryToBaseline) {
  PHI_REQUIRE_GPU();
  const json golden = ReadGolden();
  std::unique_ptr<CudaPhiModel> m = LoadCuda(TinyPhiDir());
  ASSERT_TRUE(m);
  std::unique_ptr<AdapterRegistry> reg = MakeRegistry(2, 2);
  ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
  const LoraAdapter proto = LoadAdapter(golden.at("adapters")[2], m->config());  // r16 rsLoRA
  ForwardBatch decode;
  decode.token_ids = {5, 9};
  decode.positions = {0, 0};
  decode.seqs = {{.num_new_tokens = 1, .context_len = 1, .block_table = {0}, .adapter_index = 0},
                 {.num_new_tokens = 1, .context_len = 1, .block_table = {1}, .adapter_index = 7}};
  decode.logit_rows = {0, 1};
  std::vector<float> logits, first, base;
  // Warm every buffer once (LoRA workspace, graphs of both kinds), then take the baseline.
  ASSERT_TRUE(reg->Load(7, LoraAdapter(proto)).ok());
  ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
  ASSERT_TRUE(m->Forward(decode, &logits).ok());
  ASSERT_TRUE(m->Forward(decode, &first).ok());  // replayed graph
  ASSERT_TRUE(reg->Offload(7));
  ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
  ASSERT_TRUE(m->Forward(decode, &base).ok());  // index 7 now runs the base model
  ASSERT_TRUE(m->Forward(decode, &base).ok());
  EXPECT_EQ(m->adapter_device_bytes(), 0);
  size_t free0 = 0, total = 0;
  ASSERT_EQ(DeviceMemGetInfo(&free0, &total), 0);
  const int lora_graphs = m->num_lora_decode_graphs();
  int64_t loaded_bytes = 0;
  for (int cycle = 0; cycle < 100; ++cycle) {
    ASSERT_TRUE(reg->Load(7, LoraAdapter(proto)).ok());
    ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
    loaded_bytes = m->adapter_device_bytes();
    ASSERT_GE(loaded_bytes, proto.num_params() * 2);
    ASSERT_TRUE(m->Forward(decode, &logits).ok());
    ASSERT_EQ(logits, first) << "cycle " << cycle << ": a reloaded adapter computes differently";
    ASSERT_TRUE(reg->Offload(7));
    ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
    ASSERT_EQ(m->adapter_device_bytes(), 0);
    ASSERT_TRUE(m->Forward(decode, &logits).ok());
    ASSERT_EQ(logits, base) << "cycle " << cycle << ": the offloaded adapter still applies";
  }
  size_t free1 = 0;
  ASSERT_EQ(DeviceMemGetInfo(&free1, &total), 0);
  // cudaFree hands the memory back to the driver at once; allocation granularity is 2 MiB.
  EXPECT_LE(std::llabs(static_cast<long long>(free1) - static_cast<long long>(free0)), 2 << 20)
      << "device memory before " << free0 << " after 100 cycles " << free1;
  EXPECT_EQ(m->num_lora_decode_graphs(), lora_graphs) << "slot reuse must not recapture graphs";
  EXPECT_NE(first, base);
  std::printf("100 load/use/offload cycles: adapter copy %lld bytes, free memory %zu -> %zu\n",
              static_cast<long long>(loaded_bytes), free0, free1);
}

TEST(CudaLoraMemory, KvSizingLeavesTheAdapterBudgetFree) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaPhiModel> m = LoadCuda(TinyPhiDir());
  ASSERT_TRUE(m);
  absl::StatusOr<int> without = m->MaxKvBlocks(0.5, 512);
  ASSERT_TRUE(without.ok());
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> reg =
      AdapterRegistry::Create(4, int64_t{2} << 30, 2);  // 2 GiB budget
  ASSERT_TRUE(reg.ok());
  ASSERT_TRUE(m->SetAdapterRegistry(reg->get()).ok());
  absl::StatusOr<int> with = m->MaxKvBlocks(0.5, 512);
  ASSERT_TRUE(with.ok());
  const double per_block = 2.0 * m->config().num_hidden_layers * kKvBlockSize *
                           m->config().num_key_value_heads * m->config().head_dim * 2;
  EXPECT_LE(*with, *without - static_cast<int>((double{2} * (1 << 30)) / per_block));
  ASSERT_TRUE(m->SetAdapterRegistry(nullptr).ok());
}

}  // namespace
}  // namespace phishard::lora_test
