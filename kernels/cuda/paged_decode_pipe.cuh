// What the pipelined decode attention kernel (PagedDecodePipeKernel, kernels/cuda/paged_decode.cu)
// and the bulk-copy kernel (kernels/cuda/paged_decode_bulk.cu, PagedDecodeVariant::kBulk) share:
// the stage layout (a tile's K rows, then its V rows, row = key, head_dim contiguous), the
// softmax state, and PipeConsumer, the pipelined kernel's compute code as a reusable consumer (the
// bulk kernel's). They differ only in how a stage is filled and released. Included by those two
// files only.
// PagedDecodePipeKernel still has its own inline copy of PipeConsumer's code: moved onto it, the
// kernel's SASS changed (same instructions at head_dim 80 with blocks of 16, other register
// allocation and scheduling; +-8 instructions at other shapes; cuobjdump, 2026-11-29), and kAuto's
// kernel is to stay as measured. Change the two together until the pipelined kernel is moved onto
// PipeConsumer with a measurement.
//
// Compute roles (blocks of kThreads): with n <= 4 query heads in the block, warp w serves head
// w / (4 / n) over the w % (4 / n)-th slice of each tile's keys (n = 3: warp 3 only copies).
// Inside a warp, 4 groups of 8 lanes take 2 keys each per round (a lane: 16-byte slices cl and
// cl + 8 of the head), each group keeping its own running max / sum / output. Groups, then warps,
// are merged at the end (Finish). One head a warp keeps the state in registers (no spills).
#pragma once

#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_decode_common.cuh"

namespace phishard::paged_decode {

constexpr int kMaxHeadsPerBlock = kWarps;

template <int HD, int kTile, int kStages>
struct PipeSmem {
  static constexpr int kChunks = HD / 8;
  static constexpr size_t kStageBytes = size_t{2} * kTile * kChunks * 16;  // K tile, then V tile
  static constexpr size_t kBytes = kStages * kStageBytes;
};

// Online-softmax state of one (group, query head): log2-domain max and sum, unnormalised output
// over this lane's slices.
template <int kPerLane>
struct SoftmaxState {
  float m = -INFINITY, l = 0.0f;
  float acc[kPerLane][8];
};

// One thread's compute role and state (registers) over a block's tiles.
template <typename T, int HD, int kTile>
struct PipeConsumer {
  using H = Head<HD>;
  static constexpr int C = H::kChunks;
  static constexpr int kKeysPerRound = 2 * (32 / kLanesPerKey);  // 8: 2 keys for each of 4 groups

  int warp, lane, grp, cl;
  int kw;       // warps sharing one head's keys: 4, 2, 1, 1
  int slice;    // this warp's slice of a tile's keys
  int my_head;  // in [0, nhb) or idle
  bool active;
  int keys_per_warp, rounds;
  float q[H::kPerLane][8];  // this lane's slices of its query head, pre-scaled to log2 units
  SoftmaxState<H::kPerLane> S;

  // Roles (all warp-uniform) and the query head from a.q (device).
  __device__ __forceinline__ void Init(const Args& a, const BlockWork<T>& bw) {
    warp = threadIdx.x >> 5;
    lane = threadIdx.x & 31;
    grp = lane / kLanesPerKey;
    cl = lane % kLanesPerKey;
    kw = kWarps / bw.nhb;
    slice = warp % kw;
    my_head = warp / kw;
    active = my_head < bw.nhb;
    keys_per_warp = kTile / kw;
    rounds = keys_per_warp / kKeysPerRound;
    const int h = bw.h0 + (active ? my_head : 0);
    const T* q_row = static_cast<const T*>(a.q) + static_cast<size_t>(bw.s) * a.q_stride + h * HD;
#pragma unroll
    for (int i = 0; i < H::kPerLane; ++i) {
      const int j = cl + kLanesPerKey * i;
      if (active && j < C) {
        Unpack8<T>(*reinterpret_cast<const uint4*>(q_row + 8 * j), q[i]);
#pragma unroll
        for (int e = 0; e < 8; ++e) q[i][e] *= a.scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) q[i][e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) S.acc[i][e] = 0.0f;
    }
  }

