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
// Cache layout: kernels/kv_layout.h ([num_blocks, num_kv_heads, block_size, head_dim]); every
// kernel here copies the contiguous run of one (block, KV head) with consecutive threads on
// consecutive 16 bytes.
//
// Work split (PagedDecodeVariant::kAuto, the pipelined kernel): one block of 4 warps per (KV head
// x chunk of up to 4 of its query heads, sequence, split); GQA reads each K/V row once for the
// whole group. The block's keys go through shared memory in 32-key tiles, copied by cp.async into
// a 4-stage ring (3 tiles in flight while one is consumed); inside a warp, 4 groups of 8 lanes
// (8 groups of 4 at head dims 16, 32, 80 and 96, whose slices do not fill 8 lanes) each own a key
// at a time (a lane: its 16-byte slices of the head) with their own running max / sum / output (the
// max a reference moved only when a score passes it by 8 in log2 units, so the sum and output are
// rescaled for few keys), merged at the end (groups, then the warps that shared a head). With
// several splits a second kernel merges the splits by their log-sum-exp. kRegisterStages is the
// earlier kernel (one block per query head, K/V of the next 32 keys in registers): it wins on small
// grids (batch 1 to 32 at Phi-2 shape), the pipelined one on big batches (0.96 vs 0.83 of the copy
// bandwidth at batch 256, context 1024); kAuto picks by grid size.
// Split count of sequence s, evaluated identically by both kernels:
//   want = ceil(4 x multiprocessors / (live x blocks per split and sequence)), n = min(want,
//   max_splits, ceil(ctx / 64)), split_len = 64 x ceil(ceil(ctx / n) / 64),
//   splits = ceil(ctx / split_len); blocks per split and sequence = num_kv_heads x
//   ceil(group / 4) (pipelined) or num_heads (register stages).
// Closed dispatch: head_dim in {16, 32, 64, 80, 96, 128} x {kF16, kBF16}.
//
// Fused form (PagedDecodeCudaPlan::fold_rotary, merge_counters): a decode step's rotary + K/V
// write and the split merge inside the register-staged kernel's launch, so the step's attention
// is one launch instead of three. Every block reads its query head unrotated from the qkv row and
// rotates it itself; the blocks of the split holding key ctx - 1 (the new token) rotate that
// token's K head, take its K/V from shared memory instead of the cache, and the one of them with
// the group's first query head stores its K/V head to the cache at slots[s]. With merge_counters
// the last split block of each (sequence, head) to finish merges the splits (log-sum-exp, the merge
// kernel's code) and zeroes its counter. The float operations are RotaryKvWriteCuda's, the
// attention's and the merge kernel's, so the output and the cache are the same bits as the three
// launches; qkv is left unrotated (nothing after the attention reads it). When kAuto picks the
// pipelined kernel, fold_rotary runs RotaryKvWriteCuda before it and the merge kernel after it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/device.h"
#include "kernels/paged_attention.h"
#include "kernels/rotary_kv_write.h"

