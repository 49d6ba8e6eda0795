// Prefill attention over the paged KV cache on tensor cores, FlashAttention-2 layout:
// mma.sync m16n8k16 (bf16/fp16 in, float32 accumulation) fed by ldmatrix, the block's Q tile held
// in registers, the online softmax on the accumulator registers (S never touches shared memory),
// and K/V tiles gathered through the block table with cp.async into double-buffered shared memory.
//
// One thread block per (query head, query tile, sequence); warp w owns query rows
// [w * 16 * MT, (w + 1) * 16 * MT) of the tile (MT m16 tiles a warp) for the whole kernel: its Q
// fragments, its S tile, its softmax state and its O accumulators live in that warp's registers.
// Per key tile: S = Q·Kᵀ (K fragments by ldmatrix from shared memory), causal mask on the tiles
// that cross the warp's diagonal only, rescale-and-exponentiate in registers, then O += P·V with
// P re-packed from the S accumulators as the A operand (the m16n8 C layout of two adjacent key
// tiles is the m16k16 A layout) and V fragments by ldmatrix.trans. Only the K/V stage handoff
// needs a block barrier: one per key tile.
// H200 (docs/perf-log.md, prefill attention runs 1-2): 247-270 TFLOP/s causal at 4096-8192 x 32
// heads x 80, ~40% of the mma.sync pipe; the next step is wgmma with warp specialisation.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/paged_attention_prefill.cuh"
#include "kernels/cuda/prefill_ptx.cuh"
#include "kernels/kv_layout.h"

