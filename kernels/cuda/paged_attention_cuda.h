// CUDA entry point of the varlen causal attention over the paged KV cache
// (kernels/paged_attention.h): same params, plus a host-side plan for what the host knows and the
// device arrays cannot tell it without a round trip.
//
// Two kernels behind one entry, chosen per call:
//  * prefill (any q_len; paged_attention_prefill.cu): FlashAttention-2 layout, one block per
//    (head, 128-query tile, sequence); each warp keeps its Q rows, scores, softmax state
//    and O in registers (mma.sync m16n8k16, float32 accumulation), the block walks 64-key tiles
//    gathered through the block table with cp.async into double-buffered shared memory, and the
//    causal mask costs only on the tiles that cross a warp's diagonal. S x S is never stored.
//    On Hopper a wgmma version of the same schedule (PrefillTiling::kWgmma) is tested beside it.
//  * decode (every q_len == 1): one block per (context split, sequence, KV head) serving all
//    num_heads / num_kv_heads query heads of that KV head (GQA reads K/V once), float32 FMA;
//    with more than one split ("flash-decoding") a second kernel merges the splits' partial
//    outputs by their log-sum-exp.
// Both read (and the prefill's fused store writes) the K / V caches in the layout of
// kernels/kv_layout.h, [num_blocks, num_kv_heads, block_size, head_dim]: a block's keys of one KV
// head are one contiguous run, and every cached-K/V copy walks such runs (consecutive keys
// head_dim elements apart) with 16-byte loads.
// Tuned kernels for head_dim in {16, 32, 64, 80, 96, 128} x {kF16, kBF16}; any other head_dim up
// to 256 runs the generic kernel (paged_attention_generic_cuda.h: correct, slow; the plan's
// tiling and splits do not apply, a fused store runs as its own launch first), larger ones are
// kInvalidShape, other dtypes kUnsupportedDtype, before any launch. The wgmma tilings (kWgmma,
// kWgmmaWs) take head_dim 32, 64 and 80 only (kInvalidShape otherwise); kAuto never picks them for
// another. Requirements beyond the CPU reference: q_stride and head_dim multiples of 8, q, k_cache,
// v_cache 16-byte aligned (16-byte vector loads), out 4-byte aligned, num_seqs <= 65535 (a grid
// dimension), and for the prefill kernel a finite non-zero scale. Block ids live in device memory
// and are not validated here: an id outside [0, num_blocks) reads as zero K/V. The model
// validates block tables on the host before upload.
#pragma once

#include <cstddef>

#include "kernels/device.h"
#include "kernels/paged_attention.h"

namespace phishard {

enum class AttentionKernel { kAuto, kPrefill, kDecode };

// Prefill query tiles. kAuto: kWgmmaWs at head dims 64 and 80 from 1024 query tokens (max_q_len)
// up where it runs, else kQ128 at head dim 80 from 4096 up, else kQ128Warps8 (docs/perf-log.md,
// prefill attention runs, attn7, 2026-11-30 05:34-05:40). kWgmma is measured and tested beside
// them but not chosen: it does not beat them (pre helper runs 1-2).
enum class PrefillTiling {
  kAuto,
  kQ128,        // 4 warps x 32 rows: each K/V fragment feeds two m16 tiles; 255 registers, 2 blocks
                // (8 warps) an SM
  kQ128Warps8,  // 8 warps x 16 rows, registers capped at 128: 2 blocks (16 warps) an SM
  kWgmma,       // Hopper: 2 warpgroups x 64 rows on wgmma (paged_attention_prefill_wgmma.cu), 2
                // blocks an SM; only where PagedAttentionPrefillWgmmaAvailable() (sm_90a build,
                // compute capability 9.0 device), kInvalidShape elsewhere
  kWgmmaWs,     // Hopper, warp-specialised: a producer warpgroup filling a 4-stage ring of
                // 64-key K/V tiles, 3 consumer warpgroups x 64 rows (192 a block) taking turns on
                // the tensor cores, one or two heads a block (paged_attention_prefill_wgmma_ws.cu),
                // 1 block an SM; same availability as kWgmma
};

struct PagedAttentionCudaPlan {
  int max_q_len = 0;        // max over sequences of q_len (1 for a pure decode batch)
  int max_context_len = 0;  // max over sequences of context_lens
  AttentionKernel kernel = AttentionKernel::kAuto;  // kAuto: decode iff max_q_len == 1
  // Decode split-K partials, device float32; null or too small means fewer (or no) splits.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int num_multiprocessors = 132;  // sizes the split count: aim for ~4 blocks per SM
  int force_splits = 0;           // > 0: use this many splits (tests), still capped by workspace
  PrefillTiling prefill_tiling = PrefillTiling::kAuto;
  // kWgmmaWs: query heads a block runs one after the other; 1 or 2 forced (tests; 1 with an odd
  // head count), anything else = by the grid's size (two from six waves of one-head blocks).
  int prefill_heads_per_block = 0;
  // Prefill (every tiling but kWgmma; kInvalidShape with kWgmma or a decode launch): the new
  // tokens' K and V are still in their q rows, in the fused qkv layout of rotary_kv_write.h
  // (row t = [q: num_heads | k: num_kv_heads | v: num_kv_heads] x head_dim, q_stride at least
  // that wide, K already rotated), and the cache does not hold them yet. Set both to p.k_cache /
  // p.v_cache (writable views of them): keys [context_len - q_len, context_len) of each sequence
  // are then read from those rows, and the kernel stores them into the caches at their
  // block-table slots (kernels/kv_layout.h; ids outside [0, num_blocks) are skipped). The result
  // equals RotaryKvWrite followed by this attention, with one pass over the new K/V fewer: the
  // step's RotaryKvWrite only rotates (RotaryKvWriteParams::write_cache = false).
  void* store_new_k = nullptr;
  void* store_new_v = nullptr;
};

// Whether the decode and the default (mma.sync) prefill kernels take head_dim: 16, 32, 64, 80, 96,
// 128 (kernels/cuda/attention_dispatch.cuh, AttentionHeadDims). Other head dims in
// [1, kPagedAttentionGenericMaxHeadDim] take the generic kernel.
bool PagedAttentionCudaSupportsHeadDim(int head_dim);

// Whether PrefillTiling::kWgmma and kWgmmaWs can run: the library holds sm_90a code and the current
// device is compute capability 9.0 (H100 / H200).
bool PagedAttentionPrefillWgmmaAvailable();

// The tiling a prefill launch of `p` under `plan` uses: plan.prefill_tiling, or kAuto's choice
// (from p.head_dim, plan.max_q_len and the device; see PrefillTiling).
PrefillTiling PagedAttentionPrefillTiling(const PagedAttentionParams& p,
                                          const PagedAttentionCudaPlan& plan);

// Workspace that lets a decode step of `num_tokens` sequences use up to `max_splits` splits.
size_t PagedAttentionCudaWorkspaceBytes(int num_tokens, int num_heads, int head_dim,
                                        int max_splits);

// `splits_used` (optional) receives the number of decode splits launched (0 for prefill).
KernelStatus PagedAttentionCuda(const PagedAttentionParams& p, const PagedAttentionCudaPlan& plan,
                                cudaStream_t stream, int* splits_used = nullptr);

}  // namespace phishard
