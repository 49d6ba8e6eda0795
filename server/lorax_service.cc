#include "server/lorax_service.h"

#include <chrono>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "server/adapter_service.h"
#include "server/metrics.h"
#include "server/proto_convert.h"
#include "server/request_log.h"
#include "server/sequencer.h"
#include "server/sequencer_key.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;

// tonic 0.9 (the LoRAX router) never raises its 4 MiB decode limit: a bigger response fails on
// the router side exactly like an error (spec §2.1). We still send it, but say so in the log.
constexpr size_t kRouterDecodeLimit = 4u << 20;

bool ReadAll(const grpc::ByteBuffer& buf, std::string* out) {
  std::vector<grpc::Slice> slices;
  if (!buf.Dump(&slices).ok()) return false;
  out->clear();
  out->reserve(buf.Length());
  for (const grpc::Slice& s : slices) {
    out->append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return true;
}

void WriteAll(const std::string& bytes, grpc::ByteBuffer* out) {
  grpc::Slice slice(bytes);
  *out = grpc::ByteBuffer(&slice, 1);
}

// Steps whose failure may mean the device is gone (as opposed to a bad request).
bool MayBeDeviceFault(const absl::Status& s) {
  return s.code() == absl::StatusCode::kInternal || s.code() == absl::StatusCode::kUnknown ||
         s.code() == absl::StatusCode::kDataLoss;
}

absl::Status PingNoThrow(ModelBackend* model) {
  try {
    return model->Ping();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("Ping threw: ", e.what()));
  } catch (...) {
    return absl::InternalError("Ping threw a non-std exception");
  }
}

// A shard started without an AdapterService serves only the base model.
absl::Status AdaptersUnsupported(const AdapterSpec& spec, std::string_view what) {
  return absl::FailedPreconditionError(
      absl::StrFormat("adapters are not supported by this shard: cannot %s adapter '%s' (it "
                      "serves only %s)",
                      what, spec.Name(), kBaseModelAdapterId));
}

}  // namespace

// ---- SerialExecutor ----------------------------------------------------------------------------

SerialExecutor::SerialExecutor() : thread_([this] { Loop(); }) {}

SerialExecutor::~SerialExecutor() { Stop(); }

bool SerialExecutor::Submit(std::function<void()> work, std::function<void()> then) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return false;
    queue_.push_back(Task{std::move(work), std::move(then)});
  }
  cv_.notify_one();
  return true;
}

bool SerialExecutor::SubmitIfIdle(std::function<void()> work, std::function<void()> then) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || running_ || !queue_.empty()) return false;
    queue_.push_back(Task{std::move(work), std::move(then)});
  }
  cv_.notify_one();
  return true;
}

void SerialExecutor::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool SerialExecutor::idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !running_ && queue_.empty();
}

bool SerialExecutor::WaitIdle(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s),
                      [this] { return !running_ && !finishing_ && queue_.empty(); });
}

void SerialExecutor::Loop() {
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything admitted has run
      task = std::move(queue_.front());
      queue_.pop_front();
      running_ = true;
    }
    try {
      task.work();
    } catch (...) {
      // Tasks catch their own exceptions; this only keeps the thread alive.
      PHI_LOG(ERROR) << "executor task threw past its handler";
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_ = false;
      finishing_ = true;
    }
    // After `running_` is cleared: a client that reacts to this answer at once (e.g. Health right
    // after Prefill returned) already finds the executor idle.
    if (task.then) task.then();
    {
      std::lock_guard<std::mutex> lock(mu_);
      finishing_ = false;
    }
    cv_.notify_all();  // WaitIdle() waiters; the loop re-checks its own predicate
  }
}

// ---- ShardHealth -------------------------------------------------------------------------------

bool ShardHealth::serving() const {
  std::lock_guard<std::mutex> lock(mu_);
  return serving_;
}

std::string ShardHealth::reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reason_;
}

