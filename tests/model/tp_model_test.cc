// Tensor parallelism of the CPU model (spec §6.8-6.9, §7.7): W ranks as threads of this process,
// each with a Gloo group on 127.0.0.1 and its own CpuPhiModel holding only its slices, run the
// same steps as an unsharded model. Checked on the golden fixtures (MHA head_dim 64; GQA head_dim
// 80 with nKV = 2, whose W = 4 replicates every KV head on two ranks) and the demo model
// (V = 4095: not divisible by W, so its lm_head is replicated while the embedding is split
// unevenly), with a batch of several prompts (prefill with every row's logits, then batched
// greedy decode), and with mixed LoRA adapters in one batch.
//
// What must hold: every rank returns bit-identical logits (all ranks sample the same tokens),
// the greedy tokens equal world size 1's, and the logits equal world size 1's within 1e-4 of the
// logit scale. Why 1e-4: sharding changes only the order of float32 sums (dense/fc2 reduce over
// W partial sums, the embedding sum adds exact zeros, the lm_head gather is a copy), which moves
// logits by ~1e-6 of their scale on these models; the golden tests hold the same bound against
// Hugging Face. A bias added on every rank instead of rank 0, a wrong head or KV-head slice, or a
// row-parallel LoRA delta applied W times moves logits by >= 1e-2.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "model/adapter_registry.h"
#include "model/cpu_phi_model.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "model/lora_shard.h"
#include "model/rank_settings.h"
#include "nlohmann/json.hpp"
#include "parallel/parallel_group.h"
#include "tests/model/lora_test_util.h"
#include "tests/parallel/parallel_test_util.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();
const fs::path kGolden = kRepo / "tests" / "golden";
const fs::path kTiny = fs::path(PHISHARD_MODELS) / "tiny-phi-code";

constexpr double kLogitRelTol = 1e-4;
constexpr int kKvBlocks = 64;

// Everything one rank saw: the logits of every step ([rows, V] each) and the greedy tokens.
struct Trace {
  std::vector<std::vector<float>> logits;
  std::vector<std::vector<int32_t>> tokens;  // per decode step, one per sequence
  int max_kv_blocks = -1;
  bool ok = false;
};

// Sets up one rank's model (and adapters) before the workload runs.
using RankSetup = std::function<void(CpuPhiModel&, int rank, AdapterRegistry*)>;

std::vector<std::vector<int32_t>> GoldenPrompts(const fs::path& golden_json, size_t max_cases) {
  std::ifstream in(golden_json);
  EXPECT_TRUE(in.good()) << golden_json;
  std::vector<std::vector<int32_t>> prompts;
  if (!in.good()) return prompts;
  const json j = json::parse(in);
  for (const json& c : j.at("cases")) {
    if (prompts.size() == max_cases) break;
    prompts.push_back(c.at("prompt_ids").get<std::vector<int32_t>>());
  }
  return prompts;
}

int ArgMax(const float* row, int n) {
  return static_cast<int>(std::max_element(row, row + n) - row);
}

