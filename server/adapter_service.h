// AdapterService: the shard's side of LoRAX's adapter lifecycle (spec §2.3, §3.7, §7.10-7.12) on
// top of AdapterStore (where adapters live on disk), LoraAdapter (strict PEFT loading) and
// AdapterRegistry (adapters by router index, slots and a byte budget; the model backend applies
// them per sequence).
//
//   Download(spec)        rank 0, off the executor: resolve every id, validate the PEFT directory
//                         completely (a full LoraAdapter::LoadDir against the model's config),
//                         memory_fraction = adapter bytes / adapter budget.
//   Load(spec, index)     executor: no-op (true) when the index is loaded; else check the budget
//                         from the safetensors headers *before* reading any weight, load, merge
//                         (LINEAR), shard for tensor parallelism, place under the index.
//   Offload(spec, index)  executor: remove; false when not loaded or preloaded.
// `__base_model__` (router index 0 without a static adapter) always succeeds with false / 0.
//
// Memory budget (spec §7.10): budget = ADAPTER_MEMORY_FRACTION x device memory (total GPU memory
// on CUDA; on CPU MemAvailable at startup, or --adapter-memory-bytes). Adapters are charged their
// A and B matrices in the backend's compute dtype (4 bytes on CPU, 2 for bf16/fp16). A load that
// would exceed the budget or the slots is RESOURCE_EXHAUSTED before anything is allocated.
//
// Static and preloaded adapters (spec §7.11), loaded by Create before the socket exists:
//   --adapter-id X            X at index 0 (requests without adapter use it), never offloaded;
//                             its bytes are added to the budget (it is part of the model).
//   --merge-adapter-weights   the same, and dynamic loading is disabled (upstream merges X into
//                             the base weights; applying it unmerged is the same function).
//   --preloaded-adapter-ids   A1..An at indices 1..n, reported in Info; dynamic loading disabled;
//                             memory_fraction = bytes / device memory; they must fit that memory.
//
// A backend that cannot apply adapters (SetAdapterRegistry is UNIMPLEMENTED) leaves the service
// disabled: base-model calls still succeed, any real adapter is FAILED_PRECONDITION naming the
// reason, and static / preloaded adapters make Create fail. After every Load and Offload the
// service calls SetAdapterRegistry again, so a device backend places or frees its copy at once (a
// copy that does not fit undoes the load: RESOURCE_EXHAUSTED).
//
// Error codes (the gRPC status equals the absl code): INVALID_ARGUMENT for a malformed request or
// adapter (named field / file), NOT_FOUND for a missing adapter, PERMISSION_DENIED for a path
// outside the adapter roots, FAILED_PRECONDITION for an uncached hub adapter or when dynamic
// loading is off, RESOURCE_EXHAUSTED for the budget, UNIMPLEMENTED for TIES/DARE merges, DoRA,
// Medusa... Every message names the adapter.
//
// Threads: Download and the accessors are const and touch no registry state (safe on gRPC
// threads); Load and Offload must run on the executor thread, which also runs Forward.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/adapter_registry.h"
#include "model/model_backend.h"
#include "proto/generate.pb.h"
#include "server/adapter_store.h"

namespace phishard {

inline constexpr char kBaseModelAdapterId[] = "__base_model__";

// generate.v1.AdapterParameters + AdapterSource as plain values.
struct AdapterSpec {
  std::vector<std::string> ids;
  std::vector<float> weights;  // empty = 1.0 each; else one per id
  MergeStrategy merge_strategy = MergeStrategy::kLinear;
  AdapterSourceKind source = AdapterSourceKind::kHub;

