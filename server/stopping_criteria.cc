#include "server/stopping_criteria.h"

#include <algorithm>
#include <utility>

namespace phishard {

std::vector<int32_t> EosTokenIds(const PhiConfig& config, std::optional<int32_t> tokenizer_eos) {
  if (tokenizer_eos.has_value() && !config.eos_token_ids_from_generation_list) {
    return {*tokenizer_eos};
  }
  return std::vector<int32_t>(config.eos_token_ids.begin(), config.eos_token_ids.end());
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
