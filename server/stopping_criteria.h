// StoppingCriteria: when a request stops (spec §5.7), evaluated once per accepted token in this
// order: max_new_tokens (LENGTH wins over EOS) → EOS (unless ignore_eos_token) → stop sequences
// matched on the accumulated incremental text (so a sequence may span tokens; it may also be
// followed by a single final "\n", like upstream's `$`-anchored regex). Tokenizer-agnostic: it
// sees each token's id and its incremental text.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "server/batch_types.h"

namespace phishard {

class StoppingCriteria {
 public:
  // Empty stop sequences are ignored (upstream's empty regex would stop on the first token).
  StoppingCriteria(const StoppingParams& params, std::vector<int32_t> eos_token_ids);

  // Records one accepted token with its incremental text (§5.9, special tokens included) and
  // returns the finish reason if the request stops on it.
  std::optional<FinishReason> Step(int32_t token_id, std::string_view token_text);

  uint32_t generated_tokens() const { return generated_; }
  uint32_t max_new_tokens() const { return max_new_tokens_; }

 private:
  uint32_t max_new_tokens_;
  bool ignore_eos_;
  std::vector<int32_t> eos_token_ids_;
  std::vector<std::string> stop_sequences_;
  size_t keep_bytes_ = 0;  // longest stop sequence + 1 ("\n"): all the matcher ever looks at
  std::string tail_;       // last bytes of the accumulated output (>= keep_bytes_ when longer)
  uint32_t generated_ = 0;
};

}  // namespace phishard
