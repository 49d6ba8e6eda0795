// BatchEngine::Warmup: the router's warmup batch through the model on a temporary pool, then the
// KV pool sized from the memory left (or --max-kv-blocks), the tail kept for requests without
// `blocks`, and the decode steps prepared.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "model/kv_cache.h"
#include "model/rank_settings.h"
#include "server/batch_engine.h"
#include "server/batch_engine_state.h"

namespace phishard {

absl::StatusOr<uint32_t> BatchEngine::Warmup(const BatchInput& batch, uint32_t max_input_length,
                                             uint32_t max_prefill_tokens, uint32_t max_new_tokens) {
  (void)max_input_length;  // unused upstream as well (§2.3)
  (void)max_new_tokens;    // one prefill + one decode step exercise every code path
  State& s = *state_;
  const int bs = kKvBlockSize;
  absl::StatusOr<std::vector<RequestState>> built = s.BuildRequests(batch, /*warmup=*/true);
  if (!built.ok()) {
    // The router builds this batch from the launcher's limits (spec §3.2): a length refusal
    // means those limits exceed what the model holds, and the operator has to change a flag.
    const absl::Status& st = built.status();
    return absl::Status(
        st.code(),
        absl::StrCat("Warmup batch: ", st.message(),
                     absl::StrContains(st.message(), "max_position_embeddings")
                         ? " (the launcher's --max-total-tokens and --max-input-length must not "
                           "exceed the model's max_position_embeddings)"
                         : ""));
  }
  std::vector<RequestState>& requests = *built;

  // Temporary pool: exactly what one prefill plus (where max_new_tokens >= 2) one decode writes.
  int temp_blocks = 0;
  int prefill_tokens = 0;
  for (RequestState& r : requests) {
    const int steps = std::min<uint32_t>(r.stopping.max_new_tokens(), 2);
    const int n = BlocksForRequest(r.prompt_len, steps, bs);
    r.blocks.resize(n);
    for (int b = 0; b < n; ++b) r.blocks[b] = temp_blocks + b;
    temp_blocks += n;
    prefill_tokens += r.prompt_len;
  }

  // From here the old pool and every cached batch are gone, whatever happens next (the backend
  // reallocates its KV memory). On failure the engine is left with no pool: Prefill then says
  // Warmup must succeed first.
  s.batches.clear();
  s.allocator = KvBlockAllocator(0, bs);
  s.warmed_up = false;
  s.routed_blocks = 0;
  const std::string lower_hint = absl::StrFormat(
      "Not enough memory to handle %d prefill tokens. You need to decrease "
      "`--max-batch-prefill-tokens`",
      prefill_tokens);
  if (absl::Status st = s.model->AllocateKvCache(temp_blocks, bs); !st.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat(lower_hint, " (allocating the warmup KV cache of ", temp_blocks,
                     " blocks failed: ", st.message(), ")"));
  }
  if (absl::Status st = s.RunPrefill(&requests, nullptr); !st.ok()) {
    if (absl::IsResourceExhausted(st)) {
      return absl::ResourceExhaustedError(absl::StrCat(lower_hint, " (", st.message(), ")"));
    }
    return absl::Status(st.code(), absl::StrCat("Warmup prefill failed: ", st.message()));
  }
  std::vector<RequestState*> ptrs;
  for (RequestState& r : requests) ptrs.push_back(&r);
  if (absl::Status st = s.RunDecode(ptrs, nullptr); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("Warmup decode failed: ", st.message()));
  }

  // The pool's sizing settings come from each rank's own command line but must be the same on
  // every rank of a tensor-parallel group (each rank's allocator hands out the same block ids, and
  // --max-kv-blocks decides whether the ranks meet in MaxKvBlocks' collective): checked by a
  // collective first, which fails on every rank alike, naming the setting.
  if (absl::Status st = s.model->CheckSameOnEveryRank(
          {RankSetting::Int("--max-kv-blocks", s.options.max_kv_blocks),
           RankSetting::Int("--unrouted-kv-blocks", s.options.unrouted_kv_blocks),
           RankSetting::Double("MEMORY_WIGGLE_ROOM", s.options.memory_wiggle_room)});
      !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("Warmup: ", st.message()));
  }
  int num_blocks = s.options.max_kv_blocks;
  if (num_blocks <= 0) {
    // Ask for the room with only the warmup pool in place (the backend counts memory left after
    // weights and a max_prefill_tokens workspace); wiggle room absorbs what was not measured.
    absl::StatusOr<int> fit =
        s.model->MaxKvBlocks(s.options.memory_fraction, static_cast<int>(max_prefill_tokens));
    if (!fit.ok()) {
      return absl::Status(fit.status().code(), absl::StrCat("Warmup could not size the KV cache: ",
                                                            fit.status().message()));
    }
    num_blocks = static_cast<int>(std::floor(*fit * s.options.memory_wiggle_room));
  }
  // The tail kept for requests without `blocks` (BatchEngineOptions::unrouted_kv_blocks); by
  // default one request of max_position_embeddings tokens fits in it.
  const int unrouted =
      s.options.unrouted_kv_blocks >= 0
          ? s.options.unrouted_kv_blocks
          : KvBlockAllocator::BlocksFor(std::max(s.model->config().max_position_embeddings, 1), bs);
  // The router admits prefills of up to max_prefill_tokens tokens and needs at least the warmup
  // batch to fit; a smaller router part could not serve what the router will send.
  const int needed =
      std::max(temp_blocks, KvBlockAllocator::BlocksFor(static_cast<int>(max_prefill_tokens), bs));
  if (num_blocks - unrouted < needed) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache too small: %d blocks of %d tokens fit (CUDA_MEMORY_FRACTION=%g, "
        "MEMORY_WIGGLE_ROOM=%g)%s, but at least %d are needed for %d prefill tokens. Decrease "
        "`--max-batch-prefill-tokens` / `--max-total-tokens` or raise CUDA_MEMORY_FRACTION%s",
        std::max(num_blocks, 0), bs, s.options.memory_fraction, s.options.memory_wiggle_room,
        unrouted > 0 ? absl::StrFormat(", %d of them kept for requests without blocks "
                                       "(--unrouted-kv-blocks)",
                                       unrouted)
                     : "",
        needed + unrouted, std::max<int>(prefill_tokens, max_prefill_tokens),
        unrouted > 0 ? " or lower --unrouted-kv-blocks" : ""));
  }
  const int64_t max_blocks_u32 = std::numeric_limits<uint32_t>::max() / bs;
  num_blocks = static_cast<int>(std::min<int64_t>(num_blocks, max_blocks_u32));
  if (absl::Status st = s.model->AllocateKvCache(num_blocks, bs); !st.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("Allocating the KV cache of ", num_blocks, " blocks failed: ", st.message(),
                     ". Lower CUDA_MEMORY_FRACTION or MEMORY_WIGGLE_ROOM"));
  }
  s.allocator = KvBlockAllocator(num_blocks, bs);
  s.warmed_up = true;
  s.routed_blocks = num_blocks - unrouted;
  Log(LogLevel::kInfo,
      absl::StrFormat("KV cache: %d blocks of %d tokens (%d tokens): blocks [0, %d) for the "
                      "router's allocator (Warmup reports %d tokens), [%d, %d) kept for requests "
                      "without blocks (--unrouted-kv-blocks %d)",
                      num_blocks, bs, static_cast<int64_t>(num_blocks) * bs, s.routed_blocks,
                      static_cast<int64_t>(s.routed_blocks) * bs, s.routed_blocks, num_blocks,
                      unrouted));
  // Every live sequence holds at least one block, so no decode batch exceeds num_blocks. A failed
  // preparation is no reason to refuse the router: decode steps then prepare themselves (CUDA: run
  // eager); a device fault shows in Health and the next step.
  const auto t0 = std::chrono::steady_clock::now();
  if (absl::Status st = s.model->PrepareDecode(num_blocks); !st.ok()) {
    Log(LogLevel::kWarning, absl::StrCat("decode preparation at warmup failed: ", st.message()));
  } else {
    Log(LogLevel::kInfo, absl::StrFormat("decode steps prepared in %.1f ms",
                                         std::chrono::duration<double, std::milli>(
                                             std::chrono::steady_clock::now() - t0)
                                             .count()));
  }
  return static_cast<uint32_t>(s.routed_blocks) * static_cast<uint32_t>(bs);
}

}  // namespace phishard
