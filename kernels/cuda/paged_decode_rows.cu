// Decode attention reading whole cache rows (PagedDecodeVariant::kRows): one block per (chunk of
// KV heads, sequence, split) where the chunk is every KV head of the row when it fits
// (rows_kv_heads x head_dim <= kRowsMaxElems and x group <= kRowsMaxHeads query heads; Phi-2: all
// 32 heads, one chunk). The cache layout is [block, slot, kv head, head_dim], so a key's row of
// the chunk is one contiguous run (Phi-2: 32 x 160 B = 5,120 B) and a block's copies walk the
// cache in address order, where the pipelined kernel's blocks each read one head: 16 pieces of
// 160 B, 5,120 B apart (perf-log 13:03 UTC: that layout costs 5-9 % of the time and +0.02-0.035
// J/GB of DRAM row activations against contiguous reads). Same math, split rule and split /
// merge contract as the other kernels (kernels/cuda/paged_decode_cuda.h); only the work split
// differs.
//
// Block: 16 warps (512 threads), one block an SM (160 KB of ring). Keys go through shared memory
// in 4-key tiles (K rows then V rows of the chunk, 40 KB a stage at most) copied by cp.async into
// a 4-stage ring: thread e copies 16-byte chunks e, e + 512, ... of the tile, so consecutive
// threads read consecutive addresses of a row. Warp w owns query heads w and w + 16 of the chunk
// for the whole split (no merge across warps): its 4 groups of 8 lanes take one key of the tile
// each (a lane: 16-byte slices cl and cl + 8 of the head), keeping a running max / sum / output
// per (group, head), merged across the groups at the end.
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/attention_dispatch.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_decode_common.cuh"

