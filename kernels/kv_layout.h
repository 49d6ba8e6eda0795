// Where one key's K (or V) values of one KV head live in a layer's paged cache — the ONE place
// that says it; every writer (rotary_kv_write, the prefill kernels' fused store) and every reader
// (paged attention: CPU reference, prefill and decode kernels, the persistent decode kernel)
// addresses the cache through these functions.
//
// One layer's K cache (and, separately, its V cache), `dtype` elements:
//   [num_blocks, num_kv_heads, block_size, head_dim]
// i.e. block-major, then KV head, then the block's tokens: one (block, KV head)'s block_size x
// head_dim values are contiguous (16 x 80 bf16 = 2,560 bytes for Phi-2). A decode or prefill
// attention reads exactly those runs, so each DRAM page it opens serves whole runs instead of
// 160-byte pieces 5 KB apart (the [block, token, head, dim] layout this replaced: same bytes,
// ~0.03 J/GB less and ~5 % faster sustained on an H200, docs/perf-log.md 2026-11-29 13:03).
//
// A "slot" (RotaryKvWriteParams::slots, the router's block ids x block_size + offset) is still
// block * block_size + offset; only the element offset of a slot's head moved. The layout is
// internal (spec §4.3): nothing outside the process sees it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PHISHARD_KV_HD __host__ __device__ __forceinline__
#else
#define PHISHARD_KV_HD inline
#endif

namespace phishard {

// Elements of one (block, KV head) run: block_size x head_dim.
PHISHARD_KV_HD int64_t KvHeadRunElems(int block_size, int head_dim) {
  return static_cast<int64_t>(block_size) * head_dim;
}

// Elements of one whole block (all KV heads): num_kv_heads x block_size x head_dim.
PHISHARD_KV_HD int64_t KvBlockElems(int block_size, int num_kv_heads, int head_dim) {
  return static_cast<int64_t>(num_kv_heads) * block_size * head_dim;
}

// Element offset of the run of (block, kv_head): its token 0, dim 0.
PHISHARD_KV_HD int64_t KvRunOffset(int64_t block, int kv_head, int block_size, int num_kv_heads,
                                   int head_dim) {
  return (block * num_kv_heads + kv_head) * KvHeadRunElems(block_size, head_dim);
}

// Element offset of token `in_block` (in [0, block_size)) of `block`, KV head `kv_head`, dim 0.
PHISHARD_KV_HD int64_t KvOffset(int64_t block, int in_block, int kv_head, int block_size,
                                int num_kv_heads, int head_dim) {
  return KvRunOffset(block, kv_head, block_size, num_kv_heads, head_dim) +
         static_cast<int64_t>(in_block) * head_dim;
}

// Element offset of slot `slot` (= block * block_size + in_block), KV head `kv_head`, dim 0.
PHISHARD_KV_HD int64_t KvSlotOffset(int64_t slot, int kv_head, int block_size, int num_kv_heads,
                                    int head_dim) {
  return KvOffset(slot / block_size, static_cast<int>(slot % block_size), kv_head, block_size,
                  num_kv_heads, head_dim);
}

}  // namespace phishard

#undef PHISHARD_KV_HD
