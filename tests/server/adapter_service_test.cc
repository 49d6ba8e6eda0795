// AdapterService over the real CPU model of models/tiny-phi-code: the Download/Load/Offload
// semantics of spec §2.3 (`__base_model__`, no reload, preloaded, dynamic loading disabled), the
// byte budget (RESOURCE_EXHAUSTED before weights are read), LINEAR merges, static and preloaded
// adapters, malformed adapters, and a backend that applies no adapters. Output correctness of
// adapted requests is tested end to end in tests/integration/serve_adapters_test.cc.
#include "server/adapter_service.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "model/cpu_phi_model.h"
#include "model/safetensors.h"
#include "tests/model/lora_test_util.h"
#include "tests/server/fake_model.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using lora_test::TempDir;

const fs::path kModels = fs::path(PHISHARD_MODELS);
const fs::path kRepo = kModels.parent_path();
const fs::path kTiny = kModels / "tiny-phi-code";

constexpr int64_t kMemory = 100'000'000;  // "device memory" for the tests: budget 10 MB at 0.1

// Elements of every tensor in the adapter's safetensors: what the registry charges, x 4 bytes.
int64_t AdapterBytes(const fs::path& dir) {
  absl::StatusOr<std::unique_ptr<WeightStore>> s = WeightStore::OpenDir(dir);
  EXPECT_TRUE(s.ok()) << s.status();
  int64_t n = 0;
  for (const std::string& name : (*s)->Names()) n += (*(*s)->Get(name))->numel();
  return n * 4;
}

AdapterSpec Spec(std::vector<std::string> ids, std::vector<float> weights = {},
                 MergeStrategy m = MergeStrategy::kLinear) {
  AdapterSpec s;
  s.ids = std::move(ids);
  s.weights = std::move(weights);
  s.merge_strategy = m;
  s.source = AdapterSourceKind::kLocal;
  return s;
}

template <class T>
void ExpectCode(const absl::StatusOr<T>& r, absl::StatusCode code, const std::string& needle) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), code) << r.status();
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
}

class AdapterServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<CpuPhiModel>> m = CpuPhiModel::Load(kTiny);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
    root_ = new TempDir("adsvc");
    // Copies, not links: a link out of the root is refused by design.
    fs::copy(kTiny / "adapters" / "prose", root_->path() / "prose");
    for (const char* name : {"lora-r4-qv-fc2", "lora-r16-rslora-all"}) {
      fs::copy(kRepo / "tests/golden/adapters" / name, root_->path() / name);
    }
  }
  static void TearDownTestSuite() {
    delete root_;
    delete model_;
  }

  static AdapterServiceOptions Options() {
    AdapterServiceOptions o;
    o.store.roots = {root_->path()};
    o.memory_fraction = 0.1;
    o.device_memory_bytes = kMemory;
    return o;
  }
  static std::unique_ptr<AdapterService> Make(AdapterServiceOptions o) {
    absl::StatusOr<std::unique_ptr<AdapterService>> s = AdapterService::Create(model_, o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }
  static fs::path Dir(const std::string& name) { return root_->path() / name; }

  static CpuPhiModel* model_;
  static TempDir* root_;
};
CpuPhiModel* AdapterServiceTest::model_ = nullptr;
TempDir* AdapterServiceTest::root_ = nullptr;

TEST_F(AdapterServiceTest, BaseModelAlwaysSucceedsWithFalse) {
  std::unique_ptr<AdapterService> svc = Make(Options());
  ASSERT_NE(svc, nullptr);
  const AdapterSpec base = Spec({kBaseModelAdapterId});
  absl::StatusOr<DownloadResult> d = svc->Download(base);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_FALSE(d->downloaded);
  EXPECT_EQ(d->memory_fraction, 0.0f);
  EXPECT_EQ(svc->Load(base, 0).value(), false);
  EXPECT_EQ(svc->Load(base, 5).value(), false);
  EXPECT_EQ(svc->Offload(base, 0).value(), false);
  EXPECT_EQ(svc->registry()->num_loaded(), 0);
  ExpectCode(svc->Download(Spec({"prose", kBaseModelAdapterId})),
             absl::StatusCode::kInvalidArgument, "cannot be merged");
}

