// A LoRAX-router stand-in for load and soak runs: generates a mixed workload (prompt lengths,
// greedy and sampled requests, stop sequences, prefill logprobs, alternatives, text-only batches
// the shard tokenizes itself), drives one shard the way the router's continuous-batching loop
// does (Prefill of new batches next to the running one, Decode([running, new]) concatenation,
// FilterBatch when requests finish or their client goes away, ClearCache when a batch empties,
// the generation health probe, idle ClearCache(all)), and checks every answer against the
// protocol invariants of spec §2-§5 (listed in docs/reliability.md). A violation is recorded,
// never fatal, so one run reports all of them.
//
// KV accounting: the harness computes the blocks each request holds (ceil((P + max_new - 1) /
// 16), BatchEngine's rule) and only admits a batch that fits in the pool Warmup reported, like
// the router's block allocator; so the shard answering RESOURCE_EXHAUSTED, or a CachedBatch
// whose max_tokens differs from that sum, is a violation. The final probe fills the whole pool
// with one Prefill (proves no block leaked), checks one more block is refused, and that
// ClearCache gives everything back.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "model/tokenizer.h"
#include "proto/generate.pb.h"
#include "server/client.h"
#include "tests/load/adapter_cycler.h"

namespace phishard {
namespace load {

struct WorkloadOptions {
  uint64_t seed = 1;
  double duration_s = 60;       // stop admitting new requests after this long
  int64_t max_requests = 0;     // > 0: also stop after this many requests
  int max_batch_requests = 8;   // per new Prefill batch
  int max_running = 32;         // router --max-batch-size
  int max_prompt_tokens = 600;  // longest prompt (before truncation)
  int max_new_tokens = 48;
  double cancel_per_step = 0.01;        // chance a live request's client leaves at a decode step
  double text_only_batches = 0.2;       // batches sent without tokenized_inputs
  double idle_clear_all = 0.3;          // chance of ClearCache(all) when nothing is running
  double health_probe_when_idle = 0.3;  // chance of the router's generation health probe
  uint32_t max_input_length = 1023;     // router --max-input-tokens (warmup + truncate)
  uint32_t max_prefill_tokens = 1100;
  AdapterCyclerOptions adapters;  // every_requests 0: base model only
};

struct LatencyStats {
  std::vector<double> ms;
  void Add(double v) { ms.push_back(v); }
  double Percentile(double p) const;
  double Max() const;
};

struct RunStats {
  int64_t requests = 0, finished = 0, cancelled = 0;
  int64_t finish_length = 0, finish_eos = 0, finish_stop = 0;
  int64_t tokens = 0, prefills = 0, decodes = 0, concatenations = 0, filters = 0, clears = 0;
  int64_t clear_all = 0, health_probes = 0, text_only_batches = 0, sampled = 0;
  int64_t rpc_errors = 0;
  int64_t max_response_bytes = 0;
  int kv_blocks_total = 0;
  int kv_blocks_peak = 0;  // most blocks held at once by cached batches
  LatencyStats prefill_ms, decode_ms;
  bool capacity_probe_ok = false;
};

class RouterEmulator {
 public:
  RouterEmulator(RouterSession* session, const Tokenizer* tokenizer,
                 std::vector<int32_t> eos_token_ids, int vocab_size, int max_position_embeddings,
                 WorkloadOptions options);

  // ClearCache(all), Info checks, the router's Warmup; sets the KV pool size.
  absl::Status Startup();
  // The batching loop until the time or request budget is spent and every request is done.
  void Run();
  // Full-pool Prefill, one block more refused, ClearCache(all) returns everything.
  void CapacityProbe();

  const RunStats& stats() const { return stats_; }
  const AdapterStats& adapter_stats() const { return adapters_.stats(); }
  const std::vector<std::string>& violations() const { return violations_; }

 private:
  struct Req {
    uint64_t id = 0;
    generate::v1::Request proto;
    int prompt_len = 0;  // P after truncation, as the shard must compute it
    int blocks = 0;
    std::vector<uint32_t> block_ids;  // the router allocator's ids (Info.requires_block_allocator)
    bool sampled = false;
    std::vector<std::string> stops;
    int tokens = 0;
    std::string text;  // concatenated next_tokens.texts
    int32_t last_id = -1;
    bool finished = false;
    bool cancelled = false;
  };
  struct Batch {
    uint64_t id = 0;
    std::vector<uint64_t> request_ids;  // shard order
  };

  Req MakeRequest();
  void Violation(const std::string& what);
  // Applies one step's generations to `ids` (the requests of the batches stepped); checks one
  // generation per live request. Returns the ids that finished.
  std::vector<uint64_t> Absorb(
      const google::protobuf::RepeatedPtrField<generate::v1::Generation>& gens,
      const std::vector<uint64_t>& ids, bool prefill);
  void CheckGeneration(Req& r, const generate::v1::Generation& g, bool prefill);
  void CheckCached(const generate::v1::CachedBatch& b, uint64_t want_id,
                   const std::vector<uint64_t>& want_ids, const char* where);
  // After a step: checks the CachedBatch (none only when all of `want_ids` finished), then
  // Trim()s it.
  std::optional<Batch> Settle(std::optional<generate::v1::CachedBatch> cached, uint64_t want_id,
                              const std::vector<uint64_t>& want_ids, const char* where);
  // Drops finished and cancelled requests like the router: FilterBatch(survivors), or
  // ClearCache(id) when none survive. Returns the surviving batch.
  std::optional<Batch> Trim(uint64_t batch_id, const std::vector<uint64_t>& ids);
  std::optional<Batch> PrefillNew(std::optional<Batch>* running);
  std::optional<Batch> DecodeStep(const std::vector<Batch>& batches);
  void HealthProbe();
  int BlocksHeld() const;
  void Retire(uint64_t id);

  RouterSession* session_;
  const Tokenizer* tokenizer_;
  std::vector<int32_t> eos_;
  int vocab_size_;
  int max_positions_;
  WorkloadOptions opt_;
  std::mt19937_64 rng_;
  RunStats stats_;
  std::vector<std::string> violations_;
  std::map<uint64_t, Req> reqs_;          // admitted and not yet retired
  std::set<uint64_t> retired_;            // finished or cancelled: must never generate again
  std::map<uint64_t, int> batch_blocks_;  // cached batch id -> blocks it holds
  // The router's block allocator when Info asks for it (spec §3.4): free ids 1..total-1 (block 0
  // is the health probe's), handed out from the tail, back when a request is retired.
  bool router_blocks_ = false;
  std::vector<uint32_t> free_block_ids_;
  uint64_t next_request_id_ = 1;
  uint64_t next_batch_id_ = 0;  // the router's counter starts at 0 (spec §2.3)
  AdapterCycler adapters_;
};

}  // namespace load
}  // namespace phishard