namespace phishard {

inline constexpr int kPagedDecodeMaxSplits = 16;

enum class PagedDecodeVariant {
  kAuto,            // kPipelined when the grid has >= 16 blocks an SM or GQA shares K/V, else
                    // kRegisterStages (faster on small grids: b1, b32; perf-log, decode run 1)
  kRegisterStages,  // the register-staged kernel
  kPipelined,       // 32-key tiles x 4 shared-memory stages (64 x 3, 32 x 6 measured slower)
  kTensorCore,      // QK and PV on mma.sync (paged_decode_mma.cu), up to 8 query heads of a KV
                    // head a block: 0.53x the instructions, not faster (perf-log dmma); opt-in
  kWarpPerHead,     // one warp per query head (paged_decode_warp.cu): no shared memory, no
                    // block barrier; for grids of many heads (CudaModelOptions::
                    // decode_warp_heads: the fixed work of a 4-warp head at short contexts)
  // (A register-direct streaming form, no shared memory, had the same J/GB as kPipelined and
  // ran 1.5x slower in the step: perf-log dmma2, branch dmma2; not kept.)
  // (A bulk-copy form, each stage filled by cp.async.bulk copies of whole (block, head) runs, was
  // correct but 0.90 of the copy bandwidth at the same J/GB: perf-log 14:48, branch bulk; not
  // kept.)
  // (A one-shot form, the register-staged grid with each block's keys copied into shared memory
  // at once, 63 registers: even at b1, 3-10 % slower elsewhere; perf-log 2026-11-30 16:31; not
  // kept.)
};

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
  PagedDecodeVariant variant = PagedDecodeVariant::kAuto;
  // Fused form (see above): `rotary` is this step's rotary + K/V write (RotaryKvWriteCuda's
  // parameters) and must describe the attention's own rows: qkv == q (q_stride its row pitch),
  // the same caches, heads, head_dim, block_size and dtype, num_slots a multiple of block_size,
  // num_tokens == num_seqs, write_cache, no fold_delta, no q_norm_w, rope_factor 1 (else
  // kInvalidShape). slots[s]
  // must be the cache slot of key ctx - 1 of sequence s (the new token), as the model builds them.
  bool fold_rotary = false;
  RotaryKvWriteParams rotary = {};
  // Device int32 [>= num_seqs * num_heads], all zero before the first launch; every launch leaves
  // it zero. Given: the register-staged kernel merges its splits itself (no merge launch).
  int32_t* merge_counters = nullptr;
  size_t merge_counters_len = 0;  // entries (kInvalidShape when below num_seqs * num_heads)
  // The register-staged kernel lets a programmatic dependent (Hopper PDL) launch at its start
  // instead of after its blocks' key loops: for a next kernel that reads nothing this launch
  // writes before its griddepcontrol.wait and has work to do before it (the dense bulk GEMV
  // streams its weights into shared memory; CudaModelOptions::decode_dense_bulk_rows).
  bool trigger_dependents_early = false;
  // Beside the decode stream (kernels/cuda/decode_stream_cuda.h; the register-staged fused form
  // only: fold_rotary, merge_counters and one sequence): the launch is a programmatic dependent
  // of the stream kernel that writes the qkv row, and its blocks wait for that row by spinning
  // until *qkv_ready >= qkv_ready_target (an acquire load) instead of by stream order; each
  // (sequence, head) whose output is stored adds 1 to *heads_done (release; null: no count, the
  // stream's dense items wait for the output itself: DecodeStreamParams::dense_poll_attn), which
  // the stream's dense items wait for; the kernel asks for the largest shared-memory carveout
  // (blocks of kernels whose carveouts differ never share an SM, and these must run beside the
  // stream's). Implies trigger_dependents_early; the split rule's target is 2 blocks an SM instead
  // of 4 (the stream holds the rest), and blocks past a sequence's splits leave before waiting.
  // kInvalidShape when the register-staged fused form is not what this launch would run.
  const int32_t* qkv_ready = nullptr;
  int qkv_ready_target = 0;
  int32_t* heads_done = nullptr;
  // Beside the decode stream: K/V stages (0-2, of 32 keys) each block requests before its wait
  // for the q/k/v row (they do not depend on it); 0: it waits first.
  int preload_stages = 0;
  // Benchmarks, beside the decode stream: [timeline_blocks, kPagedDecodeTimelineEvents] uint64
  // %globaltimer stamps (ns; null: off) of each block (linear id x + X (y + Y z)) below
  // timeline_blocks; 0 where the event did not happen (blocks past the splits leave at once).
  uint64_t* timeline = nullptr;
  int timeline_blocks = 0;
};

// PagedDecodeCudaPlan::timeline's events.
enum PagedDecodeTimelineEvent : int {
  kAttnTlStart = 0,     // the block started
  kAttnTlReady = 1,     // its wait for the q/k/v row ended
  kAttnTlKeysDone = 2,  // its keys done (before the warps' merge)
  kAttnTlEnd = 3,       // its output (or split partial, and the merge if last) stored and counted
  kPagedDecodeTimelineEvents = 4,
};

// Grid split bound for a launch that will serve at least `min_live_seqs` live sequences.
int PagedDecodeCudaMaxSplits(int min_live_seqs, int num_heads, int num_multiprocessors);

size_t PagedDecodeCudaWorkspaceBytes(int num_seqs, int num_heads, int head_dim, int max_splits);

// Whether the tuned decode kernels (and so the fused forms beside the decode stream) take
// head_dim (cuda::AttentionHeadDims); PagedDecodeCuda runs any other head dim up to
// kPagedAttentionGenericMaxHeadDim on the generic kernel (paged_attention_generic_cuda.h).
bool PagedDecodeCudaSupportsHeadDim(int head_dim);

// Requirements: num_tokens == num_seqs, q_stride and head_dim multiples of 8, q / caches 16-byte
// aligned. Block ids are not validated (the model does that on the host); an
// id outside [0, num_blocks) reads as zero K/V. `splits_bound` (optional) receives the grid's
// split bound.
KernelStatus PagedDecodeCuda(const PagedAttentionParams& p, const PagedDecodeCudaPlan& plan,
                             cudaStream_t stream, int* splits_bound = nullptr);

// Before the first launch beside the decode stream (PagedDecodeCudaPlan::qkv_ready): loads the
// kernels such launches run for this head_dim / dtype (both block-size forms) and sets their
// carveout. Under
// CUDA's lazy module loading a kernel's first launch loads its module, which waits for the work
// in flight — the stream kernel, which waits for this one: a deadlock. kInvalidShape for a
// head_dim or dtype the kernels do not take, kDeviceError.
KernelStatus PagedDecodeCudaPrepareBesideStream(int head_dim, DataType dtype);

}  // namespace phishard
