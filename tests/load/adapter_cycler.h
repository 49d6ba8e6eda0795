// Adapter churn for the load/soak harness, the way the LoRAX router drives adapters (spec §3.7):
// DownloadAdapter, then LoadAdapter at an index on every shard, requests carrying that
// adapter_index, and once the adapter is retired and no live request uses it any more,
// OffloadAdapter on every shard. A load followed by its offload is one cycle.
//
// Policy: at most `max_loaded` adapters are loaded (or draining) at once. Every `every_requests`
// admitted requests one event happens: a new adapter is loaded when there is room, else the
// oldest loaded one starts draining (no new request gets it); a drained adapter is offloaded
// between the next steps. Like the router, each distinct adapter (or merge) keeps the index it
// was first given, so reloading it reuses an index that was offloaded before (an offload that
// left something behind would show there). Every fourth load is a linear merge of two ids (the
// merge path allocates too).
//
// Checked: every Download/Load/Offload succeeds on every shard, Download's memory_fraction is in
// (0, 1], Load answers loaded = true, Offload answers offloaded = true. A failure is reported
// through the violation callback; the run goes on.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "proto/generate.pb.h"
#include "server/client.h"

namespace phishard {
namespace load {

struct AdapterCyclerOptions {
  std::vector<std::string> ids;  // LOCAL adapter ids the shard can resolve
  int every_requests = 0;        // 0: no adapters at all
  int max_loaded = 2;
  double use_probability = 0.5;  // chance a new request uses one of the loaded adapters
};

struct AdapterStats {
  int64_t downloads = 0, loads = 0, merged_loads = 0, offloads = 0;
  int64_t adapter_requests = 0;  // requests that carried a non-zero adapter_index
  int64_t max_loaded_at_once = 0;
};

class AdapterCycler {
 public:
  using ViolationFn = std::function<void(const std::string&)>;
  AdapterCycler(RouterSession* session, AdapterCyclerOptions options, std::mt19937_64* rng,
                ViolationFn violation);

  bool enabled() const { return opt_.every_requests > 0 && !opt_.ids.empty(); }
  // The adapter_index for a new request (0 = base model); counts it as a live user.
  uint32_t Assign();
  // A request that used `index` finished or was cancelled.
  void Release(uint32_t index);
  // Between steps: runs the event due at `requests_admitted`, offloads drained adapters.
  void Tick(int64_t requests_admitted);
  // End of the run (no request live): offloads everything still loaded.
  void Finish();

  const AdapterStats& stats() const { return stats_; }

 private:
  struct Slot {
    generate::v1::AdapterParameters params;
    int live = 0;  // requests holding this index
    bool draining = false;
    int64_t loaded_at = 0;  // event counter, for "oldest"
  };

  // Download + Load on every shard; false (and a violation) on any failure.
  bool Load(uint32_t index, const generate::v1::AdapterParameters& params);
  void Offload(uint32_t index);

  RouterSession* session_;
  AdapterCyclerOptions opt_;
  std::mt19937_64* rng_;
  ViolationFn violation_;
  AdapterStats stats_;
  std::map<uint32_t, Slot> slots_;  // loaded (or draining) adapters by index
  int64_t events_ = 0;
  int64_t next_event_at_ = 0;
  std::map<std::string, uint32_t> index_of_;  // serialized AdapterParameters -> its index
};

}  // namespace load
}  // namespace phishard
