#include "server/cli.h"

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "model/model_factory.h"
#include "server/adapter_store.h"
#include "server/launch.h"

namespace phishard {
namespace {

constexpr char kBaseModelAdapterId[] = "__base_model__";

// A boolean flag with its `--no-` form, as typer (the upstream CLI) accepts.
CLI::Option* AddBool(CLI::App* app, const std::string& name, bool* value, const std::string& help) {
  return app->add_flag(absl::StrCat("--", name, ",!--no-", name), *value, help);
}

bool ParseEnvDouble(const EnvFn& env, const char* name, double lo, double hi, double* out,
                    absl::Status* error) {
  const char* v = env(name);
  if (v == nullptr || *v == '\0') return true;
  double d = 0;
  if (!absl::SimpleAtod(v, &d) || !(d >= lo && d <= hi)) {
    *error = absl::InvalidArgumentError(absl::StrFormat(
        "environment variable %s='%s' must be a number in [%g, %g]", name, v, lo, hi));
    return false;
  }
  *out = d;
  return true;
}

absl::Status ParseEnvInt(const EnvFn& env, const char* name, int lo, int* out) {
  const char* v = env(name);
  int i = 0;
  if (v == nullptr || !absl::SimpleAtoi(v, &i) || i < lo) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "environment variable %s='%s' must be an integer >= %d", name, v ? v : "", lo));
  }
  *out = i;
  return absl::OkStatus();
}

bool EnvIsOne(const EnvFn& env, const char* name) {
  const char* v = env(name);
  if (v == nullptr) return false;
  const std::string s(v);
  return s == "1" || s == "true" || s == "True" || s == "TRUE";
}

void SetUpLogging(const std::string& level, bool json) {
  SetLogJson(json);
  LogLevel l = LogLevel::kInfo;
  if (ParseLogLevel(level, &l)) SetLogLevel(l);
}

// Tensor parallelism: each rank is its own process, so a TCP port given once (flag or
// PHISHARD_* twin, which every rank inherits) is rank 0's and rank r binds PORT + r. Port 0
// ("any free port") stays 0. `flag` names the option in errors.
absl::StatusOr<std::string> RankTcpAddress(const std::string& address, int rank, const char* flag) {
  if (address.empty() || rank == 0) return address;
  const size_t colon = address.rfind(':');
  const std::string host = colon == std::string::npos ? "" : address.substr(0, colon + 1);
  const std::string port_text = colon == std::string::npos ? address : address.substr(colon + 1);
  uint32_t port = 0;
  if (!absl::SimpleAtoi(port_text, &port) || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: '%s' is neither PORT nor HOST:PORT", flag, address));
  }
  if (port == 0) return address;
  if (port + static_cast<uint32_t>(rank) > 65535) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: port %d + rank %d is above 65535 (rank r listens on PORT + r)", flag, port, rank));
  }
  return absl::StrCat(host, port + static_cast<uint32_t>(rank));
}

}  // namespace

EnvFn ProcessEnv() {
  return [](const char* name) -> const char* { return std::getenv(name); };
}

