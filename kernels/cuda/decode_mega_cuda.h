// Persistent decode kernel for 1-row decode steps (issue #4): every layer of a Phi decode step
// for ONE sequence in one launch, so the weight stream never stops between ops.
//
// Math (per layer l, Phi's parallel residual; the same rounding points as the op-by-op path of
// model/cuda_phi_step.cc with the fused dense + fc2 GEMV):
//   n    = dtype(LayerNorm(h) * ln_w + ln_b)                      float32 statistics
//   qkv  = dtype(Wqkv n + b_qkv); q, k rotated (rotary_kv_write.h), dtype again; K/V -> cache slot
//   a    = dtype(act(Wfc1 n + b_fc1))                              GELU-tanh or GELU-erf
//   attn = dtype(softmax(scale q K^T) V) over the sequence's context_lens[0] cached positions
//   h    = dtype(h + Wdense attn + b_dense + Wfc2 a + b_fc2)       one float32 sum, one rounding
// float32 accumulation everywhere; the row's position, slot, context length and block table are
// read on the device (so a captured graph replays any step).
//
// Structure: grid = one block per SM (cooperative launch), 8 consumer warps + 1 producer warp.
// Block b owns a fixed slice of every weight matrix: whole q/k/v heads and a row range of fc1
// (phase A), a row range r of the output (fc2 rows r in phase B, dense rows r in phase C). The
// producer streams the block's weight rows, layer after layer, through a shared-memory ring of
// bulk copies (cp.async.bulk + mbarrier) in the consumers' program order, so while the consumers
// wait at a grid barrier the next phase's weights are already arriving. The consumer warps never
// meet per stage: each thread holds its element pairs of the phase's input vector in registers,
// each warp sums its lanes' share of every row of a stage into per-warp partials in shared memory
// and releases the stage alone; the 8 partials of a row are summed once per head (q/k/v) or at
// the end of the block's rows (fc1, fc2, dense). Phase B also runs the
// attention, split over (query head, context split) items whose last finisher merges the splits.
// Three grid barriers a layer (after A, B and C; the last one is the launch's end).
//
// Measured on the H200 (docs/perf-log.md, mega runs 1-2, mega-next, mega2 runs 1-2): correct, but
// SLOWER than the op-by-op path (b1 ctx1024 2.72 against 2.09 ms; the kernel reads at ~2.1 TB/s,
// ~16 KB/us a block). Neither the consumer (this form: no CTA barrier a stage, 30 % fewer
// instructions than the per-stage-barrier form), the producer (one bulk copy a stage, 8, or
// cp.async from 32 lanes), the ring depth (3-10 stages) nor the stage size (20 / 40 KB) moves that
// rate, so the model keeps it opt-in; bench/stream_probe.cu measures the ring alone.
// mega3's timeline (DecodeMegaParams::timeline, phishard_bench --mega-timeline) says where a
// layer's ~84 us go: ~51 us in the streaming phases, whose rate the consumers set (they wait on
// the ring <= 1.3 us a phase while the producer waits on a full ring), attention 21 us at ctx1024
// (a latency chain), LayerNorm 4, three barriers ~7; ncu: ~30 % of warp stalls no_instruction.
// mega4 (perf-log, runs 1-2): the attention items' K/V streamed through the ring (one bulk copy a
// 160-byte cache row, on the [block, token, head, dim] cache layout of then: ~4 KB/us a block,
// slower) or prefetched into L2 by the producer warp (items no shorter) were both slower than
// form 11 at every context (branches mega4-kvring, mega4-kvpf); a 3-stage ring is faster than 5
// at every context (the default since).
// mega5 (perf-log, runs 1-2): the attention items on 3 warps of their own while the consumers
// stream fc2 (phase B as max(attention, fc2) instead of their sum) were slower at every context,
// with or without their K/V staged in shared memory before barrier A: beside the stream an item
// takes ~2x as long (26-33 us at ctx 128-1024 against 14-19), so the consumers wait for it at
// barrier B (branch mega5-attnwarps).
// The kernel keeps state between launches in `sync` (a barrier generation, per-head counters):
// allocate it once, zeroed, and never share it between two launches in flight.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/gemm.h"
#include "kernels/kernel_status.h"

