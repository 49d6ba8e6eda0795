#include "server/sequencer_key.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;

std::string BatchId(std::string_view method, const pb::Batch& b) {
  return absl::StrCat(std::string(method), " batch ", b.id(), " (", b.requests_size(),
                      " requests)");
}

std::string AdapterId(std::string_view method, const pb::AdapterParameters& p, uint32_t index) {
  return absl::StrCat(std::string(method), " index ", index, " [",
                      absl::StrJoin(p.adapter_ids(), ","), "]");
}

}  // namespace

std::string SequencerId(std::string_view method, const pb::WarmupRequest& req) {
  return BatchId(method, req.batch());
}

std::string SequencerId(std::string_view method, const pb::PrefillRequest& req) {
  return BatchId(method, req.batch());
}

std::string SequencerId(std::string_view method, const pb::DecodeRequest& req) {
  std::vector<uint64_t> ids;
  for (const pb::CachedBatch& b : req.batches()) ids.push_back(b.id());
  return absl::StrCat(std::string(method), " batches ", absl::StrJoin(ids, ","));
}

std::string SequencerId(std::string_view method, const pb::FilterBatchRequest& req) {
  return absl::StrCat(std::string(method), " batch ", req.batch_id(), " keeping ",
                      req.request_ids_size(), " requests");
}

std::string SequencerId(std::string_view method, const pb::ClearCacheRequest& req) {
  return req.has_id() ? absl::StrCat(std::string(method), " batch ", req.id())
                      : absl::StrCat(std::string(method), " all");
}

std::string SequencerId(std::string_view method, const pb::LoadAdapterRequest& req) {
  return AdapterId(method, req.adapter_parameters(), req.adapter_index());
}

std::string SequencerId(std::string_view method, const pb::OffloadAdapterRequest& req) {
  return AdapterId(method, req.adapter_parameters(), req.adapter_index());
}

}  // namespace phishard
