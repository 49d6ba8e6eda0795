// generate.v1.LoraxService on top of BatchEngine.
//
// Execution model (spec §2.1): every RPC that touches the model, the KV pool or the batch cache
// (Warmup, Prefill, Decode, FilterBatch, ClearCache, Load/OffloadAdapter) runs on ONE executor
// thread, strictly in arrival order. Info, ServiceDiscovery, DownloadAdapter and Health are
// answered on gRPC's own threads and never queue behind a step.
//
// All methods are gRPC callback handlers over raw bytes: the handler parses the request itself,
// so a request protobuf would reject (invalid UTF-8 in a `string`) becomes INVALID_ARGUMENT naming
// the field instead of gRPC's bare INTERNAL, and the handler returns at once while the executor
// finishes the call later (no gRPC thread is parked per queued step).
//
// Health: `ModelBackend::Ping()` is only ever called on the executor thread (backends need not be
// thread-safe, and a CUDA context is per thread). When the executor is idle, Health enqueues a
// Ping and answers with its result; when a step is running or queued, Health answers at once from
// the shard's health state, because that step is itself the device round trip and its failure
// marks the shard unhealthy (below). So Health never waits behind a long prefill.
//
// Unhealthy: a step failing with INTERNAL/UNKNOWN/DATA_LOSS is followed by a Ping on the executor;
// if the Ping fails too, the device is considered lost: Health answers INTERNAL, grpc.health.v1
// NOT_SERVING, and every later model RPC fails fast with INTERNAL naming the original fault.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "model/model_backend.h"
#include "proto/generate.grpc.pb.h"
#include "server/batch_engine.h"

namespace phishard {

// One thread running tasks in FIFO order.
class SerialExecutor {
 public:
  SerialExecutor();
  ~SerialExecutor();  // runs what is queued, then joins
  SerialExecutor(const SerialExecutor&) = delete;
  SerialExecutor& operator=(const SerialExecutor&) = delete;

  // Queues `work`; false (nothing queued) once Stop() was called. `then` runs on the executor
  // thread right after `work`, but once the executor already counts as idle: it is where an RPC
  // is finished, so a client reacting to the answer finds the executor free.
  bool Submit(std::function<void()> work, std::function<void()> then = nullptr);
  // Like Submit, but only if nothing is running or queued; false otherwise.
  bool SubmitIfIdle(std::function<void()> work, std::function<void()> then = nullptr);
  // Runs everything already queued, then ends the thread. Idempotent.
  void Stop();
  bool idle() const;
  // Waits until nothing runs or waits, `then` included (true), or `timeout_s` passed (false).
  bool WaitIdle(double timeout_s);

 private:
  void Loop();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  struct Task {
    std::function<void()> work;
    std::function<void()> then;
  };
  std::deque<Task> queue_;
  bool running_ = false;    // a task's work is running
  bool finishing_ = false;  // a task's `then` is running (idle for SubmitIfIdle, not WaitIdle)
  bool stopping_ = false;
  std::thread thread_;
};

// Serving state shared by LoraxService.Health and grpc.health.v1, with change notifications
// (grpc.health.v1.Health/Watch).
class ShardHealth {
 public:
  bool serving() const;
  std::string reason() const;  // why not serving; "" while serving
  void SetNotServing(std::string reason);
  // `cb(serving)` is called (from the thread that changed the state) after every change, until
  // Unsubscribe(returned id). It must not call back into ShardHealth.
  int Subscribe(std::function<void(bool)> cb);
  void Unsubscribe(int id);

