#include "server/client.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;

bool IsSocket(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

template <class Resp>
absl::StatusOr<Resp> Finish(const grpc::Status& status, Resp resp) {
  if (!status.ok()) return FromGrpcStatus(status);
  return resp;
}

absl::Status ShardError(size_t shard, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat("shard ", shard, ": ", s.message()));
}

absl::Status Violation(const std::string& what) {
  return absl::InternalError(absl::StrCat("protocol violation: ", what));
}

}  // namespace

std::string UdsTarget(const std::string& uds_path) {
  if (IsSocket(uds_path)) return "unix:" + uds_path;
  return absl::StrCat("unix:", uds_path, "-0");
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

// ---- ShardClient -------------------------------------------------------------------------------

std::unique_ptr<ShardClient> ShardClient::Connect(const std::string& target, double timeout_s,
                                                  int max_receive_bytes) {
  auto c = std::unique_ptr<ShardClient>(new ShardClient());
  c->target_ = target;
  if (absl::StartsWith(target, "/")) c->target_ = "unix:" + target;
  c->timeout_s_ = timeout_s;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_receive_bytes);
  args.SetMaxSendMessageSize(-1);
  c->channel_ = grpc::CreateCustomChannel(c->target_, grpc::InsecureChannelCredentials(), args);
  c->stub_ = pb::LoraxService::NewStub(c->channel_);
  return c;
}

#define PHISHARD_CLIENT_CALL(Method, Req, Resp)                                         \
  grpc::ClientContext ctx;                                                              \
  ctx.set_deadline(std::chrono::system_clock::now() +                                   \
                   std::chrono::milliseconds(static_cast<int64_t>(timeout_s_ * 1000))); \
  Resp resp;                                                                            \
  grpc::Status status = stub_->Method(&ctx, Req, &resp);

absl::StatusOr<std::vector<std::string>> ShardClient::ServiceDiscovery() {
  PHISHARD_CLIENT_CALL(ServiceDiscovery, pb::ServiceDiscoveryRequest(),
                       pb::ServiceDiscoveryResponse);
  if (!status.ok()) return FromGrpcStatus(status);
  return std::vector<std::string>(resp.urls().begin(), resp.urls().end());
}

absl::Status ShardClient::ClearCache(std::optional<uint64_t> id) {
  pb::ClearCacheRequest req;
  if (id.has_value()) req.set_id(*id);
  PHISHARD_CLIENT_CALL(ClearCache, req, pb::ClearCacheResponse);
  return FromGrpcStatus(status);
}

absl::StatusOr<pb::InfoResponse> ShardClient::Info() {
  PHISHARD_CLIENT_CALL(Info, pb::InfoRequest(), pb::InfoResponse);
  return Finish(status, std::move(resp));
}

absl::Status ShardClient::Health() {
  PHISHARD_CLIENT_CALL(Health, pb::HealthRequest(), pb::HealthResponse);
  return FromGrpcStatus(status);
}

absl::StatusOr<pb::WarmupResponse> ShardClient::Warmup(const pb::WarmupRequest& req) {
  PHISHARD_CLIENT_CALL(Warmup, req, pb::WarmupResponse);
  return Finish(status, std::move(resp));
}

absl::StatusOr<pb::PrefillResponse> ShardClient::Prefill(const pb::PrefillRequest& req) {
  PHISHARD_CLIENT_CALL(Prefill, req, pb::PrefillResponse);
  return Finish(status, std::move(resp));
}

absl::StatusOr<pb::DecodeResponse> ShardClient::Decode(const pb::DecodeRequest& req) {
  PHISHARD_CLIENT_CALL(Decode, req, pb::DecodeResponse);
  return Finish(status, std::move(resp));
}

absl::StatusOr<pb::FilterBatchResponse> ShardClient::FilterBatch(
    uint64_t batch_id, const std::vector<uint64_t>& request_ids) {
  pb::FilterBatchRequest req;
  req.set_batch_id(batch_id);
  req.mutable_request_ids()->Add(request_ids.begin(), request_ids.end());
  PHISHARD_CLIENT_CALL(FilterBatch, req, pb::FilterBatchResponse);
  return Finish(status, std::move(resp));
}

#undef PHISHARD_CLIENT_CALL

// ---- router request builders -------------------------------------------------------------------

