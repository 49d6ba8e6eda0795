// Multi-LoRA through the real `phishard serve --device cpu` process over its unix socket, driven
// the way the LoRAX router drives adapters (spec §3.7): DownloadAdapter -> LoadAdapter at an index
// -> requests carrying that adapter_index -> OffloadAdapter. Outputs are compared token for token
// with peft's unmerged LoRA (tests/golden/tiny-phi-code-adapters.json) and with the base model's
// golden (tests/golden/tiny-phi-code.json).
//
// Adapters are copied into an adapter root (--adapter-root); the root also holds the escape
// attempts (symlinks out of it) and the malformed adapters, which must each fail with a clear
// error while the shard keeps serving.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"
#include "server/client.h"
#include "tests/integration/golden_check.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;
namespace fs = std::filesystem;
using integration::DemoShard;
using integration::ReadFile;
using integration::ShardProcess;
using integration::TempDir;

const fs::path kRepo = fs::path(PHISHARD_MODELS).parent_path();
const fs::path kTiny = fs::path(PHISHARD_MODELS) / "tiny-phi-code";
constexpr int64_t kDeviceMemory = 100'000'000;  // --adapter-memory-bytes: budget 10 MB at 0.1
// Greedy outputs are checked with the device under test's tolerance (golden_check.h). CPU: peft
// computes in float32 on a GPU, we in float32 on the CPU in another order: logits agree to ~1e-4
// (tests/model/adapter_golden_test.cc), logprobs well within 1e-3; the smallest top-2 gap of
// these cases is 1.1e-2, so greedy ids must match exactly. CUDA (bf16): logprobs within 0.2, ids
// exact unless the case's top-2 margin is under the bf16 near-tie bound.

const std::vector<std::string> kAdapters = {"prose", "lora-r4-qv-fc2", "lora-r16-rslora-all"};

struct Golden {
  std::string adapter;  // "" = base model
  std::string prompt;
  std::vector<uint32_t> prompt_ids, greedy_ids;
  std::vector<float> greedy_logprobs;
  bool differs_from_base = true;
  integration::GoldenGreedy greedy;  // for ExpectGreedyMatchesGolden
};

std::vector<Golden> ReadGolden(const fs::path& file, bool adapters) {
  const nlohmann::json j = nlohmann::json::parse(ReadFile(file.string()));
  std::vector<Golden> out;
  for (const auto& c : j.at("cases")) {
    Golden g;
    if (adapters) {
      g.adapter = c.at("adapter").get<std::string>();
      g.differs_from_base = c.at("greedy_differs_from_base").get<bool>();
    }
    g.prompt = c.at("prompt").get<std::string>();
    g.prompt_ids = c.at("prompt_ids").get<std::vector<uint32_t>>();
    g.greedy_ids = c.at("greedy_ids").get<std::vector<uint32_t>>();
    g.greedy_logprobs = c.at("greedy_logprobs").get<std::vector<float>>();
    g.greedy = {.ids = g.greedy_ids,
                .logprobs = g.greedy_logprobs,
                .min_top2_gap = c.at("min_top2_gap").get<double>(),
                .scale = integration::LogitScale(c.at("last_logits").get<std::vector<float>>())};
    out.push_back(std::move(g));
  }
  return out;
}

const std::vector<Golden>& AdapterGolden() {
  static const auto* g =
      new std::vector<Golden>(ReadGolden(kRepo / "tests/golden/tiny-phi-code-adapters.json", true));
  return *g;
}

// The base model's golden case for `prompt`.
const Golden& BaseGolden(const std::string& prompt) {
  static const auto* g =
      new std::vector<Golden>(ReadGolden(kRepo / "tests/golden/tiny-phi-code.json", false));
  for (const Golden& c : *g) {
    if (c.prompt == prompt) return c;
  }
  ADD_FAILURE() << "no base golden case for " << prompt;
  return g->front();
}

const Golden& AdapterCase(const std::string& adapter, const std::string& prompt) {
  for (const Golden& c : AdapterGolden()) {
    if (c.adapter == adapter && c.prompt == prompt) return c;
  }
  ADD_FAILURE() << "no golden case for " << adapter << " / " << prompt;
  return AdapterGolden().front();
}

// What the registry charges: Σ elements of the adapter's tensors x the model's bytes a parameter
// (AdapterService: 4 for the CPU's float32, 2 for the bf16 the CUDA suite serves).
int64_t AdapterBytes(const fs::path& dir) {
  absl::StatusOr<std::unique_ptr<WeightStore>> s = WeightStore::OpenDir(dir);
  EXPECT_TRUE(s.ok()) << s.status();
  int64_t n = 0;
  for (const std::string& name : (*s)->Names()) n += (*(*s)->Get(name))->numel();
  return n * (integration::TestOnCuda() ? 2 : 4);
}

