// Internal to kernels/cuda/decode_mega.cu: the consumers' LayerNorm of the residual row and the
// attention items (one (head, split) of the new token's query over its cached context, merged by
// the head's last split). Included by decode_mega.cu only.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/decode_mega_parts.cuh"

namespace phishard {
namespace decode_mega {

// sm.x = dtype(LayerNorm(h) * w + b), as LayerNormCuda (float32 mean, centred variance).
template <typename T>
__device__ void LayerNormRow(const Args& a, const Smem& sm, const T* w, const T* b) {
  const DecodeMegaParams& p = a.p;
  const int t = threadIdx.x, chunks = p.hidden / 8;
  uint4* x = static_cast<uint4*>(sm.x);
  const uint4* h = static_cast<const uint4*>(p.h);
  // The weight and bias of this thread's first two chunks load with h (one round trip).
  uint4 wpre[2], bpre[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int c = t + k * kConsumers;
    if (c < chunks) {
      wpre[k] = __ldg(reinterpret_cast<const uint4*>(w) + c);
      bpre[k] = __ldg(reinterpret_cast<const uint4*>(b) + c);
    }
  }
  float sum = 0.0f;
  for (int c = t; c < chunks; c += kConsumers) {
    const uint4 v = __ldcg(h + c);
    x[c] = v;
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += cuda::ToFloat(e[i]);
  }
  const float mean = ConsumerSum(sum, sm.scratch) / p.hidden;
  float sq = 0.0f;
  for (int c = t; c < chunks; c += kConsumers) {
    const uint4 v = x[c];
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float d = cuda::ToFloat(e[i]) - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(ConsumerSum(sq, sm.scratch) / p.hidden + a.p.eps);
  for (int c = t; c < chunks; c += kConsumers) {  // each thread rewrites only its own chunks
    uint4 v = x[c];
    T* e = reinterpret_cast<T*>(&v);
    const int k = (c - t) / kConsumers;
    const uint4 wv = k == 0   ? wpre[0]
                     : k == 1 ? wpre[1]
                              : __ldg(reinterpret_cast<const uint4*>(w) + c);
    const uint4 bv = k == 0   ? bpre[0]
                     : k == 1 ? bpre[1]
                              : __ldg(reinterpret_cast<const uint4*>(b) + c);
    const T* we = reinterpret_cast<const T*>(&wv);
    const T* be = reinterpret_cast<const T*>(&bv);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      e[i] = cuda::FromFloat<T>((cuda::ToFloat(e[i]) - mean) * rstd * cuda::ToFloat(we[i]) +
                                cuda::ToFloat(be[i]));
    }
    x[c] = v;
  }
  ConsumerSync();
}

// Cache row of position c0 + i of KV head kvh: its hd contiguous values inside the (block, kvh)
// run (kernels/kv_layout.h; the block's next position is hd further). sm.blocks holds the block
// ids of the chunk from c0 on. Null when the block id is out of range (reads as zero K/V, as
// PagedDecodeCuda).
template <typename T>
__device__ __forceinline__ const uint4* CacheRow(const Args& a, const Smem& sm, const char* cache,
                                                 int c0, int i, int kvh) {
  const DecodeMegaParams& p = a.p;
  const int pos = c0 + i;
  const int blk = sm.blocks[pos / p.block_size - c0 / p.block_size];
  if (blk < 0 || blk >= p.num_blocks) return nullptr;
  return reinterpret_cast<const uint4*>(
      reinterpret_cast<const T*>(cache) +
      KvOffset(blk, pos % p.block_size, kvh, p.block_size, p.num_kv_heads, p.head_dim));
}

// An item's end: its partial (m, l, o = sm.o) to a.p.partials, counted on the head's word; the
// block finishing the head's last split merges the splits into attn (in split order).
template <typename T, int kForm>
__device__ void AttentionTail(const Args& a, const Smem& sm, int head, int split, float m,
                              float l) {
  const DecodeMegaParams& p = a.p;
  const int t = threadIdx.x, hd = p.head_dim;
  // Partial [m, l, o[hd]] of (head, split), then count it.
  float* part =
      a.p.partials + (static_cast<size_t>(head) * kDecodeMegaMaxSplits + split) * (hd + 2);
  if (t < hd) part[2 + t] = sm.o[t];
  if (t == 0) {
    part[0] = m;
    part[1] = l;
  }
  int* flag = reinterpret_cast<int*>(sm.scratch + 16);
  if constexpr ((kForm & kDecodeMegaFormAttnTail) != 0) {
    // One acq_rel atomic of thread 0 after the CTA barrier (fence + count); the last split's
    // block loads every split's (m, l, o) at once and merges in split order (the same sums).
    ConsumerSync();
    if (t == 0) {
      uint32_t old;
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                   : "=r"(old)
                   : "l"(p.sync + kHeadWord + head)
                   : "memory");
      const bool last = old == static_cast<uint32_t>(a.nsplit - 1);
      // (reset for the next layer: ordered before it by the grid barriers in between)
      if (last)
        asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(p.sync + kHeadWord + head)
                     : "memory");
      *flag = last ? 1 : 0;
    }
    ConsumerSync();
    if (*flag != 0) {  // (the same in every consumer thread)
      // Thread t < nsplit brings split t's (m, l) to shared memory with the o loads in flight.
      const float* base =
          a.p.partials + static_cast<size_t>(head) * kDecodeMegaMaxSplits * (hd + 2);
      float os[kDecodeMegaMaxSplits];
#pragma unroll
      for (int s = 0; s < kDecodeMegaMaxSplits; ++s) {
        if (s < a.nsplit && t < hd) os[s] = __ldcg(base + s * (hd + 2) + 2 + t);
      }
      if (t < a.nsplit) {
        sm.scores[t] = __ldcg(base + t * (hd + 2));
        sm.scores[kDecodeMegaMaxSplits + t] = __ldcg(base + t * (hd + 2) + 1);
      }
      ConsumerSync();
      if (t < hd) {
        float mm = -INFINITY;
        for (int s = 0; s < a.nsplit; ++s) mm = fmaxf(mm, sm.scores[s]);
        float lsum = 0.0f, osum = 0.0f;
        if (mm != -INFINITY) {
#pragma unroll
          for (int s = 0; s < kDecodeMegaMaxSplits; ++s) {
            const float ms = s < a.nsplit ? sm.scores[s] : -INFINITY;
            if (ms != -INFINITY) {
              const float wgt = expf(ms - mm);
              lsum += sm.scores[kDecodeMegaMaxSplits + s] * wgt;
              osum += os[s] * wgt;
            }
          }
        }
        static_cast<T*>(p.attn)[static_cast<size_t>(head) * hd + t] =
            cuda::FromFloat<T>(lsum > 0.0f ? osum / lsum : 0.0f);
      }
    }
    ConsumerSync();  // flag, scores and q / o are rewritten by the next item
    return;
  }
  __threadfence();
  ConsumerSync();
  if (t == 0) {
    uint32_t* counter = p.sync + kHeadWord + head;
    const bool last = atomicAdd(counter, 1u) == static_cast<uint32_t>(a.nsplit - 1);
    if (last) {
      atomicExch(counter, 0u);  // every split arrived: ready for the next layer
      __threadfence();
    }
    *flag = last ? 1 : 0;
  }
  ConsumerSync();
  if (*flag != 0 && t < hd) {
    const float* base = a.p.partials + static_cast<size_t>(head) * kDecodeMegaMaxSplits * (hd + 2);
    float mm = -INFINITY;
    for (int s = 0; s < a.nsplit; ++s) mm = fmaxf(mm, __ldcg(base + s * (hd + 2)));
    float lsum = 0.0f, osum = 0.0f;
    if (mm != -INFINITY) {
      for (int s = 0; s < a.nsplit; ++s) {
        const float ms = __ldcg(base + s * (hd + 2));
        if (ms == -INFINITY) continue;
        const float wgt = expf(ms - mm);
        lsum += __ldcg(base + s * (hd + 2) + 1) * wgt;
        osum += __ldcg(base + s * (hd + 2) + 2 + t) * wgt;
      }
    }
    static_cast<T*>(p.attn)[static_cast<size_t>(head) * hd + t] =
        cuda::FromFloat<T>(lsum > 0.0f ? osum / lsum : 0.0f);
  }
  ConsumerSync();  // flag and q / o are rewritten by the next item
}

