// Internal to the two Hopper (wgmma, sm_90a) prefill attention kernels: kWgmma
// (paged_attention_prefill_wgmma.cu) and kWgmmaWs (paged_attention_prefill_wgmma_ws.cu). The pieces
// they share: the kernel arguments and their host-side builder, the core-matrix tile layout, the
// per-warpgroup products (S = Q·Kᵀ, O += P·V), P packing, O rescaling and the O / l store, and
// the launch. The schedules (who loads, who waits where) stay in the kernels.
//
// Warpgroup register layout (the wgmma m64nN accumulator): warp q of a warpgroup holds rows
// 16 q + g and 16 q + g + 8 (lane = 4 g + t), columns 8 n + 2 t, +1 of every n8 slice.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_attention_cuda.h"
#include "kernels/cuda/prefill_ptx.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace phishard {
namespace prefill_wgmma {

constexpr float kLog2e = 1.4426950408889634f;

// Kernel arguments of both kernels (by value, in the kernel parameter space).
template <typename T>
struct WgArgs {
  const T* q;        // [num_tokens, q_stride] device
  const T* k_cache;  // [num_blocks, num_kv_heads, block_size, HD] device (kernels/kv_layout.h)
  const T* v_cache;
  T* out;  // [num_tokens, num_heads * HD] device
  const int32_t* cu_q_lens;
  const int32_t* context_lens;
  const int32_t* block_tables;  // [num_seqs, max_blocks_per_seq] device
  int max_blocks_per_seq, num_blocks, block_size;
  int block_shift;  // log2(block_size) when a power of two, else -1
  int num_heads, num_kv_heads, q_stride;
  float scale_log2;  // scale * log2(e), sign included
};

// kWgmmaWs's arguments: WgArgs + the fused new-K/V store (kWgmma has no such store: the caller,
// LaunchPagedAttentionPrefill, rejects store_new_k with kWgmma, and its kernel takes WgArgs).
template <typename T>
struct WsArgs : WgArgs<T> {
  // PagedAttentionCudaPlan::store_new_k / _v (null: the cache holds every key). Then the new
  // keys' K / V are read from q rows at columns new_k_col + kvh * HD / new_v_col + kvh * HD.
  T* store_k;
  T* store_v;
  int new_k_col, new_v_col;
  // Query heads a block runs one after the other (1 or 2; num_heads a multiple of it): the grid's
  // x is num_heads / heads_per_block.
  int heads_per_block;
};

// WgArgs from the validated params (host).
template <typename T>
WgArgs<T> MakeWgArgs(const PagedAttentionParams& p, int q_stride, int block_shift) {
  return WgArgs<T>{.q = static_cast<const T*>(p.q),
                   .k_cache = static_cast<const T*>(p.k_cache),
                   .v_cache = static_cast<const T*>(p.v_cache),
                   .out = static_cast<T*>(p.out),
                   .cu_q_lens = p.cu_q_lens,
                   .context_lens = p.context_lens,
                   .block_tables = p.block_tables,
                   .max_blocks_per_seq = p.max_blocks_per_seq,
                   .num_blocks = p.num_blocks,
                   .block_size = p.block_size,
                   .block_shift = block_shift,
                   .num_heads = p.num_heads,
                   .num_kv_heads = p.num_kv_heads,
                   .q_stride = q_stride,
                   .scale_log2 = p.scale * kLog2e};
}

// Grid (num_heads / heads_per_block, query tiles of C::kRows, num_seqs), C::kThreads threads,
// C::kSmemBytes of dynamic shared memory (opted into above the default 48 KiB). C is the kernel's
// config struct.
template <typename C, typename Args>
KernelStatus LaunchPrefillWgmmaKernel(void (*kernel)(Args), const Args& args, int max_q_len,
                                      int num_seqs, cudaStream_t stream, int heads_per_block = 1) {
  if (C::kSmemBytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(C::kSmemBytes)) != cudaSuccess) {
    return KernelStatus::kDeviceError;
  }
  const dim3 grid(args.num_heads / heads_per_block, cuda::CeilDiv(max_q_len, C::kRows), num_seqs);
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(args);
  return cuda::LaunchStatus();
}