namespace phishard {
namespace {

using namespace prefill_ptx;  // NOLINT(build/namespaces): internal PTX wrappers
using mma::LdMatrixX4;
using mma::LdMatrixX4Trans;
using mma::Mma16816;

constexpr float kLog2e = 1.4426950408889634f;

// (mma.sync operand loads and the MMA: kernels/cuda/mma_sync.cuh)

// ---- kernel -------------------------------------------------------------------------------------
template <int HD, int kWarps, int kMT, int kN>
struct PrefillCfg {
  static_assert(HD % 16 == 0 && kN % 16 == 0);
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = 16 * kMT;
  static constexpr int kRows = kWarps * kWarpRows;  // query rows per block
  static constexpr int kChunks = HD / 8;            // 16-byte chunks per row
  // Shared-memory row pitch in elements: an odd number of 16-byte chunks (HD / 8 + 1), so the 8
  // row addresses of an ldmatrix phase fall in 8 different 16-byte bank groups (no conflicts).
  static constexpr int kLd = HD + 8;
  static constexpr uint32_t kQBytes = kRows * kLd * 2;
  static constexpr uint32_t kTileBytes = kN * kLd * 2;
  static constexpr uint32_t kSmemBytes = kQBytes + 4 * kTileBytes;  // Q, K[2], V[2]
  // 16-byte K (and V) chunks a thread copies per tile: items (row, chunk) of the [kN, HD] tile,
  // row-major, item tid + i kThreads.
  static constexpr int kKvItems = (kN * kChunks + kThreads - 1) / kThreads;
  static constexpr int kKvItemsTotal = kN * kChunks;
  static constexpr int kQIters = (kRows * kChunks + kThreads - 1) / kThreads;
};

template <typename T>
struct PrefillArgs {
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
  float scale_log2;  // |scale| * log2(e)
  bool negate_q;     // scale < 0: softmax(scale q·k) = softmax(|scale| (-q)·k)
  // PagedAttentionCudaPlan::store_new_k / _v (null: the cache holds every key). Then the new
  // keys' K / V are read from q rows at columns new_k_col + kvh * HD / new_v_col + kvh * HD.
  T* store_k;
  T* store_v;
  int new_k_col, new_v_col;
};

// kMinBlocks > 1 caps the registers so that many blocks fit on an SM (16 warps for the 16-row
// tilings: more warps to overlap one warp's softmax with another's MMAs).
template <typename T, int HD, int kWarps, int kMT, int kN, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    PrefillMmaKernel(const PrefillArgs<T> a) {
  using C = PrefillCfg<HD, kWarps, kMT, kN>;
  constexpr int kKSteps = HD / 16;  // k16 steps of Q·Kᵀ
  constexpr int kDTiles = HD / 8;   // n8 tiles of O
  constexpr int kNTiles = kN / 8;   // n8 tiles of S
  extern __shared__ __align__(128) unsigned char smem[];

  const int h = blockIdx.x;
  const int s = blockIdx.z;
  const int q_begin = a.cu_q_lens[s];
  const int q_len = a.cu_q_lens[s + 1] - q_begin;
  // Causal work grows with the tile index: launch the last (heaviest) tiles first.
  const int tile0 = (gridDim.y - 1 - blockIdx.y) * C::kRows;
  if (tile0 >= q_len) return;
  const int rows = min(C::kRows, q_len - tile0);
  const int n_cached = a.context_lens[s] - q_len;  // keys before the step's new tokens
  const int pos0 = n_cached + tile0;               // position of the tile's row 0
  const int n_keys = pos0 + rows;                  // keys [0, n_keys) are visible to some row
  const bool new_kv_in_q = a.store_k != nullptr;
  const int n_tiles = (n_keys + kN - 1) / kN;
  const int kvh = h / (a.num_heads / a.num_kv_heads);
  const int32_t* table = a.block_tables + static_cast<size_t>(s) * a.max_blocks_per_seq;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;

  const uint32_t sQ = SmemAddr(smem);
  const uint32_t sK0 = sQ + C::kQBytes;
  const uint32_t sV0 = sK0 + 2 * C::kTileBytes;

  // Q tile [kRows, HD] -> shared (rows past the sequence's end are zeros).
  {
    const T* q_tile = a.q + static_cast<size_t>(q_begin + tile0) * a.q_stride + h * HD;
#pragma unroll
    for (int it = 0; it < C::kQIters; ++it) {
      const int i = tid + it * C::kThreads;
      if (i < C::kRows * C::kChunks) {
        const int r = i / C::kChunks;
        const int c = i - r * C::kChunks;
        const bool valid = r < rows;
        CpAsync16(sQ + (r * C::kLd + c * 8) * 2,
                  valid ? q_tile + static_cast<size_t>(r) * a.q_stride + c * 8 : a.q, valid);
      }
    }
  }
  // K and V tile [kN, HD] of keys [key0, key0 + kN) -> stage `stage`, gathered through the block
  // table; keys >= n_keys and block ids outside [0, num_blocks) become zeros (finite: P = 0 times
  // a NaN V would still poison O).
  // Thread -> items (row, chunk) tid, tid + kThreads, ... of the tile, row-major: the cached keys
  // of one block are one contiguous run of head kvh (kernels/kv_layout.h: consecutive keys HD
  // elements apart), so a warp-wide copy reads 512 consecutive bytes of a run (4 whole 128-byte
  // lines) wherever the tile's rows share a block; a new token's row (its q row) is HD contiguous
  // elements too. Each item reads its own block-table entry (kKvItems a thread and tile, 5 at head
  // dim 80 with 4 warps, 3 with 8; L1 hits after the first). The row-per-thread mapping this
  // replaced read 16 (or 8) different rows a copy instruction; it spilled no fewer registers
  // (ptxas -v: kQ128Warps8 at head dim 80 now 0 bytes of spill, was 16; at 64 now 4, was 0).
  // The cache slot (block id, offset in it) of key position `key` of this sequence.
  auto slot_of = [&](int key, int* in_blk) {
    if (a.block_shift >= 0) {
      *in_blk = key & (a.block_size - 1);
      return table[key >> a.block_shift];
    }
    const int b = key / a.block_size;
    *in_blk = key - b * a.block_size;
    return table[b];
  };
  // Element offset of the new tokens' V from their K in a q row (fused qkv layout).
  const int new_v_minus_k = a.new_v_col - a.new_k_col;
  auto load_kv = [&](int key0, int stage) {
#pragma unroll
    for (int i = 0; i < C::kKvItems; ++i) {
      const int item = tid + i * C::kThreads;
      if (C::kKvItemsTotal % C::kThreads == 0 || item < C::kKvItemsTotal) {
        const int r = item / C::kChunks;
        const int c = item - r * C::kChunks;
        const int key = key0 + r;
        const T* k_src = a.k_cache;
        const T* v_src = a.v_cache;
        int64_t k_off = 0, v_off = 0;
        bool valid = false;
        if (key < n_keys) {
          if (new_kv_in_q && key >= n_cached) {  // a new token: its own q row
            k_src = v_src = a.q;
            k_off = static_cast<int64_t>(q_begin + key - n_cached) * a.q_stride + a.new_k_col +
                    kvh * HD;
            v_off = k_off + new_v_minus_k;
            valid = true;
          } else {
            int in_blk = 0;
            const int blk = slot_of(key, &in_blk);
            valid = blk >= 0 && blk < a.num_blocks;
            k_off = v_off =
                valid ? KvOffset(blk, in_blk, kvh, a.block_size, a.num_kv_heads, HD) : 0;
          }
        }
        const uint32_t so = stage * C::kTileBytes + (r * C::kLd + c * 8) * 2;
        CpAsync16(sK0 + so, k_src + k_off + c * 8, valid);
        CpAsync16(sV0 + so, v_src + v_off + c * 8, valid);
      }
    }
  };
  load_kv(0, 0);
  CpAsyncCommit();

  // Fragment coordinates: lane = 4 g + t; an m16n8 accumulator holds rows g and g + 8, columns
  // 2t and 2t + 1.
  const int g = lane >> 2;
  const int t = lane & 3;
  const int warp_row0 = warp * C::kWarpRows;
  const bool warp_active = warp_row0 < rows;
  const int warp_pos_min = pos0 + warp_row0;
  const int warp_pos_max = pos0 + min(warp_row0 + C::kWarpRows, rows) - 1;
  // Per-lane ldmatrix byte offsets. Q (A operand, x4 = rows 0-7/8-15 x k 0-7/8-15): lane l points
  // at row l % 16, column 8 (l / 16). K (B operand of S, non-transposed, x4 = keys 0-7 x d 0-7,
  // keys 0-7 x d 8-15, keys 8-15 x d 0-7, keys 8-15 x d 8-15). V (B operand of O, transposed, x4 =
  // keys 0-7 x d 0-7, keys 8-15 x d 0-7, keys 0-7 x d 8-15, keys 8-15 x d 8-15).
  const uint32_t q_off = ((warp_row0 + (lane & 15)) * C::kLd + (lane >> 4) * 8) * 2;
  const uint32_t k_off = (((lane & 7) + ((lane >> 4) << 3)) * C::kLd + ((lane >> 3) & 1) * 8) * 2;
  const uint32_t v_off = ((lane & 15) * C::kLd + (lane >> 4) * 8) * 2;

  uint32_t qf[kMT][kKSteps][4];  // Q strip [16 kMT, HD] as A fragments
  float o[kMT][kDTiles][4];      // O strip [16 kMT, HD], float32, unnormalised
  float m_run[kMT][2];           // running max of the raw scores of rows g and g + 8
  float l_run[kMT][2];           // running sum of this lane's columns (quad-reduced at the end)
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int j = 0; j < kDTiles; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.0f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.0f;
  }

