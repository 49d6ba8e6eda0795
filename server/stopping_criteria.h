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

#include "absl/status/statusor.h"
#include "model/phi_config.h"
#include "model/tokenizer.h"
#include "server/batch_types.h"

namespace phishard {

// The token ids a request stops on (spec §5.7, as upstream LoRAX): generation_config.json's
// eos_token_id when it is a list, else the tokenizer's eos token (`tokenizer_eos`, from
// tokenizer_config.json). A fine-tune that re-points the tokenizer's eos (e.g. to a chat
// end-of-turn token) and leaves config.json's eos_token_id alone thus stops where LoRAX stops.
// Only a tokenizer without an eos token falls back to config.json / generation_config.json's id.
std::vector<int32_t> EosTokenIds(const PhiConfig& config, std::optional<int32_t> tokenizer_eos);
// EosTokenIds(config, tokenizer.eos_token_id()), refusing a tokenizer eos that the model cannot
// emit: when that eos is what stops requests and its id is >= config.vocab_size (the logits
// width; e.g. a tokenizer_config.json or special_tokens_map.json eos that is not in the
// vocabulary, which transformers appends past the embedding), INVALID_ARGUMENT naming the file and
// the token, rather than serving a model that never stops on EOS.
absl::StatusOr<std::vector<int32_t>> CheckedEosTokenIds(const PhiConfig& config,
                                                        const Tokenizer& tokenizer);

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