pb::WarmupRequest RouterWarmupRequest(uint32_t max_input_length, uint32_t max_prefill_tokens,
                                      uint32_t max_total_tokens) {
  // The router's 20x20 warmup PNG; a text shard ignores it, only its presence matters here.
  static const std::string kPng("\x89PNG\r\n\x1a\n", 8);
  pb::WarmupRequest w;
  pb::Batch* batch = w.mutable_batch();
  std::string text;
  for (uint32_t i = 0; i < max_input_length; ++i) text += "_test ";
  uint32_t n = 0;
  while (n < max_prefill_tokens) {
    const uint32_t truncate = std::min(max_input_length, max_prefill_tokens - n);
    pb::Request* r = batch->add_requests();
    r->set_id(0);
    r->set_inputs(text);
    pb::TokenizedInputs* ti = r->mutable_tokenized_inputs();
    ti->add_input_chunks()->set_text(text);
    if (n == 0) {
      pb::Image* image = ti->add_input_chunks()->mutable_image();
      image->set_data(kPng);
      image->set_mimetype("image/jpeg;base64");
    }
    r->set_truncate(truncate);
    pb::NextTokenChooserParameters* p = r->mutable_parameters();
    p->set_temperature(0.9f);
    p->set_top_k(10);
    p->set_top_p(0.9f);
    p->set_typical_p(0.9f);
    p->set_do_sample(false);
    p->set_seed(0);
    p->set_repetition_penalty(1.2f);
    p->set_frequency_penalty(0.5f);
    p->set_presence_penalty(0.5f);
    p->set_watermark(true);
    r->mutable_stopping_parameters()->set_max_new_tokens(max_total_tokens - truncate);
    r->set_prefill_logprobs(true);
    n += max_input_length;
  }
  batch->set_id(0);
  batch->set_size(static_cast<uint32_t>(batch->requests_size()));
  batch->set_max_tokens(max_input_length);
  batch->set_max_blocks(0);
  w.set_max_input_length(max_input_length);
  w.set_max_prefill_tokens(max_prefill_tokens);
  w.set_max_new_tokens(max_total_tokens - max_input_length);
  return w;
}

pb::Request RouterRequest(uint64_t id, const std::string& prompt, const std::vector<uint32_t>& ids,
                          uint32_t truncate, uint32_t max_new_tokens) {
  pb::Request r;
  r.set_id(id);
  r.set_inputs(prompt);
  if (!ids.empty()) {
    r.mutable_tokenized_inputs()->mutable_ids()->Add(ids.begin(), ids.end());
    r.mutable_tokenized_inputs()->add_input_chunks()->set_text(prompt);
  }
  r.set_truncate(truncate);
  pb::NextTokenChooserParameters* p = r.mutable_parameters();
  p->set_temperature(1.0f);
  p->set_top_p(1.0f);
  p->set_typical_p(1.0f);
  p->set_repetition_penalty(1.0f);
  p->set_seed(0);
  r.mutable_stopping_parameters()->set_max_new_tokens(max_new_tokens);
  return r;
}

// ---- RouterSession -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<RouterSession>> RouterSession::Connect(const std::string& target,
                                                                      double timeout_s) {
  std::unique_ptr<ShardClient> master = ShardClient::Connect(target, timeout_s);
  absl::StatusOr<std::vector<std::string>> urls = master->ServiceDiscovery();
  if (!urls.ok()) {
    return absl::Status(urls.status().code(), absl::StrCat("ServiceDiscovery on ", target, ": ",
                                                           urls.status().message()));
  }
  if (urls->empty()) return absl::InternalError("ServiceDiscovery returned no URL");
  auto session = std::unique_ptr<RouterSession>(new RouterSession());
  session->urls_ = *urls;
  for (const std::string& url : *urls) {
    // Like the router: strip "unix://" and dial the rest as a unix socket path.
    std::string path = absl::StartsWith(url, "unix://") ? url.substr(7) : url;
    session->shards_.push_back(ShardClient::Connect("unix:" + path, timeout_s));
  }
  return session;
}

namespace {
// Calls fn(i) for every shard at once and waits for all, as the router does (tokio join_all): a
// tensor-parallel group runs a collective RPC only once every rank has received it, so calling
// the shards one after the other would leave rank 0 waiting for rank 1's copy.
template <class T>
std::vector<T> FanOut(size_t n, const std::function<T(size_t)>& fn) {
  std::vector<T> out(n);
  if (n == 1) {
    out[0] = fn(0);
    return out;
  }
  std::vector<std::thread> threads;
  for (size_t i = 0; i < n; ++i) threads.emplace_back([&, i] { out[i] = fn(i); });
  for (std::thread& t : threads) t.join();
  return out;
}
}  // namespace

absl::Status RouterSession::ClearCache(std::optional<uint64_t> id) {
  std::vector<absl::Status> all = FanOut<absl::Status>(
      shards_.size(), [&](size_t i) { return shards_[i]->ClearCache(id); });
  for (size_t i = 0; i < all.size(); ++i) {
    if (!all[i].ok()) return ShardError(i, all[i]);
  }
  return absl::OkStatus();
}