int64_t ResidentBytes(pid_t pid) {
  std::ifstream statm("/proc/" + std::to_string(pid) + "/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// A hermetic environment: no launcher / adapter variables, an empty hub cache of our own.
std::map<std::string, std::string> HermeticEnv(const TempDir& dir,
                                               std::map<std::string, std::string> extra = {}) {
  extra.emplace("HUGGINGFACE_HUB_CACHE", dir / "hub");  // unless `extra` names one
  return integration::CleanEnv(extra);
}

// Copies of the three golden adapters, plus everything that must be refused, under `root`.
void BuildAdapterRoot(const fs::path& root, const fs::path& outside) {
  fs::create_directories(root);
  fs::copy(kTiny / "adapters" / "prose", root / "prose");
  for (const char* name : {"lora-r4-qv-fc2", "lora-r16-rslora-all"}) {
    fs::copy(kRepo / "tests/golden/adapters" / name, root / name);
  }
  // Escapes: a directory link out of the root, and a real directory whose weights link out.
  fs::create_directories(outside);
  fs::copy(kTiny / "adapters" / "prose", outside / "prose");
  fs::create_directory_symlink(outside / "prose", root / "escape_link");
  fs::create_directories(root / "file_link");
  fs::copy(root / "prose" / "adapter_config.json", root / "file_link");
  fs::create_symlink(outside / "prose" / "adapter_model.safetensors",
                     root / "file_link" / "adapter_model.safetensors");
  // Malformed adapters.
  auto write = [](const fs::path& p, const std::string& text) { std::ofstream(p) << text; };
  nlohmann::json cfg =
      nlohmann::json::parse(ReadFile((root / "prose/adapter_config.json").string()));
  fs::create_directories(root / "no_config");
  fs::copy(root / "prose" / "adapter_model.safetensors", root / "no_config");
  fs::copy(root / "prose", root / "bad_json");
  write(root / "bad_json" / "adapter_config.json", "{\"r\": 8,");
  fs::copy(root / "prose", root / "dora");
  nlohmann::json dora = cfg;
  dora["use_dora"] = true;
  write(root / "dora" / "adapter_config.json", dora.dump());
  fs::copy(root / "lora-r4-qv-fc2", root / "wrong_rank");
  nlohmann::json wrong =
      nlohmann::json::parse(ReadFile((root / "lora-r4-qv-fc2/adapter_config.json").string()));
  wrong["r"] = 8;
  write(root / "wrong_rank" / "adapter_config.json", wrong.dump());
  fs::create_directories(root / "pickle_only");
  fs::copy(root / "prose" / "adapter_config.json", root / "pickle_only");
  write(root / "pickle_only" / "adapter_model.bin", "pickle");
  fs::copy(root / "prose", root / "truncated");
  fs::resize_file(root / "truncated" / "adapter_model.safetensors", 4096);
  fs::create_directories(root / "medusa");
  write(root / "medusa" / "config.json", "{\"medusa_num_heads\": 4, \"medusa_num_layers\": 1}");
  fs::create_directories(root / "empty_dir");
  fs::copy(root / "prose", root / "not_lora");
  nlohmann::json ia3 = cfg;
  ia3["peft_type"] = "IA3";
  write(root / "not_lora" / "adapter_config.json", ia3.dump());
}

// A hub cache (HUGGINGFACE_HUB_CACHE of HermeticEnv) holding repos that try to lead out of it:
// refs/main climbing, a snapshot directory that is a link out, a snapshot file linking out.
void BuildHubEscapes(const fs::path& hub, const fs::path& outside) {
  const fs::path bad = hub / "models--org--badref";
  fs::create_directories(bad / "refs");
  fs::create_directories(bad / "snapshots" / "abc");
  std::ofstream(bad / "refs" / "main") << "../../../outside";
  const fs::path snap = hub / "models--org--snaplink";
  fs::create_directories(snap / "snapshots");
  fs::create_directory_symlink(outside / "prose", snap / "snapshots" / "abc");
  const fs::path blob = hub / "models--org--bloblink";
  fs::create_directories(blob / "snapshots" / "abc");
  fs::copy(outside / "prose" / "adapter_config.json", blob / "snapshots" / "abc");
  fs::create_symlink(outside / "prose" / "adapter_model.safetensors",
                     blob / "snapshots" / "abc" / "adapter_model.safetensors");
}

class AdapterRpc {
 public:
  explicit AdapterRpc(ShardClient* c) : c_(c) {}
  static pb::AdapterParameters Params(const std::vector<std::string>& ids,
                                      const std::vector<float>& weights = {},
                                      pb::MergeStrategy m = pb::LINEAR) {
    pb::AdapterParameters p;
    for (const std::string& id : ids) p.add_adapter_ids(id);
    for (float w : weights) p.add_weights(w);
    p.set_merge_strategy(m);
    return p;
  }
  grpc::Status Download(const pb::AdapterParameters& p, pb::DownloadAdapterResponse* out,
                        pb::AdapterSource src = pb::LOCAL) {
    pb::DownloadAdapterRequest r;
    *r.mutable_adapter_parameters() = p;
    r.set_adapter_source(src);
    Ctx ctx;
    return c_->stub()->DownloadAdapter(&ctx.c, r, out);
  }
  grpc::Status Load(const pb::AdapterParameters& p, uint32_t index, bool* loaded,
                    pb::AdapterSource src = pb::LOCAL) {
    pb::LoadAdapterRequest r;
    *r.mutable_adapter_parameters() = p;
    r.set_adapter_source(src);
    r.set_adapter_index(index);
    pb::LoadAdapterResponse out;
    Ctx ctx;
    grpc::Status s = c_->stub()->LoadAdapter(&ctx.c, r, &out);
    *loaded = out.loaded();
    return s;
  }
  grpc::Status Offload(const pb::AdapterParameters& p, uint32_t index, bool* offloaded) {
    pb::OffloadAdapterRequest r;
    *r.mutable_adapter_parameters() = p;
    r.set_adapter_source(pb::LOCAL);
    r.set_adapter_index(index);
    pb::OffloadAdapterResponse out;
    Ctx ctx;
    grpc::Status s = c_->stub()->OffloadAdapter(&ctx.c, r, &out);
    *offloaded = out.offloaded();
    return s;
  }
  // Load that must succeed with `loaded`.
  void MustLoad(const std::string& id, uint32_t index, bool want = true) {
    bool loaded = !want;
    const grpc::Status s = Load(Params({id}), index, &loaded);
    ASSERT_TRUE(s.ok()) << id << " at " << index << ": " << s.error_message();
    EXPECT_EQ(loaded, want) << id << " at " << index;
  }
  void MustOffload(const std::string& id, uint32_t index, bool want) {
    bool offloaded = !want;
    const grpc::Status s = Offload(Params({id}), index, &offloaded);
    ASSERT_TRUE(s.ok()) << id << " at " << index << ": " << s.error_message();
    EXPECT_EQ(offloaded, want) << id << " at " << index;
  }

 private:
  struct Ctx {
    Ctx() { c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60)); }
    grpc::ClientContext c;
  };
  ShardClient* c_;
};