// One prefill of all prompts together (every row's logits), then `steps` batched greedy decode
// steps over all sequences; sequence i runs under adapter index adapters[i] (0 = base).
Trace RunWorkload(CpuPhiModel& m, const std::vector<std::vector<int32_t>>& prompts, int steps,
                  const std::vector<uint32_t>& adapters) {
  Trace tr;
  const int V = m.config().vocab_size;
  const int S = static_cast<int>(prompts.size());
  ForwardBatch b;
  int next_block = 0;
  std::vector<std::vector<int32_t>> tables(S);
  std::vector<int> ctx(S);
  for (int i = 0; i < S; ++i) {
    const int n = static_cast<int>(prompts[i].size());
    tables[i].resize(KvBlockAllocator::BlocksFor(n + steps));
    std::iota(tables[i].begin(), tables[i].end(), next_block);
    next_block += static_cast<int>(tables[i].size());
    for (int p = 0; p < n; ++p) {
      b.logit_rows.push_back(b.num_tokens());
      b.token_ids.push_back(prompts[i][p]);
      b.positions.push_back(p);
    }
    ctx[i] = n;
    b.seqs.push_back({.num_new_tokens = n,
                      .context_len = n,
                      .block_table = tables[i],
                      .adapter_index = adapters.empty() ? 0u : adapters[i]});
  }
  EXPECT_LE(next_block, kKvBlocks);
  std::vector<float> logits;
  absl::Status st = m.Forward(b, &logits);
  EXPECT_TRUE(st.ok()) << "rank " << m.tp_rank() << " prefill: " << st;
  if (!st.ok()) return tr;
  tr.logits.push_back(logits);
  // The last row of each prompt picks its first token.
  std::vector<int32_t> next(S);
  for (int i = 0, row = 0; i < S; ++i) {
    row += static_cast<int>(prompts[i].size());
    next[i] = ArgMax(logits.data() + static_cast<size_t>(row - 1) * V, V);
  }
  tr.tokens.push_back(next);
  for (int step = 0; step < steps; ++step) {
    ForwardBatch d;
    for (int i = 0; i < S; ++i) {
      d.token_ids.push_back(next[i]);
      d.positions.push_back(ctx[i]);
      ++ctx[i];
      d.seqs.push_back({.num_new_tokens = 1,
                        .context_len = ctx[i],
                        .block_table = tables[i],
                        .adapter_index = adapters.empty() ? 0u : adapters[i]});
      d.logit_rows.push_back(i);
    }
    st = m.Forward(d, &logits);
    EXPECT_TRUE(st.ok()) << "rank " << m.tp_rank() << " decode step " << step << ": " << st;
    if (!st.ok()) return tr;
    tr.logits.push_back(logits);
    for (int i = 0; i < S; ++i) next[i] = ArgMax(logits.data() + static_cast<size_t>(i) * V, V);
    tr.tokens.push_back(next);
  }
  absl::StatusOr<int> blocks = m.MaxKvBlocks(0.5, 256);
  EXPECT_TRUE(blocks.ok()) << blocks.status();
  tr.max_kv_blocks = blocks.ok() ? *blocks : -1;
  tr.ok = true;
  return tr;
}

using Body = std::function<Trace(CpuPhiModel&)>;

// Runs `body` on `world` ranks (threads), each with a model of `dir` sharded over one Gloo group;
// world 1 runs unsharded (no communicator). `setup` (may be null) runs on every rank first.
std::vector<Trace> OnRanks(const fs::path& dir, int world, const RankSetup& setup,
                           const Body& body) {
  const int port = testing::FreeLoopbackPort();
  return testing::RunRanks<Trace>(world, [&](int rank) -> Trace {
    ParallelGroup group;
    if (world > 1) {
      CommOptions o;
      o.backend = CommBackend::kGloo;
      o.rank = rank;
      o.world_size = world;
      o.master_addr = "127.0.0.1";
      o.master_port = port;
      o.timeout = absl::Seconds(30);
      o.collective_timeout = absl::Seconds(60);
      absl::StatusOr<ParallelGroup> g = CreateParallelGroup(o);
      EXPECT_TRUE(g.ok()) << "rank " << rank << ": " << g.status();
      if (!g.ok()) return Trace{};
      group = *std::move(g);
    }
    absl::StatusOr<std::unique_ptr<CpuPhiModel>> m =
        CpuPhiModel::Load(dir, CpuParallel{.comm = group.comm.get(), .ranks_on_host = world});
    EXPECT_TRUE(m.ok()) << "rank " << rank << ": " << m.status();
    if (!m.ok()) return Trace{};
    EXPECT_EQ((*m)->tp_rank(), rank);
    EXPECT_EQ((*m)->tp_world_size(), world);
    EXPECT_TRUE((*m)->AllocateKvCache(kKvBlocks, kKvBlockSize).ok());
    absl::StatusOr<std::unique_ptr<AdapterRegistry>> registry =
        AdapterRegistry::Create(8, int64_t{256} << 20, 4);
    EXPECT_TRUE(registry.ok());
    if (setup) {
      setup(**m, rank, registry->get());
      EXPECT_TRUE((*m)->SetAdapterRegistry(registry->get()).ok());
    }
    Trace t = body(**m);
    // Tear down in order: the model stops using the communicator before the group goes.
    m->reset();
    return t;
  });
}

