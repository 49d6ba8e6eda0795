// Prefill attention over the paged KV cache on Hopper, warp-specialised (PrefillTiling::kWgmmaWs):
// the problem, shared-memory layout and per-tile math of the wgmma kernel
// (paged_attention_prefill_wgmma.cu), with FlashAttention-3's division of labour.
//
// One block per (pair of query heads, sequence, 192-query tile aligned to the sequence's end), or
// per single head when the grid would be short (WsHeadsPerBlock): 16 warps, 512 threads, 1 block an
// SM. The block's heads run one after the other through the same K/V ring.
//   warpgroup 3 (producer, 128 threads at 80 registers, setmaxnreg): gathers each head's Q tile
//     [192, HD] into its own buffer and every 64-key K/V tile through the block table with
//     cp.async (thread p: half of row p / 2, through L1) into a ring of kStages = 4 stages. Stage
//     st is published on its `full` mbarrier by cp.async.mbarrier.arrive.noinc (each thread
//     arrives once its own copies have landed, so the producer never waits for a copy) and
//     refilled once the 12 consumer warps have arrived on its `empty` mbarrier.
//   warpgroups 0-2 (consumers at 144 registers, query rows [64 w, 64 w + 64) of the block's 192):
//     Q's fragments in registers (loaded from the Q tile once a head), per key tile j S [64, 64]
//     = Q · Kᵀ (HD / 16 wgmma m64n64k16, K from shared memory), online softmax in registers (the
//     scale inside the exponent's FMA), O [64, HD] += P · V (4 wgmma m64nHDk16, P from registers).
// Schedule of a consumer warpgroup, iteration j (1 <= j < n_tiles):
//   wait full[j % 4] -> fence.proxy.async (cp.async writes become visible to wgmma's async proxy)
//   -> wait its turn -> issue S_j, then P_{j-1} · V_{j-1} -> pass the turn -> wait S_j -> softmax
//   of tile j (under P_{j-1} · V_{j-1}) -> wait P_{j-1} · V_{j-1} -> release stage (j - 1) % 4 on
//   empty[] -> rescale O if a row max moved -> pack P_j to registers. A head's last P·V and the
//   next head's S_0 share one turn; the O store runs under that S_0.
// The turns (ping-pong by named barriers kTurnBar + w, bar.sync / bar.arrive of 256 threads: the
// warpgroup and its predecessor) make the three warpgroups issue their products in rotation, so
// the others' softmax runs while one's products occupy the tensor cores. A stage is refilled while
// the consumers work on the 2-3 stages ahead of it: the producer is off the critical path (attn6
// runs 1-2 published stages only after issuing the next tiles, with zero slack, and were
// 1.3-1.5x slower than kWgmma).
//
// Shared memory: 2 x Q [192, HD] + 4 x (K, V) [64, HD] in wgmma's no-swizzle core-matrix layout
// (see the wgmma kernel) + 8 mbarriers: 140 KiB at HD 80. All three warpgroups run every key tile
// of the block (so the turns pair up); a warpgroup's tiles past its causal diagonal are fully
// masked (p = 0; key 0 is in every row's first tile, so no row's max is -inf after tile 0).
// Measured on H200 (docs/perf-log.md 2026-11-30 05:34 / 05:40, PyTorch SDPA in the same call),
// causal bf16, 32 heads, ms: hd 80 1024 0.032 vs cuDNN 0.060; 2048 0.080 (269 TFLOP/s) vs cuDNN
// 0.120; 4096 0.236 vs 0.316; 8192 0.796 (432 TFLOP/s) vs 1.010; 8 x 1024 0.174 vs 0.174; 8 x 2048
// 0.501 vs 0.530; hd 64 2048 0.068 vs 0.096, 4096 0.200 vs 0.203, 8192 0.667 vs 0.660. Session 18's
// steps, each alternated against the one before it: Q in registers and the scale in the FMA
// ×0.94-0.97, two heads a block ×0.95 at 8 x 1k / 8 x 2k, the producer warpgroup plus the shared
// turn ×0.91 at 8 x 2k, L1 copies at hd 64 ×0.72-0.80. kAuto takes it at head dims 64 and 80 from
// 1024 query tokens (PagedAttentionPrefillTiling).
#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_attention_prefill.cuh"
#include "kernels/cuda/paged_attention_prefill_wgmma.cuh"
#include "kernels/cuda/prefill_ptx.cuh"
#include "kernels/cuda/sm90_ptx.cuh"
#include "kernels/cuda/wgmma.cuh"
#include "kernels/kv_layout.h"

