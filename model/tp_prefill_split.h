// Row chunks of a tensor-parallel prefill step, so that one chunk's all-reduce can run while the
// next chunk computes (the overlapped prefill of model/cuda_phi_tp_overlap.cc,
// docs/tensor-parallel.md). Host-only bookkeeping: no device pointers.
#pragma once

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace phishard {

// Rows [begin, begin + rows) of a step.
struct RowRange {
  int begin = 0;
  int rows = 0;
};

// Largest chunk count SplitPrefillRows and PHISHARD_TP_PREFILL_CHUNKS accept.
inline constexpr int kMaxPrefillChunks = 8;
// Defaults of CudaModelOptions::tp_prefill_chunks / tp_prefill_min_rows. Measured on 2 H200s
// (docs/perf-log.md, issue #6 overlap runs): 2 chunks made a 16,384-row prefill ~2 % faster and a
// 2,048-row one 12-15 % slower, so only steps of at least 2 x (4096 + 16) rows are chunked.
inline constexpr int kTpPrefillChunksDefault = 2;
inline constexpr int kTpPrefillMinRowsDefault = 4096;
// Chunk boundaries are multiples of this many rows (row offsets stay 256-byte aligned for any
// hidden size that is a multiple of 8 in 16-bit storage).
inline constexpr int kPrefillChunkAlign = 16;

// Splits `rows` rows into at most `chunks` consecutive ranges of at least `min_rows` rows each:
// min(chunks, rows / (min_rows + kPrefillChunkAlign)) ranges, or one (the whole step) when that is
// below 2. Boundaries are multiples of kPrefillChunkAlign, as even as that allows.
std::vector<RowRange> SplitPrefillRows(int rows, int chunks, int min_rows);

// PHISHARD_TP_PREFILL_CHUNKS (docs/flags.md): the chunk count of sharded prefill steps, 1 (no
// overlap) to kMaxPrefillChunks; `fallback` when unset or empty. INVALID_ARGUMENT naming the
// variable for anything else (serve checks it at startup; the CUDA model reads it when made).
absl::StatusOr<int> TpPrefillChunksFromEnv(int fallback);

// Chunked prefill pairs each chunk's all-reduce across ranks, so every rank must split its steps
// the same way: a rank with other settings would pair collectives of different sizes. `per_rank`
// is [world, stride] floats, rank-major, each rank's chunk count at `offset` and its minimum chunk
// rows at `offset + 1` (as the Warmup all-gather carries them, CudaPhiModel::AgreeKvBlocks).
// OK when all equal this rank's; else FAILED_PRECONDITION naming PHISHARD_TP_PREFILL_CHUNKS and the
// first rank that differs.
absl::Status CheckPrefillChunkingAgrees(const float* per_rank, int stride, int offset, int world,
                                        int rank);

}  // namespace phishard