  for (int j = 0; j < n_tiles; ++j) {
    // Tile j has landed for every thread, and every warp is done with tile j - 1, whose stage
    // the next load overwrites.
    CpAsyncWaitAll();
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
          LdMatrixX4(qf[mt][kk], sQ + q_off + (mt * 16 * C::kLd + kk * 16) * 2);
          if (a.negate_q) {
#pragma unroll
            for (int e = 0; e < 4; ++e) qf[mt][kk][e] ^= 0x80008000u;
          }
        }
      }
    }
    if (j + 1 < n_tiles) {
      load_kv((j + 1) * kN, (j + 1) & 1);
      CpAsyncCommit();
    }
    const int key0 = j * kN;
    // Tiles above the warp's diagonal (and warps holding only padding rows) do no math. Tile 0
    // is never skipped by an active warp, so every row's running max is finite after it.
    if (!warp_active || key0 > warp_pos_max) continue;
    const uint32_t sK = sK0 + (j & 1) * C::kTileBytes;
    const uint32_t sV = sV0 + (j & 1) * C::kTileBytes;

    // S [16 kMT, kN] = Q · Kᵀ (raw scores; the scale is folded into the exponent below).
    float sc[kMT][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        sc[mt][n][0] = sc[mt][n][1] = sc[mt][n][2] = sc[mt][n][3] = 0.0f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        LdMatrixX4(b, sK + k_off + (np * 16 * C::kLd + kk * 16) * 2);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Mma16816<T>(sc[mt][2 * np], qf[mt][kk], b[0], b[1]);
          Mma16816<T>(sc[mt][2 * np + 1], qf[mt][kk], b[2], b[3]);
        }
      }
    }
    // Causal mask, only on tiles that reach past the warp's first row position.
    if (key0 + kN - 1 > warp_pos_min) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row_pos = warp_pos_min + mt * 16 + g + (e >> 1) * 8;
            const int key = key0 + n * 8 + 2 * t + (e & 1);
            if (key > row_pos) sc[mt][n][e] = -INFINITY;
          }
        }
      }
    }
    // Online softmax in the log2 domain. A row's 4 owner lanes (one quad) agree on its max.
    // Maxima and sums are pairwise trees (short dependency chains: only 2-4 warps a scheduler).
    float alpha[kMT][2];
    bool max_moved = false;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float v[kNTiles];
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) v[n] = fmaxf(sc[mt][n][2 * hh], sc[mt][n][2 * hh + 1]);
#pragma unroll
        for (int w = kNTiles / 2; w > 0; w /= 2) {
#pragma unroll
          for (int n = 0; n < w; ++n) v[n] = fmaxf(v[n], v[n + w]);
        }
        float mx = fmaxf(m_run[mt][hh], v[0]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // 2^-inf = 0 on the row's first tile; exactly 1 when the max did not move.
        alpha[mt][hh] = cuda::Exp2Ftz((m_run[mt][hh] - mx) * a.scale_log2);
        max_moved |= alpha[mt][hh] != 1.0f;
        m_run[mt][hh] = mx;
        const float mb = mx * a.scale_log2;
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
          for (int e = 2 * hh; e < 2 * hh + 2; ++e) {
            sc[mt][n][e] =
                cuda::Exp2Ftz(fmaf(sc[mt][n][e], a.scale_log2, -mb));  // masked: 2^-inf = 0
          }
          v[n] = sc[mt][n][2 * hh] + sc[mt][n][2 * hh + 1];
        }