namespace phishard {
namespace {

using namespace prefill_ptx;    // NOLINT(build/namespaces): internal PTX wrappers
using namespace prefill_wgmma;  // NOLINT(build/namespaces): the wgmma kernels' shared pieces

template <int HD>
struct WsCfg {
  static_assert(HD % 16 == 0);
  static constexpr int kWarpGroups = 3;  // consumers
  static constexpr int kConsumerThreads = 128 * kWarpGroups;
  // + the producer warpgroup, which copies and gives registers back (setmaxnreg) so the consumers
  // hold kConsumerRegs. With 13 warps (one producer warp), the SM sub-partition holding 4 of them
  // capped every thread at 128 registers, and Q's fragments spilled.
  static constexpr int kProducerThreads = 128;
  static constexpr int kThreads = kConsumerThreads + kProducerThreads;
  static constexpr int kProducerRegs = 80;   // the launch's 128 - 48 ...
  static constexpr int kConsumerRegs = 144;  // ... = 3 x (144 - 128) for every consumer warp
  static_assert(4 * (128 - kProducerRegs) >= 4 * kWarpGroups * (kConsumerRegs - 128));
  static constexpr int kRows = 64 * kWarpGroups;          // query rows per block
  static constexpr int kN = 64;                           // keys per tile
  static constexpr int kStages = 4;                       // K/V ring
  static constexpr int kChunks = HD / 8;                  // 16-byte chunks per row
  static constexpr uint32_t kGroupBytes = kChunks * 128;  // 8 rows x HD: one core matrix a chunk
  static constexpr uint32_t kQBytes = kRows / 8 * kGroupBytes;
  static constexpr uint32_t kTileBytes = kN / 8 * kGroupBytes;
  static constexpr int kMaxItems = 2;  // heads a block (WsArgs::heads_per_block): a Q buffer each
  static constexpr uint32_t kBarOffset =
      kMaxItems * kQBytes + 2 * kStages * kTileBytes;  // Q[], K[], V[]
  static constexpr uint32_t kSmemBytes = kBarOffset + 2 * kStages * 8;        // + full[], empty[]
  static_assert(kN * 2 == kProducerThreads, "a producer thread copies half of one row a tile");
  static_assert(kRows * kChunks % kProducerThreads == 0 && kChunks % 2 == 0);
};

// Named barriers of the turns (0 is __syncthreads'): warpgroup w issues after kTurnBar + w.
constexpr int kTurnBar = 1;

__device__ __forceinline__ void NamedBarSync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void NamedBarArrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// This warp's register allocation lowered / raised to N (setmaxnreg; every warp of a warpgroup
// executes the same one). A raise waits until enough registers were given back.
template <int N>
__device__ __forceinline__ void SetMaxRegsDec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void SetMaxRegsInc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Arrives on `bar` (one of its expected arrivals) once every cp.async this thread issued before
// has landed in shared memory.
__device__ __forceinline__ void CpAsyncMbarArriveNoinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(sm90::SmemAddr(bar))
               : "memory");
}

