#include "server/batch_engine.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "model/kv_cache.h"
#include "server/batch_engine_state.h"
#include "server/batch_state.h"
#include "server/parallel_choose.h"
#include "server/request_log.h"
#include "server/request_validation.h"

namespace phishard {
namespace {

// Keeps the last `n` tokens (n == 0 keeps everything: upstream's slicing of truncate = 0).
std::vector<int32_t> KeepLast(std::vector<int32_t> ids, uint32_t n) {
  if (n > 0 && ids.size() > n) ids.erase(ids.begin(), ids.end() - n);
  return ids;
}

}  // namespace

absl::StatusOr<std::vector<RequestState>> BatchEngine::State::BuildRequests(const BatchInput& batch,
                                                                            bool warmup) {
  if (batch.requests.empty()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("batch %d has no requests (batch.requests is empty)", batch.id));
  }
  const size_t n = batch.requests.size();
  absl::flat_hash_set<uint64_t> seen_ids;
  bool all_tokenized = true;
  uint32_t max_truncate = 0;
  for (size_t i = 0; i < n; ++i) {
    const RequestInput& r = batch.requests[i];
    if (absl::Status s = ValidateRequestFields(r, i, vocab_size); !s.ok()) return s;
    // The warmup batch has every id = 0 (§3.2); anywhere else a duplicate would make the
    // router's FilterBatch ambiguous.
    if (!warmup && !seen_ids.insert(r.id).second) {
      return absl::InvalidArgumentError(
          absl::StrFormat("requests[%d].id = %d appears twice in batch %d", i, r.id, batch.id));
    }
    all_tokenized = all_tokenized && !r.token_ids.empty();
    max_truncate = std::max(max_truncate, r.truncate);
  }

  // §4.2 step 1: router token ids only if every request has them, else tokenize all inputs.
  std::vector<std::vector<int32_t>> prompts(n);
  for (size_t i = 0; i < n; ++i) {
    const RequestInput& r = batch.requests[i];
    std::vector<int32_t> ids;
    if (all_tokenized) {
      ids = r.token_ids;
    } else {
      if (!IsValidUtf8(r.inputs)) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "requests[%d].inputs is not valid UTF-8 (needed to tokenize it: not every request "
            "of the batch has tokenized_inputs.ids)",
            i));
      }
      ids = tokenizer->EncodeWithSpecialTokens(r.inputs);
      for (size_t k = 0; k < ids.size(); ++k) {
        if (ids[k] < 0 || ids[k] >= vocab_size) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "requests[%d].inputs tokenizes to id %d (token %d), out of the model's range "
              "[0, %d)",
              i, ids[k], k, vocab_size));
        }
      }
    }
    prompts[i] = KeepLast(KeepLast(std::move(ids), max_truncate), r.truncate);
    if (absl::Status s = ValidatePromptLength(r, i, static_cast<int>(prompts[i].size()),
                                              model->config().max_position_embeddings);
        !s.ok()) {
      return s;
    }
  }

  std::vector<RequestState> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const RequestInput& r = batch.requests[i];
    out.emplace_back(r.id, r.adapter_index, r.prefill_logprobs, std::move(prompts[i]),
                     NextTokenChooser(r.parameters, vocab_size, watermark),
                     StoppingCriteria(r.stopping, eos_token_ids));
  }
  return out;
}

void BatchEngine::State::MarkGreedy(const RequestState& r, size_t row, ForwardBatch* fb) const {
  if (!options.greedy_on_backend || !r.chooser.plain_greedy()) return;
  fb->greedy_rows.resize(fb->logit_rows.size(), 0);
  fb->greedy_rows[row] = 1;
}

absl::Status BatchEngine::State::ForwardOrError(const ForwardBatch& fb) {
  picks = {};
  if (fb.greedy_rows.empty()) {
    if (absl::Status s = model->ForwardView(fb, &logits); !s.ok()) return s;
  } else {
    if (absl::Status s = model->ForwardGreedy(fb, &logits, &picks); !s.ok()) return s;
    if (picks.size() != fb.logit_rows.size()) {
      return absl::InternalError(absl::StrFormat("model returned %d greedy picks for %d rows",
                                                 picks.size(), fb.logit_rows.size()));
    }
  }
  const size_t expected = fb.logit_rows.size() * static_cast<size_t>(vocab_size);
  if (logits.size() != expected) {
    return absl::InternalError(absl::StrFormat("model returned %d logits for %d rows of vocab %d",
                                               logits.size(), fb.logit_rows.size(), vocab_size));
  }
  return absl::OkStatus();
}

