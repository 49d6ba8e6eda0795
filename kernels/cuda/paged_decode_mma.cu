// Decode attention on the tensor cores (PagedDecodeVariant::kTensorCore): the pipelined kernel's
// grid, split rule and cp.async ring, with QKᵀ and PV as mma.sync m16n8k16 (16-bit in, float32
// accumulation) instead of a float conversion and an FMA per element. Same math and outputs as
// the other two kernels up to float rounding (kernels/cuda/paged_decode_cuda.h).
//
// One block of 4 warps per (KV head x chunk of up to 8 of its query heads, sequence, split): the
// 8 query heads are the mma's N, so a GQA group of up to 8 reads its K/V once (MHA: 1 of the 8
// columns is used; the tensor cores have the throughput to spare, the point is fewer
// instructions per byte). Keys go through shared memory in 64-key tiles, a 3-stage
// cp.async ring (copy roles as in the pipelined kernel), each key row padded to an odd number of
// 16-byte chunks (kPitch = (HD / 8) | 1) so the 8 row addresses of an ldmatrix phase hit 8
// different bank groups. Warp w computes the 16-key chunks w, w + 4, ... of each tile:
//   Sᵀ[16 keys x 8 heads] = K[16 keys x HD] · q[HD x 8 heads]   (A = K by ldmatrix, B = q held in
//                                                               registers for the whole kernel)
//   lane l then holds the scores of keys l / 4 and l / 4 + 8 for heads 2 (l % 4), +1: the online
//   softmax runs on those registers (the max over a head's 16 keys: 3 shuffles), the warp's
//   running max per head is the same in the 8 lanes of a head column, its running sum is kept
//   per lane and summed once at the end;
//   Oᵀ[HD x 8 heads] += Vᵀ[HD x 16 keys] · Pᵀ[16 keys x 8 heads]   (A = Vᵀ by ldmatrix.trans,
//                                                               B = P by movmatrix.trans of the
//                                                               packed score registers)
// P is split into a 16-bit high part and the 16-bit rounding of the rest (two mmas), so the
// weights carry ~16 bits instead of 8 (bf16) or 11 (f16); the sum uses the float32 weights.
// Warps are merged at the end through the (then idle) ring, as in the pipelined kernel.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/cuda/attention_dispatch.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/paged_decode_common.cuh"
#include "kernels/kv_layout.h"

