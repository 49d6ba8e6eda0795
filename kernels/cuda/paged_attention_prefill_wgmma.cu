// Prefill attention over the paged KV cache on Hopper's warpgroup MMA (wgmma, sm_90a): the same
// problem, grid and causal schedule as the mma.sync kernel (paged_attention_prefill.cu), with the
// two products issued a warpgroup (4 warps, 64 query rows) at a time.
//
// One thread block per (query head, 128-query tile, sequence): two warpgroups, warpgroup w owns
// query rows [64 w, 64 w + 64) of the tile. All 256 threads gather the Q tile once and each 64-key
// K/V tile through the block table with cp.async into 4 shared-memory stages, stored in
// wgmma's no-swizzle core-matrix layout (wgmma.cuh): row r, 16-byte chunk c of a [rows, HD] tile at
// byte ((r / 8) * HD / 8 + c) * 128 + (r % 8) * 16. Q and K tiles are then K-major operands and the
// V tile is an MN-major (transposed) operand of the same bytes, so no tile is ever transposed.
// Per key tile and warpgroup:
//   S [64, 64] = Q · Kᵀ       HD / 16 wgmma m64n64k16, both operands from shared memory
//   causal mask (tiles crossing the warpgroup's diagonal only), online softmax in registers
//   O [64, HD] += P · V       4 wgmma m64nHDk16, P from registers (the f32 accumulator layout of S
//                              re-packed to 16 bits is the register A-fragment layout)
// Thread ownership (the wgmma accumulator layout): warp q of a warpgroup holds rows 16 q + g and
// 16 q + g + 8 (lane = 4 g + t), columns 8 n + 2 t, +1 of every n8 slice. Softmax works in the log2
// domain on scaled scores (scale * log2(e) folded into one multiply, sign included).
// Two blocks (16 warps) an SM: while one warpgroup runs its softmax another's wgmmas run, and
// within a warpgroup tile j's softmax runs beside tile j - 1's P·V (the loop below).
// Measured on H200 (docs/perf-log.md, pre helper runs 1-2): correct on every test shape, but no
// faster than the mma.sync kernel: 211 TFLOP/s causal at 2048 x 32 x 80 (mma.sync 211-219),
// 250 at 4096, 275 at 8192. Variants measured in the same runs (a plain loop waiting on each
// product, 2-4 stages, 128-key tiles) were within 3% or slower, and one block an SM (8 warps) was
// 1.4x slower: the kernel is latency-bound on each warpgroup's per-tile chain (softmax, barrier),
// not on MMA issue or K/V load depth. Kept as a tested tiling (kWgmma), not chosen by kAuto; the
// known way further is warp specialisation (a producer warp, two consumer warpgroups taking turns
// by named barriers so that one's softmax always overlaps the other's products).
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_attention_prefill.cuh"
#include "kernels/cuda/paged_attention_prefill_wgmma.cuh"
#include "kernels/cuda/prefill_ptx.cuh"
#include "kernels/cuda/wgmma.cuh"
#include "kernels/kv_layout.h"

