// Multi-LoRA through the CPU model: peft golden fixtures (tests/golden/tiny-phi-code-adapters.json,
// written by tools/gen_golden.py with peft 0.21 unmerged LoRA in float32), one batch mixing base
// and adapters, LoRA on every target (lm_head included) and merged adapters against a model whose
// weights have the update merged in, and load/use/offload cycles leaving memory where it was.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/log_softmax.h"
#include "model/adapter_registry.h"
#include "model/cpu_phi_model.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "nlohmann/json.hpp"
#include "tests/model/lora_test_util.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using lora_test::TempDir;
using lora_test::TensorMap;

const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();
const fs::path kTinyModel = fs::path(PHISHARD_MODELS) / "tiny-phi-code";

// Tolerances. peft and we compute the same float32 math from the same weights (LoRA pairs are
// float32 in the files), in different orders; the base model alone already matches HF to ~2e-5
// (golden_test.cc), and the low-rank deltas add sums over r <= 16 and in <= 1024 terms. 1e-4 x
// max(1, max|logit|) keeps ~5x margin; a wrong scale (alpha/r for rsLoRA: 4x smaller), a missing
// module or a delta after the GELU instead of before moves logits by >= 1e-2.
constexpr double kLogitRelTol = 1e-4;
constexpr double kLogprobTol = 1e-4;

json ReadGolden() {
  std::ifstream in(kRepo / "tests" / "golden" / "tiny-phi-code-adapters.json");
  EXPECT_TRUE(in.good()) << "missing tests/golden/tiny-phi-code-adapters.json";
  return json::parse(in);
}

std::unique_ptr<CpuPhiModel> LoadModel(const fs::path& dir, int kv_blocks) {
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> m = CpuPhiModel::Load(dir);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return nullptr;
  EXPECT_TRUE((*m)->AllocateKvCache(kv_blocks, kKvBlockSize).ok());
  return *std::move(m);
}

LoraAdapter LoadAdapter(const fs::path& dir, const PhiConfig& c) {
  absl::StatusOr<LoraAdapter> a = LoraAdapter::LoadDir(dir, c);
  EXPECT_TRUE(a.ok()) << a.status();
  return a.ok() ? *std::move(a) : LoraAdapter("failed", 0);
}

std::unique_ptr<AdapterRegistry> MakeRegistry() {
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> r = AdapterRegistry::Create(8, 256 << 20, 4);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *std::move(r) : nullptr;
}

// One sequence of a prefill batch: its whole prompt under adapter index `adapter`.
struct SeqSpec {
  std::vector<int32_t> prompt;
  uint32_t adapter;
};

// A prefill batch of several sequences, each on its own blocks, returning every row's logits.
ForwardBatch PrefillBatch(const std::vector<SeqSpec>& seqs, int block_size) {
  ForwardBatch b;
  int next_block = 0;
  for (const SeqSpec& s : seqs) {
    const int n = static_cast<int>(s.prompt.size());
    std::vector<int32_t> blocks(KvBlockAllocator::BlocksFor(n + 1, block_size));
    std::iota(blocks.begin(), blocks.end(), next_block);
    next_block += static_cast<int>(blocks.size());
    for (int i = 0; i < n; ++i) {
      b.logit_rows.push_back(b.num_tokens());
      b.token_ids.push_back(s.prompt[i]);
      b.positions.push_back(i);
    }
    b.seqs.push_back(
        {.num_new_tokens = n, .context_len = n, .block_table = blocks, .adapter_index = s.adapter});
  }
  return b;
}

std::vector<float> Forward(CpuPhiModel& m, const ForwardBatch& b) {
  std::vector<float> logits;
  const absl::Status st = m.Forward(b, &logits);
  EXPECT_TRUE(st.ok()) << st;
  return logits;
}

double MaxAbs(const std::vector<float>& v) {
  double r = 0.0;
  for (float x : v) r = std::max(r, static_cast<double>(std::fabs(x)));
  return r;
}

