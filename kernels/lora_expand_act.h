// fc1's LoRA delta and the activation in one pass over the pre-activation (the GEMM form's
// segmented prefill, model/cuda_lora_gemm.cc): for every segment s (a run of rows of one adapter)
//   y[i, c] = act(y[i, c] + Σ_{k < k_s} t[i, t_col + k] · b[c, b_col_s + k])   i in s, c < n
// with float32 accumulation of y + the sum and one rounding to the storage type (what cuBLASLt's
// beta = 1 GELU epilogue computes). A segment with k_s = 0 only applies act (the base rows); rows
// in no segment and columns c >= n are not touched. t is the compact masked T of
// kernels/cuda/lora_gemm_cuda.h (each row holds only its own adapter's columns), b the gathered
// B_fc1 with each adapter's parts side by side (so k_s = parts x width_a, b_col_s = parts x col_a).
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/gemm.h"
#include "kernels/kernel_status.h"

namespace phishard {

inline constexpr int kLoraExpandActMaxSegments = 64;

struct LoraExpandActSegment {
  int row = 0;    // first row of y / t
  int rows = 0;   // >= 0
  int b_col = 0;  // first column of b (CUDA: multiple of 8)
  int k = 0;      // terms: 0 (act only) or a multiple of 8
};

struct LoraExpandActParams {
  void* y = nullptr;  // [rows, ldy] row-major, dtype (CUDA: 16-byte aligned, ldy % 8 == 0)
  int ldy = 0;
  int n = 0;                // columns of y updated (CUDA: multiple of 8)
  const void* t = nullptr;  // [rows, ldt] dtype, segment s's rows read columns [t_col, t_col + k_s)
  int ldt = 0;
  int t_col = 0;
  const void* b = nullptr;  // [n, ldb] dtype
  int ldb = 0;
  LoraExpandActSegment segments[kLoraExpandActMaxSegments];  // disjoint row ranges, any order
  int num_segments = 0;
  GemmEpilogue act = GemmEpilogue::kNone;
  DataType dtype = DataType::kBF16;
  // CUDA only: rows of y one thread block updates, 32, 64 or 128 (0: 32); the same result. More
  // rows read each block's B columns from L2 fewer times, fewer rows make more blocks.
  int rows_per_block = 0;
};

// kInvalidShape when a size is negative, n > ldy, a window does not fit ldt / ldb (columns
// t_col + k_s <= ldt, b_col_s + k_s <= ldb), k_s is not a multiple of 8 or there are more than
// kLoraExpandActMaxSegments segments; kNullPointer for a missing y, or t / b with some k_s > 0.
KernelStatus LoraExpandActCheck(const LoraExpandActParams& p);

// Host memory, kF32 only (the reference): the sum in double, act (kernels/gemm.h's GeluTanh /
// GeluErf) on it rounded to float.
KernelStatus LoraExpandActCpu(const LoraExpandActParams& p);

}  // namespace phishard