namespace phishard {
namespace paged_decode {
namespace {

// 64-key tiles x 3 stages: 3 blocks an SM (67.6 KB of ring each at head_dim 80). Measured slower
// at b256 (perf-log dmma run 2, sustained µs a launch): 64 x 4 stages (2 blocks an SM) 792,
// 32 x 4 (two warps compute a tile) 738, 64 x 3 with the copies' L2 prefetch at 256 B 733,
// against 727-731 for this one.
constexpr int kMmaTile = 64;
constexpr int kMmaStages = 3;

template <int HD, int kTile, int kStages>
struct MmaSmem {
  static constexpr int kChunks = HD / 8;      // 16-byte slices of a K or V row
  static constexpr int kPitch = kChunks | 1;  // slices a row takes in shared memory (odd)
  static constexpr uint32_t kRowBytes = kPitch * 16;
  static constexpr uint32_t kTileBytes = kTile * kRowBytes;  // the K (or V) half of a stage
  static constexpr uint32_t kStageBytes = 2 * kTileBytes;
  static constexpr uint32_t kBytes = kStages * kStageBytes;
  // The merge scratch [kWarps][kMmaHeadsPerBlock][HD] float32 reuses the ring.
  static_assert(kWarps * kMmaHeadsPerBlock * HD * 4 <= kBytes, "merge scratch fits the ring");
};

// The transpose of an 8x8 16-bit matrix held one word a lane in the fragment layout.
__device__ __forceinline__ uint32_t MovMatrixTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
// (lo, hi) -> one word of two 16-bit elements (lo in the low half), and the rounding left over
// as a second such word: x = hi part + lo part to ~16 bits.
template <typename T>
__device__ __forceinline__ void SplitPack(float x0, float x1, uint32_t* hi, uint32_t* lo) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    const float2 back = __bfloat1622float2(h);
    const __nv_bfloat162 r = __floats2bfloat162_rn(x0 - back.x, x1 - back.y);
    memcpy(hi, &h, 4);
    memcpy(lo, &r, 4);
  } else {
    const __half2 h = __floats2half2_rn(x0, x1);
    const float2 back = __half22float2(h);
    const __half2 r = __floats2half2_rn(x0 - back.x, x1 - back.y);
    memcpy(hi, &h, 4);
    memcpy(lo, &r, 4);
  }
}

template <typename T, int HD, bool kBlock16, int kTile, int kStages>
__global__ void __launch_bounds__(kThreads, 3) PagedDecodeMmaKernel(const Args a) {
  using L = MmaSmem<HD, kTile, kStages>;
  constexpr int C = L::kChunks;
  constexpr int KS = HD / 16;  // k-steps of QKᵀ, m-tiles of PV
  static_assert(HD % 16 == 0, "head_dim a multiple of the mma's k");
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_m[kWarps][kMmaHeadsPerBlock];
  __shared__ float s_l[kWarps][kMmaHeadsPerBlock];

  BlockWork<T> bw;  // sequence bw.s, query heads bw.h0 .., keys [bw.k_begin, bw.k_end)
  if (!BlockPrologue<T, HD, kMmaHeadsPerBlock>(a, &bw)) return;
  const int n_tiles = (bw.k_end - bw.k_begin + kTile - 1) / kTile;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const uint32_t smem_base = SmemAddr(smem);

  // Copy roles (the pipelined kernel's): thread e copies 16-byte slices e, e + 128, ... of the
  // tile's K and V rows; slice e is row r = e / C, slice j = e % C, stored at r kPitch + j. In the
  // cache (kernels/kv_layout.h) key `slot` of block blk, KV head kvh, starts at KvOffset(blk,
  // slot, kvh, ...) = blk * a.block_elems + KvOffset(0, slot, kvh, ...): the rows of one (block,
  // KV head) are one contiguous run, HD apart, so consecutive threads copy consecutive 16 bytes.
  // kBlock16: a tile starts on a 16-key block, so only the block id changes between tiles and
  // the chunk's offset from its block start (run of kvh, row r % 16, slice j) is fixed.
  constexpr int kTileChunks = kTile * C;
  constexpr int kPer = (kTileChunks + kThreads - 1) / kThreads;
  static_assert(kTile % 16 == 0 && kKeysPerIter % kTile == 0, "tiles on 16-key blocks");
  const int bs = kBlock16 ? 16 : a.block_size;
  int c_row[kPer];       // row of slice i in the tile, or kTile when past the tile
  int c_off[kPer];       // elements from the block start (kBlock16) or the row start to it
  uint32_t c_dst[kPer];  // bytes from the stage's K (V) tile start
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = static_cast<int>(threadIdx.x) + kThreads * i;
    const int r = e / C;
    const int j = e - r * C;
    c_row[i] = e < kTileChunks ? r : kTile;
    c_off[i] =
        (kBlock16 ? static_cast<int>(KvOffset(0, r & 15, bw.kvh, bs, a.num_kv_heads, HD)) : 0) +
        8 * j;
    c_dst[i] = static_cast<uint32_t>(r * L::kPitch + j) * 16;
  }
  auto load_tile = [&](int t, int st) {
    const int key0 = bw.k_begin + t * kTile;
    const uint32_t dst_k = smem_base + st * L::kStageBytes;
    const uint32_t dst_v = dst_k + L::kTileBytes;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (c_row[i] >= kTile) continue;
      const int key = key0 + c_row[i];
      size_t off = 0;
      int bytes = 0;
      if (key < bw.k_end) {
        if constexpr (kBlock16) {
          const int blk = bw.table[(key0 >> 4) + (c_row[i] >> 4)];
          if (blk >= 0 && blk < a.num_blocks) {
            off = static_cast<size_t>(static_cast<int64_t>(blk) * a.block_elems + c_off[i]);
            bytes = 16;
          }
        } else {
          const int blk = bw.table[key / bs];
          if (blk >= 0 && blk < a.num_blocks) {
            off = static_cast<size_t>(KvOffset(blk, key % bs, bw.kvh, bs, a.num_kv_heads, HD)) +
                  c_off[i];
            bytes = 16;
          }
        }
      }
      CpAsync16(dst_k + c_dst[i], kc + off, bytes);
      CpAsync16(dst_v + c_dst[i], vc + off, bytes);
    }
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < n_tiles) load_tile(t, t);
    CpAsyncCommit();
  }

  // Compute roles (see the top): warp w takes the 16-key chunks w, w + 4, ... of each tile.
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;  // fragment row: key g (and g + 8) of QKᵀ, head g of the B operands
  const int tq = lane & 3;  // fragment column pair: heads 2 tq, 2 tq + 1 of the C operands
  // q as the B operand of QKᵀ (dims x heads, column g): dims 16 ks + 2 tq, +1 and + 8, + 9.
  uint32_t qf[KS][2];
  {
    const bool mine = g < bw.nhb;
    const T* q_row = static_cast<const T*>(a.q) + static_cast<size_t>(bw.s) * a.q_stride +
                     static_cast<size_t>(bw.h0 + (mine ? g : 0)) * HD;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      qf[ks][0] = mine ? *reinterpret_cast<const uint32_t*>(q_row + 16 * ks + 2 * tq) : 0u;
      qf[ks][1] = mine ? *reinterpret_cast<const uint32_t*>(q_row + 16 * ks + 8 + 2 * tq) : 0u;
    }
  }
  // ldmatrix row addresses (bytes into a 16-key chunk of a stage's K / V tile). K, matrix
  // i = lane / 8: keys 8 (i & 1) + lane % 8, slice 2 ks + i / 2. V (transposed): keys
  // 8 (i / 2) + lane % 8, slice 2 db + (i & 1).
  const uint32_t k_lane =
      static_cast<uint32_t>((((lane >> 3) & 1) * 8 + (lane & 7)) * L::kPitch + (lane >> 4)) * 16;
  const uint32_t v_lane =
      static_cast<uint32_t>(((lane >> 4) * 8 + (lane & 7)) * L::kPitch + ((lane >> 3) & 1)) * 16;
  float m[2] = {-INFINITY, -INFINITY};  // log2-domain running max of heads 2 tq, 2 tq + 1
  float l[2] = {0.0f, 0.0f};            // this lane's share of their running sums
  float acc[KS][4];                     // Oᵀ: dims 16 db + g (+ 8) x heads 2 tq, 2 tq + 1
