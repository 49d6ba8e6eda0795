// CUDA entry points of the grouped, table-driven segmented LoRA ops (kernels/sgmv.h). Every
// pointer is device memory: x, t, y, the tiles and their count, the weight table and the A / B
// matrices it points to. The op structs (x / y pointers, widths, table entries) travel as kernel
// parameters; everything that changes from step to step (the tiles, how many there are, which
// adapter each uses) is read from device memory, so a captured CUDA graph replays one launch for
// any batch whose tiles fit max_tiles.
//
// Storage kBF16 / kF16 (kF32 too, on a slower scalar path) for x, A, B and y; t and every
// accumulation are float32; expand rounds y once after adding all its terms.
//
// The shrink is launched as a programmatic dependent (PDL): it loads its first A chunk before
// griddepcontrol.wait (nothing a kernel of the step writes is read before it) and lets the next
// kernel launch early.
// Shrink: one thread block per (tile, op, group of 16 ranks); each warp owns two rank rows and
// all (<= 16) rows of the tile, streams its A rows once with 16-byte loads (8 elements a lane)
// and reads the tile's x rows through L1. Decode tiles are single rows, so the grid is
// (tiles x ops x rank groups) and A is read once per tile at full width.
// Expand: one thread block per (tile, 256 output columns, op); a thread owns one output column
// for all rows of the tile, reads its B row with 16-byte loads and the tile's t rows from shared
// memory (staged 32 ranks at a time).
// The vector paths need 16-bit storage, in / ldx (shrink) or rank (expand) multiples of 8 and
// 16-byte aligned x / A / B; otherwise the same kernels take a scalar path (checked per block).
//
// Rows outside every tile, slots outside the table, and entries with a null matrix or rank 0 are
// neither read nor written: t keeps whatever it held (poison stays poison), y its base output.
// Host checks: kUnsupportedDtype, kInvalidShape (widths <= 0, ldx < in, ldy < out, t_col + max_rank
// > ldt, more than kSgmvMaxOps ops or kSgmvMaxTerms terms, max_rank > kSgmvCudaMaxRank, grid
// limits), kNullPointer (a required pointer of a non-empty launch). No tiles, no ops or no rows
// launch nothing.
#pragma once

#include "kernels/device.h"
#include "kernels/gemm.h"
#include "kernels/sgmv.h"

namespace phishard {

// Largest rank a launch may declare (ref.max_rank): 4096 / 16 rank groups.
inline constexpr int kSgmvCudaMaxRank = 4096;

KernelStatus SgmvGroupedShrinkCuda(const SgmvGroupedShrinkParams& p, cudaStream_t stream);
KernelStatus SgmvGroupedExpandCuda(const SgmvGroupedExpandParams& p, cudaStream_t stream);

// The expand for decode steps (kernels/cuda/sgmv_decode.cu): same contract as
// SgmvGroupedExpandCuda (any tile of <= kSgmvTileRows rows, fastest for single-row tiles), launched
// as a programmatic dependent of the shrink before it. With act != kNone (one op, 16-bit y): every
// row of every tile in use, base tiles (slot < 0) included, becomes act(y + delta) over the whole
// op width (fc1's pre-activation then GELU, one launch); rows outside the tiles are untouched.
KernelStatus SgmvDecodeExpandCuda(const SgmvGroupedExpandParams& p, GemmEpilogue act,
                                  cudaStream_t stream);

// The fused form (kernels/sgmv.h SgmvFusedParams, kernels/cuda/sgmv_fused.cu) for decode steps:
// shrink and expand of each op in one launch, t kept in shared memory (no t buffer), ranks up to
// kSgmvFusedMaxRank (ref.max_rank above it: kInvalidShape; the model then takes the two-kernel
// path). A block owns (tile, column block, op) and recomputes its row's t, so it is meant for
// single-row tiles (any tile of <= kSgmvTileRows rows is correct). Launched as a programmatic
// dependent. With act != kNone (one op): every row of every tile in use, base tiles (slot < 0)
// included, becomes act(y + delta) over the whole op width, as SgmvDecodeExpandCuda does.
inline constexpr int kSgmvFusedMaxRank = 64;
KernelStatus SgmvDecodeFusedCuda(const SgmvFusedParams& p, GemmEpilogue act, cudaStream_t stream);

// SgmvFoldParams (kernels/sgmv.h) on the device: every row of every tile in use becomes
// act(y + delta), one rounding, so the delta-only fused launch (SgmvFusedOp::delta) and this
// give SgmvDecodeFusedCuda's bits with the delta computed while y is still being written
// (kernels/cuda/sgmv_fused.cu). act kNone / kGeluTanh / kGeluErf (else kInvalidShape). Launched
// as a programmatic dependent when p.programmatic (it waits before reading y and delta).
KernelStatus SgmvFoldCuda(const SgmvFoldParams& p, GemmEpilogue act, cudaStream_t stream);

}  // namespace phishard
