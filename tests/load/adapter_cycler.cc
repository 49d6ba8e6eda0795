#include "tests/load/adapter_cycler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace phishard {
namespace load {
namespace {

namespace pb = ::generate::v1;

std::string Describe(const pb::AdapterParameters& p) {
  return absl::StrCat("[", absl::StrJoin(p.adapter_ids(), "+"), "]");
}

// Runs `rpc(shard)` on every shard at once, as the router broadcasts (a tensor-parallel group
// waits for all ranks to receive a call, so one shard after the other would stall).
template <class Fn>
void OnEveryShard(RouterSession* session, Fn rpc) {
  std::vector<std::thread> threads;
  for (size_t i = 0; i < session->num_shards(); ++i) {
    threads.emplace_back([&, i] { rpc(i, session->shard(i)); });
  }
  for (std::thread& t : threads) t.join();
}

struct Deadline {
  explicit Deadline(double s) {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(s * 1000)));
  }
  grpc::ClientContext ctx;
};

}  // namespace

AdapterCycler::AdapterCycler(RouterSession* session, AdapterCyclerOptions options,
                             std::mt19937_64* rng, ViolationFn violation)
    : session_(session),
      opt_(std::move(options)),
      rng_(rng),
      violation_(std::move(violation)),
      next_event_at_(opt_.every_requests) {}

uint32_t AdapterCycler::Assign() {
  if (!enabled()) return 0;
  std::vector<uint32_t> usable;
  for (const auto& [index, slot] : slots_) {
    if (!slot.draining) usable.push_back(index);
  }
  if (usable.empty() ||
      std::uniform_real_distribution<double>(0, 1)(*rng_) >= opt_.use_probability) {
    return 0;
  }
  const uint32_t index = usable[(*rng_)() % usable.size()];
  ++slots_[index].live;
  ++stats_.adapter_requests;
  return index;
}

void AdapterCycler::Release(uint32_t index) {
  if (index == 0) return;
  auto it = slots_.find(index);
  if (it == slots_.end()) {
    violation_(absl::StrCat("adapter index ", index, " released but not loaded (harness bug)"));
    return;
  }
  --it->second.live;
}

bool AdapterCycler::Load(uint32_t index, const pb::AdapterParameters& params) {
  const std::string what = absl::StrCat("adapter ", Describe(params), " at index ", index);
  bool ok = true;
  std::vector<std::string> errors(session_->num_shards());
  OnEveryShard(session_, [&](size_t i, ShardClient& shard) {
    pb::DownloadAdapterRequest d;
    *d.mutable_adapter_parameters() = params;
    d.set_adapter_source(pb::LOCAL);
    pb::DownloadAdapterResponse dr;
    Deadline dl(shard.timeout_s());
    grpc::Status s = shard.stub()->DownloadAdapter(&dl.ctx, d, &dr);
    if (!s.ok()) {
      errors[i] = absl::StrCat("DownloadAdapter: ", s.error_message());
      return;
    }
    if (!(std::isfinite(dr.memory_fraction()) && dr.memory_fraction() > 0 &&
          dr.memory_fraction() <= 1)) {
      errors[i] = absl::StrCat("DownloadAdapter memory_fraction ", dr.memory_fraction());
    }
  });
  ++stats_.downloads;
  OnEveryShard(session_, [&](size_t i, ShardClient& shard) {
    if (!errors[i].empty()) return;
    pb::LoadAdapterRequest l;
    *l.mutable_adapter_parameters() = params;
    l.set_adapter_source(pb::LOCAL);
    l.set_adapter_index(index);
    pb::LoadAdapterResponse lr;
    Deadline dl(shard.timeout_s());
    grpc::Status s = shard.stub()->LoadAdapter(&dl.ctx, l, &lr);
    if (!s.ok()) {
      errors[i] = absl::StrCat("LoadAdapter: ", s.error_message());
    } else if (!lr.loaded()) {
      errors[i] = "LoadAdapter answered loaded = false";
    }
  });
  for (size_t i = 0; i < errors.size(); ++i) {
    if (errors[i].empty()) continue;
    violation_(absl::StrCat(what, ", shard ", i, ": ", errors[i]));
    ok = false;
  }
  ++stats_.loads;
  if (params.adapter_ids_size() > 1) ++stats_.merged_loads;
  return ok;
}