absl::StatusOr<pb::InfoResponse> RouterSession::Info() {
  absl::StatusOr<pb::InfoResponse> last;
  for (size_t i = 0; i < shards_.size(); ++i) last = shards_[i]->Info();
  return last;
}

absl::Status RouterSession::Health() {
  absl::Status last;
  for (size_t i = 0; i < shards_.size(); ++i) last = shards_[i]->Health();
  return last;
}

absl::StatusOr<std::optional<uint32_t>> RouterSession::Warmup(const pb::WarmupRequest& req) {
  std::optional<uint32_t> min;
  std::vector<absl::StatusOr<pb::WarmupResponse>> all =
      FanOut<absl::StatusOr<pb::WarmupResponse>>(shards_.size(),
                                                 [&](size_t i) { return shards_[i]->Warmup(req); });
  for (size_t i = 0; i < all.size(); ++i) {
    absl::StatusOr<pb::WarmupResponse>& r = all[i];
    if (!r.ok()) return ShardError(i, r.status());
    if (r->has_max_supported_total_tokens()) {
      min = std::min(min.value_or(UINT32_MAX), r->max_supported_total_tokens());
    }
  }
  return min;
}

namespace {
// Router merge of Prefill/Decode answers: generations of the last shard, then shards 0..W-2;
// the batch of the last shard.
template <class Resp>
Resp MergeStep(std::vector<Resp> per_shard) {
  Resp merged = per_shard.back();
  for (size_t i = 0; i + 1 < per_shard.size(); ++i) {
    for (const pb::Generation& g : per_shard[i].generations()) *merged.add_generations() = g;
  }
  return merged;
}
}  // namespace

absl::StatusOr<pb::PrefillResponse> RouterSession::Prefill(const pb::PrefillRequest& req) {
  std::vector<pb::PrefillResponse> all;
  std::vector<absl::StatusOr<pb::PrefillResponse>> got =
      FanOut<absl::StatusOr<pb::PrefillResponse>>(
          shards_.size(), [&](size_t i) { return shards_[i]->Prefill(req); });
  for (size_t i = 0; i < got.size(); ++i) {
    if (!got[i].ok()) return ShardError(i, got[i].status());
    all.push_back(std::move(*got[i]));
  }
  return MergeStep(std::move(all));
}

absl::StatusOr<pb::DecodeResponse> RouterSession::Decode(const pb::DecodeRequest& req) {
  std::vector<pb::DecodeResponse> all;
  std::vector<absl::StatusOr<pb::DecodeResponse>> got =
      FanOut<absl::StatusOr<pb::DecodeResponse>>(
          shards_.size(), [&](size_t i) { return shards_[i]->Decode(req); });
  for (size_t i = 0; i < got.size(); ++i) {
    if (!got[i].ok()) return ShardError(i, got[i].status());
    all.push_back(std::move(*got[i]));
  }
  return MergeStep(std::move(all));
}

absl::StatusOr<std::optional<pb::CachedBatch>> RouterSession::FilterBatch(
    uint64_t batch_id, const std::vector<uint64_t>& request_ids) {
  std::optional<pb::CachedBatch> last;
  std::vector<absl::StatusOr<pb::FilterBatchResponse>> all =
      FanOut<absl::StatusOr<pb::FilterBatchResponse>>(
          shards_.size(), [&](size_t i) { return shards_[i]->FilterBatch(batch_id, request_ids); });
  for (size_t i = 0; i < all.size(); ++i) {
    absl::StatusOr<pb::FilterBatchResponse>& r = all[i];
    if (!r.ok()) return ShardError(i, r.status());
    last.reset();
    if (r->has_batch()) last = r->batch();
  }
  return last;
}

// ---- the batching loop -------------------------------------------------------------------------

