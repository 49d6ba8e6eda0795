// One Phi layer of a 1-row decode step as ONE weight stream (issue #4, decode batch 1;
// docs/decode-stream-design.md has the design, its measurements and the plan it is a step of).
//
// Math of layer l (Phi's parallel residual; float32 accumulation, dtype roundings as marked):
//   h_l  = dtype(h_{l-1} + S_{l-1} + b_dense_{l-1} + b_fc2_{l-1})   (the fold; h_0 = embedding)
//   x    = dtype(LayerNorm(h_l) * ln_w + ln_b)                      float32 statistics, 2 passes
//   qkv  = dtype(Wqkv x + b_qkv)                                    un-rotated (the attention's)
//   a    = dtype(act(Wfc1 x + b_fc1))                               GELU-tanh or GELU-erf
//   S_l  = Wfc2 a + Wdense attn                                     float32, the "grid sums"
// where attn is the layer's attention output (nH hd, dtype; another kernel's, see below). S_l has
// no biases: the next layer's fold (or DecodeStreamFoldCuda after the last layer) adds them.
// S_l is summed on a grid (kernels/cuda/stream_stage.cuh, GridMagic): every item's contribution
// to column c is rounded to a multiple of q_c = 2^(E_c - 16), 2^E_c >= max(|h_l[c]|, rms(h_l)),
// so the float atomics that add the blocks' partials give the same bits in any order (a column
// whose |S| leaves 2^(E_c + 8) rounds as plain float32 sums do there).
//
// Structure: one block an SM, K / 256 consumer warps (K = hidden, a multiple of 256) and one
// producer warp that streams R x K weight stages (R = K / 256 rows) through a shared-memory ring
// of bulk copies. The producer takes items from a per-layer counter in this order: q/k/v chunks
// (R rows of Wqkv), MLP chunks (R rows of Wfc1, then the same R rows of Wfc2 TRANSPOSED), dense
// chunks (R rows of Wdense TRANSPOSED); weights never depend on the layer before, so a layer's
// producer starts at once. The consumers first fold h and the LayerNorm (waiting until every block
// of the layer before has flushed), then run the items; at the end each block adds its float32
// partial S into one of kDecodeStreamCopies copies (float atomics) and counts itself done.
//
// Synchronisation (device counters, DecodeStreamLayer::counters, zeroed before the step): the
// block's q/k/v rows are published by a release count kStreamQkvDone (the attention kernel spins
// on it), the dense chunks spin on kStreamHeadsDone >= attn_heads (the attention counts each head
// once its output is stored; attn_heads = 0: attn is ready before the launch), the fold on the
// previous layer's kStreamBlocksDone. No wait is on a kernel launched later or on a block not yet
// started: layer l + 1 (and the attention) are launched as programmatic dependents, and every
// block triggers its dependents at its start. A wait that does not end within ~10 s traps (a bug
// must end in an error, not a hang).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/gemm.h"
#include "kernels/kernel_status.h"