namespace phishard {
namespace {

using namespace prefill_ptx;    // NOLINT(build/namespaces): internal PTX wrappers
using namespace prefill_wgmma;  // NOLINT(build/namespaces): the wgmma kernels' shared pieces

template <int HD>
struct WgCfg {
  static_assert(HD % 16 == 0);
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = kWarpGroups * 128;
  static constexpr int kRows = kWarpGroups * 64;  // query rows per block
  static constexpr int kN = 64;                   // keys per tile
  static constexpr int kStages = 4;               // K/V tile buffers (2 copied ahead, see loop)
  static constexpr int kChunks = HD / 8;          // 16-byte chunks per row
  static constexpr uint32_t kGroupBytes = kChunks * 128;  // 8 rows x HD: one core matrix a chunk
  static constexpr uint32_t kQBytes = kRows / 8 * kGroupBytes;
  static constexpr uint32_t kTileBytes = kN / 8 * kGroupBytes;
  static constexpr uint32_t kSmemBytes = kQBytes + 2 * kStages * kTileBytes;  // Q, K[], V[]
  static constexpr int kTpr = kThreads / kN;  // threads per K/V row when loading a tile
  static constexpr int kKvChunksPerThread = (kChunks + kTpr - 1) / kTpr;
  static constexpr int kQIters = (kRows * kChunks + kThreads - 1) / kThreads;
};

// Two blocks an SM: registers capped at 128 a thread (ptxas: 126 at head dim 80, no spills).
template <typename T, int HD>
__global__ void __launch_bounds__(256, 2) PrefillWgmmaKernel(const WgArgs<T> a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WgCfg<HD>;
  constexpr int kN = C::kN;
  constexpr int kStages = C::kStages;
  constexpr int kAhead = kStages - 2;  // tiles copied ahead of tile j (see the loop)
  static_assert(C::kThreads == 256);
  constexpr int kSRegs = C::kN / 2;   // S accumulators a thread: [64, kN] / 128 threads
  constexpr int kORegs = HD / 2;      // O accumulators a thread
  constexpr int kNTiles = C::kN / 8;  // n8 slices of S
  extern __shared__ __align__(128) unsigned char smem[];

  const int h = blockIdx.x;
  const int s = blockIdx.z;
  const int q_begin = a.cu_q_lens[s];
  const int q_len = a.cu_q_lens[s + 1] - q_begin;
  // Causal work grows with the tile index: launch the last (heaviest) tiles first.
  const int tile0 = (gridDim.y - 1 - blockIdx.y) * C::kRows;
  if (tile0 >= q_len) return;
  const int rows = min(C::kRows, q_len - tile0);
  const int pos0 = a.context_lens[s] - q_len + tile0;  // position of the tile's row 0
  const int n_keys = pos0 + rows;                      // keys [0, n_keys) are visible to some row
  const int n_tiles = (n_keys + C::kN - 1) / C::kN;
  const int kvh = h / (a.num_heads / a.num_kv_heads);
  const int32_t* table = a.block_tables + static_cast<size_t>(s) * a.max_blocks_per_seq;
  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int warp_in_wg = (tid >> 5) & 3;
  const int lane = tid & 31;

  const uint32_t sQ = SmemAddr(smem);
  const uint32_t sK0 = sQ + C::kQBytes;
  const uint32_t sV0 = sK0 + kStages * C::kTileBytes;

  // Q tile [kRows, HD] -> shared, core-matrix layout (rows past the sequence's end are zeros).
  {
    const T* q_tile = a.q + static_cast<size_t>(q_begin + tile0) * a.q_stride + h * HD;
#pragma unroll
    for (int it = 0; it < C::kQIters; ++it) {
      const int i = tid + it * C::kThreads;
      if (i < C::kRows * C::kChunks) {
        const int r = i / C::kChunks;
        const int c = i - r * C::kChunks;
        const bool valid = r < rows;
        CpAsync16(sQ + TileOffset<HD>(r, c),
                  valid ? q_tile + static_cast<size_t>(r) * a.q_stride + c * 8 : a.q, valid);
      }
    }
  }
  // K and V tile [kN, HD] of key tile `tile` -> stage `stage`, gathered through the block table;
  // keys >= n_keys and block ids outside [0, num_blocks) become zeros (finite: P = 0 times a NaN V
  // would still poison O). Thread -> (row kv_row, chunks kv_part + i kTpr): a warp-wide copy
  // reads 64 contiguous bytes (two whole sectors) of each of 8 consecutive keys, which within one
  // block are consecutive rows HD elements apart of one contiguous (block, kvh) run
  // (kernels/kv_layout.h): the warp's copies of a tile walk 8-key stretches of the run. (The
  // row-major flat mapping that makes each copy 512 contiguous bytes would put 3-4 rows of HD / 8
  // chunks 128 bytes apart on the same shared-memory banks of the core-matrix layout; this one
  // writes 8 rows x 4 chunks, conflict-free.) The block-table entry of a tile is read one loop
  // iteration before its copies are issued (Lookup, then Issue), so the copies never wait for it.
  const int kv_row = tid / C::kTpr;
  const int kv_part = tid - kv_row * C::kTpr;
  auto lookup = [&](int tile) -> int2 {  // {block id or -1, row in the block}
    const int key = tile * kN + kv_row;
    int blk = -1, in_blk = 0;
    if (key < n_keys) {
      if (a.block_shift >= 0) {
        blk = __ldg(table + (key >> a.block_shift));
        in_blk = key & (a.block_size - 1);
      } else {
        const int b = key / a.block_size;
        blk = __ldg(table + b);
        in_blk = key - b * a.block_size;
      }
    }
    return make_int2(blk, in_blk);
  };
  auto issue = [&](int2 bi, int stage) {
    const bool valid = bi.x >= 0 && bi.x < a.num_blocks;
    const int64_t off = valid ? KvOffset(bi.x, bi.y, kvh, a.block_size, a.num_kv_heads, HD) : 0;
    const uint32_t so = stage * C::kTileBytes;
#pragma unroll
    for (int i = 0; i < C::kKvChunksPerThread; ++i) {
      const int c = kv_part + i * C::kTpr;
      if (C::kChunks % C::kTpr == 0 || c < C::kChunks) {
        const uint32_t dst = so + TileOffset<HD>(kv_row, c);
        CpAsync16(sK0 + dst, a.k_cache + off + c * 8, valid);
        CpAsync16(sV0 + dst, a.v_cache + off + c * 8, valid);
      }
    }
  };
  // Prologue: tiles 0 .. kAhead - 1 in flight, one cp.async group each (the first holds Q too);
  // empty groups past the last tile keep the group count uniform.
#pragma unroll
  for (int st = 0; st < kAhead; ++st) {
    if (st < n_tiles) issue(lookup(st), st);
    CpAsyncCommit();
  }
  int2 next_bi = lookup(kAhead);

  const int g = lane >> 2;
  const int t = lane & 3;
  const int wg_row0 = wg * 64;
  const bool wg_active = wg_row0 < rows;  // uniform over the warpgroup, as wgmma needs
  const int wg_pos_min = pos0 + wg_row0;
  const int wg_pos_max = pos0 + min(wg_row0 + 64, rows) - 1;
  const int row_in_wg = warp_in_wg * 16 + g;  // this thread's first row (second: + 8)
  const uint64_t desc_q = QDesc<HD>(sQ, wg);
  const uint64_t desc_k0 = KDesc<HD>(sK0);
  const uint64_t desc_v0 = VDesc<HD>(sV0);

  float o[kORegs];  // O [64, HD] of the warpgroup, float32, unnormalised
#pragma unroll
  for (int i = 0; i < kORegs; ++i) o[i] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of the scaled scores of the 2 rows
  float l_run[2] = {0.0f, 0.0f};            // running sum of this lane's columns (quad-reduced)

  // S [64, kN] = Q · Kᵀ of the tile in stage_off (raw scores), issued, not waited for.
  auto issue_s = [&](float(&sc)[kSRegs], uint32_t stage_off) {
    IssueS<T, HD>(sc, desc_q, desc_k0, stage_off);
  };
  // O += P · V of the tile in stage_off, issued, not waited for.
  auto issue_pv = [&](const uint32_t(&pa)[kN / 16][4], uint32_t stage_off) {
    IssuePv<T, HD, kN>(o, pa, desc_v0, stage_off);
  };
  // Scores of key tile key0 -> unnormalised probabilities (in place): scale, causal mask (-inf,
  // only on tiles reaching past the warpgroup's first row), online softmax in the log2 domain (a
  // row's 4 owner lanes, one quad, agree on its max); alpha = the rows' rescale factors. Returns
  // whether some row of the warp raised its max.
  auto softmax = [&](float(&sc)[kSRegs], int key0, float(&alpha)[2]) -> bool {
    ScaleAndMask<kN>(sc, a.scale_log2, key0, wg_pos_min, row_in_wg, t);
    bool max_moved = false;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float v[kNTiles];
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) v[n] = fmaxf(sc[4 * n + 2 * hh], sc[4 * n + 2 * hh + 1]);
#pragma unroll
      for (int w = kNTiles / 2; w > 0; w /= 2) {
#pragma unroll
        for (int n = 0; n < w; ++n) v[n] = fmaxf(v[n], v[n + w]);
      }
      float mx = fmaxf(m_run[hh], v[0]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // 2^-inf = 0 on the row's first tile; exactly 1 when the max did not move.
      alpha[hh] = cuda::Exp2Ftz(m_run[hh] - mx);
      max_moved |= alpha[hh] != 1.0f;
      m_run[hh] = mx;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 2 * hh; e < 2 * hh + 2; ++e) sc[4 * n + e] = cuda::Exp2Ftz(sc[4 * n + e] - mx);
        v[n] = sc[4 * n + 2 * hh] + sc[4 * n + 2 * hh + 1];
      }
#pragma unroll
      for (int w = kNTiles / 2; w > 0; w /= 2) {
#pragma unroll
        for (int n = 0; n < w; ++n) v[n] += v[n + w];
      }
      l_run[hh] = l_run[hh] * alpha[hh] + v[0];
    }
    return __any_sync(0xffffffffu, max_moved);
  };
  // O rescaled by the rows' factors (skipped when no row of the warp moved: a multiply by 1).
  auto rescale_o = [&](const float(&alpha)[2]) { RescaleO<HD>(o, alpha); };
  // P rounded to T as register A fragments.
  auto pack_p = [&](const float(&sc)[kSRegs], uint32_t(&pa)[kN / 16][4]) { PackP<T, kN>(sc, pa); };

  {
    // Software-pipelined (FlashAttention-3's intra-warpgroup overlap): iteration j issues
    // S_j = Q K_jᵀ and then O += P_{j-1} V_{j-1}, waits for S_j only, and runs tile j's softmax
    // while the tensor cores work on P_{j-1} V_{j-1}; O is rescaled once that product is in.
    // V_{j-1} is read during iteration j, so the copies issued in iteration j fill the stage of
    // tile j - 2 (kAhead = kStages - 2 tiles ahead). The tiles a warpgroup computes are a prefix
    // [0, n_active) of the block's tiles (the causal diagonal); the wgmma code sits outside any
    // per-tile branch (a branch around it makes ptxas serialise the wgmmas), and the warpgroup
    // keeps joining the block's per-tile barrier for the rest.
    auto tile_head = [&](int j) {  // tile j landed and visible; copies of tile j + kAhead issued
      CpAsyncWait<kAhead - 1>();
      wgmma::FenceProxyAsync();
      __syncthreads();
      if (j + kAhead < n_tiles) issue(next_bi, (j + kAhead) % kStages);
      CpAsyncCommit();
      next_bi = lookup(j + kAhead + 1);
    };
    const int n_active = wg_active ? min(n_tiles, wg_pos_max / kN + 1) : 0;
    int j = 0;
    if (n_active > 0) {
      uint32_t pa[kN / 16][4];
      float sc[kSRegs];
      float alpha[2];
      tile_head(0);
      wgmma::Fence();
      issue_s(sc, 0);
      wgmma::Commit();
      wgmma::Wait<0>();
      wgmma::PinRegisters(sc);
      if (softmax(sc, 0, alpha)) rescale_o(alpha);
      pack_p(sc, pa);
      for (j = 1; j < n_active; ++j) {
        tile_head(j);
        const uint32_t stage_off = (j % kStages) * C::kTileBytes;
        const uint32_t prev_stage_off = ((j - 1) % kStages) * C::kTileBytes;
        wgmma::Fence();
        issue_s(sc, stage_off);
        wgmma::Commit();
        issue_pv(pa, prev_stage_off);
        wgmma::Commit();
        wgmma::Wait<1>();  // S_j in; P_{j-1} V_{j-1} may still run
        wgmma::PinRegisters(sc);
        const bool moved = softmax(sc, j * kN, alpha);
        wgmma::Wait<0>();
        wgmma::PinRegisters(o);
        if (moved) rescale_o(alpha);
        pack_p(sc, pa);
      }
      wgmma::Fence();
      issue_pv(pa, ((n_active - 1) % kStages) * C::kTileBytes);
      wgmma::Commit();
      wgmma::Wait<0>();
      wgmma::PinRegisters(o);
    }
    for (; j < n_tiles; ++j) tile_head(j);
  }
  if (!wg_active) return;

  // out[row, h, :] = O / l.
  StoreO<T, HD>(a, o, l_run, q_begin, tile0, /*row_lo=*/0, rows, wg_row0, row_in_wg, h, t);