absl::StatusOr<std::vector<RequestOutcome>> RunBatchToCompletion(
    RouterSession& session, const pb::Batch& batch, const GenerationCallback& on_generation) {
  std::map<uint64_t, RequestOutcome> outcomes;
  std::vector<uint64_t> order;
  for (const pb::Request& r : batch.requests()) {
    if (outcomes.count(r.id()) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate request id ", r.id()));
    }
    outcomes[r.id()].request_id = r.id();
    order.push_back(r.id());
  }

  // Applies one step's generations; returns the ids that finished in it.
  auto absorb = [&](const google::protobuf::RepeatedPtrField<pb::Generation>& gens,
                    bool prefill) -> absl::StatusOr<std::vector<uint64_t>> {
    std::vector<uint64_t> finished;
    std::map<uint64_t, int> seen;
    for (const pb::Generation& g : gens) {
      auto it = outcomes.find(g.request_id());
      if (it == outcomes.end()) {
        return Violation(absl::StrCat("generation for unknown request ", g.request_id()));
      }
      RequestOutcome& o = it->second;
      if (++seen[g.request_id()] > 1) {
        return Violation(absl::StrCat("two generations for request ", g.request_id()));
      }
      if (o.generated_text.has_value()) {
        return Violation(absl::StrCat("request ", g.request_id(), " generated after finishing"));
      }
      const pb::NextTokens& t = g.next_tokens();
      if (t.ids_size() != t.logprobs_size() || t.ids_size() != t.texts_size() ||
          t.ids_size() != t.is_special_size() ||
          (t.alternative_tokens_size() != 0 && t.alternative_tokens_size() != t.ids_size())) {
        return Violation(absl::StrFormat(
            "request %d: next_tokens lists differ in length (ids %d, logprobs %d, texts %d, "
            "is_special %d, alternatives %d)",
            g.request_id(), t.ids_size(), t.logprobs_size(), t.texts_size(), t.is_special_size(),
            t.alternative_tokens_size()));
      }
      if (g.has_generated_text() && t.ids_size() == 0) {
        return Violation(absl::StrCat("request ", g.request_id(), " finished without a token"));
      }
      if (prefill) {
        o.prefill_tokens_length = g.prefill_tokens_length();
        if (g.has_prefill_tokens()) o.prefill_tokens = g.prefill_tokens();
      }
      o.ids.insert(o.ids.end(), t.ids().begin(), t.ids().end());
      o.logprobs.insert(o.logprobs.end(), t.logprobs().begin(), t.logprobs().end());
      o.texts.insert(o.texts.end(), t.texts().begin(), t.texts().end());
      o.is_special.insert(o.is_special.end(), t.is_special().begin(), t.is_special().end());
      if (g.has_generated_text()) {
        o.generated_text = g.generated_text();
        finished.push_back(g.request_id());
      }
      if (on_generation) on_generation(g);
    }
    for (const auto& [id, o] : outcomes) {
      if (!o.generated_text.has_value() && seen[id] != 1) {
        return Violation(absl::StrCat("no generation for live request ", id));
      }
    }
    return finished;
  };

  // After a step: filter finished requests out (or clear the batch) like the router.
  auto settle =
      [&](std::optional<pb::CachedBatch> cached,
          const std::vector<uint64_t>& finished) -> absl::StatusOr<std::optional<pb::CachedBatch>> {
    bool all_done = true;
    for (const auto& [id, o] : outcomes) all_done &= o.generated_text.has_value();
    if (!cached.has_value()) {
      if (!all_done) return Violation("batch dropped while requests are still running");
      return std::nullopt;
    }
    if (all_done) {
      if (absl::Status s = session.ClearCache(cached->id()); !s.ok()) return s;
      return std::nullopt;
    }
    if (finished.empty()) return cached;
    std::vector<uint64_t> keep;
    for (uint64_t id : cached->request_ids()) {
      if (!outcomes[id].generated_text.has_value()) keep.push_back(id);
    }
    absl::StatusOr<std::optional<pb::CachedBatch>> filtered =
        session.FilterBatch(cached->id(), keep);
    if (!filtered.ok()) return filtered.status();
    if (!filtered->has_value()) return Violation("FilterBatch answered without a batch");
    return filtered;
  };

  pb::PrefillRequest pre;
  *pre.mutable_batch() = batch;
  absl::StatusOr<pb::PrefillResponse> p = session.Prefill(pre);
  if (!p.ok()) {
    (void)session.ClearCache(batch.id());  // the router's reaction to a failed Prefill
    return p.status();
  }
  absl::StatusOr<std::vector<uint64_t>> finished = absorb(p->generations(), /*prefill=*/true);
  if (!finished.ok()) return finished.status();
  absl::StatusOr<std::optional<pb::CachedBatch>> cached =
      settle(p->has_batch() ? std::optional<pb::CachedBatch>(p->batch()) : std::nullopt, *finished);
  if (!cached.ok()) return cached.status();

  while (cached->has_value()) {
    pb::DecodeRequest dec;
    *dec.add_batches() = **cached;
    absl::StatusOr<pb::DecodeResponse> d = session.Decode(dec);
    if (!d.ok()) {
      (void)session.ClearCache((*cached)->id());
      return d.status();
    }
    finished = absorb(d->generations(), /*prefill=*/false);
    if (!finished.ok()) return finished.status();
    cached = settle(d->has_batch() ? std::optional<pb::CachedBatch>(d->batch()) : std::nullopt,
                    *finished);
    if (!cached.ok()) return cached.status();
  }

  std::vector<RequestOutcome> out;
  for (uint64_t id : order) out.push_back(std::move(outcomes[id]));
  return out;
}

}  // namespace phishard