namespace phishard {

// Per-layer counters (int32, in DecodeStreamLayer::counters).
enum DecodeStreamCounter : int {
  kStreamNext = 0,                // the item counter (the producers')
  kStreamBlocksDone = 1,          // blocks whose partial S is added
  kStreamQkvDone = 2,             // q/k/v chunks whose rows are written (release)
  kStreamHeadsDone = 3,           // attention heads whose output is written (the attention's)
  kDecodeStreamCounterInts = 32,  // a layer's counters, 128 bytes (no false sharing)
};
inline constexpr int kDecodeStreamCopies = 4;
inline constexpr unsigned char kDecodeStreamAttnSentinelByte = 0xFF;  // dense_poll_attn

// DecodeStreamLayer::timeline (benchmarks): a block's row of %globaltimer stamps (ns; 0: the event
// did not happen in that block).
enum DecodeStreamTimelineEvent : int {
  kTlStart = 0,        // the block started (thread 0)
  kTlFolded = 1,       // the consumers' fold and LayerNorm done (waited for the layer before)
  kTlQkvOut = 2,       // the block's q/k/v rows published (blocks that took q/k/v chunks)
  kTlDenseWait = 3,    // its first dense chunk: the wait for the attention's heads begins
  kTlDenseGo = 4,      // ... and ends
  kTlItemsDone = 5,    // the consumers' last item done
  kTlFlushed = 6,      // the partial S added (just before the block counts itself done)
  kTlProducerEnd = 7,  // the producer took the end item (its last copy was issued before)
  kDecodeStreamTimelineEvents = 8,
};  // copies of S (fewer blocks adding to one address)

// One layer's operands (device pointers, dtype unless marked). Weights as CudaPhiModel holds them
// plus two transposed copies: qkv_w [NQ, H] with NQ = (nH + 2 nKV) hd, fc1_w [I, H], fc2_wt [I, H]
// (= fc2.weight^T), dense_wt [nH hd, H] (= dense.weight^T); biases [rows].
struct DecodeStreamLayer {
  const void *ln_w = nullptr, *ln_b = nullptr, *qkv_w = nullptr, *qkv_b = nullptr;
  const void *fc1_w = nullptr, *fc1_b = nullptr, *fc2_wt = nullptr, *dense_wt = nullptr;
  // The fold's inputs: h_{l-1} (layer 0: the embedding row, h_out may then equal it), S_{l-1}
  // (float32 [kDecodeStreamCopies, H]) and the previous layer's dense / fc2 biases; sums_in and
  // the biases null for layer 0.
  const void* h_in = nullptr;
  const float* sums_in = nullptr;
  const void *prev_dense_b = nullptr, *prev_fc2_b = nullptr;
  const int* prev_counters = nullptr;  // the previous layer's (null for layer 0)
  void* h_out = nullptr;               // [H] h_l (block 0 writes it)
  void* qkv = nullptr;                 // [NQ] out
  const void* attn = nullptr;          // [nH hd] in (see attn_heads)
  float* sums = nullptr;               // [kDecodeStreamCopies, H] float32, zero before; S_l out
  int* counters = nullptr;             // [kDecodeStreamCounterInts], zero before
  // Benchmarks: [timeline_blocks, kDecodeStreamTimelineEvents] uint64 (null: off), block b writes
  // row b when b < timeline_blocks.
  uint64_t* timeline = nullptr;
  int timeline_blocks = 0;
  // The LM head form (DecodeStreamParams::head_vocab): float32 [head_vocab] out and the LM
  // head's float32 bias [head_vocab] (or null); null otherwise.
  float* logits = nullptr;
  const float* head_bias = nullptr;
  // The LM head form: the logits also written here (or null): pinned host memory the device
  // addresses (the step's logits staging), so no download follows the step.
  float* logits_host = nullptr;
  // DecodeStreamParams::dense_poll_attn: block 0 writes the sentinel over this buffer ([nH hd]
  // dtype: the previous layer's attention output, all of whose readers are done once the fold's
  // wait ends) after its fold's wait; null: none.
  void* rearm_attn = nullptr;
};

struct DecodeStreamParams {
  DecodeStreamLayer layer;
  int hidden = 0, intermediate = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float eps = 1e-5f;
  GemmEpilogue act = GemmEpilogue::kGeluTanh;  // kGeluTanh or kGeluErf
  DataType dtype = DataType::kBF16;
  // Dense chunks wait until counters[kStreamHeadsDone] >= attn_heads (0: no wait).
  int attn_heads = 0;
  // Ring stages (0: 2, which lets two consecutive layers' blocks share an SM at Phi-2's shape);
  // blocks (0: the SM count).
  int stages = 0;
  int blocks = 0;
  // The dense chunks read the attention output from shared memory, loaded once by the block at
  // its first dense chunk (one L2 round trip a block instead of one a chunk); needs nH hd ==
  // hidden and attn 16-byte aligned (else per chunk, as with false).
  bool dense_attn_in_smem = false;
  // The producer issues a stage's copy only after the one before it has landed: one stage in
  // flight a block (less queued in the memory system, so shorter round trips for the waits).
  bool one_in_flight = false;
  // The dense chunks wait for the attention output itself instead of a heads-done count: every
  // element of layer.attn holds the sentinel (bytes kDecodeStreamAttnSentinelByte: 0xFFFF, a NaN
  // with the sign set; the attention stores dtype(o / l), and a division's NaN is the canonical
  // positive one, so no output is the sentinel) until the attention stores it, and each
  // consumer thread re-reads its 16 bytes until none is the sentinel (then into shared memory,
  // as dense_attn_in_smem); one round trip fewer on the attention -> dense path, and no fence
  // + count in the attention. The buffer must hold the sentinel before the layer (the caller arms
  // it once; rearm_attn re-arms each layer's after use). Needs nH hd == hidden, attn 16-byte
  // aligned, attn_heads 0.
  bool dense_poll_attn = false;
  // > 0: the LM head form after the last layer: the fold of the last layer's output, the final
  // LayerNorm (layer.ln_w / ln_b, eps) and logits = Wlm x + blm as float32 (layer.qkv_w: the LM
  // head's weight [head_vocab, hidden], layer.head_bias its bias or null, layer.logits out), the
  // rows streamed as the q/k/v chunks are; no MLP, dense or attention (fc1 / fc2 / dense / qkv /
  // attn / sums unused; attn_heads 0). head_vocab a multiple of R = hidden / 256.
  int head_vocab = 0;
  // Launch as a programmatic dependent of the kernel before it (the layer before, or the
  // attention), so the producer streams while that kernel drains.
  bool programmatic_launch = false;
};

// The fold alone, after the last layer: h_out = dtype(h_in + S + b_dense + b_fc2) (same float
// operations as the next layer's fold would do). One small launch; waits for nothing but stream
// order (launch it non-programmatically).
struct DecodeStreamFoldParams {
  const void* h_in = nullptr;
  const float* sums = nullptr;  // [kDecodeStreamCopies, hidden]
  const void *dense_b = nullptr, *fc2_b = nullptr;
  void* h_out = nullptr;
  int hidden = 0;
  DataType dtype = DataType::kBF16;
  void* rearm_attn = nullptr;  // as DecodeStreamLayer::rearm_attn ([hidden] dtype), or null
};

// Shapes the kernel handles: kBF16 / kF16; hidden = 256 KC with KC in {1, 2, 4, 8, 10, 12, 16};
// NQ, intermediate and nH hd multiples of R = KC; act GELU tanh / erf; the ring of >= 2 stages
// in shared memory; sm_90 (bulk copies). Pointers are not checked beyond null.
bool DecodeStreamCudaSupports(const DecodeStreamParams& p);

// kInvalidShape / kUnsupportedDtype when not supported, kNullPointer for a missing operand,
// kDeviceError when the launch is refused. Never allocates; capturable into a CUDA graph.
KernelStatus DecodeStreamLayerCuda(const DecodeStreamParams& p, cudaStream_t stream);
// Before the first step: loads the layer and fold kernels for p's shape and dtype and sets their
// attributes, so no launch of a step loads a module (under lazy loading that waits for the work
// in flight, which a stream step's kernels wait on each other inside: see
// PagedDecodeCudaPrepareBesideStream). kInvalidShape when not supported, kDeviceError.
KernelStatus DecodeStreamCudaPrepare(const DecodeStreamParams& p);

// Whether a kernel can run beside the stream on this device and in this process, as a step needs
// (the attention beside the stream kernel, which waits for it): `blocks` blocks (0: the SM
// count) holding p's shared memory each (p's shape, as DecodeStreamLayerCuda would launch them)
// wait for a one-block programmatic dependent to set a flag, each giving up after ~200 ms. False
// where launches are serialised (compute-sanitizer) or the blocks cannot all be resident beside
// it (an MPS thread limit). `scratch`: 2 device ints. Synchronises `stream`.
KernelStatus DecodeStreamCudaConcurrencyProbe(const DecodeStreamParams& p, int* scratch,
                                              cudaStream_t stream, bool* concurrent);
KernelStatus DecodeStreamFoldCuda(const DecodeStreamFoldParams& p, cudaStream_t stream);

// dst [cols, rows] = src [rows, cols]^T (device, kF16 / kBF16): the transposed fc2 / dense copies
// the stream reads (made once at load). kInvalidShape for sizes <= 0, kNullPointer, kDeviceError.
KernelStatus DecodeStreamTransposeCuda(const void* src, int rows, int cols, void* dst,
                                       DataType dtype, cudaStream_t stream);

}  // namespace phishard