// V rows of a chunk in flight at a time for one thread in P V (the first batch loads with the
// keys).
constexpr int kPvBatch = 12;

// P V of a chunk of len positions and the item's output update, for AttentionItem and
// AttentionItemLean: thread (group g, chunk c) sums scores[i] v_i over its positions
// i = g, g + groups, ... < len for dims 8 c .. 8 c + 7, kPvBatch V rows in flight (the first
// batch is vpre; load_v(i): 16-byte chunk c of V row i, zeros for i >= len or a bad block id);
// then sm.o[t] = sm.o[t] alpha + the groups' sums in group order. sm.scores must be published;
// the caller syncs before sm.scores / sm.red2 are rewritten.
template <typename T, typename LoadV>
__device__ __forceinline__ void ChunkPv(const Smem& sm, int t, int hd, int len, int groups, int g,
                                        int c, float alpha, const uint4 (&vpre)[kPvBatch],
                                        LoadV&& load_v) {
  float o8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (g < groups) {
    for (int i0 = g; i0 < len; i0 += kPvBatch * groups) {
      uint4 vv[kPvBatch];
#pragma unroll
      for (int u = 0; u < kPvBatch; ++u) vv[u] = i0 == g ? vpre[u] : load_v(i0 + u * groups);
#pragma unroll
      for (int u = 0; u < kPvBatch; ++u) {
        const int i = i0 + u * groups;
        if (i < len) {
          const T* ev = reinterpret_cast<const T*>(&vv[u]);
          const float pw = sm.scores[i];
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) o8[jj] = fmaf(pw, cuda::ToFloat(ev[jj]), o8[jj]);
        }
      }
    }
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) sm.red2[g * hd + c * 8 + jj] = o8[jj];
  }
  ConsumerSync();
  if (t < hd) {
    float sum = 0.0f;
    for (int gg = 0; gg < groups; ++gg) sum += sm.red2[gg * hd + t];
    sm.o[t] = sm.o[t] * alpha + sum;
  }
}

