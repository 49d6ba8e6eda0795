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
#include "kernels/gemm.h"
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

// ---- Grouped, table-driven form (what a model step launches) -----------------------------------
//
// A step's rows are described by a tile list instead of per-segment pointer arrays: tile i covers
// rows [begin, end) (at most kSgmvTileRows of them) that all use adapter slot `slot`. Rows in no
// tile (base rows) are never read or written. The adapters' matrices come from a weight table
// indexed by (slot, entry): entry = which module (a model uses layer * 6 + target, lm_head last),
// so one table serves every layer and a step uploads only its tiles. One launch handles up to
// kSgmvMaxOps ops (modules) that share the tiles:
//   shrink op o:  t[rows, t_col_o + 0:r) = x_o[rows, 0:in_o] · A_(slot, entry_o)ᵀ
//   expand op o:  y_o[rows, 0:out_o]   += Σ_terms scale · t[rows, t_col + 0:r) · B_(slot, entry)ᵀ
// An entry whose a (shrink) or b (expand) is null or whose rank is 0 is skipped (the module is not
// adapted by that adapter). Ranks above max_rank and rows at or past num_rows are clamped, slots
// outside [0, num_slots) skipped, so a bad table never makes an access of x, t or y out of bounds.
// The tile count is read through a pointer (device memory on CUDA) and max_tiles bounds it, so a
// CUDA graph can replay one launch for any number of tiles up to max_tiles.
inline constexpr int kSgmvTileRows = 16;
inline constexpr int kSgmvMaxOps = 4;
inline constexpr int kSgmvMaxTerms = 2;

struct SgmvWeight {
  const void* a = nullptr;  // [rank, in] row-major dtype, or null
  const void* b = nullptr;  // [out, rank] row-major dtype, or null
  int32_t rank = 0;
  float scale = 0.0f;  // applied in float32 by expand
};

struct SgmvTile {
  int32_t slot = -1;
  int32_t begin = 0;
  int32_t end = 0;  // begin <= end <= begin + kSgmvTileRows
  int32_t pad = 0;
};

struct SgmvTableRef {
  const SgmvWeight* table = nullptr;  // [num_slots, stride]
  int stride = 0;                     // entries per slot
  int num_slots = 0;
  const SgmvTile* tiles = nullptr;     // [max_tiles]
  const int32_t* num_tiles = nullptr;  // one int32: tiles in use (clamped to max_tiles)
  int max_tiles = 0;
  int num_rows = 0;  // rows of x, t and y
  int max_rank = 0;  // ranks clamped to it
};

struct SgmvShrinkOp {
  const void* x = nullptr;  // [num_rows, in] row stride ldx, dtype
  int ldx = 0;              // 0 means in
  int in = 0;
  int t_col = 0;  // first column of t this op writes
  int entry = 0;  // weight table entry
};

struct SgmvGroupedShrinkParams {
  SgmvShrinkOp ops[kSgmvMaxOps];
  int num_ops = 0;
  float* t = nullptr;  // [num_rows, ldt] float32
  int ldt = 0;         // >= t_col + max_rank for every op
  SgmvTableRef ref;
  DataType dtype = DataType::kF32;  // of x, A and B
};

struct SgmvExpandTerm {
  int t_col = 0;
  int entry = 0;
};

struct SgmvExpandOp {
  void* y = nullptr;  // [num_rows, out] row stride ldy; dtype, or float32 when y_f32; +=
  int ldy = 0;        // 0 means out
  int out = 0;
  bool y_f32 = false;
  int num_terms = 1;  // 1..kSgmvMaxTerms, summed in float32 before y is rounded once
  SgmvExpandTerm terms[kSgmvMaxTerms];
};

struct SgmvGroupedExpandParams {
  SgmvExpandOp ops[kSgmvMaxOps];  // distinct ops must not write the same y elements
  int num_ops = 0;
  const float* t = nullptr;  // [num_rows, ldt] float32
  int ldt = 0;
  SgmvTableRef ref;
  DataType dtype = DataType::kF32;
};

