#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention_dispatch.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/paged_attention_generic_cuda.h"
#include "kernels/cuda/paged_decode_common.cuh"
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/paged_decode_fold.cuh"
#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "kernels/kv_layout.h"

namespace phishard {
namespace paged_decode {

// ------------------------------------------------------------------------------------------------
// Register-staged kernel (PagedDecodeVariant::kRegisterStages; the default before the pipelined
// one): one block per (split, sequence, query head), see the header for its work split.
// kFold (PagedDecodeCudaPlan::fold_rotary): q and the new key come unrotated from the qkv row; the
// block rotates its query head itself and the blocks of the last split (the one holding key
// ctx - 1, the new token) take that key's K/V from shared memory, one of them also storing it to
// the cache (FoldRotate, FoldStoreNew). With merge_counters the last split block to finish merges
// the splits. Registers: the fused form is held to 4 blocks an SM at head_dim >= 80 (128 registers;
// FoldLoad's values took it to 140, so a 512-block b1 grid ran in two waves) and 5 below (hd 64:
// 83-87, was 72); the unfused form is left as it was (minimum 0: no bound).
template <typename T, int HD, bool kBlock16, bool kFold>
__global__ void __launch_bounds__(kThreads, kFold ? (HD >= 80 ? 4 : 5) : 0)
    PagedDecodeKernel(const Args a) {
  using H = Head<HD>;
  __shared__ float s_m[kWarps];
  __shared__ float s_l[kWarps];
  __shared__ float s_acc[kWarps][HD];
  __shared__ std::conditional_t<kFold, FoldSmem<T, HD>, char> fold_sm;
  // PagedDecodeCudaPlan::trigger_dependents_early: a programmatic dependent may launch now (and
  // stream its weights beside the attention; it waits for this grid before reading its output).
  if (a.trigger_early) asm volatile("griddepcontrol.launch_dependents;" :::);
  if (kFold) AttnStamp(a, kAttnTlStart);
  // Beside the decode stream (a.qkv_ready): the blocks past the sequence's split count leave
  // before they wait (they would hold SM slots the working blocks need, spinning); the wait for
  // the q/k/v row comes first (a.preload_stages 0) or after the block's first 1-2 K/V stages are
  // requested (they do not depend on the row: the new key is patched in from shared memory).
  const bool beside = kFold && a.qkv_ready != nullptr;
  const int preload = beside ? a.preload_stages : 0;
  if (beside) {
    const int ctx0 = a.context_lens[blockIdx.y];
    int splits0 = 1;
    if (ctx0 > 0) SplitLen(a, ctx0, &splits0);
    if (ctx0 > 0 && static_cast<int>(blockIdx.x) >= splits0) return;
    if (preload == 0) {
      WaitQkvReady(a.qkv_ready, a.qkv_ready_target);
      AttnStamp(a, kAttnTlReady);
    }
  }
  const int sp = blockIdx.x;
  const int s = blockIdx.y;
  const int h = blockIdx.z;
  // kFold: the new token's qkv elements, requested first (FoldLoad) unless the block waits for
  // them below (after its preloaded stages).
  [[maybe_unused]] std::conditional_t<kFold, FoldIn<T>, int> fold_in{};
  if constexpr (kFold) {
    if (preload == 0) fold_in = FoldLoad<T, HD>(a, s, h);
  }
  const int ctx = a.context_lens[s];
  T* out_row = static_cast<T*>(a.out) + (static_cast<size_t>(s) * a.num_heads + h) * HD;
  if (ctx <= 0) {  // padding row
    if (sp == 0) {
      for (int d = threadIdx.x; d < HD; d += kThreads) out_row[d] = cuda::FromFloat<T>(0.0f);
      if (kFold && a.heads_done != nullptr) CountHeadDone(a.heads_done);
    }
    return;
  }
  int splits = 1;
  const int split_len = SplitLen(a, ctx, &splits);
  if (sp >= splits) return;
  const int k_begin = sp * split_len;
  const int k_end = min(ctx, k_begin + split_len);
  // kFold: the new token's key index in this block's split, else -1.
  const int new_key = kFold && k_end == ctx ? ctx - 1 : -1;
  const int pitch = a.step_info ? a.step_info[1] : a.max_blocks;
  const int32_t* table = a.block_tables + static_cast<size_t>(s) * pitch;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int grp = warp * (32 / kLanesPerKey) + (lane / kLanesPerKey);  // 0..kGroups-1
  const int cl = lane % kLanesPerKey;
  const int kvh = h / a.group;
  // Cache addressing (kernels/kv_layout.h): key `off` of block `blk` of KV head kvh starts at
  // KvOffset(blk, off, kvh, ...) = blk * a.block_elems + KvOffset(0, off, kvh, ...). kBlock16: this
  // group always reads in-block row grp (below), so its offset from the block start is fixed;
  // the 4 groups of a warp read 4 consecutive rows (HD apart) of one contiguous run.
  const int bs = kBlock16 ? 16 : a.block_size;
  const int grp_off =
      kBlock16 ? static_cast<int>(KvOffset(0, grp, kvh, bs, a.num_kv_heads, HD)) : 0;

  // This lane's slices of q (pre-scaled to log2 units): chunk j = cl + 8 i, from q_row (the
  // query head, device, or kFold: the rotated head in shared memory).
  float q[H::kPerLane][8];
  auto load_q = [&](const T* q_row) {
    LoadQSlices<T, HD, kLanesPerKey, H::kPerLane>(q_row, cl, a.scale_log2, true, q);
  };
  if constexpr (!kFold) {
    load_q(static_cast<const T*>(a.q) + static_cast<size_t>(s) * a.q_stride + h * HD);
  }
  float m = -INFINITY, l = 0.0f;
  float acc[H::kPerLane][8];
#pragma unroll
  for (int i = 0; i < H::kPerLane; ++i) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;
  }
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);