// Attention of query head `head` over split `split` of the context: writes its (m, l, o)
// partial; the block finishing a head's last split merges them into attn (in split order).
// Positions go in chunks of kItemChunk (one a thread for the scores), every load of a pass
// issued before its arithmetic (one memory round trip a pass for head_dim <= 128). Loads walk the
// (block, kvh) runs: thread t reads key t's hd contiguous values (16 bytes a load), so a warp's
// 32 keys are consecutive rows of the runs they fall in (2-3 runs with 16-token blocks); in P V,
// threads (group g, chunk c) load consecutive 16-byte chunks of consecutive rows.
template <typename T, int kForm>
__device__ void AttentionItem(const Args& a, const Smem& sm, const LayerPtrs& lp, int head,
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
  float m = -INFINITY, l = 0.0f;
  for (int c0 = p0; c0 < p1; c0 += kItemChunk) {
    const int len = min(kItemChunk, p1 - c0);
    const int b0 = c0 / p.block_size, nb = (c0 + len - 1) / p.block_size - b0 + 1;
    for (int j = t; j < nb; j += kConsumers) sm.blocks[j] = __ldg(p.block_table + b0 + j);
    ConsumerSync();  // q, o (first chunk) and the block ids
    // This thread's V rows of its first P V batch (thread (group g, chunk c) sums positions g,
    // g + G, ... of the chunk's 8 dims), loaded with the keys: they do not depend on the scores,
    // so the chunk waits one memory round trip for K and V instead of two.
    constexpr int kKBatch = 10;  // 16-byte chunks of a key in flight (head_dim 80: all)
    const int groups = kConsumers / chunks, g = t / chunks, c = t % chunks;
    uint4 vpre[kPvBatch];
#pragma unroll
    for (int u = 0; u < kPvBatch; ++u) {
      const int i = g + u * groups;
      const uint4* vr =
          g < groups && i < len ? CacheRow<T>(a, sm, lp.v_cache, c0, i, kvh) : nullptr;
      vpre[u] = vr != nullptr ? __ldcg(vr + c) : make_uint4(0, 0, 0, 0);
    }
    float d = -INFINITY;
    if (t < len) {
      const uint4* kr = CacheRow<T>(a, sm, lp.k_cache, c0, t, kvh);
      d = 0.0f;
      if (kr != nullptr) {
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
#pragma unroll
              for (int jj = 0; jj < 8; ++jj)
                d = fmaf(sm.q[(k0 + u) * 8 + jj], cuda::ToFloat(e[jj]), d);
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
      const uint4* vr = i < len ? CacheRow<T>(a, sm, lp.v_cache, c0, i, kvh) : nullptr;
      return vr != nullptr ? __ldcg(vr + c) : make_uint4(0, 0, 0, 0);
    });
    ConsumerSync();  // scores, red2 and the block ids are rewritten by the next chunk
    m = m_new;
  }
  if (p0 >= p1) ConsumerSync();  // (no chunk) q and o written
  AttentionTail<T, kForm>(a, sm, head, split, m, l);
}

}  // namespace decode_mega
}  // namespace phishard