// One request as the router builds it, with an adapter index; greedy, never stopping at EOS.
pb::Request Req(uint64_t id, const Golden& g, uint32_t adapter_index, uint32_t max_new = 0) {
  pb::Request r =
      RouterRequest(id, g.prompt, g.prompt_ids, 1023,
                    max_new == 0 ? static_cast<uint32_t>(g.greedy_ids.size()) : max_new);
  r.set_adapter_index(adapter_index);
  r.mutable_stopping_parameters()->set_ignore_eos_token(true);
  return r;
}

// Runs `reqs` as one batch and checks each against its expected golden case.
void RunAndCheck(RouterSession& session, uint64_t batch_id,
                 const std::vector<std::pair<pb::Request, const Golden*>>& reqs) {
  pb::Batch batch;
  batch.set_id(batch_id);
  for (const auto& [r, g] : reqs) *batch.add_requests() = r;
  batch.set_size(static_cast<uint32_t>(reqs.size()));
  absl::StatusOr<std::vector<RequestOutcome>> out = RunBatchToCompletion(session, batch);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Golden& g = *reqs[i].second;
    const RequestOutcome& o = (*out)[i];
    SCOPED_TRACE(testing::Message()
                 << "request " << o.request_id << " adapter_index " << reqs[i].first.adapter_index()
                 << " expects " << (g.adapter.empty() ? "base" : g.adapter) << " on "
                 << testing::PrintToString(g.prompt.substr(0, 20)));
    ASSERT_EQ(o.ids.size(), reqs[i].first.stopping_parameters().max_new_tokens());
    integration::ExpectGreedyMatchesGolden(o.ids, o.logprobs, g.greedy,
                                           "request " + std::to_string(o.request_id));
  }
}