// Returns the worst |got - want|, checking it against kLogitRelTol x the logit scale of `want`.
template <typename T>
double ExpectLogitsNear(const std::vector<float>& got, const std::vector<T>& want,
                        const std::string& what) {
  EXPECT_EQ(got.size(), want.size()) << what;
  if (got.size() != want.size()) return INFINITY;
  double scale = 1.0, worst = 0.0;
  size_t at = 0;
  for (T w : want) scale = std::max(scale, std::fabs(static_cast<double>(w)));
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(d <= worst)) worst = d, at = i;  // NaN becomes the worst
  }
  EXPECT_LE(worst, kLogitRelTol * scale)
      << what << ": worst |diff| " << worst << " at " << at << " (logit scale " << scale << ")";
  return worst;
}

struct Greedy {
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
};

// Prefill (last row) then single-token decode steps, all under `adapter`.
Greedy RunGreedy(CpuPhiModel& m, const std::vector<int32_t>& prompt, uint32_t adapter, int steps) {
  const int V = m.config().vocab_size;
  const int total = static_cast<int>(prompt.size()) + steps;
  std::vector<int32_t> blocks(KvBlockAllocator::BlocksFor(total, m.kv_block_size()));
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = m.kv_num_blocks() - 1 - i;
  ForwardBatch b;
  b.token_ids = prompt;
  b.positions.resize(prompt.size());
  std::iota(b.positions.begin(), b.positions.end(), 0);
  int ctx = static_cast<int>(prompt.size());
  b.seqs.push_back(
      {.num_new_tokens = ctx, .context_len = ctx, .block_table = blocks, .adapter_index = adapter});
  b.logit_rows = {ctx - 1};
  Greedy g;
  for (int step = 0; step < steps; ++step) {
    std::vector<float> logits = Forward(m, b);
    if (logits.size() != static_cast<size_t>(V)) return g;
    const int best =
        static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    std::vector<float> lp(V);
    EXPECT_EQ(LogSoftmaxCpu({.x = logits.data(), .y = lp.data(), .rows = 1, .cols = V}),
              KernelStatus::kOk);
    g.ids.push_back(best);
    g.logprobs.push_back(lp[best]);
    b.token_ids = {best};
    b.positions = {ctx++};
    b.seqs[0].num_new_tokens = 1;
    b.seqs[0].context_len = ctx;
    b.logit_rows = {0};
  }
  return g;
}

// ---- peft golden fixtures --------------------------------------------------------------------