TEST_F(AdapterServiceTest, DownloadValidatesAndReportsTheBudgetFraction) {
  std::unique_ptr<AdapterService> svc = Make(Options());
  ASSERT_NE(svc, nullptr);
  EXPECT_EQ(svc->budget_bytes(), kMemory / 10);
  for (const char* name : {"prose", "lora-r4-qv-fc2", "lora-r16-rslora-all"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<DownloadResult> d = svc->Download(Spec({name}));
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_TRUE(d->downloaded);
    EXPECT_FLOAT_EQ(d->memory_fraction,
                    static_cast<float>(AdapterBytes(Dir(name)) / (0.1 * kMemory)));
  }
  // Download places nothing.
  EXPECT_EQ(svc->registry()->num_loaded(), 0);
  // A merge reports the sum.
  absl::StatusOr<DownloadResult> m = svc->Download(Spec({"prose", "lora-r4-qv-fc2"}));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_FLOAT_EQ(m->memory_fraction, static_cast<float>((AdapterBytes(Dir("prose")) +
                                                          AdapterBytes(Dir("lora-r4-qv-fc2"))) /
                                                         (0.1 * kMemory)));
  ExpectCode(svc->Download(Spec({"prose", "lora-r4-qv-fc2"}, {}, MergeStrategy::kTies)),
             absl::StatusCode::kUnimplemented, "merge_strategy TIES is not supported");
  ExpectCode(svc->Download(Spec({"no-such-adapter"})), absl::StatusCode::kNotFound,
             "no-such-adapter");
  AdapterSpec hub = Spec({"org/lora"});
  hub.source = AdapterSourceKind::kHub;
  ExpectCode(svc->Download(hub), absl::StatusCode::kFailedPrecondition,
             "phishard does not download adapters");
}

TEST_F(AdapterServiceTest, BudgetIsEnforcedBeforeWeightsAreRead) {
  const int64_t prose = AdapterBytes(Dir("prose")), r16 = AdapterBytes(Dir("lora-r16-rslora-all"));
  AdapterServiceOptions o = Options();
  // Room for r16 alone, not for r16 + prose.
  o.device_memory_bytes = (r16 + prose / 2) * 10;
  std::unique_ptr<AdapterService> svc = Make(o);
  ASSERT_NE(svc, nullptr);
  ASSERT_EQ(svc->Load(Spec({"prose"}), 1).value(), true);
  ExpectCode(svc->Load(Spec({"lora-r16-rslora-all"}), 2), absl::StatusCode::kResourceExhausted,
             "cannot load adapter 'lora-r16-rslora-all' at index 2");
  EXPECT_FALSE(svc->registry()->IsLoaded(2));
  EXPECT_EQ(svc->Offload(Spec({"prose"}), 1).value(), true);
  EXPECT_EQ(svc->Load(Spec({"lora-r16-rslora-all"}), 2).value(), true);
  EXPECT_EQ(svc->registry()->used_bytes(), r16);
  // Larger than the whole reservation: Download refuses with upstream's message.
  o.device_memory_bytes = prose * 5;  // reservation = prose / 2
  std::unique_ptr<AdapterService> small = Make(o);
  ASSERT_NE(small, nullptr);
  ExpectCode(small->Download(Spec({"prose"})), absl::StatusCode::kResourceExhausted,
             "Adapter prose is larger than adapter memory reservation");
  // No reservation at all.
  o.memory_fraction = 0;
  std::unique_ptr<AdapterService> none = Make(o);
  ASSERT_NE(none, nullptr);
  ExpectCode(none->Download(Spec({"prose"})), absl::StatusCode::kResourceExhausted,
             "Memory reserved for adapters is 0");
  ExpectCode(none->Load(Spec({"prose"}), 1), absl::StatusCode::kResourceExhausted,
             "Memory reserved for adapters is 0");
  // Slots.
  o = Options();
  o.num_slots = 1;
  std::unique_ptr<AdapterService> one = Make(o);
  ASSERT_NE(one, nullptr);
  ASSERT_TRUE(one->Load(Spec({"prose"}), 1).ok());
  ExpectCode(one->Load(Spec({"lora-r4-qv-fc2"}), 2), absl::StatusCode::kResourceExhausted,
             "adapter slots are in use");
}

TEST_F(AdapterServiceTest, LoadIsIdempotentPerIndexAndOffloadReportsWhatItDid) {
  std::unique_ptr<AdapterService> svc = Make(Options());
  ASSERT_NE(svc, nullptr);
  ASSERT_EQ(svc->Load(Spec({"prose"}), 3).value(), true);
  const uint64_t gen = svc->registry()->generation();
  const LoraAdapter* loaded = svc->registry()->Find(3);
  ASSERT_NE(loaded, nullptr);
  // Same index, other parameters: no reload (spec §2.3 step 2).
  EXPECT_EQ(svc->Load(Spec({"lora-r4-qv-fc2"}), 3).value(), true);
  EXPECT_EQ(svc->registry()->generation(), gen);
  EXPECT_EQ(svc->registry()->Find(3), loaded);
  EXPECT_EQ(svc->Offload(Spec({"prose"}), 3).value(), true);
  EXPECT_EQ(svc->Offload(Spec({"prose"}), 3).value(), false);
  EXPECT_EQ(svc->Offload(Spec({"prose"}), 99).value(), false);
  EXPECT_EQ(svc->registry()->num_loaded(), 0);
  EXPECT_EQ(svc->registry()->used_bytes(), 0);
  ExpectCode(svc->Load(Spec({"prose"}), 0), absl::StatusCode::kInvalidArgument,
             "adapter_index 0 is the base model's");
}

TEST_F(AdapterServiceTest, LinearMergeWithZeroWeightEqualsTheFirstAdapter) {
  std::unique_ptr<AdapterService> svc = Make(Options());
  ASSERT_NE(svc, nullptr);
  ASSERT_EQ(svc->Load(Spec({"prose", "lora-r4-qv-fc2"}, {1.0f, 0.0f}), 4).value(), true);
  ASSERT_EQ(svc->Load(Spec({"prose"}), 5).value(), true);
  const LoraAdapter* merged = svc->registry()->Find(4);
  const LoraAdapter* alone = svc->registry()->Find(5);
  ASSERT_TRUE(merged != nullptr && alone != nullptr);
  EXPECT_EQ(merged->name(), "prose+lora-r4-qv-fc2");
  EXPECT_EQ(merged->num_params(), alone->num_params());
  // Same update per module: scale_m B_m A_m == scale_a B_a A_a, compared on one entry pattern
  // (the stacking keeps A and folds the scale into B, so compare scale * B and A directly).
  for (int l = 0; l < alone->num_layers(); ++l) {
    for (LoraTarget t : kAllLoraTargets) {
      const LoraModule& a = alone->module(l, t);
      const LoraModule& m = merged->module(l, t);
      ASSERT_EQ(a.rank, m.rank);
      if (!a.present()) continue;
      EXPECT_EQ(a.a, m.a);
      for (size_t i = 0; i < a.b.size(); ++i) {
        ASSERT_FLOAT_EQ(a.scale * a.b[i], m.scale * m.b[i]);
      }
    }
  }
  ExpectCode(svc->Load(Spec({"prose", "lora-r4-qv-fc2"}, {}, MergeStrategy::kDareTies), 6),
             absl::StatusCode::kUnimplemented, "DARE_TIES");
  ExpectCode(svc->Load(Spec({"prose", kBaseModelAdapterId}), 6), absl::StatusCode::kInvalidArgument,
             "cannot be merged");
  ExpectCode(svc->Load(Spec({"prose", "lora-r4-qv-fc2"}, {0.0f, 0.0f}), 6),
             absl::StatusCode::kInvalidArgument, "adapts no module");
  EXPECT_FALSE(svc->registry()->IsLoaded(6));
}

TEST_F(AdapterServiceTest, MalformedAdaptersFailCleanlyAndNothingChanges) {
  TempDir bad("adbad");
  const fs::path root = bad.path();
  // Missing config; config that is not JSON; rank that disagrees with the tensors; DoRA; only a
  // pickle; a truncated safetensors file.
  fs::create_directories(root / "no_config");
  fs::copy(Dir("prose") / "adapter_model.safetensors", root / "no_config");
  fs::copy(Dir("prose"), root / "bad_json");
  lora_test::WriteText(root / "bad_json" / "adapter_config.json", "{ not json");
  fs::copy(Dir("lora-r4-qv-fc2"), root / "wrong_rank");
  nlohmann::json cfg = lora_test::ReadJsonFile(Dir("lora-r4-qv-fc2") / "adapter_config.json");
  cfg["r"] = 8;
  lora_test::WriteText(root / "wrong_rank" / "adapter_config.json", cfg.dump());
  fs::copy(Dir("prose"), root / "dora");
  cfg = lora_test::ReadJsonFile(Dir("prose") / "adapter_config.json");
  cfg["use_dora"] = true;
  lora_test::WriteText(root / "dora" / "adapter_config.json", cfg.dump());
  fs::create_directories(root / "pickle");
  fs::copy(Dir("prose") / "adapter_config.json", root / "pickle");
  lora_test::WriteText(root / "pickle" / "adapter_model.bin", "not really");
  fs::copy(Dir("prose"), root / "truncated");
  fs::resize_file(root / "truncated" / "adapter_model.safetensors", 1000);

  AdapterServiceOptions o = Options();
  o.store.roots = {root, root_->path()};
  std::unique_ptr<AdapterService> svc = Make(o);
  ASSERT_NE(svc, nullptr);
  const std::vector<std::pair<std::string, absl::StatusCode>> cases = {
      {"no_config", absl::StatusCode::kNotFound},
      {"bad_json", absl::StatusCode::kInvalidArgument},
      {"wrong_rank", absl::StatusCode::kInvalidArgument},
      {"dora", absl::StatusCode::kUnimplemented},
      {"pickle", absl::StatusCode::kInvalidArgument},  // not a torch.save archive
      {"truncated", absl::StatusCode::kInvalidArgument},
  };
  for (const auto& [name, code] : cases) {
    SCOPED_TRACE(name);
    ExpectCode(svc->Download(Spec({name})), code, "adapter '" + name + "'");
    ExpectCode(svc->Load(Spec({name}), 7), code, "adapter '" + name + "'");
    EXPECT_FALSE(svc->registry()->IsLoaded(7));
    EXPECT_EQ(svc->registry()->used_bytes(), 0);
  }
  EXPECT_EQ(svc->Load(Spec({"prose"}), 7).value(), true);
}

TEST_F(AdapterServiceTest, StaticAdapterServesIndexZeroAndStays) {
  AdapterServiceOptions o = Options();
  o.static_adapter_id = "prose";
  o.static_source = AdapterSourceKind::kLocal;
  std::unique_ptr<AdapterService> svc = Make(o);
  ASSERT_NE(svc, nullptr);
  EXPECT_TRUE(svc->dynamic_loading());
  ASSERT_NE(svc->registry()->Find(0), nullptr);
  EXPECT_EQ(svc->Offload(Spec({kBaseModelAdapterId}), 0).value(), false);
  EXPECT_EQ(svc->Offload(Spec({"prose"}), 0).value(), false);  // never offloaded
  EXPECT_NE(svc->registry()->Find(0), nullptr);
  EXPECT_TRUE(svc->preloaded().empty());
  // Its bytes do not eat the dynamic reservation.
  ASSERT_EQ(svc->Load(Spec({"lora-r16-rslora-all"}), 1).value(), true);
  EXPECT_EQ(svc->registry()->budget_bytes(), svc->budget_bytes() + AdapterBytes(Dir("prose")));

  o.merge_static = true;  // --merge-adapter-weights: dynamic loading off
  std::unique_ptr<AdapterService> merged = Make(o);
  ASSERT_NE(merged, nullptr);
  EXPECT_FALSE(merged->dynamic_loading());
  ExpectCode(merged->Load(Spec({"lora-r4-qv-fc2"}), 1), absl::StatusCode::kFailedPrecondition,
             "does not support dynamic adapter loading");

  o.merge_static = false;
  o.static_adapter_id = "../prose";
  absl::StatusOr<std::unique_ptr<AdapterService>> bad = AdapterService::Create(model_, o);
  ExpectCode(bad, absl::StatusCode::kInvalidArgument, "--adapter-id: ");
  o.static_adapter_id.clear();
  o.merge_static = true;
  ExpectCode(AdapterService::Create(model_, o), absl::StatusCode::kInvalidArgument,
             "--merge-adapter-weights requires --adapter-id");
}

TEST_F(AdapterServiceTest, PreloadedAdaptersFollowUpstream) {
  AdapterServiceOptions o = Options();
  o.memory_fraction = 0;  // the launcher forces ADAPTER_MEMORY_FRACTION=0 with preloads
  o.preloaded_ids = {"prose", "lora-r4-qv-fc2"};
  o.preloaded_source = AdapterSourceKind::kLocal;
  std::unique_ptr<AdapterService> svc = Make(o);
  ASSERT_NE(svc, nullptr);
  EXPECT_FALSE(svc->dynamic_loading());
  ASSERT_EQ(svc->preloaded().size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const PreloadedAdapterInfo& p = svc->preloaded()[i];
    EXPECT_EQ(p.id, o.preloaded_ids[i]);
    EXPECT_EQ(p.index, i + 1);
    EXPECT_EQ(p.source, AdapterSourceKind::kLocal);
    // Preloaded fractions are of the device memory, not of the (zero) reservation.
    EXPECT_FLOAT_EQ(p.memory_fraction,
                    static_cast<float>(static_cast<double>(AdapterBytes(Dir(p.id))) / kMemory));
    ASSERT_NE(svc->registry()->Find(p.index), nullptr);
  }
  absl::StatusOr<DownloadResult> d = svc->Download(Spec({"prose"}));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->downloaded);
  EXPECT_FLOAT_EQ(d->memory_fraction, svc->preloaded()[0].memory_fraction);
  EXPECT_EQ(svc->Load(Spec({"prose"}), 1).value(), true);
  ExpectCode(svc->Load(Spec({"lora-r16-rslora-all"}), 3), absl::StatusCode::kFailedPrecondition,
             "This model does not support dynamic adapter loading");
  ExpectCode(svc->Download(Spec({"lora-r16-rslora-all"})), absl::StatusCode::kFailedPrecondition,
             "does not support dynamic adapter loading");
  EXPECT_EQ(svc->Offload(Spec({"prose"}), 1).value(), false);
  EXPECT_EQ(svc->Offload(Spec({"x"}), 3).value(), false);
  EXPECT_NE(svc->registry()->Find(1), nullptr);

  o.preloaded_ids = {"prose", "prose"};
  ExpectCode(AdapterService::Create(model_, o), absl::StatusCode::kInvalidArgument, "given twice");
  o.preloaded_ids = {"prose"};
  o.device_memory_bytes = 1000;  // far less than the adapter
  ExpectCode(AdapterService::Create(model_, o), absl::StatusCode::kResourceExhausted,
             "--preloaded-adapter-ids: the adapters need");
}