  // Stage at k_it: group grp takes keys k_it + grp + kGroups u (u < kUnroll), so with blocks of
  // 16 keys (k_it is a multiple of 16) key u sits in table entry k_it / 16 + u at offset grp.
  // Two stages in registers: the next stage's K/V loads are in flight while this one computes.
  // The loop is uniform over the block (every lane reaches every shuffle); keys past k_end are
  // masked.
  struct Stage {
    uint4 k[kUnroll][H::kPerLane], v[kUnroll][H::kPerLane];
    bool valid[kUnroll];
  };
  auto load = [&](Stage& st, int k_it) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int key = k_it + kGroups * u + grp;
      st.valid[u] = key < k_end;
      int64_t base = 0;  // elements: the key's row of KV head kvh in the cache
      bool in_range = false;
      if (st.valid[u]) {
        int blk;
        if constexpr (kBlock16) {
          blk = table[(k_it >> 4) + u];
          base = static_cast<int64_t>(blk) * a.block_elems + grp_off;
        } else {
          blk = table[key / bs];
          base = KvOffset(blk, key % bs, kvh, bs, a.num_kv_heads, HD);
        }
        // kFold: the new key is not read from the cache (patch below).
        in_range = blk >= 0 && blk < a.num_blocks && (!kFold || key != new_key);
      }
      LoadKvSlices<T, HD, kLanesPerKey, H::kPerLane>(kc, vc, base, cl, in_range, st.k[u], st.v[u]);
    }
  };
  auto compute = [&](const Stage& st) {
    float sc[kUnroll];
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float d = DotSlices<T, H::kPerLane>(q, st.k[u]);
      // Sum over the 8 lanes of the group (lanes outside the head hold zeros).
      d += __shfl_xor_sync(0xffffffffu, d, 1);
      d += __shfl_xor_sync(0xffffffffu, d, 2);
      d += __shfl_xor_sync(0xffffffffu, d, 4);
      sc[u] = st.valid[u] ? d : -INFINITY;
      m_new = fmaxf(m_new, sc[u]);
    }
    // A group may have no key yet (m_new = -inf): then alpha = p = 0 and the state stays empty.
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = m == -INFINITY ? 0.0f : exp2f(m - m_use);
    float p[kUnroll];
    float psum = 0.0f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      p[u] = exp2f(sc[u] - m_use);  // -inf -> 0
      psum += p[u];
    }
    l = l * alpha + psum;