void ShardHealth::SetNotServing(std::string reason) {
  std::vector<std::function<void(bool)>> notify;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!serving_) return;  // keep the first reason
    serving_ = false;
    reason_ = std::move(reason);
    for (auto& [id, cb] : subscribers_) notify.push_back(cb);
  }
  for (auto& cb : notify) cb(false);
}

int ShardHealth::Subscribe(std::function<void(bool)> cb) {
  std::lock_guard<std::mutex> lock(mu_);
  subscribers_.emplace_back(next_id_, std::move(cb));
  return next_id_++;
}

void ShardHealth::Unsubscribe(int id) {
  std::lock_guard<std::mutex> lock(mu_);
  std::erase_if(subscribers_, [id](const auto& s) { return s.first == id; });
}

// ---- LoraxService ------------------------------------------------------------------------------

LoraxService::LoraxService(BatchEngine* engine, ModelBackend* model, LoraxServiceOptions options)
    : engine_(engine), model_(model), options_(std::move(options)) {
  PHI_CHECK(engine_ != nullptr && model_ != nullptr);
  PHI_CHECK(options_.block_size > 0);
  if (options_.sequencer != nullptr) {
    // Ranks > 0 run what rank 0 announces on this executor (server/sequencer.h).
    options_.sequencer->Start([this](std::function<void()> work, std::function<void()> then) {
      return executor_.Submit(std::move(work), std::move(then));
    });
  }
  // Info is static: computed once here so gRPC threads never call into the backend.
  info_.set_requires_padding(false);
  info_.set_dtype(model_->dtype_name());
  info_.set_device_type(model_->device_type());
  info_.set_block_size(options_.block_size);
  info_.set_speculate(0);
  info_.set_supports_generation(true);
  info_.set_supports_embeddings(false);
  info_.set_supports_classification(false);
  info_.set_chunked_prefill(false);
  // The router allocates KV blocks (spec §3.4): its admission then counts exactly the blocks the
  // shard holds. Without it the router budgets n x max_input + sum(max_new_tokens) tokens and
  // admits batches whose 16-token blocks do not fit. Requests without blocks (warmup, clients
  // other than the router) get the shard's own.
  info_.set_requires_block_allocator(true);
  if (options_.adapters != nullptr) {
    for (const PreloadedAdapterInfo& p : options_.adapters->preloaded()) {
      pb::PreloadedAdapter* out = info_.add_preloaded_adapters();
      out->mutable_adapter_parameters()->add_adapter_ids(p.id);
      out->set_adapter_source(static_cast<pb::AdapterSource>(p.source));
      out->set_adapter_index(p.index);
    }
  }
}

LoraxService::~LoraxService() { StopExecutor(); }

void LoraxService::BeginShutdown() {
  shutting_down_ = true;
  // W > 1: calls not started yet fail (their peers are shutting down too).
  if (options_.sequencer != nullptr) options_.sequencer->Shutdown();
  health_.SetNotServing("shutting down");
}

void LoraxService::StopExecutor() {
  if (options_.sequencer != nullptr) options_.sequencer->Stop();  // no more calls from peers
  executor_.Stop();
}

void LoraxService::CheckHealth(std::function<void(absl::Status)> done) {
  if (!health_.serving()) {
    done(absl::InternalError(absl::StrCat("shard is not serving: ", health_.reason())));
    return;
  }
  auto shared_done = std::make_shared<std::function<void(absl::Status)>>(std::move(done));
  auto result = std::make_shared<absl::Status>();
  const bool queued = executor_.SubmitIfIdle(
      [this, result] {
        absl::Status st = PingNoThrow(model_);
        if (!st.ok()) {
          MarkDeviceLost(absl::StrCat("device Ping failed: ", st.message()));
          *result = absl::InternalError(absl::StrCat("device Ping failed: ", st.message()));
        }
      },
      [result, shared_done] { (*shared_done)(*result); });
  // Busy: the running step is the device round trip; a failure there flips health_.
  if (!queued) (*shared_done)(absl::OkStatus());
}