TEST(AdapterGolden, EachAdapterMatchesPeftFloat32) {
  const json golden = ReadGolden();
  ASSERT_EQ(golden.at("compute_dtype"), "float32");
  ASSERT_FALSE(golden.at("merged").get<bool>());
  std::unique_ptr<CpuPhiModel> model =
      LoadModel(kRepo / golden.at("base_model").get<std::string>(), 64);
  ASSERT_NE(model, nullptr);
  std::unique_ptr<AdapterRegistry> registry = MakeRegistry();
  ASSERT_TRUE(model->SetAdapterRegistry(registry.get()).ok());
  const PhiConfig& c = model->config();
  const int V = c.vocab_size;

  std::map<std::string, uint32_t> index_of;
  uint32_t next = 1;
  for (const json& a : golden.at("adapters")) {
    LoraAdapter adapter = LoadAdapter(kRepo / a.at("path").get<std::string>(), c);
    // The fixture's own record of the adapter agrees with what we loaded.
    EXPECT_EQ(adapter.max_rank(), a.at("r").get<int>());
    for (LoraTarget t : kAllLoraTargets) {
      if (!adapter.has_target(t)) continue;
      EXPECT_FLOAT_EQ(adapter.module(0, t).scale, a.at("scaling").get<float>());
    }
    index_of[a.at("name")] = next;
    ASSERT_TRUE(registry->Load(next++, std::move(adapter)).ok());
  }

  double worst = 0.0;
  int cases = 0;
  for (const json& cs : golden.at("cases")) {
    const std::string name = cs.at("adapter");
    ASSERT_TRUE(index_of.contains(name)) << name;
    const uint32_t idx = index_of[name];
    const std::vector<int32_t> prompt = cs.at("prompt_ids").get<std::vector<int32_t>>();
    const std::string what = name + " on " + json(cs.at("prompt")).dump();
    const std::vector<float> logits = Forward(*model, PrefillBatch({{prompt, idx}}, kKvBlockSize));
    ASSERT_EQ(logits.size(), prompt.size() * V) << what;
    const std::vector<float> last(logits.end() - V, logits.end());
    const std::vector<double> want = cs.at("last_logits").get<std::vector<double>>();
    worst = std::max(worst, ExpectLogitsNear(last, want, what + " last_logits"));

    // The adapter must matter for the check above to mean anything.
    const std::vector<float> base = Forward(*model, PrefillBatch({{prompt, 0}}, kKvBlockSize));
    double base_diff = 0.0;
    for (int v = 0; v < V; ++v) {
      base_diff =
          std::max(base_diff, std::fabs(static_cast<double>(base[base.size() - V + v]) - want[v]));
    }
    EXPECT_GT(base_diff, 100 * kLogitRelTol * std::max(1.0, MaxAbs(last))) << what;

    const Greedy g = RunGreedy(*model, prompt, idx, static_cast<int>(cs.at("greedy_ids").size()));
    EXPECT_EQ(g.ids, cs.at("greedy_ids").get<std::vector<int32_t>>())
        << what << " (fixture min_top2_gap " << cs.value("min_top2_gap", -1.0) << ")";
    const std::vector<double> want_lp = cs.at("greedy_logprobs").get<std::vector<double>>();
    ASSERT_EQ(g.logprobs.size(), want_lp.size()) << what;
    for (size_t i = 0; i < want_lp.size(); ++i) {
      EXPECT_NEAR(g.logprobs[i], want_lp[i], kLogprobTol) << what << " greedy step " << i;
    }
    ++cases;
  }
  EXPECT_EQ(cases, 12);
  std::cout << "max |last_logit - peft| over " << cases << " adapter cases = " << worst << "\n";
}

