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
// counters; three deterministic forms of the sums (int64 fixed-point atomics, block slots summed
// in a fixed order, and the "owner" form: fc2 / dense rows as stored, every output column computed
// by one block, no sums at all). A profile (clock64 per block and layer) splits a step form's
// consumer time. docs/decode-stream-design.md has the design and every form's numbers. Measured
// (perf-log 2026-11-30 18:2x-18:3x, session 27; us a layer, ctx 1024): the stream alone 45-46 (a
// launch a layer), 43.8-45.7 (PDL), 41.3-42.4 (one launch a step, 4 stages, 4 acc copies); with the
// attention: 47.2-48.9 (a launch a layer + PDL + the attention as dependent), 50-58 (persistent
// StepAttn), 83-97 (attention items in the stream: their latency chains stall the consumers), 58-68
// with the attention warps, 64-key items a block or 32-key items a warp (46.3-49 when dense does
// not wait for them: the attention's own cost beside the stream is ~3 us a layer, and its items end
// 8-20 us after the MLP chunks); the deterministic forms 4-10 us a layer above the float-atomics
// one (perf-log 18:50-18:55) — and not deterministic after all, since items come from a counter.
// The grid sums (`qsum`, session 28, perf-log 19:24) are: every item's contribution is rounded to
// a per-column power-of-two grid before it joins a sum, so every sum is exact in any order; same
// speed as the float atomics, 0 differing sums over 5 pairs of runs. Today's op-by-op b1 layer:
// ~55.
//
// Shape: Phi-2's layer (K = 2560, 32 heads x 80, I = 10240, bf16; 157 MB of weights + 10.5 MB of
// K/V at ctx 1024), 32 layers with distinct weights (5 GB: no L2 reuse between layers). The probe
// has no rotary and no new-row K/V store (the real attention adds them after q arrives), and its
// outputs are not checked against a reference beyond finiteness (bench/mlp_probe.cu checks the
// MLP's arithmetic).
// Usage: phishard_layer_probe [ctx (default 1024)] [pdl (only the best forms) | qsum (float atomics
// against grid sums, then each one's run-to-run bit identity)]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_device.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/decode_stream_cuda.h"
#include "kernels/cuda/gelu_math.cuh"
#include "kernels/cuda/sm90_ptx.cuh"
#include "kernels/cuda/stream_stage.cuh"

