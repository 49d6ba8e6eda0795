// Field checks of a Prefill/Warmup request that do not need the tokenizer or the KV pool. Each
// failure is INVALID_ARGUMENT naming the field as `requests[i].<proto field path>`, so a client
// sees exactly which value to fix. Checked up front so a bad request never reaches the model
// (spec §2.4: a failing Prefill fails every request of the router's batch set).
#pragma once

#include <cstddef>

#include "absl/status/status.h"
#include "server/batch_types.h"

namespace phishard {

// `index` is the request's position in the batch; `vocab_size` the model's logits width.
// Checks sampling parameters, stopping parameters, schema (unsupported), prefix caching /
// chunking fields, and every tokenized_inputs.ids entry against [0, vocab_size).
absl::Status ValidateRequestFields(const RequestInput& request, size_t index, int vocab_size);

// Checks the prompt once its length P is known (after tokenization and truncation):
// P >= 1, chunk_len (when set) covers the whole prompt, and P + max_new_tokens fits in
// `max_position_embeddings`.
absl::Status ValidatePromptLength(const RequestInput& request, size_t index, int prompt_len,
                                  int max_position_embeddings);

}  // namespace phishard
