// ModelBackend: one rank's Phi model on one device (CPU float32 reference, or CUDA). The server
// talks to this interface only, so everything above it is backend-agnostic.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/greedy_pick.h"
#include "model/forward_batch.h"
#include "model/lora_adapter.h"
#include "model/phi_config.h"
#include "model/rank_settings.h"

namespace phishard {

class AdapterRegistry;

class ModelBackend {
 public:
  virtual ~ModelBackend() = default;

  virtual const PhiConfig& config() const = 0;
  virtual std::string device_type() const = 0;  // "cpu" or "cuda"
  virtual std::string dtype_name() const = 0;   // torch form: "torch.float32", "torch.bfloat16"…

  // Number of KV blocks that fit in `memory_fraction` of the memory left after weights
  // (and workspace for a step of `max_batch_tokens` tokens).
  virtual absl::StatusOr<int> MaxKvBlocks(double memory_fraction, int max_batch_tokens) const = 0;
  // Collective in a tensor-parallel group (every rank calls it at the same point of Warmup, with
  // the same settings in the same order): OK when every rank passed the same values, else
  // FAILED_PRECONDITION on every rank naming the setting and each rank's value
  // (CheckRankSettingsAgree). OK without a group.
  virtual absl::Status CheckSameOnEveryRank(absl::Span<const RankSetting> settings) const {
    (void)settings;
    return absl::OkStatus();
  }
  // (Re)allocates the KV pool: per layer K and V of [num_blocks, nKV, block_size, head_dim]
  // (kernels/kv_layout.h).
  virtual absl::Status AllocateKvCache(int num_blocks, int block_size) = 0;
  virtual int kv_num_blocks() const = 0;

  // Runs one step: writes K/V of every new token into its slot
  // (block_table[pos / block_size] * block_size + pos % block_size), and returns float32 logits
  // [batch.logit_rows.size(), vocab_size] (host, row-major) for the requested rows.
  virtual absl::Status Forward(const ForwardBatch& batch, std::vector<float>* logits) = 0;

  // The same step, with the logits left where the backend put them: on success `*logits` views
  // the float32 [batch.logit_rows.size(), vocab_size] host rows Forward would have returned (same
  // values), valid until the next Forward / ForwardView / AllocateKvCache on this backend. The
  // CUDA backend hands out its pinned download buffer (a batch-256 decode step saves a 52 MB host
  // copy); this default runs Forward into a vector the base class keeps.
  virtual absl::Status ForwardView(const ForwardBatch& batch, absl::Span<const float>* logits) {
    *logits = {};
    absl::Status s = Forward(batch, &view_logits_);
    if (s.ok()) *logits = absl::MakeConstSpan(view_logits_);
    return s;
  }

  // ForwardView, plus the greedy choice of the rows `batch.greedy_rows` marks: `*picks` views
  // [batch.logit_rows.size()] pairs, and for a marked row r, (*picks)[r] is the id and logprob of
  // GreedyPickCpu (kernels/greedy_pick.h: first index of the max, log_softmax in double) on the
  // row Forward would return; the GPU may compute the logprob with another summation order (a
  // float ulp or so apart). A marked row's logits in `*logits` are unspecified (the CUDA backend
  // does not download them); an unmarked row's pair is unspecified. Both views live until the
  // next step on this backend. On every rank of a TP group the pairs are the same. This default
  // runs ForwardView and computes the pairs on the host.
  virtual absl::Status ForwardGreedy(const ForwardBatch& batch, absl::Span<const float>* logits,
                                     absl::Span<const GreedyPick>* picks) {
    *picks = {};
    if (absl::Status s = ForwardView(batch, logits); !s.ok()) return s;
    return PickGreedyOnHost(batch, *logits, picks);
  }

  // Multi-LoRA: Forward applies to each sequence the adapter `registry` holds under its
  // SequenceInput::adapter_index (an index with no adapter there runs the base model). Not owned;
  // it must outlive the backend or be replaced (nullptr = no adapters, the initial state). Load and
  // Offload on the registry between steps are picked up by the next Forward. UNIMPLEMENTED from a
  // backend that cannot apply adapters.
  virtual absl::Status SetAdapterRegistry(const AdapterRegistry* registry) {
    if (registry == nullptr) return absl::OkStatus();
    return absl::UnimplementedError("the " + device_type() +
                                    " backend does not apply LoRA adapters");
  }

  // Makes decode steps of up to `max_batch` sequences ready before the first one (CUDA: captures
  // their decode graphs, so no step pays a capture). Warmup calls it once the KV pool is final;
  // it writes no KV slot. Nothing to do by default.
  virtual absl::Status PrepareDecode(int max_batch) {
    (void)max_batch;
    return absl::OkStatus();
  }

  // A cheap real round trip to the device (Health).
  virtual absl::Status Ping() = 0;

  // Tensor parallelism (spec §6.8): this backend is rank tp_rank() of tp_world_size(). Every rank
  // then calls Forward, MaxKvBlocks and AllocateKvCache in the same order with the same arguments
  // (the server's sequencer sees to it); Forward and MaxKvBlocks are collectives, and every rank
  // gets bit-identical logits and the same MaxKvBlocks, so that all ranks choose the same tokens.
  virtual int tp_rank() const { return 0; }
  virtual int tp_world_size() const { return 1; }
  // This rank's part of an adapter loaded against the full model config (spec §7.7,
  // ShardLoraAdapter); what to put in the AdapterRegistry. World size 1 returns `full` as is.
  virtual absl::StatusOr<LoraAdapter> ShardAdapter(LoraAdapter full) const { return full; }

 protected:
  // GreedyPickCpu on the marked rows of `logits` ([R, V] host) into a vector the base keeps.
  absl::Status PickGreedyOnHost(const ForwardBatch& batch, absl::Span<const float> logits,
                                absl::Span<const GreedyPick>* picks);

 private:
  std::vector<float> view_logits_;  // the default ForwardView's storage
  std::vector<GreedyPick> picks_;   // PickGreedyOnHost's storage
};

}  // namespace phishard