#else
  // Built without sm_90a code: PagedAttentionPrefillWgmmaAvailable() is false and this is never
  // launched.
  __trap();
#endif
}

}  // namespace

bool PagedAttentionPrefillWgmmaAvailable() {
#if defined(PHISHARD_HAVE_SM90A)
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  return major == 9 && minor == 0;  // sm_90a code runs on compute capability 9.0 only
#else
  return false;
#endif
}

KernelStatus LaunchPagedAttentionPrefillWgmma(const PagedAttentionParams& p,
                                              const PagedAttentionCudaPlan& plan, int q_stride,
                                              int block_shift, cudaStream_t stream) {
  if (!PagedAttentionPrefillWgmmaAvailable()) return KernelStatus::kInvalidShape;
  return DispatchPrefillHeadDim(
      p,
      [&](auto hd_tag, auto type_tag) {
        constexpr int HD = decltype(hd_tag)::value;
        using T = typename decltype(type_tag)::type;
        return LaunchPrefillWgmmaKernel<WgCfg<HD>>(PrefillWgmmaKernel<T, HD>,
                                                   MakeWgArgs<T>(p, q_stride, block_shift),
                                                   plan.max_q_len, p.num_seqs, stream);
      },
      cuda::WgmmaHeadDims{});  // 32, 64, 80 only: kInvalidShape for the others
}

}  // namespace phishard