#pragma unroll
    for (int i = 0; i < H::kPerLane; ++i) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][e] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float vf[8];
        Unpack8<T>(st.v[u][i], vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(p[u], vf[e], acc[i][e]);
      }
    }
    m = m_new;
  };
  // kFold: the stage at k_it takes the new key's K/V slices from shared memory.
  auto patch = [&](Stage& st, int k_it) {
    if constexpr (kFold) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (k_it + kGroups * u + grp != new_key) continue;
#pragma unroll
        for (int i = 0; i < H::kPerLane; ++i) {
          const int j = cl + kLanesPerKey * i;
          if (j < H::kChunks) {
            st.k[u][i] = reinterpret_cast<const uint4*>(fold_sm.k)[j];
            st.v[u][i] = reinterpret_cast<const uint4*>(fold_sm.v)[j];
          }
        }
      }
    }
  };
  Stage sa, sb;
  int k_it = k_begin;
  load(sa, k_it);
  bool sb_loaded = false;  // the loop's first sb load was done before the wait
  if (preload > 0) {
    if (preload >= 2 && k_it + kStep < k_end) {
      load(sb, k_it + kStep);
      sb_loaded = true;
    }
    WaitQkvReady(a.qkv_ready, a.qkv_ready_target);
    AttnStamp(a, kAttnTlReady);
    if constexpr (kFold) fold_in = FoldLoad<T, HD>(a, s, h);
  }
  if constexpr (kFold) {  // the rotation overlaps the first stage's loads
    FoldRotate<T, HD>(a, fold_in, new_key >= 0, fold_sm);
    FoldStoreNew<T, HD>(a, fold_in, h, new_key >= 0, bs, fold_sm);
    load_q(fold_sm.q);
  }
  while (true) {
    if (sb_loaded) {
      sb_loaded = false;
    } else if (k_it + kStep < k_end) {
      load(sb, k_it + kStep);
    }
    patch(sa, k_it);
    compute(sa);
    k_it += kStep;
    if (k_it >= k_end) break;
    if (k_it + kStep < k_end) load(sa, k_it + kStep);
    patch(sb, k_it);
    compute(sb);
    k_it += kStep;
    if (k_it >= k_end) break;
  }
  // The next kernel, if a programmatic dependent (the fc1 GEMV), may start its weight prefetch
  // once every block is past its loads; it waits for this grid before reading anything else.
  asm volatile("griddepcontrol.launch_dependents;" :::);
  if (kFold) AttnStamp(a, kAttnTlKeysDone);

  // The 4 groups of the warp (lanes cl, cl + 8, cl + 16, cl + 24 hold the same slices).
  MergeLaneGroups<kLanesPerKey, H::kPerLane>(m, l, acc);
  if (lane < kLanesPerKey) {
    if (lane == 0) {
      s_m[warp] = m;
      s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < H::kPerLane; ++i) {
      const int j = cl + kLanesPerKey * i;
      if (j < H::kChunks) {
#pragma unroll
        for (int e = 0; e < 8; ++e) s_acc[warp][8 * j + e] = acc[i][e];
      }
    }
  }
  __syncthreads();
  // One thread per output dim merges the warps.
  for (int d = threadIdx.x; d < HD; d += kThreads) {
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, s_m[w]);
    float ll = 0.0f, o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      float f;
      Rescale(s_m[w], mm, &f);
      ll = fmaf(s_l[w], f, ll);
      o = fmaf(s_acc[w][d], f, o);
    }
    if (splits == 1) {
      out_row[d] = cuda::FromFloat<T>(o / ll);
    } else {
      const size_t idx = (static_cast<size_t>(s) * a.num_heads + h) * a.max_splits + sp;
      a.partial_o[idx * HD + d] = o / ll;
      if (d == 0) {
        a.partial_ml[idx * 2] = mm;
        a.partial_ml[idx * 2 + 1] = ll;
      }
    }
  }
  if (splits > 1 && a.merge_counters != nullptr) {
    MergeIfLast<T, HD, kFold>(a, s, h, splits);
  } else if (kFold && splits == 1 && a.heads_done != nullptr) {
    CountHeadDone(a.heads_done);
  }
  if (kFold) AttnStamp(a, kAttnTlEnd);
}

// ------------------------------------------------------------------------------------------------
// Pipelined kernel (the default): one block of 4 warps per (KV head x query-head chunk, sequence,
// split). The block serves up to kMaxHeadsPerBlock query heads of one KV head (GQA: K/V are read
// once for the whole group) and walks its keys in kTile-key tiles that cp.async copies into a
// kStages-deep ring of shared-memory stages (kStages - 1 tiles in flight while one is consumed;
// one barrier a tile). Copy roles: thread e of the block copies 16-byte chunks e, e + 128, ... of
// the tile's K and V rows (row = key, one KV head). In the cache (kernels/kv_layout.h) the rows
// of one (block, KV head) are one contiguous run (16 x head_dim x 2 bytes with blocks of 16), so
// chunk e of a tile is chunk e % 16 C of the run of the tile's block e / 16 C: consecutive threads
// copy consecutive 16 bytes of a run (a warp 512 contiguous bytes, or two pieces where it crosses
// into the next block's run).
// Compute roles: with n <= 4 query heads in the block, warp w serves head w / (4 / n) over the
// w % (4 / n)-th slice of each tile's keys (n = 3: warp 3 only copies). A group of 8 query heads
// takes 2 blocks (K/V read twice); one head a warp keeps the state in registers (no spills).
// Inside a warp, 4 groups of 8 lanes take 2 keys each per round (a lane: 16-byte slices cl and
// cl + 8 of the head), or where a head's slices do not fill 8 lanes (head dims 16, 32, 80, 96) 8
// groups of 4 lanes 1 key each (slices cl, cl + 4, cl + 8: PipeLanesPerKey), each group keeping its
// own running max / sum / output. Groups, then warps, are merged at the end. The grid's x (fastest)
// is the KV head, so the blocks in flight at a time read the adjacent runs of all KV heads of the
// same cache blocks (whole blocks, contiguous) of a few sequences.
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

