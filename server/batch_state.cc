#include "server/batch_state.h"

#include <utility>

namespace phishard {

RequestState::RequestState(uint64_t id, uint32_t adapter_index, bool prefill_logprobs,
                           std::vector<int32_t> prompt, NextTokenChooser chooser,
                           StoppingCriteria stopping)
    : id(id),
      adapter_index(adapter_index),
      prefill_logprobs(prefill_logprobs),
      prompt_len(static_cast<int>(prompt.size())),
      all_ids(std::move(prompt)),
      chooser(std::move(chooser)),
      stopping(std::move(stopping)),
      detokenizer(prompt_len) {}

int BatchState::num_blocks() const {
  int n = 0;
  for (const RequestState& r : requests) n += static_cast<int>(r.blocks.size());
  return n;
}

int BatchState::num_unfinished() const {
  int n = 0;
  for (const RequestState& r : requests) n += r.finished ? 0 : 1;
  return n;
}

CachedBatchOut BatchState::ToCachedBatch(int block_size) const {
  CachedBatchOut out;
  out.id = id;
  out.request_ids.reserve(requests.size());
  for (const RequestState& r : requests) out.request_ids.push_back(r.id);
  out.size = static_cast<uint32_t>(requests.size());
  out.max_tokens = static_cast<uint32_t>(num_blocks()) * static_cast<uint32_t>(block_size);
  out.current_tokens = static_cast<uint32_t>(num_unfinished());
  return out;
}

}  // namespace phishard