#pragma unroll
        for (int w = kNTiles / 2; w > 0; w /= 2) {
#pragma unroll
          for (int n = 0; n < w; ++n) v[n] += v[n + w];
        }
        l_run[mt][hh] = l_run[mt][hh] * alpha[mt][hh] + v[0];
      }
    }
    // O is rescaled only when some row of the warp raised its max: after a row's first tiles
    // that is rare, and skipping multiplies by exactly 1.
    if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) {
#pragma unroll
          for (int e = 0; e < 4; ++e) o[mt][d][e] *= alpha[mt][e >> 1];
        }
      }
    }
    // O [16 kMT, HD] += P [16 kMT, kN] · V [kN, HD]; P rounded to T as the A operand.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t pa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pa[mt][0] = PackFloat2<T>(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
        pa[mt][1] = PackFloat2<T>(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
        pa[mt][2] = PackFloat2<T>(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
        pa[mt][3] = PackFloat2<T>(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < HD / 16; ++dp) {
        uint32_t b[4];
        LdMatrixX4Trans(b, sV + v_off + (kk * 16 * C::kLd + dp * 16) * 2);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Mma16816<T>(o[mt][2 * dp], pa[mt], b[0], b[1]);
          Mma16816<T>(o[mt][2 * dp + 1], pa[mt], b[2], b[3]);
        }
      }
    }
  }
  if (warp_active) {
    // out[row, h, :] = O / l, two elements (4 bytes) a store.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float l = l_run[mt][hh];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv_l = 1.0f / l;  // l >= 1: the row's max element contributes exp2(0)
        const int row = warp_row0 + mt * 16 + g + hh * 8;
        if (row < rows) {
          T* dst = a.out + static_cast<size_t>(q_begin + tile0 + row) * a.num_heads * HD + h * HD +
                   2 * t;
#pragma unroll
          for (int d = 0; d < kDTiles; ++d) {
            const uint32_t w =
                PackFloat2<T>(o[mt][d][2 * hh] * inv_l, o[mt][d][2 * hh + 1] * inv_l);
            *reinterpret_cast<uint32_t*>(dst + d * 8) = w;
          }
        }
      }
    }
  }
  // The tile's own new tokens' K/V into the cache (PagedAttentionCudaPlan::store_new_k): by the
  // blocks of the first query head of each KV head, so every (token, KV head) is stored once;
  // nothing in this launch reads them from the cache (new keys come from the q rows). After the
  // O write-out (its registers are free).
  if (new_kv_in_q && h % (a.num_heads / a.num_kv_heads) == 0) {
    StoreNewKvRows<T, HD, C::kThreads>(a, slot_of, tid, rows, kvh, pos0, q_begin, tile0);
  }
}