// One batch: base, all three adapters (two consecutive sequences on one adapter, so one segment
// spans two sequences), and an index nobody loaded (base model, not an error). Every request's
// logits equal those of the same request run alone. Alone and batched runs differ only in BLAS
// blocking (M differs), hence the same tolerance as above.
TEST(AdapterGolden, MixedBatchEqualsEachRequestAlone) {
  const json golden = ReadGolden();
  std::unique_ptr<CpuPhiModel> model = LoadModel(kTinyModel, 128);
  ASSERT_NE(model, nullptr);
  std::unique_ptr<AdapterRegistry> registry = MakeRegistry();
  ASSERT_TRUE(model->SetAdapterRegistry(registry.get()).ok());
  const int V = model->config().vocab_size;
  uint32_t idx = 3;
  for (const json& a : golden.at("adapters")) {
    ASSERT_TRUE(
        registry->Load(idx++, LoadAdapter(kRepo / a.at("path").get<std::string>(), model->config()))
            .ok());
  }
  const std::vector<int32_t> p1 = {1932, 221}, p2 = {329, 284, 473, 263, 1028, 7, 9}, p3 = {831};
  std::vector<int32_t> p4(37);
  std::iota(p4.begin(), p4.end(), 100);
  const std::vector<SeqSpec> seqs = {{p2, 3}, {p1, 0},  {p4, 4}, {p3, 4},
                                     {p1, 5}, {p2, 99}, {p3, 0}, {p4, 3}};
  const ForwardBatch batch = PrefillBatch(seqs, kKvBlockSize);
  const std::vector<float> together = Forward(*model, batch);
  ASSERT_EQ(together.size(), static_cast<size_t>(batch.num_tokens()) * V);

  size_t row = 0;
  double worst = 0.0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const std::vector<float> alone = Forward(*model, PrefillBatch({seqs[i]}, kKvBlockSize));
    const size_t n = seqs[i].prompt.size() * V;
    const std::vector<float> part(together.begin() + row, together.begin() + row + n);
    worst = std::max(worst, ExpectLogitsNear(part, alone,
                                             "request " + std::to_string(i) + " adapter " +
                                                 std::to_string(seqs[i].adapter)));
    row += n;
  }
  // Index 99 is not loaded: base model, same as index 0.
  const std::vector<float> base = Forward(*model, PrefillBatch({{p2, 0}}, kKvBlockSize));
  const std::vector<float> unknown = Forward(*model, PrefillBatch({{p2, 99}}, kKvBlockSize));
  EXPECT_EQ(base, unknown);
  // The adapters differ from each other and from the base on the same prompt.
  const std::vector<float> with3 = Forward(*model, PrefillBatch({{p2, 3}}, kKvBlockSize));
  const std::vector<float> with4 = Forward(*model, PrefillBatch({{p2, 4}}, kKvBlockSize));
  EXPECT_NE(with3, base);
  EXPECT_NE(with3, with4);
  std::cout << "mixed batch vs alone: worst |diff| = " << worst << "\n";

  // Mixed decode step: one token per request, adapters interleaved, logits of every row. The
  // single-request runs above reused blocks from 0 on, so the batch's prefill runs again first.
  Forward(*model, batch);
  ForwardBatch decode;
  std::vector<std::vector<float>> alone_rows;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int n = static_cast<int>(seqs[i].prompt.size());
    SequenceInput s = batch.seqs[i];
    s.num_new_tokens = 1;
    s.context_len = n + 1;
    decode.seqs.push_back(s);
    decode.token_ids.push_back(42 + static_cast<int>(i));
    decode.positions.push_back(n);
    decode.logit_rows.push_back(static_cast<int>(i));
  }
  const std::vector<float> dec = Forward(*model, decode);
  for (size_t i = 0; i < seqs.size(); ++i) {
    ForwardBatch one;
    one.seqs = {decode.seqs[i]};
    one.token_ids = {decode.token_ids[i]};
    one.positions = {decode.positions[i]};
    one.logit_rows = {0};
    // Same blocks: rewriting K/V of position n with the same token gives the same cache.
    const std::vector<float> alone = Forward(*model, one);
    ExpectLogitsNear(std::vector<float>(dec.begin() + i * V, dec.begin() + (i + 1) * V), alone,
                     "decode request " + std::to_string(i));
  }
}

// ---- every target, lm_head included, against merged weights -------------------------------------

// Builds a model directory whose weights are tiny-phi-code's with Σ_i w_i · s_i B_i A_i added to
// every adapted module (in double, stored as float32), the reference for unmerged LoRA.
void WriteMergedModel(const fs::path& out, const PhiConfig& c,
                      const std::vector<std::pair<const LoraAdapter*, double>>& parts) {
  TensorMap w = lora_test::ReadTensors(kTinyModel);
  ASSERT_FALSE(w.empty());
  for (LoraTarget t : kAllLoraTargets) {
    const auto [in, out_dim] = LoraTargetDims(c, t);
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : c.num_hidden_layers); ++l) {
      std::vector<double> delta(static_cast<size_t>(in * out_dim), 0.0);
      bool any = false;
      for (const auto& [a, weight] : parts) {
        const LoraModule& m = a->module(l, t);
        if (!m.present()) continue;
        any = true;
        for (int64_t j = 0; j < out_dim; ++j) {
          for (int k = 0; k < m.rank; ++k) {
            const double f = weight * m.scale * m.b[j * m.rank + k];
            for (int64_t i = 0; i < in; ++i) delta[j * in + i] += f * m.a[k * in + i];
          }
        }
      }
      if (!any) continue;
      lora_test::Tensor& base = w.at(LoraModuleName(t, l) + ".weight");
      ASSERT_EQ(base.data.size(), delta.size());
      for (size_t i = 0; i < delta.size(); ++i) {
        base.data[i] = static_cast<float>(base.data[i] + delta[i]);
      }
    }
  }
  fs::create_directories(out);
  fs::copy_file(kTinyModel / "config.json", out / "config.json");
  lora_test::WriteSafetensors(out / "model.safetensors", w);
}