template <typename T, int HD>
__global__ void __launch_bounds__(WsCfg<HD>::kThreads, 1) PrefillWgmmaWsKernel(const WsArgs<T> a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WsCfg<HD>;
  constexpr int kWG = C::kWarpGroups;
  constexpr int kN = C::kN;
  constexpr int kStages = C::kStages;
  constexpr int kSRegs = kN / 2;    // S accumulators a thread: [64, kN] / 128 threads
  constexpr int kORegs = HD / 2;    // O accumulators a thread
  constexpr int kNTiles = kN / 8;   // n8 slices of S
  constexpr int kPSteps = kN / 16;  // k16 steps of P·V
  static_assert(kN == 64, "S is one m64n64 product a k16 step");
  extern __shared__ __align__(128) unsigned char smem[];

  const int items = a.heads_per_block;  // heads h0, h0 + 1, ... one after the other
  const int h0 = blockIdx.x * items;
  const int s = blockIdx.z;
  const int q_begin = a.cu_q_lens[s];
  const int q_len = a.cu_q_lens[s + 1] - q_begin;
  // Query tiles are aligned to the sequence's end: tile z holds rows [q_len - kRows (z + 1),
  // q_len - kRows z), so a partial tile is the sequence's first, whose causal work is the least
  // (aligned to the start, the partial tile was the last and heaviest: its empty rows ran every
  // key tile): perf-log 2026-11-29 22:31, 3-14 % faster (8 x 1024 0.214 against 0.239 ms, 2048
  // 0.086 against 0.092). Rows before the sequence's start (r < row_lo) load zero queries, see key
  // 0 only (ScaleAndMask clamps their positions) and are not stored. blockIdx.y 0 is the last
  // (heaviest) tile: the grid launches them first. Launching every sequence's tile z together
  // (tiles in the grid's z) was slower at 8 x 1024 / 8 x 2048 (0.226 / 0.648 ms): the blocks in
  // flight then read several sequences' K / V, not one's.
  const int tile_end = q_len - static_cast<int>(blockIdx.y) * C::kRows;
  if (tile_end <= 0) return;
  const int tile0 = tile_end - C::kRows;  // the tile's row 0; negative on a partial first tile
  const int row_lo = max(0, -tile0);      // its first row inside the sequence
  const int pos0 = a.context_lens[s] - q_len + tile0;  // position of the tile's row 0
  const int n_keys = pos0 + C::kRows;                  // keys [0, n_keys) are visible to some row
  const int n_tiles = (n_keys + kN - 1) / kN;
  const int tid = threadIdx.x;

  const uint32_t sQ = SmemAddr(smem);
  const uint32_t sK0 = sQ + C::kMaxItems * C::kQBytes;
  const uint32_t sV0 = sK0 + kStages * C::kTileBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::kBarOffset);  // [kStages]
  uint64_t* empty = full + kStages;                                    // [kStages]
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      sm90::MbarInit(&full[st], C::kProducerThreads);  // every producer thread, copies landed
      sm90::MbarInit(&empty[st], 4 * kWG);  // lane 0 of every consumer warp
    }
  }
  __syncthreads();

  if (tid >= C::kConsumerThreads) {
    // ---- Producer warpgroup. -----------------------------------------------------------------
    SetMaxRegsDec<C::kProducerRegs>();
    // The warpgroup's 128 threads copy: thread p takes row p / 2 of every K/V tile, half its
    // 16-byte chunks (so the copies' issue spreads over the four SM sub-partitions instead of
    // adding one warp's to the sub-partition of consumer warps 0, 4 and 8).
    const int ptid = tid - C::kConsumerThreads;
    const int32_t* table = a.block_tables + static_cast<size_t>(s) * a.max_blocks_per_seq;
    const bool new_kv_in_q = a.store_k != nullptr;
    const int n_cached = a.context_lens[s] - q_len;  // keys before the step's new tokens
    // The cache slot (block id, offset in it) of key position `key` of this sequence.
    auto slot_of = [&](int key, int* in_blk) {
      if (a.block_shift >= 0) {
        *in_blk = key & (a.block_size - 1);
        return __ldg(table + (key >> a.block_shift));
      }
      const int b = key / a.block_size;
      *in_blk = key - b * a.block_size;
      return __ldg(table + b);
    };
    // The block's heads one after the other through the same ring: key tile j of item i is the
    // ring's tile J = i n_tiles + j, so the next head's Q and first tiles load while the consumers
    // finish the last one (its own Q buffer: no reuse at kMaxItems = 2).
    for (int item = 0; item < items; ++item) {
      const int h = h0 + item;
      const int kvh = h / (a.num_heads / a.num_kv_heads);
      const uint32_t sQi = sQ + item * C::kQBytes;
      {  // Q tile [kRows, HD] (rows before the sequence's start are zeros); in tile 0's copy group.
#pragma unroll 3
        for (int k = 0; k < C::kRows * C::kChunks / C::kProducerThreads; ++k) {
          const int idx = ptid + C::kProducerThreads * k;
          const int r = idx / C::kChunks;
          const int c = idx - r * C::kChunks;
          const bool valid = r >= row_lo;
          const T* src =
              valid ? a.q + static_cast<size_t>(q_begin + tile0 + r) * a.q_stride + h * HD + c * 8
                    : a.q;
          CpAsync16(sQi + TileOffset<HD>(r, c), src, valid);
        }
      }
      // Thread p -> row p / 2 of each K/V tile, chunks [c0, c0 + HD / 16) of it (c0 = (p % 2) HD /
      // 16): a warp's copy instruction touches 16 consecutive keys, one (block, kvh) run at block
      // size 16 (kernels/kv_layout.h), 16 bytes in each of their 32 half-sectors. The copies go
      // through L1 (cp.async.ca), so the next instruction's other halves come from there
      // (perf-log 2026-11-29 23:18, hd 80: 2.5-3 % faster at 2048 tokens and 8 x 1024 / 8 x 2048;
      // 2026-11-30 05:37, hd 64 with this mapping: ×0.72-0.80). Earlier mappings: whole rows a
      // lane of one producer warp (2026-11-29 20:30 until session 18: 0.92 ms at hd 80 8192
      // tokens against lane pairs' 1.07); attn6 run 1's (row, chunk) items through a row-pointer
      // table (slower).
      const int r = ptid >> 1;
      const int c0 = (ptid & 1) * (C::kChunks / 2);
      for (int j = 0; j < n_tiles; ++j) {
        const int jr = item * n_tiles + j;  // the ring's tile
        const int st = jr % kStages;
        // The source of row r of key tile j: the block-table read is issued before the wait for
        // the stage (its latency hides under it). Keys >= n_keys and block ids outside [0,
        // num_blocks) become zeros (finite: P = 0 times a NaN V would still poison O); new tokens'
        // K / V come from their q rows when the launch stores them (store_k).
        const int key = j * kN + r;
        int blk = -1, in_blk = 0;
        if (key < n_keys && !(new_kv_in_q && key >= n_cached)) blk = slot_of(key, &in_blk);
        if (jr >= kStages) sm90::MbarWait(&empty[st], ((jr / kStages) - 1) & 1);
        const T* k_src = nullptr;
        const T* v_src = nullptr;
        if (key < n_keys && new_kv_in_q && key >= n_cached) {
          const T* row = a.q + static_cast<size_t>(q_begin + key - n_cached) * a.q_stride;
          k_src = row + a.new_k_col + kvh * HD;
          v_src = row + a.new_v_col + kvh * HD;
        } else if (blk >= 0 && blk < a.num_blocks) {
          const int64_t off = KvOffset(blk, in_blk, kvh, a.block_size, a.num_kv_heads, HD);
          k_src = a.k_cache + off;
          v_src = a.v_cache + off;
        }
        const bool valid = k_src != nullptr;
        const uint32_t so = st * C::kTileBytes;
#pragma unroll
        for (int c = c0; c < c0 + C::kChunks / 2; ++c) {
          const uint32_t dst = so + TileOffset<HD>(r, c);
          CpAsync16Ca(sK0 + dst, valid ? k_src + c * 8 : a.k_cache, valid);
          CpAsync16Ca(sV0 + dst, valid ? v_src + c * 8 : a.v_cache, valid);
        }
        CpAsyncCommit();
        // full[st] counts this thread's arrival once the copies it issued so far (this tile's,
        // and the Q tile's with tile 0) have landed.
        CpAsyncMbarArriveNoinc(&full[st]);
      }
    }
    CpAsyncWaitAll();
    // The tile's own new tokens' K/V into the cache (store_k): by the first query head of each KV
    // head, so every (token, KV head) is stored once; nothing in this launch reads them from the
    // cache (every block reads new keys from the q rows).
    for (int h = h0; h < h0 + items; ++h) {
      if (new_kv_in_q && h % (a.num_heads / a.num_kv_heads) == 0) {
        const int kvh = h / (a.num_heads / a.num_kv_heads);
        StoreNewKvRows<T, HD, C::kProducerThreads>(a, slot_of, ptid, C::kRows - row_lo, kvh,
                                                   pos0 + row_lo, q_begin, tile0 + row_lo);
      }
    }
    return;
  }

  // ---- Consumer warpgroups. ---------------------------------------------------------------------
  SetMaxRegsInc<C::kConsumerRegs>();
  const int wg = tid >> 7;
  const int warp_in_wg = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int wg_row0 = wg * 64;
  const int wg_pos_min = pos0 + wg_row0;
  const int row_in_wg = warp_in_wg * 16 + g;  // this thread's first row (second: + 8)
  const uint64_t desc_k0 = KDesc<HD>(sK0);
  const uint64_t desc_v0 = VDesc<HD>(sV0);

  float o[kORegs];  // O [64, HD] of the warpgroup, float32, unnormalised
  float m_run[2];  // running max of the scores of the 2 rows (raw_scores: unscaled)
  float l_run[2];  // running sum of this lane's columns (quad-reduced)

  // Q [64, HD] of the warpgroup as wgmma A fragments, loaded once the Q tile has landed: S reads
  // only K from shared memory (with Q there too, the three warpgroups' S and P·V products and the
  // producer's copies asked ~115 bytes a cycle of shared memory at the tensor pipe's rate, of 128).
  uint32_t qa[HD / 16][4];
  // S [64, kN] = Q · Kᵀ of the tile in stage st (raw scores), issued, not waited for.
  auto issue_s = [&](float(&sc)[kSRegs], int st) {
    IssueSQReg<T, HD>(sc, qa, desc_k0, st * C::kTileBytes);
  };
  // O += P · V of the tile in stage st, issued, not waited for.
  auto issue_pv = [&](const uint32_t(&pa)[kPSteps][4], int st) {
    IssuePv<T, HD, kN>(o, pa, desc_v0, st * C::kTileBytes);
  };
  // Scores of key tile key0 -> unnormalised probabilities (in place): scale, causal mask (-inf,
  // only on tiles reaching past the warpgroup's first row), online softmax in the log2 domain (a
  // row's 4 owner lanes, one quad, agree on its max); alpha = the rows' rescale factors. Returns
  // whether some row of the warp raised its max.
  // With a positive scale (every model's) the scores stay raw through the mask and the max, and
  // the scale rides in the exponent's FMA: exp2(s f - m f), one instruction a score fewer.
  const bool raw_scores = a.scale_log2 > 0.0f;
  const float f = raw_scores ? a.scale_log2 : 1.0f;
  auto softmax = [&](float(&sc)[kSRegs], int key0, float(&alpha)[2]) -> bool {
    if (raw_scores) {
      CausalMask<kN>(sc, key0, wg_pos_min, row_in_wg, t);
    } else {
      ScaleAndMask<kN>(sc, a.scale_log2, key0, wg_pos_min, row_in_wg, t);
    }
    bool max_moved = false;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float v[kNTiles];
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) v[n] = fmaxf(sc[4 * n + 2 * hh], sc[4 * n + 2 * hh + 1]);
        // Four independent chains, then two levels (a loop nvcc unrolls fully; its halving-tree
        // form at 16 slices went to local memory).