absl::Status BatchEngine::State::CheckLogitsNotNaN(const ForwardBatch& fb,
                                                   absl::Span<RequestState* const> requests,
                                                   absl::Span<const int> rows) const {
  for (size_t i = 0; i < requests.size(); ++i) {
    const bool greedy = !fb.greedy_rows.empty() && fb.greedy_rows[rows[i]] != 0;
    const bool nan = greedy ? std::isnan(picks[rows[i]].logprob)
                            : std::isnan(logits[static_cast<size_t>(rows[i]) * vocab_size]);
    if (nan) {
      return absl::InternalError(absl::StrFormat(
          "the model's logits for request %d are NaN: a numeric fault in the forward pass (a "
          "float16 overflow: --dtype bfloat16 avoids it) or a device fault; no request of the "
          "step was advanced",
          requests[i]->id));
    }
  }
  return absl::OkStatus();
}

void BatchEngine::State::ChooseAll(const ForwardBatch& fb, absl::Span<RequestState* const> requests,
                                   absl::Span<const int> rows) {
  const auto greedy = [&](size_t i) {
    return !fb.greedy_rows.empty() && fb.greedy_rows[rows[i]] != 0;
  };
  choose_tasks.clear();
  for (size_t i = 0; i < requests.size(); ++i) {
    if (greedy(i)) continue;
    choose_tasks.push_back({.chooser = &requests[i]->chooser,
                            .logits = logits.data() + static_cast<size_t>(rows[i]) * vocab_size,
                            .history = requests[i]->all_ids});
  }
  ChooseRows(choose_tasks, vocab_size, options.chooser_threads, &choose_scratch, &task_choices);
  // A greedy Choose draws nothing from the request's RNG, so skipping it changes no state.
  choices.resize(requests.size());
  for (size_t i = 0, t = 0; i < requests.size(); ++i) {
    if (greedy(i)) {
      const GreedyPick& p = picks[rows[i]];
      choices[i] = TokenChoice{};
      choices[i].id = p.id;
      choices[i].logprob = p.logprob;
    } else {
      choices[i] = std::move(task_choices[t++]);
    }
  }
}

void BatchEngine::State::AcceptToken(RequestState* r, const TokenChoice& choice,
                                     GenerationOut* gen) {
  if (gen != nullptr && !choice.alt_ids.empty()) {
    AlternativeTokensOut alt;
    alt.ids = choice.alt_ids;
    alt.logprobs = choice.alt_logprobs;
    for (int32_t id : choice.alt_ids) {
      alt.texts.push_back(r->detokenizer.Peek(*tokenizer, r->all_ids, id));
    }
    gen->next_tokens.alternative_tokens.push_back(std::move(alt));
  }
  r->all_ids.push_back(choice.id);
  // Every rank detokenizes every request: stop sequences match on text, and the state must stay
  // identical on all ranks.
  std::string text = r->detokenizer.Next(*tokenizer, r->all_ids);
  const std::optional<FinishReason> reason = r->stopping.Step(choice.id, text);
  r->finished = reason.has_value();
  if (gen == nullptr) return;
  gen->request_id = r->id;
  gen->next_tokens.ids.push_back(choice.id);
  gen->next_tokens.logprobs.push_back(choice.logprob);
  gen->next_tokens.texts.push_back(std::move(text));
  gen->next_tokens.is_special.push_back(tokenizer->IsSpecial(choice.id));
  if (reason.has_value()) {
    GeneratedTextOut done;
    done.text = DecodeGeneratedText(*tokenizer, r->all_ids, r->prompt_len);
    done.generated_tokens = r->stopping.generated_tokens();
    done.finish_reason = *reason;
    if (r->chooser.sampling()) done.seed = r->chooser.seed();
    gen->generated_text = std::move(done);
  }
}