// A random adapter on all seven targets: rank_pattern gives fc1/lm_head their own ranks,
// alpha_pattern one module its own alpha, use_rslora on. Magnitudes make each delta O(10%) of the
// base projection so a wrong or missing module shows far above the tolerance.
void WriteAllTargetsAdapter(const fs::path& dir, const PhiConfig& c) {
  const json config = {
      {"peft_type", "LORA"},
      {"r", 8},
      {"lora_alpha", 16},
      {"use_rslora", true},
      {"target_modules", {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"}},
      {"rank_pattern", {{"fc1", 12}, {"lm_head", 4}}},
      {"alpha_pattern", {{"layers.2.self_attn.dense", 40}}},
      {"bias", "none"}};
  TensorMap t;
  uint32_t seed = 1;
  for (LoraTarget target : kAllLoraTargets) {
    const auto [in, out] = LoraTargetDims(c, target);
    const int r = target == LoraTarget::kFc1 ? 12 : target == LoraTarget::kLmHead ? 4 : 8;
    for (int l = 0; l < (target == LoraTarget::kLmHead ? 1 : c.num_hidden_layers); ++l) {
      const std::string name = "base_model.model." + LoraModuleName(target, l);
      t[name + ".lora_A.weight"] = {{r, in}, lora_test::RandomValues(r * in, seed++, 0.06f)};
      t[name + ".lora_B.weight"] = {{out, r}, lora_test::RandomValues(out * r, seed++, 0.04f)};
    }
  }
  lora_test::WriteAdapter(dir, config, t);
}

TEST(AdapterMath, AllTargetsAndMergesEqualMergedWeights) {
  std::unique_ptr<CpuPhiModel> model = LoadModel(kTinyModel, 64);
  ASSERT_NE(model, nullptr);
  const PhiConfig& c = model->config();
  TempDir tmp("lora-merged");
  WriteAllTargetsAdapter(tmp.path() / "all", c);
  const LoraAdapter all = LoadAdapter(tmp.path() / "all", c);
  ASSERT_TRUE(all.has_target(LoraTarget::kLmHead));
  ASSERT_EQ(all.module(0, LoraTarget::kFc1).rank, 12);
  const LoraAdapter r4 = LoadAdapter(kRepo / "tests/golden/adapters/lora-r4-qv-fc2", c);
  const LoraAdapter prose = LoadAdapter(kTinyModel / "adapters" / "prose", c);

  const std::vector<WeightedAdapter> parts = {{&all, 0.5f}, {&r4, 0.7f}, {&prose, -0.4f}};
  absl::StatusOr<LoraAdapter> merged = MergeAdapters(c, parts, MergeStrategy::kLinear, "merged");
  ASSERT_TRUE(merged.ok()) << merged.status();

  std::unique_ptr<AdapterRegistry> registry = MakeRegistry();
  ASSERT_TRUE(model->SetAdapterRegistry(registry.get()).ok());
  ASSERT_TRUE(registry->Load(1, LoadAdapter(tmp.path() / "all", c)).ok());
  ASSERT_TRUE(registry->Load(2, *std::move(merged)).ok());

  WriteMergedModel(tmp.path() / "ref-all", c, {{&all, 1.0}});
  WriteMergedModel(tmp.path() / "ref-merged", c, {{&all, 0.5}, {&r4, 0.7}, {&prose, -0.4}});
  std::unique_ptr<CpuPhiModel> ref_all = LoadModel(tmp.path() / "ref-all", 64);
  std::unique_ptr<CpuPhiModel> ref_merged = LoadModel(tmp.path() / "ref-merged", 64);
  ASSERT_NE(ref_all, nullptr);
  ASSERT_NE(ref_merged, nullptr);

  std::vector<int32_t> prompt(23);
  std::iota(prompt.begin(), prompt.end(), 300);
  const std::vector<float> base = Forward(*model, PrefillBatch({{prompt, 0}}, kKvBlockSize));
  for (const auto& [idx, ref, what] :
       {std::tuple{1u, ref_all.get(), "all targets"}, std::tuple{2u, ref_merged.get(), "merge"}}) {
    // Both in one batch, next to a base request, to exercise the logit-row segments of lm_head.
    const std::vector<float> lora =
        Forward(*model, PrefillBatch({{prompt, 0}, {prompt, idx}}, kKvBlockSize));
    const std::vector<float> ours(lora.begin() + lora.size() / 2, lora.end());
    const std::vector<float> want = Forward(*ref, PrefillBatch({{prompt, 0}}, kKvBlockSize));
    const double worst = ExpectLogitsNear(ours, want, what);
    ExpectLogitsNear(std::vector<float>(lora.begin(), lora.begin() + lora.size() / 2), base,
                     std::string(what) + ": base request next to it");
    double moved = 0.0;
    for (size_t i = 0; i < base.size(); ++i) {
      moved = std::max(moved, std::fabs(static_cast<double>(base[i]) - want[i]));
    }
    EXPECT_GT(moved, 100 * kLogitRelTol * std::max(1.0, MaxAbs(want))) << what;
    std::cout << what << ": worst |LoRA - merged weights| = " << worst
              << ", largest change from base = " << moved << "\n";
  }
}

// ---- load -> use -> offload cycles --------------------------------------------------------------

int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

TEST(AdapterLifecycle, HundredLoadUseOffloadCyclesLeaveNoTrace) {
  std::unique_ptr<CpuPhiModel> model = LoadModel(kTinyModel, 32);
  ASSERT_NE(model, nullptr);
  std::unique_ptr<AdapterRegistry> registry = MakeRegistry();
  ASSERT_TRUE(model->SetAdapterRegistry(registry.get()).ok());
  const std::vector<fs::path> dirs = {kTinyModel / "adapters" / "prose",
                                      kRepo / "tests/golden/adapters/lora-r4-qv-fc2",
                                      kRepo / "tests/golden/adapters/lora-r16-rslora-all"};
  std::vector<int32_t> prompt(20);
  std::iota(prompt.begin(), prompt.end(), 7);
  std::vector<std::vector<float>> first(dirs.size());
  const auto cycle = [&](int i) {
    const size_t which = i % dirs.size();
    const uint32_t idx = 1000 + i;  // the router never reuses an index
    ASSERT_TRUE(registry->Load(idx, LoadAdapter(dirs[which], model->config())).ok());
    const std::vector<float> logits =
        Forward(*model, PrefillBatch({{prompt, 0}, {prompt, idx}}, kKvBlockSize));
    if (first[which].empty()) first[which] = logits;
    ASSERT_EQ(logits, first[which]) << "cycle " << i << " computed something else";
    ASSERT_TRUE(registry->Offload(idx));
    ASSERT_EQ(registry->used_bytes(), 0);
    ASSERT_EQ(registry->num_loaded(), 0);
  };
  for (int i = 0; i < 6; ++i) cycle(i);  // warm-up: step scratch, allocator arenas
  const int64_t baseline = ResidentBytes();
  for (int i = 6; i < 106; ++i) {
    cycle(i);
    if (::testing::Test::HasFatalFailure()) return;
  }
  const int64_t after = ResidentBytes();
  // Slack: glibc may keep a few freed chunks in its arenas; one leaked adapter per cycle would be
  // 0.15 to 1.2 MB x 100 cycles, far above it.
  constexpr int64_t kSlack = 4 << 20;
  std::printf(
      "RSS before 100 cycles %.2f MiB, after %.2f MiB (delta %+.3f MiB, slack %.0f MiB); "
      "registry bytes %lld\n",
      baseline / 1048576.0, after / 1048576.0, (after - baseline) / 1048576.0, kSlack / 1048576.0,
      static_cast<long long>(registry->used_bytes()));
  EXPECT_LE(after - baseline, kSlack);
  EXPECT_EQ(registry->used_bytes(), 0);
}

}  // namespace
}  // namespace phishard
