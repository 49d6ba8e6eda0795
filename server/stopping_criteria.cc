#include "server/stopping_criteria.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace phishard {

std::vector<int32_t> EosTokenIds(const PhiConfig& config, std::optional<int32_t> tokenizer_eos) {
  if (tokenizer_eos.has_value() && !config.eos_token_ids_from_generation_list) {
    return {*tokenizer_eos};
  }
  return std::vector<int32_t>(config.eos_token_ids.begin(), config.eos_token_ids.end());
}

absl::StatusOr<std::vector<int32_t>> CheckedEosTokenIds(const PhiConfig& config,
                                                        const Tokenizer& tokenizer) {
  const std::optional<int32_t> eos = tokenizer.eos_token_id();
  if (eos.has_value() && !config.eos_token_ids_from_generation_list && *eos >= config.vocab_size) {
    const Tokenizer::EosSource& src = *tokenizer.eos_source();
    return absl::InvalidArgumentError(absl::StrCat(
        src.file, ": eos_token \"", src.content, "\" is token id ", *eos,
        src.appended ? " (in neither tokenizer.json's vocab nor its added tokens, so it is "
                       "added as a new token, as transformers does)"
                     : "",
        ", outside the model's ", config.vocab_size,
        "-token output (config.json vocab_size): the model could never emit it and no request "
        "would stop on EOS; name a token the model knows"));
  }
  return EosTokenIds(config, eos);
}

StoppingCriteria::StoppingCriteria(const StoppingParams& params, std::vector<int32_t> eos_token_ids)
    : max_new_tokens_(params.max_new_tokens),
      ignore_eos_(params.ignore_eos_token),
      eos_token_ids_(std::move(eos_token_ids)) {
  for (const std::string& s : params.stop_sequences) {
    if (s.empty()) continue;
    stop_sequences_.push_back(s);
    keep_bytes_ = std::max(keep_bytes_, s.size() + 1);
  }
}

std::optional<FinishReason> StoppingCriteria::Step(int32_t token_id, std::string_view token_text) {
  ++generated_;
  if (generated_ >= max_new_tokens_) return FinishReason::kLength;
  if (!ignore_eos_ &&
      std::find(eos_token_ids_.begin(), eos_token_ids_.end(), token_id) != eos_token_ids_.end()) {
    return FinishReason::kEosToken;
  }
  if (stop_sequences_.empty()) return std::nullopt;
  tail_.append(token_text);
  // Byte-wise suffix tests on valid UTF-8 equal code-point-wise ones. Trim lazily (at 2x) so the
  // buffer stays O(longest stop sequence) without copying on every token.
  if (tail_.size() > 2 * keep_bytes_) tail_.erase(0, tail_.size() - keep_bytes_);
  std::string_view out = tail_;
  const std::string_view without_newline =
      out.ends_with("\n") ? out.substr(0, out.size() - 1) : std::string_view();
  for (const std::string& s : stop_sequences_) {
    if (out.ends_with(s) || (!without_newline.empty() && without_newline.ends_with(s))) {
      return FinishReason::kStopSequence;
    }
  }
  return std::nullopt;
}

}  // namespace phishard
