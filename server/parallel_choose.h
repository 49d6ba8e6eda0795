// ChooseRows: NextTokenChooser::Choose for every row of a step's logits, spread over a few host
// threads. A batch-256 decode step has 256 rows of 51,200 float32 logits, and each row costs a
// log-sum-exp in double (plus the request's warpers): about 0.3-1.7 ms a row on one core, far
// more than the GPU step. Rows are independent (each request owns its chooser and RNG; the
// history is read-only here), so the choices are bit-identical to a sequential loop for any
// thread count, and every RNG advances exactly as it would have.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "server/next_token_chooser.h"

namespace phishard {

struct ChooseTask {
  NextTokenChooser* chooser = nullptr;  // the request's; only this task touches it
  const float* logits = nullptr;        // [vocab_size] host float32
  absl::Span<const int32_t> history;    // the request's ids so far (read-only)
};

// Scratch per worker thread, kept across steps (one ChooserWorkspace = a few V-sized vectors).
struct ChooseScratch {
  std::vector<ChooserWorkspace> workspaces;
};

// out[i] = tasks[i].chooser->Choose(...). Uses min(max_threads, tasks / kMinRowsPerThread)
// threads (the calling thread is one of them); max_threads <= 0 means the hardware concurrency,
// capped at 16.
inline constexpr int kMinRowsPerThread = 4;
void ChooseRows(absl::Span<const ChooseTask> tasks, int vocab_size, int max_threads,
                ChooseScratch* scratch, std::vector<TokenChoice>* out);

}  // namespace phishard