double MaxAbs(const std::vector<float>& v) {
  double r = 1.0;
  for (float x : v) r = std::max(r, static_cast<double>(std::fabs(x)));
  return r;
}

// Ranks agree bit for bit, and rank 0 agrees with the unsharded run (tokens exactly, logits
// within kLogitRelTol of the scale, compared up to the first token that differs).
void ExpectMatches(const std::vector<Trace>& ranks, const Trace& reference,
                   const std::string& what) {
  ASSERT_TRUE(reference.ok) << what << ": the world-1 reference failed";
  for (size_t r = 0; r < ranks.size(); ++r) ASSERT_TRUE(ranks[r].ok) << what << " rank " << r;
  for (size_t r = 1; r < ranks.size(); ++r) {
    ASSERT_EQ(ranks[r].logits.size(), ranks[0].logits.size()) << what;
    for (size_t s = 0; s < ranks[0].logits.size(); ++s) {
      ASSERT_EQ(ranks[r].logits[s].size(), ranks[0].logits[s].size());
      EXPECT_EQ(std::memcmp(ranks[r].logits[s].data(), ranks[0].logits[s].data(),
                            ranks[0].logits[s].size() * sizeof(float)),
                0)
          << what << ": rank " << r << " logits of step " << s << " differ from rank 0's bits";
    }
    EXPECT_EQ(ranks[r].tokens, ranks[0].tokens) << what << " rank " << r;
    EXPECT_EQ(ranks[r].max_kv_blocks, ranks[0].max_kv_blocks)
        << what << ": ranks must agree on the KV pool";
  }
  const Trace& tp = ranks[0];
  ASSERT_EQ(tp.logits.size(), reference.logits.size()) << what;
  double worst = 0.0;
  for (size_t s = 0; s < reference.logits.size(); ++s) {
    const std::vector<float>& want = reference.logits[s];
    ASSERT_EQ(tp.logits[s].size(), want.size()) << what << " step " << s;
    const double scale = MaxAbs(want);
    double step_worst = 0.0;
    for (size_t i = 0; i < want.size(); ++i) {
      const double d = std::fabs(static_cast<double>(tp.logits[s][i]) - want[i]);
      if (!(d <= step_worst)) step_worst = d;  // NaN-safe
    }
    EXPECT_LE(step_worst, kLogitRelTol * scale)
        << what << " step " << s << " (scale " << scale << ")";
    worst = std::max(worst, step_worst / scale);
    EXPECT_EQ(tp.tokens[s], reference.tokens[s]) << what << " greedy tokens of step " << s;
    if (tp.tokens[s] != reference.tokens[s]) break;  // later steps feed different tokens
  }
  std::cout << what << ": worst |TP - W1| / scale = " << worst << "\n";
  ::testing::Test::RecordProperty(what + "_worst_rel_err", std::to_string(worst));
}

struct Case {
  std::string name;
  fs::path model_dir;
  fs::path golden;
  int world;
};

class TpGolden : public ::testing::TestWithParam<Case> {};

