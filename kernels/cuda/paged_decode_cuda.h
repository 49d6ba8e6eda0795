// Decode attention over the paged KV cache, built to be captured once in a CUDA graph and replayed
// every step: one query row per sequence (row s belongs to sequence s; cu_q_lens is not read),
// and everything that changes between steps is read from device memory by the kernels: the
// context lengths, the block tables, their row pitch and the number of live sequences, from
// which each sequence's split count is derived on the device. The host decides only the grid.
//
// Math: kernels/paged_attention.h (PagedAttentionCpu is the reference), float32 scores,
// probabilities and sums. A sequence with context_lens[s] == 0 is a padding row: its output row
// is zeroed and nothing is read for it.
//
// Work split: one block of 4 warps per (split, sequence, query head). A warp is 4 groups of 8
// lanes; a group owns one key at a time, each lane a 16-byte slice of the head (two for
// head_dim 80), and keeps its own running max / sum / output; K and V of 4 keys per group are
// loaded before any is used (16 keys a warp, 64 a block in flight). The groups and warps are
// merged once at the end; with several splits a second kernel merges the splits by their
// log-sum-exp. GQA re-reads K/V for each query head of a group (through L2); Phi is MHA.
// Split count of sequence s, evaluated identically by both kernels:
//   want = ceil(4 x multiprocessors / (live x num_heads)), n = min(want, max_splits, ceil(ctx /
//   64)) split_len = 64 x ceil(ceil(ctx / n) / 64), splits = ceil(ctx / split_len)
// Closed dispatch: head_dim in {32, 64, 80} x {kF16, kBF16}.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/device.h"
#include "kernels/paged_attention.h"

namespace phishard {

inline constexpr int kPagedDecodeMaxSplits = 16;

struct PagedDecodeCudaPlan {
  // Device int32[2] or null: [0] live sequences this step (rows >= it are padding), [1] row pitch
  // of block_tables. Null: p.num_seqs and p.max_blocks_per_seq.
  const int32_t* step_info = nullptr;
  // Split dimension of the grid (an upper bound; each sequence uses what the rule above gives).
  // 0: PagedDecodeCudaMaxSplits(p.num_seqs, ...). Capped by kPagedDecodeMaxSplits and by what
  // the workspace holds.
  int max_splits = 0;
  void* workspace = nullptr;  // device float32 partials; null or small means fewer splits
  size_t workspace_bytes = 0;
  int num_multiprocessors = 132;
};

// Grid split bound for a launch that will serve at least `min_live_seqs` live sequences.
int PagedDecodeCudaMaxSplits(int min_live_seqs, int num_heads, int num_multiprocessors);

size_t PagedDecodeCudaWorkspaceBytes(int num_seqs, int num_heads, int head_dim, int max_splits);

bool PagedDecodeCudaSupportsHeadDim(int head_dim);

// Requirements: num_tokens == num_seqs, q_stride and head_dim multiples of 8, q / caches 16-byte
// aligned. Block ids are not validated (the model does that on the host); an id outside
// [0, num_blocks) reads as zero K/V. `splits_bound` (optional) receives the grid's split bound.
KernelStatus PagedDecodeCuda(const PagedAttentionParams& p, const PagedDecodeCudaPlan& plan,
                             cudaStream_t stream, int* splits_bound = nullptr);

}  // namespace phishard
