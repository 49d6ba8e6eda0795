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
//
// GemvParams::bulk selects a second kernel for the same math (kernels/cuda/gemv_bulk.cu): weight
// rows stream through a shared-memory ring filled by Hopper bulk copies, the first stages
// requested before griddepcontrol.wait. Measured at m = 1 (dec1 runs, docs/perf-log.md): chained
// as programmatic dependents it reads qkv in 13.8 us (cuBLASLt 14.4, column kernel 15.9), dense
// 7.4 (8.3), fc1 17.0 (17.2), fc2 18.4 (18.6), the LM head 66.5 (column kernel 66.8); launched
// plainly it is slower than both. From m = 2 on both GEMVs lose to cuBLASLt.
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
  // The bulk kernel (kernels/cuda/gemv_bulk.cu) instead of the column kernel: each block streams a
  // contiguous range of weight rows through a ring of shared-memory stages filled by Hopper bulk
  // copies (sm_90), x rows held in shared memory. Tuning (0: defaults): stage size cap in KiB,
  // ring stages (<= 8), blocks per SM (<= 8).
  bool bulk = false;
  int bulk_stage_kb = 0;
  int bulk_stages = 0;
  int bulk_blocks_per_sm = 0;
  // Bulk kernel only, one segment: x rows are LayerNorm inputs; the kernel uses
  // LayerNorm(x) * ln_weight + ln_bias over k (rounded to dtype, as LayerNormCuda writes it)
  // instead of x. [k] device, dtype.
  const void* ln_weight = nullptr;
  const void* ln_bias = nullptr;
  float ln_eps = 1e-5f;
};

// True when GemvCuda can run `p`: 1 <= m <= kGemvMaxRows, k and k2 multiples of 8, row strides
// multiples of 8 elements, x/w pointers 16-byte aligned, dtype kF16/kBF16, y_dtype dtype or kF32,
// ksplit and unroll 0 or one of the values above.
bool GemvCudaSupports(const GemvParams& p);

// The bulk kernel's own limits (called by GemvCudaSupports when p.bulk): its shared memory
// (ring + x rows of both segments) fits the device's opt-in limit, tuning fields in range,
// LayerNorm only on one segment with a bias. Queries the current device.
bool GemvBulkFits(const GemvParams& p);
KernelStatus GemvBulkCuda(const GemvParams& p, cudaStream_t stream);  // via GemvCuda

// kInvalidShape when !GemvCudaSupports(p) (or accumulate with an activation), kNullPointer for a
// missing pointer; never allocates.
KernelStatus GemvCuda(const GemvParams& p, cudaStream_t stream);

}  // namespace phishard