class ServeAdapters : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    root_ = dir_->path() + "/adapters";
    BuildAdapterRoot(root_, dir_->path() + "/outside");
    BuildHubEscapes(dir_->path() + "/hub", dir_->path() + "/outside");
    shard_ = new DemoShard(
        *dir_, {"--adapter-root", root_, "--adapter-memory-bytes", std::to_string(kDeviceMemory)},
        HermeticEnv(*dir_));
    ASSERT_TRUE(shard_->ready) << shard_->process->Logs();
    absl::StatusOr<std::unique_ptr<RouterSession>> s =
        RouterSession::Connect(UdsTarget(shard_->uds), 120);
    ASSERT_TRUE(s.ok()) << s.status();
    session_ = s->release();
    ASSERT_TRUE(session_->ClearCache(std::nullopt).ok());
    ASSERT_TRUE(session_->Info().ok());
    absl::StatusOr<std::optional<uint32_t>> w =
        session_->Warmup(RouterWarmupRequest(1023, 1073, 1024));
    ASSERT_TRUE(w.ok()) << w.status();
    rpc_ = new AdapterRpc(&session_->shard(0));
  }
  static void TearDownTestSuite() {
    delete rpc_;
    delete session_;
    if (shard_ != nullptr) {
      shard_->process->Signal(SIGTERM);
      EXPECT_EQ(shard_->process->Wait(30), 0) << shard_->process->Logs();
    }
    delete shard_;
    delete dir_;
  }
  void TearDown() override {
    if (session_ != nullptr) {
      ASSERT_TRUE(session_->ClearCache(std::nullopt).ok());
    }
  }

  // The shard still answers Health and still computes the base model exactly.
  static void ExpectStillServing(uint64_t batch_id) {
    ASSERT_TRUE(shard_->process->running()) << shard_->process->Logs();
    EXPECT_TRUE(session_->Health().ok());
    const Golden& g = BaseGolden("def fibonacci(n):\n");
    RunAndCheck(*session_, batch_id, {{Req(1, g, 0, 4), &g}});
  }

  static TempDir* dir_;
  static std::string root_;
  static DemoShard* shard_;
  static RouterSession* session_;
  static AdapterRpc* rpc_;
};
TempDir* ServeAdapters::dir_ = nullptr;
std::string ServeAdapters::root_;
DemoShard* ServeAdapters::shard_ = nullptr;
RouterSession* ServeAdapters::session_ = nullptr;
AdapterRpc* ServeAdapters::rpc_ = nullptr;

TEST_F(ServeAdapters, BaseModelCallsSucceedWithFalse) {
  const pb::AdapterParameters base = AdapterRpc::Params({"__base_model__"});
  pb::DownloadAdapterResponse d;
  ASSERT_TRUE(rpc_->Download(base, &d, pb::HUB).ok());
  EXPECT_FALSE(d.downloaded());
  EXPECT_EQ(d.memory_fraction(), 0.0f);
  rpc_->MustLoad("__base_model__", 0, false);
  rpc_->MustOffload("__base_model__", 0, false);
  absl::StatusOr<pb::InfoResponse> info = session_->Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->preloaded_adapters_size(), 0);
  bool loaded = true;
  const grpc::Status merged =
      rpc_->Load(AdapterRpc::Params({"prose", "__base_model__"}), 5, &loaded);
  EXPECT_EQ(merged.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(merged.error_message().find("cannot be merged"), std::string::npos)
      << merged.error_message();
}

TEST_F(ServeAdapters, MixedBatchOfBaseAndThreeAdaptersMatchesPeft) {
  for (size_t i = 0; i < kAdapters.size(); ++i) {
    pb::DownloadAdapterResponse d;
    const grpc::Status s = rpc_->Download(AdapterRpc::Params({kAdapters[i]}), &d);
    ASSERT_TRUE(s.ok()) << kAdapters[i] << ": " << s.error_message();
    EXPECT_TRUE(d.downloaded());
    EXPECT_FLOAT_EQ(
        d.memory_fraction(),
        static_cast<float>(AdapterBytes(fs::path(root_) / kAdapters[i]) / (0.1 * kDeviceMemory)))
        << kAdapters[i];
    rpc_->MustLoad(kAdapters[i], static_cast<uint32_t>(i + 1));
    rpc_->MustLoad(kAdapters[i], static_cast<uint32_t>(i + 1));  // no-op, still true
  }
  // Per prompt: base, the three adapters, and an index never loaded (= base), interleaved so
  // that segments change at almost every sequence.
  std::vector<std::pair<pb::Request, const Golden*>> reqs;
  uint64_t id = 100;
  for (const std::string& prompt : std::vector<std::string>{"The ", "def fibonacci(n):\n", "import",
                                                            AdapterGolden().back().prompt}) {
    const Golden& base = BaseGolden(prompt);
    reqs.emplace_back(Req(id++, base, 0), &base);
    for (size_t i = 0; i < kAdapters.size(); ++i) {
      const Golden& g = AdapterCase(kAdapters[i], prompt);
      reqs.emplace_back(Req(id++, g, static_cast<uint32_t>(i + 1)), &g);
    }
    reqs.emplace_back(Req(id++, base, 77), &base);
  }
  RunAndCheck(*session_, 10, reqs);
}