TEST_P(TpGolden, SameTokensAndLogitsAsWorldSizeOne) {
  const Case& c = GetParam();
  const std::vector<std::vector<int32_t>> prompts = GoldenPrompts(c.golden, 5);
  ASSERT_FALSE(prompts.empty());
  const Body body = [&](CpuPhiModel& m) { return RunWorkload(m, prompts, 6, {}); };
  const std::vector<Trace> reference = OnRanks(c.model_dir, 1, nullptr, body);
  const std::vector<Trace> ranks = OnRanks(c.model_dir, c.world, nullptr, body);
  ExpectMatches(ranks, reference[0], c.name + " W=" + std::to_string(c.world));
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, TpGolden,
    ::testing::Values(
        Case{"mha_hd64", kGolden / "phi-mha-hd64", kGolden / "phi-mha-hd64/golden.json", 2},
        Case{"gqa_hd80", kGolden / "phi-gqa-hd80", kGolden / "phi-gqa-hd80/golden.json", 2},
        Case{"gqa_hd80_kv_replicated", kGolden / "phi-gqa-hd80",
             kGolden / "phi-gqa-hd80/golden.json", 4},
        // q / k LayerNorm (replicated on every rank) and a tied, vocab-split embedding / head
        Case{"qkln_tied", kGolden / "phi-qkln-tied", kGolden / "phi-qkln-tied/golden.json", 2},
        Case{"qkln_tied_kv_replicated", kGolden / "phi-qkln-tied",
             kGolden / "phi-qkln-tied/golden.json", 4},
        Case{"rope_linear", kGolden / "phi-rope-linear", kGolden / "phi-rope-linear/golden.json",
             2},
        Case{"tiny_phi_code", kTiny, kGolden / "tiny-phi-code.json", 2},
        Case{"tiny_phi_code", kTiny, kGolden / "tiny-phi-code.json", 4}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return info.param.name + "_w" + std::to_string(info.param.world);
    });

// The layouts the cases above rely on.
TEST(TpShard, LayoutsOfTheFixtures) {
  absl::StatusOr<PhiConfig> gqa = LoadPhiConfig(kGolden / "phi-gqa-hd80");
  ASSERT_TRUE(gqa.ok());
  for (int r = 0; r < 4; ++r) {
    absl::StatusOr<PhiShard> s = MakePhiShard(*gqa, r, 4);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_TRUE(s->kv_replicated);
    EXPECT_EQ(s->num_heads, 1);
    EXPECT_EQ(s->num_kv_heads, 1);
    EXPECT_EQ(s->kv_head_begin, r / 2) << "query head r uses KV head r / (nH / nKV)";
    EXPECT_TRUE(s->lm_head_parallel);
    EXPECT_EQ(s->lm_head_begin, r * 128);
  }
  absl::StatusOr<PhiConfig> tiny = LoadPhiConfig(kTiny);
  ASSERT_TRUE(tiny.ok());
  ASSERT_EQ(tiny->vocab_size, 4095);
  absl::StatusOr<PhiShard> last = MakePhiShard(*tiny, 1, 2);
  ASSERT_TRUE(last.ok());
  EXPECT_FALSE(last->lm_head_parallel) << "V % W != 0: replicated head";
  EXPECT_EQ(last->lm_head_end - last->lm_head_begin, 4095);
  EXPECT_EQ(last->vocab_begin, 2048);
  EXPECT_EQ(last->vocab_end, 4095) << "the embedding splits ceil(V / W) rows, the last rank fewer";
  // What cannot be split is refused with the field's name.
  absl::StatusOr<PhiConfig> mha = LoadPhiConfig(kGolden / "phi-mha-hd64");  // nH 2
  ASSERT_TRUE(mha.ok());
  absl::Status st = MakePhiShard(*mha, 0, 4).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("num_attention_heads"), std::string::npos) << st;
  PhiConfig odd_kv = *tiny;  // nH 8, nKV 6 over 4 ranks: neither split nor replicated
  odd_kv.num_key_value_heads = 6;
  st = MakePhiShard(odd_kv, 0, 4).status();
  EXPECT_NE(st.message().find("num_key_value_heads"), std::string::npos) << st;
  PhiConfig odd_i = *tiny;
  odd_i.intermediate_size = 1022;
  st = MakePhiShard(odd_i, 0, 4).status();
  EXPECT_NE(st.message().find("intermediate_size"), std::string::npos) << st;
}

