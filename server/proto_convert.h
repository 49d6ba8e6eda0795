// generate.v1 protos <-> the plain structs of server/batch_types.h, and absl::Status -> gRPC
// status. Only this file pair and the service know the generated protobuf types; BatchEngine
// sees plain structs. Conversion checks only what the plain structs cannot represent (presence,
// uint32 ids that do not fit int32); value checks live in server/request_validation.*.
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "google/protobuf/descriptor.h"
#include "grpcpp/support/status.h"
#include "proto/generate.pb.h"
#include "server/batch_types.h"

namespace phishard {

// Batch proto -> BatchInput. Absent `parameters` / `stopping_parameters` mean the neutral defaults
// of SamplingParams / StoppingParams (LoRAX's router always sends both).
// tokenized_inputs.ids above INT32_MAX -> INVALID_ARGUMENT naming the entry.
absl::StatusOr<BatchInput> BatchFromProto(const generate::v1::Batch& pb);

void TokensToProto(const TokensOut& in, generate::v1::NextTokens* out);
void PrefillTokensToProto(const TokensOut& in, generate::v1::PrefillTokens* out);
void GenerationToProto(const GenerationOut& in, generate::v1::Generation* out);
void CachedBatchToProto(const CachedBatchOut& in, generate::v1::CachedBatch* out);
generate::v1::CachedBatch CachedBatchToProto(const CachedBatchOut& in);

// Fills `generations` and, when the step left a batch, `batch` of a Prefill/DecodeResponse.
template <class StepResponse>
void StepResultToProto(const StepResult& in, StepResponse* out) {
  out->mutable_generations()->Reserve(static_cast<int>(in.generations.size()));
  for (const GenerationOut& g : in.generations) GenerationToProto(g, out->add_generations());
  if (in.batch.has_value()) CachedBatchToProto(*in.batch, out->mutable_batch());
}

// Same numeric codes on both sides (absl::StatusCode mirrors grpc::StatusCode 0..16).
grpc::Status ToGrpcStatus(const absl::Status& status);

// Explains why `bytes` does not parse as `type`: protobuf rejects the whole message when a proto3
// `string` field holds invalid UTF-8, without saying which one. This re-parses with every string
// field read as bytes and names the first offending field (`batch.requests[2].inputs is not
// valid UTF-8`); otherwise the message is malformed at the wire level. Always INVALID_ARGUMENT.
absl::Status ExplainParseFailure(const google::protobuf::Descriptor* type, std::string_view bytes);

}  // namespace phishard
