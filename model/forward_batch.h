// ForwardBatch: what one model step consumes. Prefill of several sequences of different lengths
// and decode of a batch share this one description (and one code path): each sequence contributes
// `num_new_tokens` tokens that attend to everything already in its paged KV cache plus themselves
// (causal). Host memory; the backend uploads what it needs.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace phishard {

struct SequenceInput {
  int num_new_tokens = 0;            // q_len of this sequence in this step (>= 1)
  int context_len = 0;               // tokens in the cache after this step = past + new
  std::vector<int32_t> block_table;  // KV block ids covering [0, context_len); block size from cache
  // Router adapter index; the backend's AdapterRegistry maps it to a LoRA adapter. An index with
  // no adapter loaded (0 unless a static adapter sits there) runs the base model, not an error.
  uint32_t adapter_index = 0;
};

struct ForwardBatch {
  std::vector<int32_t> token_ids;    // [T] new tokens, sequence-major (seq 0's tokens, then seq 1's…)
  std::vector<int32_t> positions;    // [T] absolute position of each new token in its sequence
  std::vector<SequenceInput> seqs;   // sum(seqs[i].num_new_tokens) == T
  std::vector<int32_t> logit_rows;   // ascending indices into [0, T) whose logits are returned
  // Empty, or [logit_rows.size()]: 1 marks a row whose token the caller chooses greedily with no
  // logits processor (ModelBackend::ForwardGreedy returns its (id, logprob) and may leave its
  // logits row out). Forward and ForwardView ignore it.
  std::vector<uint8_t> greedy_rows;

  int num_tokens() const { return static_cast<int>(token_ids.size()); }
};

// Checks a batch against the model and its KV pool before any backend touches memory: token ids in
// [0, vocab_size), per-sequence token counts summing to the batch, positions consistent with
// context_len, block tables long enough and holding valid block ids, logit rows in range.
// INVALID_ARGUMENT naming the field otherwise.
absl::Status ValidateForwardBatch(const ForwardBatch& batch, int vocab_size, int kv_num_blocks,
                                  int kv_block_size);

}  // namespace phishard
