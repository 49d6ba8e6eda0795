#include "model/adapter_registry.h"

#include <cmath>
#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "common/logging.h"

namespace phishard {

AdapterRegistry::AdapterRegistry(int num_slots, int64_t budget_bytes, int bytes_per_param)
    : budget_bytes_(budget_bytes),
      bytes_per_param_(bytes_per_param),
      slots_(num_slots, false),
      slot_info_(num_slots) {}

absl::StatusOr<std::unique_ptr<AdapterRegistry>> AdapterRegistry::Create(int num_slots,
                                                                         int64_t budget_bytes,
                                                                         int bytes_per_param) {
  if (num_slots < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("adapter registry needs num_slots >= 1, got %d", num_slots));
  }
  if (budget_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("adapter memory budget must be >= 0 bytes, got %d", budget_bytes));
  }
  if (bytes_per_param != 2 && bytes_per_param != 4) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "adapter bytes_per_param must be 2 (fp16/bf16) or 4 (float32), got %d", bytes_per_param));
  }
  return std::unique_ptr<AdapterRegistry>(
      new AdapterRegistry(num_slots, budget_bytes, bytes_per_param));
}

int64_t AdapterRegistry::BytesOf(const LoraAdapter& adapter) const {
  return adapter.num_params() * bytes_per_param_;
}

absl::Status AdapterRegistry::CheckFits(int64_t bytes) const {
  if (num_loaded() >= num_slots()) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("all %d adapter slots are in use; offload an adapter first", num_slots()));
  }
  if (bytes > budget_bytes_ - used_bytes_) {
    if (budget_bytes_ == 0) {
      return absl::ResourceExhaustedError(
          "Memory reserved for adapters is 0. Please set a memory reservation for adapters.");
    }
    return absl::ResourceExhaustedError(absl::StrFormat(
        "adapter of %d bytes does not fit the adapter memory budget: %d of %d bytes in use by %d "
        "adapter(s)",
        bytes, used_bytes_, budget_bytes_, num_loaded()));
  }
  return absl::OkStatus();
}

absl::StatusOr<AdapterLoadResult> AdapterRegistry::Load(uint32_t index, LoraAdapter adapter,
                                                        bool preloaded) {
  if (IsLoaded(index)) return AdapterLoadResult::kAlreadyLoaded;
  const int64_t bytes = BytesOf(adapter);
  if (bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("adapter '%s' for index %d adapts no module", adapter.name(), index));
  }
  if (absl::Status st = CheckFits(bytes); !st.ok()) {
    return absl::ResourceExhaustedError(absl::StrFormat("cannot load adapter '%s' at index %d: %s",
                                                        adapter.name(), index, st.message()));
  }
  int slot = 0;
  while (slots_[slot]) ++slot;  // CheckFits guaranteed a free one
  slots_[slot] = true;
  Entry& e = entries_[index];
  e.adapter = std::make_unique<const LoraAdapter>(std::move(adapter));
  e.bytes = bytes;
  e.slot = slot;
  e.preloaded = preloaded;
  used_bytes_ += bytes;
  ++generation_;
  slot_info_[slot] = {e.adapter.get(), generation_};
  PHI_LOG(INFO) << "adapter index " << index << " loaded into slot " << slot << ": "
                << e.adapter->Describe() << "; " << used_bytes_ << " of " << budget_bytes_
                << " adapter bytes in use";
  return AdapterLoadResult::kLoaded;
}

bool AdapterRegistry::Offload(uint32_t index) {
  auto it = entries_.find(index);
  if (it == entries_.end() || it->second.preloaded) return false;
  used_bytes_ -= it->second.bytes;
  slots_[it->second.slot] = false;
  slot_info_[it->second.slot] = {};
  PHI_LOG(INFO) << "adapter index " << index << " offloaded from slot " << it->second.slot;
  entries_.erase(it);
  ++generation_;
  return true;
}

const LoraAdapter* AdapterRegistry::Find(uint32_t index) const {
  auto it = entries_.find(index);
  return it == entries_.end() ? nullptr : it->second.adapter.get();
}