namespace phishard {

inline constexpr int kDecodeMegaMaxSplits = 16;

// Phase timeline (DecodeMegaParams::timeline; tests and benchmarks): per block b < timeline_blocks
// and layer l < timeline_layers, kDecodeMegaEvents uint64 words at
// timeline[(b * (timeline_layers + 1) + l) * kDecodeMegaEvents]: the SM's clock64 at the phase
// boundaries below as consumer thread 0 passes them (kMegaLayerStart .. kMegaBarCEnd; the last
// layer's kMegaBarCEnd is its dense end), then cycle sums: consumer thread 0 waiting for a ring
// stage (per phase), inside FinishHead (q/k/v epilogue + rotary + store, with its barriers), the
// attention items the block ran, and the producer blocked on a full ring while issuing each
// matrix's stages. Row l = timeline_layers of a block: [0] clock64 and [1] %globaltimer (ns) at
// the block's start, [2] and [3] at its end, [4] 1 (written), [5] gridDim.x.
enum DecodeMegaEvent : int {
  kMegaLayerStart = 0,
  kMegaLnEnd,
  kMegaQkvEnd,
  kMegaFc1End,  // = arrival at grid barrier A
  kMegaBarAEnd,
  kMegaAttnEnd,
  kMegaFc2End,  // arrival at B
  kMegaBarBEnd,
  kMegaDenseEnd,  // arrival at C
  kMegaBarCEnd,
  kMegaWaitQkvFc1,  // cycle sums from here on
  kMegaWaitFc2,
  kMegaWaitDense,
  kMegaFinishHead,
  kMegaAttnItems,  // a count
  kMegaProdQkv,
  kMegaProdFc1,
  kMegaProdFc2,
  kMegaProdDense,
  kDecodeMegaEvents = 20,
};

// One layer's weights (device, dtype), as CudaPhiModel holds them: qkv fused
// [(nH + 2 nKV) hd, H], dense [H, nH hd], fc1 [I, H], fc2 [H, I]; biases [rows].
struct DecodeMegaLayer {
  const void *ln_w, *ln_b, *qkv_w, *qkv_b, *dense_w, *dense_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
};

// Forms of the kernel (DecodeMegaParams::form bits), each computing the same values bit for bit:
// the attention item's tail with one acq_rel atomic and the split merge's loads all in flight;
// the grid barrier with fewer memory round trips; 16 shared loads a batch in the stage loop
// instead of 8. Compiled: forms 0, 1, 3 (the default) and 7. Measured (mega3 run 2, b1 ms at ctx
// 128 / 1024 / 4096): form 0 2.560 / 2.693 / 3.700, 1 2.584 / 2.730 / 3.757, 3 2.559 / 2.674 /
// 3.660, 7 2.633 / 2.766 / 3.768 - more code is slower: ncu puts ~30 % of the warps' stalls on
// no_instruction (instruction fetch), the largest reason.
inline constexpr int kDecodeMegaFormAttnTail = 1;
inline constexpr int kDecodeMegaFormBarrier = 2;
inline constexpr int kDecodeMegaFormPipe = 4;
// One inlined copy of the stage loop for all four matrices (a runtime epilogue kind): form 11 =
// 3 + this (half the machine code of form 3; b1 ctx1024 2.17 ms against 2.68 on an H200,
// docs/perf-log.md 04:27).
inline constexpr int kDecodeMegaFormOneLoop = 8;
// Attention items with each cache row's offset computed once a chunk and shared, q read as float4
// (decode_mega_attention_lean.cuh): fewer instructions on the item's dependent chain. Form 75 =
// 11 + this (bit 64: bits 16 and 32 named unlanded experiments in perf-log, mega4 runs 1-2), the
// default: b1 1.883 / 2.045 / 2.733 ms at ctx 128 / 1024 / 4096 against form 11's 1.978 / 2.131 /
// 2.940 (H200, perf-log mega5 run 1).
inline constexpr int kDecodeMegaFormLeanAttn = 64;
inline constexpr int kDecodeMegaFormAll = 79;

struct DecodeMegaParams {
  const DecodeMegaLayer* layers = nullptr;  // [num_layers] device
  int num_layers = 0;
  // Layer l's K cache at kv + 2 l layer_kv_bytes, its V cache right after; each
  // [num_blocks, nKV, block_size, hd] dtype (kernels/kv_layout.h: one (block, KV head)'s
  // block_size keys contiguous). block_size and num_kv_heads (below) address it.
  void* kv = nullptr;
  size_t layer_kv_bytes = 0;
  int num_blocks = 0;
  int block_size = 0;
  // The row's inputs (device; only element 0 is read): position, cache slot (< 0: write none),
  // context length after this step (0: padding row, attention output 0), block table row.
  const int32_t* positions = nullptr;
  const int64_t* slots = nullptr;
  const int32_t* context_lens = nullptr;
  const int32_t* block_table = nullptr;
  void* h = nullptr;          // [H] device, dtype: the embedding row in, the residual out
  void* q = nullptr;          // [nH hd] device scratch, dtype (rotated q)
  void* act = nullptr;        // [I] device scratch, dtype
  void* attn = nullptr;       // [nH hd] device scratch, dtype
  float* partials = nullptr;  // DecodeMegaPartialsBytes device scratch
  uint32_t* sync = nullptr;   // DecodeMegaSyncBytes device, zeroed once, kept between launches
  int hidden = 0, intermediate = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int rotary_dim = 0;
  float theta = 10000.0f;
  float eps = 1e-5f;
  float scale = 0.0f;  // attention score scale, usually 1 / sqrt(head_dim)
  GemmEpilogue act_fn = GemmEpilogue::kGeluTanh;
  DataType dtype = DataType::kBF16;
  // Tuning (0: defaults): blocks (<= SMs), ring stages (default 3, fewer where they do not fit),
  // smallest stage in KiB (rounded down to whole rows of the longest matrix row; default 40).
  int blocks = 0;
  int stages = 0;
  int stage_kb = 0;
  // L2 lookahead (KiB of the block's weight stream past the ring's next stage, issued as
  // cp.async.bulk.prefetch.L2, so DRAM keeps streaming while a full ring waits for the consumers);
  // 0: the kernel's default, < 0: off.
  int prefetch_kb = 0;
  // kDecodeMegaForm* bits; < 0: the kernel's default.
  int form = -1;
  // Timeline (see DecodeMegaEvent); null: off. Device, zeroed by the caller if it wants to tell
  // unwritten rows; [timeline_blocks, timeline_layers + 1, kDecodeMegaEvents] uint64.
  uint64_t* timeline = nullptr;
  int timeline_layers = 0;
  int timeline_blocks = 0;
};

size_t DecodeMegaSyncBytes(int num_heads);
size_t DecodeMegaPartialsBytes(int num_heads, int head_dim);

// Shapes the kernel handles on the current device (kF16 / kBF16, H, I and hd multiples of 8, hd
// <= 256, nKV dividing nH, even rotary_dim <= hd, block_size >= 1, num_blocks x block_size <
// 2^31 slots, 16-byte aligned weights, a ring of >= 2 stages fitting in shared memory,
// cooperative launch). Pointers other than the weights are not checked.
bool DecodeMegaCudaSupports(const DecodeMegaParams& p);

// kInvalidShape when !DecodeMegaCudaSupports(p); kDeviceError when the launch is refused.
// Never allocates. One launch (cooperative) on `stream`; capturable into a CUDA graph.
KernelStatus DecodeMegaCuda(const DecodeMegaParams& p, cudaStream_t stream);

}  // namespace phishard