namespace phishard::bench {
namespace {

constexpr const char* kProg = "phishard_layer_probe";
constexpr int kHd = 80, kBs = 16, kAttnThreads = 128;

#define LP_CHECK(call) PHI_BENCH_CHECK(kProg, call)

using bf16 = __nv_bfloat16;

// (order matters: the stream uses fused_mlp's stage operations, the attention the stream's helpers)
// clang-format off
#include "bench/fused_mlp.cuh"
#include "bench/layer_probe_stream.cuh"
// clang-format on
// clang-format off
#include "bench/layer_probe_attention.cuh"
// clang-format on

float ElapsedMs(cudaEvent_t a, cudaEvent_t b) { return ElapsedMsOrDie(a, b, kProg); }

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
                        bool owner = false, bool qsum = false) {
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
        .qsum = qsum,
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
  for (int w = 0; w < 2; ++w) {  // grid sums: dense waits / stream alone
    for (int l = 0; l < L; ++l) {
      h_fixed.push_back(layer_args(l, w == 0, 4, false, -1, 0, 0, false, false, false, true));
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
    bool qsum = false;                         // grid sums (4 copies)
    bool lib = false;  // the library's kernel (kernels/cuda/decode_stream_cuda.h), grid sums
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
    if (f.qsum) la = fixed_args + static_cast<size_t>(L) * (f.wait ? 5 : 6);
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
    if (f.lib) {  // the same operands through DecodeStreamLayerCuda (no biases in the fold here)
      for (int l = 0; l < L; ++l) {
        const LayerArgs& q = h_fixed[static_cast<size_t>(L) * 5 + l];
        DecodeStreamParams p;
        p.layer = DecodeStreamLayer{.ln_w = q.ln_w,
                                    .ln_b = q.ln_b,
                                    .qkv_w = q.wqkv,
                                    .qkv_b = q.bqkv,
                                    .fc1_w = q.w1,
                                    .fc1_b = q.b1,
                                    .fc2_wt = q.w2t,
                                    .dense_wt = q.wdt,
                                    .h_in = q.h_in,
                                    .sums_in = q.acc_in,
                                    .prev_counters = q.prev_ctr,
                                    .h_out = q.h_out,
                                    .qkv = q.qkv,
                                    .attn = q.o,
                                    .sums = q.acc,
                                    .counters = q.ctr};
        p.hidden = K;
        p.intermediate = I;
        p.num_heads = p.num_kv_heads = heads;
        p.head_dim = kHd;
        p.attn_heads = f.keys > 0 ? heads : 0;
        p.stages = f.stages;
        p.programmatic_launch = l > 0;
        if (DecodeStreamLayerCuda(p, st) != KernelStatus::kOk) {
          std::fprintf(stderr, "%s: DecodeStreamLayerCuda refused layer %d\n", kProg, l);
          std::exit(1);
        }
        if (f.keys > 0) LaunchAttention(h_aargs[l], f.keys, ctx, st);
      }
      return;
    }
    for (int l = 0; l < L; ++l) {
      if (f.pdl && l > 0) {
        LaunchPdl(LayerStream<KC>, dim3(132), dim3(threads), smem, st, la + l, 1, f.stages,
                  static_cast<long long*>(nullptr));
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
  // argv[2] == "qsum": the float-atomics form against the grid sums (with the attention and the
  // stream alone), then each one's run-to-run bit identity.
  const bool qsum_only = argc > 2 && std::string(argv[2]) == "qsum";
  // argv[2] == "lib": the grid-sums form against the library's kernel, with the attention / alone.
  const bool lib_only = argc > 2 && std::string(argv[2]) == "lib";
  auto with_lib = [](Form f) {
    f.lib = true;
    return f;
  };
  auto with_qsum = [](Form f) {
    f.qsum = true;
    return f;
  };
  const Form float_attn{2, 64, true, true, false, 0, 1},
      float_alone{2, 0, false, true, false, 0, 1};
  const std::vector<Form> forms =
      qsum_only  ? std::vector<Form>{float_attn, with_qsum(float_attn), float_alone,
                                     with_qsum(float_alone)}
      : lib_only ? std::vector<Form>{with_qsum(float_attn), with_lib(float_attn),
                                     with_qsum(float_alone), with_lib(float_alone)}
      : pdl_only ? std::vector<Form>{Form{2, 0, false, true, false, 0, 1},
                                     Form{2, 64, true, true, false, 0, 1},
                                     Form{2, 128, true, true, false, 0, 1},
                                     Form{2, 32, true, true, false, 0, 1},
                                     Form{2, 64, false, true, false, 0, 1},
                                     Form{2, 64, true, true, false, 0, 1, false, -1, 0, false,
                                          false, true},
                                     Form{2, 64, true, true, false, 0, 1, false,
                                          -1, 0, false, false, false, true},
                                     Form{2, 0, false, true, false, 0, 1, false,
                                          -1, 0, false, false, false, true},
                                     Form{2, 64, true, true, false, 0, 1, false,
                                          -1, 0, false, false, false, false, true},
                                     Form{2, 0, false, true, false, 0, 1, false,
                                          -1, 0, false, false, false, false, true},
                                     Form{3, 64, true, true, false, 0, 1, false,
                                          -1, 0, false, false, false, false, true},
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
        if (f.qsum) std::snprintf(attn, sizeof(attn), "%s grid sums", f.keys ? "64 keys" : "none");
        if (f.lib) std::snprintf(attn, sizeof(attn), "%s library", f.keys ? "64 keys" : "none");
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
      pdl_only || qsum_only || lib_only
          ? std::vector<Form>{}
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

  // Run-to-run identity: each form twice, every layer's sums (acc) and h compared bit for bit,
  // and the grid sums' h against the float-atomics form's.
  if (qsum_only) {
    const size_t acc_n = size_t{K} * L * kMaxCopies, h_n = size_t{K} * (L + 1);
    auto run_once = [&](const Form& f, std::vector<float>& ha, std::vector<bf16>& hh) {
      chain(f);
      LP_CHECK(cudaStreamSynchronize(st));
      LP_CHECK(cudaGetLastError());
      ha.resize(acc_n);
      hh.resize(h_n);
      LP_CHECK(cudaMemcpy(ha.data(), acc, 4 * acc_n, cudaMemcpyDeviceToHost));
      LP_CHECK(cudaMemcpy(hh.data(), hbuf, 2 * h_n, cudaMemcpyDeviceToHost));
    };
    // Layer l's output sums as the next layer's fold reads them: the 4 copies added in order.
    auto layer_sums = [&](const std::vector<float>& ha, int l) {
      std::vector<float> out(K, 0.0f);
      for (int c = 0; c < 4; ++c) {
        for (int i = 0; i < K; ++i) out[i] += ha[(size_t{K} * kMaxCopies * l) + size_t{K} * c + i];
      }
      return out;
    };
    std::vector<bf16> h_float;
    std::vector<float> sums0_float;
    for (const Form& f : {float_attn, with_qsum(float_attn)}) {
      std::vector<float> a1, a2;
      std::vector<bf16> h1, h2;
      int acc_diff = 0, h_diff = 0;
      for (int rep = 0; rep < 5; ++rep) {
        run_once(f, a1, h1);
        run_once(f, a2, h2);
        for (int l = 0; l < L; ++l) {
          const std::vector<float> s1 = layer_sums(a1, l), s2 = layer_sums(a2, l);
          for (int i = 0; i < K; ++i) acc_diff += s1[i] != s2[i] ? 1 : 0;
        }
        for (size_t i = 0; i < h_n; ++i)
          h_diff += __bfloat162float(h1[i]) != __bfloat162float(h2[i]) ? 1 : 0;
      }
      std::printf("%s: 5 pairs of runs: %d of %d layer sums and %d of %zu h values differ\n",
                  f.qsum ? "grid sums" : "float atomics", acc_diff, 5 * L * K, h_diff, 5 * h_n);
      if (!f.qsum) {
        h_float = h1;
        sums0_float = layer_sums(a1, 0);
      } else {
        // Layer 0 has the same input in both forms: its sums differ by the grid's roundings only.
        const std::vector<float> s0 = layer_sums(a1, 0);
        double max_d = 0.0, max_s = 0.0, ss_d = 0.0, ss_s = 0.0;
        for (int i = 0; i < K; ++i) {
          const double d = static_cast<double>(s0[i]) - sums0_float[i];
          max_d = std::max(max_d, std::fabs(d));
          max_s = std::max(max_s, std::fabs(static_cast<double>(sums0_float[i])));
          ss_d += d * d;
          ss_s += static_cast<double>(sums0_float[i]) * sums0_float[i];
        }
        std::printf(
            "layer 0's sums, grid vs float atomics: max |diff| %.3g (max |sum| %.3g), "
            "rms diff %.3g (rms sum %.3g)\n",
            max_d, max_s, std::sqrt(ss_d / K), std::sqrt(ss_s / K));
        double max_abs = 0.0, max_h = 0.0;
        for (size_t i = size_t{K} * L; i < h_n; ++i) {
          const double x = __bfloat162float(h1[i]), y = __bfloat162float(h_float[i]);
          max_abs = std::max(max_abs, std::fabs(x - y));
          max_h = std::max(max_h, std::fabs(y));
        }
        std::printf(
            "grid sums vs float atomics, h after the last layer: max |diff| %.3g (max |h| "
            "%.3g)\n",
            max_abs, max_h);
      }
    }
  }

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