int AdapterRegistry::SlotOf(uint32_t index) const {
  auto it = entries_.find(index);
  return it == entries_.end() ? -1 : it->second.slot;
}

const LoraAdapter* AdapterRegistry::SlotAdapter(int slot, uint64_t* serial) const {
  const SlotInfo info =
      slot >= 0 && slot < static_cast<int>(slot_info_.size()) ? slot_info_[slot] : SlotInfo{};
  if (serial != nullptr) *serial = info.serial;
  return info.adapter;
}

absl::StatusOr<LoraAdapter> MergeAdapters(const PhiConfig& base,
                                          absl::Span<const WeightedAdapter> adapters,
                                          MergeStrategy strategy, std::string name) {
  switch (strategy) {
    case MergeStrategy::kLinear:
      break;
    case MergeStrategy::kTies:
    case MergeStrategy::kDareLinear:
    case MergeStrategy::kDareTies:
      return absl::UnimplementedError(absl::StrFormat(
          "merge_strategy %d is not supported: only LINEAR (0) adapter merges are implemented",
          static_cast<int>(strategy)));
    default:
      return absl::InvalidArgumentError(
          absl::StrFormat("unknown merge_strategy %d", static_cast<int>(strategy)));
  }
  if (adapters.empty()) return absl::InvalidArgumentError("no adapters to merge");
  const int L = base.num_hidden_layers;
  for (size_t i = 0; i < adapters.size(); ++i) {
    if (adapters[i].adapter == nullptr) {
      return absl::InvalidArgumentError(absl::StrFormat("adapters[%d] is null", i));
    }
    if (!std::isfinite(adapters[i].weight)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("merge weight %g of adapter '%s' is not finite", adapters[i].weight,
                          adapters[i].adapter->name()));
    }
    if (adapters[i].adapter->num_layers() != L) {
      return absl::InvalidArgumentError(
          absl::StrFormat("adapter '%s' has %d layers but the base model has %d",
                          adapters[i].adapter->name(), adapters[i].adapter->num_layers(), L));
    }
  }
  LoraAdapter merged(std::move(name), L);
  for (LoraTarget t : kAllLoraTargets) {
    const auto [in, out] = LoraTargetDims(base, t);
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : L); ++l) {
      LoraModule m;
      for (const WeightedAdapter& wa : adapters) {
        const LoraModule& src = wa.adapter->module(l, t);
        if (src.present() && wa.weight != 0.0f) m.rank += src.rank;
      }
      if (m.rank == 0) continue;
      m.scale = 1.0f;
      m.a.reserve(static_cast<size_t>(m.rank) * in);
      m.b.assign(static_cast<size_t>(out) * m.rank, 0.0f);
      int col = 0;  // first column of this adapter's block in B [out, rank]
      for (const WeightedAdapter& wa : adapters) {
        const LoraModule& src = wa.adapter->module(l, t);
        if (!src.present() || wa.weight == 0.0f) continue;
        m.a.insert(m.a.end(), src.a.begin(), src.a.end());
        const float f = wa.weight * src.scale;
        bool finite = std::isfinite(f);
        for (int64_t j = 0; j < out; ++j) {
          for (int k = 0; k < src.rank; ++k) {
            const float v = f * src.b[j * src.rank + k];
            finite = finite && std::isfinite(v);
            m.b[j * m.rank + col + k] = v;
          }
        }
        if (!finite) {  // (finite weights, scales and tensors can still overflow float32 here)
          return absl::InvalidArgumentError(absl::StrFormat(
              "merge weight %g of adapter '%s' overflows float32 in %s: its scaled lora_B "
              "(weight x scale %g x lora_B) is not finite",
              wa.weight, wa.adapter->name(), LoraModuleName(t, l), src.scale));
        }
        col += src.rank;
      }
      if (absl::Status st = merged.SetModule(base, l, t, std::move(m)); !st.ok()) return st;
    }
  }
  if (merged.num_params() == 0) {
    return absl::InvalidArgumentError(
        "merged adapter adapts no module (every adapter is empty or has weight 0)");
  }
  return merged;
}

}  // namespace phishard
