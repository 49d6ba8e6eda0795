// BatchEngine: the shard's state that outlives an RPC — the batch cache (batch id → requests and
// their KV blocks, chooser and stopping state), the KV block allocator — and the steps that
// change it. Not thread-safe: the service calls it from one executor thread, in arrival order.
// Every method either succeeds or leaves all state exactly as it was (no leaked KV blocks, no
// half-filtered batch). Error codes: unknown batch → NOT_FOUND "Batch ID <id> not found in cache.";
// bad request field → INVALID_ARGUMENT naming the field; no KV room → RESOURCE_EXHAUSTED.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "model/model_backend.h"
#include "model/tokenizer.h"
#include "server/batch_types.h"

namespace phishard {

struct BatchEngineOptions {
  int rank = 0;
  int world_size = 1;
  double memory_fraction = 1.0;      // CUDA_MEMORY_FRACTION
  double memory_wiggle_room = 0.9;   // MEMORY_WIGGLE_ROOM
  int max_kv_blocks = 0;             // > 0 caps the pool (tests); 0 = size from memory at Warmup
  // --unrouted-kv-blocks: KV blocks Warmup keeps back from the router for requests that carry no
  // `blocks` (grpcurl, `phishard client`). Warmup reports (pool - this) x 16 tokens, so the
  // router's allocator hands out ids in [0, pool - this) only; requests without blocks get ids in
  // [pool - this, pool) and RESOURCE_EXHAUSTED when those are taken (0: always). -1: enough for
  // one request of max_position_embeddings tokens. Before any Warmup (an adopted pool) requests
  // without blocks take from the whole pool. Must be equal on every tensor-parallel rank.
  int unrouted_kv_blocks = -1;
  std::vector<int32_t> eos_token_ids;  // from generation_config/config/tokenizer
  double watermark_gamma = 0.5;        // WATERMARK_GAMMA (spec §5.3)
  double watermark_delta = 2.0;        // WATERMARK_DELTA
  // Host threads choosing the next tokens of a step's rows (server/parallel_choose.h); the
  // choices do not depend on it. <= 0: the hardware concurrency, at most 16.
  int chooser_threads = 0;
  // Rows of plain-greedy requests (NextTokenChooser::plain_greedy) are chosen by the backend
  // (ModelBackend::ForwardGreedy: on the CUDA device, so only (id, logprob) is downloaded); false
  // chooses every row on the host from full logits rows. Same ids either way.
  bool greedy_on_backend = true;
  // Test-only fault injection (PHISHARD_TEST_STALL_MS, read once by `serve`): the first
  // Prefill or Decode sleeps this long before running, holding the executor like a stuck
  // device step would. 0 = off.
  int test_stall_next_step_ms = 0;
};

class BatchEngine {
 public:
  BatchEngine(ModelBackend* model, const Tokenizer* tokenizer, BatchEngineOptions options);
  ~BatchEngine();

  // Runs the warmup batch (tokenising it itself), sizes and allocates the KV pool, empties the
  // cache, returns max_supported_total_tokens = (num_blocks - unrouted blocks) × block_size: the
  // router's part of the pool (BatchEngineOptions::unrouted_kv_blocks).
  absl::StatusOr<uint32_t> Warmup(const BatchInput& batch, uint32_t max_input_length,
                                  uint32_t max_prefill_tokens, uint32_t max_new_tokens);
  absl::StatusOr<StepResult> Prefill(const BatchInput& batch);
  absl::StatusOr<StepResult> Decode(const std::vector<uint64_t>& batch_ids);
  absl::StatusOr<CachedBatchOut> FilterBatch(uint64_t batch_id,
                                             const std::vector<uint64_t>& request_ids);
  absl::Status ClearCache(std::optional<uint64_t> batch_id);

  // Introspection for tests and metrics.
  int kv_blocks_total() const;
  int kv_blocks_free() const;
  // Blocks kept for requests without `blocks`: 0 before Warmup (they share the whole pool).
  int kv_blocks_unrouted() const;
  size_t num_cached_batches() const;

  struct State;

 private:
  std::unique_ptr<State> state_;
};

}  // namespace phishard
