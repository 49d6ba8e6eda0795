#include "server/request_validation.h"

#include <cmath>

#include "absl/strings/str_format.h"

namespace phishard {
namespace {

absl::Status Invalid(size_t index, std::string_view field, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrFormat("requests[%d].%s %s", index, field, what));
}

}  // namespace

absl::Status ValidateRequestFields(const RequestInput& request, size_t index, int vocab_size) {
  const SamplingParams& p = request.parameters;
  if (!std::isfinite(p.temperature) || p.temperature < 0.0f) {
    return Invalid(index, "parameters.temperature",
                   absl::StrFormat("= %g must be finite and >= 0", p.temperature));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return Invalid(index, "parameters.top_p", absl::StrFormat("= %g must be in (0, 1]", p.top_p));
  }
  if (!(p.typical_p > 0.0f && p.typical_p <= 1.0f)) {
    return Invalid(index, "parameters.typical_p",
                   absl::StrFormat("= %g must be in (0, 1]", p.typical_p));
  }
  if (!std::isfinite(p.repetition_penalty) || p.repetition_penalty <= 0.0f) {
    return Invalid(index, "parameters.repetition_penalty",
                   absl::StrFormat("= %g must be finite and > 0", p.repetition_penalty));
  }
  if (!std::isfinite(p.frequency_penalty)) {
    return Invalid(index, "parameters.frequency_penalty",
                   absl::StrFormat("= %g must be finite", p.frequency_penalty));
  }
  if (!std::isfinite(p.presence_penalty)) {
    return Invalid(index, "parameters.presence_penalty",
                   absl::StrFormat("= %g must be finite", p.presence_penalty));
  }
  if (p.schema.has_value()) {
    return Invalid(index, "parameters.schema",
                   "is set: JSON-schema constrained decoding is not supported by this shard");
  }
  if (request.stopping.max_new_tokens == 0) {
    return Invalid(index, "stopping_parameters.max_new_tokens", "= 0 must be >= 1");
  }
  if (request.cache_len != 0) {
    return Invalid(
        index, "cache_len",
        absl::StrFormat("= %d: prefix caching is not supported (must be 0)", request.cache_len));
  }
  for (size_t k = 0; k < request.token_ids.size(); ++k) {
    const int32_t id = request.token_ids[k];
    if (id < 0 || id >= vocab_size) {
      return Invalid(index, absl::StrFormat("tokenized_inputs.ids[%d]", k),
                     absl::StrFormat("= %d out of range [0, %d)", id, vocab_size));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidatePromptLength(const RequestInput& request, size_t index, int prompt_len,
                                  int max_position_embeddings) {
  if (prompt_len <= 0) {
    return Invalid(index, "inputs", "is empty after tokenization and truncation");
  }
  if (request.chunk_len.has_value() && static_cast<int64_t>(*request.chunk_len) < prompt_len) {
    return Invalid(index, "chunk_len",
                   absl::StrFormat("= %d is shorter than the prompt (%d tokens): chunked "
                                   "prefill is not supported",
                                   *request.chunk_len, prompt_len));
  }
  // The prompt alone leaves no room for a generated token: the prompt (or its truncate) is what
  // has to change, whatever max_new_tokens says.
  if (prompt_len >= max_position_embeddings) {
    return Invalid(index, "inputs",
                   absl::StrFormat("has %d tokens after truncation (truncate = %d, 0 = none), "
                                   "which leaves no room for a generated token within the "
                                   "model's max_position_embeddings %d: set truncate below %d",
                                   prompt_len, request.truncate, max_position_embeddings,
                                   max_position_embeddings));
  }
  const int64_t total = static_cast<int64_t>(prompt_len) + request.stopping.max_new_tokens;
  if (total > max_position_embeddings) {
    return Invalid(
        index, "stopping_parameters.max_new_tokens",
        absl::StrFormat("= %d plus the prompt length %d exceeds the model's "
                        "max_position_embeddings %d",
                        request.stopping.max_new_tokens, prompt_len, max_position_embeddings));
  }
  return absl::OkStatus();
}

}  // namespace phishard
