// Greedy token choice on float32 logits rows: per row, the argmax id and its log-probability
// log_softmax(row)[id], so that a step whose rows all choose greedily needs only these pairs on
// the host instead of [rows, V] floats.
//
// Semantics (the spec; server/next_token_chooser.cc's greedy path gives the same, bit for bit on
// the CPU): id = the first index of the largest non-NaN entry (+inf and -inf compare as values;
// 0 when every entry is NaN); lse = max + log(sum exp(x - max)) over the finite entries only
// (-inf when there is none), accumulated in double; logprob = float(double(x[id]) - lse).
//
// Layout: column c of row r sits at logits[(c / part_cols) * part_stride + r * row_stride +
// c % part_cols]. One part (part_cols = cols) is a plain row-major [rows, row_stride] matrix; W
// parts are the tensor-parallel all-gather layout [W, rows, row_stride] with each rank's
// vocabulary slice of part_cols columns.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_status.h"

namespace phishard {

struct GreedyPick {
  int32_t id = 0;
  float logprob = 0.0f;
};

// The CUDA path splits each row into chunks of kGreedyPickChunk columns of one part (one block
// each: argmax, finite max and sum of exp in the chunk), then merges a row's chunks in a fixed
// order; the per-chunk results live in the caller's workspace.
inline constexpr int kGreedyPickChunk = 4096;
struct GreedyPickPartial {
  float best_val;    // largest non-NaN entry of the chunk
  int32_t best_idx;  // its first column; INT32_MAX when the chunk is all NaN
  float max;         // largest finite entry; -inf when none
  double sum;        // sum of exp(x - max) over the finite entries
};

struct GreedyPickParams {
  const float* logits = nullptr;  // see the layout above; float32
  GreedyPick* out = nullptr;      // [rows]
  // CUDA only: device scratch of GreedyPickWorkspaceBytes(rows, cols, part_cols) bytes.
  void* workspace = nullptr;
  int rows = 0;
  int cols = 0;             // V, the full row width
  int part_cols = 0;        // columns per part; cols % part_cols == 0
  int64_t part_stride = 0;  // floats between parts (unused with one part)
  int64_t row_stride = 0;   // floats between rows of a part, >= part_cols
};

// Host memory (no workspace).
KernelStatus GreedyPickCpu(const GreedyPickParams& p);

inline int GreedyPickChunksPerRow(int cols, int part_cols) {
  return part_cols <= 0
             ? 0
             : cols / part_cols * ((part_cols + kGreedyPickChunk - 1) / kGreedyPickChunk);
}
inline size_t GreedyPickWorkspaceBytes(int rows, int cols, int part_cols) {
  return static_cast<size_t>(rows < 0 ? 0 : rows) * GreedyPickChunksPerRow(cols, part_cols) *
         sizeof(GreedyPickPartial);
}

// Shape checks shared by both entry points.
inline KernelStatus GreedyPickCheck(const GreedyPickParams& p) {
  if (p.rows < 0 || p.cols <= 0 || p.part_cols <= 0 || p.cols % p.part_cols != 0 ||
      p.row_stride < p.part_cols || (p.cols != p.part_cols && p.part_stride <= 0)) {
    return KernelStatus::kInvalidShape;
  }
  if (p.rows > 0 && (p.logits == nullptr || p.out == nullptr)) return KernelStatus::kNullPointer;
  return KernelStatus::kOk;
}

}  // namespace phishard
