// `phishard serve`: validate everything, load tokenizer + model, build the engine, then (last)
// publish the socket; wait for SIGTERM/SIGINT and shut down gracefully.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "model/kv_cache.h"
#include "model/model_factory.h"
#include "model/model_path.h"
#include "model/tokenizer.h"
#include "model/tp_prefill_split.h"
#include "server/adapter_service.h"
#include "server/batch_engine.h"
#include "server/cli.h"
#include "server/grpc_log_sink.h"
#include "server/loading_health_server.h"
#include "server/lorax_service.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/sequencer_group.h"
#include "server/shard_server.h"
#include "server/stopping_criteria.h"

namespace phishard {
namespace {

// Tensor parallelism: this rank's group while it starts up; a startup failure is sent to the
// peers so that they stop at once instead of waiting for this rank.
ShardGroup* g_starting_group = nullptr;

// Fatal startup errors go to stdout as a log line (the launcher shows it) and to stderr (the
// launcher prints stderr when the shard exits), spec §1.8.
int Fail(const absl::Status& status) {
  if (g_starting_group != nullptr) {
    g_starting_group->Abandon(absl::StrCat("startup failed: ", status.message()));
  }
  PHI_LOG(ERROR) << "serve: " << status.message();
  std::cerr << "phishard serve: " << status.message() << std::endl;
  return 1;
}

// The adapter store, budget and registry, with the static / preloaded adapters already loaded
// (spec §1.7: before the socket exists). Adapter roots default to the model directory.
absl::StatusOr<std::unique_ptr<AdapterService>> StartAdapters(const ServeOptions& o,
                                                              const std::filesystem::path& dir,
                                                              ModelBackend* model) {
  AdapterServiceOptions ao;
  for (const std::string& r : o.adapter_roots) ao.store.roots.emplace_back(r);
  if (ao.store.roots.empty()) ao.store.roots.push_back(dir);
  ao.store.hub_cache = HubCacheFromEnv(ProcessEnv());
  ao.memory_fraction = o.adapter_memory_fraction;
  ao.num_slots = o.adapter_slots;
  ao.static_adapter_id = o.adapter_id;
  ao.merge_static = o.merge_adapter_weights;
  ao.preloaded_ids = o.preloaded_adapter_ids;
  absl::StatusOr<AdapterSourceKind> src = ParseAdapterSource(o.adapter_source, "--adapter-source");
  if (!src.ok()) return src.status();
  ao.static_source = *src;
  src = ParseAdapterSource(o.preloaded_adapter_source, "--preloaded-adapter-source");
  if (!src.ok()) return src.status();
  ao.preloaded_source = *src;
  absl::StatusOr<int64_t> memory = DeviceMemoryBytes(model->device_type(), o.adapter_memory_bytes);
  if (!memory.ok()) {
    const bool needed = (!o.adapter_id.empty() && o.adapter_id != kBaseModelAdapterId) ||
                        !o.preloaded_adapter_ids.empty();
    if (needed) return memory.status();
    PHI_LOG(WARNING) << memory.status().message() << "; dynamic adapters get no memory";
    memory = 0;
  }
  ao.device_memory_bytes = *memory;
  return AdapterService::Create(model, std::move(ao));
}

// The CUDA tuning switches (model/cuda_lora.cc and model/cuda_phi_model.cc read them when the
// model is made; docs/flags.md): checked here so a typo is refused at startup, naming the variable,
// instead of quietly meaning the default.
absl::Status CheckLoraTuningEnvironment() {
  for (const char* name : {"PHISHARD_LORA_GEMM_FUSED_GELU", "PHISHARD_LORA_GEMM_SPLIT_T",
                           "PHISHARD_LORA_GEMM_SGMV_SHRINK", "PHISHARD_LORA_OVERLAP",
                           "PHISHARD_MLP_STREAM_TP", "PHISHARD_LORA_FUSED"}) {
    const char* v = std::getenv(name);
    if (v != nullptr && *v != '\0' && std::string_view(v) != "0" && std::string_view(v) != "1") {
      return absl::InvalidArgumentError(
          absl::StrCat("environment variable ", name, "='", v, "' must be 0 or 1"));
    }
  }
  for (const char* name : {"PHISHARD_MLP_STREAM", "PHISHARD_MLP_JOIN_TP"}) {
    const char* v = std::getenv(name);
    const std::string_view s(v == nullptr ? "" : v);
    if (!s.empty() && s != "0" && s != "1" && s != "2") {
      return absl::InvalidArgumentError(
          absl::StrCat("environment variable ", name, "='", v, "' must be 0, 1 or 2"));
    }
  }
  int rows = 0;
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_MIN_ROWS"); v != nullptr && *v != '\0') {
    if (!absl::SimpleAtoi(v, &rows) || rows < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "environment variable PHISHARD_LORA_GEMM_MIN_ROWS='", v, "' must be a row count >= 0"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

int RunServe(ServeOptions o) {
  // Until the socket is published a signal simply ends the process with status 0.
  TermSignalWatcher signals;

  LogLevel level = LogLevel::kInfo;
  ParseLogLevel(o.logger_level, &level);  // validated below; INFO until then
  SetLogLevel(level);
  SetLogJson(o.json_output);
  RouteGrpcLogsToPhiLog();
  if (absl::Status s = ApplyServeEnvironment(ProcessEnv(), &o); !s.ok()) return Fail(s);
  // Test-only fault injection (docs/reliability.md), read once here and never on a step.
  int test_stall_ms = 0;
  if (const char* v = std::getenv("PHISHARD_TEST_STALL_MS"); v != nullptr && *v != '\0') {
    if (!absl::SimpleAtoi(v, &test_stall_ms) || test_stall_ms < 0) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "environment variable PHISHARD_TEST_STALL_MS='", v, "' must be milliseconds >= 0")));
    }
    PHI_LOG(WARNING) << "PHISHARD_TEST_STALL_MS=" << test_stall_ms
                     << ": test hook, the first Prefill/Decode stalls that long";
  }
  if (absl::Status s = CheckLoraTuningEnvironment(); !s.ok()) return Fail(s);
  // Read again by the CUDA model; a bad value must not wait for (or skip, on CPU) the load.
  if (absl::StatusOr<int> c = TpPrefillChunksFromEnv(kTpPrefillChunksDefault); !c.ok()) {
    return Fail(c.status());
  }
  SetLogRank(o.server.rank);
  // Prometheus /metrics (docs/observability.md) is up before loading starts, so a scrape sees
  // phishard_health_state 0 (loading) while the gRPC socket does not exist yet.
  MetricsSetRank(o.server.rank);
  MetricsSetHealth(HealthStateValue::kLoading);
  std::unique_ptr<MetricsHttpServer> metrics_http;
  if (!o.metrics_addr.empty()) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> m =
        MetricsHttpServer::Start(o.metrics_addr, [] { return ShardMetricsRegistry().Render(); });
    if (!m.ok()) return Fail(m.status());
    metrics_http = *std::move(m);
    PHI_LOG(INFO) << "Prometheus metrics on " << o.metrics_addr << " (port " << metrics_http->port()
                  << "), GET /metrics";
  }

  // --listen-tcp answers NOT_SERVING while loading; the real server takes the port over below.
  std::unique_ptr<LoadingHealthServer> loading_health;
  if (!o.server.listen_tcp.empty()) {
    absl::StatusOr<std::unique_ptr<LoadingHealthServer>> h =
        LoadingHealthServer::Start(o.server.listen_tcp);
    if (!h.ok()) return Fail(h.status());
    loading_health = *std::move(h);
  }

  // Tensor parallelism (spec §1.5): join the group before loading anything, so that a rank that
  // cannot start stops the others at once.
  std::unique_ptr<ShardGroup> group;
  if (o.server.world_size > 1) {
    absl::StatusOr<CommOptions> comm = CommOptionsFromEnv();
    if (!comm.ok()) return Fail(comm.status());
    absl::StatusOr<std::string> device = ResolveDevice(o.device);
    if (!device.ok()) return Fail(device.status());
    comm->backend = *device == "cpu" ? CommBackend::kGloo : CommBackend::kNccl;
    PHI_LOG(INFO) << "Joining the tensor-parallel group as rank " << comm->rank << " of "
                  << comm->world_size << " via " << comm->master_addr << ":" << comm->master_port;
    ShardGroupOptions go;
    go.comm = *comm;
    go.sequencer.timeout = absl::Seconds(o.sequencer_timeout_s);
    absl::StatusOr<std::unique_ptr<ShardGroup>> g = ShardGroup::Create(go);
    if (!g.ok()) return Fail(g.status());
    group = *std::move(g);
    g_starting_group = group.get();
  }

  absl::StatusOr<std::filesystem::path> dir = ResolveModelDir(
      o.model_id, o.revision.empty() ? std::nullopt : std::optional<std::string>(o.revision));
  if (!dir.ok()) return Fail(dir.status());
  PHI_LOG(INFO) << "Loading " << o.model_id << " from " << dir->string();

  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromDir(*dir);
  if (!tokenizer.ok()) return Fail(tokenizer.status());

  ModelLoadOptions load;
  load.model_dir = *dir;
  load.device = o.device;
  load.dtype = o.dtype;
  load.rank = o.server.rank;
  load.world_size = o.server.world_size;
  if (group != nullptr) {
    load.comm = group->comm();
    load.ranks_on_host = group->ranks_on_host();
  }
  absl::StatusOr<std::unique_ptr<ModelBackend>> model = CreateModelBackend(load);
  if (!model.ok()) return Fail(model.status());
  MetricsSetLoadProgress(1.0);
  PHI_LOG(INFO) << "Model ready on " << (*model)->device_type() << " (" << (*model)->dtype_name()
                << "), " << (*model)->config().num_hidden_layers << " layers, hidden "
                << (*model)->config().hidden_size << ", vocab " << (*model)->config().vocab_size;

  absl::StatusOr<std::unique_ptr<AdapterService>> adapters = StartAdapters(o, *dir, model->get());
  if (!adapters.ok()) return Fail(adapters.status());
  // Static and preloaded adapters; 0 when the backend applies none (the service is off).
  MetricsSetAdaptersLoaded(
      (*adapters)->registry() != nullptr ? (*adapters)->registry()->num_loaded() : 0);
  if (group != nullptr) {
    if (absl::Status s = group->WaitForAllLoaded(); !s.ok()) return Fail(s);
  }

  BatchEngineOptions eo;
  eo.rank = o.server.rank;
  eo.world_size = o.server.world_size;
  eo.memory_fraction = o.cuda_memory_fraction;
  eo.memory_wiggle_room = o.memory_wiggle_room;
  eo.max_kv_blocks = o.max_kv_blocks;
  eo.unrouted_kv_blocks = o.unrouted_kv_blocks;
  absl::StatusOr<std::vector<int32_t>> eos_ids =
      CheckedEosTokenIds((*model)->config(), **tokenizer);
  if (!eos_ids.ok()) return Fail(eos_ids.status());
  eo.eos_token_ids = *std::move(eos_ids);
  eo.watermark_gamma = o.watermark_gamma;
  eo.watermark_delta = o.watermark_delta;
  eo.test_stall_next_step_ms = test_stall_ms;
  BatchEngine engine(model->get(), tokenizer->get(), eo);

  LoraxServiceOptions so;
  so.urls = ShardUrls(o.server);
  so.block_size = kKvBlockSize;
  so.adapters = adapters->get();
  so.sequencer = group != nullptr ? group->sequencer() : nullptr;
  LoraxService service(&engine, model->get(), so);

  // From here on a signal means "shut down gracefully".
  signals.set_exit_on_signal(false);
  loading_health.reset();  // frees the TCP port for the real server
  // The metric leaves "loading" before the socket exists, so a scrape that follows the socket's
  // appearance (what clients and probes wait for) never reads loading.
  MetricsSetHealth(service.health().serving() ? HealthStateValue::kServing
                                              : HealthStateValue::kNotServing);
  service.health().Subscribe([](bool serving) {
    MetricsSetHealth(serving ? HealthStateValue::kServing : HealthStateValue::kNotServing);
  });
  absl::StatusOr<std::unique_ptr<ShardServer>> server = ShardServer::Start(o.server, &service);
  if (!server.ok()) {
    MetricsSetHealth(HealthStateValue::kNotServing);
    return Fail(server.status());
  }
  g_starting_group = nullptr;
  if (group != nullptr) {
    // A broken group (a peer died or aborted, the ranks diverged) shuts this rank down too, the
    // same way a signal does; the exit status then says it failed.
    group->SetServing([] { ::kill(::getpid(), SIGTERM); },
                      o.server.shutdown_grace + absl::Seconds(10));
  }

  const int sig = signals.Wait();
  if (group != nullptr && group->broken()) {
    PHI_LOG(INFO) << "Tensor-parallel group ended (" << group->reason() << "). Shutting down";
  } else {
    PHI_LOG(INFO) << "Signal " << sig << " received. Shutting down";
  }
  (*server)->Shutdown();
  std::fflush(stdout);
  return group != nullptr ? group->ExitCode() : 0;
}

}  // namespace phishard
