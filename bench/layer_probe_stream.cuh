// The stream side of bench/layer_probe.cu (included inside its namespace, after LP_CHECK, bf16,
// kHd / kBs): the per-layer counters and profile slots, LayerArgs, the item order, the spin
// helpers, the LayerStream kernel (its per-item pieces in bench/layer_probe_parts.cuh) and its
// shared-memory size.

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
  // Grid sums (deterministic with float atomics): every item's contribution to column c is
  // rounded to a multiple of q_c = 2^(E_c - 16), 2^E_c >= max(|h_c|, rms(h)) of the layer's input,
  // before it joins acc, so every later sum (the block's, the atomics', the fold's) is exact while
  // |sum| < 2^(E_c + 8) and their order cannot change it (GridMagic).
  bool qsum;
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
// qsum's grid: kernels/cuda/stream_stage.cuh (GridMagic, AddOnGrid), what the library's
// decode stream kernel uses.
using cuda::AddOnGrid;
using cuda::GridMagic;

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
      float magic[8];
      LnFold<KC>(a, sx, sred, tid, magic);
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
          if (a.qsum) {
            float t[8] = {};
            Axpy<R, K>(ring + static_cast<size_t>(s) * R * K, sg + (ci & 1) * R, tid, t);
            AddOnGrid(acc, t, magic);
          } else {
            Axpy<R, K>(ring + static_cast<size_t>(s) * R * K, sg + (ci & 1) * R, tid, acc);
          }
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
          if (a.qsum) {
            float t[8] = {};
            Axpy<R, K>(rows, g, tid, t);
            AddOnGrid(acc, t, magic);
          } else if (a.d_rows == R) {
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