void LoraxService::CheckDeviceAfterFailure(const char* method, const absl::Status& status) {
  if (!MayBeDeviceFault(status) || !RequireDevice().ok()) return;
  const absl::Status ping = PingNoThrow(model_);
  if (ping.ok()) return;
  MarkDeviceLost(absl::StrFormat("%s failed (%s) and the device no longer answers (%s)", method,
                                 status.ToString(), ping.ToString()));
}

void LoraxService::MarkDeviceLost(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(device_mu_);
    if (!device_error_.empty()) return;
    device_error_ = reason;
  }
  PHI_LOG(CRITICAL) << reason;
  health_.SetNotServing(reason);
}

absl::Status LoraxService::RequireDevice() const {
  std::lock_guard<std::mutex> lock(device_mu_);
  if (device_error_.empty()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("shard is not serving: ", device_error_));
}

template <class Req, class Resp, class Fn>
LoraxService::Reactor* LoraxService::Unary(const char* method, Ctx* ctx, const Bytes* in,
                                           Bytes* out, Lane lane, Fn fn) {
  Reactor* reactor = ctx->DefaultReactor();
  if (shutting_down_) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
    return reactor;
  }
  auto req = std::make_shared<Req>();
  std::string bytes;
  if (!ReadAll(*in, &bytes)) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INTERNAL, "could not read the request bytes"));
    return reactor;
  }
  if (!req->ParseFromString(bytes)) {
    const absl::Status st = ExplainParseFailure(Req::descriptor(), bytes);
    PHI_LOG(WARNING) << method << ": " << st.message();
    reactor->Finish(ToGrpcStatus(st));
    return reactor;
  }
  // W > 1: what every rank's copy of this call must match (method, batch ids, request bytes).
  const uint64_t digest = options_.sequencer != nullptr ? RequestDigest(bytes) : 0;
  bytes.clear();
  bytes.shrink_to_fit();

  // `st` outlives `run` and is read by `finish` (run first, on the same thread).
  auto st_holder = std::make_shared<absl::Status>();
  auto run = [this, method, req, out, fn, lane, st_holder] {
    absl::Status& st = *st_holder;
    const auto t0 = std::chrono::steady_clock::now();
    Resp resp;
    try {
      st = fn(*req, &resp);
    } catch (const std::exception& e) {
      st = absl::InternalError(absl::StrCat(method, " threw: ", e.what()));
    } catch (...) {
      st = absl::InternalError(absl::StrCat(method, " threw a non-std exception"));
    }
    if (st.ok()) {
      std::string wire;
      if (!resp.SerializeToString(&wire)) {
        st = absl::InternalError(absl::StrCat(method, ": could not serialize the response"));
      } else {
        if (wire.size() > kRouterDecodeLimit) {
          PHI_LOG(WARNING) << method << " response is " << wire.size()
                           << " bytes, above the LoRAX router's 4 MiB decode limit";
        }
        WriteAll(wire, out);
      }
    }
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (st.ok()) {
      PHI_LOG(DEBUG) << method << " ok in " << ms << " ms";
    } else if (MayBeDeviceFault(st)) {
      PHI_LOG_WITH(ERROR, RequestLogFields(*req))
          << method << " failed after " << ms << " ms: " << st;
      if (lane == Lane::kExecutor) CheckDeviceAfterFailure(method, st);
    } else {
      PHI_LOG_WITH(WARNING, RequestLogFields(*req)) << method << " rejected: " << st;
    }
    if (lane == Lane::kExecutor) {  // Warmup, steps, filter and clear all move KV blocks
      MetricsSetKvBlocks(engine_->kv_blocks_total() - engine_->kv_blocks_free(),
                         engine_->kv_blocks_free());
      if (options_.adapters != nullptr && options_.adapters->registry() != nullptr) {
        MetricsSetAdaptersLoaded(options_.adapters->registry()->num_loaded());  // Load/Offload
      }
    }
  };
  auto finish = [reactor, st_holder, method] {
    MetricsRecordRpc(method, static_cast<int>(st_holder->code()));
    reactor->Finish(ToGrpcStatus(*st_holder));
  };
  if (lane == Lane::kInline) {
    run();
    finish();
  } else if (options_.sequencer != nullptr) {
    options_.sequencer->Admit(RpcSequencer::Call{
        .id = SequencerId(method, *req),
        .digest = digest,
        .run = [run, st_holder] {
          run();
          return *st_holder;
        },
        .finish =
            [st_holder, finish](absl::Status st) {
              if (!st.ok()) *st_holder = std::move(st);  // the sequencer's refusal, if not run
              finish();
            }});
  } else if (!executor_.Submit(std::move(run), std::move(finish))) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
  } else {
    PHI_LOG(TRACE) << method << " admitted to the executor";  // faults_test waits for this line
  }
  return reactor;
}