template <typename T, int HD, bool kBlock16, int kTile, int kStages, int kLpk>
__global__ void __launch_bounds__(kThreads, 4) PagedDecodePipeKernel(const Args a) {
  // kLpk lanes a key (PipeLanesPerKey): a lane holds kPL 16-byte slices of the head; a warp round
  // is 8 keys, 2 for each of 4 groups of 8 lanes or 1 for each of 8 groups of 4.
  constexpr int kPL = (HD / 8 + kLpk - 1) / kLpk;
  constexpr int kGw = 32 / kLpk;                    // key groups a warp
  constexpr int kU = kLpk == kLanesPerKey ? 2 : 1;  // keys a group per round
  static_assert(kLpk == 8 || kLpk == 4, "groups of 8 or 4 lanes");
  static_assert(kU * kGw == 2 * (32 / kLanesPerKey), "8 keys a warp round");
  using L = PipeSmem<HD, kTile, kStages>;
  constexpr int C = HD / 8;
  static_assert(kTile % 32 == 0 && kKeysPerIter % kTile == 0, "tiles of whole warp rounds");
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_m[kWarps];
  __shared__ float s_l[kWarps];
  __shared__ float s_acc[kWarps][HD];

  BlockWork<T> bw;  // sequence bw.s, query heads bw.h0 .., keys [bw.k_begin, bw.k_end)
  if (!BlockPrologue<T, HD, kMaxHeadsPerBlock>(a, &bw)) return;
  const int n_tiles = (bw.k_end - bw.k_begin + kTile - 1) / kTile;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const uint32_t smem_base = SmemAddr(smem);

  // Copies tile `t` (keys k_begin + t kTile ...) into stage `st`; keys past k_end and block ids
  // out of range become zeros (masked below by the key index; a bad id reads as zero K/V).
  // kBlock16: this thread's chunks e_i = tid + 128 i of every tile sit at the same row r_i = e_i /
  // C and slice e_i % C, and a tile starts on a 16-key block (k_begin and kTile are multiples of
  // 16), so only the block id changes from tile to tile: the chunk's offset inside its block
  // (KvOffset(0, r_i % 16, kvh, ...) + its slice: the run of KV head kvh, then row r_i % 16 of
  // it) is worked out once here, not per chunk and tile (the address arithmetic was most of the
  // instructions the copies cost an SM).
  constexpr int kTileChunks = kTile * C;
  constexpr int kChunksPerThread = (kTileChunks + kThreads - 1) / kThreads;
  static_assert(kTile % 16 == 0 && kKeysPerIter % 16 == 0, "tiles start on 16-key blocks");
  int c_row[kChunksPerThread];  // row of chunk i in the tile, or kTile when past the tile
  int c_off[kChunksPerThread];  // elements from the row's block start to the chunk
  if constexpr (kBlock16) {
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int e = static_cast<int>(threadIdx.x) + kThreads * i;
      const int r = e / C;
      c_row[i] = e < kTileChunks ? r : kTile;
      c_off[i] =
          static_cast<int>(KvOffset(0, r & 15, bw.kvh, 16, a.num_kv_heads, HD)) + 8 * (e - r * C);
    }
  }
  const int bs = kBlock16 ? 16 : a.block_size;
  auto load_tile = [&](int t, int st) {
    const int key0 = bw.k_begin + t * kTile;
    const uint32_t dst_k = smem_base + static_cast<uint32_t>(st * L::kStageBytes);
    const uint32_t dst_v = dst_k + kTile * C * 16;
    if constexpr (kBlock16) {
      const int32_t* tile_table = bw.table + (key0 >> 4);
#pragma unroll
      for (int i = 0; i < kChunksPerThread; ++i) {
        if (c_row[i] >= kTile) continue;
        const uint32_t dst = (threadIdx.x + kThreads * i) * 16;
        size_t off = 0;
        int bytes = 0;
        if (key0 + c_row[i] < bw.k_end) {
          const int blk = tile_table[c_row[i] >> 4];
          if (blk >= 0 && blk < a.num_blocks) {
            // a.block_elems a 32-bit launch argument: one 32 x 32 -> 64-bit multiply-add.
            off = static_cast<size_t>(static_cast<int64_t>(blk) * a.block_elems + c_off[i]);
            bytes = 16;
          }
        }
        CpAsync16(dst_k + dst, kc + off, bytes);
        CpAsync16(dst_v + dst, vc + off, bytes);
      }
    } else {
#pragma unroll
      for (int e = threadIdx.x; e < kTile * C; e += kThreads) {
        const int r = e / C;
        const int j = e - r * C;
        const int key = key0 + r;
        size_t off = 0;
        int bytes = 0;
        if (key < bw.k_end) {
          const int blk = bw.table[key / bs];
          if (blk >= 0 && blk < a.num_blocks) {
            off = static_cast<size_t>(KvOffset(blk, key % bs, bw.kvh, bs, a.num_kv_heads, HD)) +
                  8 * j;
            bytes = 16;
          }
        }
        CpAsync16(dst_k + e * 16, kc + off, bytes);
        CpAsync16(dst_v + e * 16, vc + off, bytes);
      }
    }
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < n_tiles) load_tile(t, t);
    CpAsyncCommit();
  }

  // Compute roles (see above); all warp-uniform.
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int grp = lane / kLpk;
  const int cl = lane % kLpk;
  const int kw = kWarps / bw.nhb;  // warps sharing one head's keys: 4, 2, 1, 1
  const int slice = warp % kw;
  const int my_head = warp / kw;  // in [0, nhb) or idle
  const bool active = my_head < bw.nhb;
  constexpr int kKeysPerRound = kU * kGw;  // 8: 2 keys for each of 4 groups, or 1 for each of 8
  const int keys_per_warp = kTile / kw;
  const int rounds = keys_per_warp / kKeysPerRound;

  float q[kPL][8];
  SoftmaxState<kPL> S;
  {
    const int h = bw.h0 + (active ? my_head : 0);
    const T* q_row = static_cast<const T*>(a.q) + static_cast<size_t>(bw.s) * a.q_stride + h * HD;
    LoadQSlices<T, HD, kLpk, kPL>(q_row, cl, a.scale_log2, active, q);
#pragma unroll
    for (int i = 0; i < kPL; ++i) {
#pragma unroll
      for (int e = 0; e < 8; ++e) S.acc[i][e] = 0.0f;
    }
  }

  for (int t = 0; t < n_tiles; ++t) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();  // tile t landed for every thread; stage (t - 1) % kStages is free
    if (t + kStages - 1 < n_tiles) load_tile(t + kStages - 1, (t + kStages - 1) % kStages);
    CpAsyncCommit();
    if (!active) continue;
    const uint4* sk =
        reinterpret_cast<const uint4*>(smem + static_cast<size_t>(t % kStages) * L::kStageBytes);
    const uint4* sv = sk + kTile * C;
    const int tile_key0 = bw.k_begin + t * kTile;
    for (int r = 0; r < rounds; ++r) {
      const int kb = slice * keys_per_warp + r * kKeysPerRound + grp;  // keys kb + kGw u
      uint4 kk[kU][kPL], vv[kU][kPL];
      bool valid[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int row = kb + kGw * u;
        valid[u] = tile_key0 + row < bw.k_end;
#pragma unroll
        for (int i = 0; i < kPL; ++i) {
          const int j = cl + kLpk * i;
          kk[u][i] = j < C ? sk[row * C + j] : make_uint4(0, 0, 0, 0);
          vv[u][i] = j < C ? sv[row * C + j] : make_uint4(0, 0, 0, 0);
        }
      }
      {
        float sc[kU];
        float m_new = S.m;
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          float d = 0.0f;
#pragma unroll
          for (int i = 0; i < kPL; ++i) {
            float kf[8];
            Unpack8<T>(kk[u][i], kf);
#pragma unroll
            for (int e = 0; e < 8; ++e) d = fmaf(q[i][e], kf[e], d);
          }
#pragma unroll
          for (int off = 1; off < kLpk; off *= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
          sc[u] = valid[u] ? d : -INFINITY;
          m_new = fmaxf(m_new, sc[u]);
        }
        // Lazy rescale (kRescaleSlack): any reference max gives the same (max, sum, output) state
        // up to rounding, and the group / warp / split merges read it as such.
        if (m_new > S.m + kRescaleSlack) {
          const float alpha = S.m == -INFINITY ? 0.0f : exp2f(S.m - m_new);
          S.l *= alpha;
#pragma unroll
          for (int i = 0; i < kPL; ++i) {
#pragma unroll
            for (int e = 0; e < 8; ++e) S.acc[i][e] *= alpha;
          }
          S.m = m_new;
        }
        const float m_ref = S.m == -INFINITY ? 0.0f : S.m;
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          // -inf -> 0; a weight under 2^-126 (of one >= 2^-8: kRescaleSlack) flushes to 0.
          const float pu = cuda::Exp2Ftz(sc[u] - m_ref);
          S.l += pu;
#pragma unroll
          for (int i = 0; i < kPL; ++i) {
            float v[8];
            Unpack8<T>(vv[u][i], v);
#pragma unroll
            for (int e = 0; e < 8; ++e) S.acc[i][e] = fmaf(pu, v[e], S.acc[i][e]);
          }
        }
      }
    }
  }
  CpAsyncWait<0>();
  // A programmatic dependent may start its prologue once every block is past its loads.
  asm volatile("griddepcontrol.launch_dependents;" :::);

  // Groups of a warp, then the warps sharing a head.
  if (active) {
    MergeLaneGroups<kLpk, kPL>(S.m, S.l, S.acc);
    if (lane < kLpk) {
      if (lane == 0) {
        s_m[warp] = S.m;
        s_l[warp] = S.l;
      }
#pragma unroll
      for (int i = 0; i < kPL; ++i) {
        const int j = cl + kLpk * i;
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

// One block per (sequence, head): out = sum_i w_i o_i / sum_i w_i, w_i = l_i 2^(m_i - max m).
template <typename T, int HD>
__global__ void PagedDecodeMergeKernel(const Args a) {
  const int s = blockIdx.x;
  const int h = blockIdx.y;
  asm volatile("griddepcontrol.launch_dependents;" :::);
  const int ctx = a.context_lens[s];
  if (ctx <= 0) return;
  int splits = 1;
  SplitLen(a, ctx, &splits);
  if (splits <= 1) return;  // the main kernel wrote the output
  MergeSplits<T, HD>(a, s, h, splits, threadIdx.x, blockDim.x);
}

// The largest shared-memory carveout for a kernel launched beside the decode stream (blocks of
// kernels whose carveouts differ never share an SM); setting it also loads the kernel.
KernelStatus PrepareBesideStream(void (*kernel)(Args)) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100) ==
                 cudaSuccess
             ? KernelStatus::kOk
             : KernelStatus::kDeviceError;
}

// PagedDecodeCuda's body (in this namespace with its kernels).
KernelStatus Run(const PagedAttentionParams& p, const PagedDecodeCudaPlan& plan,
                 cudaStream_t stream, int* splits_bound) {
  if (splits_bound) *splits_bound = 0;
  if (p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) {
    return KernelStatus::kUnsupportedDtype;
  }
  if (p.num_seqs < 0 || p.num_tokens != p.num_seqs || p.num_heads <= 0 || p.num_kv_heads <= 0 ||
      p.block_size <= 0 || p.num_blocks < 0 || p.max_blocks_per_seq < 0 ||
      p.num_heads % p.num_kv_heads != 0 || !PagedDecodeCudaSupportsHeadDim(p.head_dim)) {
    return KernelStatus::kInvalidShape;
  }
  const int q_stride = p.q_stride == 0 ? p.num_heads * p.head_dim : p.q_stride;
  if (q_stride < p.num_heads * p.head_dim || q_stride % 8 != 0) return KernelStatus::kInvalidShape;
  // Args::block_elems (one cache block of all KV heads) is 32-bit.
  if (KvBlockElems(p.block_size, p.num_kv_heads, p.head_dim) > INT32_MAX) {
    return KernelStatus::kInvalidShape;
  }
  if (p.num_seqs == 0) return KernelStatus::kOk;
  if (!p.q || !p.k_cache || !p.v_cache || !p.out || !p.context_lens || !p.block_tables) {
    return KernelStatus::kNullPointer;
  }
  if (reinterpret_cast<uintptr_t>(p.q) % 16 || reinterpret_cast<uintptr_t>(p.k_cache) % 16 ||
      reinterpret_cast<uintptr_t>(p.v_cache) % 16) {
    return KernelStatus::kInvalidShape;
  }
  if (plan.fold_rotary) {
    if (KernelStatus st = CheckFoldedRotary(p, q_stride, plan.rotary); st != KernelStatus::kOk) {
      return st;
    }
  }
  if (plan.merge_counters != nullptr &&
      plan.merge_counters_len < static_cast<size_t>(p.num_seqs) * p.num_heads) {
    return KernelStatus::kInvalidShape;
  }
  int max_splits = plan.max_splits > 0 ? plan.max_splits
                                       : PagedDecodeCudaMaxSplits(p.num_seqs, p.num_heads,
                                                                  plan.num_multiprocessors);
  max_splits = std::min(max_splits, kPagedDecodeMaxSplits);
  while (max_splits > 1 && (plan.workspace == nullptr ||
                            PagedDecodeCudaWorkspaceBytes(p.num_seqs, p.num_heads, p.head_dim,
                                                          max_splits) > plan.workspace_bytes)) {
    --max_splits;
  }
  if (splits_bound) *splits_bound = max_splits;
  Args a;
  a.q = p.q;
  a.k_cache = p.k_cache;
  a.v_cache = p.v_cache;
  a.out = p.out;
  a.partial_o = static_cast<float*>(plan.workspace);
  a.partial_ml = max_splits > 1 ? a.partial_o + static_cast<size_t>(p.num_seqs) * p.num_heads *
                                                    max_splits * p.head_dim
                                : nullptr;
  a.context_lens = p.context_lens;
  a.block_tables = p.block_tables;
  a.step_info = plan.step_info;
  a.num_seqs = p.num_seqs;
  a.max_blocks = p.max_blocks_per_seq;
  a.num_blocks = p.num_blocks;
  a.block_size = p.block_size;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.group = p.num_heads / p.num_kv_heads;
  a.block_elems = static_cast<int>(KvBlockElems(p.block_size, p.num_kv_heads, p.head_dim));
  a.q_stride = q_stride;
  a.max_splits = max_splits;
  // Beside the decode stream the attention shares the SMs with the stream's blocks: 2 blocks an
  // SM, not 4 (b1 ctx 1024: 8 splits of 32 heads 1.583 ms a step against 16 splits 1.654, perf-log
  // 2026-11-30 19:5x).
  a.target_blocks = (plan.qkv_ready != nullptr ? 2 : 4) * std::max(plan.num_multiprocessors, 1);
  a.scale_log2 = p.scale * kLog2e;
  const bool mma = plan.variant == PagedDecodeVariant::kTensorCore;
  const bool warp_heads = plan.variant == PagedDecodeVariant::kWarpPerHead;
  const int heads_per_block = mma ? kMmaHeadsPerBlock : kMaxHeadsPerBlock;
  a.head_chunks = (a.group + heads_per_block - 1) / heads_per_block;
  // Small MHA grids go to the register-staged kernel (see the header).
  const bool registers = plan.variant == PagedDecodeVariant::kRegisterStages ||
                         (plan.variant == PagedDecodeVariant::kAuto && a.group == 1 &&
                          static_cast<int64_t>(p.num_seqs) * p.num_heads * max_splits <
                              16 * static_cast<int64_t>(std::max(plan.num_multiprocessors, 1)));
  a.blocks_per_seq = registers    ? p.num_heads
                     : warp_heads ? (p.num_heads + kWarps - 1) / kWarps
                                  : p.num_kv_heads * a.head_chunks;
  // The fused form (register-staged kernel): rotary + K/V write inside, and the merge where
  // counters are given. The pipelined kernel runs the rotary launch before it, as unfused.
  const bool fold = plan.fold_rotary && registers;
  a.positions = plan.rotary.positions;
  a.slots = plan.rotary.slots;
  a.k_cache_w = plan.rotary.k_cache;
  a.v_cache_w = plan.rotary.v_cache;
  a.num_slots = plan.rotary.num_slots;
  a.rotary_dim = plan.rotary.rotary_dim;
  a.theta = plan.rotary.theta;
  a.merge_counters = registers ? plan.merge_counters : nullptr;
  a.trigger_early = plan.trigger_dependents_early || plan.qkv_ready != nullptr;
  a.qkv_ready = plan.qkv_ready;
  a.qkv_ready_target = plan.qkv_ready_target;
  a.heads_done = plan.heads_done;
  a.preload_stages = std::clamp(plan.preload_stages, 0, 2);
  a.timeline = plan.qkv_ready != nullptr ? plan.timeline : nullptr;
  a.timeline_blocks = plan.timeline_blocks;
  // Beside the decode stream: only the register-staged fused form with its own merge, one
  // sequence, spins and counts (see the plan).
  if ((plan.heads_done != nullptr && plan.qkv_ready == nullptr) ||
      (plan.qkv_ready != nullptr && (!fold || plan.merge_counters == nullptr || p.num_seqs != 1))) {
    return KernelStatus::kInvalidShape;
  }
  if (plan.fold_rotary && !registers) {
    if (KernelStatus st = RotaryKvWriteCuda(plan.rotary, stream); st != KernelStatus::kOk) {
      return st;
    }
  }
  return cuda::DispatchAttentionHeadDim(p.head_dim, [&](auto hd_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (mma || warp_heads) {
        if (KernelStatus st = mma ? LaunchPagedDecodeMma(a, HD, p.dtype, stream)
                                  : LaunchPagedDecodeWarp(a, HD, p.dtype, stream);
            st != KernelStatus::kOk) {
          return st;
        }
      } else if (registers) {
        const dim3 grid(max_splits, p.num_seqs, p.num_heads);
        auto kernel = p.block_size == 16 ? (fold ? PagedDecodeKernel<T, HD, true, true>
                                                 : PagedDecodeKernel<T, HD, true, false>)
                                         : (fold ? PagedDecodeKernel<T, HD, false, true>
                                                 : PagedDecodeKernel<T, HD, false, false>);
        if (a.qkv_ready != nullptr) {  // beside the decode stream (see the plan)
          if (KernelStatus st = PrepareBesideStream(kernel); st != KernelStatus::kOk) return st;
          if (KernelStatus st =
                  cuda::LaunchMaybeProgrammatic(kernel, grid, dim3(kThreads), 0, stream, true, a);
              st != KernelStatus::kOk) {
            return st;
          }
        } else {
          kernel<<<grid, kThreads, 0, stream>>>(a);
        }
      } else {
        const dim3 grid(a.blocks_per_seq, p.num_seqs, max_splits);
        KernelStatus st = KernelStatus::kOk;
        auto launch = [&](auto kernel, size_t smem) {
          // Static shared memory (the merge scratch) counts against the 48 KiB default too.
          if (smem + 4096 > 48 * 1024 &&
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem)) != cudaSuccess) {
            st = KernelStatus::kDeviceError;
            return;
          }
          kernel<<<grid, kThreads, smem, stream>>>(a);
        };
        // 32-key tiles x 4 stages: 64 x 3 and 32 x 6 measured 3-14% slower at b256 (perf-log).
        constexpr int kLpk = PipeLanesPerKey(HD);
        if (p.block_size == 16) {
          launch(PagedDecodePipeKernel<T, HD, true, 32, 4, kLpk>, PipeSmem<HD, 32, 4>::kBytes);
        } else {
          launch(PagedDecodePipeKernel<T, HD, false, 32, 4, kLpk>, PipeSmem<HD, 32, 4>::kBytes);
        }
        if (st != KernelStatus::kOk) return st;
      }
      if (KernelStatus st = cuda::LaunchStatus();
          st != KernelStatus::kOk || max_splits == 1 || a.merge_counters != nullptr) {
        return st;
      }
      PagedDecodeMergeKernel<T, HD><<<dim3(p.num_seqs, p.num_heads), 96, 0, stream>>>(a);
      return cuda::LaunchStatus();
    });
  });
}

}  // namespace paged_decode