absl::Status ApplyServeEnvironment(const EnvFn& env, ServeOptions* o) {
  LogLevel level;
  if (!ParseLogLevel(o->logger_level, &level)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--logger-level '%s' is not one of TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL",
        o->logger_level));
  }
  if (o->model_id.empty()) {
    return absl::InvalidArgumentError("MODEL_ID is required (positional argument or --model)");
  }
  if (o->device != "auto" && o->device != "cpu" && o->device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrFormat("--device '%s' must be auto, cpu or cuda", o->device));
  }
  if (!o->dtype.empty() && o->dtype != "float16" && o->dtype != "bfloat16" &&
      o->dtype != "float32") {
    return absl::InvalidArgumentError(
        absl::StrFormat("--dtype '%s' must be float16, bfloat16 or float32", o->dtype));
  }
  if (o->max_kv_blocks < 0) {
    return absl::InvalidArgumentError("--max-kv-blocks must be >= 0");
  }
  if (o->unrouted_kv_blocks < -1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--unrouted-kv-blocks %d must be >= 0 (or -1: the default, one request of "
                        "max_position_embeddings tokens)",
                        o->unrouted_kv_blocks));
  }
  if (o->max_kv_blocks > 0 && o->unrouted_kv_blocks >= o->max_kv_blocks) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--unrouted-kv-blocks %d must be below --max-kv-blocks %d: the router needs a part of "
        "the pool",
        o->unrouted_kv_blocks, o->max_kv_blocks));
  }

  // Tensor-parallel environment (spec §1.3: upstream asserts all four are present with --sharded).
  const char* world = env("WORLD_SIZE");
  int world_size = 1;
  if (world != nullptr && *world != '\0') {
    if (absl::Status s = ParseEnvInt(env, "WORLD_SIZE", 1, &world_size); !s.ok()) return s;
  }
  if (o->server.sharded) {
    std::string missing;
    for (const char* name : {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) {
      const char* v = env(name);
      if (v == nullptr || *v == '\0') absl::StrAppend(&missing, missing.empty() ? "" : ", ", name);
    }
    if (!missing.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("--sharded requires the environment variables ", missing));
    }
    int rank = 0, port = 0;
    if (absl::Status s = ParseEnvInt(env, "RANK", 0, &rank); !s.ok()) return s;
    if (absl::Status s = ParseEnvInt(env, "MASTER_PORT", 1, &port); !s.ok()) return s;
    if (rank >= world_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("RANK=%d must be < WORLD_SIZE=%d", rank, world_size));
    }
    o->server.rank = rank;
    o->server.world_size = world_size;
    absl::StatusOr<std::string> tcp = RankTcpAddress(o->server.listen_tcp, rank, "--listen-tcp");
    if (!tcp.ok()) return tcp.status();
    o->server.listen_tcp = *tcp;
    absl::StatusOr<std::string> metrics = RankTcpAddress(o->metrics_addr, rank, "--metrics-addr");
    if (!metrics.ok()) return metrics.status();
    o->metrics_addr = *metrics;
  }
  if (!o->server.sharded && world_size > 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "WORLD_SIZE=%d but --sharded is not set: every rank of a tensor-parallel group needs "
        "--sharded (the LoRAX launcher and `phishard launch` pass it)",
        world_size));
  }
  // Flag values first, then what the device can do with them.
  if (!(o->sequencer_timeout_s > 0)) {
    return absl::InvalidArgumentError("--sequencer-timeout-s must be > 0");
  }
  if (o->server.sharded) {
    if (absl::Status s = CheckTensorParallelSupport(o->device, world_size); !s.ok()) return s;
  }

  // Features this shard cannot honour: refuse before loading anything (spec §4.11, §10).
  if (!o->quantize.empty()) {
    return absl::UnimplementedError(absl::StrFormat(
        "--quantize %s: quantization is not supported; weights run in --dtype", o->quantize));
  }
  if (o->speculative_tokens < 0) {
    return absl::InvalidArgumentError("--speculative-tokens must be >= 0");
  }
  if (o->speculative_tokens > 0) {
    return absl::UnimplementedError(absl::StrFormat(
        "--speculative-tokens %d: speculative decoding is not supported", o->speculative_tokens));
  }
  if (EnvIsOne(env, "PREFIX_CACHING")) {
    return absl::UnimplementedError("PREFIX_CACHING=1: prefix caching is not supported");
  }
  if (EnvIsOne(env, "CHUNKED_PREFILL")) {
    return absl::UnimplementedError("CHUNKED_PREFILL=1: chunked prefill is not supported");
  }
  if (absl::StatusOr<AdapterSourceKind> src =
          ParseAdapterSource(o->adapter_source, "--adapter-source");
      !src.ok()) {
    return src.status();
  }
  if (o->preloaded_adapter_source.empty()) o->preloaded_adapter_source = o->adapter_source;
  if (absl::StatusOr<AdapterSourceKind> src =
          ParseAdapterSource(o->preloaded_adapter_source, "--preloaded-adapter-source");
      !src.ok()) {
    return src.status();
  }
  if (o->merge_adapter_weights && (o->adapter_id.empty() || o->adapter_id == kBaseModelAdapterId)) {
    return absl::InvalidArgumentError("--merge-adapter-weights requires --adapter-id");
  }
  if (o->adapter_slots < 1) return absl::InvalidArgumentError("--adapter-slots must be >= 1");
  if (o->adapter_memory_bytes < 0) {
    return absl::InvalidArgumentError("--adapter-memory-bytes must be >= 0");
  }
  if (o->source != "hub" && o->source != "local") {
    return absl::UnimplementedError(absl::StrFormat(
        "--source %s: only local weights are supported (a directory or the Hugging Face cache, "
        "with --source hub or local)",
        o->source));
  }

  absl::Status error;
  if (!ParseEnvDouble(env, "CUDA_MEMORY_FRACTION", 0.0, 1.0, &o->cuda_memory_fraction, &error) ||
      !ParseEnvDouble(env, "MEMORY_WIGGLE_ROOM", 0.0, 1.0, &o->memory_wiggle_room, &error) ||
      !ParseEnvDouble(env, "WATERMARK_GAMMA", 0.0, 1.0, &o->watermark_gamma, &error) ||
      !ParseEnvDouble(env, "WATERMARK_DELTA", 0.0, 1e6, &o->watermark_delta, &error) ||
      !ParseEnvDouble(env, "ADAPTER_MEMORY_FRACTION", 0.0, 1.0, &o->adapter_memory_fraction,
                      &error)) {
    return error;
  }

  // Accepted for launcher compatibility; say what they do here.
  if (o->compile) PHI_LOG(INFO) << "--compile: accepted; CUDA graphs are not used by this shard";
  if (o->trust_remote_code) PHI_LOG(INFO) << "--trust-remote-code: accepted; no code is loaded";
  if (!o->otlp_endpoint.empty()) {
    PHI_LOG(INFO) << "--otlp-endpoint " << o->otlp_endpoint
                  << ": accepted; tracing is not exported";
  }
  if (o->embedding_dim.has_value()) {
    PHI_LOG(INFO) << "--embedding-dim: accepted; Phi serves generation only";
  }
  return absl::OkStatus();
}

