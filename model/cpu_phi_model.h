// CpuPhiModel: the float32 CPU reference backend of PhiForCausalLM (world size 1). Weights are
// converted to float32 at load (bf16/fp16 checkpoints compute exactly as HF does in float32 from
// the same values); GEMMs go through OpenBLAS, everything else through the kernels/ CPU ops.
// The KV cache is host memory: per layer K and V of [num_blocks, block_size, nKV, head_dim] float.
// Multi-LoRA: with an AdapterRegistry set, each sequence's adapter is applied as segmented
// shrink/expand (kernels/sgmv.h) on top of the base projections; base sequences cost nothing.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/adapter_registry.h"
#include "model/forward_batch.h"
#include "model/lora_adapter.h"
#include "model/model_backend.h"
#include "model/phi_config.h"
#include "model/phi_weights.h"
#include "model/safetensors.h"

namespace phishard {

class CpuPhiModel final : public ModelBackend {
 public:
  // Reads DIR/config.json and the safetensors weights of DIR.
  static absl::StatusOr<std::unique_ptr<CpuPhiModel>> Load(const std::filesystem::path& model_dir);
  static absl::StatusOr<std::unique_ptr<CpuPhiModel>> Create(const PhiConfig& config,
                                                             const WeightStore& store);

  const PhiConfig& config() const override { return config_; }
  std::string device_type() const override { return "cpu"; }
  std::string dtype_name() const override { return "torch.float32"; }

  // min(memory_fraction x MemAvailable - step workspace, kMaxKvCacheBytes) / bytes per block, for
  // blocks of kKvBlockSize tokens. RESOURCE_EXHAUSTED when not even one block fits.
  absl::StatusOr<int> MaxKvBlocks(double memory_fraction, int max_batch_tokens) const override;
  absl::Status AllocateKvCache(int num_blocks, int block_size) override;
  int kv_num_blocks() const override { return kv_num_blocks_; }
  int kv_block_size() const { return kv_block_size_; }

  absl::Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  absl::Status Ping() override { return absl::OkStatus(); }
  absl::Status SetAdapterRegistry(const AdapterRegistry* registry) override;

  // The CPU backend is a reference, not a server for long contexts on big hosts: the KV pool is
  // capped at 4 GiB whatever the fraction of host memory would allow.
  static constexpr int64_t kMaxKvCacheBytes = int64_t{4} << 30;
  // Bytes of K+V for one token position across all layers.
  int64_t KvBytesPerToken() const;
  // Host scratch of one Forward over `num_tokens` tokens with all of them returning logits.
  int64_t WorkspaceBytes(int num_tokens) const;

 private:
  CpuPhiModel(PhiConfig config, PhiWeightsF32 weights);
  absl::Status ValidateBatch(const ForwardBatch& batch) const;

  // LoRA segments of one step: runs of consecutive rows whose sequences resolve to the same
  // adapter (nullptr = base model). Rows are token rows for the layers, logit rows for lm_head.
  struct LoraSegments {
    std::vector<int32_t> starts;               // [n + 1]
    std::vector<const LoraAdapter*> adapters;  // [n]
    bool any = false;                          // some segment has an adapter
  };
  // Builds the token-row and logit-row segments of `batch` from the registry.
  absl::Status PlanLora(const ForwardBatch& batch);
  // True when some segment of `segs` adapts `t` in `layer`.
  bool LoraTouches(const LoraSegments& segs, int layer, LoraTarget t) const;
  // y[rows, out] (row stride ldy) += per-segment scale · (x · Aᵀ) · Bᵀ for target `t` of `layer`.
  absl::Status ApplyLora(const LoraSegments& segs, int layer, LoraTarget t, const float* x, int ldx,
                         float* y, int ldy);

  struct FreeDeleter {
    void operator()(float* p) const { std::free(p); }
  };

  PhiConfig config_;
  PhiWeightsF32 w_;

  const AdapterRegistry* adapters_ = nullptr;  // not owned; null = base model only

  // KV pool: one calloc'd block (pages are only touched when written), layer l's K at
  // kv_ + (2 l) * layer_floats and V at kv_ + (2 l + 1) * layer_floats.
  std::unique_ptr<float, FreeDeleter> kv_;
  int64_t kv_layer_floats_ = 0;
  int kv_num_blocks_ = 0;
  int kv_block_size_ = 0;

  // Per-step scratch, grown on demand and reused (host, float32 unless noted).
  struct Step {
    std::vector<int64_t> slots;         // [T] cache slot of each new token
    std::vector<int32_t> cu_q_lens;     // [S + 1]
    std::vector<int32_t> context_lens;  // [S]
    std::vector<int32_t> block_tables;  // [S, max_blocks] (padded with block 0, never read)
    int max_blocks = 0;
    std::vector<float> h;       // [T, H] residual stream
    std::vector<float> normed;  // [T, H] layer-norm output feeding attention and MLP
    std::vector<float> qkv;     // [T, (nH + 2 nKV) hd]
    std::vector<float> attn;    // [T, nH hd]
    std::vector<float> mlp;     // [T, I]
    std::vector<float> last;    // [R, H] hidden rows that return logits
    // LoRA plan (empty `any` when the whole batch is base) and per-call kernel tables.
    LoraSegments lora_tokens, lora_rows;
    std::vector<const LoraAdapter*> lora_seq_adapters;  // [S] adapter of each sequence or null
    std::vector<const void*> lora_a, lora_b;            // [n] per segment, null = skip
    std::vector<int32_t> lora_ranks;                    // [n]
    std::vector<float> lora_scales;                     // [n]
    std::vector<float> lora_t;                          // [rows, max rank] shrink output
  } step_;
};

}  // namespace phishard