// A communicator of world size 3 for checks that fail before any collective.
class FakeCommunicator final : public Communicator {
 public:
  FakeCommunicator(int rank, int world, MemorySpace space)
      : rank_(rank), world_(world), space_(space) {}
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  MemorySpace memory_space() const override { return space_; }
  absl::Status AllReduceSum(float*, size_t) override { return Unexpected(); }
  absl::Status AllGather(const float*, float*, size_t) override { return Unexpected(); }
  absl::Status Broadcast(void*, size_t, int) override { return Unexpected(); }
  absl::Status Barrier() override { return Unexpected(); }
  void Abort(const std::string&) override {}

 private:
  static absl::Status Unexpected() {
    ADD_FAILURE() << "no collective was expected";
    return absl::InternalError("unexpected");
  }
  int rank_, world_;
  MemorySpace space_;
};

// The KV-pool agreement's wire form: counts up to 2^40 - 1 survive the float pairs exactly, the
// smallest count wins, and a rank that fits nothing makes every rank fail naming it.
TEST(TpShard, KvBlockCountsAgreeOnTheFewest) {
  const std::vector<int64_t> fits = {(int64_t{1} << 40) - 1, 123456789, (int64_t{1} << 20) + 3};
  std::vector<float> wire(2 * fits.size());
  for (size_t r = 0; r < fits.size(); ++r) EncodeKvBlockCount(fits[r], wire.data() + 2 * r);
  for (size_t r = 0; r < fits.size(); ++r) {
    const int64_t back =
        (static_cast<int64_t>(wire[2 * r]) << 20) + static_cast<int64_t>(wire[2 * r + 1]);
    EXPECT_EQ(back, fits[r]);
  }
  absl::StatusOr<int> fewest = FewestKvBlocks(wire.data(), 3, 0, fits[0]);
  ASSERT_TRUE(fewest.ok()) << fewest.status();
  EXPECT_EQ(*fewest, (1 << 20) + 3);

  EncodeKvBlockCount(0, wire.data() + 2);  // rank 1 fits no block
  fewest = FewestKvBlocks(wire.data(), 3, 2, fits[2]);
  EXPECT_EQ(fewest.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(fewest.status().message().find("rank 1"), std::string::npos) << fewest.status();
}

// Settings each rank reads from its own command line travel exactly (any int64, a double's bits),
// and a difference names the setting and every rank's value.
TEST(TpShard, RankSettingsWireForm) {
  const std::vector<RankSetting> mine = {RankSetting::Int("--max-kv-blocks", -1),
                                         RankSetting::Int("--unrouted-kv-blocks", 64),
                                         RankSetting::Double("MEMORY_WIGGLE_ROOM", 0.95)};
  constexpr int kN = 3 * kRankSettingFloats;
  std::vector<float> wire(2 * kN);
  EncodeRankSettings(mine, wire.data());
  EncodeRankSettings(mine, wire.data() + kN);
  EXPECT_TRUE(CheckRankSettingsAgree(mine, wire.data(), 2).ok());
  for (float f : wire) EXPECT_EQ(f, std::floor(f));  // 16-bit integers: exact in any transport

  std::vector<RankSetting> other = mine;
  other[1].value = (int64_t{1} << 40) + 64;  // differs from 64 only in the high bits
  EncodeRankSettings(other, wire.data() + kN);
  absl::Status st = CheckRankSettingsAgree(mine, wire.data(), 2);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("--unrouted-kv-blocks (rank 0 64, rank 1 1099511627840)"),
            std::string::npos)
      << st;

  other = mine;
  other[2] = RankSetting::Double("MEMORY_WIGGLE_ROOM", 0.9);
  EncodeRankSettings(other, wire.data() + kN);
  st = CheckRankSettingsAgree(mine, wire.data(), 2);
  EXPECT_NE(st.message().find("MEMORY_WIGGLE_ROOM (rank 0 0.95, rank 1 0.9)"), std::string::npos)
      << st;
}

