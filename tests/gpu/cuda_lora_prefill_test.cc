// Multi-LoRA prefill paths on the CUDA backend (model/cuda_lora.h, model/cuda_lora_gemm.cc,
// model/cuda_phi_last_rows.cc): the MLP fork and the trimmed last layer with adapters, and the
// GEMM form's q / k / v deltas before the qkv GEMM, against the full one-stream path with the
// deltas after, in each prefill form (split from cuda_lora_model_test.cc, whose fixtures and
// mixed batches they share: tests/gpu/lora_model_test_util.h).
//
// bf16 tolerances (ExpectClose): as cuda_model_test.cc's, why in tests/gpu/lora_model_test_util.h.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "model/adapter_registry.h"
#include "model/cuda_phi_model.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/lora_model_test_util.h"

namespace phishard::lora_test {
namespace {

// The prefill MLP fork with adapters (GEMM-form steps: fc1 and its delta on the MLP stream beside
// rotary + attention) and the trimmed last layer with adapters (fc1 / dense / fc2 and their deltas
// on the logit rows only, over the lm_head's SGMV logit tiles) against the full one-stream path
// (set_prefill_mlp_fork(false), set_prefill_last_rows(false)), in each prefill form, on a mixed
// batch that asks for each request's last row. The fork launches the same kernels on the same
// inputs in the same order on each buffer: bit-identical logits (a missing wait would let fc1's
// delta read T before AfterQkv's mask wrote it, or race the q / k / v expands' workspace). The
// trimmed layer sums the logit rows' last-layer products in another order (decode attention,
// GEMVs, SGMV deltas instead of GEMMs): the bf16 bounds (ExpectClose), also against each request
// alone. The K/V cache is the same bits either way (every row's qkv and its deltas as before), so
// the decode steps after are bit-identical.
void RunPrefillPaths(Form form) {
  const GemmFormEnv env(form);
  const fs::path dir = TinyPhiDir();
  std::unique_ptr<CudaPhiModel> full = LoadCuda(dir), fork = LoadCuda(dir), both = LoadCuda(dir);
  ASSERT_TRUE(full && fork && both);
  full->set_prefill_mlp_fork(false);
  full->set_prefill_last_rows(false);
  fork->set_prefill_mlp_fork(true);
  fork->set_prefill_last_rows(false);
  both->set_prefill_mlp_fork(true);
  both->set_prefill_last_rows(true);
  std::unique_ptr<AdapterRegistry> reg = GoldenAdapters(full->config());
  ASSERT_TRUE(reg);
  for (CudaPhiModel* m : {full.get(), fork.get(), both.get()}) {
    ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
  }
  const int V = full->config().vocab_size;
  // RunMixed's batch: base rows between adapter segments, an unloaded index, one adapter over two
  // sequences, a 1-token request (its last row is its only row); 35 rows, 7 logit rows.
  const std::vector<Req> reqs = MixedRequests();
  const int steps = 3;
  const auto want = RunBatch(*full, reqs, 0, steps, true);
  const auto forked = RunBatch(*fork, reqs, 0, steps, true);
  const int64_t fork_steps = fork->prefill_mlp_fork_steps();
  const auto got = RunBatch(*both, reqs, 0, steps, true);
  const int64_t last_steps = both->prefill_last_rows_steps();
  ASSERT_EQ(want.size(), static_cast<size_t>(steps + 1));
  ASSERT_EQ(forked.size(), want.size());
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(full->prefill_mlp_fork_steps() + full->prefill_last_rows_steps(), 0);
  // The fork takes GEMM-form steps only; the trimmed layer every form.
  EXPECT_EQ(fork_steps, form == Form::kSgmv ? 0 : 1) << FormName(form);
  EXPECT_EQ(last_steps, 1) << FormName(form);
  for (int st = 0; st <= steps; ++st) {
    EXPECT_EQ(forked[st], want[st]) << FormName(form) << " step " << st << ": fork differs";
    if (st > 0) {
      EXPECT_EQ(got[st], want[st]) << FormName(form) << " decode " << st << ": trimmed differs";
    }
  }
  for (size_t s = 0; s < reqs.size(); ++s) {
    const std::string what = std::string(FormName(form)) + " request " + std::to_string(s) +
                             " (adapter index " + std::to_string(reqs[s].adapter) + ")";
    ExpectClose(got[0].data() + s * V, want[0].data() + s * V, V, what + " trimmed vs full");
    const Closeness c = Compare(got[0].data() + s * V, want[0].data() + s * V, V);
    std::printf("  %s: trimmed vs full max|d| / scale %.4f, norm rel %.4f\n", what.c_str(),
                c.worst / c.scale, c.rel);
    const auto alone = RunBatch(*both, {reqs[s]}, 128, steps, true);
    for (int st = 0; st <= steps; ++st) {
      ExpectClose(got[st].data() + s * V, alone[st].data(), V,
                  what + " step " + std::to_string(st) + " vs alone");
    }
  }
}

TEST(CudaLoraBatch, PrefillForkAndTrimmedLastLayerMatchTheFullPathWithSgmv) {
  PHI_REQUIRE_GPU();
  RunPrefillPaths(Form::kSgmv);
}

TEST(CudaLoraBatch, PrefillForkAndTrimmedLastLayerMatchTheFullPathWithTheGemmForm) {
  PHI_REQUIRE_GPU();
  RunPrefillPaths(Form::kGemm);
}

TEST(CudaLoraBatch, PrefillForkAndTrimmedLastLayerMatchTheFullPathWithTheSegmentedGemmForm) {
  PHI_REQUIRE_GPU();
  RunPrefillPaths(Form::kSegmented);
}

// GEMM-form steps write the q / k / v deltas before the qkv GEMM, which adds to them (CudaLora::
// GemmQkvDeltaFirst, the default) instead of adding them after it. Both sum the same two bf16
// terms, round(x Wᵀ + b) and round(T Bᵀ), when cuBLASLt's beta = 1 kernels round their product
// before adding C, as measured on an H200 (then the logits are the same bits; printed, not
// required: another algorithm may add in float32, one rounding less). Required: within the bf16
// bounds (ExpectClose) of the deltas-after path (whose distance to peft / the CPU the golden and
// mixed-batch tests check), in the prefill logits and in the decode steps that read the K/V
// cache it wrote, on the mixed batch of RunPrefillPaths (base rows between segments: the
// segmented expands leave them to the zeroing), full path and trimmed last layer; and the form
// really ran in every layer. The gathers' launch shape and the next layer's gathers prefetched
// on the side stream (set_lora_prefill_tuning "1:1:0:1" against "1:8:1:1") change no
// bit: they copy the same words into the same places, and the prefetch must be waited for (a
// missing wait would let a layer read the matrices of the layer two before). The merged q / k / v
// expand of segmented steps ("1:8:1:1"; the default "1:8:1:0:0" runs three) adds only 0 x 0
// products to each of the three GEMMs' sums (B_qkv's zeros against T's q / k / v blocks): within
// the bf16 bounds of the three GEMMs, bit identity printed (expected on an H200: zero products
// leave float32 sums unchanged, but another algorithm may order or split K differently); it must
// really run in every layer of the segmented form and in none of the concatenated form (which has
// no such layout).
void RunQkvDeltasFirst(Form form) {
  const GemmFormEnv env(form);
  const fs::path dir = TinyPhiDir();
  std::unique_ptr<CudaPhiModel> first = LoadCuda(dir), after = LoadCuda(dir),
                                inline_ = LoadCuda(dir), three = LoadCuda(dir);
  ASSERT_TRUE(first && after && inline_ && three);
  EXPECT_EQ(three->lora_prefill_tuning(), "1:8:1:0:0");  // the default
  ASSERT_TRUE(first->set_lora_prefill_tuning("1:8:1:1").ok());
  ASSERT_TRUE(after->set_lora_prefill_tuning("0:8:1:1").ok());
  ASSERT_TRUE(inline_->set_lora_prefill_tuning("1:1:0:1").ok());
  EXPECT_EQ(first->lora_prefill_tuning(), "1:8:1:1:0");
  EXPECT_EQ(after->lora_prefill_tuning(), "0:8:1:1:0");
  EXPECT_EQ(inline_->lora_prefill_tuning(), "1:1:0:1:0");
  EXPECT_FALSE(first->set_lora_prefill_tuning("2").ok());
  EXPECT_FALSE(first->set_lora_prefill_tuning("1:4").ok());
  EXPECT_FALSE(first->set_lora_prefill_tuning("1:8:1:2").ok());
  EXPECT_FALSE(first->set_lora_prefill_tuning("1:8:1:0:2").ok());
  EXPECT_FALSE(first->set_lora_prefill_tuning("1:8:1:0:1:0").ok());
  std::unique_ptr<AdapterRegistry> reg = GoldenAdapters(first->config());
  ASSERT_TRUE(reg);
  for (CudaPhiModel* m : {first.get(), after.get(), inline_.get(), three.get()}) {
    ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
  }
  const int V = first->config().vocab_size, L = first->config().num_hidden_layers;
  const std::vector<Req> reqs = MixedRequests();
  const int steps = 3;
  for (bool last_rows : {false, true}) {
    for (CudaPhiModel* m : {first.get(), after.get(), inline_.get(), three.get()}) {
      m->set_prefill_last_rows(last_rows);
    }
    const int64_t before = first->lora_qkv_first_layers();
    const int64_t prefetched = first->lora_prefetched_layers();
    const int64_t merged = first->lora_qkv_merged_layers();
    const auto got = RunBatch(*first, reqs, 0, steps, true);
    const auto want = RunBatch(*after, reqs, 0, steps, true);
    const auto in_line = RunBatch(*inline_, reqs, 0, steps, true);
    const auto three_gemms = RunBatch(*three, reqs, 0, steps, true);
    EXPECT_EQ(first->lora_qkv_merged_layers() - merged, form == Form::kSegmented ? L : 0)
        << FormName(form);
    EXPECT_EQ(three->lora_qkv_merged_layers(), 0);
    ASSERT_EQ(three_gemms.size(), static_cast<size_t>(steps + 1));
    bool same3 = true;
    for (int st = 0; st <= steps; ++st) {
      same3 = same3 && three_gemms[st] == got[st];
      for (size_t s = 0; s < reqs.size(); ++s) {
        ExpectClose(got[st].data() + s * V, three_gemms[st].data() + s * V, V,
                    std::string(FormName(form)) + " merged vs three expands step " +
                        std::to_string(st) + " request " + std::to_string(s));
      }
    }
    std::printf("  %s%s: merged q / k / v expand vs three bit-identical: %s\n", FormName(form),
                last_rows ? " trimmed" : " full", same3 ? "yes" : "no");
    // Every layer of the one GEMM-form step (the golden adapters adapt q, k and v everywhere),
    // and every layer but the first prefetched.
    EXPECT_EQ(first->lora_qkv_first_layers() - before, L) << FormName(form);
    EXPECT_EQ(first->lora_prefetched_layers() - prefetched, L - 1) << FormName(form);
    EXPECT_EQ(after->lora_qkv_first_layers(), 0);
    EXPECT_EQ(after->lora_prefetched_layers(), 0);
    EXPECT_EQ(inline_->lora_prefetched_layers(), 0);
    ASSERT_EQ(got.size(), static_cast<size_t>(steps + 1));
    ASSERT_EQ(want.size(), got.size());
    ASSERT_EQ(in_line.size(), got.size());
    for (int st = 0; st <= steps; ++st) {
      EXPECT_EQ(in_line[st], got[st]) << FormName(form) << (last_rows ? " trimmed" : " full")
                                      << " step " << st << ": prefetch / 8-chunk gathers differ";
    }
    bool same = true;
    for (int st = 0; st <= steps; ++st) {
      same = same && got[st] == want[st];
      for (size_t s = 0; s < reqs.size(); ++s) {
        const std::string what = std::string(FormName(form)) + (last_rows ? " trimmed" : " full") +
                                 " step " + std::to_string(st) + " request " + std::to_string(s);
        ExpectClose(got[st].data() + s * V, want[st].data() + s * V, V, what);
        if (st == 0) {
          const Closeness c = Compare(got[st].data() + s * V, want[st].data() + s * V, V);
          std::printf("  %s: first vs after max|d| / scale %.4f, norm rel %.4f\n", what.c_str(),
                      c.worst / c.scale, c.rel);
        }
      }
    }
    std::printf("  %s%s: deltas first vs after bit-identical: %s\n", FormName(form),
                last_rows ? " trimmed" : " full", same ? "yes" : "no");
  }
}

TEST(CudaLoraBatch, QkvDeltasFirstMatchDeltasAfterWithTheGemmForm) {
  PHI_REQUIRE_GPU();
  RunQkvDeltasFirst(Form::kGemm);
}

TEST(CudaLoraBatch, QkvDeltasFirstMatchDeltasAfterWithTheSegmentedGemmForm) {
  PHI_REQUIRE_GPU();
  RunQkvDeltasFirst(Form::kSegmented);
}

// fc1's delta + GELU as one LoraExpandActCuda pass (set_lora_prefill_tuning field 5 = 1;
// model/cuda_lora_fc1.cc) against the cuBLASLt expands with the GELU epilogue (field 5 = 0, the
// default), on the mixed batch (base rows between segments get the GELU alone): both add the same
// float32 terms to the pre-activation and round once, in another order (mma k-steps against
// cuBLASLt's), so within the bf16 bounds (ExpectClose) in the prefill logits and the decode steps
// after, full path and trimmed last layer; bit identity printed. The kernel must run in the
// segmented form's prefill layers (every layer, or all but the trimmed last) and never in the
// concatenated form (no compact T) or with field 5 = 0.
void RunFc1Kernel(Form form) {
  const GemmFormEnv env(form);
  const fs::path dir = TinyPhiDir();
  std::unique_ptr<CudaPhiModel> kern = LoadCuda(dir), gemms = LoadCuda(dir);
  ASSERT_TRUE(kern && gemms);
  EXPECT_EQ(gemms->lora_prefill_tuning(), "1:8:1:0:0");  // the default: the GEMMs
  ASSERT_TRUE(kern->set_lora_prefill_tuning("1:8:1:0:1").ok());
  EXPECT_EQ(kern->lora_prefill_tuning(), "1:8:1:0:1");
  std::unique_ptr<AdapterRegistry> reg = GoldenAdapters(kern->config());
  ASSERT_TRUE(reg);
  for (CudaPhiModel* m : {kern.get(), gemms.get()})
    ASSERT_TRUE(m->SetAdapterRegistry(reg.get()).ok());
  const int V = kern->config().vocab_size, L = kern->config().num_hidden_layers;
  const std::vector<Req> reqs = MixedRequests();
  const int steps = 3;
  for (bool last_rows : {false, true}) {
    for (CudaPhiModel* m : {kern.get(), gemms.get()}) m->set_prefill_last_rows(last_rows);
    const int64_t before = kern->lora_fc1_kernel_layers();
    const auto got = RunBatch(*kern, reqs, 0, steps, true);
    const auto want = RunBatch(*gemms, reqs, 0, steps, true);
    const int64_t ran = kern->lora_fc1_kernel_layers() - before;
    if (form == Form::kSegmented) {
      EXPECT_GE(ran, L - 1) << (last_rows ? "trimmed" : "full");
      EXPECT_LE(ran, L) << (last_rows ? "trimmed" : "full");
    } else {
      EXPECT_EQ(ran, 0) << FormName(form);
    }
    EXPECT_EQ(gemms->lora_fc1_kernel_layers(), 0);
    ASSERT_EQ(got.size(), static_cast<size_t>(steps + 1));
    ASSERT_EQ(want.size(), got.size());
    bool same = true;
    for (int st = 0; st <= steps; ++st) {
      same = same && got[st] == want[st];
      for (size_t s = 0; s < reqs.size(); ++s) {
        const std::string what = std::string(FormName(form)) + (last_rows ? " trimmed" : " full") +
                                 " fc1 kernel step " + std::to_string(st) + " request " +
                                 std::to_string(s);
        ExpectClose(got[st].data() + s * V, want[st].data() + s * V, V, what);
        if (st == 0) {
          const Closeness c = Compare(got[st].data() + s * V, want[st].data() + s * V, V);
          std::printf("  %s: kernel vs GEMMs max|d| / scale %.4f, norm rel %.4f\n", what.c_str(),
                      c.worst / c.scale, c.rel);
        }
      }
    }
    std::printf("  %s%s: fc1 kernel in %lld layers, vs GEMMs bit-identical: %s\n", FormName(form),
                last_rows ? " trimmed" : " full", static_cast<long long>(ran), same ? "yes" : "no");
  }
}

TEST(CudaLoraBatch, Fc1DeltaGeluKernelMatchesTheGemmsInTheSegmentedGemmForm) {
  PHI_REQUIRE_GPU();
  RunFc1Kernel(Form::kSegmented);
}

TEST(CudaLoraBatch, Fc1DeltaGeluKernelStaysOffInTheConcatenatedGemmForm) {
  PHI_REQUIRE_GPU();
  RunFc1Kernel(Form::kGemm);
}

}  // namespace
}  // namespace phishard::lora_test
