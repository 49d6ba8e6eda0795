// BatchEngine's state (the pimpl of server/batch_engine.h), shared by its two source files:
// batch_engine.cc (requests, steps, batches) and batch_engine_warmup.cc (Warmup). Internal to
// server/.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "common/logging.h"
#include "model/kv_cache.h"
#include "server/batch_engine.h"
#include "server/batch_state.h"
#include "server/parallel_choose.h"

namespace phishard {

struct BatchEngine::State {
  ModelBackend* model;
  const Tokenizer* tokenizer;
  BatchEngineOptions options;
  int vocab_size;                      // logits row width (model config, not the tokenizer)
  std::vector<int32_t> eos_token_ids;  // options, else the tokenizer's eos
  WatermarkParams watermark;
  KvBlockAllocator allocator{0};  // the real pool; 0 blocks until Warmup
  // After a Warmup the router's allocator owns ids [0, routed_blocks) (Warmup reported
  // routed_blocks × block_size tokens) and requests without `blocks` get ids in
  // [routed_blocks, num_blocks) only, so they never hold a block the router hands out. Before
  // any Warmup (an adopted pool) routed_blocks is the whole pool and such requests share it.
  bool warmed_up = false;
  int routed_blocks = 0;
  std::map<uint64_t, BatchState> batches;
  ChooseScratch choose_scratch;  // per-thread chooser workspaces (server/parallel_choose.h)
  std::vector<ChooseTask> choose_tasks;
  std::vector<TokenChoice> choices;
  std::vector<TokenChoice> task_choices;  // ChooseRows' output, one per host-chosen row
  absl::Span<const float> logits;  // [rows, V] host, the model's (valid until its next step)
  // [rows] the backend's greedy choices of the rows the step marked (ForwardBatch::greedy_rows);
  // those rows' logits are not in `logits`.
  absl::Span<const GreedyPick> picks;
  int stall_ms = 0;                // options.test_stall_next_step_ms until the first step used it

  // The test-only stall (BatchEngineOptions::test_stall_next_step_ms): one step, once.
  void MaybeStall() {
    if (stall_ms <= 0) return;
    Log(LogLevel::kWarning, absl::StrFormat("test hook: stalling this step for %d ms", stall_ms));
    std::this_thread::sleep_for(std::chrono::milliseconds(stall_ms));
    stall_ms = 0;
  }

  bool Owns(uint64_t request_id) const {
    return request_id % static_cast<uint64_t>(options.world_size) ==
           static_cast<uint64_t>(options.rank);
  }

  absl::StatusOr<std::vector<RequestState>> BuildRequests(const BatchInput& batch, bool warmup);
  absl::Status ForwardOrError(const ForwardBatch& fb);
  // Marks logit row `row` of `fb` greedy on the backend when `r` is plain greedy (and allowed).
  void MarkGreedy(const RequestState& r, size_t row, ForwardBatch* fb) const;
  absl::Status RunPrefill(std::vector<RequestState>* requests,
                          std::vector<GenerationOut>* generations);
  absl::Status RunDecode(const std::vector<RequestState*>& requests,
                         std::vector<GenerationOut>* generations);
  // INTERNAL naming the first of `requests` whose logits row (rows[i]) is NaN, before anything
  // changes: a NaN in the hidden state (a float16 overflow, a device fault) makes every logit of
  // the row NaN, so its first entry — or, for a row `fb` marks greedy, the pick's logprob (NaN for
  // an all-NaN row) — tells, at no cost. Without the check such a row would answer token 0 with a
  // NaN logprob as if nothing were wrong.
  absl::Status CheckLogitsNotNaN(const ForwardBatch& fb, absl::Span<RequestState* const> requests,
                                 absl::Span<const int> rows) const;
  // Choices for rows of `logits` (row of requests[i] = rows[i]) into `choices`, in parallel; a
  // row `fb` marks greedy takes the backend's pick.
  void ChooseAll(const ForwardBatch& fb, absl::Span<RequestState* const> requests,
                 absl::Span<const int> rows);
  // Records and (for the owning rank) reports `choice`, the next token of `r`.
  void AcceptToken(RequestState* r, const TokenChoice& choice, GenerationOut* gen);
  void FreeBatch(BatchState* batch);
  // Takes the router's `blocks` of every request of `batch` that carries some into the request's
  // block table; on failure (a field-named error) frees what it took and leaves tables empty.
  absl::Status TakeRouterBlocks(const BatchInput& batch, std::vector<RequestState>* requests);
  // First id requests without `blocks` may get, and how many such ids the pool has.
  int unrouted_first() const { return warmed_up ? routed_blocks : 0; }
  int unrouted_blocks() const { return warmed_up ? allocator.num_blocks() - routed_blocks : 0; }
  // RESOURCE_EXHAUSTED for batch `batch_id`, whose requests without `blocks` need `total`
  // blocks that are not free to them.
  absl::Status NoRoomWithoutBlocks(uint64_t batch_id, int64_t total) const;
};

// KV blocks a request of `prompt_len` tokens and up to `max_new_tokens` new ones holds.
inline int BlocksForRequest(int prompt_len, uint32_t max_new_tokens, int block_size) {
  // The last generated token is never fed back, so it needs no KV slot.
  return KvBlockAllocator::BlocksFor(prompt_len + static_cast<int>(max_new_tokens) - 1, block_size);
}

}  // namespace phishard
