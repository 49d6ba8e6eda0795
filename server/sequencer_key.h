// What the tensor-parallel sequencer (server/sequencer.h) compares across ranks for one
// collective RPC: an id naming the method and its batch ids (readable in errors, e.g.
// "Decode batches 7,9"), plus the digest of the raw request bytes (RequestDigest). Requests of
// other types have the bare method name as id.
#pragma once

#include <string>
#include <string_view>

#include "proto/generate.pb.h"

namespace phishard {

std::string SequencerId(std::string_view method, const generate::v1::WarmupRequest& req);
std::string SequencerId(std::string_view method, const generate::v1::PrefillRequest& req);
std::string SequencerId(std::string_view method, const generate::v1::DecodeRequest& req);
std::string SequencerId(std::string_view method, const generate::v1::FilterBatchRequest& req);
std::string SequencerId(std::string_view method, const generate::v1::ClearCacheRequest& req);
std::string SequencerId(std::string_view method, const generate::v1::LoadAdapterRequest& req);
std::string SequencerId(std::string_view method, const generate::v1::OffloadAdapterRequest& req);
template <class Req>
std::string SequencerId(std::string_view method, const Req&) {
  return std::string(method);
}

}  // namespace phishard
