#include <algorithm>
#include <cstdint>

#include "bench/sustain_kernels.h"

namespace phishard::bench {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // 16-byte words in flight a thread (64 B; 8 blocks an SM: 128 KB)

__device__ __forceinline__ uint4 LoadNoL1(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// Grid-stride over n 16-byte words, kUnroll words a thread an iteration; kMode 0: dst = src
// (copy), 1: xor of every word (read only), 2: every word as 8 bf16 times a constant into 8 float
// accumulators (read + the decode attention's unpack and FMA per element). Modes 1-2 store one
// word a thread only when the fold hits a value random data never gives, so the loads stay live.
template <int kMode>
__global__ void __launch_bounds__(kThreads)
    SmStreamKernel(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n,
                   uint32_t* sink) {
  const size_t stride = static_cast<size_t>(gridDim.x) * kThreads;
  uint32_t x = 0;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (size_t base = static_cast<size_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < n;
       base += stride * kUnroll) {
    uint4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const size_t i = base + static_cast<size_t>(u) * kThreads;
      w[u] = i < n ? LoadNoL1(src + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const size_t i = base + static_cast<size_t>(u) * kThreads;
      if constexpr (kMode == 0) {
        if (i < n) dst[i] = w[u];
      } else if constexpr (kMode == 1) {
        x ^= w[u].x ^ w[u].y ^ w[u].z ^ w[u].w;
      } else {
        const uint32_t ws[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[2 * e] = fmaf(0.75f, __uint_as_float(ws[e] << 16), acc[2 * e]);
          acc[2 * e + 1] = fmaf(0.75f, __uint_as_float(ws[e] & 0xffff0000u), acc[2 * e + 1]);
        }
      }
    }
  }
  if constexpr (kMode == 1) {
    if (x == 0x9e3779b9u) sink[threadIdx.x] = x;
  } else if constexpr (kMode == 2) {
    float s = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) s += acc[e];
    if (s == 1234.5f) sink[threadIdx.x] = 1;
  }
}

template <int kMode>
void Launch(const void* src, void* dst, size_t bytes, uint32_t* sink, int sms, cudaStream_t s) {
  const size_t n = bytes / 16;
  const size_t per_block = static_cast<size_t>(kThreads) * kUnroll;
  const int blocks = static_cast<int>(
      std::min<size_t>(static_cast<size_t>(std::max(sms, 1)) * 8, (n + per_block - 1) / per_block));
  SmStreamKernel<kMode><<<std::max(blocks, 1), kThreads, 0, s>>>(static_cast<const uint4*>(src),
                                                                 static_cast<uint4*>(dst), n, sink);
}

// ------------------------------------------------------------------------------------------------
// The decode attention's ingredients (SmAttnMix, see the header). One block of 128 threads a
// (head x, sequence y); tiles of kMixTile keys (two 16-slot blocks of the table); warp w takes keys
// 8 w .. 8 w + 7 of a tile, its group g (8 lanes) keys 8 w + g and 8 w + g + 4; lane cl holds the
// 16-byte slices cl and cl + 8 (< C) of a key's K and V rows (C = HD / 8 slices a row).
constexpr int kMixThreads = 128;
constexpr int kMixTile = 32;
constexpr int kMixStages = 4;

struct MixArgs {
  const char* k;
  const char* v;
  const uint16_t* q;
  const int32_t* table;
  int q_stride, ctx, heads, max_blocks;
  uint32_t* sink;
};

template <int HD>
struct MixRegs {
  static constexpr int C = HD / 8, P = (C + 7) / 8;
  uint4 k[2][P], v[2][P];
  bool valid[2];
};

__device__ __forceinline__ void Bf16x8(const uint4& w, float f[8]) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    f[2 * e] = __uint_as_float(ws[e] << 16);
    f[2 * e + 1] = __uint_as_float(ws[e] & 0xffff0000u);
  }
}