int RunCli(int argc, char** argv) {
  CLI::App app{
      "phishard: a C++ shard for Microsoft Phi models speaking LoRAX's gRPC protocol "
      "(generate.v1.LoraxService). Also runs as `lorax-server` under the LoRAX launcher.",
      "phishard"};
  app.set_help_all_flag("--help-all", "Help of every subcommand");

  // ---- serve ----
  ServeOptions serve;
  std::string serve_model_flag;
  CLI::App* s = app.add_subcommand("serve", "Serve a model over gRPC on {uds-path}-{rank}");
  s->add_option("model_id", serve.model_id, "Model directory or Hugging Face id (offline cache)");
  s->add_option("--model", serve_model_flag, "Same as MODEL_ID")->envname("PHISHARD_MODEL");
  s->add_option("--revision", serve.revision, "Hugging Face revision (HF cache lookup)");
  s->add_option("--device", serve.device, "auto | cpu | cuda")
      ->envname("PHISHARD_DEVICE")
      ->capture_default_str();
  s->add_option("--dtype", serve.dtype, "float16 | bfloat16 | float32 (default: backend's)")
      ->envname("PHISHARD_DTYPE");
  s->add_option("--uds-path", serve.server.uds_path, "Unix socket path prefix")
      ->envname("PHISHARD_UDS_PATH")
      ->capture_default_str();
  s->add_option("--listen-tcp", serve.server.listen_tcp,
                "Also listen on TCP: PORT (binds 127.0.0.1) or HOST:PORT")
      ->envname("PHISHARD_LISTEN_TCP");
  s->add_option("--metrics-addr", serve.metrics_addr,
                "Serve Prometheus GET /metrics over HTTP: PORT (binds 127.0.0.1) or HOST:PORT")
      ->envname("PHISHARD_METRICS_ADDR");
  s->add_option("--max-kv-blocks", serve.max_kv_blocks,
                "Cap the KV pool at N blocks of 16 tokens (0 = size from memory at Warmup)")
      ->envname("PHISHARD_MAX_KV_BLOCKS");
  s->add_option("--unrouted-kv-blocks", serve.unrouted_kv_blocks,
                "KV blocks Warmup keeps back from the router for requests without `blocks` "
                "(grpcurl, phishard client); -1 = one request of max_position_embeddings tokens")
      ->envname("PHISHARD_UNROUTED_KV_BLOCKS")
      ->capture_default_str();
  double grace_s = 30;
  s->add_option("--shutdown-grace-s", grace_s, "Seconds in-flight RPCs get on SIGTERM")
      ->envname("PHISHARD_SHUTDOWN_GRACE_S")
      ->capture_default_str();
  s->add_option("--logger-level", serve.logger_level, "TRACE|DEBUG|INFO|SUCCESS|WARNING|ERROR")
      ->capture_default_str();
  AddBool(s, "json-output", &serve.json_output, "JSON log lines (LoRAX launcher format)");
  s->add_option("--source", serve.source, "Model source (hub | local)")->capture_default_str();
  s->add_option("--adapter-source", serve.adapter_source, "Adapter source")->capture_default_str();
  s->add_option("--adapter-id", serve.adapter_id, "Static adapter, served at adapter index 0");
  AddBool(s, "trust-remote-code", &serve.trust_remote_code, "Accepted, no effect");
  AddBool(s, "sharded", &serve.server.sharded, "Tensor parallel (needs RANK, WORLD_SIZE, ...)");
  s->add_option("--sequencer-timeout-s", serve.sequencer_timeout_s,
                "Tensor parallel: how long an RPC that reached only some ranks waits before it "
                "fails")
      ->envname("PHISHARD_SEQUENCER_TIMEOUT_S")
      ->capture_default_str();
  s->add_option("--quantize", serve.quantize, "Not supported: any value is refused");
  AddBool(s, "compile", &serve.compile, "Accepted (CUDA graphs hint), no effect");
  s->add_option("--speculative-tokens", serve.speculative_tokens, "Must be 0");
  s->add_option("--preloaded-adapter-ids", serve.preloaded_adapter_ids,
                "Adapter loaded at startup at index 1, 2, ... (repeatable; disables dynamic "
                "adapter loading)")
      ->allow_extra_args(false);
  AddBool(s, "merge-adapter-weights", &serve.merge_adapter_weights,
          "Apply --adapter-id to every request and disable dynamic adapters");
  s->add_option("--adapter-root", serve.adapter_roots,
                "Directory adapters may be read from (repeatable or ':'-separated; default: the "
                "model directory). The Hugging Face cache is always allowed")
      ->envname("PHISHARD_ADAPTER_ROOT")
      ->delimiter(':');
  s->add_option("--adapter-memory-bytes", serve.adapter_memory_bytes,
                "Memory ADAPTER_MEMORY_FRACTION applies to (default: GPU memory; on CPU "
                "MemAvailable)")
      ->envname("PHISHARD_ADAPTER_MEMORY_BYTES");
  s->add_option("--adapter-slots", serve.adapter_slots, "Most dynamic adapters loaded at once")
      ->envname("PHISHARD_ADAPTER_SLOTS")
      ->capture_default_str();
  s->add_option("--preloaded-adapter-source", serve.preloaded_adapter_source,
                "Source of preloaded adapters");
  s->add_option("--otlp-endpoint", serve.otlp_endpoint, "Accepted, no effect");
  int embedding_dim = -1;
  CLI::Option* s_embedding = s->add_option("--embedding-dim", embedding_dim, "Accepted, no effect");

  // ---- launch ----
  LaunchOptions launch;
  CLI::App* l = app.add_subcommand(
      "launch",
      "Run N tensor-parallel `serve` ranks of this binary (RANK, WORLD_SIZE, MASTER_ADDR, "
      "MASTER_PORT set for each); every argument it does not know goes to `serve`");
  l->add_option("--num-shard", launch.num_shard, "Number of ranks (tensor-parallel world size)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  l->add_option("--master-addr", launch.master_addr, "Rendezvous address (rank 0 listens)")
      ->capture_default_str();
  l->add_option("--master-port", launch.master_port, "Rendezvous port (0 = a free one)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  l->add_option("--uds-path", launch.uds_path, "Socket path prefix of the ranks")
      ->envname("PHISHARD_UDS_PATH")
      ->capture_default_str();
  l->add_option("--ready-timeout-s", launch.ready_timeout_s,
                "Fail when the sockets are not up in time (0 = wait as long as loading takes)")
      ->capture_default_str();
  l->add_option("--stop-timeout-s", launch.stop_timeout_s,
                "After SIGTERM, seconds the ranks get before SIGKILL")
      ->capture_default_str();
  // Used by the launcher itself and passed on to every rank.
  bool launch_json = false;
  std::string launch_level;
  AddBool(l, "json-output", &launch_json, "JSON log lines, here and in every rank");
  l->add_option("--logger-level", launch_level, "Log level, here and in every rank");
  l->allow_extras();

  // ---- download-weights ----
  DownloadWeightsOptions dl;
  CLI::App* d = app.add_subcommand(
      "download-weights", "Check that the model's weights are on local disk (no network access)");
  d->add_option("model_id", dl.model_id, "Model directory or Hugging Face id")->required();
  d->add_option("--revision", dl.revision, "Hugging Face revision");
  d->add_option("--extension", dl.extension, "Weight file extension")->capture_default_str();
  d->add_option("--logger-level", dl.logger_level, "Log level")->capture_default_str();
  AddBool(d, "json-output", &dl.json_output, "JSON log lines");
  d->add_option("--source", dl.source, "Model source")->capture_default_str();
  d->add_option("--adapter-source", dl.adapter_source, "Adapter source")->capture_default_str();
  d->add_option("--adapter-id", dl.adapter_id, "Static adapter to check as well");
  d->add_option("--adapter-root", dl.adapter_roots,
                "Directories --adapter-id may come from, as for serve (default: the model "
                "directory)")
      ->envname("PHISHARD_ADAPTER_ROOT")
      ->delimiter(':');
  int dl_embedding_dim = -1;
  d->add_option("--embedding-dim", dl_embedding_dim, "Accepted, no effect");
  AddBool(d, "auto-convert", &dl.auto_convert,
          "Accepted; PyTorch .bin weights need no conversion (read as they are)");
  d->add_option("--api-token", dl.api_token, "Accepted, no effect (no network access)");

  // ---- tokenize ----
  TokenizeOptions tok;
  CLI::App* t = app.add_subcommand("tokenize", "Print the token ids of a text as JSON");
  t->add_option("--model", tok.model,
                "Model directory (tokenizer.json, or vocab.json + merges.txt)")
      ->required()
      ->envname("PHISHARD_MODEL");
  t->add_option("--text", tok.text, "Text to encode")->required();

  // ---- generate ----
  GenerateOptions gen;
  CLI::App* g = app.add_subcommand("generate", "Greedy generation straight through the backend");
  g->add_option("--model", gen.model, "Model directory")->required()->envname("PHISHARD_MODEL");
  g->add_option("--prompt", gen.prompt, "Prompt text")->required();
  g->add_option("--max-new-tokens", gen.max_new_tokens, "Tokens to generate")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  g->add_option("--device", gen.device, "auto | cpu | cuda")
      ->envname("PHISHARD_DEVICE")
      ->capture_default_str();
  g->add_option("--dtype", gen.dtype, "float16 | bfloat16 | float32")->envname("PHISHARD_DTYPE");
  AddBool(g, "json", &gen.json, "Print {\"ids\", \"text\", \"logprobs\"}");
  AddBool(g, "ignore-eos", &gen.ignore_eos, "Keep generating through EOS");

  // ---- client ----
  ClientOptions cl;
  CLI::App* c =
      app.add_subcommand("client", "Talk to a running shard the way the LoRAX router does");
  c->add_option("command", cl.command, "info | health | warmup | generate")
      ->required()
      ->check(CLI::IsMember({"info", "health", "warmup", "generate"}));
  c->add_option("--uds-path", cl.uds_path,
                "Socket path prefix ({uds-path}-0 is dialled) or the socket itself")
      ->envname("PHISHARD_UDS_PATH")
      ->capture_default_str();
  c->add_option("--addr", cl.addr, "HOST:PORT of a shard started with --listen-tcp")
      ->envname("PHISHARD_ADDR");
  c->add_option("--prompt", cl.prompt, "Prompt (generate)");
  c->add_option("--max-new-tokens", cl.max_new_tokens, "Tokens to generate")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c->add_option("--max-input-length", cl.max_input_length, "Router max input tokens (warmup)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c->add_option("--max-prefill-tokens", cl.max_prefill_tokens,
                "Router max batch prefill tokens (default: max-input-length + 50)");
  c->add_option("--max-total-tokens", cl.max_total_tokens,
                "Router max total tokens (default: max-input-length + 1)");
  c->add_flag_callback(
      "--startup", [&cl] { cl.startup = 1; },
      "generate: always run the router's startup (ClearCache, Info, Warmup) first (default: only "
      "when the shard has not been warmed up; ClearCache drops a router's batches)");
  c->add_flag_callback(
      "--no-startup", [&cl] { cl.startup = 0; },
      "generate: never run the router's startup (a shard not warmed up then refuses the Prefill)");
  AddBool(c, "json", &cl.json, "Machine-readable output");
  c->add_option("--timeout-s", cl.timeout_s, "Deadline of each RPC")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  if (*s) {
    if (!serve_model_flag.empty()) {
      if (!serve.model_id.empty() && serve.model_id != serve_model_flag) {
        std::cerr << "serve: MODEL_ID '" << serve.model_id << "' and --model '" << serve_model_flag
                  << "' disagree\n";
        return 2;
      }
      serve.model_id = serve_model_flag;
    }
    if (s_embedding->count() > 0) serve.embedding_dim = embedding_dim;
    serve.server.shutdown_grace = absl::Seconds(grace_s);
    return RunServe(std::move(serve));
  }
  if (*l) {
    launch.serve_args = l->remaining();
    if (launch_json) launch.serve_args.push_back("--json-output");
    if (!launch_level.empty())
      launch.serve_args.insert(launch.serve_args.end(), {"--logger-level", launch_level});
    SetUpLogging(launch_level.empty() ? "INFO" : launch_level, launch_json);
    return RunLaunch(launch);
  }
  if (*d) {
    if (dl_embedding_dim >= 0) dl.embedding_dim = dl_embedding_dim;
    SetUpLogging(dl.logger_level, dl.json_output);
    return RunDownloadWeights(dl);
  }
  // The tools print results on stdout, where common/logging also writes: keep it to errors (which
  // the logger repeats on stderr) so `--json` output stays parseable.
  if (*t || *g || *c) SetLogLevel(LogLevel::kError);
  if (*t) return RunTokenize(tok);
  if (*g) return RunGenerate(gen);
  if (*c) return RunClient(cl);
  std::cout << app.help();
  return 0;
}

}  // namespace phishard