#pragma unroll
  for (int db = 0; db < KS; ++db) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[db][e] = 0.0f;
  }

  for (int t = 0; t < n_tiles; ++t) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();  // tile t landed for every thread; stage (t - 1) % kStages is free
    if (t + kStages - 1 < n_tiles) {
      load_tile(t + kStages - 1, (t + kStages - 1) % kStages);
    }
    CpAsyncCommit();
    for (int ch = warp; ch < kTile / 16; ch += kWarps) {
      const int key0 = bw.k_begin + t * kTile + 16 * ch;
      if (key0 >= bw.k_end) break;
      const uint32_t sk = smem_base + (t % kStages) * L::kStageBytes + 16 * ch * L::kRowBytes;
      const uint32_t sv = sk + L::kTileBytes;
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t af[4];
        mma::LdMatrixX4(af, sk + k_lane + ks * 32);
        mma::Mma16816<T>(c, af, qf[ks][0], qf[ks][1]);
      }
      // c[0], c[1]: key g, heads 2 tq, 2 tq + 1; c[2], c[3]: key g + 8.
      const bool v0 = key0 + g < bw.k_end, v1 = key0 + g + 8 < bw.k_end;
      float sc[4] = {v0 ? c[0] * a.scale_log2 : -INFINITY, v0 ? c[1] * a.scale_log2 : -INFINITY,
                     v1 ? c[2] * a.scale_log2 : -INFINITY, v1 ? c[3] * a.scale_log2 : -INFINITY};
      float mx[2] = {fmaxf(sc[0], sc[2]), fmaxf(sc[1], sc[3])};
#pragma unroll
      for (int off = 4; off < 32; off *= 2) {  // the 8 lanes of a head column
        mx[0] = fmaxf(mx[0], __shfl_xor_sync(0xffffffffu, mx[0], off));
        mx[1] = fmaxf(mx[1], __shfl_xor_sync(0xffffffffu, mx[1], off));
      }
      float alpha[2], mu[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float m_new = fmaxf(m[j], mx[j]);  // finite: key0 < k_end, so key g = 0 is valid
        mu[j] = m_new;
        alpha[j] = m[j] == -INFINITY ? 0.0f : exp2f(m[j] - m_new);
        m[j] = m_new;
      }
      const float p0 = exp2f(sc[0] - mu[0]), p1 = exp2f(sc[1] - mu[1]);
      const float p2 = exp2f(sc[2] - mu[0]), p3 = exp2f(sc[3] - mu[1]);
      l[0] = l[0] * alpha[0] + (p0 + p2);
      l[1] = l[1] * alpha[1] + (p1 + p3);
      // Pᵀ (keys x heads) as the B operand: lane l's words hold keys g / g + 8 x heads 2 tq, +1
      // (rows x columns of two 8x8 matrices); transposed, they are the B fragment (keys 2 tq, +1
      // (+ 8) x head g).
      uint32_t hi01, lo01, hi23, lo23;
      SplitPack<T>(p0, p1, &hi01, &lo01);
      SplitPack<T>(p2, p3, &hi23, &lo23);
      const uint32_t bh0 = MovMatrixTrans(hi01), bh1 = MovMatrixTrans(hi23);
      const uint32_t bl0 = MovMatrixTrans(lo01), bl1 = MovMatrixTrans(lo23);