TEST_F(ServeAdapters, OffloadedIndexFallsBackToTheBaseModel) {
  rpc_->MustLoad("lora-r16-rslora-all", 20);
  const Golden& adapted = AdapterCase("lora-r16-rslora-all", "import");
  ASSERT_TRUE(adapted.differs_from_base);
  const Golden& base = BaseGolden("import");
  RunAndCheck(*session_, 11, {{Req(1, adapted, 20), &adapted}});
  rpc_->MustOffload("lora-r16-rslora-all", 20, true);
  rpc_->MustOffload("lora-r16-rslora-all", 20, false);
  RunAndCheck(*session_, 12, {{Req(1, base, 20), &base}});
  // A LINEAR merge with weights [1, 0] is the first adapter alone.
  bool loaded = false;
  const grpc::Status s =
      rpc_->Load(AdapterRpc::Params({"lora-r16-rslora-all", "prose"}, {1.0f, 0.0f}), 21, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(loaded);
  RunAndCheck(*session_, 13, {{Req(1, adapted, 21), &adapted}});
  rpc_->MustOffload("lora-r16-rslora-all+prose", 21, true);
}

TEST_F(ServeAdapters, HundredLoadOffloadCyclesReturnToBaselineRss) {
  const pid_t pid = shard_->process->pid();
  const Golden& g = AdapterCase("prose", "The ");
  auto cycle = [&](int i) {
    const std::string& name = kAdapters[i % kAdapters.size()];
    const uint32_t index = 1000 + i;  // the router never reuses an index
    rpc_->MustLoad(name, index);
    if (i % 20 == 0 && name == "prose") {  // and it is really used
      RunAndCheck(*session_, 30, {{Req(1, g, index, 2), &g}});
    }
    rpc_->MustOffload(name, index, true);
  };
  for (int i = 0; i < 6; ++i) cycle(i);  // warm-up: allocator arenas, step scratch
  const int64_t baseline = ResidentBytes(pid);
  for (int i = 6; i < 106; ++i) {
    cycle(i);
    if (HasFatalFailure()) return;
  }
  const int64_t after = ResidentBytes(pid);
  // One leaked adapter per cycle would be 0.15 to 1.2 MB x 100; glibc may keep a few freed
  // chunks and gRPC a few buffers.
  constexpr int64_t kSlack = 8 << 20;
  std::printf("server RSS before 100 load/offload cycles %.2f MiB, after %.2f MiB (%+.3f)\n",
              baseline / 1048576.0, after / 1048576.0, (after - baseline) / 1048576.0);
  EXPECT_LE(after - baseline, kSlack);
}

struct Refusal {
  std::string id;
  pb::AdapterSource source;
  grpc::StatusCode code;
  std::string needle;
};

void ExpectRefused(AdapterRpc& rpc, const Refusal& c, uint32_t index) {
  SCOPED_TRACE(c.id);
  pb::DownloadAdapterResponse d;
  const grpc::Status ds = rpc.Download(AdapterRpc::Params({c.id}), &d, c.source);
  EXPECT_EQ(ds.error_code(), c.code) << ds.error_message();
  EXPECT_NE(ds.error_message().find(c.needle), std::string::npos) << ds.error_message();
  bool loaded = true;
  const grpc::Status ls = rpc.Load(AdapterRpc::Params({c.id}), index, &loaded, c.source);
  EXPECT_EQ(ls.error_code(), c.code) << ls.error_message();
  EXPECT_NE(ls.error_message().find(c.needle), std::string::npos) << ls.error_message();
}

// Every way an adapter id could lead out of the adapter roots or the hub cache, through the
// real process: each is refused on DownloadAdapter and on LoadAdapter with a message that says
// why, nothing is loaded, and the shard still serves the base model exactly afterwards.
TEST_F(ServeAdapters, PathTraversalIsRefused) {
  const std::string outside = dir_->path() + "/outside/prose";
  const std::string kClimb = "'..' component";
  const std::string kOut = "outside the adapter roots";
  const std::string kMissing = "not found under the adapter roots";
  using C = grpc::StatusCode;
  const std::vector<Refusal> cases = {
      // Relative climbs.
      {"../outside/prose", pb::LOCAL, C::INVALID_ARGUMENT, kClimb},
      {"prose/../../outside/prose", pb::LOCAL, C::INVALID_ARGUMENT, "'..'"},
      {"prose/..", pb::LOCAL, C::INVALID_ARGUMENT, kClimb},
      {"..", pb::LOCAL, C::INVALID_ARGUMENT, kClimb},
      {"./prose", pb::LOCAL, C::INVALID_ARGUMENT, "'.' component"},
      {"prose/./", pb::LOCAL, C::INVALID_ARGUMENT, "'.' component"},
      // Absolute paths outside every root, directly or through /proc, or climbing from inside.
      {outside, pb::LOCAL, C::PERMISSION_DENIED, kOut},
      {(kTiny / "adapters" / "prose").string(), pb::HUB, C::PERMISSION_DENIED, kOut},
      {"/etc", pb::LOCAL, C::PERMISSION_DENIED, kOut},
      {"/", pb::LOCAL, C::INVALID_ARGUMENT, "empty path component"},
      {"/proc/self/root/etc", pb::LOCAL, C::PERMISSION_DENIED, "resolves to '/etc'"},
      {"/proc/self/cwd", pb::LOCAL, C::PERMISSION_DENIED, kOut},
      {root_ + "/../outside/prose", pb::LOCAL, C::INVALID_ARGUMENT, kClimb},
      {"//etc", pb::LOCAL, C::INVALID_ARGUMENT, "empty path component"},
      // Symlinks: a directory link out of the root, a weight file linking out.
      {"escape_link", pb::LOCAL, C::PERMISSION_DENIED, "resolves to"},
      {"file_link", pb::LOCAL, C::PERMISSION_DENIED, "is a link to"},
      // Windows separators and drive paths.
      {"a\\b", pb::LOCAL, C::INVALID_ARGUMENT, "backslash"},
      {"..\\outside\\prose", pb::LOCAL, C::INVALID_ARGUMENT, "backslash"},
      {"C:\\Windows\\System32", pb::LOCAL, C::INVALID_ARGUMENT, "backslash"},
      // Encoded forms are names, never decoded: they match nothing.
      {"%2e%2e/outside/prose", pb::LOCAL, C::NOT_FOUND, kMissing},
      {"%2e%2e%2foutside%2fprose", pb::LOCAL, C::NOT_FOUND, kMissing},
      {"..%2f..%2foutside", pb::LOCAL, C::NOT_FOUND, kMissing},
      {"\xef\xbc\x8e\xef\xbc\x8e/outside/prose", pb::LOCAL, C::NOT_FOUND, kMissing},  // U+FF0E
      {"~/../../etc", pb::LOCAL, C::INVALID_ARGUMENT, kClimb},
      {"file:///etc/passwd", pb::LOCAL, C::INVALID_ARGUMENT, "empty path component"},
      // NUL bytes (valid UTF-8, so the request parses; a C string would stop at them).
      {std::string("prose") + '\0' + "/../../outside", pb::LOCAL, C::INVALID_ARGUMENT, "NUL byte"},
      {std::string("\0", 1), pb::LOCAL, C::INVALID_ARGUMENT, "NUL byte"},
      // Very long names: one 5,000-byte component, and 2,000 nested components.
      {std::string(5000, 'a'), pb::LOCAL, C::NOT_FOUND, kMissing},
      {[] {
         std::string id;
         for (int i = 0; i < 2000; ++i) id += "ab/";
         return id + "prose";
       }(),
       pb::LOCAL, C::NOT_FOUND, kMissing},
      // Hub-style ids with climbing segments, and hub repos in the cache that lead out of it.
      {"org/..", pb::HUB, C::INVALID_ARGUMENT, kClimb},
      {"../org", pb::HUB, C::INVALID_ARGUMENT, kClimb},
      {"org/../../etc", pb::S3, C::INVALID_ARGUMENT, kClimb},
      {"org/name/../../../etc", pb::PBASE, C::INVALID_ARGUMENT, kClimb},
      {"org/name/extra", pb::HUB, C::INVALID_ARGUMENT, "is not a hub id ORG/NAME"},
      {"org/badref", pb::HUB, C::FAILED_PRECONDITION, "not a commit hash"},
      {"org/snaplink", pb::HUB, C::PERMISSION_DENIED, kOut},
      {"org/bloblink", pb::HUB, C::PERMISSION_DENIED, "is a link to"},
      // Not traversal, but refused all the same: nothing is downloaded, unknown names.
      {"org/lora", pb::HUB, C::FAILED_PRECONDITION, "phishard does not download adapters"},
      {"org/lora", pb::PBASE, C::FAILED_PRECONDITION, "not in the local cache"},
      {"nowhere", pb::LOCAL, C::NOT_FOUND, kMissing},
  };
  ASSERT_GE(cases.size(), 20u);
  for (const Refusal& c : cases) ExpectRefused(*rpc_, c, 40);
  // A merge whose second id escapes is refused as a whole.
  pb::DownloadAdapterResponse d;
  grpc::Status s =
      rpc_->Download(AdapterRpc::Params({"prose", "../outside/prose"}, {0.5f, 0.5f}), &d);
  EXPECT_EQ(s.error_code(), C::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find(kClimb), std::string::npos) << s.error_message();
  // Nothing was loaded under the index every refusal used.
  rpc_->MustOffload("prose", 40, false);
  std::printf("%zu path-traversal cases refused (DownloadAdapter and LoadAdapter each)\n",
              cases.size());
  ExpectStillServing(41);
}

TEST_F(ServeAdapters, MalformedAdaptersAreRejectedAndTheShardKeepsServing) {
  const std::vector<Refusal> cases = {
      {"no_config", pb::LOCAL, grpc::StatusCode::NOT_FOUND, "No valid adapter config file found"},
      {"empty_dir", pb::LOCAL, grpc::StatusCode::NOT_FOUND, "No valid adapter config file found"},
      {"bad_json", pb::LOCAL, grpc::StatusCode::INVALID_ARGUMENT, "adapter 'bad_json'"},
      {"dora", pb::LOCAL, grpc::StatusCode::UNIMPLEMENTED, "DoRA"},
      {"wrong_rank", pb::LOCAL, grpc::StatusCode::INVALID_ARGUMENT, "adapter 'wrong_rank'"},
      {"pickle_only", pb::LOCAL, grpc::StatusCode::INVALID_ARGUMENT, "adapter_model.bin"},
      {"truncated", pb::LOCAL, grpc::StatusCode::INVALID_ARGUMENT, "adapter 'truncated'"},
      {"medusa", pb::LOCAL, grpc::StatusCode::UNIMPLEMENTED, "Medusa"},
      {"not_lora", pb::LOCAL, grpc::StatusCode::UNIMPLEMENTED, "peft_type = \"IA3\""},
  };
  for (const Refusal& c : cases) ExpectRefused(*rpc_, c, 50);
  // Bad parameters.
  pb::DownloadAdapterResponse d;
  grpc::Status s = rpc_->Download(AdapterRpc::Params({"prose", "lora-r4-qv-fc2"}, {1.0f}), &d);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("adapter_parameters.weights"), std::string::npos);
  bool loaded = true;
  s = rpc_->Load(AdapterRpc::Params({"prose", "lora-r4-qv-fc2"}, {}, pb::TIES), 51, &loaded);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << s.error_message();
  s = rpc_->Load(AdapterRpc::Params({"prose"}), 0, &loaded);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  ExpectStillServing(52);
  // Nothing half-loaded stayed behind under the refused indices.
  rpc_->MustOffload("x", 50, false);
  rpc_->MustOffload("x", 51, false);
  // And a good adapter still loads after all that.
  rpc_->MustLoad("prose", 53);
  rpc_->MustOffload("prose", 53, true);
}

