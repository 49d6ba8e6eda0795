// A generate.v1 client that behaves like the LoRAX router (router/client in upstream): one
// ShardClient per shard, a RouterSession that fans calls out and merges answers exactly as the
// router does (spec §2.2), the router's warmup and request builders (spec §3.2, §3.3), and the
// continuous-batching loop of one batch (Prefill, then Decode with FilterBatch/ClearCache as
// requests finish, spec §3.5). Used by `phishard client` and by the integration tests.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/channel.h"
#include "proto/generate.grpc.pb.h"

namespace phishard {

// The router never raises tonic's default decode limit (spec §2.1); neither do we by default, so
// an oversized response fails here exactly as it would in the router.
inline constexpr int kRouterMaxReceiveBytes = 4 << 20;

// gRPC target of a shard: `uds_path` itself when it is a socket, else `{uds_path}-0` (the
// launcher's prefix convention), as "unix:PATH".
std::string UdsTarget(const std::string& uds_path);
absl::Status FromGrpcStatus(const grpc::Status& status);

class ShardClient {
 public:
  // `target`: "unix:/path", "unix:///path", or "HOST:PORT". A bare filesystem path (what
  // ServiceDiscovery yields once "unix://" is stripped, as the router does) is dialled as a unix
  // socket.
  static std::unique_ptr<ShardClient> Connect(const std::string& target, double timeout_s = 600,
                                              int max_receive_bytes = kRouterMaxReceiveBytes);

  absl::StatusOr<std::vector<std::string>> ServiceDiscovery();
  absl::Status ClearCache(std::optional<uint64_t> id);
  absl::StatusOr<generate::v1::InfoResponse> Info();
  absl::Status Health();
  absl::StatusOr<generate::v1::WarmupResponse> Warmup(const generate::v1::WarmupRequest& req);
  absl::StatusOr<generate::v1::PrefillResponse> Prefill(const generate::v1::PrefillRequest& req);
  absl::StatusOr<generate::v1::DecodeResponse> Decode(const generate::v1::DecodeRequest& req);
  absl::StatusOr<generate::v1::FilterBatchResponse> FilterBatch(
      uint64_t batch_id, const std::vector<uint64_t>& request_ids);

  generate::v1::LoraxService::Stub* stub() { return stub_.get(); }
  const std::string& target() const { return target_; }
  double timeout_s() const { return timeout_s_; }

 private:
  std::string target_;
  double timeout_s_ = 600;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<generate::v1::LoraxService::Stub> stub_;
};

// The router's warmup request for max_input_length I, max_batch_prefill_tokens Pmax and
// max_total_tokens Tt (spec §3.2): requests of "_test " x I while n < Pmax, ids all 0, empty
// token ids, an image chunk on the first, no blocks, prefill_logprobs, non-trivial sampling.
generate::v1::WarmupRequest RouterWarmupRequest(uint32_t max_input_length,
                                                uint32_t max_prefill_tokens,
                                                uint32_t max_total_tokens);
// A request as the router builds it for default (greedy) parameters (spec §3.3); `ids` empty
// means "router without tokenizer" (tokenized_inputs unset).
generate::v1::Request RouterRequest(uint64_t id, const std::string& prompt,
                                    const std::vector<uint32_t>& ids, uint32_t truncate,
                                    uint32_t max_new_tokens);

// The router's view of all shards (its ShardedClient). Calls that every shard gets (ClearCache,
// Warmup, Prefill, Decode, FilterBatch) go to all shards concurrently, as the router sends them.
class RouterSession {
 public:
  // Connects to `target` (the master shard), calls ServiceDiscovery, connects to every URL.
  static absl::StatusOr<std::unique_ptr<RouterSession>> Connect(const std::string& target,
                                                                double timeout_s = 600);

  size_t num_shards() const { return shards_.size(); }
  ShardClient& shard(size_t i) { return *shards_[i]; }
  const std::vector<std::string>& urls() const { return urls_; }

  absl::Status ClearCache(std::optional<uint64_t> id);  // all; any error fails
  absl::StatusOr<generate::v1::InfoResponse> Info();    // last shard's answer
  absl::Status Health();                                // last shard's result
  // Minimum over shards that set max_supported_total_tokens; nullopt when none did.
  absl::StatusOr<std::optional<uint32_t>> Warmup(const generate::v1::WarmupRequest& req);
  // Generations of every shard (last shard first, then 0..W-2), batch of the last shard.
  absl::StatusOr<generate::v1::PrefillResponse> Prefill(const generate::v1::PrefillRequest& req);
  absl::StatusOr<generate::v1::DecodeResponse> Decode(const generate::v1::DecodeRequest& req);
  absl::StatusOr<std::optional<generate::v1::CachedBatch>> FilterBatch(
      uint64_t batch_id, const std::vector<uint64_t>& request_ids);

 private:
  std::vector<std::string> urls_;
  std::vector<std::unique_ptr<ShardClient>> shards_;
};

// Everything the router learns about one request.
struct RequestOutcome {
  uint64_t request_id = 0;
  uint32_t prefill_tokens_length = 0;
  std::optional<generate::v1::PrefillTokens> prefill_tokens;
  std::vector<uint32_t> ids;
  std::vector<float> logprobs;
  std::vector<std::string> texts;
  std::vector<bool> is_special;
  std::optional<generate::v1::GeneratedText> generated_text;  // set once finished
};

// Called for every Generation as it arrives (streaming output).
using GenerationCallback = std::function<void(const generate::v1::Generation&)>;

// Runs `batch` to completion the way the router's batching loop does for a lone batch: Prefill,
// then Decode([batch]) until every request finished, calling FilterBatch(batch, survivors) when
// some finish (ClearCache(id) when none survive). Checks the router's invariants on the way
// (one generation per live request and step, equal-length token lists, finished requests never
// generating again) and fails with INTERNAL describing any violation.
absl::StatusOr<std::vector<RequestOutcome>> RunBatchToCompletion(
    RouterSession& session, const generate::v1::Batch& batch,
    const GenerationCallback& on_generation = nullptr);

}  // namespace phishard
