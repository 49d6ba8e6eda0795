#include "server/adapter_service.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "model/safetensors.h"

#ifdef PHISHARD_HAVE_CUDA
#include "kernels/device.h"
#endif

namespace phishard {
namespace {

namespace fs = std::filesystem;
namespace pb = ::generate::v1;

// Upstream's text (spec §2.3 LoadAdapter step 3).
constexpr char kDynamicDisabled[] =
    "This model does not support dynamic adapter loading. Please initialize a new model instance "
    "from the base model and remove preloaded adapters to use the dynamic adapter loading "
    "feature.";

absl::Status WithPrefix(const absl::Status& s, const std::string& prefix) {
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

const char* StrategyName(MergeStrategy m) {
  switch (m) {
    case MergeStrategy::kLinear:
      return "LINEAR";
    case MergeStrategy::kTies:
      return "TIES";
    case MergeStrategy::kDareLinear:
      return "DARE_LINEAR";
    case MergeStrategy::kDareTies:
      return "DARE_TIES";
  }
  return "?";
}

// Checks shared by Download and Load for a spec that is not the base model alone.
absl::Status CheckMergeable(const AdapterSpec& spec) {
  for (size_t i = 0; i < spec.ids.size(); ++i) {
    if (spec.ids.size() > 1 && spec.ids[i] == kBaseModelAdapterId) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "adapter_parameters.adapter_ids[%d]: %s cannot be merged with other adapters", i,
          kBaseModelAdapterId));
    }
  }
  if (spec.ids.size() > 1 && spec.merge_strategy != MergeStrategy::kLinear) {
    return absl::UnimplementedError(absl::StrFormat(
        "adapter '%s': merge_strategy %s is not supported; only LINEAR adapter merges are "
        "implemented",
        spec.Name(), StrategyName(spec.merge_strategy)));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> MemAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string key;
    int64_t kib = 0;
    if (ss >> key >> kib && key == "MemAvailable:") return kib * 1024;
  }
  return absl::InternalError(
      "cannot read MemAvailable from /proc/meminfo for the adapter memory budget; pass "
      "--adapter-memory-bytes");
}

}  // namespace

std::string AdapterSpec::Name() const { return absl::StrJoin(ids, "+"); }

absl::StatusOr<AdapterSpec> AdapterSpecFromProto(const pb::AdapterParameters& p,
                                                 int adapter_source) {
  AdapterSpec spec;
  if (p.adapter_ids_size() == 0) {
    return absl::InvalidArgumentError("adapter_parameters.adapter_ids is empty");
  }
  for (int i = 0; i < p.adapter_ids_size(); ++i) {
    if (p.adapter_ids(i).empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("adapter_parameters.adapter_ids[%d] is empty", i));
    }
    spec.ids.push_back(p.adapter_ids(i));
  }
  if (p.weights_size() != 0 && p.weights_size() != p.adapter_ids_size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("adapter_parameters.weights has %d entries for %d adapter_ids",
                        p.weights_size(), p.adapter_ids_size()));
  }
  for (int i = 0; i < p.weights_size(); ++i) {
    if (!std::isfinite(p.weights(i))) {
      return absl::InvalidArgumentError(
          absl::StrFormat("adapter_parameters.weights[%d] = %g is not finite", i, p.weights(i)));
    }
    spec.weights.push_back(p.weights(i));
  }
  const int m = static_cast<int>(p.merge_strategy());
  if (m < 0 || m > static_cast<int>(MergeStrategy::kDareTies)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "adapter_parameters.merge_strategy %d is not LINEAR, TIES, DARE_LINEAR or DARE_TIES", m));
  }
  spec.merge_strategy = static_cast<MergeStrategy>(m);
  if (adapter_source < 0 || adapter_source > static_cast<int>(AdapterSourceKind::kPbase)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("adapter_source %d is not HUB, S3, LOCAL or PBASE", adapter_source));
  }
  spec.source = static_cast<AdapterSourceKind>(adapter_source);
  return spec;
}