 private:
  mutable std::mutex mu_;
  bool serving_ = true;
  std::string reason_;
  int next_id_ = 0;
  std::vector<std::pair<int, std::function<void(bool)>>> subscribers_;
};

class AdapterService;
class RpcSequencer;

struct LoraxServiceOptions {
  std::vector<std::string> urls;  // ServiceDiscovery answer, rank order
  uint32_t block_size = 16;       // Info.block_size: the engine's KV block size
  // Download/Load/OffloadAdapter and Info.preloaded_adapters (not owned, outlives the service).
  // nullptr: only the base model (`__base_model__`); real adapters are FAILED_PRECONDITION.
  AdapterService* adapters = nullptr;
  // Tensor parallelism (W > 1): the executor-lane RPCs run in the order rank 0 decides
  // (server/sequencer.h). Not owned; outlives the service. nullptr (W = 1): arrival order.
  RpcSequencer* sequencer = nullptr;
};

namespace internal {
// Wrap<Base, W1, W2, ...>::type = W1<W2<...<Base>>>: applies gRPC's per-method mixins.
template <class Base, template <class> class... Ws>
struct Wrap {
  using type = Base;
};
template <class Base, template <class> class W, template <class> class... Ws>
struct Wrap<Base, W, Ws...> {
  using type = W<typename Wrap<Base, Ws...>::type>;
};
using LS = ::generate::v1::LoraxService;
// The generated service with every method switched to a raw-bytes callback handler.
using RawLoraxService =
    Wrap<LS::Service, LS::WithRawCallbackMethod_Info, LS::WithRawCallbackMethod_ServiceDiscovery,
         LS::WithRawCallbackMethod_ClearCache, LS::WithRawCallbackMethod_FilterBatch,
         LS::WithRawCallbackMethod_Warmup, LS::WithRawCallbackMethod_Prefill,
         LS::WithRawCallbackMethod_Embed, LS::WithRawCallbackMethod_Classify,
         LS::WithRawCallbackMethod_Decode, LS::WithRawCallbackMethod_Health,
         LS::WithRawCallbackMethod_DownloadAdapter, LS::WithRawCallbackMethod_LoadAdapter,
         LS::WithRawCallbackMethod_OffloadAdapter>::type;
}  // namespace internal

class LoraxService final : public internal::RawLoraxService {
 public:
  // `engine` and `model` outlive the service; only the executor thread touches them.
  LoraxService(BatchEngine* engine, ModelBackend* model, LoraxServiceOptions options);
  ~LoraxService() override;

  // New RPCs fail with UNAVAILABLE from now on; calls already admitted still complete.
  void BeginShutdown();
  // Waits up to `timeout_s` for the admitted executor work to finish; false on timeout.
  bool WaitIdle(double timeout_s) { return executor_.WaitIdle(timeout_s); }
  // Waits for every admitted executor task to finish and stops the executor thread.
  void StopExecutor();

  ShardHealth& health() { return health_; }
  // The shared health check (LoraxService.Health and grpc.health.v1): calls `done` exactly once,
  // from the executor after a Ping when idle, otherwise inline.
  void CheckHealth(std::function<void(absl::Status)> done);

  using Reactor = grpc::ServerUnaryReactor;
  using Ctx = grpc::CallbackServerContext;
  using Bytes = grpc::ByteBuffer;
  Reactor* Info(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* ServiceDiscovery(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* ClearCache(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* FilterBatch(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* Warmup(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* Prefill(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* Embed(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* Classify(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* Decode(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* Health(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* DownloadAdapter(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* LoadAdapter(Ctx* ctx, const Bytes* req, Bytes* resp) override;
  Reactor* OffloadAdapter(Ctx* ctx, const Bytes* req, Bytes* resp) override;

 private:
  enum class Lane { kInline, kExecutor };
  // Parses Req from `in`, runs `fn` on `lane`, serializes Resp into `out`, finishes the call.
  template <class Req, class Resp, class Fn>
  Reactor* Unary(const char* method, Ctx* ctx, const Bytes* in, Bytes* out, Lane lane, Fn fn);
  // After a failed step: decides whether the device is gone (executor thread only).
  void CheckDeviceAfterFailure(const char* method, const absl::Status& status);
  // INTERNAL once the device is considered lost; device steps fail fast with it.
  absl::Status RequireDevice() const;
  // Records the first device fault and turns health NOT_SERVING for good.
  void MarkDeviceLost(const std::string& reason);

  BatchEngine* engine_;
  ModelBackend* model_;
  LoraxServiceOptions options_;
  ::generate::v1::InfoResponse info_;
  ShardHealth health_;  // NOT_SERVING after a device fault or once shutting down
  mutable std::mutex device_mu_;
  std::string device_error_;  // "" while the device answers
  std::atomic<bool> shutting_down_{false};
  SerialExecutor executor_;
};

}  // namespace phishard
