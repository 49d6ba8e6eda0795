#include "tests/load/router_emulator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace phishard {
namespace load {
namespace {

namespace pb = ::generate::v1;
using Clock = std::chrono::steady_clock;

constexpr int kBlockSize = 16;
// tonic's default decode limit in the router (spec §2.1).
constexpr size_t kRouterDecodeLimit = 4u << 20;

int BlocksFor(int tokens) { return (tokens + kBlockSize - 1) / kBlockSize; }

double Ms(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Prompt material: the demo model was trained on Python, so code keeps its outputs varied (and
// its EOS rare); the non-ASCII lines make byte-level tokens split multi-byte characters.
constexpr const char* kSnippets[] = {
    "import os\n",
    "from typing import Any, Optional\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "class Config:\n    def __init__(self, path):\n        self.path = path\n",
    "    for i in range(len(items)):\n        total += items[i]\n",
    "# Résumé: naïve café, 東京, emoji 🚀🔥 and math ∑∫√\n",
    "try:\n    value = json.loads(text)\nexcept ValueError as e:\n    raise\n",
    "    return {k: v for k, v in sorted(d.items())}\n",
    "@property\ndef shape(self):\n    return self._shape\n",
    "if __name__ == \"__main__\":\n    main()\n",
    "x = np.zeros((3, 4), dtype=np.float32)\n",
    "    logger.info(\"loaded %d rows\", len(rows))\n",
    "async def fetch(url):\n    async with session.get(url) as r:\n        return await r.text()\n",
    "\t\t\"\"\"Docstring with    irregular   spacing.\"\"\"\n",
};
constexpr const char* kStops[] = {"\n", "\n\n", "):", "return", " ", "self", "🚀", "é"};

bool Utf8(const std::string& s) { return IsValidUtf8(s); }

}  // namespace

double LatencyStats::Percentile(double p) const {
  if (ms.empty()) return 0;
  std::vector<double> v = ms;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * v.size()));
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

double LatencyStats::Max() const {
  return ms.empty() ? 0 : *std::max_element(ms.begin(), ms.end());
}

RouterEmulator::RouterEmulator(RouterSession* session, const Tokenizer* tokenizer,
                               std::vector<int32_t> eos_token_ids, int vocab_size,
                               int max_position_embeddings, WorkloadOptions options)
    : session_(session),
      tokenizer_(tokenizer),
      eos_(std::move(eos_token_ids)),
      vocab_size_(vocab_size),
      max_positions_(max_position_embeddings),
      opt_(options),
      rng_(options.seed),
      adapters_(session, options.adapters, &rng_,
                [this](const std::string& what) { Violation(what); }) {}

void RouterEmulator::Violation(const std::string& what) { violations_.push_back(what); }

absl::Status RouterEmulator::Startup() {
  if (absl::Status s = session_->ClearCache(std::nullopt); !s.ok()) return s;
  absl::StatusOr<pb::InfoResponse> info = session_->Info();
  if (!info.ok()) return info.status();
  if (info->requires_padding() || info->block_size() != kBlockSize || info->has_window_size() ||
      !info->supports_generation() || info->chunked_prefill() || info->speculate() != 0) {
    Violation(absl::StrCat("Info not what the router needs: ", info->ShortDebugString()));
  }
  const uint32_t max_total = std::min<uint32_t>(opt_.max_input_length + 1, max_positions_);
  absl::StatusOr<std::optional<uint32_t>> tokens = session_->Warmup(
      RouterWarmupRequest(opt_.max_input_length, opt_.max_prefill_tokens, max_total));
  if (!tokens.ok()) return tokens.status();
  if (!tokens->has_value()) {
    return absl::InternalError("Warmup left max_supported_total_tokens unset (spec §2.3)");
  }
  if (**tokens % kBlockSize != 0 || **tokens < opt_.max_prefill_tokens) {
    Violation(
        absl::StrFormat("Warmup: max_supported_total_tokens %d is not a multiple of 16 "
                        ">= max_prefill_tokens %d",
                        **tokens, opt_.max_prefill_tokens));
  }
  stats_.kv_blocks_total = static_cast<int>(**tokens / kBlockSize);
  router_blocks_ = info->requires_block_allocator();
  free_block_ids_.clear();
  if (router_blocks_) {
    for (int b = 1; b < stats_.kv_blocks_total; ++b) free_block_ids_.push_back(b);
  }
  // The warmup batch must not stay cached (spec §10: "After Warmup the batch cache is empty").
  pb::DecodeRequest d;
  d.add_batches()->set_id(0);
  absl::StatusOr<pb::DecodeResponse> r = session_->shard(0).Decode(d);
  if (r.ok() || r.status().message().find("Batch ID 0 not found in cache.") == std::string::npos) {
    Violation(absl::StrCat("Decode([0]) after Warmup: ", r.ok() ? "OK" : r.status().ToString()));
  }
  return absl::OkStatus();
}

RouterEmulator::Req RouterEmulator::MakeRequest() {
  auto uniform = [&](double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(rng_);
  };
  auto chance = [&](double p) { return uniform(0, 1) < p; };
  auto pick = [&](int n) { return static_cast<int>(rng_() % static_cast<uint64_t>(n)); };

  // Prompt lengths: mostly short, a tail of long ones (prefill cost is O(P^2) in attention).
  const double u = uniform(0, 1);
  const int target = u < 0.6    ? 1 + pick(32)
                     : u < 0.92 ? 32 + pick(170)
                                : 200 + pick(std::max(1, opt_.max_prompt_tokens - 200));
  std::string text;
  std::vector<int32_t> ids;
  while (static_cast<int>(ids.size()) < target) {
    text += kSnippets[pick(std::size(kSnippets))];
    ids = tokenizer_->Encode(text);
  }
  Req r;
  r.id = next_request_id_++;
  // truncate keeps the last `target` tokens: the router's --max-input-tokens cut.
  const uint32_t truncate = static_cast<uint32_t>(std::min<size_t>(target, ids.size()));
  r.prompt_len = static_cast<int>(truncate);
  const int max_new_cap = std::min(opt_.max_new_tokens, max_positions_ - r.prompt_len);
  const int max_new = chance(0.15) ? 1 : 1 + pick(std::max(1, max_new_cap));
  std::vector<uint32_t> uids(ids.begin(), ids.end());
  r.proto = RouterRequest(r.id, text, uids, truncate, static_cast<uint32_t>(max_new));
  pb::NextTokenChooserParameters* p = r.proto.mutable_parameters();
  if (chance(0.5)) {
    r.sampled = true;
    p->set_do_sample(true);
    p->set_temperature(static_cast<float>(uniform(0.3, 1.5)));
    if (chance(0.5)) p->set_top_k(1 + pick(50));
    if (chance(0.5)) p->set_top_p(static_cast<float>(uniform(0.5, 0.99)));
    if (chance(0.2)) p->set_typical_p(static_cast<float>(uniform(0.5, 0.99)));
    p->set_seed(rng_());
  }
  if (chance(0.2)) p->set_repetition_penalty(static_cast<float>(uniform(1.0, 1.5)));
  if (chance(0.1)) {
    p->set_frequency_penalty(static_cast<float>(uniform(0, 1)));
    p->set_presence_penalty(static_cast<float>(uniform(0, 1)));
  }
  if (chance(0.05)) p->set_watermark(true);
  if (chance(0.1)) p->set_return_k_alternatives(1 + pick(5));
  if (chance(0.1)) r.proto.set_prefill_logprobs(true);
  pb::StoppingCriteriaParameters* st = r.proto.mutable_stopping_parameters();
  if (chance(0.3)) {
    const int n = 1 + pick(2);
    for (int k = 0; k < n; ++k) {
      r.stops.push_back(kStops[pick(std::size(kStops))]);
      st->add_stop_sequences(r.stops.back());
    }
  }
  if (chance(0.2)) st->set_ignore_eos_token(true);
  r.proto.set_adapter_index(adapters_.Assign());
  r.blocks = BlocksFor(r.prompt_len + max_new - 1);
  return r;
}

int RouterEmulator::BlocksHeld() const {
  int n = 0;
  for (const auto& [id, b] : batch_blocks_) n += b;
  return n;
}

void RouterEmulator::Retire(uint64_t id) {
  auto it = reqs_.find(id);
  if (it == reqs_.end()) return;
  if (it->second.cancelled) ++stats_.cancelled;
  adapters_.Release(it->second.proto.adapter_index());
  free_block_ids_.insert(free_block_ids_.end(), it->second.block_ids.begin(),
                         it->second.block_ids.end());
  reqs_.erase(it);
  retired_.insert(id);
}

void RouterEmulator::CheckGeneration(Req& r, const pb::Generation& g, bool prefill) {
  const std::string who = absl::StrCat("request ", r.id, ": ");
  const pb::NextTokens& t = g.next_tokens();
  if (t.ids_size() != 1 || t.logprobs_size() != 1 || t.texts_size() != 1 ||
      t.is_special_size() != 1) {
    Violation(
        absl::StrFormat("%snext_tokens lists ids %d logprobs %d texts %d is_special %d "
                        "(want one token each)",
                        who, t.ids_size(), t.logprobs_size(), t.texts_size(), t.is_special_size()));
    return;
  }
  const uint32_t id = t.ids(0);
  if (id >= static_cast<uint32_t>(vocab_size_)) Violation(absl::StrCat(who, "token id ", id));
  if (!(t.logprobs(0) <= 1e-3f)) Violation(absl::StrCat(who, "logprob ", t.logprobs(0)));
  if (!Utf8(t.texts(0))) Violation(who + "next_tokens.texts not UTF-8");
  if (t.is_special(0) != tokenizer_->IsSpecial(static_cast<int32_t>(id))) {
    Violation(absl::StrCat(who, "is_special wrong for ", id));
  }
  const uint32_t k = r.proto.parameters().return_k_alternatives();
  if (k > 0) {
    if (t.alternative_tokens_size() != 1 || t.alternative_tokens(0).ids_size() != (int)k ||
        t.alternative_tokens(0).logprobs_size() != (int)k ||
        t.alternative_tokens(0).texts_size() != (int)k) {
      Violation(absl::StrCat(who, "want ", k, " alternatives"));
    } else {
      const pb::AlternativeTokens& a = t.alternative_tokens(0);
      for (int i = 0; i < a.texts_size(); ++i) {
        if (!Utf8(a.texts(i))) Violation(who + "alternative text not UTF-8");
        if (i > 0 && a.logprobs(i) > a.logprobs(i - 1)) {
          Violation(who + "alternatives not sorted by logprob");
        }
      }
    }
  } else if (t.alternative_tokens_size() != 0) {
    Violation(who + "alternatives nobody asked for");
  }
  if (prefill) {
    if (g.prefill_tokens_length() != static_cast<uint32_t>(r.prompt_len)) {
      Violation(absl::StrFormat("%sprefill_tokens_length %d, want %d", who,
                                g.prefill_tokens_length(), r.prompt_len));
    }
    if (g.has_prefill_tokens() != r.proto.prefill_logprobs()) {
      Violation(who + "prefill_tokens present iff prefill_logprobs");
    }
    if (g.has_prefill_tokens()) {
      const pb::PrefillTokens& p = g.prefill_tokens();
      if (p.ids_size() != r.prompt_len || p.logprobs_size() != r.prompt_len ||
          p.texts_size() != r.prompt_len) {
        Violation(who + "prefill_tokens lists are not P long");
      } else {
        if (!std::isnan(p.logprobs(0))) Violation(who + "first prefill logprob is not NaN");
        const auto& sent = r.proto.tokenized_inputs().ids();
        for (int i = 0; i < r.prompt_len; ++i) {
          if (p.ids(i) != sent[sent.size() - r.prompt_len + i]) {
            Violation(who + "prefill_tokens.ids are not the truncated prompt");
            break;
          }
        }
        for (int i = 0; i < r.prompt_len; ++i) {
          if (!Utf8(p.texts(i))) Violation(who + "prefill text not UTF-8");
          if (i > 0 && !(p.logprobs(i) <= 1e-3f)) Violation(who + "bad prefill logprob");
        }
      }
    }
  } else if (g.has_prefill_tokens()) {
    Violation(who + "prefill_tokens on a decode step");
  }

  ++r.tokens;
  ++stats_.tokens;
  r.text += t.texts(0);
  r.last_id = static_cast<int32_t>(id);
  const uint32_t max_new = r.proto.stopping_parameters().max_new_tokens();
  const bool ignore_eos = r.proto.stopping_parameters().ignore_eos_token();
  const bool is_eos = std::find(eos_.begin(), eos_.end(), r.last_id) != eos_.end();
  if (!g.has_generated_text()) {
    if (r.tokens >= static_cast<int>(max_new)) Violation(who + "not finished at max_new_tokens");
    if (is_eos && !ignore_eos) Violation(who + "not finished on EOS");
    return;
  }
  const pb::GeneratedText& gt = g.generated_text();
  r.finished = true;
  ++stats_.finished;
  if (!Utf8(gt.text())) Violation(who + "generated_text.text not UTF-8");
  if (gt.generated_tokens() != static_cast<uint32_t>(r.tokens)) {
    Violation(absl::StrFormat("%sgenerated_tokens %d but %d tokens were streamed", who,
                              gt.generated_tokens(), r.tokens));
  }
  switch (gt.finish_reason()) {
    case pb::FINISH_REASON_LENGTH:
      ++stats_.finish_length;
      if (r.tokens != static_cast<int>(max_new)) Violation(who + "LENGTH before max_new_tokens");
      break;
    case pb::FINISH_REASON_EOS_TOKEN:
      ++stats_.finish_eos;
      if (!is_eos || ignore_eos) Violation(who + "EOS_TOKEN without an EOS token");
      break;
    case pb::FINISH_REASON_STOP_SEQUENCE: {
      ++stats_.finish_stop;
      const std::string_view out = r.text;
      const std::string_view trimmed =
          out.ends_with("\n") ? out.substr(0, out.size() - 1) : std::string_view();
      bool matched = false;
      for (const std::string& s : r.stops) {
        matched |= out.ends_with(s) || (!trimmed.empty() && trimmed.ends_with(s));
      }
      if (!matched) Violation(who + "STOP_SEQUENCE but the text does not end with one");
      break;
    }
    default:
      Violation(who + "unknown finish_reason");
  }
  const pb::NextTokenChooserParameters& p = r.proto.parameters();
  if (gt.has_seed() && gt.seed() != p.seed()) Violation(who + "seed is not the request's");
  if (p.do_sample() && p.temperature() != 0 && !gt.has_seed()) {
    Violation(who + "sampled request finished without its seed");
  }
  if (!r.sampled && p.temperature() == 1.0f && gt.has_seed()) {
    Violation(who + "greedy request reported a seed");
  }
}

std::vector<uint64_t> RouterEmulator::Absorb(
    const google::protobuf::RepeatedPtrField<pb::Generation>& gens,
    const std::vector<uint64_t>& ids, bool prefill) {
  std::set<uint64_t> want(ids.begin(), ids.end());
  std::set<uint64_t> seen;
  std::vector<uint64_t> finished;
  for (const pb::Generation& g : gens) {
    const uint64_t id = g.request_id();
    if (retired_.count(id)) {
      Violation(absl::StrCat("generation for request ", id, " after it finished or left"));
      continue;
    }
    auto it = reqs_.find(id);
    if (!want.count(id) || it == reqs_.end()) {
      Violation(absl::StrCat("generation for request ", id, ", not in the batch"));
      continue;
    }
    if (!seen.insert(id).second) {
      Violation(absl::StrCat("two generations for request ", id, " in one step"));
      continue;
    }
    if (it->second.finished) {
      Violation(absl::StrCat("request ", id, " generated after finishing"));
      continue;
    }
    CheckGeneration(it->second, g, prefill);
    if (it->second.finished) finished.push_back(id);
  }
  // Requests that finished in this step were seen; any other unseen one was skipped.
  for (uint64_t id : ids) {
    auto it = reqs_.find(id);
    if (it != reqs_.end() && !seen.count(id) && !it->second.finished) {
      Violation(absl::StrCat("no generation for live request ", id));
    }
  }
  return finished;
}

void RouterEmulator::CheckCached(const pb::CachedBatch& b, uint64_t want_id,
                                 const std::vector<uint64_t>& want_ids, const char* where) {
  const std::string who = absl::StrCat(where, " batch ", want_id, ": ");
  if (b.id() != want_id) Violation(absl::StrCat(who, "CachedBatch.id ", b.id()));
  const std::vector<uint64_t> got(b.request_ids().begin(), b.request_ids().end());
  if (got != want_ids) {
    Violation(absl::StrCat(who, "request_ids [", absl::StrJoin(got, ","), "], want [",
                           absl::StrJoin(want_ids, ","), "]"));
  }
  if (b.size() != static_cast<uint32_t>(want_ids.size())) {
    Violation(absl::StrCat(who, "size ", b.size(), " for ", want_ids.size(), " requests"));
  }
  int blocks = 0, live = 0;
  for (uint64_t id : want_ids) {
    auto it = reqs_.find(id);
    if (it == reqs_.end()) continue;
    blocks += it->second.blocks;
    live += it->second.finished ? 0 : 1;
  }
  if (b.max_tokens() % kBlockSize != 0 || b.max_tokens() != static_cast<uint32_t>(blocks) * 16) {
    Violation(absl::StrFormat("%smax_tokens %d, want %d blocks x 16 = %d", who, b.max_tokens(),
                              blocks, blocks * 16));
  }
  if (b.current_tokens() != static_cast<uint32_t>(live)) {
    Violation(
        absl::StrFormat("%scurrent_tokens %d for %d live requests", who, b.current_tokens(), live));
  }
  batch_blocks_[want_id] = blocks;
  stats_.kv_blocks_peak = std::max(stats_.kv_blocks_peak, BlocksHeld());
  if (BlocksHeld() > stats_.kv_blocks_total) {
    Violation(absl::StrFormat("%s%d KV blocks held, more than the %d Warmup reported", who,
                              BlocksHeld(), stats_.kv_blocks_total));
  }
}

std::optional<RouterEmulator::Batch> RouterEmulator::Settle(std::optional<pb::CachedBatch> cached,
                                                            uint64_t want_id,
                                                            const std::vector<uint64_t>& want_ids,
                                                            const char* where) {
  if (!cached.has_value()) {
    batch_blocks_.erase(want_id);
    for (uint64_t id : want_ids) {
      if (!reqs_.at(id).finished) {
        Violation(absl::StrCat(where, " batch ", want_id, ": no CachedBatch with request ", id,
                               " unfinished"));
      }
      Retire(id);
    }
    return std::nullopt;
  }
  CheckCached(*cached, want_id, want_ids, where);
  return Trim(want_id, want_ids);
}

std::optional<RouterEmulator::Batch> RouterEmulator::Trim(uint64_t batch_id,
                                                          const std::vector<uint64_t>& ids) {
  std::vector<uint64_t> survivors;
  for (uint64_t id : ids) {
    const Req& r = reqs_.at(id);
    if (!r.finished && !r.cancelled) survivors.push_back(id);
  }
  if (survivors.empty()) {
    ++stats_.clears;
    if (absl::Status s = session_->ClearCache(batch_id); !s.ok()) {
      Violation(absl::StrCat("ClearCache(", batch_id, "): ", s.ToString()));
    }
    batch_blocks_.erase(batch_id);
    for (uint64_t id : ids) Retire(id);
    return std::nullopt;
  }
  if (survivors.size() < ids.size()) {
    ++stats_.filters;
    absl::StatusOr<std::optional<pb::CachedBatch>> f = session_->FilterBatch(batch_id, survivors);
    for (uint64_t id : ids) {
      if (std::find(survivors.begin(), survivors.end(), id) == survivors.end()) Retire(id);
    }
    if (!f.ok() || !f->has_value()) {
      Violation(absl::StrCat(
          "FilterBatch(", batch_id,
          "): ", f.ok() ? "answered without a batch (spec §2.3)" : f.status().ToString()));
      ++stats_.rpc_errors;
      for (uint64_t id : survivors) Retire(id);
      batch_blocks_.erase(batch_id);
      (void)session_->ClearCache(batch_id);
      return std::nullopt;
    }
    CheckCached(**f, batch_id, survivors, "FilterBatch");
  }
  return Batch{batch_id, survivors};
}

std::optional<RouterEmulator::Batch> RouterEmulator::PrefillNew(std::optional<Batch>* running) {
  const int live_running =
      running->has_value() ? static_cast<int>((*running)->request_ids.size()) : 0;
  const int room = std::min(opt_.max_batch_requests, opt_.max_running - live_running);
  if (room <= 0) return std::nullopt;
  const int want = 1 + static_cast<int>(rng_() % static_cast<uint64_t>(room));
  std::vector<Req> fresh;
  int blocks = 0, prefill_tokens = 0;
  for (int i = 0; i < want; ++i) {
    Req r = MakeRequest();
    // The router's admission: the block allocator and the prefill token budget.
    if (BlocksHeld() + blocks + r.blocks > stats_.kv_blocks_total ||
        (router_blocks_ && blocks + r.blocks > static_cast<int>(free_block_ids_.size())) ||
        prefill_tokens + r.prompt_len > static_cast<int>(opt_.max_prefill_tokens)) {
      --next_request_id_;
      adapters_.Release(r.proto.adapter_index());
      break;
    }
    blocks += r.blocks;
    prefill_tokens += r.prompt_len;
    fresh.push_back(std::move(r));
  }
  if (fresh.empty()) return std::nullopt;

  pb::PrefillRequest pre;
  pb::Batch* batch = pre.mutable_batch();
  batch->set_id(next_batch_id_++);
  const bool text_only =
      std::uniform_real_distribution<double>(0, 1)(rng_) < opt_.text_only_batches;
  if (text_only) ++stats_.text_only_batches;
  std::vector<uint64_t> ids;
  for (Req& r : fresh) {
    if (router_blocks_) {
      // ceil(N / 16) ids from the free list's tail, slots for exactly N tokens (§3.4).
      const int n =
          r.prompt_len + static_cast<int>(r.proto.stopping_parameters().max_new_tokens()) - 1;
      r.block_ids.assign(free_block_ids_.end() - r.blocks, free_block_ids_.end());
      free_block_ids_.resize(free_block_ids_.size() - r.blocks);
      r.proto.clear_blocks();
      r.proto.clear_slots();
      for (uint32_t b : r.block_ids) r.proto.add_blocks(b);
      for (int p = 0; p < n; ++p) r.proto.add_slots(r.block_ids[p / 16] * 16 + p % 16);
    }
    pb::Request* pr = batch->add_requests();
    *pr = r.proto;
    // A router without a tokenizer: the shard tokenizes `inputs` for the whole batch (§4.2).
    if (text_only) pr->clear_tokenized_inputs();
    ids.push_back(r.id);
    stats_.sampled += r.sampled ? 1 : 0;
    reqs_.emplace(r.id, std::move(r));
  }
  batch->set_size(static_cast<uint32_t>(ids.size()));
  batch->set_max_tokens(static_cast<uint32_t>(blocks * kBlockSize));
  stats_.requests += static_cast<int64_t>(ids.size());

  ++stats_.prefills;
  const auto t0 = Clock::now();
  absl::StatusOr<pb::PrefillResponse> resp = session_->Prefill(pre);
  stats_.prefill_ms.Add(Ms(t0));
  if (!resp.ok()) {
    ++stats_.rpc_errors;
    Violation(absl::StrCat("Prefill of batch ", batch->id(), " (", ids.size(), " requests, ",
                           blocks, " blocks, ", BlocksHeld(),
                           " held): ", resp.status().ToString()));
    (void)session_->ClearCache(batch->id());  // the router's reaction
    for (uint64_t id : ids) Retire(id);
    return std::nullopt;
  }
  const size_t bytes = resp->ByteSizeLong();
  stats_.max_response_bytes = std::max<int64_t>(stats_.max_response_bytes, bytes);
  if (bytes >= kRouterDecodeLimit) Violation(absl::StrCat("Prefill response of ", bytes, " bytes"));
  Absorb(resp->generations(), ids, /*prefill=*/true);
  return Settle(resp->has_batch() ? std::optional<pb::CachedBatch>(resp->batch()) : std::nullopt,
                batch->id(), ids, "Prefill");
}

std::optional<RouterEmulator::Batch> RouterEmulator::DecodeStep(const std::vector<Batch>& batches) {
  pb::DecodeRequest dec;
  std::vector<uint64_t> ids;
  int blocks = 0;
  for (const Batch& b : batches) {
    pb::CachedBatch* cb = dec.add_batches();
    cb->set_id(b.id);
    cb->mutable_request_ids()->Add(b.request_ids.begin(), b.request_ids.end());
    cb->set_size(static_cast<uint32_t>(b.request_ids.size()));
    ids.insert(ids.end(), b.request_ids.begin(), b.request_ids.end());
    blocks += batch_blocks_[b.id];
  }
  if (batches.size() > 1) ++stats_.concatenations;
  ++stats_.decodes;
  const auto t0 = Clock::now();
  absl::StatusOr<pb::DecodeResponse> resp = session_->Decode(dec);
  stats_.decode_ms.Add(Ms(t0));
  for (size_t i = 1; i < batches.size(); ++i) batch_blocks_.erase(batches[i].id);
  batch_blocks_[batches[0].id] = blocks;  // concatenated under the first id (§4.9)
  if (!resp.ok()) {
    ++stats_.rpc_errors;
    Violation(absl::StrCat("Decode: ", resp.status().ToString()));
    for (const Batch& b : batches) (void)session_->ClearCache(b.id);
    batch_blocks_.erase(batches[0].id);
    for (uint64_t id : ids) Retire(id);
    return std::nullopt;
  }
  const size_t bytes = resp->ByteSizeLong();
  stats_.max_response_bytes = std::max<int64_t>(stats_.max_response_bytes, bytes);
  if (bytes >= kRouterDecodeLimit) Violation(absl::StrCat("Decode response of ", bytes, " bytes"));
  Absorb(resp->generations(), ids, /*prefill=*/false);
  return Settle(resp->has_batch() ? std::optional<pb::CachedBatch>(resp->batch()) : std::nullopt,
                batches[0].id, ids, "Decode");
}

void RouterEmulator::HealthProbe() {
  // With the router's allocator the probe has block 0 to itself, also on a full pool.
  if (!router_blocks_ && BlocksHeld() + 1 > stats_.kv_blocks_total) return;
  // The router's generation probe (spec §3.8): ids u64::MAX, one token, one new token.
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  pb::PrefillRequest pre;
  pre.mutable_batch()->set_id(kMax);
  pb::Request* probe = pre.mutable_batch()->add_requests();
  *probe = RouterRequest(kMax, "liveness", {75}, 1, 1);
  if (router_blocks_) {
    probe->add_blocks(0);
    for (uint32_t s = 0; s < kBlockSize; ++s) probe->add_slots(s);
  }
  pre.mutable_batch()->set_size(1);
  ++stats_.health_probes;
  absl::StatusOr<pb::PrefillResponse> r = session_->Prefill(pre);
  if (!r.ok()) {
    ++stats_.rpc_errors;
    Violation(absl::StrCat("health probe Prefill: ", r.status().ToString()));
    return;
  }
  if (r->generations_size() != 1 || r->generations(0).request_id() != kMax ||
      !r->generations(0).has_generated_text() || r->has_batch()) {
    Violation("health probe: want one finished generation for u64::MAX and no batch");
  }
}

void RouterEmulator::Run() {
  const auto start = Clock::now();
  auto chance = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; };
  std::optional<Batch> running;
  for (;;) {
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const bool admitting = elapsed < opt_.duration_s &&
                           (opt_.max_requests <= 0 || stats_.requests < opt_.max_requests);
    adapters_.Tick(stats_.requests);
    if (!running.has_value()) {
      if (!admitting) break;
      if (chance(opt_.idle_clear_all)) {
        // A router (re)start clears everything; nothing is cached right now, so it is a no-op
        // that must succeed — and so must clearing an id that does not exist.
        ++stats_.clear_all;
        if (absl::Status s = session_->ClearCache(std::nullopt); !s.ok()) {
          Violation(absl::StrCat("ClearCache(all): ", s.ToString()));
        }
        if (absl::Status s = session_->ClearCache(next_batch_id_ + 1000); !s.ok()) {
          Violation(absl::StrCat("ClearCache(unknown id): ", s.ToString()));
        }
      }
      if (chance(opt_.health_probe_when_idle)) HealthProbe();
    }
    std::optional<Batch> fresh;
    if (admitting && (!running.has_value() || chance(0.4))) fresh = PrefillNew(&running);

    std::vector<Batch> step;
    if (running.has_value()) step.push_back(*running);
    if (fresh.has_value()) step.push_back(*fresh);
    running.reset();
    if (step.empty()) continue;

    // Clients that went away: the router filters them out before the next decode.
    for (Batch& b : step) {
      bool any = false;
      for (uint64_t id : b.request_ids) {
        if (chance(opt_.cancel_per_step)) {
          reqs_.at(id).cancelled = true;
          any = true;
        }
      }
      if (!any) continue;
      std::optional<Batch> kept = Trim(b.id, b.request_ids);
      b.request_ids = kept.has_value() ? kept->request_ids : std::vector<uint64_t>();
    }
    std::erase_if(step, [](const Batch& b) { return b.request_ids.empty(); });
    if (step.empty()) continue;
    running = DecodeStep(step);
  }
  adapters_.Finish();
}

void RouterEmulator::CapacityProbe() {
  if (absl::Status s = session_->ClearCache(std::nullopt); !s.ok()) {
    Violation(absl::StrCat("ClearCache(all) before the capacity probe: ", s.ToString()));
    return;
  }
  const int total = stats_.kv_blocks_total;
  // Requests of one prompt token: a request holds ceil((1 + max_new - 1) / 16) blocks, at most
  // max_positions - 1 new tokens. With the router's allocator they carry every id 0..total-1
  // (block 0 too: the probe's block is free between probes); requests without blocks would get
  // only the tail the shard keeps for them (--unrouted-kv-blocks), not what Warmup reported.
  const int per_request = BlocksFor(max_positions_ - 1);
  auto full_pool = [&](uint64_t batch_id) {
    pb::PrefillRequest pre;
    pre.mutable_batch()->set_id(batch_id);
    int left = total;
    uint64_t rid = 1;
    uint32_t next_block = 0;
    while (left > 0) {
      const int b = std::min(left, per_request);
      const uint32_t max_new = static_cast<uint32_t>(std::min(b * kBlockSize, max_positions_ - 1));
      pb::Request r = RouterRequest(rid++, "x", {100}, 1, max_new);
      r.mutable_stopping_parameters()->set_ignore_eos_token(true);
      if (router_blocks_) {
        for (int k = 0; k < BlocksFor(max_new); ++k) r.add_blocks(next_block++);
      }
      *pre.mutable_batch()->add_requests() = r;
      left -= BlocksFor(max_new);
    }
    pre.mutable_batch()->set_size(static_cast<uint32_t>(pre.batch().requests_size()));
    return pre;
  };
  bool ok = true;
  for (int round = 0; round < 2 && ok; ++round) {
    absl::StatusOr<pb::PrefillResponse> full = session_->Prefill(full_pool(7'000'000 + round));
    if (!full.ok() || !full->has_batch() ||
        full->batch().max_tokens() != static_cast<uint32_t>(total) * kBlockSize) {
      Violation(absl::StrCat("capacity probe round ", round, ": a Prefill of all ", total,
                             " blocks: ",
                             full.ok() ? absl::StrCat("max_tokens ", full->batch().max_tokens())
                                       : full.status().ToString(),
                             " (blocks leaked?)"));
      ok = false;
      break;
    }
    // One block more: without the router's allocator any block is RESOURCE_EXHAUSTED; with it
    // every id is held, so the last one again is FAILED_PRECONDITION.
    pb::PrefillRequest one;
    one.mutable_batch()->set_id(7'100'000);
    pb::Request r = RouterRequest(1, "x", {100}, 1, 2);
    if (router_blocks_) r.add_blocks(static_cast<uint32_t>(total - 1));
    *one.mutable_batch()->add_requests() = r;
    const absl::StatusCode want = router_blocks_ ? absl::StatusCode::kFailedPrecondition
                                                 : absl::StatusCode::kResourceExhausted;
    absl::StatusOr<pb::PrefillResponse> extra = session_->Prefill(one);
    if (extra.ok() || extra.status().code() != want) {
      Violation(absl::StrCat("capacity probe: one block beyond a full pool: ",
                             extra.ok() ? "OK" : extra.status().ToString(), " (want ",
                             absl::StatusCodeToString(want), ")"));
      ok = false;
    }
    if (absl::Status s = session_->ClearCache(std::nullopt); !s.ok()) {
      Violation(absl::StrCat("ClearCache(all) in the capacity probe: ", s.ToString()));
      ok = false;
    }
  }
  stats_.capacity_probe_ok = ok;
}

}  // namespace load
}  // namespace phishard