absl::StatusOr<int64_t> DeviceMemoryBytes(const std::string& device_type, int64_t override_bytes) {
  if (override_bytes > 0) return override_bytes;
  if (device_type == "cuda") {
#ifdef PHISHARD_HAVE_CUDA
    size_t free_bytes = 0, total_bytes = 0;
    if (const int e = DeviceMemGetInfo(&free_bytes, &total_bytes); e != 0) {
      return absl::InternalError(
          absl::StrCat("cudaMemGetInfo failed for the adapter budget: ", DeviceErrorString(e)));
    }
    return static_cast<int64_t>(total_bytes);
#else
    return absl::InternalError("device cuda, but this binary has no CUDA runtime");
#endif
  }
  return MemAvailableBytes();
}

AdapterService::AdapterService(ModelBackend* model, AdapterStore store,
                               AdapterServiceOptions options)
    : model_(model), store_(std::move(store)), options_(std::move(options)) {}

AdapterService::~AdapterService() {
  // The backend must not keep a pointer to the registry that dies with us.
  if (registry_ != nullptr) (void)model_->SetAdapterRegistry(nullptr);
}

absl::StatusOr<std::unique_ptr<AdapterService>> AdapterService::Create(ModelBackend* model,
                                                                       AdapterServiceOptions o) {
  PHI_CHECK(model != nullptr);
  if (o.num_slots < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--adapter-slots must be >= 1, got %d", o.num_slots));
  }
  if (!(o.memory_fraction >= 0.0 && o.memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("ADAPTER_MEMORY_FRACTION must be in [0, 1], got %g", o.memory_fraction));
  }
  if (o.device_memory_bytes < 0) {
    return absl::InvalidArgumentError("adapter device memory must be >= 0 bytes");
  }
  if (o.static_adapter_id == kBaseModelAdapterId) o.static_adapter_id.clear();
  if (o.merge_static && o.static_adapter_id.empty()) {
    return absl::InvalidArgumentError("--merge-adapter-weights requires --adapter-id");
  }
  absl::StatusOr<AdapterStore> store = AdapterStore::Create(o.store);
  if (!store.ok()) return store.status();
  std::unique_ptr<AdapterService> svc(new AdapterService(model, *std::move(store), std::move(o)));
  svc->bytes_per_param_ = model->dtype_name() == "torch.float32" ? 4 : 2;
  svc->reservation_bytes_ = static_cast<int64_t>(
      svc->options_.memory_fraction * static_cast<double>(svc->options_.device_memory_bytes));

  // Does the backend apply adapters at all? (An empty registry, replaced below.)
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> probe =
      AdapterRegistry::Create(1, 0, svc->bytes_per_param_);
  if (!probe.ok()) return probe.status();
  const absl::Status applies = model->SetAdapterRegistry(probe->get());
  (void)model->SetAdapterRegistry(nullptr);
  if (!applies.ok()) {
    if (applies.code() != absl::StatusCode::kUnimplemented) return applies;
    svc->disabled_reason_ = std::string(applies.message());
    if (!svc->options_.static_adapter_id.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--adapter-id ", svc->options_.static_adapter_id, ": ", svc->disabled_reason_));
    }
    if (!svc->options_.preloaded_ids.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("--preloaded-adapter-ids ",
                                                        svc->options_.preloaded_ids.front(), ": ",
                                                        svc->disabled_reason_));
    }
    PHI_LOG(INFO) << "LoRA adapters are off: " << svc->disabled_reason_;
    return svc;
  }
  if (absl::Status s = svc->LoadStartupAdapters(); !s.ok()) return s;
  PHI_LOG(INFO) << "LoRA adapters from " << svc->store_.Describe() << "; "
                << (svc->dynamic_ ? absl::StrCat("dynamic budget ", svc->reservation_bytes_,
                                                 " bytes in ", svc->options_.num_slots, " slots")
                                  : std::string("dynamic loading disabled"));
  return svc;
}