// Host memory, kF32 only (x, A, B, y all float32): each tile of each op through the per-segment
// reference above. kInvalidShape / kNullPointer as there.
KernelStatus SgmvGroupedShrinkCpu(const SgmvGroupedShrinkParams& p);
KernelStatus SgmvGroupedExpandCpu(const SgmvGroupedExpandParams& p);

// ---- Fused form (decode steps): shrink and expand of an op in one pass -------------------------
// For every row of every tile in use, op o adds its terms' deltas to y with one rounding:
//   y_o[row, 0:out_o] += Σ_terms scale · (x_term[row, 0:in_term] · A_(slot, entry)ᵀ) · B_(slot,
//   entry)ᵀ
// The rank-r intermediate stays float32 and is never stored (no t buffer). The terms of one op may
// read different inputs (the residual stream's dense and fc2 deltas: attention output and GELU
// output). Tiles, table, clamping and skipping as in the grouped form.
struct SgmvFusedTerm {
  const void* x = nullptr;  // [num_rows, in] row stride ldx, dtype
  int ldx = 0;              // 0 means in
  int in = 0;
  int entry = 0;  // weight table entry (its A is [rank, in], its B [out, rank])
};

struct SgmvFusedOp {
  void* y = nullptr;  // [num_rows, out] row stride ldy, dtype; +=
  int ldy = 0;        // 0 means out
  int out = 0;
  int num_terms = 1;  // 1..kSgmvMaxTerms
  SgmvFusedTerm terms[kSgmvMaxTerms];
  // Delta-only form: when set, y is neither read nor written; the op stores its float32 sum
  // Σ_terms scale · t · Bᵀ (the exact value the fused form adds to y before its one rounding)
  // into delta [num_rows, out] (row stride ld_delta, 0 means out), and -0.0f (the identity of a
  // float add) on the rows of tiles it does not adapt, so SgmvFold (below) then gives the fused
  // form's bits. Needs act == kNone (the fold applies it).
  float* delta = nullptr;
  int ld_delta = 0;
};

struct SgmvFusedParams {
  SgmvFusedOp ops[kSgmvMaxOps];  // distinct ops must not write the same y elements
  int num_ops = 0;
  SgmvTableRef ref;
  DataType dtype = DataType::kF32;
  // CUDA launch shape only (the result does not depend on it): column blocks per op (each
  // recomputes its row's rank-r intermediate), at most one per 8 output columns; 0 lets the
  // launch pick them from the grid size.
  int col_blocks = 0;
  // CUDA: launched as a programmatic dependent (PDL) of the kernel before it on the stream.
  bool programmatic = true;
};

// Host memory, kF32 only: each term through the grouped shrink / expand references above (t in a
// scratch buffer). kInvalidShape / kNullPointer as there.
KernelStatus SgmvFusedCpu(const SgmvFusedParams& p);

// ---- Fold (decode steps): a delta computed beside the base GEMM, added after it -------------
// For every row of every tile in use (base tiles included) and op o:
//   y_o[row, 0:out_o] = act(float(y_o[row, 0:out_o]) + delta_o[row, 0:out_o])   rounded once
// with delta from the delta-only fused form, so the pair equals the fused form bit for bit
// (model/cuda_lora.h: the delta runs on a side stream beside the GEMM that writes y). Rows in no
// tile are untouched.
struct SgmvFoldOp {
  void* y = nullptr;  // [num_rows, out] row stride ldy (0 means out), dtype
  int ldy = 0;
  int out = 0;
  const float* delta = nullptr;  // [num_rows, out] row stride ld_delta (0 means out), float32
  int ld_delta = 0;
};

struct SgmvFoldParams {
  SgmvFoldOp ops[kSgmvMaxOps];  // distinct ops must not write the same y elements
  int num_ops = 0;
  SgmvTableRef ref;  // tiles, their count and num_rows (the table is not read)
  DataType dtype = DataType::kF32;
  bool programmatic = true;  // CUDA: launched as a programmatic dependent (PDL)
};

// Host memory, kF32 only; act kNone, kGeluTanh or kGeluErf. kInvalidShape for bad sizes or
// another act, kNullPointer for a missing buffer.
KernelStatus SgmvFoldCpu(const SgmvFoldParams& p, GemmEpilogue act);

}  // namespace phishard
