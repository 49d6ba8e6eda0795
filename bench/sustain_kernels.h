// Streaming kernels on the SMs for phishard_kernel_bench's sustained mode (bench/sustain.h): the
// floor an SM kernel can reach in joules per byte, against the driver's device-to-device copy
// (whichever engine runs it) and the decode attention. 16-byte `ld.global.nc.L1::no_allocate`
// loads, 4 in flight a thread, 8 blocks of 256 threads an SM, grid-stride over the buffer.
// `bytes` a multiple of 16, buffers 16-byte aligned; `sms` sizes the grid; `sink` (device
// uint32[256]) is written only for values random data does not give (keeps the loads live).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace phishard::bench {

// dst = src: reads and writes `bytes` each.
void SmCopy(const void* src, void* dst, size_t bytes, int sms, cudaStream_t s);
// Reads `bytes`, folds the words by xor (~0.06 integer ops a byte).
void SmRead(const void* src, size_t bytes, uint32_t* sink, int sms, cudaStream_t s);
// Reads `bytes` as bf16, one float conversion and one FMA an element (the decode attention's
// arithmetic per K or V byte, without its shuffles, softmax and addressing).
void SmReadFma(const void* src, size_t bytes, uint32_t* sink, int sms, cudaStream_t s);

// The decode attention taken apart ("mix" cases of `sustain`): kernels that read the paged K / V
// cache exactly as the pipelined decode attention does (kernels/cuda/paged_decode.cu: one block of
// 4 warps a (head, sequence), tiles of 32 keys through the block table, 8 lanes a key, lane cl
// holding 16-byte slices cl and cl + 8 of the head's row) and add the attention's work one
// ingredient at a time, so the energy per byte of each can be told apart:
//   level 1: every K and V element converted and FMA'd with a constant (as SmReadFma);
//   level 2: K as the dot product with q (one FMA an element) + the 3 shuffles a key, V as level 1;
//   level 3: + the online softmax (running max, exp2f a key, rescale) and P V (one FMA a V
//   element);
// smem = false: 16-byte ld.global.nc.L1::no_allocate straight into registers, the next tile's
// loads in flight while this one computes; true: cp.async into a 4-stage shared-memory ring and
// ld.shared, as the pipelined kernel. Reads no output; `sink` keeps the work live.
struct AttnMixParams {
  const void* k_cache;          // [num_blocks, heads, 16, head_dim] device, bf16
  const void* v_cache;          // same
  const void* q;                // [seqs, q_stride] device, bf16: head h at h * head_dim
  int q_stride = 0;             // elements
  const int32_t* block_tables;  // [seqs, max_blocks] device: ids in [0, num_blocks)
  int seqs = 0, ctx = 0, heads = 0, head_dim = 0, max_blocks = 0;
  uint32_t* sink = nullptr;  // device uint32[128]
};
// False (nothing launched) for a head_dim other than 80 or a level outside 1-3.
bool SmAttnMix(const AttnMixParams& p, int level, bool smem, cudaStream_t s);

}  // namespace phishard::bench