absl::Status AdapterService::LoadStartupAdapters() {
  const AdapterServiceOptions& o = options_;
  const bool has_static = !o.static_adapter_id.empty();
  std::optional<LoraAdapter> static_adapter;
  int64_t static_bytes = 0;
  if (has_static) {
    AdapterSpec spec;
    spec.ids = {o.static_adapter_id};
    spec.source = o.static_source;
    absl::StatusOr<LoraAdapter> a = Materialize(spec);
    if (!a.ok()) return WithPrefix(a.status(), "--adapter-id: ");
    static_bytes = a->num_params() * bytes_per_param_;
    static_adapter.emplace(*std::move(a));
  }
  std::vector<LoraAdapter> pre;
  std::vector<int64_t> pre_full_bytes;
  int64_t pre_bytes = 0;
  for (size_t i = 0; i < o.preloaded_ids.size(); ++i) {
    const std::string& id = o.preloaded_ids[i];
    if (id == kBaseModelAdapterId || id.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--preloaded-adapter-ids: '", id, "' is not an adapter"));
    }
    if (std::find(o.preloaded_ids.begin(), o.preloaded_ids.begin() + i, id) !=
        o.preloaded_ids.begin() + i) {
      return absl::InvalidArgumentError(
          absl::StrCat("--preloaded-adapter-ids: '", id, "' is given twice"));
    }
    absl::StatusOr<fs::path> dir = store_.Resolve(id, o.preloaded_source);
    if (!dir.ok()) return WithPrefix(dir.status(), "--preloaded-adapter-ids: ");
    absl::StatusOr<LoraAdapter> full = LoraAdapter::LoadDir(*dir, model_->config());
    if (!full.ok()) {
      return WithPrefix(full.status(),
                        absl::StrCat("--preloaded-adapter-ids: adapter '", id, "': "));
    }
    pre_full_bytes.push_back(full->num_params() * bytes_per_param_);
    AdapterSpec spec;
    spec.ids = {id};
    spec.source = o.preloaded_source;
    absl::StatusOr<LoraAdapter> mine = ForThisRank(spec, *std::move(full));
    if (!mine.ok()) return WithPrefix(mine.status(), "--preloaded-adapter-ids: ");
    pre_bytes += mine->num_params() * bytes_per_param_;
    pre.push_back(*std::move(mine));
  }
  if (!pre.empty() && static_bytes + pre_bytes > o.device_memory_bytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "--preloaded-adapter-ids: the adapters need %d bytes but the device has %d (set "
        "--adapter-memory-bytes on CPU)",
        static_bytes + pre_bytes, o.device_memory_bytes));
  }
  dynamic_ = pre.empty() && !o.merge_static;
  const int64_t budget = (dynamic_ ? reservation_bytes_ : 0) + static_bytes + pre_bytes;
  const int slots =
      (dynamic_ ? o.num_slots : 0) + (has_static ? 1 : 0) + static_cast<int>(pre.size());
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> registry =
      AdapterRegistry::Create(std::max(slots, 1), budget, bytes_per_param_);
  if (!registry.ok()) return registry.status();
  registry_ = *std::move(registry);
  if (has_static) {
    absl::StatusOr<AdapterLoadResult> r =
        registry_->Load(0, *std::move(static_adapter), /*preloaded=*/true);
    if (!r.ok()) return WithPrefix(r.status(), "--adapter-id: ");
    PHI_LOG(INFO) << "Static adapter " << o.static_adapter_id << " serves adapter index 0"
                  << (o.merge_static ? " (--merge-adapter-weights: applied unmerged; dynamic "
                                       "adapter loading disabled)"
                                     : "");
  }
  for (size_t i = 0; i < pre.size(); ++i) {
    const uint32_t index = static_cast<uint32_t>(i + 1);
    absl::StatusOr<AdapterLoadResult> r =
        registry_->Load(index, std::move(pre[i]), /*preloaded=*/true);
    if (!r.ok()) return WithPrefix(r.status(), "--preloaded-adapter-ids: ");
    const float fraction = o.device_memory_bytes > 0
                               ? static_cast<float>(static_cast<double>(pre_full_bytes[i]) /
                                                    static_cast<double>(o.device_memory_bytes))
                               : 0.0f;
    preloaded_.push_back({o.preloaded_ids[i], o.preloaded_source, index, fraction});
    PHI_LOG(INFO) << "Preloaded adapter " << o.preloaded_ids[i] << " at index " << index;
  }
  return model_->SetAdapterRegistry(registry_.get());
}