template <typename T, int HD, int kWarps, int kMT, int kN, int kMinBlocks>
KernelStatus Launch(const PrefillArgs<T>& args, int max_q_len, int num_seqs, cudaStream_t stream) {
  using C = PrefillCfg<HD, kWarps, kMT, kN>;
  auto kernel = PrefillMmaKernel<T, HD, kWarps, kMT, kN, kMinBlocks>;
  if (C::kSmemBytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(C::kSmemBytes)) != cudaSuccess) {
    return KernelStatus::kDeviceError;
  }
  const dim3 grid(args.num_heads, cuda::CeilDiv(max_q_len, C::kRows), num_seqs);
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(args);
  return cuda::LaunchStatus();
}

template <typename T, int HD>
KernelStatus LaunchTiling(PrefillTiling tiling, const PrefillArgs<T>& args, int max_q_len,
                          int num_seqs, cudaStream_t stream) {
  switch (tiling) {
    case PrefillTiling::kQ128:
      return Launch<T, HD, 4, 2, 64, 1>(args, max_q_len, num_seqs, stream);
    case PrefillTiling::kQ128Warps8:
      // Head dims above 80: one block an SM, so a thread may hold the wider O strip and Q
      // fragments in up to 255 registers (capped at 128 for two blocks, 96 and 128 spilled).
      return Launch<T, HD, 8, 1, 64, (HD > 80 ? 1 : 2)>(args, max_q_len, num_seqs, stream);
    default:  // kAuto is resolved by the caller; kWgmma / kWgmmaWs:
              // paged_attention_prefill_wgmma*.cu
      break;
  }
  return KernelStatus::kInvalidShape;
}

}  // namespace

// The query length (PagedAttentionCudaPlan::max_q_len) from which kAuto picks kWgmmaWs.
constexpr int kWgmmaWsMinQ = 1024;