#pragma unroll
      for (int n = 4; n < kNTiles; ++n) v[n & 3] = fmaxf(v[n & 3], v[n]);
      float mx = fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3]));
      mx = fmaxf(m_run[hh], mx);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // 2^-inf = 0 on the row's first tile; exactly 1 when the max did not move.
      alpha[hh] = cuda::Exp2Ftz((m_run[hh] - mx) * f);
      max_moved |= alpha[hh] != 1.0f;
      m_run[hh] = mx;
      const float neg_mf = -mx * f;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 2 * hh; e < 2 * hh + 2; ++e) {
          sc[4 * n + e] = cuda::Exp2Ftz(fmaf(sc[4 * n + e], f, neg_mf));
        }
        v[n] = sc[4 * n + 2 * hh] + sc[4 * n + 2 * hh + 1];
      }
#pragma unroll
      for (int n = 4; n < kNTiles; ++n) v[n & 3] += v[n];
      l_run[hh] = l_run[hh] * alpha[hh] + ((v[0] + v[1]) + (v[2] + v[3]));
    }
    return __any_sync(0xffffffffu, max_moved);
  };
  auto rescale_o = [&](const float(&alpha)[2]) { RescaleO<HD>(o, alpha); };
  // P rounded to T as register A fragments.
  auto pack_p = [&](const float(&sc)[kSRegs], uint32_t(&pa)[kPSteps][4]) { PackP<T, kN>(sc, pa); };
  // Turns: warpgroup wg waits for its turn before issuing products and hands the turn to wg + 1
  // (mod kWG) after. Each warpgroup issues n_tiles + 1 times (S_0; S_j with P_{j-1}·V_{j-1}; the
  // last P·V); the last warpgroup opens warpgroup 0's first turn and skips its last hand-over, so
  // every bar.sync (256 = the waiting warpgroup + the arriving one) meets exactly one bar.arrive.
  const int my_turn = kTurnBar + wg;
  const int next_turn = kTurnBar + (wg + 1) % kWG;
  auto wait_turn = [&] { NamedBarSync(my_turn, 256); };
  auto pass_turn = [&](bool last) {
    if (!last || wg != kWG - 1) NamedBarArrive(next_turn, 256);
  };
  auto release = [&](int st) {  // this warp's products reading stage st are complete
    __syncwarp();
    if (lane == 0) sm90::MbarArrive(&empty[st]);
  };
  if (wg == kWG - 1) NamedBarArrive(kTurnBar, 256);

  uint32_t pa[kPSteps][4];
  float sc[kSRegs];
  float alpha[2];
  // A head's start: O, the row max and the row sum reset.
  auto reset_rows = [&] {
#pragma unroll
    for (int i = 0; i < kORegs; ++i) o[i] = 0.0f;
    m_run[0] = m_run[1] = -INFINITY;
    l_run[0] = l_run[1] = 0.0f;
  };
  // A head's Q fragments, once its first stage (which carries its Q tile) has landed.
  auto load_q = [&](int item) {
    const int j0 = item * n_tiles;
    sm90::MbarWait(&full[j0 % kStages], (j0 / kStages) & 1);
    wgmma::FenceProxyAsync();  // cp.async writes (generic proxy) -> wgmma reads (async proxy)
    LoadQFragments<HD>(sQ + item * C::kQBytes, wg_row0 + row_in_wg, t, qa);
  };
  reset_rows();
  load_q(0);
  wait_turn();
  wgmma::Fence();
  issue_s(sc, 0);
  wgmma::Commit();
  pass_turn(false);
  wgmma::Wait<0>();
  wgmma::PinRegisters(sc);
  softmax(sc, 0, alpha);  // O is still zero: nothing to rescale
  pack_p(sc, pa);
  for (int item = 0; item < items; ++item) {
    const int j0 = item * n_tiles;  // the ring's tile of the item's key tile 0
    for (int j = 1; j < n_tiles; ++j) {
      const int jr = j0 + j;
      const int st = jr % kStages;
      const int prev_st = (jr - 1) % kStages;
      sm90::MbarWait(&full[st], (jr / kStages) & 1);
      wgmma::FenceProxyAsync();
      wait_turn();
      wgmma::Fence();
      issue_s(sc, st);
      wgmma::Commit();
      issue_pv(pa, prev_st);
      wgmma::Commit();
      pass_turn(false);
      wgmma::Wait<1>();  // S_j in; P_{j-1} V_{j-1} may still run
      wgmma::PinRegisters(sc);
      const bool moved = softmax(sc, j * kN, alpha);
      wgmma::Wait<0>();
      wgmma::PinRegisters(o);
      release(prev_st);
      if (moved) rescale_o(alpha);
      pack_p(sc, pa);
    }
    const int last_st = (j0 + n_tiles - 1) % kStages;
    if (item + 1 < items) {
      // The item's last P·V and the next head's S_0 in one turn (the tensor pipe stays fed
      // across the heads; the O store runs under S_0). Q's fragments are loaded first: S_j's
      // reads of them completed at the loop's waits.
      load_q(item + 1);
      wait_turn();
      wgmma::Fence();
      issue_pv(pa, last_st);
      wgmma::Commit();
      issue_s(sc, (j0 + n_tiles) % kStages);
      wgmma::Commit();
      pass_turn(false);
      wgmma::Wait<1>();  // the last P·V in; S_0 may still run
      wgmma::PinRegisters(o);
      release(last_st);
      // out[row, h, :] = O / l, then the next head's O, max and sum.
      StoreO<T, HD>(a, o, l_run, q_begin, tile0, row_lo, C::kRows, wg_row0, row_in_wg, h0 + item,
                    t);
      reset_rows();
      wgmma::Wait<0>();
      wgmma::PinRegisters(sc);
      softmax(sc, 0, alpha);
      pack_p(sc, pa);
    } else {
      wait_turn();
      wgmma::Fence();
      issue_pv(pa, last_st);
      wgmma::Commit();
      pass_turn(true);
      wgmma::Wait<0>();
      wgmma::PinRegisters(o);
      // out[row, h, :] = O / l.
      StoreO<T, HD>(a, o, l_run, q_begin, tile0, row_lo, C::kRows, wg_row0, row_in_wg, h0 + item,
                    t);
    }
  }