absl::Status BatchEngine::State::RunPrefill(std::vector<RequestState>* requests,
                                            std::vector<GenerationOut>* generations) {
  // [T] tokens, request-major; logit rows: the last token of every request, plus every token
  // of the requests that asked for prefill logprobs.
  ForwardBatch fb;
  std::vector<int> first_row(requests->size());  // index into logit_rows of r's first row
  for (size_t i = 0; i < requests->size(); ++i) {
    RequestState& r = (*requests)[i];
    const int start = fb.num_tokens();
    for (int p = 0; p < r.prompt_len; ++p) {
      fb.token_ids.push_back(r.all_ids[p]);
      fb.positions.push_back(p);
    }
    SequenceInput seq;
    seq.num_new_tokens = r.prompt_len;
    seq.context_len = r.prompt_len;
    seq.block_table = r.blocks;
    seq.adapter_index = r.adapter_index;
    fb.seqs.push_back(std::move(seq));
    first_row[i] = static_cast<int>(fb.logit_rows.size());
    const int row_begin = r.prefill_logprobs ? start : start + r.prompt_len - 1;
    for (int t = row_begin; t < start + r.prompt_len; ++t) fb.logit_rows.push_back(t);
    MarkGreedy(r, fb.logit_rows.size() - 1, &fb);  // only the last row chooses a token
  }
  if (!fb.greedy_rows.empty()) fb.greedy_rows.resize(fb.logit_rows.size(), 0);
  if (absl::Status s = ForwardOrError(fb); !s.ok()) return s;

  std::vector<RequestState*> choosing;
  std::vector<int> last_rows;
  for (size_t i = 0; i < requests->size(); ++i) {
    RequestState& r = (*requests)[i];
    choosing.push_back(&r);
    last_rows.push_back(first_row[i] + (r.prefill_logprobs ? r.prompt_len : 1) - 1);
  }
  if (absl::Status s = CheckLogitsNotNaN(fb, choosing, last_rows); !s.ok()) return s;
  // Nothing below can fail: state changes start here.
  ChooseAll(fb, choosing, last_rows);
  for (size_t i = 0; i < requests->size(); ++i) {
    RequestState& r = (*requests)[i];
    const bool owned = generations != nullptr && Owns(r.id);
    GenerationOut gen;
    if (owned) {
      gen.request_id = r.id;
      gen.prefill_tokens_length = static_cast<uint32_t>(r.prompt_len);
      if (r.prefill_logprobs) {
        // §4.4: logprob of prompt token k from the raw logits at position k-1; the first is NaN.
        TokensOut pt;
        pt.ids.assign(r.all_ids.begin(), r.all_ids.begin() + r.prompt_len);
        pt.logprobs.push_back(std::numeric_limits<float>::quiet_NaN());
        for (int k = 1; k < r.prompt_len; ++k) {
          const float* row = logits.data() + static_cast<size_t>(first_row[i] + k - 1) * vocab_size;
          const double lse = LogSumExp(absl::MakeConstSpan(row, vocab_size));
          pt.logprobs.push_back(static_cast<float>(row[r.all_ids[k]] - lse));
        }
        for (int k = 0; k < r.prompt_len; ++k) {
          pt.texts.push_back(DecodeSingleToken(*tokenizer, r.all_ids[k]));
        }
        gen.prefill_tokens = std::move(pt);  // is_special stays empty (§4.4)
      }
    }
    r.cache_len = r.prompt_len;
    AcceptToken(&r, choices[i], owned ? &gen : nullptr);
    if (owned) generations->push_back(std::move(gen));
  }
  return absl::OkStatus();
}

absl::Status BatchEngine::State::RunDecode(const std::vector<RequestState*>& requests,
                                           std::vector<GenerationOut>* generations) {
  // One new token per unfinished request at position cache_len; finished requests are skipped.
  ForwardBatch fb;
  std::vector<RequestState*> fed;
  for (RequestState* r : requests) {
    if (r->finished) continue;
    const int pos = r->cache_len;
    PHI_CHECK(pos + 1 == static_cast<int>(r->all_ids.size()));
    PHI_CHECK(KvBlockAllocator::BlocksFor(pos + 1, allocator.block_size()) <=
              static_cast<int>(r->blocks.size()))
        << "request " << r->id << " outgrew its KV blocks";
    fb.token_ids.push_back(r->all_ids.back());
    fb.positions.push_back(pos);
    SequenceInput seq;
    seq.num_new_tokens = 1;
    seq.context_len = pos + 1;
    seq.block_table = r->blocks;
    seq.adapter_index = r->adapter_index;
    fb.seqs.push_back(std::move(seq));
    fb.logit_rows.push_back(static_cast<int32_t>(fed.size()));
    MarkGreedy(*r, fb.logit_rows.size() - 1, &fb);
    fed.push_back(r);
  }
  if (fed.empty()) return absl::OkStatus();
  if (!fb.greedy_rows.empty()) fb.greedy_rows.resize(fb.logit_rows.size(), 0);
  if (absl::Status s = ForwardOrError(fb); !s.ok()) return s;

  std::vector<int> rows(fed.size());
  std::iota(rows.begin(), rows.end(), 0);
  if (absl::Status s = CheckLogitsNotNaN(fb, fed, rows); !s.ok()) return s;
  ChooseAll(fb, fed, rows);
  for (size_t i = 0; i < fed.size(); ++i) {
    RequestState* r = fed[i];
    const bool owned = generations != nullptr && Owns(r->id);
    GenerationOut gen;
    r->cache_len += 1;
    AcceptToken(r, choices[i], owned ? &gen : nullptr);
    if (owned) generations->push_back(std::move(gen));
  }
  return absl::OkStatus();
}