  // One tile of an active warp: sk = the stage's K rows [kTile, C] uint4 (shared), its V rows
  // right after; tile_key0 the tile's first key; keys >= k_end are masked by index.
  // kZeroInvalidV: a masked key's V row is taken as zeros (its stage row may hold anything: the
  // bulk kernel copies whole runs, past the context too, where unused slots may be NaN and
  // 0 x NaN would poison the output); the pipelined kernel's copies zero those rows already.
  template <bool kZeroInvalidV>
  __device__ __forceinline__ void Tile(const uint4* sk, int tile_key0, int k_end) {
    const uint4* sv = sk + kTile * C;
    for (int r = 0; r < rounds; ++r) {
      const int kb = slice * keys_per_warp + r * kKeysPerRound + grp;  // keys kb and kb + 4
      uint4 kk[2][H::kPerLane], vv[2][H::kPerLane];
      bool valid[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int row = kb + 4 * u;
        valid[u] = tile_key0 + row < k_end;
#pragma unroll
        for (int i = 0; i < H::kPerLane; ++i) {
          const int j = cl + kLanesPerKey * i;
          kk[u][i] = j < C ? sk[row * C + j] : make_uint4(0, 0, 0, 0);
          if constexpr (kZeroInvalidV) {
            vv[u][i] = j < C && valid[u] ? sv[row * C + j] : make_uint4(0, 0, 0, 0);
          } else {
            vv[u][i] = j < C ? sv[row * C + j] : make_uint4(0, 0, 0, 0);
          }
        }
      }
      {
        float sc[2];
        float m_new = S.m;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          float d = 0.0f;
#pragma unroll
          for (int i = 0; i < H::kPerLane; ++i) {
            float kf[8];
            Unpack8<T>(kk[u][i], kf);
#pragma unroll
            for (int e = 0; e < 8; ++e) d = fmaf(q[i][e], kf[e], d);
          }
          d += __shfl_xor_sync(0xffffffffu, d, 1);
          d += __shfl_xor_sync(0xffffffffu, d, 2);
          d += __shfl_xor_sync(0xffffffffu, d, 4);
          sc[u] = valid[u] ? d : -INFINITY;
          m_new = fmaxf(m_new, sc[u]);
        }
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = S.m == -INFINITY ? 0.0f : exp2f(S.m - m_use);
        const float p0 = exp2f(sc[0] - m_use), p1 = exp2f(sc[1] - m_use);
        S.l = S.l * alpha + (p0 + p1);
#pragma unroll
        for (int i = 0; i < H::kPerLane; ++i) {
          float v0[8], v1[8];
          Unpack8<T>(vv[0][i], v0);
          Unpack8<T>(vv[1][i], v1);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            S.acc[i][e] = fmaf(p1, v1[e], fmaf(p0, v0[e], S.acc[i][e] * alpha));
          }
        }
        S.m = m_new;
      }
    }
  }

  // Groups of a warp, then the warps sharing a head, into the block's output rows (one split) or
  // its partials. s_m / s_l [kWarps], s_acc [kWarps][HD]: shared scratch. Every thread calls it.
  __device__ __forceinline__ void Finish(const Args& a, const BlockWork<T>& bw, float* s_m,
                                         float* s_l, float (*s_acc)[HD]) {
    if (active) {
#pragma unroll
      for (int off = kLanesPerKey; off < 32; off *= 2) {
        const float m_o = __shfl_xor_sync(0xffffffffu, S.m, off);
        const float l_o = __shfl_xor_sync(0xffffffffu, S.l, off);
        const float m_new = fmaxf(S.m, m_o);
        float fa, fb;
        Rescale(S.m, m_new, &fa);
        Rescale(m_o, m_new, &fb);
        S.l = S.l * fa + l_o * fb;
#pragma unroll
        for (int i = 0; i < H::kPerLane; ++i) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float o = __shfl_xor_sync(0xffffffffu, S.acc[i][e], off);
            S.acc[i][e] = S.acc[i][e] * fa + o * fb;
          }
        }
        S.m = m_new;
      }
      if (lane < kLanesPerKey) {
        if (lane == 0) {
          s_m[warp] = S.m;
          s_l[warp] = S.l;
        }
#pragma unroll
        for (int i = 0; i < H::kPerLane; ++i) {
          const int j = cl + kLanesPerKey * i;
          if (j < C) {
#pragma unroll
            for (int e = 0; e < 8; ++e) s_acc[warp][8 * j + e] = S.acc[i][e];
          }
        }
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < bw.nhb * HD; e += kThreads) {
      const int g = e / HD;
      const int d = e - g * HD;
      // Owners of head g: warps g kw .. g kw + kw - 1.
      float mm = -INFINITY;
      for (int w = g * kw; w < (g + 1) * kw; ++w) mm = fmaxf(mm, s_m[w]);
      float ll = 0.0f, o = 0.0f;
      for (int w = g * kw; w < (g + 1) * kw; ++w) {
        float f;
        Rescale(s_m[w], mm, &f);
        ll = fmaf(s_l[w], f, ll);
        o = fmaf(s_acc[w][d], f, o);
      }
      const int h = bw.h0 + g;
      if (bw.splits == 1) {
        bw.out[e] = cuda::FromFloat<T>(o / ll);
      } else {
        const size_t idx = (static_cast<size_t>(bw.s) * a.num_heads + h) * a.max_splits + bw.sp;
        a.partial_o[idx * HD + d] = o / ll;
        if (d == 0) {
          a.partial_ml[idx * 2] = mm;
          a.partial_ml[idx * 2 + 1] = ll;
        }
      }
    }
  }
};

// kernels/cuda/paged_decode_bulk.cu (PagedDecodeVariant::kBulk, blocks of 16 slots): launches the
// bulk-copy kernel on the pipelined kernel's grid (a.blocks_per_seq, a.num_seqs, a.max_splits).
// The split merge (several splits) is the caller's.
KernelStatus LaunchPagedDecodeBulk(const Args& a, int head_dim, DataType dtype,
                                   cudaStream_t stream);

}  // namespace phishard::paged_decode