#else
  // Built without sm_90a code: PagedAttentionPrefillWgmmaAvailable() is false and this is never
  // launched.
  __trap();
#endif
}

// Heads a block runs one after the other: 2 (the second head's Q and first K/V tiles load under the
// first's last tiles, so a block's start-up latency is paid once for two) when the one-head grid
// would run at least kWsPairMinWaves waves, else 1 (halving a grid of few waves costs more in
// its last wave than the start-ups: perf-log 2026-11-30 05:27, 4096 tokens 5.3 waves ×1.04, 1024
// ×1.6). `forced` (PagedAttentionCudaPlan::prefill_heads_per_block) 1 or 2 wins where the head
// count allows.
constexpr int kWsPairMinWaves = 6;
int WsHeadsPerBlock(int forced, int num_heads, int num_seqs, int max_q_len, int rows, int sms) {
  if (num_heads % 2 != 0) return 1;
  if (forced == 1 || forced == 2) return forced;
  const int64_t blocks =
      static_cast<int64_t>(num_heads) * cuda::CeilDiv(max_q_len, rows) * num_seqs;
  return blocks >= static_cast<int64_t>(kWsPairMinWaves) * std::max(1, sms) ? 2 : 1;
}

}  // namespace

KernelStatus LaunchPagedAttentionPrefillWgmmaWs(const PagedAttentionParams& p,
                                                const PagedAttentionCudaPlan& plan, int q_stride,
                                                int block_shift, cudaStream_t stream) {
  if (!PagedAttentionPrefillWgmmaAvailable()) return KernelStatus::kInvalidShape;
  return DispatchPrefillHeadDim(
      p,
      [&](auto hd_tag, auto type_tag) {
        constexpr int HD = decltype(hd_tag)::value;
        using T = typename decltype(type_tag)::type;
        const int items = WsHeadsPerBlock(plan.prefill_heads_per_block, p.num_heads, p.num_seqs,
                                          plan.max_q_len, WsCfg<HD>::kRows,
                                          plan.num_multiprocessors);
        const WsArgs<T> args{MakeWgArgs<T>(p, q_stride, block_shift),
                             /*store_k=*/static_cast<T*>(plan.store_new_k),
                             /*store_v=*/static_cast<T*>(plan.store_new_v),
                             /*new_k_col=*/p.num_heads * HD,
                             /*new_v_col=*/(p.num_heads + p.num_kv_heads) * HD,
                             /*heads_per_block=*/items};
        return LaunchPrefillWgmmaKernel<WsCfg<HD>>(PrefillWgmmaWsKernel<T, HD>, args,
                                                   plan.max_q_len, p.num_seqs, stream, items);
      },
      cuda::WgmmaHeadDims{});  // 32, 64, 80 only: kInvalidShape for the others
}

}  // namespace phishard