template <int HD, int kLevel, bool kSmem>
__global__ void __launch_bounds__(kMixThreads, 4) AttnMixKernel(const MixArgs a) {
  constexpr int C = HD / 8, P = (C + 7) / 8;
  extern __shared__ __align__(16) unsigned char mix_smem[];
  const int h = blockIdx.x, s = blockIdx.y;
  const int n_tiles = (a.ctx + kMixTile - 1) / kMixTile;
  const int32_t* table = a.table + static_cast<size_t>(s) * a.max_blocks;
  // The cache layout [block, head, 16 keys, HD] (kernels/kv_layout.h): a block holds every head's
  // run of 16 rows; this head's run starts head_bytes into it, its rows HD * 2 bytes apart.
  constexpr size_t kRowBytes = HD * 2;
  const size_t block_bytes = static_cast<size_t>(a.heads) * 16 * kRowBytes;
  const size_t head_bytes = static_cast<size_t>(h) * 16 * kRowBytes;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int grp = lane >> 3, cl = lane & 7;
  const int kb = warp * 8 + grp;  // this group's keys in a tile: kb, kb + 4

  float q[P][8], acc[P][8];
  const uint16_t* q_row = a.q + static_cast<size_t>(s) * a.q_stride + h * HD;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int j = cl + 8 * i;
    if (j < C) {
      Bf16x8(*reinterpret_cast<const uint4*>(q_row + 8 * j), q[i]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[i][e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;

  // The tile's K / V slices of this lane, straight from global memory (kSmem = false).
  auto load_direct = [&](MixRegs<HD>& r, int t) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int key = t * kMixTile + kb + 4 * u;
      r.valid[u] = key < a.ctx;
      const size_t off = r.valid[u] ? static_cast<size_t>(table[key >> 4]) * block_bytes +
                                          head_bytes + (key & 15) * kRowBytes
                                    : 0;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int j = cl + 8 * i;
        const bool ld = r.valid[u] && j < C;
        r.k[u][i] =
            ld ? LoadNoL1(reinterpret_cast<const uint4*>(a.k + off) + j) : make_uint4(0, 0, 0, 0);
        r.v[u][i] =
            ld ? LoadNoL1(reinterpret_cast<const uint4*>(a.v + off) + j) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  // kSmem: the copy roles of the pipelined kernel (thread e copies slices e, e + 128, ... of the
  // tile's K and V rows) into stage st = [K tile: kMixTile x C x 16 B][V tile: same].
  constexpr size_t kStageBytes = size_t{2} * kMixTile * C * 16;
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(mix_smem));
  auto load_tile = [&](int t, int st) {
    const uint32_t dst_k = smem_base + static_cast<uint32_t>(st * kStageBytes);
    const uint32_t dst_v = dst_k + kMixTile * C * 16;
#pragma unroll
    for (int e = threadIdx.x; e < kMixTile * C; e += kMixThreads) {
      const int r = e / C, j = e - r * C;
      const int key = t * kMixTile + r;
      size_t off = 0;
      int bytes = 0;
      if (key < a.ctx) {
        off = static_cast<size_t>(table[key >> 4]) * block_bytes + head_bytes +
              (key & 15) * kRowBytes + 16 * j;
        bytes = 16;
      }
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_k + e * 16),
                   "l"(a.k + off), "r"(bytes)
                   : "memory");
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_v + e * 16),
                   "l"(a.v + off), "r"(bytes)
                   : "memory");
    }
  };
  auto load_smem = [&](MixRegs<HD>& r, int t, int st) {
    const uint4* sk =
        reinterpret_cast<const uint4*>(mix_smem + static_cast<size_t>(st) * kStageBytes);
    const uint4* sv = sk + kMixTile * C;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int row = kb + 4 * u;
      r.valid[u] = t * kMixTile + row < a.ctx;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int j = cl + 8 * i;
        r.k[u][i] = j < C ? sk[row * C + j] : make_uint4(0, 0, 0, 0);
        r.v[u][i] = j < C ? sv[row * C + j] : make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto compute = [&](const MixRegs<HD>& r) {
    if constexpr (kLevel == 1) {  // convert + FMA with a constant, K and V alike
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int i = 0; i < P; ++i) {
          float kf[8], vf[8];
          Bf16x8(r.k[u][i], kf);
          Bf16x8(r.v[u][i], vf);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(0.75f, vf[e], fmaf(0.75f, kf[e], acc[i][e]));
        }
      }
      return;
    }
    float sc[2];
    float m_new = m;