// Byte offset of row r, chunk c in the core-matrix layout of a tile (rows of HD elements): row r,
// 16-byte chunk c at ((r / 8) * HD / 8 + c) * 128 + (r % 8) * 16.
template <int HD>
__device__ __forceinline__ uint32_t TileOffset(int r, int c) {
  return (r >> 3) * (HD / 8 * 128) + c * 128 + (r & 7) * 16;
}

// wgmma descriptors of the tiles (kGroupBytes = HD / 8 * 128, 8 rows x HD): the Q rows of
// warpgroup wg and a K tile are K-major operands (next 8 dims at 128 bytes, next 8 rows at
// kGroupBytes); a V tile is MN-major (next 8 keys at kGroupBytes, next 8 dims at 128 bytes).
template <int HD>
__device__ __forceinline__ uint64_t QDesc(uint32_t sQ, int wg) {
  return wgmma::Desc(sQ + wg * 8 * (HD / 8 * 128), 128, HD / 8 * 128);
}
template <int HD>
__device__ __forceinline__ uint64_t KDesc(uint32_t sK) {
  return wgmma::Desc(sK, 128, HD / 8 * 128);
}
template <int HD>
__device__ __forceinline__ uint64_t VDesc(uint32_t sV) {
  return wgmma::Desc(sV, HD / 8 * 128, 128);
}

// One m64nHDk16 step of O += P · V: P fragment `a` from registers, V from the descriptor.
template <int HD, typename T>
__device__ __forceinline__ void WgmmaPv(float (&o)[HD / 2], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (HD == 80) {
    wgmma::WgmmaRS80<T>(o, a, desc);
  } else if constexpr (HD == 64) {
    wgmma::WgmmaRS64<T>(o, a, desc);
  } else {
    static_assert(HD == 32);
    wgmma::WgmmaRS32<T>(o, a, desc);
  }
}

// S [64, 64] = Q · Kᵀ of the K tile at byte stage_off past desc_k0 (raw scores), HD / 16 wgmma
// m64n64k16 with both operands in shared memory (K-major); issued, not waited for.
template <typename T, int HD>
__device__ __forceinline__ void IssueS(float (&sc)[32], uint64_t desc_q, uint64_t desc_k0,
                                       uint32_t stage_off) {
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    wgmma::WgmmaSS64<T>(sc, wgmma::DescAdvance(desc_q, kk * 256),
                        wgmma::DescAdvance(desc_k0, stage_off + kk * 256), kk > 0 ? 1 : 0);
  }
}

// Q rows of this thread (warpgroup rows 16 warp + g and + 8, g = lane / 4, t = lane % 4) from the
// core-matrix tile at sQ (rows of HD elements, the thread's first row at row0) as wgmma A
// fragments, one a k16 step kk: registers (row, dims) = (g, 16 kk + 2t | +1), (g + 8, same),
// (g, 16 kk + 8 + 2t | +1), (g + 8, same). Each register's 32 lanes read 128 consecutive bytes:
// no bank conflicts.
template <int HD>
__device__ __forceinline__ void LoadQFragments(uint32_t sQ, int row0, int t,
                                               uint32_t (&qa)[HD / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t at = sQ + TileOffset<HD>(row0 + (e & 1) * 8, 2 * kk + (e >> 1)) + 4 * t;
      asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(qa[kk][e]) : "r"(at));
    }
  }
}

// S [64, 64] = Q · Kᵀ with Q from registers (LoadQFragments) and the K tile (K-major) at byte
// stage_off past desc_k0: HD / 16 wgmma m64n64k16, each reading only K from shared memory (half
// the shared-memory bytes of IssueS); issued, not waited for.
template <typename T, int HD>
__device__ __forceinline__ void IssueSQReg(float (&sc)[32], const uint32_t (&qa)[HD / 16][4],
                                           uint64_t desc_k0, uint32_t stage_off) {
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    wgmma::WgmmaRS64K<T>(sc, qa[kk], wgmma::DescAdvance(desc_k0, stage_off + kk * 256),
                         kk > 0 ? 1 : 0);
  }
}