LoraxService::Reactor* LoraxService::Info(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::InfoRequest, pb::InfoResponse>(
      "Info", ctx, in, out, Lane::kInline, [this](const pb::InfoRequest&, pb::InfoResponse* resp) {
        *resp = info_;
        return absl::OkStatus();
      });
}

LoraxService::Reactor* LoraxService::ServiceDiscovery(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::ServiceDiscoveryRequest, pb::ServiceDiscoveryResponse>(
      "ServiceDiscovery", ctx, in, out, Lane::kInline,
      [this](const pb::ServiceDiscoveryRequest&, pb::ServiceDiscoveryResponse* resp) {
        for (const std::string& url : options_.urls) resp->add_urls(url);
        return absl::OkStatus();
      });
}

LoraxService::Reactor* LoraxService::ClearCache(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::ClearCacheRequest, pb::ClearCacheResponse>(
      "ClearCache", ctx, in, out, Lane::kExecutor,
      [this](const pb::ClearCacheRequest& req, pb::ClearCacheResponse*) {
        // Presence, not value: batch id 0 is a real batch (spec §2.3).
        return engine_->ClearCache(req.has_id() ? std::optional<uint64_t>(req.id()) : std::nullopt);
      });
}

LoraxService::Reactor* LoraxService::FilterBatch(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::FilterBatchRequest, pb::FilterBatchResponse>(
      "FilterBatch", ctx, in, out, Lane::kExecutor,
      [this](const pb::FilterBatchRequest& req, pb::FilterBatchResponse* resp) -> absl::Status {
        std::vector<uint64_t> ids(req.request_ids().begin(), req.request_ids().end());
        absl::StatusOr<CachedBatchOut> batch = engine_->FilterBatch(req.batch_id(), ids);
        if (!batch.ok()) return batch.status();
        CachedBatchToProto(*batch, resp->mutable_batch());  // always set (spec §2.3)
        return absl::OkStatus();
      });
}

LoraxService::Reactor* LoraxService::Warmup(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::WarmupRequest, pb::WarmupResponse>(
      "Warmup", ctx, in, out, Lane::kExecutor,
      [this](const pb::WarmupRequest& req, pb::WarmupResponse* resp) -> absl::Status {
        if (absl::Status s = RequireDevice(); !s.ok()) return s;
        if (!req.has_batch()) return absl::InvalidArgumentError("batch is required");
        absl::StatusOr<BatchInput> batch = BatchFromProto(req.batch());
        if (!batch.ok()) return batch.status();
        PHI_LOG(INFO) << "Warmup started: " << batch->requests.size() << " requests, "
                      << req.max_prefill_tokens() << " max prefill tokens";
        const auto t0 = std::chrono::steady_clock::now();
        absl::StatusOr<uint32_t> tokens = engine_->Warmup(
            *batch, req.max_input_length(), req.max_prefill_tokens(), req.max_new_tokens());
        if (!tokens.ok()) return tokens.status();
        resp->set_max_supported_total_tokens(*tokens);  // always set (spec §2.3)
        PHI_LOG(INFO) << "Warmup finished in "
                      << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
                      << " s: max_supported_total_tokens = " << *tokens;
        return absl::OkStatus();
      });
}