bool PagedDecodeCudaSupportsHeadDim(int head_dim) {
  return cuda::AttentionHeadDims::Contains(head_dim);
}

int PagedDecodeCudaMaxSplits(int min_live_seqs, int num_heads, int num_multiprocessors) {
  const int per_split = std::max(min_live_seqs, 1) * std::max(num_heads, 1);
  const int target = 4 * std::max(num_multiprocessors, 1);
  return std::clamp((target + per_split - 1) / per_split, 1, kPagedDecodeMaxSplits);
}

size_t PagedDecodeCudaWorkspaceBytes(int num_seqs, int num_heads, int head_dim, int max_splits) {
  if (max_splits <= 1) return 0;
  return static_cast<size_t>(num_seqs) * num_heads * max_splits * (head_dim + 2) * sizeof(float);
}

KernelStatus PagedDecodeCuda(const PagedAttentionParams& p, const PagedDecodeCudaPlan& plan,
                             cudaStream_t stream, int* splits_bound) {
  if (!PagedDecodeCudaSupportsHeadDim(p.head_dim)) {
    // A head dim of no tuned kernel: the generic one, after the folded rotary as its own launch
    // (the same checks as the fused form's); never beside the decode stream.
    if (splits_bound) *splits_bound = 1;
    if (plan.qkv_ready != nullptr || plan.heads_done != nullptr || p.num_tokens != p.num_seqs) {
      return KernelStatus::kInvalidShape;
    }
    if (plan.fold_rotary) {
      if (p.block_size <= 0) return KernelStatus::kInvalidShape;
      const int q_stride = p.q_stride == 0 ? p.num_heads * p.head_dim : p.q_stride;
      if (KernelStatus st = paged_decode::CheckFoldedRotary(p, q_stride, plan.rotary);
          st != KernelStatus::kOk) {
        return st;
      }
      if (KernelStatus st = RotaryKvWriteCuda(plan.rotary, stream); st != KernelStatus::kOk) {
        return st;
      }
    }
    PagedAttentionParams one_row = p;
    one_row.cu_q_lens = nullptr;  // row s = sequence s
    return PagedAttentionGenericCuda(one_row, nullptr, nullptr, plan.step_info, stream);
  }
  return paged_decode::Run(p, plan, stream, splits_bound);
}

KernelStatus PagedDecodeCudaPrepareBesideStream(int head_dim, DataType dtype) {
  if (!PagedDecodeCudaSupportsHeadDim(head_dim)) return KernelStatus::kInvalidShape;
  return cuda::DispatchAttentionHeadDim(head_dim, [&](auto hd_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    return cuda::DispatchHalfTypes(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const KernelStatus st =
          paged_decode::PrepareBesideStream(paged_decode::PagedDecodeKernel<T, HD, true, true>);
      return st != KernelStatus::kOk ? st
                                     : paged_decode::PrepareBesideStream(
                                           paged_decode::PagedDecodeKernel<T, HD, false, true>);
    });
  });
}

}  // namespace phishard