// O [64, HD] += P · V of the V tile (kN keys, MN-major) at byte stage_off past desc_v0; issued, not
// waited for.
template <typename T, int HD, int kN>
__device__ __forceinline__ void IssuePv(float (&o)[HD / 2], const uint32_t (&pa)[kN / 16][4],
                                        uint64_t desc_v0, uint32_t stage_off) {
  constexpr uint32_t kGroupBytes = HD / 8 * 128;  // 8 rows x HD: one core matrix a chunk
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    WgmmaPv<HD, T>(o, pa[kk], wgmma::DescAdvance(desc_v0, stage_off + kk * 2 * kGroupBytes));
  }
}

// Raw scores S [64, kN] of key tile key0 (this thread's kN / 2) scaled by scale_log2, and the
// causal mask (-inf where key > the row's position) on tiles reaching past the warpgroup's first
// row (position wg_pos_min); the thread's rows are wg_pos_min + row_in_wg and + 8.
template <int kN>
__device__ __forceinline__ void CausalMask(float (&sc)[kN / 2], int key0, int wg_pos_min,
                                           int row_in_wg, int t);
template <int kN>
__device__ __forceinline__ void ScaleAndMask(float (&sc)[kN / 2], float scale_log2, int key0,
                                             int wg_pos_min, int row_in_wg, int t) {
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) sc[i] *= scale_log2;
  CausalMask<kN>(sc, key0, wg_pos_min, row_in_wg, t);
}
// ScaleAndMask's mask alone (-inf where key > the row's position; scores in any units).
template <int kN>
__device__ __forceinline__ void CausalMask(float (&sc)[kN / 2], int key0, int wg_pos_min,
                                           int row_in_wg, int t) {
  if (key0 + kN - 1 > wg_pos_min) {
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        // Clamped: a row before its sequence's start (kWgmmaWs' partial first tile) sees key 0,
        // so its softmax stays finite (it is not stored).
        const int row_pos = max(wg_pos_min + row_in_wg + (e >> 1) * 8, 0);
        const int key = key0 + n * 8 + 2 * t + (e & 1);
        if (key > row_pos) sc[4 * n + e] = -INFINITY;
      }
    }
  }
}

// O rescaled by the thread's two rows' factors alpha[0] (row g) and alpha[1] (row g + 8).
template <int HD>
__device__ __forceinline__ void RescaleO(float (&o)[HD / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
}

// P rounded to T as register A fragments: keys [16 kk, 16 kk + 16) are S slices 2 kk, 2 kk + 1.
template <typename T, int kN>
__device__ __forceinline__ void PackP(const float (&sc)[kN / 2], uint32_t (&pa)[kN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    pa[kk][0] = prefill_ptx::PackFloat2<T>(sc[8 * kk + 0], sc[8 * kk + 1]);
    pa[kk][1] = prefill_ptx::PackFloat2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
    pa[kk][2] = prefill_ptx::PackFloat2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
    pa[kk][3] = prefill_ptx::PackFloat2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
  }
}

// out[row, h, :] = O / l for the thread's two rows of the block's query tile (tile0 is the tile's
// first query row of the sequence starting at token q_begin; rows outside [row_lo, rows) are
// outside the sequence), two elements (4 bytes) a store. l_run: this lane's part of each row's sum
// (quad-reduced here).
template <typename T, int HD>
__device__ __forceinline__ void StoreO(const WgArgs<T>& a, const float (&o)[HD / 2],
                                       const float (&l_run)[2], int q_begin, int tile0, int row_lo,
                                       int rows, int wg_row0, int row_in_wg, int h, int t) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = l_run[hh];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv_l = 1.0f / l;  // l >= 1: the row's max element contributes exp2(0)
    const int row = wg_row0 + row_in_wg + hh * 8;
    if (row >= row_lo && row < rows) {
      T* dst =
          a.out + static_cast<size_t>(q_begin + tile0 + row) * a.num_heads * HD + h * HD + 2 * t;
#pragma unroll
      for (int d = 0; d < HD / 8; ++d) {
        const uint32_t w =
            prefill_ptx::PackFloat2<T>(o[4 * d + 2 * hh] * inv_l, o[4 * d + 2 * hh + 1] * inv_l);
        *reinterpret_cast<uint32_t*>(dst + d * 8) = w;
      }
    }
  }
}

}  // namespace prefill_wgmma
}  // namespace phishard