namespace phishard {
namespace paged_decode {
namespace {

constexpr int kRowsWarps = 16;
constexpr int kRowsThreads = kRowsWarps * 32;
constexpr int kRowsTile = 32 / kLanesPerKey;  // 4 keys a tile: one for each group of a warp
constexpr int kRowsStages = 4;
constexpr int kHeadsPerWarp = kRowsMaxHeads / kRowsWarps;  // 2
// Ring stage: K tile [kRowsTile][row elems] then V tile, each at most kRowsMaxElems a row.
constexpr uint32_t kRowsHalfBytes = kRowsTile * kRowsMaxElems * 2;
constexpr uint32_t kRowsStageBytes = 2 * kRowsHalfBytes;
constexpr size_t kRowsSmemBytes = size_t{kRowsStages} * kRowsStageBytes;  // 160 KB
constexpr int kRowsChunksPerThread =
    (kRowsTile * kRowsMaxElems / 8 + kRowsThreads - 1) / kRowsThreads;  // 3

__device__ __forceinline__ void RowsCpAsync16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}

template <typename T, int HD, bool kBlock16>
__global__ void __launch_bounds__(kRowsThreads, 1) PagedDecodeRowsKernel(const Args a) {
  using H = Head<HD>;
  constexpr int C = H::kChunks;
  extern __shared__ __align__(16) unsigned char smem[];
  const int kvh0 = blockIdx.x * a.rows_kv_heads;
  const int s = blockIdx.y;
  const int sp = blockIdx.z;
  const int nkv = a.kv_row / HD;
  const int kvc = min(a.rows_kv_heads, nkv - kvh0);  // KV heads of this block
  const int nq = kvc * a.group;                      // query heads of this block
  const int h0 = kvh0 * a.group;
  SeqSplit r;
  if (!SeqSplitOf(a, s, sp, &r)) {
    if (r.ctx <= 0 && sp == 0) {  // padding row
      T* out = static_cast<T*>(a.out) + (static_cast<size_t>(s) * a.num_heads + h0) * HD;
      for (int d = threadIdx.x; d < nq * HD; d += kRowsThreads) out[d] = cuda::FromFloat<T>(0.f);
    }
    return;
  }
  const int n_tiles = (r.k_end - r.k_begin + kRowsTile - 1) / kRowsTile;
  const int row_chunks = kvc * C;  // 16-byte chunks of one key's row of the chunk
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  // This thread's copy chunks: the same (row in tile, offset in row) every tile; only the key's
  // block and slot change.
  int c_row[kRowsChunksPerThread];  // key of the tile, or kRowsTile when past the tile
  int c_col[kRowsChunksPerThread];  // elements from the slot's start to the chunk
#pragma unroll
  for (int i = 0; i < kRowsChunksPerThread; ++i) {
    const int e = static_cast<int>(threadIdx.x) + kRowsThreads * i;
    const int row = e / row_chunks;
    c_row[i] = row < kRowsTile ? row : kRowsTile;
    c_col[i] = kvh0 * HD + 8 * (e - row * row_chunks);
  }
  auto load_tile = [&](int t, int st) {
    const int key0 = r.k_begin + t * kRowsTile;
    const uint32_t dst_k = smem_base + static_cast<uint32_t>(st) * kRowsStageBytes;
#pragma unroll
    for (int i = 0; i < kRowsChunksPerThread; ++i) {
      if (c_row[i] >= kRowsTile) continue;
      const int key = key0 + c_row[i];
      size_t off = 0;
      int bytes = 0;
      if (key < r.k_end) {
        const int blk = kBlock16 ? r.table[key >> 4] : r.table[key / a.block_size];
        const int slot = kBlock16 ? (key & 15) : key % a.block_size;
        if (blk >= 0 && blk < a.num_blocks) {
          off = (static_cast<size_t>(blk) * a.block_size + slot) * a.kv_row + c_col[i];
          bytes = 16;
        }
      }
      const uint32_t dst = (threadIdx.x + kRowsThreads * i) * 16;
      RowsCpAsync16(dst_k + dst, kc + off, bytes);
      RowsCpAsync16(dst_k + kRowsHalfBytes + dst, vc + off, bytes);
    }
  };
#pragma unroll
  for (int t = 0; t < kRowsStages - 1; ++t) {
    if (t < n_tiles) load_tile(t, t);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int grp = lane / kLanesPerKey;  // the tile's key this group takes
  const int cl = lane % kLanesPerKey;
  float q[kHeadsPerWarp][H::kPerLane][8];
  float acc[kHeadsPerWarp][H::kPerLane][8];
  float m[kHeadsPerWarp], l[kHeadsPerWarp];
  int kv_col[kHeadsPerWarp];  // chunk of this head's KV head in a tile row
#pragma unroll
  for (int hh = 0; hh < kHeadsPerWarp; ++hh) {
    const int hl = warp + kRowsWarps * hh;
    const bool active = hl < nq;
    kv_col[hh] = (active ? hl / a.group : 0) * C;
    m[hh] = -INFINITY;
    l[hh] = 0.0f;
    const T* q_row =
        static_cast<const T*>(a.q) + static_cast<size_t>(s) * a.q_stride + (h0 + hl) * HD;
#pragma unroll
    for (int i = 0; i < H::kPerLane; ++i) {
      const int j = cl + kLanesPerKey * i;
      if (active && j < C) {
        Unpack8<T>(*reinterpret_cast<const uint4*>(q_row + 8 * j), q[hh][i]);
#pragma unroll
        for (int e = 0; e < 8; ++e) q[hh][i][e] *= a.scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) q[hh][i][e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[hh][i][e] = 0.0f;
    }
  }

  for (int t = 0; t < n_tiles; ++t) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kRowsStages - 2) : "memory");
    __syncthreads();  // tile t landed for every thread; stage (t - 1) % kRowsStages is free
    if (t + kRowsStages - 1 < n_tiles) {
      load_tile(t + kRowsStages - 1, (t + kRowsStages - 1) % kRowsStages);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    const uint4* sk = reinterpret_cast<const uint4*>(smem + static_cast<size_t>(t % kRowsStages) *
                                                                kRowsStageBytes);
    const uint4* sv = sk + kRowsHalfBytes / 16;
    const bool valid = r.k_begin + t * kRowsTile + grp < r.k_end;
#pragma unroll
    for (int hh = 0; hh < kHeadsPerWarp; ++hh) {
      if (warp + kRowsWarps * hh >= nq) break;  // warp-uniform
      const int base = grp * row_chunks + kv_col[hh];
      float d = 0.0f;
#pragma unroll
      for (int i = 0; i < H::kPerLane; ++i) {
        const int j = cl + kLanesPerKey * i;
        float kf[8];
        Unpack8<T>(j < C ? sk[base + j] : make_uint4(0, 0, 0, 0), kf);
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(q[hh][i][e], kf[e], d);
      }
      d += __shfl_xor_sync(0xffffffffu, d, 1);
      d += __shfl_xor_sync(0xffffffffu, d, 2);
      d += __shfl_xor_sync(0xffffffffu, d, 4);
      const float sc = valid ? d : -INFINITY;
      const float m_new = fmaxf(m[hh], sc);
      // A group with no key yet (m_new = -inf) keeps an empty state: alpha = p = 0.
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = m[hh] == -INFINITY ? 0.0f : exp2f(m[hh] - m_use);
      const float p = exp2f(sc - m_use);
      l[hh] = l[hh] * alpha + p;
#pragma unroll
      for (int i = 0; i < H::kPerLane; ++i) {
        const int j = cl + kLanesPerKey * i;
        float vf[8];
        Unpack8<T>(j < C ? sv[base + j] : make_uint4(0, 0, 0, 0), vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[hh][i][e] = fmaf(p, vf[e], acc[hh][i][e] * alpha);
      }
      m[hh] = m_new;
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  // A programmatic dependent may start its prologue once every block is past its loads.
  asm volatile("griddepcontrol.launch_dependents;" :::);

  // Per head: merge the warp's 4 groups (lanes cl, cl + 8, cl + 16, cl + 24 hold the same
  // slices), then lanes 0-7 write the head's output or this split's partial.
#pragma unroll
  for (int hh = 0; hh < kHeadsPerWarp; ++hh) {
    const int hl = warp + kRowsWarps * hh;
    if (hl >= nq) break;
#pragma unroll
    for (int off = kLanesPerKey; off < 32; off *= 2) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[hh], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[hh], off);
      const float m_new = fmaxf(m[hh], m_o);
      float fa, fb;
      Rescale(m[hh], m_new, &fa);
      Rescale(m_o, m_new, &fb);
      l[hh] = l[hh] * fa + l_o * fb;
#pragma unroll
      for (int i = 0; i < H::kPerLane; ++i) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float o = __shfl_xor_sync(0xffffffffu, acc[hh][i][e], off);
          acc[hh][i][e] = acc[hh][i][e] * fa + o * fb;
        }
      }
      m[hh] = m_new;
    }
    if (lane >= kLanesPerKey) continue;
    const int h = h0 + hl;
    const size_t idx = (static_cast<size_t>(s) * a.num_heads + h) * a.max_splits + sp;
    T* out_row = static_cast<T*>(a.out) + (static_cast<size_t>(s) * a.num_heads + h) * HD;
#pragma unroll
    for (int i = 0; i < H::kPerLane; ++i) {
      const int j = cl + kLanesPerKey * i;
      if (j >= C) continue;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float o = acc[hh][i][e] / l[hh];
        if (r.splits == 1) {
          out_row[8 * j + e] = cuda::FromFloat<T>(o);
        } else {
          a.partial_o[idx * HD + 8 * j + e] = o;
        }
      }
    }
    if (r.splits > 1 && lane == 0) {
      a.partial_ml[idx * 2] = m[hh];
      a.partial_ml[idx * 2 + 1] = l[hh];
    }
  }
}

}  // namespace

KernelStatus LaunchPagedDecodeRows(const Args& a, int head_dim, DataType dtype,
                                   cudaStream_t stream) {
  if (a.rows_kv_heads <= 0 || a.rows_kv_heads * head_dim > kRowsMaxElems ||
      a.rows_kv_heads * a.group > kRowsMaxHeads) {
    return KernelStatus::kInvalidShape;
  }
  return cuda::DispatchAttentionHeadDim(head_dim, [&](auto hd_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    return cuda::DispatchHalfTypes(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      auto kernel = a.block_size == 16 ? PagedDecodeRowsKernel<T, HD, true>
                                       : PagedDecodeRowsKernel<T, HD, false>;
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(kRowsSmemBytes)) != cudaSuccess) {
        return KernelStatus::kDeviceError;
      }
      kernel<<<dim3(a.blocks_per_seq, a.num_seqs, a.max_splits), kRowsThreads, kRowsSmemBytes,
               stream>>>(a);
      return cuda::LaunchStatus();
    });
  });
}

}  // namespace paged_decode
}  // namespace phishard
