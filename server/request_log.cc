#include "server/request_log.h"

#include <string>

namespace phishard {
namespace {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEosToken:
      return "eos_token";
    case FinishReason::kStopSequence:
      return "stop_sequence";
  }
  return "unknown";
}

std::vector<uint64_t> RequestIds(const generate::v1::Batch& batch) {
  std::vector<uint64_t> ids;
  ids.reserve(batch.requests_size());
  for (const generate::v1::Request& r : batch.requests()) ids.push_back(r.id());
  return ids;
}

}  // namespace

void LogPrefillAdmitted(const BatchInput& batch) {
  for (const RequestInput& r : batch.requests) {
    PHI_LOG_WITH(INFO, LogFields().Add("batch_id", batch.id).Add("request_id", r.id))
        << "Prefill: request admitted, "
        << (r.token_ids.empty() ? std::to_string(r.inputs.size()) + " prompt bytes"
                                : std::to_string(r.token_ids.size()) + " prompt tokens")
        << " (truncate " << r.truncate << "), max_new_tokens " << r.stopping.max_new_tokens
        << ", adapter index " << r.adapter_index;
  }
}

void LogRequestsFinished(uint64_t batch_id, const StepResult& step) {
  for (const GenerationOut& g : step.generations) {
    if (!g.generated_text.has_value()) continue;
    PHI_LOG_WITH(INFO, LogFields().Add("batch_id", batch_id).Add("request_id", g.request_id))
        << "request finished: " << FinishReasonName(g.generated_text->finish_reason) << ", "
        << g.generated_text->generated_tokens << " generated tokens";
  }
}

void LogRequestsRemoved(uint64_t batch_id, const std::vector<uint64_t>& removed) {
  for (uint64_t id : removed) {
    PHI_LOG_WITH(INFO, LogFields().Add("batch_id", batch_id).Add("request_id", id))
        << "FilterBatch: request removed (finished, or cancelled by the router); its KV blocks "
           "are free";
  }
}

void LogBatchCleared(uint64_t batch_id, const std::vector<uint64_t>& request_ids) {
  PHI_LOG_WITH(INFO, LogFields().Add("batch_id", batch_id).AddList("request_ids", request_ids))
      << "ClearCache: batch dropped with " << request_ids.size() << " request(s)";
}

LogFields RequestLogFields(const generate::v1::PrefillRequest& req) {
  return LogFields()
      .Add("batch_id", req.batch().id())
      .AddList("request_ids", RequestIds(req.batch()));
}

LogFields RequestLogFields(const generate::v1::DecodeRequest& req) {
  std::vector<uint64_t> ids;
  for (const generate::v1::CachedBatch& b : req.batches()) ids.push_back(b.id());
  return LogFields().AddList("batch_ids", ids);
}

LogFields RequestLogFields(const generate::v1::FilterBatchRequest& req) {
  return LogFields()
      .Add("batch_id", req.batch_id())
      .AddList("request_ids", {req.request_ids().begin(), req.request_ids().end()});
}

LogFields RequestLogFields(const generate::v1::ClearCacheRequest& req) {
  return req.has_id() ? LogFields().Add("batch_id", req.id()) : LogFields();
}

LogFields RequestLogFields(const generate::v1::WarmupRequest& req) {
  return LogFields().Add("batch_id", req.batch().id());
}

}  // namespace phishard
