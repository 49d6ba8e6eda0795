// Per-request and per-batch state kept in the BatchEngine's batch cache between RPCs (spec §4.1).
// Host memory only; the K/V content lives in the model backend's pool, addressed by `blocks`.
#pragma once

#include <cstdint>
#include <vector>

#include "server/batch_types.h"
#include "server/detokenizer.h"
#include "server/next_token_chooser.h"
#include "server/stopping_criteria.h"

namespace phishard {

struct RequestState {
  RequestState(uint64_t id, uint32_t adapter_index, bool prefill_logprobs,
               std::vector<int32_t> prompt, NextTokenChooser chooser, StoppingCriteria stopping);

  uint64_t id;
  uint32_t adapter_index;  // passed through to the backend; unknown/unloaded ⇒ base (§7.6)
  bool prefill_logprobs;
  int prompt_len;                // P, after truncation
  std::vector<int32_t> all_ids;  // prompt + generated tokens
  int cache_len = 0;             // positions [0, cache_len) have K/V in the pool
  std::vector<int32_t> blocks;   // KV block table: the router's when it sent one, else the shard's
  NextTokenChooser chooser;      // owns the request's RNG: moves with the request
  StoppingCriteria stopping;
  IncrementalDetokenizer detokenizer;
  bool finished = false;  // stopped; kept (never fed again) until FilterBatch drops it
};

struct BatchState {
  uint64_t id = 0;
  std::vector<RequestState> requests;  // batch order

  int num_blocks() const;
  int num_unfinished() const;
  // §4.7. current_tokens = tokens the next Decode feeds = unfinished requests (finished ones are
  // never fed again here, unlike upstream, so counting them would overstate the next step).
  CachedBatchOut ToCachedBatch(int block_size) const;
};

}  // namespace phishard
