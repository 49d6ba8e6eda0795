// phishard_layer_probe: the 1-row decode layer as ONE persistent weight stream with the attention
// beside it as a concurrent kernel, chained over 32 layers of distinct weights (measurement only;
// docs/performance.md, decode b1). It answers: at what time a layer does that design run, against
// the 53-57 us of today's op-by-op b1 layer and the ~38 us of its bytes at the copy bandwidth?
//
// Why (bench/mlp_probe.cu, perf-log 2026-11-30 session 27): fc1 -> GELU -> fc2 through one
// shared-memory ring of bulk copies streams 4.6 TB/s in steady state, but each launch pays ~9 us of
// start, ramp and tail. So the layer is one launch (LayerStream) whose blocks (one an SM) take
// items from a counter, in order: q/k/v chunks (R rows: dot with LN(x), + bias -> qkv), MLP chunks
// (fc1 rows then the same rows of fc2's transposed weight: g[r] * w2t[r, :] into float32
// registers), dense chunks (R rows of dense's transposed weight times the attention output o). Each
// block's float32 partial output is added into acc at its end. The next layer's blocks fold the
// residual and the LayerNorm into their start (h + acc, every block, while its producer already
// streams). The attention (a one-shot form: every K/V row of its block requested at its start,
// before q exists) is launched as a programmatic dependent of LayerStream, which lets it start at
// once: it waits for the layer's q/k/v through a counter (not griddepcontrol.wait, which would wait
// for the whole stream), and LayerStream's dense chunks wait for its heads-done counter. Every wait
// is on a kernel whose blocks are all resident (LayerStream's 132 blocks start first, the
// attention's launch needs all of them started), so none can deadlock.
//
// Both kernels ask for the largest shared-memory carveout: without it the attention's blocks never
// ran beside LayerStream's (kernels whose carveouts differ do not share an SM) and the first
// version deadlocked.
//
// Forms (each a whole 32-layer step, alternated in rounds): one LayerStream launch a layer, plain
// or as a programmatic dependent of the kernel before it (its producer streams the next layer's
// weights while this layer drains; its consumers wait for the layer before through a counter);
// one launch a step (LayerStream over all layers, the ring running across layer boundaries) with
// a persistent attention kernel beside it (StepAttn), with the attention as items of the stream
// itself (K/V through the ring), or with 4 attention warps in every block (their own cp.async K/V
// and named barrier, beside the weight consumers); the block partial sums into 1 / 4 / 16 copies of
// acc (fewer blocks adding into one address); q/k/v rows ordered by head with per-head ready
// counters. A profile (clock64 per block and layer) splits a step form's consumer time. Measured
// (perf-log 2026-11-30 18:2x-18:3x, session 27; us a layer, ctx 1024): the stream alone 45-46 (a
// launch a layer), 43.8-45.7 (PDL), 41.3-42.4 (one launch a step, 4 stages, 4 acc copies); with the
// attention: 47.2-48.9 (a launch a layer + PDL + the attention as dependent), 50-58 (persistent
// StepAttn), 83-97 (attention items in the stream: their latency chains stall the consumers), 58-68
// with the attention warps, 64-key items a block or 32-key items a warp (46.3-49 when dense does
// not wait for them: the attention's own cost beside the stream is ~3 us a layer, and its items end
// 8-20 us after the MLP chunks). Today's op-by-op b1 layer: ~55.
//
// Shape: Phi-2's layer (K = 2560, 32 heads x 80, I = 10240, bf16; 157 MB of weights + 10.5 MB of
// K/V at ctx 1024), 32 layers with distinct weights (5 GB: no L2 reuse between layers). The probe
// has no rotary and no new-row K/V store (the real attention adds them after q arrives), and its
// outputs are not checked against a reference beyond finiteness (bench/mlp_probe.cu checks the
// MLP's arithmetic).
// Usage: phishard_layer_probe [ctx (default 1024)] [pdl (only the best forms)]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/bench_device.h"
#include "kernels/cuda/gelu_math.cuh"
#include "kernels/cuda/sm90_ptx.cuh"

