// Tensor-parallel placement of a LoRA adapter (spec §7.7, the correct scheme; used by every
// W > 1 backend through ModelBackend::ShardAdapter). Every target follows its base weight's split
// (spec §6.8), and no LoRA step needs a collective of its own:
//   column-parallel q_proj, k_proj, v_proj, fc1: A [r, in] replicated, B keeps the rank's output
//     rows; the local delta (x · Aᵀ) · B_localᵀ · scale lands in the rank's output columns.
//   row-parallel dense, fc2: A keeps the rank's input columns [r, in / W], B [out, r] replicated;
//     (x_local · A_localᵀ) · Bᵀ · scale is a partial sum that goes into the rank's partial output
//     before the layer's one all-reduce, and linearity makes the sum exact.
//   lm_head: vocab-parallel when V % W == 0 (A replicated, B keeps rows [rank·V/W, (rank+1)·V/W),
//     added to the local logits before the all-gather), else replicated like the base head.
// Upstream LoRAX all-gathers / all-reduces x · A instead, and its lm_head LoRA is only coherent for
// W = 1 (a bug, not reproduced). scale and r are unchanged by sharding (no rank padding).
#pragma once

#include "absl/status/statusor.h"
#include "model/lora_adapter.h"
#include "model/phi_config.h"

namespace phishard {

// The shapes one rank holds, as a PhiConfig whose LoraTargetDims give the local [in, out] of every
// target: heads, KV heads and intermediate size divided by W, vocab too when V % W == 0.
// The split is the base weights' (MakePhiShard in phi_weights.h): KV heads are replicated when
// nKV < W divides W, and k/v B rows then come from the rank's replicated KV head.
// INVALID_ARGUMENT when world_size < 1, or nH or I is not divisible by it, or nKV neither
// divides by it nor divides it.
absl::StatusOr<PhiConfig> LoraShardConfig(const PhiConfig& base, int world_size);

// The part of `full` (loaded against `base`) that rank `rank` of `world_size` applies.
absl::StatusOr<LoraAdapter> ShardLoraAdapter(const LoraAdapter& full, const PhiConfig& base,
                                             int rank, int world_size);

}  // namespace phishard
