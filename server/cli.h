// The `phishard` / `lorax-server` command line: option structs of every subcommand and their
// entry points. Parsing (CLI11) lives in cli.cc; each Run* returns the process exit status.
//
// `serve` and `download-weights` accept the exact command lines the LoRAX launcher produces
// (spec §1.2, §1.3), including the `--no-<flag>` forms of booleans. Flags of our own have an
// environment twin PHISHARD_<FLAG> (e.g. --listen-tcp / PHISHARD_LISTEN_TCP).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/shard_server.h"

namespace phishard {

// Environment lookup (nullptr when unset); injectable for tests.
using EnvFn = std::function<const char*(const char*)>;
EnvFn ProcessEnv();

struct ServeOptions {
  std::string model_id;  // positional MODEL_ID or --model
  std::string revision;
  std::string device = "auto";
  std::string dtype;  // "" = backend default (float32 on CPU); float16 | bfloat16 | float32
  ShardServerOptions server;
  int max_kv_blocks = 0;
  int unrouted_kv_blocks = -1;  // BatchEngineOptions::unrouted_kv_blocks; -1 = the default
  std::string metrics_addr;  // --metrics-addr: Prometheus /metrics (docs/observability.md); "" = off
  // Launcher flags (spec §1.3).
  std::string logger_level = "INFO";
  bool json_output = false;
  std::string source = "hub";
  std::string adapter_source = "hub";
  std::string adapter_id;
  bool trust_remote_code = false;
  std::string quantize;
  bool compile = false;
  int speculative_tokens = 0;
  std::vector<std::string> preloaded_adapter_ids;
  bool merge_adapter_weights = false;
  std::string preloaded_adapter_source;
  std::string otlp_endpoint;
  std::optional<int> embedding_dim;
  // Tensor parallelism: the sequencer's bound on a partial fan-out (server/sequencer.h).
  double sequencer_timeout_s = 30;
  // Adapters (docs/adapters.md).
  std::vector<std::string> adapter_roots;  // --adapter-root; empty = the model directory
  int64_t adapter_memory_bytes = 0;        // what ADAPTER_MEMORY_FRACTION applies to; 0 = device
  int adapter_slots = 1024;                // dynamic adapters resident at once
  // From the environment (spec §1.4), filled by ApplyServeEnvironment.
  double adapter_memory_fraction = 0.1;  // ADAPTER_MEMORY_FRACTION
  double cuda_memory_fraction = 1.0;
  double memory_wiggle_room = 0.9;
  double watermark_gamma = 0.5;
  double watermark_delta = 2.0;
};

// Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, CUDA_MEMORY_FRACTION, MEMORY_WIGGLE_ROOM,
// WATERMARK_GAMMA/DELTA, PREFIX_CACHING, CHUNKED_PREFILL into `options` and rejects everything
// this shard cannot honour, naming the flag or variable. Called before anything is loaded, so a
// refusal never leaves a socket behind. Flags that are accepted but have no effect are logged.
absl::Status ApplyServeEnvironment(const EnvFn& env, ServeOptions* options);

struct DownloadWeightsOptions {
  std::string model_id;
  std::string revision;
  std::string extension = ".safetensors";
  std::string logger_level = "INFO";
  bool json_output = false;
  std::string source = "hub";
  std::string adapter_source = "hub";
  std::string adapter_id;
  std::vector<std::string> adapter_roots;  // --adapter-root; empty = the model directory
  std::optional<int> embedding_dim;
  bool auto_convert = true;
  std::string api_token;
};

struct TokenizeOptions {
  std::string model;
  std::string text;
};

struct GenerateOptions {
  std::string model;
  std::string prompt;
  int max_new_tokens = 32;
  std::string device = "auto";
  std::string dtype;
  bool json = false;
  bool ignore_eos = false;
};

struct ClientOptions {
  std::string command;  // info | health | warmup | generate
  std::string uds_path = "/tmp/lorax-server";
  std::string addr;  // HOST:PORT; overrides uds_path
  std::string prompt;
  int max_new_tokens = 32;
  uint32_t max_input_length = 1023;  // router --max-input-tokens
  uint32_t max_prefill_tokens = 0;   // 0 = max_input_length + 50 (launcher default)
  uint32_t max_total_tokens = 0;     // 0 = max_input_length + 1
  // generate: the router's startup (ServiceDiscovery, ClearCache, Info, Warmup) first — 1 always
  // (--startup), 0 never (--no-startup), -1 (default) only when the shard answers that its KV
  // cache is not allocated yet: on a shard a router drives, ClearCache drops every batch in
  // flight and Warmup sizes the cache again, so the default never sends them to a warmed shard.
  int startup = -1;
  bool json = false;
  double timeout_s = 600;
};

int RunServe(ServeOptions options);
int RunDownloadWeights(const DownloadWeightsOptions& options);
int RunTokenize(const TokenizeOptions& options);
int RunGenerate(const GenerateOptions& options);
int RunClient(const ClientOptions& options);

// Parses argv and runs the chosen subcommand; `phishard` alone prints the help.
int RunCli(int argc, char** argv);

}  // namespace phishard