LoraxService::Reactor* LoraxService::Prefill(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::PrefillRequest, pb::PrefillResponse>(
      "Prefill", ctx, in, out, Lane::kExecutor,
      [this](const pb::PrefillRequest& req, pb::PrefillResponse* resp) -> absl::Status {
        if (absl::Status s = RequireDevice(); !s.ok()) return s;
        if (!req.has_batch()) return absl::InvalidArgumentError("batch is required");
        // Info.chunked_prefill = false: the router never sends cached_batch; upstream ignores it
        // in that mode too.
        if (req.has_cached_batch()) {
          PHI_LOG(DEBUG) << "Prefill: ignoring cached_batch " << req.cached_batch().id()
                         << " (chunked prefill is off)";
        }
        absl::StatusOr<BatchInput> batch = BatchFromProto(req.batch());
        if (!batch.ok()) return batch.status();
        LogPrefillAdmitted(*batch);
        const auto t0 = std::chrono::steady_clock::now();
        absl::StatusOr<StepResult> step = engine_->Prefill(*batch);
        if (!step.ok()) return step.status();
        LogRequestsFinished(batch->id, *step);
        MetricsRecordPrefill(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), *batch,
            *step);
        StepResultToProto(*step, resp);
        return absl::OkStatus();
      });
}

LoraxService::Reactor* LoraxService::Embed(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::EmbedRequest, pb::EmbedResponse>(
      "Embed", ctx, in, out, Lane::kInline, [](const pb::EmbedRequest&, pb::EmbedResponse*) {
        // Spec (Embed / Classify): INTERNAL with upstream's message.
        return absl::InternalError("Model does not support embeddings");
      });
}

LoraxService::Reactor* LoraxService::Classify(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::ClassifyRequest, pb::ClassifyResponse>(
      "Classify", ctx, in, out, Lane::kInline,
      [](const pb::ClassifyRequest&, pb::ClassifyResponse*) {
        return absl::InternalError("Model does not support classification");
      });
}

LoraxService::Reactor* LoraxService::Decode(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::DecodeRequest, pb::DecodeResponse>(
      "Decode", ctx, in, out, Lane::kExecutor,
      [this](const pb::DecodeRequest& req, pb::DecodeResponse* resp) -> absl::Status {
        if (absl::Status s = RequireDevice(); !s.ok()) return s;
        if (req.batches_size() == 0) {
          return absl::InvalidArgumentError("Must provide at least one batch");
        }
        std::vector<uint64_t> ids;
        ids.reserve(req.batches_size());
        for (const pb::CachedBatch& b : req.batches()) ids.push_back(b.id());
        const auto t0 = std::chrono::steady_clock::now();
        absl::StatusOr<StepResult> step = engine_->Decode(ids);
        if (!step.ok()) return step.status();
        LogRequestsFinished(ids[0], *step);  // the batches were concatenated into ids[0]
        int batch_size = 0;
        for (const pb::CachedBatch& b : req.batches()) batch_size += b.request_ids_size();
        MetricsRecordStepResult(
            "decode", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
            batch_size, *step);
        StepResultToProto(*step, resp);
        return absl::OkStatus();
      });
}

LoraxService::Reactor* LoraxService::Health(Ctx* ctx, const Bytes* in, Bytes* out) {
  Reactor* reactor = ctx->DefaultReactor();
  if (shutting_down_) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
    return reactor;
  }
  std::string bytes;
  pb::HealthRequest req;
  if (!ReadAll(*in, &bytes) || !req.ParseFromString(bytes)) {
    reactor->Finish(ToGrpcStatus(ExplainParseFailure(pb::HealthRequest::descriptor(), bytes)));
    return reactor;
  }
  CheckHealth([reactor, out](absl::Status st) {
    if (st.ok()) WriteAll(pb::HealthResponse().SerializeAsString(), out);
    reactor->Finish(ToGrpcStatus(st));
  });
  return reactor;
}

