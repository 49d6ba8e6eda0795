// CudaPhiModel's multi-LoRA glue: the registry, the per-step plan, and the device memory the KV
// sizing leaves for adapters. The math and the launches are in model/cuda_lora.cc; the layer loop
// (model/cuda_phi_step.cc) calls its hooks.
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>

#include "model/adapter_registry.h"
#include "model/cuda_graph_runner.h"
#include "model/cuda_lora.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"

namespace phishard {

absl::Status CudaPhiModel::SetAdapterRegistry(const AdapterRegistry* registry) {
  DeviceSet(device_);
  absl::Status st = lora_->SetRegistry(registry, stream_);
  if (lora_->TakeGraphsStale()) lora_graphs_->Clear();
  return st;
}

int64_t CudaPhiModel::adapter_device_bytes() const { return lora_->adapter_device_bytes(); }

int CudaPhiModel::num_lora_decode_graphs() const { return lora_graphs_->num_graphs(); }
int64_t CudaPhiModel::lora_decode_graph_replays() const { return lora_graphs_->replays(); }
int64_t CudaPhiModel::lora_decode_graph_captures() const { return lora_graphs_->captures(); }
int64_t CudaPhiModel::lora_beside_decode_steps() const { return lora_->beside_steps(); }

absl::Status CudaPhiModel::set_lora_decode_tuning(const std::string& spec) {
  DeviceSet(device_);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "synchronize"));
  PHI_RETURN_IF_ERROR(lora_->SetDecodeTuning(spec));
  lora_graphs_->Clear();  // they bake in the old layout and grids
  return absl::OkStatus();
}

std::string CudaPhiModel::lora_decode_tuning() const { return lora_->DecodeTuning(); }

absl::Status CudaPhiModel::set_lora_prefill_tuning(const std::string& spec) {
  DeviceSet(device_);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "synchronize"));
  return lora_->SetPrefillTuning(spec);
}

std::string CudaPhiModel::lora_prefill_tuning() const { return lora_->PrefillTuning(); }
int64_t CudaPhiModel::lora_qkv_first_layers() const { return lora_->qkv_first_layers(); }
int64_t CudaPhiModel::lora_prefetched_layers() const { return lora_->prefetched_layers(); }
int64_t CudaPhiModel::lora_qkv_merged_layers() const { return lora_->qkv_merged_layers(); }
int64_t CudaPhiModel::lora_fc1_kernel_layers() const { return lora_->fc1_kernel_layers(); }

absl::Status CudaPhiModel::PlanLora(const ForwardBatch& batch, bool decode, int rows) {
  absl::StatusOr<bool> planned = lora_->Plan(batch, decode, rows, stream_);
  if (lora_->TakeGraphsStale()) lora_graphs_->Clear();
  return planned.status();
}

// With a registry: the part of its budget not yet on the device (the router may load adapters up
// to it after warmup; each copy is 256-byte aligned per matrix and rounded by cudaMalloc, hence
// 64 MiB of slack), the step workspace for `tokens` rows at rank 128, and room for the LoRA
// decode graphs.
double CudaPhiModel::LoraReserveBytes(int tokens) const {
  const AdapterRegistry* r = lora_->registry();
  if (r == nullptr) return 0.0;
  const double unplaced =
      std::max<double>(0.0, static_cast<double>(r->budget_bytes() - r->used_bytes())) +
      static_cast<double>(64 << 20);
  const double graphs =
      use_graphs_
          ? static_cast<double>(lora_graphs_->buckets().size() - lora_graphs_->num_graphs()) *
                static_cast<double>(kDecodeGraphBytes)
          : 0.0;
  return unplaced + static_cast<double>(lora_->WorkspaceBytes(tokens, 128)) + graphs;
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
