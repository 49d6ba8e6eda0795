// Helpers of the GEMM form of multi-LoRA for long (prefill) steps. Every pointer is device memory.
//
// A step with adapters a = 0 .. n-1 (each at a column window [col_a, col_a + width_a) of a
// concatenated rank axis of R = Σ width_a columns, width_a >= every rank of a) computes, per
// module,
//   t   = x · A_catᵀ                       (one cuBLASLt GEMM, float32 [rows, R])
//   T   = mask(t) · scale                   (LoraMaskCuda: row i keeps only its adapter's window,
//                                            and only its first rank columns; storage dtype)
//   y  += T · B_catᵀ                        (one cuBLASLt GEMM with beta = 1)
// which is exactly Σ_a [row i uses a] scale_a · (x_i · A_aᵀ) · B_aᵀ: every other column of T is
// zero. A_cat [R, in] stacks the adapters' A rows (zero rows past a rank), B_cat [out, ld] their B
// columns (zero columns past a rank); LoraGatherCuda builds them from the SGMV weight table
// (kernels/sgmv.h). Wasted work grows with the number of adapters in a step (R), so the model
// uses this form only for long steps with few adapters.
//
// Segmented expands (LoraSegmentExpandCuda): with few segments (runs of consecutive rows of one
// adapter), T is built compact (LoraMaskParams::compact: each row holds only its own adapter's
// columns) and each segment's expand is its own GEMM of K = parts x width_a against that adapter's
// columns of B_cat (LoraGatherJob::col_mul / width_slot), so a row costs its own rank of tensor
// work instead of R; base rows cost nothing.
#pragma once

#include <cstdint>

#include "kernels/cuda/gemm_cuda.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/gemm.h"
#include "kernels/kernel_status.h"
#include "kernels/sgmv.h"