  bool is_base_model() const { return ids.size() == 1 && ids[0] == kBaseModelAdapterId; }
  std::string Name() const;  // ids joined by "+"
};

// INVALID_ARGUMENT naming the field: no ids, an empty id, weights of the wrong length or not
// finite, an unknown merge_strategy or adapter_source value.
absl::StatusOr<AdapterSpec> AdapterSpecFromProto(const generate::v1::AdapterParameters& params,
                                                 int adapter_source);

struct AdapterServiceOptions {
  AdapterStoreOptions store;
  double memory_fraction = 0.1;     // ADAPTER_MEMORY_FRACTION
  int64_t device_memory_bytes = 0;  // what the fraction applies to (see DeviceMemoryBytes)
  int num_slots = 1024;             // dynamic adapters resident at once
  // Startup adapters (spec §7.11).
  std::string static_adapter_id;  // "" or __base_model__ = none
  AdapterSourceKind static_source = AdapterSourceKind::kHub;
  bool merge_static = false;
  std::vector<std::string> preloaded_ids;
  AdapterSourceKind preloaded_source = AdapterSourceKind::kHub;
};

// Device memory for the adapter budget: `override_bytes` when > 0; else total GPU memory for
// device "cuda", MemAvailable (/proc/meminfo) for "cpu". INTERNAL when it cannot be read.
absl::StatusOr<int64_t> DeviceMemoryBytes(const std::string& device_type, int64_t override_bytes);

struct PreloadedAdapterInfo {
  std::string id;
  AdapterSourceKind source;
  uint32_t index;
  float memory_fraction;  // bytes / device memory
};

struct DownloadResult {
  bool downloaded = false;
  float memory_fraction = 0.0f;
};

class AdapterService {
 public:
  // Builds the store and the registry, loads static / preloaded adapters and hands the registry
  // to `model` (which must outlive the service). Errors name the flag or adapter.
  static absl::StatusOr<std::unique_ptr<AdapterService>> Create(ModelBackend* model,
                                                                AdapterServiceOptions options);
  ~AdapterService();

  absl::StatusOr<DownloadResult> Download(const AdapterSpec& spec) const;
  absl::StatusOr<bool> Load(const AdapterSpec& spec, uint32_t index);
  absl::StatusOr<bool> Offload(const AdapterSpec& spec, uint32_t index);

  // Info.preloaded_adapters, indices 1..n in flag order.
  const std::vector<PreloadedAdapterInfo>& preloaded() const { return preloaded_; }
  bool enabled() const { return disabled_reason_.empty(); }
  bool dynamic_loading() const { return dynamic_; }
  int64_t budget_bytes() const { return reservation_bytes_; }  // dynamic adapters' reservation
  const AdapterStore& store() const { return store_; }
  const AdapterRegistry* registry() const { return registry_.get(); }

 private:
  AdapterService(ModelBackend* model, AdapterStore store, AdapterServiceOptions options);

  // Header-only size of an adapter directory: Σ elements of its safetensors tensors x
  // bytes_per_param_ (what the registry will charge for it, read without loading a weight).
  absl::StatusOr<int64_t> EstimateBytes(const std::string& id,
                                        const std::filesystem::path& dir) const;
  // EstimateBytes summed over the ids of `spec` that end up in the adapter.
  absl::StatusOr<int64_t> EstimateSpecBytes(const AdapterSpec& spec) const;
  // Resolves and fully loads every id of `spec` (errors prefixed with the adapter id), merges
  // them when there are several, and keeps this rank's shard.
  absl::StatusOr<LoraAdapter> Materialize(const AdapterSpec& spec) const;
  // This rank's part of `full` (ModelBackend::ShardAdapter; `full` itself at world size 1).
  absl::StatusOr<LoraAdapter> ForThisRank(const AdapterSpec& spec, LoraAdapter full) const;
  absl::Status LoadStartupAdapters();

  ModelBackend* model_;
  AdapterStore store_;
  AdapterServiceOptions options_;
  int bytes_per_param_ = 4;
  int64_t reservation_bytes_ = 0;
  bool dynamic_ = true;
  std::string disabled_reason_;  // "" while the backend applies adapters
  std::vector<PreloadedAdapterInfo> preloaded_;
  std::unique_ptr<AdapterRegistry> registry_;
};

}  // namespace phishard
