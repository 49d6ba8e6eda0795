// The persistent 1-row decode kernel (kernels/cuda/decode_mega_cuda.h): a producer warp streams
// the block's weight rows through a ring of bulk copies across every phase and layer; 8 consumer
// warps compute, meeting the other blocks at grid barriers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/decode_mega_attention.cuh"
#include "kernels/cuda/decode_mega_attention_lean.cuh"
#include "kernels/cuda/decode_mega_parts.cuh"

namespace phishard {
namespace decode_mega {

// Rows [r0, r1) of a [*, K] weight matrix through the ring, multiplied by x. No barrier across
// the consumer warps per stage: each warp multiplies its lanes' element pairs of every row of the
// stage (the pairs x holds), sums each row over its lanes (TileDot), writes its partial to
// sm.part[row - base][warp] and releases the stage on its own (one mbarrier arrive a warp). The
// warps meet once per head (q/k/v: FinishHead) or at the end of the rows (fc1 / dense epilogue,
// fc2 sums to sm.out), where the 8 partials of a row are summed. Epilogue operands are loaded
// before the stage loop: a global load there would put one memory latency on a stage.
// Cycles consumer thread 0 spent waiting for ring stages and in FinishHead (timeline only).
struct PhaseCycles {
  long long wait = 0, finish = 0;
};

template <typename T, int kEpi, bool kTl, int kForm>
__device__ PhaseCycles ConsumeRows(const Args& a, const Smem& sm, uint32_t& it, const LayerPtrs& lp,
                                   const T* bias, int r0, int r1, int K, int split, int out0,
                                   int pos, int64_t slot, const XRegs& x, int epi_rt = -1) {
  // kEpi < 0: the epilogue kind is epi_rt (one inlined copy of the loop for every matrix).
  const int epi = kEpi >= 0 ? kEpi : epi_rt;
  const DecodeMegaParams& p = a.p;
  const int rps = RowsPerStage(a.stage_bytes, K * static_cast<int>(sizeof(T)));
  const int npairs = K / 2;
  const int t = threadIdx.x, lane = t & 31;
  // This thread's first epilogue operands (row r0 + t), loaded ahead.
  float pre_b = 0.0f, pre_b2 = 0.0f, pre_h = 0.0f;
  if (epi == kEpiFc1 || epi == kEpiDense) {
    if (r0 + t < r1) pre_b = cuda::ToFloat(bias[r0 + t]);
  }
  if (epi == kEpiDense) {
    if (r0 + t < r1) {
      pre_b2 = cuda::ToFloat(static_cast<const T*>(lp.w.fc2_b)[r0 + t]);
      pre_h = LoadCg(static_cast<const T*>(p.h) + r0 + t);
    }
  }
  float head_bias = 0.0f;  // q/k/v: this thread's bias of the current head
  PhaseCycles cyc;
  const bool timed = kTl && t == 0;
  for (int r = r0; r < r1;) {
    if (epi == kEpiQkv) {
      if (r % split == 0 && t < split) head_bias = cuda::ToFloat(bias[r + t]);
    }
    const int n = TileRows(r, r1, rps, split);
    const int s = static_cast<int>(it % a.stages);
    if (timed) {
      const long long c0 = clock64();
      MbarWait(&sm.full[s], (it / a.stages) & 1);
      cyc.wait += clock64() - c0;
    } else {
      MbarWait(&sm.full[s], (it / a.stages) & 1);
    }
    // [n, K] dtype rows of the stage, as 32-bit words (element pairs).
    const uint32_t* wt =
        reinterpret_cast<const uint32_t*>(sm.ring + static_cast<size_t>(s) * a.stage_bytes);
    // Partials go to rows of the head (q/k/v) or of [r0, r1); the tile as 8 / 4 / 2 / 1 rows.
    float* part = sm.part + (epi == kEpiQkv ? r % split : r - r0) * kConsumerWarps;
    if constexpr ((kForm & kDecodeMegaFormPipe) != 0) {
      StageDot<T, true>(wt, n, npairs, x, part);
    } else {
      StageDot<T, false>(wt, n, npairs, x, part);
    }
    __syncwarp();
    if (lane == 0) MbarArrive(&sm.empty[s]);  // this warp is done with the stage
    ++it;
    r += n;
    if (epi == kEpiQkv) {
      if (r % split == 0) {
        const long long c0 = timed ? clock64() : 0;
        ConsumerSync();
        FinishHead<T>(a, sm, lp, r / split - 1, pos, slot, head_bias);
        if (timed) cyc.finish += clock64() - c0;
      }
    }
  }
  if (epi == kEpiFc2) {
    ConsumerSync();
    for (int i = t; i < r1 - r0; i += kConsumers) sm.out[r0 + i - out0] = RowSum(sm, i);
    // (the grid barrier after this phase publishes sm.out and frees sm.part)
  }
  if (epi == kEpiFc1 || epi == kEpiDense) {
    ConsumerSync();
    for (int i = t; i < r1 - r0; i += kConsumers) {
      const int g = r0 + i;
      const float b = i == t ? pre_b : cuda::ToFloat(bias[g]);
      if (epi == kEpiFc1) {
        static_cast<T*>(p.act)[g] =
            cuda::FromFloat<T>(Activate(RowSum(sm, i) + b, static_cast<int>(p.act_fn)));
      } else {
        // fc2's sum and bias in the same float32 sum: one rounding of h a layer.
        const float b2 = i == t ? pre_b2 : cuda::ToFloat(static_cast<const T*>(lp.w.fc2_b)[g]);
        T* h = static_cast<T*>(p.h);
        const float hv = i == t ? pre_h : LoadCg(h + g);
        h[g] = cuda::FromFloat<T>(hv + RowSum(sm, i) + b + sm.out[g - out0] + b2);
      }
    }
  }
  return cyc;
}

// The block's weight stream, stage by stage, in the consumers' program order: per layer its q/k/v
// heads, fc1 rows, fc2 rows and dense rows. `m` and `l` name the matrix (0 qkv, 1 fc1, 2 fc2,
// 3 dense) and layer of the stage Next returned last.
struct StreamCursor {
  int l = 0, m = -1;
  int r = 0, r1 = 0, row_bytes = 0, split = 0, rps = 0;
  const char* w = nullptr;
};

template <typename T>
__device__ __forceinline__ bool NextStage(const Args& a, const BlockPlan& bp, StreamCursor& c,
                                          const char** src, uint32_t* bytes) {
  const DecodeMegaParams& p = a.p;
  while (c.r >= c.r1) {
    if (++c.m == 4) {
      c.m = 0;
      ++c.l;
    }
    if (c.l >= p.num_layers) return false;
    const DecodeMegaLayer& w = p.layers[c.l];
    int K = p.hidden;
    c.split = 0;
    if (c.m == 0) {
      c.w = static_cast<const char*>(w.qkv_w), c.r = bp.qkv0, c.r1 = bp.qkv1;
      c.split = p.head_dim;
    } else if (c.m == 1) {
      c.w = static_cast<const char*>(w.fc1_w), c.r = bp.fc1_0, c.r1 = bp.fc1_1;
    } else if (c.m == 2) {
      c.w = static_cast<const char*>(w.fc2_w), c.r = bp.out0, c.r1 = bp.out1;
      K = p.intermediate;
    } else {
      c.w = static_cast<const char*>(w.dense_w), c.r = bp.out0, c.r1 = bp.out1;
      K = p.num_heads * p.head_dim;
    }
    c.row_bytes = K * static_cast<int>(sizeof(T));
    c.rps = RowsPerStage(a.stage_bytes, c.row_bytes);
  }
  const int n = TileRows(c.r, c.r1, c.rps, c.split);
  *src = c.w + static_cast<size_t>(c.r) * c.row_bytes;
  *bytes = static_cast<uint32_t>(n) * c.row_bytes;
  c.r += n;
  return true;
}

// One thread. Stage `it` goes to ring slot it % stages once the consumers released that slot's
// previous stage; before each stage the L2 prefetch frontier moves to pf_stages stages past it,
// so while the ring is full (consumers in a phase that reads no weights) DRAM keeps streaming.
template <typename T, bool kTl>
__device__ void Produce(const Args& a, const BlockPlan& bp, const Smem& sm) {
  StreamCursor load, pf;
  uint32_t pf_it = 0;  // stages the prefetch cursor has passed
  bool pf_more = a.pf_stages > 0;
  long long blocked[4] = {0, 0, 0, 0};  // cycles waiting on a full ring, per matrix (timeline)
  int cur_l = 0;
  constexpr bool timed = kTl;
  auto flush = [&](int l) {
    uint64_t* row = TimelineRow(a.p, l);
    if (row == nullptr) return;
    for (int m = 0; m < 4; ++m) {
      row[kMegaProdQkv + m] = static_cast<uint64_t>(blocked[m]);
      blocked[m] = 0;
    }
  };
  const char* src;
  uint32_t bytes;
  for (uint32_t it = 0; NextStage<T>(a, bp, load, &src, &bytes); ++it) {
    if (timed && load.l != cur_l) {
      flush(cur_l);
      cur_l = load.l;
    }
    while (pf_more && pf_it <= it + a.pf_stages) {
      const char* ps;
      uint32_t pb;
      if (!NextStage<T>(a, bp, pf, &ps, &pb)) {
        pf_more = false;
        break;
      }
      if (pf_it > it) BulkPrefetchL2(ps, pb);  // (stage it itself is loaded right below)
      ++pf_it;
    }
    const int s = static_cast<int>(it % a.stages);
    if (it >= static_cast<uint32_t>(a.stages)) {
      const long long c0 = timed ? clock64() : 0;
      MbarWait(&sm.empty[s], ((it / a.stages) - 1) & 1);
      if (timed) {
        const long long d = clock64() - c0;
#pragma unroll
        for (int m = 0; m < 4; ++m) blocked[m] += load.m == m ? d : 0;  // (stays in registers)
      }
    }
    MbarExpect(&sm.full[s], bytes);
    BulkLoad(sm.ring + static_cast<size_t>(s) * a.stage_bytes, src, bytes, &sm.full[s]);
  }
  if (timed) flush(cur_l);
}

// Consume in kDecodeMegaFormOneLoop: the same phases in the same order, but the four matrices go
// through ONE call site of ConsumeRows (a runtime epilogue kind, the matrix loop not unrolled), so
// the stage loop's code exists once instead of four times (ncu: ~30 % of the warp stalls wait for
// instruction fetch).
template <typename T, bool kTl, int kForm>
__device__ void ConsumeOneLoop(const Args& a, const BlockPlan& bp, const Smem& sm, int pos, int ctx,
                               int64_t slot) {
  const DecodeMegaParams& p = a.p;
  const int H = p.hidden, I = p.intermediate, A = p.num_heads * p.head_dim;
  uint32_t it = 0;
  for (int l = 0; l < p.num_layers; ++l) {
    uint64_t* tl = kTl && threadIdx.x == 0 ? TimelineRow(p, l) : nullptr;
    Stamp(tl, kMegaLayerStart);
    LayerPtrs lp;
    lp.w = p.layers[l];
    lp.k_cache = static_cast<char*>(p.kv) + 2 * static_cast<size_t>(l) * p.layer_kv_bytes;
    lp.v_cache = lp.k_cache + p.layer_kv_bytes;
    const DecodeMegaLayer& w = lp.w;
    XRegs x;
    PhaseCycles cyc[4];
    int items = 0;
#pragma unroll 1
    for (int m = 0; m < 4; ++m) {
      int r0, r1, K = H, split = 0, out0 = 0;
      const void* bias;
      if (m == 0) {  // A: LayerNorm, q/k/v heads
        LayerNormRow<T>(a, sm, static_cast<const T*>(w.ln_w), static_cast<const T*>(w.ln_b));
        Stamp(tl, kMegaLnEnd);
        x = LoadX<T, false>(sm.x, H);
        r0 = bp.qkv0, r1 = bp.qkv1, split = p.head_dim, bias = w.qkv_b;
      } else if (m == 1) {  // A: fc1 rows (the same x)
        Stamp(tl, kMegaQkvEnd);
        r0 = bp.fc1_0, r1 = bp.fc1_1, bias = w.fc1_b;
      } else if (m == 2) {  // B: attention items, then fc2 rows
        Stamp(tl, kMegaFc1End);
        GridSync(p.sync, kForm);
        Stamp(tl, kMegaBarAEnd);
        for (int item = blockIdx.x; item < p.num_heads * a.nsplit; item += gridDim.x, ++items) {
          if constexpr ((kForm & kDecodeMegaFormLeanAttn) != 0) {
            AttentionItemLean<T, kForm>(a, sm, lp, item / a.nsplit, item % a.nsplit, ctx);
          } else {
            AttentionItem<T, kForm>(a, sm, lp, item / a.nsplit, item % a.nsplit, ctx);
          }
        }
        Stamp(tl, kMegaAttnEnd);
        x = LoadX<T, true>(p.act, I);
        r0 = bp.out0, r1 = bp.out1, K = I, out0 = bp.out0, bias = w.fc2_b;
      } else {  // C: dense rows + fc2 + residual -> h
        Stamp(tl, kMegaFc2End);
        GridSync(p.sync, kForm);
        Stamp(tl, kMegaBarBEnd);
        x = LoadX<T, true>(p.attn, A);
        r0 = bp.out0, r1 = bp.out1, K = A, out0 = bp.out0, bias = w.dense_b;
      }
      cyc[m] = ConsumeRows<T, -1, kTl, kForm>(a, sm, it, lp, static_cast<const T*>(bias), r0, r1, K,
                                              split, out0, pos, slot, x, m);
    }
    Stamp(tl, kMegaDenseEnd);
    if (l + 1 < p.num_layers) GridSync(p.sync, kForm);
    Stamp(tl, kMegaBarCEnd);
    if (tl != nullptr) {
      tl[kMegaWaitQkvFc1] = static_cast<uint64_t>(cyc[0].wait + cyc[1].wait);
      tl[kMegaFinishHead] = static_cast<uint64_t>(cyc[0].finish);
      tl[kMegaWaitFc2] = static_cast<uint64_t>(cyc[2].wait);
      tl[kMegaWaitDense] = static_cast<uint64_t>(cyc[3].wait);
      tl[kMegaAttnItems] = static_cast<uint64_t>(items);
    }
  }
}

template <typename T, bool kTl, int kForm>
__device__ void Consume(const Args& a, const BlockPlan& bp, const Smem& sm) {
  const DecodeMegaParams& p = a.p;
  const int H = p.hidden, I = p.intermediate, A = p.num_heads * p.head_dim;
  const int pos = __ldg(p.positions), ctx = __ldg(p.context_lens);
  const int64_t slot = __ldg(reinterpret_cast<const long long*>(p.slots));
  if constexpr ((kForm & kDecodeMegaFormOneLoop) != 0) {
    ConsumeOneLoop<T, kTl, kForm>(a, bp, sm, pos, ctx, slot);
    return;
  }
  uint32_t it = 0;
  for (int l = 0; l < p.num_layers; ++l) {
    uint64_t* tl = kTl && threadIdx.x == 0 ? TimelineRow(p, l) : nullptr;
    Stamp(tl, kMegaLayerStart);
    LayerPtrs lp;
    lp.w = p.layers[l];
    lp.k_cache = static_cast<char*>(p.kv) + 2 * static_cast<size_t>(l) * p.layer_kv_bytes;
    lp.v_cache = lp.k_cache + p.layer_kv_bytes;
    const DecodeMegaLayer& w = lp.w;
    // A: LayerNorm, q/k/v heads (rotated, K/V to the cache), fc1 rows.
    LayerNormRow<T>(a, sm, static_cast<const T*>(w.ln_w), static_cast<const T*>(w.ln_b));
    Stamp(tl, kMegaLnEnd);
    {
      const XRegs x = LoadX<T, false>(sm.x, H);
      const PhaseCycles cq =
          ConsumeRows<T, kEpiQkv, kTl, kForm>(a, sm, it, lp, static_cast<const T*>(w.qkv_b),
                                              bp.qkv0, bp.qkv1, H, p.head_dim, 0, pos, slot, x);
      Stamp(tl, kMegaQkvEnd);
      const PhaseCycles cf = ConsumeRows<T, kEpiFc1, kTl, kForm>(
          a, sm, it, lp, static_cast<const T*>(w.fc1_b), bp.fc1_0, bp.fc1_1, H, 0, 0, pos, slot, x);
      Stamp(tl, kMegaFc1End);
      if (tl != nullptr) {
        tl[kMegaWaitQkvFc1] = static_cast<uint64_t>(cq.wait + cf.wait);
        tl[kMegaFinishHead] = static_cast<uint64_t>(cq.finish);
      }
    }
    GridSync(p.sync, kForm);
    Stamp(tl, kMegaBarAEnd);
    // B: attention items, then fc2 rows (sums kept for C). act (fc2's input, in L2) is loaded
    // after the attention: held in registers across it, its 20 words spill the attention's.
    int items = 0;
    for (int item = blockIdx.x; item < p.num_heads * a.nsplit; item += gridDim.x, ++items) {
      AttentionItem<T, kForm>(a, sm, lp, item / a.nsplit, item % a.nsplit, ctx);
    }
    Stamp(tl, kMegaAttnEnd);
    const PhaseCycles c2 = ConsumeRows<T, kEpiFc2, kTl, kForm>(
        a, sm, it, lp, static_cast<const T*>(w.fc2_b), bp.out0, bp.out1, I, 0, bp.out0, pos, slot,
        LoadX<T, true>(p.act, I));
    Stamp(tl, kMegaFc2End);
    GridSync(p.sync, kForm);
    Stamp(tl, kMegaBarBEnd);
    // C: dense rows + fc2 + residual -> h.
    const PhaseCycles cd = ConsumeRows<T, kEpiDense, kTl, kForm>(
        a, sm, it, lp, static_cast<const T*>(w.dense_b), bp.out0, bp.out1, A, 0, bp.out0, pos, slot,
        LoadX<T, true>(p.attn, A));
    Stamp(tl, kMegaDenseEnd);
    if (l + 1 < p.num_layers) GridSync(p.sync, kForm);
    Stamp(tl, kMegaBarCEnd);
    if (tl != nullptr) {
      tl[kMegaWaitFc2] = static_cast<uint64_t>(c2.wait);
      tl[kMegaWaitDense] = static_cast<uint64_t>(cd.wait);
      tl[kMegaAttnItems] = static_cast<uint64_t>(items);
    }
  }
}

// kTl: the timeline instance (DecodeMegaParams::timeline set); the other one has no stamp at all.
template <typename T, bool kTl, int kForm>
__global__ void __launch_bounds__(kThreads, 1) DecodeMegaKernel(const Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  Smem sm;
  sm.ring = smem;
  sm.x = smem + a.off_x;
  sm.head = reinterpret_cast<float*>(smem + a.off_head);
  sm.out = reinterpret_cast<float*>(smem + a.off_out);
  sm.part = reinterpret_cast<float*>(smem + a.off_part);
  sm.q = reinterpret_cast<float*>(smem + a.off_q);
  sm.o = reinterpret_cast<float*>(smem + a.off_o);
  sm.scores = reinterpret_cast<float*>(smem + a.off_scores);
  sm.red2 = reinterpret_cast<float*>(smem + a.off_red2);
  sm.scratch = reinterpret_cast<float*>(smem + a.off_scratch);
  sm.blocks = reinterpret_cast<int*>(smem + a.off_blocks);
  sm.full = reinterpret_cast<uint64_t*>(smem + a.off_bars);
  sm.empty = sm.full + kMaxStages;
  sm.rowoff = reinterpret_cast<int64_t*>(smem + a.off_rowoff);
  if (threadIdx.x == 0) {
    for (int s = 0; s < a.stages; ++s) {
      MbarInit(&sm.full[s], 1);
      MbarInit(&sm.empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const BlockPlan bp = MakePlan(a.p, reinterpret_cast<int*>(sm.scratch + 24));
  if (threadIdx.x >= kConsumers) {
    if (threadIdx.x == kConsumers) Produce<T, kTl>(a, bp, sm);
    return;
  }
  // The block's row of the timeline header: clock64 and %globaltimer at its start and end.
  uint64_t* head = nullptr;
  if (kTl && threadIdx.x == 0 && blockIdx.x < a.p.timeline_blocks) {
    head = a.p.timeline +
           (static_cast<size_t>(blockIdx.x) * (a.p.timeline_layers + 1) + a.p.timeline_layers) *
               kDecodeMegaEvents;
    head[0] = clock64();
    head[1] = cuda::GlobalTimerNs();
  }
  Consume<T, kTl, kForm>(a, bp, sm);
  if (head != nullptr) {
    head[2] = clock64();
    head[3] = cuda::GlobalTimerNs();
    head[4] = 1;
    head[5] = gridDim.x;
  }
}

struct DeviceLimits {
  int sms = 0;
  int smem_optin = 0;
  bool ok = false;  // sm_90+ with cooperative launch
};

DeviceLimits Limits() {
  static std::atomic<int> sms[64], optin[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return {};
  if (sms[dev].load() == 0) {
    int v = 0, o = 0, cc = 0, coop = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&o, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
    if (cc < 9 || coop == 0) v = -1;
    optin[dev].store(o);
    sms[dev].store(v);
  }
  DeviceLimits lim;
  lim.sms = sms[dev].load();
  lim.smem_optin = optin[dev].load();
  lim.ok = lim.sms > 0;
  return lim;
}

int RoundUp(int v, int m) { return (v + m - 1) / m * m; }

// The most fc1 rows any block gets (MakePlan's rule, on the host).
int MaxFc1Rows(const DecodeMegaParams& p, int blocks) {
  int prev = 0, most = 0, end = 0;
  for (int b = 0; b < blocks; ++b) {
    end = std::max(end, Fc1EndCandidate(p, b, blocks));
    const int e = b == blocks - 1 ? p.intermediate : end;
    most = std::max(most, e - prev);
    prev = e;
  }
  return most;
}

// Shared-memory layout and ring of `p` on a device with `lim`; stages 0 when it does not fit.
Args MakeArgs(const DecodeMegaParams& p, const DeviceLimits& lim, int* smem_bytes) {
  Args a;
  a.p = p;
  const int es = static_cast<int>(DataTypeSize(p.dtype));
  const int A = p.num_heads * p.head_dim;
  const int max_k = std::max(std::max(p.hidden, p.intermediate), A);
  const int row = max_k * es;
  const int target = p.stage_kb > 0 ? p.stage_kb * 1024 : kStageTarget;
  a.stage_bytes = RoundUp(row * std::max(1, target / row), 128);
  const int blocks = p.blocks > 0 ? std::min(p.blocks, lim.sms) : lim.sms;
  a.p.blocks = blocks;
  const int out_rows = (p.hidden + blocks - 1) / std::max(blocks, 1);
  int off = 0;
  auto take = [&](int bytes) {
    const int at = off;
    off += RoundUp(bytes, 16);
    return at;
  };
  a.off_x = take(p.hidden * es);
  a.off_head = take(p.head_dim * 4);
  a.off_out = take(out_rows * 4);
  a.off_part =
      take(std::max(std::max(out_rows, p.head_dim), MaxFc1Rows(p, blocks)) * kConsumerWarps * 4);
  a.off_q = take(p.head_dim * 4);
  a.off_o = take(p.head_dim * 4);
  a.off_scores = take(kItemChunk * 4);
  a.off_red2 = take(kConsumers * 8 * 4);
  a.off_scratch = take(32 * 4);
  a.off_blocks = take((kItemChunk + 1) * 4);
  a.off_bars = take(2 * kMaxStages * 8);
  a.form = p.form < 0 ? kDefaultForm : p.form;
  a.off_rowoff = take((a.form & kDecodeMegaFormLeanAttn) != 0 ? kItemChunk * 8 : 0);
  const int fixed = off;
  const int avail = lim.smem_optin - 1024 - fixed;  // static shared memory and a margin
  int stages = avail > 0 ? avail / a.stage_bytes : 0;
  stages = std::min(stages, kMaxStages);
  if (p.stages > 0) {
    stages = p.stages <= stages ? p.stages : 0;
  } else {
    stages = std::min(stages, kDefaultStages);
  }
  a.stages = stages;
  // Every offset moves past the ring.
  const int ring = stages * a.stage_bytes;
  for (int* o : {&a.off_x, &a.off_head, &a.off_out, &a.off_part, &a.off_q, &a.off_o, &a.off_scores,
                 &a.off_red2, &a.off_scratch, &a.off_blocks, &a.off_bars, &a.off_rowoff}) {
    *o += ring;
  }
  a.nsplit = std::max(1, std::min(kDecodeMegaMaxSplits, blocks / std::max(p.num_heads, 1)));
  const int pf_kb = p.prefetch_kb == 0 ? kDefaultPrefetchKb : std::max(p.prefetch_kb, 0);
  a.pf_stages = pf_kb > 0 ? std::max(1, pf_kb * 1024 / a.stage_bytes) : 0;
  *smem_bytes = ring + fixed;
  return a;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, bool kTl, int kForm>
KernelStatus Launch(const Args& a, int smem, cudaStream_t stream) {
  auto kernel = DecodeMegaKernel<T, kTl, kForm>;
  static std::atomic<uint64_t> opted{0};
  int dev = 0;
  cudaGetDevice(&dev);
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if ((opted.load() & bit) == 0) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Limits().smem_optin - 1024) != cudaSuccess) {
      return KernelStatus::kDeviceError;
    }
    opted.fetch_or(bit);
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(a.p.blocks);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;  // all blocks resident: the grid barrier is safe
  attr[0].val.cooperative = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  if (cudaLaunchKernelEx(&config, kernel, a) != cudaSuccess) return KernelStatus::kDeviceError;
  return cuda::LaunchStatus();
}

}  // namespace decode_mega

using decode_mega::Aligned16;
using decode_mega::Args;
using decode_mega::DeviceLimits;
using decode_mega::kConsumers;
using decode_mega::kDefaultForm;
using decode_mega::kHeadWord;
using decode_mega::kMaxPairs;
using decode_mega::kMaxStages;
using decode_mega::Launch;
using decode_mega::Limits;
using decode_mega::MakeArgs;


size_t DecodeMegaSyncBytes(int num_heads) {
  return sizeof(uint32_t) * static_cast<size_t>(kHeadWord + std::max(num_heads, 0));
}

size_t DecodeMegaPartialsBytes(int num_heads, int head_dim) {
  return sizeof(float) * static_cast<size_t>(num_heads) * kDecodeMegaMaxSplits * (head_dim + 2);
}

bool DecodeMegaCudaSupports(const DecodeMegaParams& p) {
  if (p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) return false;
  if (p.num_layers < 1 || p.hidden < 8 || p.intermediate < 8 || p.num_heads < 1 ||
      p.num_kv_heads < 1 || p.head_dim < 8) {
    return false;
  }
  if (p.hidden % 8 != 0 || p.intermediate % 8 != 0 || p.head_dim % 8 != 0 || p.head_dim > 256 ||
      p.num_heads % p.num_kv_heads != 0 || p.rotary_dim < 0 || p.rotary_dim % 2 != 0 ||
      p.rotary_dim > p.head_dim || p.block_size < 1 || p.num_blocks < 0) {
    return false;
  }
  // Slots fit in 32 bits (FinishHead addresses the new token's K/V without a 64-bit division).
  if (static_cast<int64_t>(p.num_blocks) * p.block_size > INT32_MAX) return false;
  if (p.blocks < 0 || p.stages < 0 || p.stages > kMaxStages || p.stage_kb < 0) return false;
  if (p.timeline != nullptr && (p.timeline_layers < 0 || p.timeline_blocks < 0)) return false;
  // The forms compiled (DecodeMegaCuda's instances); the timeline in all but form 1.
  const int form = p.form < 0 ? kDefaultForm : p.form;
  if (form != 0 && form != 1 && form != 3 && form != 7 && form != 11 && form != 75) return false;
  if (p.timeline != nullptr && form == 1) return false;
  // Every consumer thread holds its pairs of each phase's input vector (XRegs).
  const int max_k = std::max(std::max(p.hidden, p.intermediate), p.num_heads * p.head_dim);
  if (max_k > 2 * kConsumers * kMaxPairs) return false;
  if (!Aligned16(p.h) || !Aligned16(p.q) || !Aligned16(p.act) || !Aligned16(p.attn) ||
      !Aligned16(p.kv) || p.layer_kv_bytes % 16 != 0) {
    return false;
  }
  const DeviceLimits lim = Limits();
  if (!lim.ok) return false;
  int smem = 0;
  const Args a = MakeArgs(p, lim, &smem);
  if (a.stages < 2 || smem + 1024 > lim.smem_optin) return false;
  // Every block's output rows fit its fc2 sums (out rows is sized by the same rule).
  return a.p.blocks >= 1;
}

KernelStatus DecodeMegaCuda(const DecodeMegaParams& p, cudaStream_t stream) {
  if (!p.layers || !p.kv || !p.positions || !p.slots || !p.context_lens || !p.block_table || !p.h ||
      !p.q || !p.act || !p.attn || !p.partials || !p.sync) {
    return KernelStatus::kNullPointer;
  }
  if (!DecodeMegaCudaSupports(p)) return KernelStatus::kInvalidShape;
  int smem = 0;
  const Args a = MakeArgs(p, Limits(), &smem);
  return cuda::DispatchHalfTypes(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Instances: forms 0, 1, 3, 7 (each adds one change), 11 (3 + one loop) and 75 (11 + the
    // lean attention items); the timeline for all but 1.
    const bool tl = a.p.timeline != nullptr;
    switch (a.form) {
      case 0:
        return tl ? Launch<T, true, 0>(a, smem, stream) : Launch<T, false, 0>(a, smem, stream);
      case 1:
        return Launch<T, false, 1>(a, smem, stream);
      case 3:
        return tl ? Launch<T, true, 3>(a, smem, stream) : Launch<T, false, 3>(a, smem, stream);
      case 7:
        return tl ? Launch<T, true, 7>(a, smem, stream) : Launch<T, false, 7>(a, smem, stream);
      case 11:
        return tl ? Launch<T, true, 11>(a, smem, stream) : Launch<T, false, 11>(a, smem, stream);
      default:
        return tl ? Launch<T, true, 75>(a, smem, stream) : Launch<T, false, 75>(a, smem, stream);
    }
  });
}

}  // namespace phishard
