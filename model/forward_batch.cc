#include "model/forward_batch.h"

#include <cstdint>

#include "absl/strings/str_format.h"
#include "model/kv_cache.h"

namespace phishard {

absl::Status ValidateForwardBatch(const ForwardBatch& b, int vocab_size, int kv_num_blocks,
                                  int kv_block_size) {
  const int T = b.num_tokens();
  if (T == 0 || b.seqs.empty()) {
    return absl::InvalidArgumentError("batch has no tokens or no sequences");
  }
  if (static_cast<int>(b.positions.size()) != T) {
    return absl::InvalidArgumentError(
        absl::StrFormat("positions has %d entries but token_ids has %d", b.positions.size(), T));
  }
  for (int t = 0; t < T; ++t) {
    if (b.token_ids[t] < 0 || b.token_ids[t] >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("token_ids[%d] = %d is out of the vocabulary [0, %d)", t, b.token_ids[t],
                          vocab_size));
    }
  }
  const int64_t capacity = static_cast<int64_t>(kv_num_blocks) * kv_block_size;
  int64_t t = 0;
  for (size_t s = 0; s < b.seqs.size(); ++s) {
    const SequenceInput& seq = b.seqs[s];
    if (seq.num_new_tokens < 1 || seq.num_new_tokens > T - t) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "seqs[%d].num_new_tokens = %d does not fit the %d tokens left of the batch", s,
          seq.num_new_tokens, T - t));
    }
    if (seq.context_len < seq.num_new_tokens || seq.context_len > capacity) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "seqs[%d].context_len = %d must be in [num_new_tokens = %d, KV capacity %d]", s,
          seq.context_len, seq.num_new_tokens, capacity));
    }
    const int64_t needed = KvBlockAllocator::BlocksFor(seq.context_len, kv_block_size);
    if (static_cast<int64_t>(seq.block_table.size()) < needed) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "seqs[%d].block_table has %d blocks; context_len %d needs %d blocks of %d", s,
          seq.block_table.size(), seq.context_len, needed, kv_block_size));
    }
    for (size_t i = 0; i < seq.block_table.size(); ++i) {
      if (seq.block_table[i] < 0 || seq.block_table[i] >= kv_num_blocks) {
        return absl::InvalidArgumentError(
            absl::StrFormat("seqs[%d].block_table[%d] = %d is not a KV block id in [0, %d)", s, i,
                            seq.block_table[i], kv_num_blocks));
      }
    }
    for (int j = 0; j < seq.num_new_tokens; ++j, ++t) {
      const int want = seq.context_len - seq.num_new_tokens + j;
      if (b.positions[t] != want) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "positions[%d] = %d but seqs[%d] (context_len %d, num_new_tokens %d) puts that token "
            "at position %d",
            t, b.positions[t], s, seq.context_len, seq.num_new_tokens, want));
      }
    }
  }
  if (t != T) {
    return absl::InvalidArgumentError(
        absl::StrFormat("sum of seqs[].num_new_tokens is %d but the batch has %d tokens", t, T));
  }
  for (size_t i = 0; i < b.logit_rows.size(); ++i) {
    if (b.logit_rows[i] < 0 || b.logit_rows[i] >= T) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "logit_rows[%d] = %d is not a token row in [0, %d)", i, b.logit_rows[i], T));
    }
  }
  if (!b.greedy_rows.empty() && b.greedy_rows.size() != b.logit_rows.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("greedy_rows has %d entries but logit_rows has %d (it must be empty or "
                        "one flag per logit row)",
                        b.greedy_rows.size(), b.logit_rows.size()));
  }
  return absl::OkStatus();
}

}  // namespace phishard