absl::Status BatchEngine::State::TakeRouterBlocks(const BatchInput& batch,
                                                  std::vector<RequestState>* requests) {
  for (size_t i = 0; i < requests->size(); ++i) {
    const std::vector<uint32_t>& given = batch.requests[i].blocks;
    if (given.empty()) continue;
    absl::Status st;
    std::vector<int32_t> ids(given.size());
    const int64_t reported = static_cast<int64_t>(routed_blocks) * allocator.block_size();
    for (size_t k = 0; k < given.size() && st.ok(); ++k) {
      if (given[k] >= static_cast<uint32_t>(routed_blocks)) {
        st = absl::InvalidArgumentError(
            unrouted_blocks() == 0
                ? absl::StrFormat(
                      "blocks[%d] = %d is outside the KV cache of %d blocks (Warmup reported %d "
                      "tokens)",
                      k, given[k], routed_blocks, reported)
                : absl::StrFormat(
                      "blocks[%d] = %d is outside the router's KV blocks [0, %d) (Warmup "
                      "reported %d tokens; blocks [%d, %d) are kept for requests without blocks: "
                      "--unrouted-kv-blocks)",
                      k, given[k], routed_blocks, reported, routed_blocks, allocator.num_blocks()));
      }
      ids[k] = static_cast<int32_t>(given[k]);
    }
    if (st.ok()) st = allocator.Take(ids);
    if (!st.ok()) {
      for (size_t j = 0; j < i; ++j) {
        allocator.Free((*requests)[j].blocks);
        (*requests)[j].blocks.clear();
      }
      return absl::Status(st.code(), absl::StrFormat("requests[%d].%s", i, st.message()));
    }
    (*requests)[i].blocks = std::move(ids);
  }
  return absl::OkStatus();
}

absl::Status BatchEngine::State::NoRoomWithoutBlocks(uint64_t batch_id, int64_t total) const {
  const int bs = allocator.block_size();
  if (!warmed_up) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("KV cache exhausted: batch %d needs %d blocks of %d tokens, %d of %d free",
                        batch_id, total, bs, allocator.num_free(), allocator.num_blocks()));
  }
  if (unrouted_blocks() == 0) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache exhausted: batch %d needs %d blocks of %d tokens for its requests without "
        "`blocks`, and --unrouted-kv-blocks is 0: after Warmup the router's allocator owns all %d "
        "blocks (send the router's `blocks`, or restart the shard with --unrouted-kv-blocks N)",
        batch_id, total, bs, allocator.num_blocks()));
  }
  return absl::ResourceExhaustedError(absl::StrFormat(
      "KV cache exhausted: batch %d needs %d blocks of %d tokens for its requests without "
      "`blocks`, %d of the %d blocks kept for such requests are free (--unrouted-kv-blocks; the "
      "router's %d blocks are never given to requests without blocks)",
      batch_id, total, bs, allocator.NumFreeFrom(unrouted_first()), unrouted_blocks(),
      routed_blocks));
}

void BatchEngine::State::FreeBatch(BatchState* batch) {
  for (RequestState& r : batch->requests) {
    allocator.Free(r.blocks);
    r.blocks.clear();
  }
}

