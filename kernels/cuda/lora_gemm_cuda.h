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
#pragma once

#include <cstdint>

#include "kernels/device.h"
#include "kernels/dtype.h"
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
// dim), row base + col_a + k = A_a row k (k < rank) or zeros. kind B: dst [dim rows, ld],
// column base + col_a + k of row j = B_a[j, k] (k < rank) or zero. Entry: the table entry within
// the slot (layer * 6 + target).
struct LoraGatherJob {
  void* dst = nullptr;
  bool is_b = false;
  int entry = 0;
  int dim = 0;   // A: in (multiple of 8); B: out
  int ld = 0;    // B: row stride of dst (multiple of 8); A: unused
  int base = 0;  // A: first row; B: first column (multiple of 8)
};

struct LoraGatherParams {
  LoraGatherJob jobs[kLoraGatherMaxJobs];
  int num_jobs = 0;
  const SgmvWeight* table = nullptr;  // [num_slots, stride]
  int stride = 0;
  int num_slots = 0;
  const LoraStepAdapter* adapters = nullptr;  // [num_adapters]
  int num_adapters = 0;
  int max_width = 0;                 // >= every adapter's width (sizes the grid)
  DataType dtype = DataType::kBF16;  // kBF16 / kF16 (copies 16-bit words)
};

// Ranks above an adapter's width are clamped to it; slots outside the table give zeros.
// kInvalidShape for unaligned dims / windows or too many jobs, kNullPointer for a missing dst,
// table or adapter list of a non-empty launch.
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
  DataType dtype = DataType::kBF16;
};

// out[i, c] = t[i, c] * scale rounded to dtype (split: hi and lo parts) when column c lies in the
// window of row i's adapter at offset k < that module's rank, else exactly 0 (t there is never
// read, so NaN or garbage outside the windows cannot leak). kInvalidShape / kNullPointer as above.
KernelStatus LoraMaskCuda(const LoraMaskParams& p, cudaStream_t stream);

}  // namespace phishard