// --adapter-id (index 0) and --preloaded-adapter-ids (indices 1..n) at startup (spec §7.11).
TEST(ServeAdaptersStartup, StaticAndPreloadedAdaptersAreServedFromTheStart) {
  TempDir dir;
  const std::string root = dir.path() + "/adapters";
  BuildAdapterRoot(root, dir.path() + "/outside");
  DemoShard shard(
      dir,
      {"--adapter-source", "local", "--adapter-id", "prose", "--preloaded-adapter-ids",
       "lora-r4-qv-fc2", "--preloaded-adapter-ids", "lora-r16-rslora-all", "--adapter-memory-bytes",
       std::to_string(kDeviceMemory)},
      HermeticEnv(dir, {{"ADAPTER_MEMORY_FRACTION", "0"}, {"PHISHARD_ADAPTER_ROOT", root}}));
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  absl::StatusOr<std::unique_ptr<RouterSession>> s = RouterSession::Connect(UdsTarget(shard.uds));
  ASSERT_TRUE(s.ok()) << s.status();
  RouterSession& session = **s;
  absl::StatusOr<pb::InfoResponse> info = session.Info();
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_EQ(info->preloaded_adapters_size(), 2);
  for (int i = 0; i < 2; ++i) {
    const pb::PreloadedAdapter& p = info->preloaded_adapters(i);
    ASSERT_EQ(p.adapter_parameters().adapter_ids_size(), 1);
    EXPECT_EQ(p.adapter_parameters().adapter_ids(0), kAdapters[i + 1]);
    EXPECT_EQ(p.adapter_source(), pb::LOCAL);
    EXPECT_EQ(p.adapter_index(), static_cast<uint32_t>(i + 1));
  }
  ASSERT_TRUE(session.Warmup(RouterWarmupRequest(1023, 1073, 1024)).ok());
  AdapterRpc rpc(&session.shard(0));
  pb::DownloadAdapterResponse d;
  ASSERT_TRUE(rpc.Download(AdapterRpc::Params({"lora-r4-qv-fc2"}), &d).ok());
  EXPECT_TRUE(d.downloaded());
  EXPECT_FLOAT_EQ(d.memory_fraction(),
                  static_cast<float>(static_cast<double>(AdapterBytes(root + "/lora-r4-qv-fc2")) /
                                     kDeviceMemory));
  rpc.MustLoad("lora-r4-qv-fc2", 1);  // already loaded: true
  bool loaded = true;
  const grpc::Status dyn = rpc.Load(AdapterRpc::Params({"prose"}), 3, &loaded);
  EXPECT_EQ(dyn.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(dyn.error_message().find("does not support dynamic adapter loading"), std::string::npos)
      << dyn.error_message();
  rpc.MustOffload("lora-r4-qv-fc2", 1, false);
  rpc.MustOffload("__base_model__", 0, false);
  // Index 0 (no adapter) runs the static adapter; 1 and 2 the preloaded ones; 9 the base model.
  const Golden& p0 = AdapterCase("prose", "The ");
  const Golden& p1 = AdapterCase("lora-r4-qv-fc2", "The ");
  const Golden& p2 = AdapterCase("lora-r16-rslora-all", "The ");
  const Golden& base = BaseGolden("The ");
  RunAndCheck(
      session, 1,
      {{Req(1, p0, 0), &p0}, {Req(2, p1, 1), &p1}, {Req(3, p2, 2), &p2}, {Req(4, base, 9), &base}});
  shard.process->Signal(SIGTERM);
  EXPECT_EQ(shard.process->Wait(30), 0) << shard.process->Logs();
}

TEST(ServeAdaptersStartup, BadAdapterFlagsAreRefusedBeforeBinding) {
  struct Case {
    std::vector<std::string> args;
    std::map<std::string, std::string> env;
    std::string stderr_contains;
  };
  const std::vector<Case> cases = {
      {{"--adapter-id", "../prose", "--adapter-source", "local"}, {}, "--adapter-id: "},
      {{"--preloaded-adapter-ids", "org/none"}, {}, "not in the local cache"},
      {{"--adapter-root", "/no/such/root"}, {}, "--adapter-root '/no/such/root'"},
      {{"--merge-adapter-weights"}, {}, "--merge-adapter-weights requires --adapter-id"},
      {{"--adapter-source", "ftp"}, {}, "--adapter-source 'ftp'"},
      {{}, {{"ADAPTER_MEMORY_FRACTION", "2"}}, "ADAPTER_MEMORY_FRACTION"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.stderr_contains);
    TempDir dir;
    const std::vector<std::string> args =
        integration::ServeArgs(integration::DemoModel(), dir / "s", c.args);
    ShardProcess p(integration::BinaryPath(), args, dir.path(), HermeticEnv(dir, c.env));
    const int code = p.Wait(60);
    EXPECT_NE(code, 0) << p.Logs();
    EXPECT_NE(code, -1) << "still running";
    EXPECT_NE(p.err().find(c.stderr_contains), std::string::npos) << p.Logs();
    EXPECT_FALSE(fs::exists(dir / "s-0")) << "a refused shard must not create its socket";
  }
}

}  // namespace
}  // namespace phishard