absl::StatusOr<int64_t> AdapterService::EstimateBytes(const std::string& id,
                                                      const fs::path& dir) const {
  std::vector<fs::path> files;
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".safetensors" && fs::is_regular_file(e.path(), ec)) {
      files.push_back(e.path());
    }
  }
  if (files.empty()) return 0;  // LoraAdapter::LoadDir says precisely what is missing
  absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenFiles(files);
  if (!store.ok()) return WithPrefix(store.status(), absl::StrCat("adapter '", id, "': "));
  int64_t elements = 0;
  for (const std::string& name : (*store)->Names()) {
    absl::StatusOr<const TensorView*> t = (*store)->Get(name);
    if (!t.ok()) return WithPrefix(t.status(), absl::StrCat("adapter '", id, "': "));
    elements += (*t)->numel();
  }
  return elements * bytes_per_param_;
}

absl::StatusOr<LoraAdapter> AdapterService::ForThisRank(const AdapterSpec& spec,
                                                        LoraAdapter full) const {
  absl::StatusOr<LoraAdapter> shard = model_->ShardAdapter(std::move(full));
  if (!shard.ok()) {
    return WithPrefix(shard.status(), absl::StrCat("adapter '", spec.Name(), "': "));
  }
  return shard;
}

absl::StatusOr<int64_t> AdapterService::EstimateSpecBytes(const AdapterSpec& spec) const {
  int64_t total = 0;
  for (size_t i = 0; i < spec.ids.size(); ++i) {
    absl::StatusOr<fs::path> dir = store_.Resolve(spec.ids[i], spec.source);
    if (!dir.ok()) return dir.status();
    absl::StatusOr<int64_t> bytes = EstimateBytes(spec.ids[i], *dir);
    if (!bytes.ok()) return bytes.status();
    // A merge drops adapters of weight 0 (MergeAdapters); a single id ignores its weight.
    if (spec.ids.size() == 1 || spec.weights.empty() || spec.weights[i] != 0.0f) total += *bytes;
  }
  return total;
}

absl::StatusOr<LoraAdapter> AdapterService::Materialize(const AdapterSpec& spec) const {
  struct Part {
    std::string id;
    fs::path dir;
  };
  std::vector<Part> parts;
  for (const std::string& id : spec.ids) {
    absl::StatusOr<fs::path> dir = store_.Resolve(id, spec.source);
    if (!dir.ok()) return dir.status();
    parts.push_back({id, *dir});
  }
  std::vector<LoraAdapter> loaded;
  loaded.reserve(parts.size());
  for (const Part& p : parts) {
    absl::StatusOr<LoraAdapter> a = LoraAdapter::LoadDir(p.dir, model_->config());
    if (!a.ok()) return WithPrefix(a.status(), absl::StrCat("adapter '", p.id, "': "));
    loaded.push_back(*std::move(a));
  }
  if (loaded.size() == 1) return ForThisRank(spec, std::move(loaded[0]));
  std::vector<WeightedAdapter> weighted;
  for (size_t i = 0; i < loaded.size(); ++i) {
    weighted.push_back({&loaded[i], spec.weights.empty() ? 1.0f : spec.weights[i]});
  }
  absl::StatusOr<LoraAdapter> merged =
      MergeAdapters(model_->config(), weighted, spec.merge_strategy, spec.Name());
  if (!merged.ok()) {
    return WithPrefix(merged.status(), absl::StrCat("merging adapters '", spec.Name(), "': "));
  }
  loaded.clear();
  return ForThisRank(spec, *std::move(merged));
}