// Through the Gloo group: a rank started with another --unrouted-kv-blocks makes every rank fail
// with the same error (none is left waiting in a collective), and the group stays usable.
TEST(TpShard, DifferentRankSettingsFailOnEveryRank) {
  const std::vector<Trace> ranks = OnRanks(kTiny, 2, nullptr, [&](CpuPhiModel& m) {
    Trace t;
    const absl::Status differ = m.CheckSameOnEveryRank(
        {RankSetting::Int("--max-kv-blocks", 0),
         RankSetting::Int("--unrouted-kv-blocks", m.tp_rank() == 0 ? 64 : 32)});
    EXPECT_EQ(differ.code(), absl::StatusCode::kFailedPrecondition) << differ;
    EXPECT_NE(differ.message().find("different --unrouted-kv-blocks (rank 0 64, rank 1 32)"),
              std::string::npos)
        << differ;
    const absl::Status same = m.CheckSameOnEveryRank({RankSetting::Int("--max-kv-blocks", 7)});
    EXPECT_TRUE(same.ok()) << same;
    t.ok = differ.code() == absl::StatusCode::kFailedPrecondition && same.ok();
    return t;
  });
  ASSERT_EQ(ranks.size(), 2u);
  for (const Trace& t : ranks) EXPECT_TRUE(t.ok);
}

TEST(TpShard, CreateRefusesWhatItCannotShard) {
  FakeCommunicator three(0, 3, MemorySpace::kHost);
  absl::StatusOr<std::unique_ptr<CpuPhiModel>> m =
      CpuPhiModel::Load(kGolden / "phi-mha-hd64", CpuParallel{.comm = &three});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("num_attention_heads"), std::string::npos) << m.status();
  FakeCommunicator device(0, 2, MemorySpace::kDevice);
  m = CpuPhiModel::Load(kGolden / "phi-mha-hd64", CpuParallel{.comm = &device});
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("host-memory communicator"), std::string::npos) << m.status();
}

// ---- adapters ----------------------------------------------------------------------------------

// Loads the demo model's adapters under indices 1..3, each sharded for this rank.
void LoadDemoAdapters(CpuPhiModel& m, int rank, AdapterRegistry* registry) {
  const fs::path dirs[] = {kTiny / "adapters/prose", kGolden / "adapters/lora-r4-qv-fc2",
                           kGolden / "adapters/lora-r16-rslora-all"};
  for (uint32_t i = 0; i < 3; ++i) {
    absl::StatusOr<LoraAdapter> full = LoraAdapter::LoadDir(dirs[i], m.config());
    ASSERT_TRUE(full.ok()) << full.status();
    absl::StatusOr<LoraAdapter> mine = m.ShardAdapter(*std::move(full));
    ASSERT_TRUE(mine.ok()) << "rank " << rank << ": " << mine.status();
    absl::StatusOr<AdapterLoadResult> loaded = registry->Load(i + 1, *std::move(mine));
    ASSERT_TRUE(loaded.ok()) << loaded.status();
  }
}

class TpAdapters : public ::testing::TestWithParam<int> {};

TEST_P(TpAdapters, MixedAdapterBatchMatchesWorldSizeOne) {
  const int world = GetParam();
  std::vector<std::vector<int32_t>> prompts = GoldenPrompts(kGolden / "tiny-phi-code.json", 5);
  ASSERT_EQ(prompts.size(), 5u);
  // Base, then each adapter, then the first adapter again (segments of one adapter apart).
  const std::vector<uint32_t> adapters = {0, 1, 2, 3, 1};
  const Body body = [&](CpuPhiModel& m) { return RunWorkload(m, prompts, 6, adapters); };
  const std::vector<Trace> reference = OnRanks(kTiny, 1, LoadDemoAdapters, body);
  const std::vector<Trace> ranks = OnRanks(kTiny, world, LoadDemoAdapters, body);
  ExpectMatches(ranks, reference[0], "tiny-phi-code adapters W=" + std::to_string(world));
  // The adapters make a difference (or the comparison above proves nothing about them).
  const std::vector<Trace> base =
      OnRanks(kTiny, 1, nullptr, [&](CpuPhiModel& m) { return RunWorkload(m, prompts, 6, {}); });
  ASSERT_TRUE(base[0].ok);
  EXPECT_NE(base[0].logits[0], reference[0].logits[0]);
}