namespace phishard::bench {
namespace {

constexpr const char* kProg = "phishard_layer_probe";
constexpr int kHd = 80, kBs = 16, kAttnThreads = 128;

#define LP_CHECK(call)                                                           \
  do {                                                                           \
    const cudaError_t e = (call);                                                \
    if (e != cudaSuccess) {                                                      \
      std::fprintf(stderr, "%s: %s: %s\n", kProg, #call, cudaGetErrorString(e)); \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)

using bf16 = __nv_bfloat16;

// Counters of one layer (zeroed at the chain's start).
// kHeadReady + h: q/k/v chunks of head h written (per-head q/k/v order).
enum {
  kNext = 0,
  kBlocksDone = 1,
  kQkvDone = 2,
  kHeadsDone = 3,
  kAttnNext = 4,
  kReduced = 5,  // blocks that reduced their columns of the slots (slot sums)
  kFc1Done = 6,  // fc1 chunks written (owner form)
  kHeadReady = 8,
  kCounters = 48
};
// Per (layer, block) cycle counts of LayerStream (prof != null): the LayerNorm fold (its wait for
// the layer before included), the consumers' waits for a stage, the wait for the attention, the
// flush, the layer's whole consumer time, items taken, the producer's waits for a free slot.
enum {
  kProfLn = 0,
  kProfFullWait,
  kProfAttnWait,
  kProfFlush,
  kProfLayer,
  kProfItems,
  kProfEmptyWait,
  kProf = 8
};

struct LayerArgs {
  const bf16* h_in;     // [K] residual before this layer
  const float* acc_in;  // [copies, K] the previous layer's output sums, or null (first layer)
  bf16* h_out;          // [K] h_in + acc_in (block 0 writes it)
  const bf16* ln_w;     // [K]
  const bf16* ln_b;     // [K]
  const bf16* wqkv;     // [NQ, K]
  const bf16* bqkv;     // [NQ]
  bf16* qkv;            // [NQ]
  const bf16* w1;       // [I, K]
  const bf16* b1;       // [I]
  const bf16* w2t;      // [I, K] fc2.weight transposed
  const bf16* wdt;      // [K, K] dense.weight transposed
  const bf16* o;        // [K] the attention's output
  float* acc;           // [copies, K] zero; this layer's output sums (block b adds into b % copies)
  int acc_copies;       // fewer blocks adding into each address: less atomic contention
  bool fixed_point;     // acc as int64 (x 2^24): integer atomics, so the sums are deterministic
  // Slot sums (deterministic, no atomics): each block stores its partial into slots[block]; the
  // next layer's blocks each sum their K / grid columns over the slots in a fixed order into
  // colsum, count kReduced of the layer, and wait for every block's columns before the LayerNorm.
  float* slots;       // [grid, K] this layer's (null: atomics into acc)
  float* colsum;      // [K] this layer's
  float* prev_slots;  // the previous layer's, or null
  float* prev_colsum;
  int* ctr;             // [kCounters] this layer's
  const int* prev_ctr;  // the previous layer's, or null
  int q_chunks, m_chunks, d_chunks, heads;
  bool wait_attention;  // false: dense chunks do not wait (the stream alone)
  // q/k/v rows ordered by head ([q_h; k_h; v_h], head_chunks chunks a head): each chunk counted
  // into its head's kHeadReady counter, so the attention of a head starts once its rows are out.
  bool per_head;
  int head_chunks;
  // Attention items in the stream (attn_items > 0): after m_first MLP chunks come attn_items
  // (head, split) items of kAttnKeys keys, whose q, K and V the producer bulk-copies into the
  // ring like weights (no second kernel); each writes its split's partial, the last split of a
  // head merges into o and counts kHeadsDone.
  int attn_items, m_first, splits;
  const bf16* kc;  // [blocks, heads, 16, 80]
  const bf16* vc;
  const int32_t* ctx_len;
  const int32_t* table;
  int max_blocks;
  float scale_log2;
  float* partials;  // [heads, splits, 82]
  int* split_ctr;   // [heads] zero
  // Attention warps in every block (aw_items > 0; launched with kAttnWarps more warps): aw_items
  // (head, split) items of kAttnKeys keys taken from kAttnNext by each block's attention warps,
  // which run beside its weight consumers (their own K/V loads and barriers; nothing in the ring).
  int aw_items;
  int aw_mode;  // 1: the 4 warps take 64-key items together; 2: each warp its own 32-key item
  int d_rows;   // rows a dense item (R, or R / 2: a finer tail at the layer's end)
  // Owner form (docs/decode-stream-design.md): fc1 chunks write g = GELU(fc1) rounded into g;
  // fc2 items take 2 rows of fc2's weight as stored ([K, I], the w2t region read that way), each
  // warp a fifth of a row, the fifths summed in a fixed order (+ bias) into mlp_out; dense items
  // take R rows of dense's weight as stored times o (+ bias) into attn_out; no cross-block sums.
  // The next layer's fold: h = (attn_out + mlp_out) + h in HF's order and roundings.
  bool owner;
  bf16* g;               // [I]
  bf16* mlp_out;         // [K]
  bf16* attn_out;        // [K]
  const bf16* prev_mlp;  // the previous layer's, or null
  const bf16* prev_attn;
};
constexpr int kAttnKeys = 64;
constexpr float kFixedScale = 16777216.0f;  // 2^24: fixed_point sums

// Item kinds of a layer, in stream order: q/k/v chunks, the first m_first MLP chunks, attention
// items, the other MLP chunks, dense chunks, then the end.
enum ItemKind { kItemQkv, kItemMlp, kItemAttn, kItemDense, kItemEnd, kItemFc1, kItemFc2 };
struct Item {
  ItemKind kind;
  int idx;
};
__device__ __forceinline__ Item Classify(const LayerArgs& a, int item) {
  if (a.owner) {  // q/k/v, fc1 (m_chunks), fc2 (K / 2 items of 2 rows), dense (d_chunks)
    if (item < a.q_chunks) return {kItemQkv, item};
    item -= a.q_chunks;
    if (item < a.m_chunks) return {kItemFc1, item};
    item -= a.m_chunks;
    if (item < a.d_chunks * a.d_rows / 2) return {kItemFc2, item};
    item -= a.d_chunks * a.d_rows / 2;
    if (item < a.d_chunks) return {kItemDense, item};
    return {kItemEnd, 0};
  }
  const int m1 = a.attn_items > 0 ? a.m_first : a.m_chunks;
  if (item < a.q_chunks) return {kItemQkv, item};
  item -= a.q_chunks;
  if (item < m1) return {kItemMlp, item};
  item -= m1;
  if (item < a.attn_items) return {kItemAttn, item};
  item -= a.attn_items;
  if (item < a.m_chunks - m1) return {kItemMlp, m1 + item};
  item -= a.m_chunks - m1;
  if (item < a.d_chunks) return {kItemDense, item};
  return {kItemEnd, 0};
}

__device__ __forceinline__ int LoadAcquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Spins until *p >= target; traps after ~4 s (a probe bug must end in an error, not a hang).
__device__ __forceinline__ void WaitAtLeast(const int* p, int target) {
  for (long long n = 0; LoadAcquire(p) < target; ++n) {
    if (n > (1ll << 26)) __trap();
    __nanosleep(32);
  }
}

#include "bench/layer_probe_parts.cuh"

// `num_layers` consecutive layers (1: one launch a layer; 32: the whole step in one launch, the
// producer streaming the next layer's weights while the consumers finish this one). A layer ends,
// for a block, with a stage whose item is -1: its sums go out, then its blocks-done count.
template <int KC>
__global__ void __launch_bounds__(32 * KC + 32 + 32 * kAttnWarps, 1)
    LayerStream(const LayerArgs* __restrict__ layers, int num_layers, int S,
                long long* __restrict__ prof) {
  constexpr int K = 256 * KC, R = KC, kConsumers = 32 * KC;
  constexpr uint32_t kStageBytes = R * K * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ring = reinterpret_cast<bf16*>(smem);        // [S, R, K]
  bf16* sx = ring + static_cast<size_t>(S) * R * K;  // [K] LN(h)
  float* sb = reinterpret_cast<float*>(sx + K);      // [S, R] the stage's biases
  float* sg = sb + S * R;                            // [2, R]
  float* sred = sg + 2 * R;                          // [2, 32]
  float* sp = sred + 64;                             // [kAttnKeys] probabilities
  float* sq = sp + kAttnKeys;                        // [80] q of an attention item
  int* sflag = reinterpret_cast<int*>(sq + kHd);     // [4]
  int* item_of = sflag + 4;                          // [S]
  uint64_t* full = reinterpret_cast<uint64_t*>(item_of + ((S + 1) & ~1));
  uint64_t* empty = full + S;
  // Owner form: g [4 K] and o [K] (bf16), the fc2 fifths [10] (after the barriers, 16-aligned).
  bf16* sgi =
      reinterpret_cast<bf16*>((reinterpret_cast<uintptr_t>(empty + S) + 15) & ~uintptr_t{15});
  bf16* so = sgi + 4 * K;
  float* sfifth = reinterpret_cast<float*>(so + K);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  asm volatile("griddepcontrol.launch_dependents;" :::);  // the attention may start now
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      sm90::MbarInit(&full[s], 1);
      sm90::MbarInit(&empty[s], KC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp > KC) {  // attention warps (launched only for aw_items forms)
    const uintptr_t end = reinterpret_cast<uintptr_t>(empty + S);
    unsigned char* at_smem = reinterpret_cast<unsigned char*>((end + 15) & ~uintptr_t{15});
    if (layers[0].aw_mode == 2) {
      AttentionWarpItems(layers, num_layers, at_smem, warp - (KC + 1), lane);
    } else {
      AttentionWarps(layers, num_layers, at_smem, tid - 32 * (KC + 1));
    }
    return;
  }
  if (warp == KC) {  // producer: weights never depend on the layer before, so no wait here
    int it = 0;
    for (int l = 0; l < num_layers; ++l) {
      const LayerArgs& a = layers[l];
      long long empty_wait = 0;
      for (;;) {
        int item = 0;
        if (lane == 0) item = atomicAdd(&a.ctr[kNext], 1);
        item = __shfl_sync(0xffffffffu, item, 0);
        const Item c = Classify(a, item);
        const int halves = c.kind == kItemMlp ? 2 : 1;
        for (int half = 0; half < halves; ++half, ++it) {
          const int s = it % S;
          if (it >= S) {
            const long long t0 = clock64();
            sm90::MbarWait(&empty[s], ((it / S) & 1) ^ 1);
            empty_wait += clock64() - t0;
          }
          bf16* dst = ring + static_cast<size_t>(s) * R * K;
          if (c.kind == kItemEnd) {  // this layer's end for this block
            if (lane == 0) {
              item_of[s] = -1;
              sm90::MbarArrive(&full[s]);
            }
            continue;
          }
          if (c.kind == kItemAttn) {  // the split's K and V blocks (q: the consumers, later)
            const int h = c.idx / a.splits, split = c.idx % a.splits;
            constexpr int kBlk = kAttnKeys / kBs;
            const int b = split * kBlk + lane;
            const int phys = lane < kBlk && b < a.max_blocks ? __ldg(a.table + b) : -1;
            const int nblk = __popc(__ballot_sync(0xffffffffu, phys >= 0));
            const uint32_t blk_bytes = kBs * kHd * 2;
            if (lane == 0) {
              item_of[s] = item;
              sm90::MbarExpect(&full[s], 2 * nblk * blk_bytes);
            }
            __syncwarp();
            if (phys >= 0) {
              const size_t off = (static_cast<size_t>(phys) * a.heads + h) * kBs * kHd;
              bf16* sk = dst + lane * kBs * kHd;
              sm90::BulkLoad(sk, a.kc + off, blk_bytes, &full[s]);
              sm90::BulkLoad(sk + kAttnKeys * kHd, a.vc + off, blk_bytes, &full[s]);
            }
            continue;
          }
          const bf16* src;
          if (c.kind == kItemFc1) {
            src = a.w1 + static_cast<size_t>(c.idx) * R * K;
            if (lane < R) sb[s * R + lane] = __bfloat162float(a.b1[c.idx * R + lane]);
          } else if (c.kind == kItemFc2) {  // 2 rows of [K, I]; I = 4 K here (Phi-2)
            src = a.w2t + static_cast<size_t>(c.idx) * 2 * (4 * K);
          } else if (c.kind == kItemQkv) {
            src = a.wqkv + static_cast<size_t>(c.idx) * R * K;
            if (lane < R) sb[s * R + lane] = __bfloat162float(a.bqkv[c.idx * R + lane]);
          } else if (c.kind == kItemMlp) {
            src = (half == 0 ? a.w1 : a.w2t) + static_cast<size_t>(c.idx) * R * K;
            if (half == 0 && lane < R) sb[s * R + lane] = __bfloat162float(a.b1[c.idx * R + lane]);
          } else {
            src = a.wdt + static_cast<size_t>(c.idx) * a.d_rows * K;
          }
          __syncwarp();
          if (lane == 0) {
            const uint32_t bytes = c.kind == kItemDense ? a.d_rows * K * 2
                                   : c.kind == kItemFc2 ? 2 * (4 * K) * 2
                                                        : kStageBytes;
            item_of[s] = item;
            sm90::MbarExpect(&full[s], bytes);
            sm90::BulkLoad(dst, src, bytes, &full[s]);
          }
        }
        if (c.kind == kItemEnd) break;
      }
      if (prof != nullptr && lane == 0) {
        prof[(l * gridDim.x + blockIdx.x) * kProf + kProfEmptyWait] = empty_wait;
      }
    }
  } else {
    int it = 0, ci = 0;
    for (int l = 0; l < num_layers; ++l) {
      const LayerArgs& a = layers[l];
      long long pr[kProf] = {};  // this layer's profile (thread 0 writes it out)
      const long long t_start = clock64();
      LnFold<KC>(a, sx, sred, tid);
      pr[kProfLn] = clock64() - t_start;
      float acc[8] = {};
      int qkv_unsignalled = 0, pending_head = -1, fc1_unsignalled = 0;
      bool g_loaded = false, o_loaded = false;
      bool attention_seen = !a.wait_attention;
      for (;;) {
        int s = it % S;
        long long t0 = clock64();
        sm90::MbarWait(&full[s], (it / S) & 1);
        pr[kProfFullWait] += clock64() - t0;
        const int item = item_of[s];
        pr[kProfItems] += item >= 0 ? 1 : 0;
        if (pending_head >= 0) {  // the last q/k/v chunk's rows out: count it into its head
          ConsumerSync(kConsumers);
          if (tid == 0) {
            __threadfence();
            atomicAdd(&a.ctr[kHeadReady + pending_head], 1);
          }
          pending_head = -1;
        }
        const Item c = item < 0 ? Item{kItemEnd, 0} : Classify(a, item);
        if (c.kind != kItemFc1 && fc1_unsignalled > 0) {  // this block's g rows out
          ConsumerSync(kConsumers);
          if (tid == 0) {
            __threadfence();
            atomicAdd(&a.ctr[kFc1Done], fc1_unsignalled);
          }
          fc1_unsignalled = 0;
        }
        if (c.kind != kItemQkv && qkv_unsignalled > 0) {  // this block's q/k/v rows out
          ConsumerSync(kConsumers);
          if (tid == 0) {
            __threadfence();
            atomicAdd(&a.ctr[kQkvDone], qkv_unsignalled);
          }
          qkv_unsignalled = 0;
        }
        const bf16* rows = ring + static_cast<size_t>(s) * R * K;
        if (c.kind == kItemEnd) {
          __syncwarp();
          if (lane == 0) sm90::MbarArrive(&empty[s]);
          ++it;
          break;
        } else if (c.kind == kItemQkv) {
          const float d = WarpDot<KC>(rows + warp * K, sx, lane);
          __syncwarp();
          if (lane == 0) {
            a.qkv[c.idx * R + warp] = __float2bfloat16(d + sb[s * R + warp]);
            sm90::MbarArrive(&empty[s]);
          }
          if (a.per_head) {
            pending_head = c.idx / a.head_chunks;
          } else {
            ++qkv_unsignalled;
          }
          ++it;
        } else if (c.kind == kItemFc1) {
          const float d = WarpDot<KC>(rows + warp * K, sx, lane);
          __syncwarp();
          if (lane == 0) {
            a.g[c.idx * R + warp] = __float2bfloat16(cuda::GeluTanh(d + sb[s * R + warp]));
            sm90::MbarArrive(&empty[s]);
          }
          ++fc1_unsignalled;
          ++it;
        } else if (c.kind == kItemFc2) {
          if (!g_loaded) {  // every fc1 row of the layer written: g into shared memory
            if (tid == 0) WaitAtLeast(a.ctr + kFc1Done, a.m_chunks);
            ConsumerSync(kConsumers);
            for (int i = tid; i < 4 * K / 8; i += kConsumers) {
              reinterpret_cast<uint4*>(sgi)[i] = __ldcg(reinterpret_cast<const uint4*>(a.g) + i);
            }
            ConsumerSync(kConsumers);
            g_loaded = true;
          }
          // warp w: row w / 5 of the two, fifth w % 5 (4K / 5 elements: KC / 5 x 4 ... units)
          const int r = warp / 5, f = warp % 5;
          constexpr int kFifth = 4 * K / 5;  // 2048 at Phi-2
          const bf16* row = rows + static_cast<size_t>(r) * 4 * K + f * kFifth;
          float d = 0.0f;
#pragma unroll
          for (int u = 0; u < kFifth / 256; ++u) {
            const uint4 wv = reinterpret_cast<const uint4*>(row)[lane + 32 * u];
            const uint4 xv = reinterpret_cast<const uint4*>(sgi + f * kFifth)[lane + 32 * u];
            const uint32_t wa[4] = {wv.x, wv.y, wv.z, wv.w}, xa[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float2 wf =
                  __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wa[e]));
              const float2 xf =
                  __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&xa[e]));
              d = fmaf(wf.x, xf.x, fmaf(wf.y, xf.y, d));
            }
          }
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
          __syncwarp();
          if (lane == 0) {
            sfifth[r * 5 + f] = d;
            sm90::MbarArrive(&empty[s]);
          }
          ConsumerSync(kConsumers);
          if (tid < 2) {
            float t = 0.0f;
            for (int q = 0; q < 5; ++q) t += sfifth[tid * 5 + q];
            a.mlp_out[2 * c.idx + tid] = __float2bfloat16(t);  // (+ fc2 bias in the model)
          }
          ConsumerSync(kConsumers);  // sfifth free for the next fc2 item
          ++it;
        } else if (c.kind == kItemAttn) {
          AttendStage<KC>(a, c.idx, rows, sq, sp, sred, sflag, tid);
          __syncwarp();
          if (lane == 0) sm90::MbarArrive(&empty[s]);
          ++it;
        } else if (c.kind == kItemMlp) {
          const float d = WarpDot<KC>(rows + warp * K, sx, lane);
          __syncwarp();
          if (lane == 0) {
            sg[(ci & 1) * R + warp] =
                __bfloat162float(__float2bfloat16(cuda::GeluTanh(d + sb[s * R + warp])));
            sm90::MbarArrive(&empty[s]);
          }
          ++it;
          s = it % S;
          t0 = clock64();
          sm90::MbarWait(&full[s], (it / S) & 1);
          pr[kProfFullWait] += clock64() - t0;
          ConsumerSync(kConsumers);  // every g of the chunk
          Axpy<R, K>(ring + static_cast<size_t>(s) * R * K, sg + (ci & 1) * R, tid, acc);
          __syncwarp();
          if (lane == 0) sm90::MbarArrive(&empty[s]);
          ++it;
          ++ci;
        } else {
          if (!attention_seen) {
            t0 = clock64();
            if (tid == 0) WaitAtLeast(a.ctr + kHeadsDone, a.heads);
            pr[kProfAttnWait] += clock64() - t0;
            ConsumerSync(kConsumers);
            attention_seen = true;
          }
          if (a.owner) {  // R rows of dense's weight as stored, dot with o (shared memory)
            if (!o_loaded) {
              for (int i = tid; i < K / 8; i += kConsumers) {
                reinterpret_cast<uint4*>(so)[i] = __ldcg(reinterpret_cast<const uint4*>(a.o) + i);
              }
              ConsumerSync(kConsumers);
              o_loaded = true;
            }
            const float d = WarpDot<KC>(rows + warp * K, so, lane);
            __syncwarp();
            if (lane == 0) {
              a.attn_out[c.idx * R + warp] = __float2bfloat16(d);  // (+ dense bias in the model)
              sm90::MbarArrive(&empty[s]);
            }
            ++it;
            continue;
          }
          float g[R];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            g[r] = r < a.d_rows ? __bfloat162float(__ldcg(a.o + c.idx * a.d_rows + r)) : 0.0f;
          }
          if (a.d_rows == R) {
            Axpy<R, K>(rows, g, tid, acc);
          } else {
            Axpy<R / 2, K>(rows, g, tid, acc);
          }
          __syncwarp();
          if (lane == 0) sm90::MbarArrive(&empty[s]);
          ++it;
        }
      }
      const long long t_flush = clock64();
      if (a.owner) {
        // nothing to add: every output column was written by the block that owned it
      } else if (a.slots != nullptr) {
        float4* o =
            reinterpret_cast<float4*>(a.slots + static_cast<size_t>(blockIdx.x) * K) + 2 * tid;
        o[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        o[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
        __threadfence();
      } else if (a.fixed_point) {
        unsigned long long* o = reinterpret_cast<unsigned long long*>(a.acc) +
                                static_cast<size_t>(blockIdx.x % a.acc_copies) * K + 8 * tid;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          atomicAdd(o + e, static_cast<unsigned long long>(llrintf(acc[e] * kFixedScale)));
        }
      } else {
        float4* o =
            reinterpret_cast<float4*>(a.acc + static_cast<size_t>(blockIdx.x % a.acc_copies) * K) +
            2 * tid;
        atomicAdd(o, make_float4(acc[0], acc[1], acc[2], acc[3]));
        atomicAdd(o + 1, make_float4(acc[4], acc[5], acc[6], acc[7]));
      }
      ConsumerSync(kConsumers);
      if (tid == 0) {
        __threadfence();
        atomicAdd(&a.ctr[kBlocksDone], 1);
      }
      if (prof != nullptr && tid == 0) {
        pr[kProfFlush] = clock64() - t_flush;
        pr[kProfLayer] = clock64() - t_start;
        long long* out = prof + (l * gridDim.x + blockIdx.x) * kProf;
#pragma unroll
        for (int k = 0; k < kProfEmptyWait; ++k) out[k] = pr[k];
      }
    }
  }
}

constexpr int kOwnerSmem(int k) { return 5 * k * 2 + 16 * 4; }
int LayerStreamSmem(int kc, int stages, bool attn_warps = false, bool owner = false) {
  const int k = 256 * kc;
  const int base = stages * kc * k * 2 + k * 2 + stages * kc * 4 + 2 * kc * 4 + 64 * 4 +
                   kAttnKeys * 4 + kHd * 4 + 16 + ((stages + 1) & ~1) * 4 + 2 * stages * 8;
  if (owner) return (base + 15) / 16 * 16 + kOwnerSmem(k);
  return attn_warps ? (base + 15) / 16 * 16 + std::max(kAttnWarpSmem, kAttnWarpItemSmem) : base;
}

#include "bench/layer_probe_attention.cuh"

float ElapsedMs(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  LP_CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

int Main(int argc, char** argv) {
  const int ctx = argc > 1 ? std::atoi(argv[1]) : 1024;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  constexpr int KC = 10, K = 2560, I = 10240, NQ = 3 * K, R = KC, heads = 32, L = 32;
  cudaStream_t st;
  LP_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const size_t per_layer = size_t{NQ} * K + 2 * size_t{I} * K + size_t{K} * K;  // elements
  bf16* w = static_cast<bf16*>(DeviceAllocOrDie(2 * per_layer * L, kProg));
  RandomFillOrDie(w, per_layer * L, 41, DataType::kBF16, st, kProg, 0.02f);
  const size_t small = size_t{NQ} + I + 2 * K;  // bqkv, b1, ln_w, ln_b
  bf16* bias = static_cast<bf16*>(DeviceAllocOrDie(2 * small * L, kProg));
  RandomFillOrDie(bias, small * L, 42, DataType::kBF16, st, kProg, 0.05f);
  bf16* hbuf = static_cast<bf16*>(DeviceAllocOrDie(2 * K * (L + 1), kProg));
  RandomFillOrDie(hbuf, K, 43, DataType::kBF16, st, kProg);
  bf16* qkv = static_cast<bf16*>(DeviceAllocOrDie(2 * NQ * L, kProg));
  bf16* obuf = static_cast<bf16*>(DeviceAllocOrDie(2 * K * L, kProg));
  constexpr int kMaxCopies = 16;
  float* acc = static_cast<float*>(DeviceAllocOrDie(size_t{4} * K * L * kMaxCopies, kProg));
  int* ctr = static_cast<int*>(DeviceAllocOrDie(4 * kCounters * L, kProg));
  // K/V of every layer: one sequence of ctx tokens, blocks consecutive.
  const int blocks = (ctx + kBs - 1) / kBs;
  const size_t kv_elems = static_cast<size_t>(blocks) * heads * kBs * kHd;
  bf16* kcache = static_cast<bf16*>(DeviceAllocOrDie(2 * kv_elems * L, kProg));
  bf16* vcache = static_cast<bf16*>(DeviceAllocOrDie(2 * kv_elems * L, kProg));
  RandomFillOrDie(kcache, kv_elems * L, 44, DataType::kBF16, st, kProg);
  RandomFillOrDie(vcache, kv_elems * L, 45, DataType::kBF16, st, kProg);
  std::vector<int32_t> host(1 + blocks);
  host[0] = ctx;
  for (int b = 0; b < blocks; ++b) host[1 + b] = b;
  int32_t* meta = static_cast<int32_t*>(DeviceAllocOrDie(4 * host.size(), kProg));
  LP_CHECK(cudaMemcpy(meta, host.data(), 4 * host.size(), cudaMemcpyHostToDevice));
  float* partials =
      static_cast<float*>(DeviceAllocOrDie(size_t{4} * heads * 64 * (kHd + 2) * L, kProg));
  int* split_ctr = static_cast<int*>(DeviceAllocOrDie(4 * heads * L, kProg));
  LP_CHECK(cudaMemset(split_ctr, 0, 4 * heads * L));
  LP_CHECK(cudaDeviceSynchronize());
  LP_CHECK(cudaFuncSetAttribute(LayerStream<KC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                std::max({LayerStreamSmem(KC, 4), LayerStreamSmem(KC, 3, true),
                                          LayerStreamSmem(KC, 3, false, true)})));
  // Both kernels ask for the largest shared-memory carveout: blocks of kernels whose carveouts
  // differ do not share an SM, and the attention must run beside the stream.
  LP_CHECK(
      cudaFuncSetAttribute(LayerStream<KC>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  SetAttentionSmem();

  float* slots = static_cast<float*>(DeviceAllocOrDie(size_t{4} * 132 * K * L, kProg));
  bf16* gbuf = static_cast<bf16*>(DeviceAllocOrDie(size_t{2} * I * L, kProg));
  bf16* mlp_out = static_cast<bf16*>(DeviceAllocOrDie(size_t{2} * K * L, kProg));
  bf16* attn_out = static_cast<bf16*>(DeviceAllocOrDie(size_t{2} * K * L, kProg));
  float* colsum = static_cast<float*>(DeviceAllocOrDie(size_t{4} * K * L, kProg));
  // Every layer's arguments, on the device (the kernels read them there).
  auto layer_args = [&](int l, bool wait, int copies, bool per_head, int ring_m_first = -1,
                        int aw = 0, int d_rows = 0, bool fixed = false, bool slot_sums = false,
                        bool owner = false) {
    bf16* wl = w + per_layer * l;
    const bf16* bl = bias + small * l;
    return LayerArgs{
        .h_in = hbuf + K * l,
        .acc_in = l == 0 ? nullptr : acc + size_t{K} * kMaxCopies * (l - 1),
        .h_out = hbuf + K * (l + 1),
        .ln_w = bl + NQ + I,
        .ln_b = bl + NQ + I + K,
        .wqkv = wl,
        .bqkv = bl,
        .qkv = qkv + NQ * l,
        .w1 = wl + size_t{NQ} * K,
        .b1 = bl + NQ,
        .w2t = wl + size_t{NQ} * K + size_t{I} * K,
        .wdt = wl + size_t{NQ} * K + 2 * size_t{I} * K,
        .o = obuf + K * l,
        .acc = acc + size_t{K} * kMaxCopies * l,
        .acc_copies = copies,
        .fixed_point = fixed,
        .slots = slot_sums ? slots + size_t{132} * K * l : nullptr,
        .colsum = slot_sums ? colsum + size_t{K} * l : nullptr,
        .prev_slots = slot_sums && l > 0 ? slots + size_t{132} * K * (l - 1) : nullptr,
        .prev_colsum = slot_sums && l > 0 ? colsum + size_t{K} * (l - 1) : nullptr,
        .ctr = ctr + kCounters * l,
        .prev_ctr = l == 0 ? nullptr : ctr + kCounters * (l - 1),
        .q_chunks = NQ / R,
        .m_chunks = I / R,
        .d_chunks = K / (d_rows > 0 ? d_rows : R),
        .heads = heads,
        .wait_attention = wait,
        .per_head = per_head,
        .head_chunks = NQ / R / heads,
        .attn_items = ring_m_first >= 0 ? heads * ((ctx + kAttnKeys - 1) / kAttnKeys) : 0,
        .m_first = ring_m_first,
        .splits = aw == 2 ? (ctx + kWarpKeys - 1) / kWarpKeys : (ctx + kAttnKeys - 1) / kAttnKeys,
        .kc = kcache + kv_elems * l,
        .vc = vcache + kv_elems * l,
        .ctx_len = meta,
        .table = meta + 1,
        .max_blocks = blocks,
        .scale_log2 = 0.1118f * 1.4426950408889634f,
        .partials = partials + static_cast<size_t>(heads) * 64 * (kHd + 2) * l,
        .split_ctr = ctr + kCounters * l + kHeadReady,
        .aw_items = aw == 1   ? heads * ((ctx + kAttnKeys - 1) / kAttnKeys)
                    : aw == 2 ? heads * ((ctx + kWarpKeys - 1) / kWarpKeys)
                              : 0,
        .aw_mode = aw,
        .d_rows = d_rows > 0 ? d_rows : R,
        .owner = owner,
        .g = owner ? gbuf + size_t{I} * l : nullptr,
        .mlp_out = owner ? mlp_out + size_t{K} * l : nullptr,
        .attn_out = owner ? attn_out + size_t{K} * l : nullptr,
        .prev_mlp = owner && l > 0 ? mlp_out + size_t{K} * (l - 1) : nullptr,
        .prev_attn = owner && l > 0 ? attn_out + size_t{K} * (l - 1) : nullptr};
  };
  auto attn_args = [&](int l, bool per_head) {
    return AttnArgs{.q = qkv + NQ * l,
                    .q_head_stride = per_head ? 3 * kHd : kHd,
                    .k = kcache + kv_elems * l,
                    .v = vcache + kv_elems * l,
                    .out = obuf + K * l,
                    .ctx_lens = meta,
                    .table = meta + 1,
                    .max_blocks = blocks,
                    .heads = heads,
                    .scale_log2 = 0.1118f * 1.4426950408889634f,
                    .partials = partials + static_cast<size_t>(heads) * 64 * (kHd + 2) * l,
                    .counters = split_ctr + heads * l,
                    .qkv_done = ctr + kCounters * l + kQkvDone,
                    .qkv_target = NQ / R,
                    .heads_done = ctr + kCounters * l + kHeadsDone,
                    .head_ready = per_head ? ctr + kCounters * l + kHeadReady : nullptr,
                    .head_target = NQ / R / heads};
  };
  // Forms with acc copies: index 0 = 1 copy; the others as listed.
  const std::vector<int> copies_of = {1, 4, 16};
  std::vector<LayerArgs> h_largs_wait, h_largs_nowait;
  std::vector<AttnArgs> h_aargs;
  std::vector<int*> h_next;
  // [per_head][copies][layer]
  for (int ph = 0; ph < 2; ++ph) {
    for (int c : copies_of) {
      for (int l = 0; l < L; ++l) {
        h_largs_wait.push_back(layer_args(l, true, c, ph == 1));
        h_largs_nowait.push_back(layer_args(l, false, c, ph == 1));
      }
    }
  }
  for (int ph = 0; ph < 2; ++ph) {
    for (int l = 0; l < L; ++l) h_aargs.push_back(attn_args(l, ph == 1));
  }
  for (int l = 0; l < L; ++l) h_next.push_back(ctr + kCounters * l + kAttnNext);
  // The attention in the stream (4 acc copies): after m_first MLP chunks, as listed.
  const std::vector<int> ring_first = {0, 256, 512, 768};
  std::vector<LayerArgs> h_ring;
  for (int m1 : ring_first) {
    for (int l = 0; l < L; ++l) h_ring.push_back(layer_args(l, true, 4, false, m1));
  }
  LayerArgs* ring_args =
      static_cast<LayerArgs*>(DeviceAllocOrDie(sizeof(LayerArgs) * h_ring.size(), kProg));
  LP_CHECK(cudaMemcpy(ring_args, h_ring.data(), sizeof(LayerArgs) * h_ring.size(),
                      cudaMemcpyHostToDevice));
  // The attention warps in every block (4 acc copies): dense waits / does not wait.
  // [mode 1, 2][wait, no wait][copies 4, 8][dense rows R, R / 2][layer]
  std::vector<LayerArgs> h_aw;
  for (int mode = 1; mode <= 2; ++mode) {
    for (int w = 0; w < 2; ++w) {
      for (int c : {4, 8}) {
        for (int dr : {R, R / 2}) {
          for (int l = 0; l < L; ++l) h_aw.push_back(layer_args(l, w == 0, c, false, -1, mode, dr));
        }
      }
    }
  }
  LayerArgs* aw_args =
      static_cast<LayerArgs*>(DeviceAllocOrDie(sizeof(LayerArgs) * h_aw.size(), kProg));
  LP_CHECK(
      cudaMemcpy(aw_args, h_aw.data(), sizeof(LayerArgs) * h_aw.size(), cudaMemcpyHostToDevice));
  // Fixed-point sums, 4 copies, dense waits; then slot sums, dense waits / stream alone.
  std::vector<LayerArgs> h_fixed;
  for (int l = 0; l < L; ++l) h_fixed.push_back(layer_args(l, true, 4, false, -1, 0, 0, true));
  for (int w = 0; w < 2; ++w) {
    for (int l = 0; l < L; ++l) {
      h_fixed.push_back(layer_args(l, w == 0, 4, false, -1, 0, 0, false, true));
    }
  }
  for (int w = 0; w < 2; ++w) {  // owner form: dense waits / stream alone
    for (int l = 0; l < L; ++l) {
      h_fixed.push_back(layer_args(l, w == 0, 4, false, -1, 0, 0, false, false, true));
    }
  }
  LayerArgs* fixed_args =
      static_cast<LayerArgs*>(DeviceAllocOrDie(sizeof(LayerArgs) * h_fixed.size(), kProg));
  LP_CHECK(cudaMemcpy(fixed_args, h_fixed.data(), sizeof(LayerArgs) * h_fixed.size(),
                      cudaMemcpyHostToDevice));
  const size_t nla = h_largs_wait.size();
  LayerArgs* largs_wait = static_cast<LayerArgs*>(DeviceAllocOrDie(sizeof(LayerArgs) * nla, kProg));
  LayerArgs* largs_nowait =
      static_cast<LayerArgs*>(DeviceAllocOrDie(sizeof(LayerArgs) * nla, kProg));
  AttnArgs* aargs = static_cast<AttnArgs*>(DeviceAllocOrDie(sizeof(AttnArgs) * 2 * L, kProg));
  int** next = static_cast<int**>(DeviceAllocOrDie(sizeof(int*) * L, kProg));
  LP_CHECK(
      cudaMemcpy(largs_wait, h_largs_wait.data(), sizeof(LayerArgs) * nla, cudaMemcpyHostToDevice));
  LP_CHECK(cudaMemcpy(largs_nowait, h_largs_nowait.data(), sizeof(LayerArgs) * nla,
                      cudaMemcpyHostToDevice));
  LP_CHECK(cudaMemcpy(aargs, h_aargs.data(), sizeof(AttnArgs) * 2 * L, cudaMemcpyHostToDevice));
  LP_CHECK(cudaMemcpy(next, h_next.data(), sizeof(int*) * L, cudaMemcpyHostToDevice));

  // One decode step's 32 layers: counters and sums zeroed, then either per layer LayerStream and
  // (unless keys == 0) the attention as its programmatic dependent, or (step) one LayerStream over
  // all layers and one StepAttn of `attn_blocks` blocks beside it.
  // pdl: LayerStream of layers >= 1 launched as a programmatic dependent of the kernel before it
  // (the attention, which lets its dependents start at once), so its producer streams the next
  // layer's weights while this layer drains; its consumers still wait for every block before.
  struct Form {
    int stages, keys;
    bool wait, pdl, step;
    int attn_blocks;
    int copies_index = 0;  // into copies_of
    bool per_head = false;
    int ring = -1;  // >= 0: the attention in the stream, m_first = ring_first[ring]
    int aw = 0;     // the attention warps in every block, mode 1 / 2 (wait: dense waits for them)
    bool copies8 = false, fine_dense = false;  // (aw forms) 8 acc copies; dense items of R / 2 rows
    bool fixed = false;                        // int64 fixed-point sums (4 copies, dense waits)
    bool slot_sums = false;                    // deterministic slot sums
    bool owner = false;                        // the owner form
  };
  long long* prof =
      static_cast<long long*>(DeviceAllocOrDie(sizeof(long long) * L * 132 * kProf, kProg));
  bool prof_on = false;
  auto chain = [&](const Form& f) {
    LP_CHECK(cudaMemsetAsync(ctr, 0, 4 * kCounters * L, st));
    LP_CHECK(cudaMemsetAsync(acc, 0, size_t{4} * K * L * kMaxCopies, st));
    const LayerArgs* la =
        (f.wait && f.keys > 0 ? largs_wait : largs_nowait) +
        static_cast<size_t>(L) * (f.copies_index + (f.per_head ? copies_of.size() : 0));
    const AttnArgs* aa = aargs + (f.per_head ? L : 0);
    if (f.ring >= 0) la = ring_args + static_cast<size_t>(L) * f.ring;
    if (f.fixed) la = fixed_args;
    if (f.slot_sums) la = fixed_args + static_cast<size_t>(L) * (f.wait ? 1 : 2);
    if (f.owner) la = fixed_args + static_cast<size_t>(L) * (f.wait ? 3 : 4);
    if (f.aw > 0) {
      la = aw_args + static_cast<size_t>(L) *
                         ((((f.aw - 1) * 2 + (f.wait ? 0 : 1)) * 2 + (f.copies8 ? 1 : 0)) * 2 +
                          (f.fine_dense ? 1 : 0));
    }
    const int smem = LayerStreamSmem(KC, f.stages, f.aw > 0, f.owner);
    const int threads = 32 * KC + 32 + (f.aw > 0 ? 32 * kAttnWarps : 0);
    if (f.step) {
      LayerStream<KC><<<132, threads, smem, st>>>(la, L, f.stages, prof_on ? prof : nullptr);
      if (f.keys > 0) LaunchStepAttention(aa, L, f.keys, ctx, f.attn_blocks, next, st);
      return;
    }
    for (int l = 0; l < L; ++l) {
      if (f.pdl && l > 0) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(132);
        cfg.blockDim = dim3(threads);
        cfg.dynamicSmemBytes = smem;
        cfg.stream = st;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        LP_CHECK(cudaLaunchKernelEx(&cfg, LayerStream<KC>, la + l, 1, f.stages,
                                    static_cast<long long*>(nullptr)));
      } else {
        LayerStream<KC><<<132, threads, smem, st>>>(la + l, 1, f.stages, nullptr);
      }
      if (f.keys > 0) LaunchAttention(h_aargs[(f.per_head ? L : 0) + l], f.keys, ctx, st);
    }
  };
  cudaEvent_t e0, e1;
  LP_CHECK(cudaEventCreate(&e0));
  LP_CHECK(cudaEventCreate(&e1));
  const double layer_bytes = 2.0 * per_layer + 4.0 * kv_elems;
  std::printf("ctx %d: %.1f MB of weights + %.1f MB of K/V a layer\n", ctx, 2e-6 * per_layer,
              4e-6 * kv_elems);
  // argv[2] == "pdl": only the a-launch-a-layer PDL forms (the best with the attention) and the
  // stream alone as one launch a step.
  const bool pdl_only = argc > 2 && std::string(argv[2]) == "pdl";
  const std::vector<Form> forms =
      pdl_only ? std::vector<Form>{Form{2, 0, false, true, false, 0, 1},
                                   Form{2, 64, true, true, false, 0, 1},
                                   Form{2, 128, true, true, false, 0, 1},
                                   Form{2, 32, true, true, false, 0, 1},
                                   Form{2, 64, false, true, false, 0, 1},
                                   Form{2, 64, true, true, false, 0, 1, false, -1, 0, false, false,
                                        true},
                                   Form{2, 64, true, true, false, 0, 1, false,
                                        -1, 0, false, false, false, true},
                                   Form{2, 0, false, true, false, 0, 1, false,
                                        -1, 0, false, false, false, true},
                                   Form{2, 64, true, true, false, 0,
                                        1, false, -1, 0, false, false, false, false, true},
                                   Form{2, 0, false, true, false, 0, 1, false,
                                        -1, 0, false, false, false, false, true},
                                   Form{3, 64, true, true, false, 0,
                                        1, false, -1, 0, false, false, false, false, true},
                                   Form{4, 0, false, false, true, 0, 1}}
               : std::vector<Form>{Form{2, 64, true, true, false, 0, 1},
                                   Form{3, 0, false, false, true, 0, 1},
                                   Form{4, 0, false, false, true, 0, 1},
                                   Form{3, 64, true, false, true, 264, 1},
                                   Form{3, 0, true, false, true, 0, 1, false, -1, 1},
                                   Form{3, 0, true, false, true, 0, 1, false, -1, 2},
                                   Form{3, 0, false, false, true, 0, 1, false, -1, 2},
                                   Form{3, 0, true, false, true, 0, 1, false, -1, 2, true},
                                   Form{3, 0, true, false, true, 0, 1, false, -1, 2, false, true},
                                   Form{3, 0, true, false, true, 0, 1, false, -1, 2, true, true},
                                   Form{3, 0, false, false, true, 0, 1, false, -1, 2, true, true},
                                   Form{2, 0, true, true, false, 0, 1, false, -1, 2}};
  for (int round = 0; round < 2; ++round) {
    for (const Form& f : forms) {
      if (round == 0) {
        std::printf("form stages %d keys %d wait %d pdl %d step %d blocks %d ...\n", f.stages,
                    f.keys, f.wait ? 1 : 0, f.pdl ? 1 : 0, f.step ? 1 : 0, f.attn_blocks);
        chain(f);
        LP_CHECK(cudaStreamSynchronize(st));
        LP_CHECK(cudaGetLastError());
      }
      for (int i = 0; i < 2; ++i) chain(f);
      LP_CHECK(cudaEventRecord(e0, st));
      constexpr int kSteps = 20;
      for (int i = 0; i < kSteps; ++i) chain(f);
      LP_CHECK(cudaEventRecord(e1, st));
      LP_CHECK(cudaStreamSynchronize(st));
      LP_CHECK(cudaGetLastError());
      const double us = ElapsedMs(e0, e1) * 1e3 / kSteps;
      char attn[64];
      if (f.aw > 0) {
        std::snprintf(attn, sizeof(attn), "warps %s%s%s%s", f.aw == 1 ? "64k" : "32k/warp",
                      f.wait ? "" : " nowait", f.copies8 ? " 8cp" : "", f.fine_dense ? " d5" : "");
      } else if (f.ring >= 0) {
        std::snprintf(attn, sizeof(attn), "in stream after %d", ring_first[f.ring]);
      } else {
        std::snprintf(attn, sizeof(attn), "%s%s%s",
                      f.keys ? std::to_string(f.keys).c_str() : "none", f.keys ? " keys" : "",
                      f.keys && !f.wait ? " (no wait)"
                      : f.fixed         ? " int64 sums"
                                        : "");
        if (f.slot_sums)
          std::snprintf(attn, sizeof(attn), "%s slot sums", f.keys ? "64 keys" : "none");
        if (f.owner)
          std::snprintf(attn, sizeof(attn), "%s owner form", f.keys ? "64 keys" : "none");
      }
      char launch[64];
      std::snprintf(launch, sizeof(launch), "%s",
                    f.step  ? "one launch a step"
                    : f.pdl ? "a layer, PDL"
                            : "a layer");
      std::printf(
          "round %d stages %d attention %-18s %-18s attn blocks %3d acc copies %2d %s: "
          "%8.1f us = %6.2f us a layer, %6.0f GB/s\n",
          round, f.stages, attn, launch, f.attn_blocks, copies_of[f.copies_index],
          f.per_head ? "per-head" : "all qkv ", us, us / L, layer_bytes * L / (us * 1e-6) / 1e9);
    }
  }
  // The step forms' profile: one step each, cycles per (layer, block) averaged over blocks and over
  // layers 1..31, in us at the SM clock.
  int clock_khz = 0;
  LP_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  prof_on = true;
  const std::vector<Form> profiled =
      pdl_only ? std::vector<Form>{}
               : std::vector<Form>{Form{3, 0, false, false, true, 0, 1},
                                   Form{3, 0, true, false, true, 0, 1, false, -1, 2}};
  for (const Form& f : profiled) {
    chain(f);  // warm
    LP_CHECK(cudaMemset(prof, 0, sizeof(long long) * L * 132 * kProf));
    chain(f);
    LP_CHECK(cudaStreamSynchronize(st));
    LP_CHECK(cudaGetLastError());
    std::vector<long long> hp(static_cast<size_t>(L) * 132 * kProf);
    LP_CHECK(cudaMemcpy(hp.data(), prof, sizeof(long long) * hp.size(), cudaMemcpyDeviceToHost));
    double sum[kProf] = {}, mx[kProf] = {};
    for (int l = 1; l < L; ++l) {
      for (int b = 0; b < 132; ++b) {
        for (int k = 0; k < kProf; ++k) {
          const double v = static_cast<double>(hp[(static_cast<size_t>(l) * 132 + b) * kProf + k]);
          sum[k] += v;
          mx[k] = std::max(mx[k], v);
        }
      }
    }
    const double n = 31.0 * 132, us = 1e3 / clock_khz;
    std::printf(
        "profile (stages %d, attention %d keys%s, %d acc copies; us at %d MHz, mean / max a block "
        "a layer): "
        "LN fold %.2f / %.2f, stage waits %.2f / %.2f, attention wait %.2f / %.2f, flush "
        "%.2f / %.2f, layer %.2f / %.2f, items %.1f / %.0f, producer slot waits %.2f / %.2f\n",
        f.stages, f.keys, f.keys && !f.wait ? " no wait" : "", copies_of[f.copies_index],
        clock_khz / 1000, sum[kProfLn] / n * us, mx[kProfLn] * us, sum[kProfFullWait] / n * us,
        mx[kProfFullWait] * us, sum[kProfAttnWait] / n * us, mx[kProfAttnWait] * us,
        sum[kProfFlush] / n * us, mx[kProfFlush] * us, sum[kProfLayer] / n * us,
        mx[kProfLayer] * us, sum[kProfItems] / n, mx[kProfItems], sum[kProfEmptyWait] / n * us,
        mx[kProfEmptyWait] * us);
  }
  prof_on = false;

  // The chain's output is finite (a smoke check that every layer ran and the waits resolved).
  std::vector<bf16> hl(K);
  LP_CHECK(cudaMemcpy(hl.data(), hbuf + K * L, 2 * K, cudaMemcpyDeviceToHost));
  int finite = 0;
  for (const bf16& v : hl) finite += std::isfinite(__bfloat162float(v)) ? 1 : 0;
  std::printf("h after 32 layers: %d of %d finite\n", finite, K);
  return 0;
}

}  // namespace
}  // namespace phishard::bench

int main(int argc, char** argv) { return phishard::bench::Main(argc, argv); }
