// Segmented LoRA (SGMV): the rows of a batch are split into segments (runs of consecutive rows that
// use the same adapter); every segment multiplies by its own low-rank pair. Two steps per target
// module:
//   shrink:  t[rows of s, 0:r_s] = x[rows of s, :] · A_sᵀ                 A_s [r_s, in]
//   expand:  y[rows of s, :]    += scale_s · t[rows of s, 0:r_s] · B_sᵀ    B_s [out, r_s]
// (PEFT layouts: lora_A.weight [r, in], lora_B.weight [out, r].) Segment s covers rows
// [seg_starts[s], seg_starts[s + 1]); an empty segment (start == end) is allowed. A segment whose
// A (for shrink) or B (for expand) pointer is null, or whose rank is 0, is skipped: its rows keep
// their base output and cost nothing. Rows outside every segment are untouched.
//
// Leading dimensions let x be read from, and y be written into, a column window of a wider
// row-major buffer (e.g. the q, k or v slice of a fused QKV output). The shrink output t is always
// float32 (the rank-r intermediate is accumulated in float32 whatever the storage dtype), rows of
// stride ldt >= max rank over the segments.
//
// The CPU reference below is the spec; a CUDA implementation over the same params must match it
// (there every pointer, the segment and pointer tables included, is device memory).
//
// Tensor parallelism needs nothing here: model/lora_shard.h gives each rank A/B pieces whose
// local deltas land in the rank's own output columns (column-parallel) or its partial sums
// (row-parallel, before the layer's all-reduce).
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct SgmvShrinkParams {
  const void* x = nullptr;              // [num_rows, in] row stride ldx (0 means in), dtype
  float* t = nullptr;                   // [num_rows, ldt] float32; columns [0, r_s) written
  const int32_t* seg_starts = nullptr;  // [num_segments + 1], non-decreasing, in [0, num_rows]
  const void* const* a = nullptr;       // [num_segments] A_s [r_s, in] row-major dtype, or null
  const int32_t* ranks = nullptr;       // [num_segments] r_s in [0, ldt]
  int num_segments = 0;
  int num_rows = 0;
  int in = 0;
  int ldx = 0;
  int ldt = 0;
  DataType dtype = DataType::kF32;
};

struct SgmvExpandParams {
  const float* t = nullptr;             // [num_rows, ldt] float32 (the shrink output)
  void* y = nullptr;                    // [num_rows, out] row stride ldy (0 means out), dtype; +=
  const int32_t* seg_starts = nullptr;  // [num_segments + 1], as for shrink
  const void* const* b = nullptr;       // [num_segments] B_s [out, r_s] row-major dtype, or null
  const int32_t* ranks = nullptr;       // [num_segments] r_s in [0, ldt]
  const float* scales = nullptr;        // [num_segments] scale_s, or null for 1
  int num_segments = 0;
  int num_rows = 0;
  int out = 0;
  int ldy = 0;
  int ldt = 0;
  DataType dtype = DataType::kF32;
};

// Host memory, kF32 only, one cblas_sgemm per non-empty segment. t must not overlap x; y must not
// overlap t. kInvalidShape for bad sizes or segment bounds, kNullPointer for a missing buffer.
KernelStatus SgmvShrinkCpu(const SgmvShrinkParams& p);
KernelStatus SgmvExpandCpu(const SgmvExpandParams& p);

}  // namespace phishard