#pragma unroll
      for (int db = 0; db < KS; ++db) {
        acc[db][0] *= alpha[0];
        acc[db][1] *= alpha[1];
        acc[db][2] *= alpha[0];
        acc[db][3] *= alpha[1];
        uint32_t af[4];
        mma::LdMatrixX4Trans(af, sv + v_lane + db * 32);
        mma::Mma16816<T>(acc[db], af, bh0, bh1);
        mma::Mma16816<T>(acc[db], af, bl0, bl1);
      }
    }
  }
  CpAsyncWait<0>();
  // A programmatic dependent may start its prologue once every block is past its loads.
  asm volatile("griddepcontrol.launch_dependents;" :::);

  // The running sums over the 8 lanes of a head column; then the warps, through the ring.
#pragma unroll
  for (int off = 4; off < 32; off *= 2) {
    l[0] += __shfl_xor_sync(0xffffffffu, l[0], off);
    l[1] += __shfl_xor_sync(0xffffffffu, l[1], off);
  }
  __syncthreads();                                // every warp is done with the ring
  float* s_acc = reinterpret_cast<float*>(smem);  // [kWarps][kMmaHeadsPerBlock][HD]
  if (g == 0) {
    s_m[warp][2 * tq] = m[0];
    s_m[warp][2 * tq + 1] = m[1];
    s_l[warp][2 * tq] = l[0];
    s_l[warp][2 * tq + 1] = l[1];
  }
  {
    float* w_acc = s_acc + static_cast<size_t>(warp) * kMmaHeadsPerBlock * HD;
#pragma unroll
    for (int db = 0; db < KS; ++db) {
      w_acc[(2 * tq) * HD + 16 * db + g] = acc[db][0];
      w_acc[(2 * tq + 1) * HD + 16 * db + g] = acc[db][1];
      w_acc[(2 * tq) * HD + 16 * db + g + 8] = acc[db][2];
      w_acc[(2 * tq + 1) * HD + 16 * db + g + 8] = acc[db][3];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < bw.nhb * HD; e += kThreads) {
    const int n = e / HD;
    const int d = e - n * HD;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, s_m[w][n]);
    float ll = 0.0f, o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      float f;
      Rescale(s_m[w][n], mm, &f);
      ll = fmaf(s_l[w][n], f, ll);
      o = fmaf(s_acc[(static_cast<size_t>(w) * kMmaHeadsPerBlock + n) * HD + d], f, o);
    }
    if (bw.splits == 1) {
      bw.out[e] = cuda::FromFloat<T>(o / ll);
    } else {
      const size_t idx =
          (static_cast<size_t>(bw.s) * a.num_heads + bw.h0 + n) * a.max_splits + bw.sp;
      a.partial_o[idx * HD + d] = o / ll;
      if (d == 0) {
        a.partial_ml[idx * 2] = mm;
        a.partial_ml[idx * 2 + 1] = ll;
      }
    }
  }
}

}  // namespace

KernelStatus LaunchPagedDecodeMma(const Args& a, int head_dim, DataType dtype,
                                  cudaStream_t stream) {
  return cuda::DispatchAttentionHeadDim(head_dim, [&](auto hd_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    return cuda::DispatchHalfTypes(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      auto kernel = a.block_size == 16 ? PagedDecodeMmaKernel<T, HD, true, kMmaTile, kMmaStages>
                                       : PagedDecodeMmaKernel<T, HD, false, kMmaTile, kMmaStages>;
      constexpr size_t smem = MmaSmem<HD, kMmaTile, kMmaStages>::kBytes;
      // Static shared memory (the merge's m / l) counts against the 48 KiB default too.
      if (smem + 1024 > 48 * 1024 &&
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)) != cudaSuccess) {
        return KernelStatus::kDeviceError;
      }
      kernel<<<dim3(a.blocks_per_seq, a.num_seqs, a.max_splits), kThreads, smem, stream>>>(a);
      return cuda::LaunchStatus();
    });
  });
}

}  // namespace paged_decode
}  // namespace phishard
