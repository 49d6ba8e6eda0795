#include "model/model_backend.h"

#include "absl/strings/str_format.h"

namespace phishard {

absl::Status ModelBackend::PickGreedyOnHost(const ForwardBatch& batch,
                                            absl::Span<const float> logits,
                                            absl::Span<const GreedyPick>* picks) {
  *picks = {};
  const size_t R = batch.logit_rows.size();
  const int V = config().vocab_size;
  if (batch.greedy_rows.empty()) return absl::OkStatus();
  if (batch.greedy_rows.size() != R || logits.size() != R * static_cast<size_t>(V)) {
    return absl::InternalError(
        absl::StrFormat("greedy pick: %d greedy flags and %d logits for %d rows of vocab %d",
                        batch.greedy_rows.size(), logits.size(), R, V));
  }
  picks_.assign(R, GreedyPick{});
  for (size_t r = 0; r < R; ++r) {
    if (!batch.greedy_rows[r]) continue;
    const KernelStatus st = GreedyPickCpu({.logits = logits.data() + r * V,
                                           .out = &picks_[r],
                                           .rows = 1,
                                           .cols = V,
                                           .part_cols = V,
                                           .row_stride = V});
    if (st != KernelStatus::kOk) {
      return absl::InternalError(
          absl::StrFormat("greedy pick of logit row %d: %s", r, KernelStatusName(st)));
    }
  }
  *picks = absl::MakeConstSpan(picks_);
  return absl::OkStatus();
}

}  // namespace phishard