LoraxService::Reactor* LoraxService::DownloadAdapter(Ctx* ctx, const Bytes* in, Bytes* out) {
  // Disk only (spec §2.1): answered off the executor; AdapterService::Download reads no state
  // that Load/Offload change.
  return Unary<pb::DownloadAdapterRequest, pb::DownloadAdapterResponse>(
      "DownloadAdapter", ctx, in, out, Lane::kInline,
      [this](const pb::DownloadAdapterRequest& req,
             pb::DownloadAdapterResponse* resp) -> absl::Status {
        absl::StatusOr<AdapterSpec> spec =
            AdapterSpecFromProto(req.adapter_parameters(), req.adapter_source());
        if (!spec.ok()) return spec.status();
        DownloadResult r;  // base model: nothing to download (must succeed, spec §3.7)
        if (options_.adapters != nullptr) {
          absl::StatusOr<DownloadResult> d = options_.adapters->Download(*spec);
          if (!d.ok()) return d.status();
          r = *d;
        } else if (!spec->is_base_model()) {
          return AdaptersUnsupported(*spec, "download");
        }
        resp->set_downloaded(r.downloaded);
        resp->set_memory_fraction(r.memory_fraction);
        PHI_LOG(INFO) << "DownloadAdapter " << spec->Name() << ": downloaded=" << r.downloaded
                      << " memory_fraction=" << r.memory_fraction;
        return absl::OkStatus();
      });
}

LoraxService::Reactor* LoraxService::LoadAdapter(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::LoadAdapterRequest, pb::LoadAdapterResponse>(
      "LoadAdapter", ctx, in, out, Lane::kExecutor,
      [this](const pb::LoadAdapterRequest& req, pb::LoadAdapterResponse* resp) -> absl::Status {
        absl::StatusOr<AdapterSpec> spec =
            AdapterSpecFromProto(req.adapter_parameters(), req.adapter_source());
        if (!spec.ok()) return spec.status();
        bool loaded = false;  // base model: nothing to load (must succeed, spec §3.7)
        if (options_.adapters != nullptr) {
          if (!spec->is_base_model()) {
            if (absl::Status s = RequireDevice(); !s.ok()) return s;
          }
          absl::StatusOr<bool> l = options_.adapters->Load(*spec, req.adapter_index());
          if (!l.ok()) return l.status();
          loaded = *l;
        } else if (!spec->is_base_model()) {
          return AdaptersUnsupported(*spec, "load");
        }
        resp->set_loaded(loaded);
        PHI_LOG(INFO) << "LoadAdapter " << spec->Name() << " at index " << req.adapter_index()
                      << ": loaded=" << loaded;
        return absl::OkStatus();
      });
}

LoraxService::Reactor* LoraxService::OffloadAdapter(Ctx* ctx, const Bytes* in, Bytes* out) {
  return Unary<pb::OffloadAdapterRequest, pb::OffloadAdapterResponse>(
      "OffloadAdapter", ctx, in, out, Lane::kExecutor,
      [this](const pb::OffloadAdapterRequest& req,
             pb::OffloadAdapterResponse* resp) -> absl::Status {
        absl::StatusOr<AdapterSpec> spec =
            AdapterSpecFromProto(req.adapter_parameters(), req.adapter_source());
        if (!spec.ok()) return spec.status();
        // Without an AdapterService nothing is ever loaded: upstream's answer for an index that
        // is not loaded is `false`, not an error.
        bool offloaded = false;
        if (options_.adapters != nullptr) {
          absl::StatusOr<bool> o = options_.adapters->Offload(*spec, req.adapter_index());
          if (!o.ok()) return o.status();
          offloaded = *o;
        }
        resp->set_offloaded(offloaded);
        PHI_LOG(INFO) << "OffloadAdapter " << spec->Name() << " at index " << req.adapter_index()
                      << ": offloaded=" << offloaded;
        return absl::OkStatus();
      });
}

}  // namespace phishard
