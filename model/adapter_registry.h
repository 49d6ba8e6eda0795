// AdapterRegistry: the LoRA adapters a shard currently serves, keyed by the router's
// adapter_index (uint32; spec §3.7: indices are never reused within a router lifetime, index 0 is
// the base model unless a static adapter is loaded there). A fixed number of slots (the most
// adapters active at once) and a byte budget: every adapter is charged the bytes of its A and B
// matrices in the backend's compute dtype, and a load that would exceed the budget or the slots is
// RESOURCE_EXHAUSTED before anything is allocated, so loading never runs the device out of memory.
//
// Maps onto the adapter RPCs (spec §2.3) like this, `__base_model__` being handled by the caller:
//   LoadAdapter    -> IsLoaded(index) ? loaded = true (no reload, even if the parameters differ)
//                                     : LoraAdapter::LoadDir (+ MergeAdapters) then Load(index, ..)
//   OffloadAdapter -> offloaded = Offload(index)   (false when not loaded or preloaded)
// and ModelBackend::SetAdapterRegistry lets Forward find each sequence's adapter with Find().
//
// Thread-safety: none. The registry is owned and used by the server's single executor thread,
// the same thread that runs ModelBackend::Forward (which reads it through Find), so a Load or
// Offload can never overlap a step that reads the adapters. A pointer from Find stays valid until
// that index is offloaded or the registry is destroyed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/lora_adapter.h"
#include "model/phi_config.h"

namespace phishard {

enum class AdapterLoadResult {
  kLoaded,         // the adapter now occupies a slot under the index
  kAlreadyLoaded,  // the index was loaded already; nothing changed (the new adapter is dropped)
};

class AdapterRegistry {
 public:
  // `num_slots` >= 1 adapters at once; `budget_bytes` for all of them; each adapter parameter
  // costs `bytes_per_param` (4 for the float32 CPU backend, 2 for bf16/fp16 on CUDA).
  static absl::StatusOr<std::unique_ptr<AdapterRegistry>> Create(int num_slots,
                                                                 int64_t budget_bytes,
                                                                 int bytes_per_param);

  // Places `adapter` under `index`. kAlreadyLoaded (a no-op) when the index is loaded already.
  // RESOURCE_EXHAUSTED naming the sizes when every slot is taken or the bytes would exceed the
  // budget; INVALID_ARGUMENT for an adapter with no module. A `preloaded` adapter is never
  // offloaded (spec §7.11: Offload answers false for it).
  absl::StatusOr<AdapterLoadResult> Load(uint32_t index, LoraAdapter adapter,
                                         bool preloaded = false);
  // Removes the adapter under `index` and frees its slot and bytes. False when the index is not
  // loaded or holds a preloaded adapter.
  bool Offload(uint32_t index);

  bool IsLoaded(uint32_t index) const { return entries_.contains(index); }
  // The adapter under `index`, or nullptr (then Forward computes the base model for it).
  const LoraAdapter* Find(uint32_t index) const;
  // The slot in [0, num_slots) holding `index`, or -1. A device backend keeps one weight slot per
  // registry slot and re-uploads a slot when `generation()` changed since it last looked.
  int SlotOf(uint32_t index) const;
  // The adapter in `slot` (nullptr when free) and, in *serial, the generation at which it was put
  // there: a device copy made for (adapter, serial) is current while both still match (a pointer
  // alone could be reused by a later adapter in the same slot).
  const LoraAdapter* SlotAdapter(int slot, uint64_t* serial = nullptr) const;
  uint64_t generation() const { return generation_; }

  // Bytes `adapter` is charged.
  int64_t BytesOf(const LoraAdapter& adapter) const;
  // OK when one more adapter of `bytes` fits (a free slot and the budget), else the
  // RESOURCE_EXHAUSTED that Load would return. Lets a caller refuse before reading weights.
  absl::Status CheckFits(int64_t bytes) const;
  int64_t used_bytes() const { return used_bytes_; }
  int64_t budget_bytes() const { return budget_bytes_; }
  int num_slots() const { return static_cast<int>(slots_.size()); }
  int num_loaded() const { return static_cast<int>(entries_.size()); }

 private:
  AdapterRegistry(int num_slots, int64_t budget_bytes, int bytes_per_param);

  struct Entry {
    std::unique_ptr<const LoraAdapter> adapter;
    int64_t bytes = 0;
    int slot = -1;
    bool preloaded = false;
  };
  int64_t budget_bytes_;
  int bytes_per_param_;
  int64_t used_bytes_ = 0;
  uint64_t generation_ = 0;
  absl::flat_hash_map<uint32_t, Entry> entries_;
  std::vector<bool> slots_;  // slots_[s]: slot s is taken
  struct SlotInfo {
    const LoraAdapter* adapter = nullptr;
    uint64_t serial = 0;
  };
  std::vector<SlotInfo> slot_info_;  // parallel to slots_
};

// ---- Merged adapters (spec §7.12: adapter_ids with more than one id) ----------------------------

enum class MergeStrategy { kLinear = 0, kTies = 1, kDareLinear = 2, kDareTies = 3 };

struct WeightedAdapter {
  const LoraAdapter* adapter = nullptr;
  float weight = 1.0f;
};

// Merges adapters into one. kLinear computes the weighted sum of the adapters' updates exactly:
//   ΔW = Σ_i w_i · scale_i · B_i A_i
// per module, represented without loss as one LoRA pair of rank Σ r_i (over the adapters that
// have the module) by stacking: A = [A_1; A_2; ...] (rows), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
// (columns), scale 1. Adapters may have different ranks and targets. Upstream LoRAX instead sums
// the A's and the B's separately (Σ w_i A_i, Σ w_i B_i), which adds cross terms B_i A_j and is not
// the linear combination of the adapters (a bug, not reproduced). The other strategies are
// UNIMPLEMENTED; an empty list, a null adapter or a non-finite weight is INVALID_ARGUMENT.
// `name` names the result.
absl::StatusOr<LoraAdapter> MergeAdapters(const PhiConfig& base,
                                          absl::Span<const WeightedAdapter> adapters,
                                          MergeStrategy strategy, std::string name);

}  // namespace phishard