void AdapterCycler::Offload(uint32_t index) {
  auto it = slots_.find(index);
  const pb::AdapterParameters params = it->second.params;
  slots_.erase(it);
  std::vector<std::string> errors(session_->num_shards());
  OnEveryShard(session_, [&](size_t i, ShardClient& shard) {
    pb::OffloadAdapterRequest o;
    *o.mutable_adapter_parameters() = params;
    o.set_adapter_source(pb::LOCAL);
    o.set_adapter_index(index);
    pb::OffloadAdapterResponse r;
    Deadline dl(shard.timeout_s());
    grpc::Status s = shard.stub()->OffloadAdapter(&dl.ctx, o, &r);
    if (!s.ok()) {
      errors[i] = absl::StrCat("OffloadAdapter: ", s.error_message());
    } else if (!r.offloaded()) {
      errors[i] = "OffloadAdapter answered offloaded = false";
    }
  });
  for (size_t i = 0; i < errors.size(); ++i) {
    if (!errors[i].empty()) {
      violation_(absl::StrCat("adapter ", Describe(params), " at index ", index, ", shard ", i,
                              ": ", errors[i]));
    }
  }
  ++stats_.offloads;
}

void AdapterCycler::Tick(int64_t requests_admitted) {
  if (!enabled()) return;
  // Drained adapters go first, so the event below can reuse their index.
  for (auto it = slots_.begin(); it != slots_.end();) {
    const uint32_t index = it->first;
    const bool drained = it->second.draining && it->second.live == 0;
    ++it;
    if (drained) Offload(index);
  }
  if (requests_admitted < next_event_at_) return;
  next_event_at_ = requests_admitted + opt_.every_requests;
  ++events_;
  if (static_cast<int>(slots_.size()) < opt_.max_loaded) {
    pb::AdapterParameters params;
    const std::string& first = opt_.ids[(*rng_)() % opt_.ids.size()];
    params.add_adapter_ids(first);
    if (opt_.ids.size() > 1 && stats_.loads % 4 == 3) {
      // A linear merge of two different adapters, equal weights.
      std::string second = first;
      while (second == first) second = opt_.ids[(*rng_)() % opt_.ids.size()];
      params.add_adapter_ids(second);
      params.add_weights(0.5f);
      params.add_weights(0.5f);
      params.set_merge_strategy(pb::LINEAR);
    }
    // The router gives each distinct adapter (merge) an index once and keeps it: a reload of
    // the same adapter reuses its index, a new one gets the next.
    const std::string key = params.SerializeAsString();
    const uint32_t index =
        index_of_.emplace(key, static_cast<uint32_t>(index_of_.size() + 1)).first->second;
    if (slots_.count(index)) return;  // already loaded: this event is a no-op
    if (Load(index, params)) {
      slots_[index] = Slot{params, 0, false, events_};
      stats_.max_loaded_at_once =
          std::max<int64_t>(stats_.max_loaded_at_once, static_cast<int64_t>(slots_.size()));
    }
    return;
  }
  // No room: the oldest adapter still taking requests starts draining.
  Slot* oldest = nullptr;
  for (auto& [i, slot] : slots_) {
    if (!slot.draining && (oldest == nullptr || slot.loaded_at < oldest->loaded_at)) {
      oldest = &slot;
    }
  }
  if (oldest != nullptr) oldest->draining = true;
}

void AdapterCycler::Finish() {
  std::vector<uint32_t> left;
  for (const auto& [index, slot] : slots_) {
    if (slot.live != 0) {
      violation_(absl::StrCat("adapter index ", index, " still has ", slot.live,
                              " live requests at the end of the run (harness bug)"));
    }
    left.push_back(index);
  }
  for (uint32_t index : left) Offload(index);
}

}  // namespace load
}  // namespace phishard