BatchEngine::BatchEngine(ModelBackend* model, const Tokenizer* tokenizer,
                         BatchEngineOptions options)
    : state_(std::make_unique<State>()) {
  PHI_CHECK(model != nullptr && tokenizer != nullptr);
  PHI_CHECK(options.world_size >= 1 && options.rank >= 0 && options.rank < options.world_size)
      << "rank " << options.rank << " of world size " << options.world_size;
  State& s = *state_;
  s.model = model;
  s.tokenizer = tokenizer;
  s.vocab_size = model->config().vocab_size;
  PHI_CHECK(s.vocab_size > 0);
  s.eos_token_ids = options.eos_token_ids;
  if (s.eos_token_ids.empty() && tokenizer->eos_token_id().has_value()) {
    s.eos_token_ids.push_back(*tokenizer->eos_token_id());
  }
  s.watermark.gamma = options.watermark_gamma;
  s.watermark.delta = options.watermark_delta;
  s.stall_ms = options.test_stall_next_step_ms;
  s.options = std::move(options);
  // A backend whose pool already exists (tests, or a restarted engine) is adopted as is.
  s.allocator = KvBlockAllocator(std::max(model->kv_num_blocks(), 0), kKvBlockSize);
  s.routed_blocks = s.allocator.num_blocks();
}

BatchEngine::~BatchEngine() = default;

absl::StatusOr<StepResult> BatchEngine::Prefill(const BatchInput& batch) {
  State& s = *state_;
  s.MaybeStall();
  const int bs = s.allocator.block_size();
  if (s.allocator.num_blocks() == 0) {
    return absl::FailedPreconditionError(kNotWarmedUpMessage);
  }
  if (s.batches.contains(batch.id)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("batch.id = %d is already in the cache", batch.id));
  }
  absl::StatusOr<std::vector<RequestState>> built = s.BuildRequests(batch, /*warmup=*/false);
  if (!built.ok()) return built.status();
  std::vector<RequestState>& requests = *built;

  // All blocks up front (the protocol has no preemption): ceil((P + max_new_tokens - 1) / BS).
  std::vector<int> need(requests.size());
  int64_t total = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const RequestState& r = requests[i];
    need[i] = BlocksForRequest(r.prompt_len, r.stopping.max_new_tokens(), bs);
    if (need[i] > s.allocator.num_blocks()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "requests[%d]: prompt of %d tokens + stopping_parameters.max_new_tokens = %d needs "
          "%d KV blocks, more than the whole cache (%d blocks of %d tokens)",
          i, r.prompt_len, r.stopping.max_new_tokens(), need[i], s.allocator.num_blocks(), bs));
    }
    if (!batch.requests[i].blocks.empty()) {
      const size_t given = batch.requests[i].blocks.size();
      if (given < static_cast<size_t>(need[i])) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "requests[%d].blocks has %d blocks of %d tokens, the request needs %d (prompt of %d "
            "tokens + stopping_parameters.max_new_tokens = %d - 1)",
            i, given, bs, need[i], r.prompt_len, r.stopping.max_new_tokens()));
      }
    } else {
      total += need[i];
    }
  }
  // The router's blocks first (Info.requires_block_allocator: its allocator admitted the batch
  // against exactly its part of the pool), then the shard's own for requests that carry none:
  // after Warmup only from the tail kept for them, never a block the router may hand out.
  absl::Status taken = s.TakeRouterBlocks(batch, &requests);
  if (!taken.ok()) return taken;
  if (total > s.allocator.NumFreeFrom(s.unrouted_first())) {
    const absl::Status exhausted = s.NoRoomWithoutBlocks(batch.id, total);
    for (RequestState& r : requests) s.allocator.Free(r.blocks);
    return exhausted;
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    if (!batch.requests[i].blocks.empty()) continue;
    absl::StatusOr<std::vector<int32_t>> blocks = s.allocator.Allocate(need[i], s.unrouted_first());
    PHI_CHECK(blocks.ok()) << blocks.status();  // checked above
    requests[i].blocks = *std::move(blocks);
  }

  StepResult result;
  if (absl::Status st = s.RunPrefill(&requests, &result.generations); !st.ok()) {
    for (RequestState& r : requests) s.allocator.Free(r.blocks);
    return st;
  }
  BatchState b;
  b.id = batch.id;
  b.requests = std::move(requests);
  if (b.num_unfinished() == 0) {
    s.FreeBatch(&b);
    return result;
  }
  result.batch = b.ToCachedBatch(bs);
  s.batches.emplace(batch.id, std::move(b));
  return result;
}