#pragma unroll
    for (int u = 0; u < 2; ++u) {  // q . k over the head: 8 lanes' slices, then 3 shuffles
      float d = 0.0f;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        float kf[8];
        Bf16x8(r.k[u][i], kf);
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(q[i][e], kf[e], d);
      }
      d += __shfl_xor_sync(0xffffffffu, d, 1);
      d += __shfl_xor_sync(0xffffffffu, d, 2);
      d += __shfl_xor_sync(0xffffffffu, d, 4);
      sc[u] = r.valid[u] ? d : -INFINITY;
      m_new = fmaxf(m_new, sc[u]);
    }
    if constexpr (kLevel == 2) {  // the scores kept live by a sum; V as level 1
      l += (r.valid[0] ? sc[0] : 0.0f) + (r.valid[1] ? sc[1] : 0.0f);
#pragma unroll
      for (int i = 0; i < P; ++i) {
        float v0[8], v1[8];
        Bf16x8(r.v[0][i], v0);
        Bf16x8(r.v[1][i], v1);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(0.75f, v1[e], fmaf(0.75f, v0[e], acc[i][e]));
      }
    } else {  // online softmax and P V, as the pipelined kernel
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = m == -INFINITY ? 0.0f : exp2f(m - m_use);
      const float p0 = exp2f(sc[0] - m_use), p1 = exp2f(sc[1] - m_use);
      l = l * alpha + (p0 + p1);
#pragma unroll
      for (int i = 0; i < P; ++i) {
        float v0[8], v1[8];
        Bf16x8(r.v[0][i], v0);
        Bf16x8(r.v[1][i], v1);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(p1, v1[e], fmaf(p0, v0[e], acc[i][e] * alpha));
      }
      m = m_new;
    }
  };

  if constexpr (kSmem) {
#pragma unroll
    for (int t = 0; t < kMixStages - 1; ++t) {
      if (t < n_tiles) load_tile(t, t);
      asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    for (int t = 0; t < n_tiles; ++t) {
      asm volatile("cp.async.wait_group %0;\n" ::"n"(kMixStages - 2) : "memory");
      __syncthreads();  // tile t landed for every thread; stage (t - 1) % kMixStages is free
      if (t + kMixStages - 1 < n_tiles)
        load_tile(t + kMixStages - 1, (t + kMixStages - 1) % kMixStages);
      asm volatile("cp.async.commit_group;\n" ::: "memory");
      MixRegs<HD> r;
      load_smem(r, t, t % kMixStages);
      compute(r);
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  } else {
    MixRegs<HD> ra, rb;
    load_direct(ra, 0);
    for (int t = 0; t < n_tiles; t += 2) {
      if (t + 1 < n_tiles) load_direct(rb, t + 1);
      compute(ra);
      if (t + 1 >= n_tiles) break;
      if (t + 2 < n_tiles) load_direct(ra, t + 2);
      compute(rb);
    }
  }
  float tot = l + m;
#pragma unroll
  for (int i = 0; i < P; ++i) {
#pragma unroll
    for (int e = 0; e < 8; ++e) tot += acc[i][e];
  }
  if (tot == 1234.5f) a.sink[threadIdx.x] = 1;
}

template <int kLevel, bool kSmem>
void LaunchMix(const AttnMixParams& p, cudaStream_t s) {
  constexpr int HD = 80, C = HD / 8;
  const size_t smem = kSmem ? size_t{kMixStages} * 2 * kMixTile * C * 16 : 0;  // 40 KiB
  const MixArgs a{.k = static_cast<const char*>(p.k_cache),
                  .v = static_cast<const char*>(p.v_cache),
                  .q = static_cast<const uint16_t*>(p.q),
                  .table = p.block_tables,
                  .q_stride = p.q_stride,
                  .ctx = p.ctx,
                  .heads = p.heads,
                  .max_blocks = p.max_blocks,
                  .sink = p.sink};
  AttnMixKernel<HD, kLevel, kSmem><<<dim3(p.heads, p.seqs), kMixThreads, smem, s>>>(a);
}

}  // namespace

void SmCopy(const void* src, void* dst, size_t bytes, int sms, cudaStream_t s) {
  Launch<0>(src, dst, bytes, nullptr, sms, s);
}

void SmRead(const void* src, size_t bytes, uint32_t* sink, int sms, cudaStream_t s) {
  Launch<1>(src, nullptr, bytes, sink, sms, s);
}

void SmReadFma(const void* src, size_t bytes, uint32_t* sink, int sms, cudaStream_t s) {
  Launch<2>(src, nullptr, bytes, sink, sms, s);
}

bool SmAttnMix(const AttnMixParams& p, int level, bool smem, cudaStream_t s) {
  if (p.head_dim != 80 || p.seqs <= 0 || p.heads <= 0 || p.ctx <= 0) return false;
  if (level < 1 || level > 3) return false;
  using Launcher = void (*)(const AttnMixParams&, cudaStream_t);
  static constexpr Launcher kLaunch[3][2] = {{LaunchMix<1, false>, LaunchMix<1, true>},
                                             {LaunchMix<2, false>, LaunchMix<2, true>},
                                             {LaunchMix<3, false>, LaunchMix<3, true>}};
  kLaunch[level - 1][smem ? 1 : 0](p, s);
  return true;
}

}  // namespace phishard::bench