absl::StatusOr<DownloadResult> AdapterService::Download(const AdapterSpec& spec) const {
  if (spec.ids.size() == 1) {
    for (const PreloadedAdapterInfo& p : preloaded_) {
      if (p.id == spec.ids[0]) return DownloadResult{true, p.memory_fraction};
    }
  }
  if (spec.is_base_model()) return DownloadResult{false, 0.0f};
  if (absl::Status s = CheckMergeable(spec); !s.ok()) return s;
  if (!enabled()) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter '", spec.Name(), "': ", disabled_reason_));
  }
  if (!dynamic_) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter '", spec.Name(), "': ", kDynamicDisabled));
  }
  if (reservation_bytes_ <= 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "adapter '", spec.Name(),
        "': Memory reserved for adapters is 0. Please set a memory reservation for adapters "
        "(ADAPTER_MEMORY_FRACTION, --adapter-memory-bytes)."));
  }
  // Sizes first, from the headers: an adapter larger than the whole reservation is refused
  // before a single weight is read.
  absl::StatusOr<int64_t> estimate = EstimateSpecBytes(spec);
  if (!estimate.ok()) return estimate.status();
  auto too_large = [&](int64_t bytes) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("Adapter %s is larger than adapter memory reservation: %d / %.1f bytes",
                        spec.ids.back(), bytes, static_cast<double>(reservation_bytes_)));
  };
  if (*estimate > reservation_bytes_) return too_large(*estimate);
  // Full validation: exactly what LoadAdapter will load (merged and sharded for this rank).
  absl::StatusOr<LoraAdapter> adapter = Materialize(spec);
  if (!adapter.ok()) return adapter.status();
  const int64_t bytes = adapter->num_params() * bytes_per_param_;
  if (bytes > reservation_bytes_) return too_large(bytes);
  return DownloadResult{true, static_cast<float>(static_cast<double>(bytes) /
                                                 static_cast<double>(reservation_bytes_))};
}

absl::StatusOr<bool> AdapterService::Load(const AdapterSpec& spec, uint32_t index) {
  if (spec.is_base_model()) return false;  // nothing to load (spec §2.3 step 1)
  if (absl::Status s = CheckMergeable(spec); !s.ok()) return s;
  if (!enabled()) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter '", spec.Name(), "': ", disabled_reason_));
  }
  if (registry_->IsLoaded(index)) return true;  // no reload, even if the parameters differ
  if (!dynamic_) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter '", spec.Name(), "': ", kDynamicDisabled));
  }
  if (index == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter '", spec.Name(),
                     "': adapter_index 0 is the base model's (requests without an "
                     "adapter); serve a static adapter there with --adapter-id"));
  }
  absl::StatusOr<int64_t> estimate = EstimateSpecBytes(spec);
  if (!estimate.ok()) return estimate.status();
  // At W > 1 the shard is smaller than the estimate: only the slots are checked here, and the
  // registry checks the shard's exact bytes.
  if (absl::Status fits = registry_->CheckFits(model_->tp_world_size() == 1 ? *estimate : 0);
      !fits.ok()) {
    return WithPrefix(
        fits, absl::StrFormat("cannot load adapter '%s' at index %d: ", spec.Name(), index));
  }
  absl::StatusOr<LoraAdapter> adapter = Materialize(spec);
  if (!adapter.ok()) return adapter.status();
  absl::StatusOr<AdapterLoadResult> r = registry_->Load(index, *std::move(adapter));
  if (!r.ok()) return r.status();
  // A device backend places its copy now (not at the next step), so a copy that does not fit
  // fails this load, and the registry forgets the adapter again.
  if (absl::Status placed = model_->SetAdapterRegistry(registry_.get()); !placed.ok()) {
    registry_->Offload(index);
    (void)model_->SetAdapterRegistry(registry_.get());
    return WithPrefix(
        placed, absl::StrFormat("cannot load adapter '%s' at index %d: ", spec.Name(), index));
  }
  return true;
}

absl::StatusOr<bool> AdapterService::Offload(const AdapterSpec& spec, uint32_t index) {
  if (spec.is_base_model() || registry_ == nullptr) return false;
  // Not loaded, or preloaded / static: false (spec §2.3 OffloadAdapter step 2).
  if (!registry_->Offload(index)) return false;
  // A device backend frees its copy now, not at the next step.
  if (absl::Status st = model_->SetAdapterRegistry(registry_.get()); !st.ok()) {
    PHI_LOG(WARNING) << "after offloading adapter index " << index << ": " << st;
  }
  return true;
}

}  // namespace phishard