INSTANTIATE_TEST_SUITE_P(Worlds, TpAdapters, ::testing::Values(2, 4));

// A random adapter on all seven targets, lm_head included (small values keep the logits sane).
LoraAdapter AllTargetsAdapter(const PhiConfig& c) {
  LoraAdapter a("all-targets", c.num_hidden_layers);
  uint32_t seed = 11;
  for (LoraTarget t : kAllLoraTargets) {
    const auto [in, out] = LoraTargetDims(c, t);
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : c.num_hidden_layers); ++l) {
      LoraModule m;
      m.rank = 2 + static_cast<int>(t);
      m.scale = 0.5f;
      m.a = lora_test::RandomValues(m.rank * in, seed++, 0.2f);
      m.b = lora_test::RandomValues(out * m.rank, seed++, 0.2f);
      const absl::Status st = a.SetModule(c, l, t, std::move(m));
      EXPECT_TRUE(st.ok()) << st;
    }
  }
  return a;
}

// GQA: W = 2 splits the KV heads and the vocab-parallel lm_head carries its LoRA B rows; W = 4
// replicates each KV head, and the k/v LoRA B rows must follow the replicated head.
TEST(TpAdapters, AllTargetsOnGqaIncludingVocabParallelHead) {
  const std::vector<std::vector<int32_t>> prompts =
      GoldenPrompts(kGolden / "phi-gqa-hd80/golden.json", 5);
  const RankSetup setup = [](CpuPhiModel& m, int rank, AdapterRegistry* registry) {
    absl::StatusOr<LoraAdapter> mine = m.ShardAdapter(AllTargetsAdapter(m.config()));
    ASSERT_TRUE(mine.ok()) << "rank " << rank << ": " << mine.status();
    ASSERT_TRUE(registry->Load(1, *std::move(mine)).ok());
  };
  const std::vector<uint32_t> adapters = {1, 0, 1, 1, 0};
  const Body body = [&](CpuPhiModel& m) { return RunWorkload(m, prompts, 4, adapters); };
  const std::vector<Trace> reference = OnRanks(kGolden / "phi-gqa-hd80", 1, setup, body);
  for (int world : {2, 4}) {
    const std::vector<Trace> ranks = OnRanks(kGolden / "phi-gqa-hd80", world, setup, body);
    ExpectMatches(ranks, reference[0], "gqa all-target adapter W=" + std::to_string(world));
  }
}

// An adapter that was not sharded for the rank is refused on every rank before any collective
// (not read out of bounds).
TEST(TpAdapters, UnshardedAdapterIsRefused) {
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}};
  const RankSetup setup = [](CpuPhiModel& m, int, AdapterRegistry* registry) {
    ASSERT_TRUE(registry->Load(1, AllTargetsAdapter(m.config())).ok());
  };
  const std::vector<Trace> ranks = OnRanks(kGolden / "phi-gqa-hd80", 2, setup, [&](CpuPhiModel& m) {
    ForwardBatch b;
    b.token_ids = {1, 2, 3};
    b.positions = {0, 1, 2};
    b.logit_rows = {2};
    b.seqs.push_back(
        {.num_new_tokens = 3, .context_len = 3, .block_table = {0}, .adapter_index = 1});
    std::vector<float> logits;
    const absl::Status st = m.Forward(b, &logits);
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    EXPECT_NE(st.message().find("ShardAdapter"), std::string::npos) << st;
    // The group is still in step: a base-model step works afterwards.
    b.seqs[0].adapter_index = 0;
    Trace t;
    const absl::Status again = m.Forward(b, &logits);
    EXPECT_TRUE(again.ok()) << again;
    t.ok = again.ok();
    return t;
  });
  for (const Trace& t : ranks) EXPECT_TRUE(t.ok);
}

}  // namespace
}  // namespace phishard
