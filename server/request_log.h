// Log lines about requests and batches, with their ids as structured fields (common/logging.h):
// `request_id`, `batch_id`, or the lists `request_ids` / `batch_ids` when a line is about several.
// With --json-output they are keys of the launcher's `record.extra`, next to `rank`, so one
// request can be followed through admission, finish, FilterBatch and errors with a JSON filter.
#pragma once

#include <cstdint>
#include <vector>

#include "common/logging.h"
#include "proto/generate.pb.h"
#include "server/batch_types.h"

namespace phishard {

// One INFO line per request of a Prefill about to run: prompt size, token budget, adapter.
void LogPrefillAdmitted(const BatchInput& batch);
// One INFO line per request that stopped in this step (only requests this rank owns).
void LogRequestsFinished(uint64_t batch_id, const StepResult& step);
// One INFO line per request FilterBatch dropped from `batch_id` (finished or cancelled).
void LogRequestsRemoved(uint64_t batch_id, const std::vector<uint64_t>& removed);
// One INFO line for a ClearCache that dropped a batch holding `request_ids`.
void LogBatchCleared(uint64_t batch_id, const std::vector<uint64_t>& request_ids);

// The ids a request message names, for its error lines; empty for messages about no batch.
LogFields RequestLogFields(const generate::v1::PrefillRequest& req);
LogFields RequestLogFields(const generate::v1::DecodeRequest& req);
LogFields RequestLogFields(const generate::v1::FilterBatchRequest& req);
LogFields RequestLogFields(const generate::v1::ClearCacheRequest& req);
LogFields RequestLogFields(const generate::v1::WarmupRequest& req);
template <class Req>
LogFields RequestLogFields(const Req&) {
  return LogFields();
}

}  // namespace phishard
