// Skinny GEMM for decode steps (m <= kGemvMaxRows rows): at such m a linear layer is one pass
// over its weights. Same math as kernels/gemm.h, plus an optional second input segment:
//   y[m, n] (= | +=) act( x [m, :k ] · w [n, :k ]ᵀ + bias [n]
//                       + x2[m, :k2] · w2[n, :k2]ᵀ + bias2[n] )
// The second segment fuses two linear layers that add into the same output into one pass (Phi's
// parallel residual: h += dense(attn) + fc2(mlp)); its sum is rounded once, not twice.
//
// One warp owns one output column n for all m rows (or a 1/ksplit slice of its k range, the
// slices summed through shared memory in a fixed order): 16-byte weight loads that skip L1, four
// in flight per lane, x read through L1 (every warp of the SM reads the same rows). float32
// accumulation; deterministic (no atomics), so the same call gives the same bits every time.
// The CPU reference is GemmCpu (twice for two segments). Measured on the H200 (docs/perf-log.md):
// at m = 1 it beats cuBLASLt on the fused pair (one pass instead of two GEMMs) and matches it on
// the LM head; cuBLASLt is faster on single K = 2560 layers and from m = 2 on (x is re-read through
// L1 for every weight chunk and row), so the model uses it only where it wins.
#pragma once

#include "kernels/device.h"
#include "kernels/gemm.h"

namespace phishard {

inline constexpr int kGemvMaxRows = 8;

struct GemvParams {
  GemmParams a;  // x, w, bias, y, m, n, k, ldx, ldy, accumulate, epilogue, dtype (kF16 / kBF16)
  // Optional second segment (x2 == nullptr: none): [m, k2] with row stride ldx2, [n, k2] weights.
  const void* x2 = nullptr;
  const void* w2 = nullptr;
  const void* bias2 = nullptr;
  int k2 = 0;
  int ldx2 = 0;
  // Output (and bias) type: a.dtype or kF32 (lm_head logits).
  DataType y_dtype = DataType::kF32;
  // Programmatic dependent launch (Hopper): the kernel may start while the previous kernel on the
  // stream is still running; it prefetches its weights into L2 (they do not depend on that
  // kernel) and waits for it (griddepcontrol.wait) before reading x or touching y. Safe after any
  // kernel; gains most after kernels that trigger their dependents early (GEMV, PagedDecode).
  bool programmatic_launch = false;
  // Tuning overrides for benchmarks (0: the kernel's measured defaults). ksplit: warps sharing one
  // output column's k range (1, 2, 4 or 8); unroll: 16-byte weight loads in flight per lane (4 or
  // 8).
  int ksplit = 0;
  int unroll = 0;
};

// True when GemvCuda can run `p`: 1 <= m <= kGemvMaxRows, k and k2 multiples of 8, row strides
// multiples of 8 elements, x/w pointers 16-byte aligned, dtype kF16/kBF16, y_dtype dtype or kF32,
// ksplit and unroll 0 or one of the values above.
bool GemvCudaSupports(const GemvParams& p);

// kInvalidShape when !GemvCudaSupports(p) (or accumulate with an activation), kNullPointer for a
// missing pointer; never allocates.
KernelStatus GemvCuda(const GemvParams& p, cudaStream_t stream);

}  // namespace phishard
