// Internal to kernels/cuda/decode_mega.cu: kDecodeMegaFormLeanAttn, AttentionItem with fewer
// instructions on its dependent chain. Included by decode_mega.cu only.
//
// Why (perf-log, mega4 run 2): an attention item is not DRAM-bound - its K/V prefetched into L2
// ~15 us ahead left it as long (ctx4096: 52.7 against 53.4 us a layer, 4 chunks), and with its
// K/V in shared memory it still took 10.7 us at ctx128. With 8 consumer warps an SM (2 a
// scheduler) the instruction latencies of each thread's chain add up: in AttentionItem every
// K and V load computes its cache row through CacheRow (a division and a modulo by the runtime
// block size, a 64-bit address) - 13 times a chunk a thread (1 key, 12 values) - and the key's dot
// product reads q as 80 scalar shared loads. Here the thread scoring row t computes the row's
// offset once a chunk and shares it through sm.rowoff (one more CTA barrier a chunk), and q is
// read as float4. The same loads, products and sums in the same order as AttentionItem: the same
// values bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/decode_mega_attention.cuh"
#include "kernels/cuda/decode_mega_parts.cuh"

namespace phishard {
namespace decode_mega {

template <typename T, int kForm>
__device__ void AttentionItemLean(const Args& a, const Smem& sm, const LayerPtrs& lp, int head,
                                  int split, int ctx) {
  const DecodeMegaParams& p = a.p;
  const int t = threadIdx.x, hd = p.head_dim, chunks = hd / 8;
  const int kvh = head / (p.num_heads / p.num_kv_heads);
  const int split_len = (ctx + a.nsplit - 1) / a.nsplit;
  const int p0 = split * split_len;
  const int p1 = min(ctx, p0 + split_len);
  if (t < hd) {
    sm.q[t] = LoadCg(static_cast<const T*>(p.q) + static_cast<size_t>(head) * hd + t) * p.scale;
    sm.o[t] = 0.0f;
  }
  const T* kc = reinterpret_cast<const T*>(lp.k_cache);
  const T* vc = reinterpret_cast<const T*>(lp.v_cache);
  const float4* q4 = reinterpret_cast<const float4*>(sm.q);  // (16-byte aligned: MakeArgs)
  float m = -INFINITY, l = 0.0f;
  for (int c0 = p0; c0 < p1; c0 += kItemChunk) {
    const int len = min(kItemChunk, p1 - c0);
    const int b0 = c0 / p.block_size, nb = (c0 + len - 1) / p.block_size - b0 + 1;
    for (int j = t; j < nb; j += kConsumers) sm.blocks[j] = __ldg(p.block_table + b0 + j);
    ConsumerSync();  // q, o (first chunk) and the block ids
    // Row t's element offset in the layer's K and V caches (the same in both: KvOffset of its
    // block, token in the block and kvh); -1: block id out of range (reads as zero K/V, as
    // PagedDecodeCuda). Rows of one block are hd apart inside the (block, kvh) run.
    int64_t off = -1;
    if (t < len) {
      const int pos = c0 + t;
      const int blk = sm.blocks[pos / p.block_size - b0];
      if (blk >= 0 && blk < p.num_blocks) {
        off = KvOffset(blk, pos % p.block_size, kvh, p.block_size, p.num_kv_heads, hd);
      }
      sm.rowoff[t] = off;
    }
    ConsumerSync();  // the row offsets
    // As AttentionItem: this thread's V rows of its first P V batch load with the keys.
    constexpr int kKBatch = 10;
    const int groups = kConsumers / chunks, g = t / chunks, c = t % chunks;
    uint4 vpre[kPvBatch];
#pragma unroll
    for (int u = 0; u < kPvBatch; ++u) {
      const int i = g + u * groups;
      const int64_t vo = g < groups && i < len ? sm.rowoff[i] : -1;
      vpre[u] =
          vo >= 0 ? __ldcg(reinterpret_cast<const uint4*>(vc + vo) + c) : make_uint4(0, 0, 0, 0);
    }
    float d = -INFINITY;
    if (t < len) {
      d = 0.0f;
      if (off >= 0) {
        const uint4* kr = reinterpret_cast<const uint4*>(kc + off);
        for (int k0 = 0; k0 < chunks; k0 += kKBatch) {
          uint4 kv[kKBatch];
#pragma unroll
          for (int u = 0; u < kKBatch; ++u) {
            kv[u] = k0 + u < chunks ? __ldcg(kr + k0 + u) : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int u = 0; u < kKBatch; ++u) {
            if (k0 + u < chunks) {
              const T* e = reinterpret_cast<const T*>(&kv[u]);
              const float4 qa = q4[2 * (k0 + u)], qb = q4[2 * (k0 + u) + 1];
              const float qv[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
#pragma unroll
              for (int jj = 0; jj < 8; ++jj) d = fmaf(qv[jj], cuda::ToFloat(e[jj]), d);
            }
          }
        }
      }
    }
    const float m_new = fmaxf(m, ConsumerMax(d, sm.scratch));
    const float alpha = m == -INFINITY ? 0.0f : expf(m - m_new);
    const float e = t < len ? expf(d - m_new) : 0.0f;
    if (t < len) sm.scores[t] = e;
    l = l * alpha + ConsumerSum(e, sm.scratch);  // its barriers publish sm.scores
    ChunkPv<T>(sm, t, hd, len, groups, g, c, alpha, vpre, [&](int i) {
      const int64_t vo = i < len ? sm.rowoff[i] : -1;
      return vo >= 0 ? __ldcg(reinterpret_cast<const uint4*>(vc + vo) + c) : make_uint4(0, 0, 0, 0);
    });
    ConsumerSync();  // scores, red2, the block ids and row offsets are rewritten by the next chunk
    m = m_new;
  }
  if (p0 >= p1) ConsumerSync();  // (no chunk) q and o written
  AttentionTail<T, kForm>(a, sm, head, split, m, l);
}

}  // namespace decode_mega
}  // namespace phishard