namespace phishard {

// One adapter of a step: its weight-table slot and its window of the concatenated rank axis.
struct LoraStepAdapter {
  int32_t slot = -1;
  int32_t col = 0;    // multiple of 8
  int32_t width = 0;  // multiple of 8, >= every rank of the adapter
  int32_t pad = 0;
};

inline constexpr int kLoraGatherMaxJobs = 18;

// One matrix to build. kind A: dst [R rows starting at row `base`, dim] row-major (row stride
// dim), row base + col_mul x col_a + width_slot x width_a + k = A_a row k (k < rank) or zeros.
// kind B: dst [dim rows, ld], column base + col_mul x col_a + width_slot x width_a + k of row j =
// B_a[j, k] (k < rank) or zero. col_mul 1, width_slot 0: the concatenated layout; col_mul =
// parts, width_slot = part: the segmented layout, adapter a's parts side by side at parts x col_a
// (B: the expands' [B | B] per adapter; A: the q, k, v, fc1 shrink's blocks, one GEMM a segment).
// index_mul adds index_mul x a (a = the adapter's index in the step, blockIdx.y) to the first
// row / column: a layout at a fixed pitch per adapter whatever the widths (the merged q / k / v
// expand's block-diagonal B, model/cuda_lora_gemm.cc).
// Entry: the table entry within the slot (layer * 6 + target).
struct LoraGatherJob {
  void* dst = nullptr;
  bool is_b = false;
  int entry = 0;
  int dim = 0;         // A: in (multiple of 8); B: out
  int ld = 0;          // B: row stride of dst (multiple of 8); A: unused
  int base = 0;        // A: first row; B: first column (multiple of 8)
  int col_mul = 1;     // >= 0
  int width_slot = 0;  // >= 0
  int index_mul = 0;   // >= 0, multiple of 8
};

struct LoraGatherParams {
  LoraGatherJob jobs[kLoraGatherMaxJobs];
  int num_jobs = 0;
  const SgmvWeight* table = nullptr;  // [num_slots, stride]
  int stride = 0;
  int num_slots = 0;
  const LoraStepAdapter* adapters = nullptr;  // [num_adapters]
  int num_adapters = 0;
  int max_width = 0;  // >= every adapter's width (sizes the grid)
  // 16-byte chunks a thread copies, 1 or 8 (the same result; 8, the default, keeps more loads in
  // flight with fewer blocks: the parts are small).
  int chunks_per_thread = 8;
  DataType dtype = DataType::kBF16;  // kBF16 / kF16 (copies 16-bit words)
};

// Ranks above an adapter's width are clamped to it; slots outside the table give zeros.
// kInvalidShape for unaligned dims / windows, too many jobs or chunks_per_thread not 1 or 8,
// kNullPointer for a missing dst, table or adapter list of a non-empty launch.
KernelStatus LoraGatherCuda(const LoraGatherParams& p, cudaStream_t stream);

struct LoraMaskParams {
  const float* t = nullptr;  // [rows, ldt] float32, the shrink GEMM output
  int ldt = 0;
  void* out = nullptr;  // [rows, ldo] dtype: T
  int ldo = 0;
  const int32_t* row_adapter = nullptr;  // [rows]: index into adapters, or -1 (base row)
  const LoraStepAdapter* adapters = nullptr;
  int num_adapters = 0;
  const SgmvWeight* table = nullptr;
  int stride = 0;
  int num_slots = 0;
  int rows = 0;
  int rank_cols = 0;  // R: columns of one module block
  // Module blocks b = first_block .. first_block + num_blocks - 1 cover columns [b R, (b + 1) R)
  // of t and out; entries[b] is block b's table entry within a slot.
  int first_block = 0;
  int num_blocks = 0;
  int entries[6] = {0, 0, 0, 0, 0, 0};
  // Split T: block b of out covers columns [2 b R, 2 (b + 1) R): hi = round(v) at 2 b R + c and
  // lo = round(v - hi) at 2 b R + R + c, so that T_hi + T_lo carries v to ~2^-16 relative (the
  // expand then multiplies [T_hi | T_lo] by [B | B]); otherwise block b is [b R, (b + 1) R).
  bool split = false;
  // t_per_module: t holds each row's own adapter at column t_block_col[b] + k (the SGMV shrink's
  // layout) instead of the concatenated window (column b R + col_a + k).
  bool t_per_module = false;
  int t_block_col[6] = {0, 0, 0, 0, 0, 0};
  // Compact only, with t_per_module: block b of row i at t column t_block_col[b] + t_block_slot[b]
  // x width_a + k (the segmented shrinks' layout, LoraSegmentShrinkCuda: a segment's blocks side
  // by side at their adapter's width).
  int t_block_slot[6] = {0, 0, 0, 0, 0, 0};
  // Compact (the segmented expands): row i of out holds only its own adapter a's values, block b
  // at column out_block_col[b] + (out_block_slot[b] x w + h) x width_a + k for part h (w = 2 when
  // split, hi then lo, else 1) and k < width_a (exact zeros for rank <= k < width_a). Nothing is
  // written for base rows or past a row's width: each segment's GEMM reads only its own rows'
  // first K columns of a block. rank_cols (R) still addresses t; every width, ldo, out_block_col
  // and (t_per_module) t_block_col must be multiples of 8, ldt of 4, and t / out 16-byte aligned.
  bool compact = false;
  int compact_width = 0;  // >= every adapter's width: the chunks launched per row and block
  int out_block_col[6] = {0, 0, 0, 0, 0, 0};
  int out_block_slot[6] = {0, 0, 0, 0, 0, 0};
  DataType dtype = DataType::kBF16;
};

// out[i, c] = t[i, c] * scale rounded to dtype (split: hi and lo parts) when column c lies in the
// window of row i's adapter at offset k < that module's rank, else exactly 0 (t there is never
// read, so NaN or garbage outside the windows cannot leak). kInvalidShape / kNullPointer as above.
KernelStatus LoraMaskCuda(const LoraMaskParams& p, cudaStream_t stream);

// One segment of a step: rows [row, row + rows) all use the adapter at window [col, col + width)
// of the concatenated rank axis (host memory).
struct LoraSegment {
  int row = 0;
  int rows = 0;
  int col = 0;
  int width = 0;
};

// For each segment s: y[rows of s, :n] (+)= act(T[rows of s, t_col : t_col + parts x width_s] ·
// B[:n, parts x col_s : + parts x width_s]ᵀ), accumulating (beta = 1), one cuBLASLt GEMM each (the
// epilogue as CudaGemm::Run applies it); a run of consecutive segments of equal rows and width,
// each starting where the previous one ends in rows and in the rank axis, is one strided-batched
// GEMM (one GEMM per segment if cuBLASLt has no batched algorithm for it). T [rows, ldt] compact
// (LoraMaskParams::compact), B [n, ldb] as gathered with col_mul = parts, y [rows, ldy]; all dtype,
// device memory. Rows in no segment are not touched (no activation either: the caller applies it to
// base rows).
struct LoraSegmentExpandParams {
  const void* t = nullptr;
  int ldt = 0;
  int t_col = 0;
  const void* b = nullptr;
  int ldb = 0;
  void* y = nullptr;
  int ldy = 0;
  int n = 0;
  int parts = 1;
  const LoraSegment* segments = nullptr;  // host
  int num_segments = 0;
  GemmEpilogue act = GemmEpilogue::kNone;
  DataType dtype = DataType::kBF16;
  // false: y = T · Bᵀ on the segments' rows (beta = 0; other rows untouched) instead of y +=.
  bool accumulate = true;
};

// kInvalidShape when a segment's window does not fit ldt / ldb, or rows / n are out of range;
// otherwise CudaGemm's status (its last_error() says why).
KernelStatus LoraSegmentExpandCuda(CudaGemm& gemm, const LoraSegmentExpandParams& p,
                                   cudaStream_t stream);

// For each segment s: t[rows of s, t_col : t_col + blocks x width_s] = x[rows of s, :k] ·
// A[blocks x col_s : + blocks x width_s, :k]ᵀ in float32 (no accumulation), one cuBLASLt GEMM a
// segment, a run of equal consecutive segments (as LoraSegmentExpandCuda's) one strided-batched
// GEMM. x [rows, ldx] dtype, A [blocks R, k] dtype as gathered with col_mul = blocks (each
// adapter's blocks side by side, zero rows past a rank), t [rows, ldt] float32; device memory.
// Rows in no segment and t's columns past a segment's blocks x width_s are not written. So a row
// costs its own adapter's shrink instead of every adapter's in the step.
struct LoraSegmentShrinkParams {
  const void* x = nullptr;
  int ldx = 0;
  int k = 0;
  const void* a = nullptr;
  int blocks = 1;
  float* t = nullptr;
  int ldt = 0;
  int t_col = 0;
  const LoraSegment* segments = nullptr;  // host
  int num_segments = 0;
  DataType dtype = DataType::kBF16;
};

// kInvalidShape when a segment's blocks do not fit ldt, or k / ldx are out of range; otherwise
// CudaGemm's status.
KernelStatus LoraSegmentShrinkCuda(CudaGemm& gemm, const LoraSegmentShrinkParams& p,
                                   cudaStream_t stream);

}  // namespace phishard