TEST_F(AdapterServiceTest, BackendWithoutAdaptersDisablesThemClearly) {
  testing_fake::FakeModel fake;  // ModelBackend's default SetAdapterRegistry: UNIMPLEMENTED
  AdapterServiceOptions o = Options();
  absl::StatusOr<std::unique_ptr<AdapterService>> svc = AdapterService::Create(&fake, o);
  ASSERT_TRUE(svc.ok()) << svc.status();
  EXPECT_FALSE((*svc)->enabled());
  EXPECT_FALSE((*svc)->Download(Spec({kBaseModelAdapterId}))->downloaded);
  EXPECT_EQ((*svc)->Load(Spec({kBaseModelAdapterId}), 0).value(), false);
  ExpectCode((*svc)->Download(Spec({"prose"})), absl::StatusCode::kFailedPrecondition,
             "does not apply LoRA adapters");
  ExpectCode((*svc)->Load(Spec({"prose"}), 1), absl::StatusCode::kFailedPrecondition,
             "does not apply LoRA adapters");
  EXPECT_EQ((*svc)->Offload(Spec({"prose"}), 1).value(), false);
  o.preloaded_ids = {"prose"};
  ExpectCode(AdapterService::Create(&fake, o), absl::StatusCode::kFailedPrecondition,
             "--preloaded-adapter-ids prose: ");
}

