#include "model/tp_prefill_split.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace phishard {

std::vector<RowRange> SplitPrefillRows(int rows, int chunks, int min_rows) {
  // Boundaries: c * rows / n rounded down to the alignment; rows / n >= min_rows + align keeps
  // every range at least min_rows long after the rounding.
  const int n = std::max(1, std::min(chunks, rows / (std::max(1, min_rows) + kPrefillChunkAlign)));
  std::vector<RowRange> out;
  int begin = 0;
  for (int c = 1; c <= n; ++c) {
    const int end = c == n ? rows
                           : static_cast<int>(static_cast<int64_t>(rows) * c / n) /
                                 kPrefillChunkAlign * kPrefillChunkAlign;
    out.push_back({begin, end - begin});
    begin = end;
  }
  return out;
}

absl::StatusOr<int> TpPrefillChunksFromEnv(int fallback) {
  const char* v = std::getenv("PHISHARD_TP_PREFILL_CHUNKS");
  if (v == nullptr || *v == '\0') return fallback;
  int chunks = 0;
  if (!absl::SimpleAtoi(v, &chunks) || chunks < 1 || chunks > kMaxPrefillChunks) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable PHISHARD_TP_PREFILL_CHUNKS='", v,
                     "' must be a chunk count in [1, ", kMaxPrefillChunks, "] (1: no overlap)"));
  }
  return chunks;
}

absl::Status CheckPrefillChunkingAgrees(const float* per_rank, int stride, int offset, int world,
                                        int rank) {
  const float* mine = per_rank + static_cast<size_t>(rank) * stride + offset;
  for (int r = 0; r < world; ++r) {
    const float* theirs = per_rank + static_cast<size_t>(r) * stride + offset;
    if (theirs[0] != mine[0] || theirs[1] != mine[1]) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "tensor-parallel ranks split prefill steps differently: rank %d has %.0f chunk(s) of at "
          "least %.0f rows, rank %d has %.0f of at least %.0f (PHISHARD_TP_PREFILL_CHUNKS / "
          "CudaModelOptions::tp_prefill_chunks and tp_prefill_min_rows must be the same on every "
          "rank; start all ranks with one environment, as `phishard launch` does)",
          rank, mine[0], mine[1], r, theirs[0], theirs[1]));
    }
  }
  return absl::OkStatus();
}

}  // namespace phishard