absl::StatusOr<StepResult> BatchEngine::Decode(const std::vector<uint64_t>& batch_ids) {
  State& s = *state_;
  s.MaybeStall();
  if (batch_ids.empty()) return absl::InvalidArgumentError("Must provide at least one batch");
  absl::flat_hash_set<uint64_t> seen_batches;
  absl::flat_hash_set<uint64_t> seen_requests;
  std::vector<BatchState*> batches;
  for (uint64_t id : batch_ids) {
    auto it = s.batches.find(id);
    if (it == s.batches.end()) {
      return absl::NotFoundError(absl::StrFormat("Batch ID %d not found in cache.", id));
    }
    if (!seen_batches.insert(id).second) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Decode lists batch %d more than once", id));
    }
    for (const RequestState& r : it->second.requests) {
      if (!seen_requests.insert(r.id).second) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "request %d appears in more than one of the batches to concatenate", r.id));
      }
    }
    batches.push_back(&it->second);
  }
  std::vector<RequestState*> requests;
  for (BatchState* b : batches) {
    for (RequestState& r : b->requests) requests.push_back(&r);
  }

  StepResult result;
  if (absl::Status st = s.RunDecode(requests, &result.generations); !st.ok()) return st;

  // §4.9: concatenate in list order into the first batch's id; the other ids cease to exist.
  BatchState& first = *batches[0];
  for (size_t i = 1; i < batches.size(); ++i) {
    for (RequestState& r : batches[i]->requests) first.requests.push_back(std::move(r));
    s.batches.erase(batch_ids[i]);
  }
  if (first.num_unfinished() == 0) {
    s.FreeBatch(&first);
    s.batches.erase(batch_ids[0]);
    return result;
  }
  result.batch = first.ToCachedBatch(s.allocator.block_size());
  return result;
}

absl::StatusOr<CachedBatchOut> BatchEngine::FilterBatch(uint64_t batch_id,
                                                        const std::vector<uint64_t>& request_ids) {
  State& s = *state_;
  auto it = s.batches.find(batch_id);
  if (it == s.batches.end()) {
    return absl::NotFoundError(absl::StrFormat("Batch ID %d not found in cache.", batch_id));
  }
  BatchState& batch = it->second;
  if (request_ids.empty()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Batch must have at least one request (FilterBatch of batch %d with an "
                        "empty request_ids; use ClearCache to drop a batch)",
                        batch_id));
  }
  std::map<uint64_t, size_t> position;
  for (size_t i = 0; i < batch.requests.size(); ++i) position[batch.requests[i].id] = i;
  std::vector<size_t> keep;
  std::vector<bool> kept(batch.requests.size(), false);
  for (size_t k = 0; k < request_ids.size(); ++k) {
    auto p = position.find(request_ids[k]);
    if (p == position.end()) {
      return absl::NotFoundError(
          absl::StrFormat("request_ids[%d] = %d is not in batch %d", k, request_ids[k], batch_id));
    }
    if (kept[p->second]) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "request_ids[%d] = %d is listed twice for batch %d", k, request_ids[k], batch_id));
    }
    kept[p->second] = true;
    keep.push_back(p->second);
  }
  std::vector<RequestState> survivors;
  survivors.reserve(keep.size());
  for (size_t i : keep) survivors.push_back(std::move(batch.requests[i]));
  std::vector<uint64_t> removed;
  for (size_t i = 0; i < batch.requests.size(); ++i) {
    if (kept[i]) continue;
    s.allocator.Free(batch.requests[i].blocks);
    removed.push_back(batch.requests[i].id);
  }
  batch.requests = std::move(survivors);
  LogRequestsRemoved(batch_id, removed);
  return batch.ToCachedBatch(s.allocator.block_size());
}

namespace {
std::vector<uint64_t> IdsOf(const BatchState& batch) {
  std::vector<uint64_t> ids;
  for (const RequestState& r : batch.requests) ids.push_back(r.id);
  return ids;
}
}  // namespace

absl::Status BatchEngine::ClearCache(std::optional<uint64_t> batch_id) {
  State& s = *state_;
  if (batch_id.has_value()) {
    auto it = s.batches.find(*batch_id);
    if (it != s.batches.end()) {
      LogBatchCleared(it->first, IdsOf(it->second));
      s.FreeBatch(&it->second);
      s.batches.erase(it);
    }
    return absl::OkStatus();
  }
  for (auto& [id, batch] : s.batches) {
    LogBatchCleared(id, IdsOf(batch));
    s.FreeBatch(&batch);
  }
  s.batches.clear();
  return absl::OkStatus();
}

int BatchEngine::kv_blocks_total() const { return state_->allocator.num_blocks(); }
int BatchEngine::kv_blocks_free() const { return state_->allocator.num_free(); }
int BatchEngine::kv_blocks_unrouted() const { return state_->unrouted_blocks(); }
size_t BatchEngine::num_cached_batches() const { return state_->batches.size(); }

}  // namespace phishard