TEST(AdapterSpecFromProto, NamesTheBadField) {
  generate::v1::AdapterParameters p;
  ExpectCode(AdapterSpecFromProto(p, 0), absl::StatusCode::kInvalidArgument,
             "adapter_parameters.adapter_ids is empty");
  p.add_adapter_ids("a");
  p.add_adapter_ids("");
  ExpectCode(AdapterSpecFromProto(p, 0), absl::StatusCode::kInvalidArgument,
             "adapter_parameters.adapter_ids[1] is empty");
  p.set_adapter_ids(1, "b");
  p.add_weights(1.0f);
  ExpectCode(AdapterSpecFromProto(p, 0), absl::StatusCode::kInvalidArgument,
             "adapter_parameters.weights has 1 entries for 2 adapter_ids");
  p.add_weights(std::nanf(""));
  ExpectCode(AdapterSpecFromProto(p, 0), absl::StatusCode::kInvalidArgument,
             "adapter_parameters.weights[1]");
  p.set_weights(1, 0.5f);
  p.set_merge_strategy(static_cast<generate::v1::MergeStrategy>(9));
  ExpectCode(AdapterSpecFromProto(p, 0), absl::StatusCode::kInvalidArgument,
             "adapter_parameters.merge_strategy 9");
  p.set_merge_strategy(generate::v1::TIES);
  ExpectCode(AdapterSpecFromProto(p, 7), absl::StatusCode::kInvalidArgument, "adapter_source 7");
  absl::StatusOr<AdapterSpec> s = AdapterSpecFromProto(p, 2);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->ids, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(s->weights, (std::vector<float>{1.0f, 0.5f}));
  EXPECT_EQ(s->merge_strategy, MergeStrategy::kTies);
  EXPECT_EQ(s->source, AdapterSourceKind::kLocal);
  EXPECT_EQ(s->Name(), "a+b");
}

}  // namespace
}  // namespace phishard
