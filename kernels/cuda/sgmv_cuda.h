// CUDA entry points of the segmented LoRA ops (kernels/sgmv.h). Every pointer is device memory:
// x, t, y, the segment table, the per-segment A / B pointer tables, ranks and scales. A step
// uploads its plan once and every layer then launches without host work or synchronisation (so
// the launches can also be captured in a CUDA graph).
//
// Storage kBF16 / kF16 (kF32 too) for x, A, B and y; t and every accumulation are float32. Expand
// reads y, adds scale · t · Bᵀ in float32 and rounds the sum once to the storage type.
//
// Two kernels per op, both correct for every shape; the choice is only about speed:
//   kTiled   one thread block per (32-row tile, column tile). Rows of a tile that share a segment
//            share one shared-memory tile of A (B), so a prefill segment of many tokens reads its
//            adapter weights once per row tile instead of once per row.
//   kPerRow  one thread block per (row, column tile). Decode: each sequence brings one row, and
//            rows of different adapters gain nothing from tiling.
// kAuto takes kPerRow when the segments average at most 2 rows (num_rows <= 2 * num_segments),
// else kTiled.
//
// The segment table lives on the device, so it is not validated here: the host planner must give
// non-decreasing seg_starts inside [0, num_rows] and ranks inside [0, ldt], as the CPU reference
// checks. The kernels still clamp rows to [0, num_rows) and ranks to [0, ldt], so a bad table gives
// wrong numbers but never an access of x, t or y out of bounds (A and B are read for the rank the
// table claims). Rows outside every segment and rows of segments with a null A (B) or rank 0 are
// neither read nor written: t keeps whatever it held (poison stays poison), y its base output.
// Host checks: kUnsupportedDtype, kInvalidShape (in / out / ldt <= 0, ldx < in, ldy < out, a
// column tile count over the grid limit), kNullPointer (a required pointer of a non-empty launch;
// scales may be null = 1). num_rows == 0 or num_segments == 0 launches nothing.
#pragma once

#include "kernels/device.h"
#include "kernels/sgmv.h"

namespace phishard {

enum class SgmvCudaPath { kAuto, kTiled, kPerRow };

KernelStatus SgmvShrinkCuda(const SgmvShrinkParams& p, cudaStream_t stream,
                            SgmvCudaPath path = SgmvCudaPath::kAuto);
KernelStatus SgmvExpandCuda(const SgmvExpandParams& p, cudaStream_t stream,
                            SgmvCudaPath path = SgmvCudaPath::kAuto);

}  // namespace phishard