PrefillTiling PagedAttentionPrefillTiling(const PagedAttentionParams& p,
                                          const PagedAttentionCudaPlan& plan) {
  if (plan.prefill_tiling != PrefillTiling::kAuto) return plan.prefill_tiling;
  // H200 (docs/perf-log.md: prefill attention run 2, pre helper runs 1-2): kQ128 is 1-5% ahead of
  // kQ128Warps8 at head dim 80 from 4096 query tokens up in all three runs (at 2048 the two tie
  // within +-3%); kQ128Warps8 is ~10% ahead at head dim 64 and ties or leads below. kWgmma ties
  // with both at best and is never chosen here. kWgmmaWs: since session 18 (Q in registers, two
  // heads a block, the producer warpgroup copying; perf-log 2026-11-30 05:30-05:40) faster in
  // the prefill step too, kAuto against it alternated: Phi-2 1x1024 ×0.98, 1x2048 ×0.97, 8x1024
  // ×0.99, 8x2048 ×0.97, Phi-1.5 (head dim 64) 1x2048 ×0.98, 8x1024 ×0.99; at 1x512 ×1.02 (its
  // one block an SM beside the prefill fork's fc1), so from kWgmmaWsMinQ query tokens. Head dim
  // 32 was not measured.
  if (plan.max_q_len >= kWgmmaWsMinQ && (p.head_dim == 80 || p.head_dim == 64) &&
      PagedAttentionPrefillWgmmaAvailable()) {
    return PrefillTiling::kWgmmaWs;
  }
  if (p.head_dim == 80 && plan.max_q_len >= 4096) return PrefillTiling::kQ128;
  return PrefillTiling::kQ128Warps8;
}

KernelStatus LaunchPagedAttentionPrefill(const PagedAttentionParams& p,
                                         const PagedAttentionCudaPlan& plan, int q_stride,
                                         cudaStream_t stream) {
  if (!(p.scale != 0.0f && std::isfinite(p.scale))) return KernelStatus::kInvalidShape;
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0) return KernelStatus::kInvalidShape;
  const PrefillTiling tiling = PagedAttentionPrefillTiling(p, plan);
  const bool store_new_kv = plan.store_new_k != nullptr || plan.store_new_v != nullptr;
  if (store_new_kv && (plan.store_new_k != p.k_cache || plan.store_new_v != p.v_cache ||
                       tiling == PrefillTiling::kWgmma ||
                       q_stride < (p.num_heads + 2 * p.num_kv_heads) * p.head_dim)) {
    return KernelStatus::kInvalidShape;
  }
  int block_shift = -1;
  for (int b = 0; b < 31; ++b) {
    if ((1 << b) == p.block_size) block_shift = b;
  }
  if (tiling == PrefillTiling::kWgmma) {
    return LaunchPagedAttentionPrefillWgmma(p, plan, q_stride, block_shift, stream);
  }
  if (tiling == PrefillTiling::kWgmmaWs) {
    return LaunchPagedAttentionPrefillWgmmaWs(p, plan, q_stride, block_shift, stream);
  }
  return DispatchPrefillHeadDim(p, [&](auto hd_tag, auto type_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    using T = typename decltype(type_tag)::type;
    const PrefillArgs<T> args{.q = static_cast<const T*>(p.q),
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
                              .scale_log2 = std::fabs(p.scale) * kLog2e,
                              .negate_q = p.scale < 0.0f,
                              .store_k = static_cast<T*>(plan.store_new_k),
                              .store_v = static_cast<T*>(plan.store_new_v),
                              .new_k_col = p.num_heads * HD,
                              .new_v_col = (p.num_heads + p.num_kv_heads) * HD};
    return LaunchTiling<T, HD>(tiling, args, plan.max_q_len, p.num_seqs, stream);
  });
}

}  // namespace phishard
