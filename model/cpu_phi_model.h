// CpuPhiModel: the float32 CPU reference backend of PhiForCausalLM. Weights are converted to
// float32 at load (bf16/fp16 checkpoints compute exactly as HF does in float32 from the same
// values); GEMMs go through OpenBLAS, everything else through the kernels/ CPU ops.
// The KV cache is host memory: per layer K and V of [num_blocks, nKV, block_size, head_dim] float
// (kernels/kv_layout.h).
// Multi-LoRA: with an AdapterRegistry set, each sequence's adapter is applied as segmented
// shrink/expand (kernels/sgmv.h) on top of the base projections; base sequences cost nothing.
//
// Tensor parallelism (spec §6.8-6.9), with a host Communicator of world size W > 1: the rank
// holds the PhiShard slices of phi_weights.h (its heads, KV heads, intermediate units, vocab
// rows) and per step runs
//   embedding   local vocab rows, zero rows for other ids, all-reduce [T, H]
//   per layer   attention on the local heads, MLP on the local units; the partial outputs of
//               dense and fc2 (biases on rank 0 only, row-parallel LoRA deltas included) are
//               summed locally, then ONE all-reduce [T, H], then added to the residual
//   lm_head     vocab-parallel rows + all-gather of the logits when W divides V, else replicated
// so every rank returns the full [R, V] logits. They are bit-identical on all ranks: the
// all-reduce result is (Gloo's ring all-reduce computes each chunk's sum on one rank and copies
// it to the others; tests/model/tp_model_test.cc checks it), and everything after it is the same
// deterministic computation on the same inputs.
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
#include "parallel/communicator.h"

namespace phishard {

// How one CPU rank takes part in tensor parallelism.
struct CpuParallel {
  // Host-memory communicator of the group (not owned; must outlive the model). nullptr, or one of
  // world size 1, runs unsharded.
  Communicator* comm = nullptr;
  // Ranks of the group on this host: they share its memory, so MaxKvBlocks budgets
  // fraction x MemAvailable / ranks_on_host each.
  int ranks_on_host = 1;
};

class CpuPhiModel final : public ModelBackend {
 public:
  // Reads DIR/config.json and the safetensors weights of DIR (only this rank's slices).
  static absl::StatusOr<std::unique_ptr<CpuPhiModel>> Load(const std::filesystem::path& model_dir,
                                                           CpuParallel parallel = {});
  // INVALID_ARGUMENT when the config cannot be split over the communicator's world size
  // (MakePhiShard) or the communicator works on device memory.
  static absl::StatusOr<std::unique_ptr<CpuPhiModel>> Create(const PhiConfig& config,
                                                             const WeightStore& store,
                                                             CpuParallel parallel = {});

  const PhiConfig& config() const override { return config_; }
  std::string device_type() const override { return "cpu"; }
  std::string dtype_name() const override { return "torch.float32"; }

  // min(memory_fraction x MemAvailable - step workspace, kMaxKvCacheBytes) / bytes per block, for
  // blocks of kKvBlockSize tokens. RESOURCE_EXHAUSTED when not even one block fits.
  absl::StatusOr<int> MaxKvBlocks(double memory_fraction, int max_batch_tokens) const override;
  absl::Status CheckSameOnEveryRank(absl::Span<const RankSetting> settings) const override;
  absl::Status AllocateKvCache(int num_blocks, int block_size) override;
  int kv_num_blocks() const override { return kv_num_blocks_; }
  int kv_block_size() const { return kv_block_size_; }

  absl::Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  absl::Status Ping() override { return absl::OkStatus(); }
  absl::Status SetAdapterRegistry(const AdapterRegistry* registry) override;
  int tp_rank() const override { return shard_.rank; }
  int tp_world_size() const override { return shard_.world_size; }
  absl::StatusOr<LoraAdapter> ShardAdapter(LoraAdapter full) const override;
  const PhiShard& shard() const { return shard_; }

  // The CPU backend is a reference, not a server for long contexts on big hosts: the KV pool is
  // capped at 4 GiB whatever the fraction of host memory would allow.
  static constexpr int64_t kMaxKvCacheBytes = int64_t{4} << 30;
  // Bytes of K+V for one token position across all layers (this rank's KV heads).
  int64_t KvBytesPerToken() const;
  // Host scratch of one Forward over `num_tokens` tokens with all of them returning logits.
  int64_t WorkspaceBytes(int num_tokens) const;

 private:
  CpuPhiModel(PhiConfig config, PhiShard shard, CpuParallel parallel, PhiWeightsF32 weights);
  absl::Status ValidateBatch(const ForwardBatch& batch) const;
  // h [T, H] = embedding rows of `ids` (vocab-parallel: local rows, then all-reduce).
  absl::Status Embed(const ForwardBatch& batch, float* h);
  // logits [R, V] from the normed last rows [R, H] (vocab-parallel: local rows, all-gather).
  absl::Status LmHead(const float* last, int rows, std::vector<float>* logits);
  // This rank's MaxKvBlocks before the ranks agree on the minimum.
  absl::StatusOr<int> LocalMaxKvBlocks(double memory_fraction, int max_batch_tokens) const;
  // A collective that failed leaves the group unusable: INTERNAL naming the step.
  absl::Status Collective(absl::Status st, const char* what) const;

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

  PhiConfig config_;  // the whole model's shapes (what config() reports)
  PhiShard shard_;    // this rank's slices
  PhiConfig local_;   // LocalPhiConfig(config_, shard_): the shapes this rank computes with
  CpuParallel parallel_;
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
    std::vector<float> h;        // [T, H] residual stream
    std::vector<float> normed;   // [T, H] layer-norm output feeding attention and MLP
    std::vector<float> qkv;      // [T, (nH + 2 nKV) hd] (local heads)
    std::vector<float> attn;     // [T, nH hd]
    std::vector<float> mlp;      // [T, I] (local units)
    std::vector<float> partial;  // [T, H] dense + fc2 partial sums before the all-reduce (W > 1)
    std::vector<float> last;     // [R, H] hidden rows that return logits
    std::vector<float> local_logits;  // [R, V / W] vocab-parallel lm_head output (W > 1)
    std::vector<float> gathered;      // [W, R, V / W] all-gathered local logits
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
