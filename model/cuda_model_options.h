// CudaModelOptions: how CudaPhiModel (model/cuda_phi_model.h) loads and runs — dtype, device,
// graph buckets, the decode schedule's switches — with their defaults. Every switch of -1 reads
// its PHISHARD_* environment variable at load (docs/flags.md), else the default here. Plain C++
// (no CUDA headers): the server's flag parsing and the host tests include it on any build.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>

#include "model/tp_prefill_split.h"

namespace phishard {

class Communicator;

enum MlpStreamMode : int { kMlpStreamOff = 0, kMlpStreamFc1 = 1, kMlpStreamFc1Fc2 = 2 };
inline constexpr int kMlpStreamDefault = kMlpStreamFc1Fc2;
inline constexpr int kBulkGemvRowsDefault = 0;
inline constexpr int kBulkGemvPdlDefault = 1;
inline constexpr int kBulkGemvLnDefault = 0;
inline constexpr int kDecodeAttentionFoldRowsDefault = 8;  // CudaModelOptions below
inline constexpr int kDecodeStreamDefault = 1;             // CudaModelOptions::decode_stream
// The decode stream's 1-row steps keep one weight copy in flight a block from this context on
// (DecodeVariantRules::kStreamLong; CudaPhiModel::set_decode_stream_one_in_flight_ctx): x1.012 at
// ctx 1024, x0.999 at 1536, x0.981 at 2048, x0.939 at 3072 / 4096 (perf-log 2026-11-30 23:18).
inline constexpr int kDecodeStreamOneInFlightCtxDefault = 1536;
// The default fold bound of a model: 16 rows at head_dim <= 64 (Phi-1.5's 32 x 64: the fused
// kernel fits 5 blocks an SM there; b16 x0.946-0.973, b8 x0.961-0.998, perf-log 2026-11-30 04:51 /
// 04:55), else 8.
inline int DecodeAttentionFoldRowsDefault(int head_dim) {
  return head_dim <= 64 ? 2 * kDecodeAttentionFoldRowsDefault : kDecodeAttentionFoldRowsDefault;
}
// CudaModelOptions::decode_fold_short_rows / _ctx.
inline constexpr int kDecodeFoldShortRowsDefault = 32;
inline constexpr int kDecodeFoldShortCtxDefault = 256;
inline constexpr int kDecodeShortRegsRowsDefault = 256;  // CudaModelOptions::decode_short_regs_rows
// CudaModelOptions::decode_short_regs_ctx's default: 256 tokens where a head's 16-byte slices fill
// the pipelined decode attention's 8 lanes a key (head dims a multiple of 64: Phi-1.5), 160 where
// that kernel takes 4 lanes a key and issues ~20 % less a key (Phi-2's 80). Measured after the
// fast bf16 unpack (H200, register-staged against pipelined, alternated, perf-log 2026-11-30
// 12:00): Phi-2 b128 ctx160 x0.982 / ctx192 x0.986 / ctx224 x0.998 / ctx256 x1.016, b192 ctx192
// x1.020, b256 ctx128 x0.982 / ctx160 x0.997 / ctx192 x1.009 / ctx224 x1.025 / ctx256 x1.031;
// Phi-1.5 b256 ctx128 x0.969 / ctx192 x0.974 / ctx256 x0.993, b128 ctx192 x0.998.
inline int DecodeShortRegsCtxDefault(int head_dim) { return head_dim % 64 == 0 ? 256 : 160; }
// CudaModelOptions::decode_warp_heads: on, with DecodeVariantRules' bounds from the SM count —
// at least kDecodeWarpHeadsMinWarpsPerSm live query heads an SM (2.25 waves of the kernel's 16
// resident warps an SM) with a mean context of at most kDecodeWarpHeadsCtx, or
// kDecodeWarpHeadsMoreWarpsPerSm (2.75 waves) with a mean of at most kDecodeWarpHeadsMoreCtx.
// Measured (H200, Phi-2 shape, on against off / the kernels chosen before, alternated in one
// process, greedy steps, perf-log 2026-11-30 14:57-15:15, two hosts): b256 ctx128 x0.946 /
// x0.956, ctx192 x0.870 / x0.922, ctx256 x0.915 / x0.931, ctx384 x0.969, ctx512 x0.954 / x0.970;
// b192 ctx128 x0.942, ctx256 x0.943, ctx512 x0.961 / x0.973; b160 ctx128 x0.964 / x0.954, ctx256
// x0.973; Phi-1.5 b256 ctx128 x0.975, b192 ctx512 x0.977. Left out: long contexts (b256 ctx1024
// x0.976, x1.000 and, in a process run hot after the GPU tests, x1.106; b192 ctx1024 x0.994 /
// x0.995) and fewer heads (b160 ctx512 x1.081 in that hot process, b160 ctx1024 x1.024, b128
// ctx128 x1.006 / x1.008, ctx512 x1.075).
inline constexpr int kDecodeWarpHeadsDefault = 1;
inline constexpr int kDecodeWarpHeadsMinWarpsPerSm = 36;
inline constexpr int kDecodeWarpHeadsCtx = 256;
inline constexpr int kDecodeWarpHeadsMoreWarpsPerSm = 44;
inline constexpr int kDecodeWarpHeadsMoreCtx = 512;
inline constexpr int kDecodeFc1SmsDefault = 24;          // CudaModelOptions::decode_fc1_sms
inline constexpr int kDecodeFc1SmsMinRows = 5;
inline constexpr int kDecodeFc1SmsMaxRows = 16;
// CudaModelOptions::decode_fc1_sms_min_kv_tokens's default: the step's summed context at which a
// layer's K/V bytes reach 1.6 x fc1's weight bytes (Phi-2: 8,192 tokens, where the SM target
// measured neutral at b8 ctx1024; below it, it was slower: perf-log 2026-11-30 06:47-06:58).
inline int DecodeFc1SmsMinKvTokensDefault(int hidden, int intermediate, int kv_heads,
                                          int head_dim) {
  const double kv_per_token = 2.0 * kv_heads * head_dim;  // elements a layer
  return static_cast<int>(
      std::ceil(1.6 * hidden * static_cast<double>(intermediate) / std::max(kv_per_token, 1.0)));
}
inline constexpr int kDecodeDenseBulkRowsDefault = 1;  // CudaModelOptions::decode_dense_bulk_rows
inline constexpr int kDecodeFc2DeferDefault = 1;       // CudaModelOptions::decode_fc2_defer
inline constexpr int kDecodeGemmTuneRowsDefault = 64;  // CudaModelOptions::decode_gemm_tune_rows
inline constexpr int kPrefillGemmTuneDefault = 1;      // CudaModelOptions::prefill_gemm_tune

struct CudaModelOptions {
  // "" (config's torch_dtype: bfloat16 -> bf16, float16/float32/absent -> fp16), "float16",
  // "bfloat16". "float32" is refused: the CUDA backend stores 16-bit weights.
  std::string dtype;
  int device = 0;             // CUDA device ordinal
  int reserve_tokens = 2048;  // step arena reserved at load (grown by MaxKvBlocks' argument)
  bool cuda_graphs = true;    // replay decode steps as CUDA graphs (false: same launches, eager)
  int max_graph_batch = 256;  // largest decode bucket; bigger decode batches run unpadded, eager
  // Steps of at most this many rows run the fused dense + fc2 pair and the LM head through the
  // GEMV kernel, larger ones cuBLASLt (measured, docs/perf-log.md decode-graph runs: at m = 1 the
  // fused pair takes 22.4 us against cuBLASLt's two GEMMs' 28.8 us, the LM head 67 against 68-71;
  // from 2 rows on cuBLASLt wins, the GEMV re-reading x through L1 for every row).
  int gemv_max_rows = 1;
  // Also the one-segment layers (qkv, fc1) through the GEMV kernel. Off: cuBLASLt reads those at
  // 0.72-0.81 of the copy bandwidth at m = 1, the GEMV at 0.56-0.69. Tests turn it on to make
  // every row's arithmetic independent of the row count.
  bool gemv_single_segment = false;
  // GEMV kernels launched as programmatic dependents (Hopper PDL): each prefetches its weights
  // while the kernel before it finishes (kernels/cuda/gemv_cuda.h).
  bool pdl = false;
  // Phi's parallel residual makes the MLP branch (fc1 -> GELU -> fc2) independent of the attention
  // branch (qkv -> rotary -> attention); both read LN(h). kMlpStreamFc1 runs fc1 on a second
  // stream beside the attention branch (dense + fc2 after the join, bit-identical to
  // kMlpStreamOff), kMlpStreamFc1Fc2 also fc2 (h += fc2 on that stream, then h += dense after
  // the join: the same terms, added in the other order). Decode steps only; steps with adapter
  // rows keep one stream. Measured (H200, Phi-2 shape, docs/perf-log.md): decode b1 2.69 -> 2.52
  // ms with 2, b64 8.60 -> 8.45, b256 unchanged (the attention kernel fills the GPU).
  // -1: PHISHARD_MLP_STREAM (0, 1, 2) when set, else kMlpStreamDefault.
  int mlp_stream = -1;
  // Steps of at most bulk_gemv_rows rows (0..kGemvMaxRows) run every linear layer through the
  // bulk GEMV (kernels/cuda/gemv_bulk.cu: weights through a shared-memory ring of bulk copies);
  // bulk_gemv_pdl launches those as programmatic dependents (their first weight stages load while
  // the kernel before them finishes); bulk_gemv_ln folds each layer's LayerNorm (and the final
  // one) into the qkv / fc1 (LM head) GEMVs of such steps when they have no adapter rows. -1:
  // PHISHARD_BULK_GEMV_ROWS / _PDL / _LN when set, else the kBulkGemv*Default values.
  // Measured (H200, Phi-2 shape, decode b1 ctx1024, docs/perf-log.md dec1 run 2): rows 1 + PDL
  // 2.064 ms against 2.078-2.119 off (within the run's spread, so off by default), without PDL
  // 2.22, with the LayerNorm folded in 2.24; at 2-8 rows slower than cuBLASLt.
  int bulk_gemv_rows = -1;
  int bulk_gemv_pdl = -1;
  int bulk_gemv_ln = -1;
  // The same in tensor-parallel (sharded) decode steps: 0 no (default), 1 yes; -1:
  // PHISHARD_MLP_STREAM_TP when set. Off by default: TP=2 decode b128 measured 11.9-12.2 ms once
  // the fork was on main against 10.5-10.6 in the TP runs before it (suspected: each layer's
  // all-reduce waits for the slower rank, whose two branches race; docs/perf-log.md).
  int mlp_stream_sharded = -1;
  // Where a sharded step's MLP branch joins the main stream: 0 after attention (as unsharded
  // steps); 1 before attention (the branch runs beside qkv and rotary only, attention ends the
  // layer alone on every rank); 2 as 1 with fc2 on the main stream after the join (mode 2 only).
  // -1: PHISHARD_MLP_JOIN_TP when set, else 0.
  int mlp_join_sharded = -1;
  // Tensor parallelism (spec §6.8-6.9, docs/tensor-parallel.md): the group's device communicator
  // (NCCL; not owned, must outlive the model), or nullptr / world size 1 for an unsharded model.
  // The model then holds rank comm->rank()'s slices (MakePhiShard) and runs on `device`, which
  // must be the communicator's.
  Communicator* comm = nullptr;
  // Sharded prefill steps of at least 2 (tp_prefill_min_rows + 16) rows run the ops next to each
  // all-reduce in up to this many row chunks, each chunk's all-reduce overlapping the next
  // chunk's work (model/cuda_phi_tp_overlap.cc); 1: no overlap; 0: PHISHARD_TP_PREFILL_CHUNKS
  // when set, else kTpPrefillChunksDefault. Every rank must use the same values (their
  // collectives pair up).
  int tp_prefill_chunks = 0;
  int tp_prefill_min_rows = kTpPrefillMinRowsDefault;
  // 1-row decode steps (no adapter rows, unsharded) through the persistent decode kernel
  // (kernels/cuda/decode_mega_cuda.h, model/cuda_phi_mega.cc): every layer in one launch whose
  // weight stream runs across the ops' dependencies. 0 off, 1 on; -1: PHISHARD_DECODE_MEGAKERNEL
  // when set, else off (opt-in until measured faster, docs/perf-log.md).
  int decode_megakernel = -1;
  // 1-row decode steps (no adapter rows, unsharded, a supported shape: hidden 256 x {1, 2, 4, 8,
  // 10, 12}) through the decode stream (kernels/cuda/decode_stream_cuda.h, model/
  // cuda_phi_stream.cc): each layer one weight-stream launch with the attention beside it, the
  // layer's sums deterministic (grid sums). Costs fc2's and dense's weights a second time,
  // transposed (+2.1 GB at Phi-2). The attention runs beside each layer's stream kernel, which
  // waits for it: a probe at switch-on (DecodeStreamCudaConcurrencyProbe) keeps the op-by-op path
  // where kernels do not run beside each other (compute-sanitizer's serialised launches, an MPS
  // thread limit). 0 off, 1 on; -1: PHISHARD_DECODE_STREAM when set, else kDecodeStreamDefault
  // (on; H200 b1 ctx 1024 1.58-1.61 against 1.85 ms, docs/perf-log.md 2026-11-30 20:03-20:13).
  int decode_stream = -1;
  // Decode steps (graph buckets) of at most this many rows, without adapter rows, unsharded, run
  // rotary + K/V write and the split merge inside the decode attention launch where it takes the
  // register-staged kernel (batch 1 to 64 at Phi-2 shape): the same bits, two launches fewer a
  // layer (PagedDecodeCudaPlan::fold_rotary, kernels/cuda/paged_decode_cuda.h). 0: none; -1:
  // PHISHARD_DECODE_ATTENTION_FOLD (rows) when set, else DecodeAttentionFoldRowsDefault (8; 16 at
  // head_dim <= 64).
  // Measured (H200, Phi-2 shape, ctx 1024, fold on / off alternated in one process, perf-log
  // dfold): b1 x0.92-0.94, b2 x0.96, b4 x0.97, but b8 x1.08, b16 x1.10, b32 x1.18, b64 x1.25
  // with the MLP branch on its own stream: from b8 the attention grid is several waves and, no
  // longer behind the rotary launch, is queued before fc2's, which then runs after it instead of
  // beside it (with mlp_stream 0 the fold is faster at b8-b64 too: x0.97-0.99). After the fused
  // kernel's chain was shortened (perf-log 2026-11-30 03:53 / 03:59, session 17): b6 x0.984, b8
  // x0.992 (ctx 128 / 1024) and x0.969 (ctx 4096), b16 x1.007, b32 x1.028; Phi-1.5 shape b1 x0.83.
  int decode_attention_fold_rows = -1;
  // Base decode steps of more rows than that, up to decode_fold_short_rows, take the fold too when
  // their live sequences' mean context is at most decode_fold_short_ctx tokens (their own graphs,
  // a variant of the bucket): with few K/V the fused launch's saved rotary and merge launches
  // outweigh the grid's place ahead of fc2 (H200, Phi-2 shape, perf-log 2026-11-30 06:58: b16
  // ctx128 x0.975, b32 ctx128 x0.964, ctx256 x0.975, but b32 ctx1024 x1.029, b64 ctx128 x1.017).
  // -1: PHISHARD_DECODE_FOLD_SHORT_ROWS / _CTX when set, else kDecodeFoldShort*Default; rows 0:
  // off (so is it when decode_attention_fold_rows is 0: then no step folds).
  int decode_fold_short_rows = -1;
  int decode_fold_short_ctx = -1;
  // MHA models' base decode steps of more rows than both bounds above, up to this many, take the
  // register-staged decode attention instead of the pipelined one when their mean context is at
  // most decode_short_regs_ctx (the bucket's short-context variant graph): over a few tiles the
  // pipelined kernel is issue-bound (ncu, perf-log 2026-11-30 09:05). Measured (H200, 09:07-09:14):
  // Phi-2 b128 ctx128 x0.967-0.969, b256 ctx128 x0.981-0.988, Phi-1.5 b256 ctx128 x0.955; b64
  // already takes that kernel (kAuto's small grids). Bf16 bounds. 0: off; -1:
  // PHISHARD_DECODE_SHORT_REGS_ROWS, else kDecodeShortRegsRowsDefault.
  int decode_short_regs_rows = -1;
  // -1: PHISHARD_DECODE_SHORT_REGS_CTX when set, else DecodeShortRegsCtxDefault of the head dim.
  int decode_short_regs_ctx = -1;
  // MHA models' base decode steps whose live query heads fill the GPU several times over take the
  // one-warp-a-head decode attention (PagedDecodeVariant::kWarpPerHead, a graph variant of their
  // bucket; bounds and measurements at kDecodeWarpHeadsDefault): the 4-warp-a-head kernels' fixed
  // work a block (prologue, cross-warp merge) is what limits them at short contexts. Bf16 bounds.
  // 0: off; -1: PHISHARD_DECODE_WARP_HEADS (0 or 1) when set, else kDecodeWarpHeadsDefault.
  int decode_warp_heads = -1;
  // Base decode steps (no adapter rows) of kDecodeFc1SmsMinRows..kDecodeFc1SmsMaxRows rows (the
  // graph buckets 8 and 16) run fc1 on the MLP stream with this cuBLASLt SM count target, leaving
  // SMs to qkv and the attention grid beside it; 0: every SM. -1: PHISHARD_DECODE_FC1_SMS when
  // set, else kDecodeFc1SmsDefault. Measured (H200, Phi-2 shape, alternated in one process,
  // perf-log 16:46): 24 SMs b8 ctx1024 x0.976, b8 ctx4096 x0.938, b16 x0.953; at b4 and b32 every
  // target was slower (x1.02-1.13), hence the row range. Only steps whose live sequences' context
  // lengths sum to at least decode_fc1_sms_min_kv_tokens take it (their own graphs, variant 1 of
  // the bucket): with little K/V the attention ends early and fc1 on 24 SMs is the layer's tail
  // (perf-log 2026-11-30 06:47-06:58: b8 ctx128 x1.21, ctx512 x1.10, b16 ctx128 x1.14 with it).
  int decode_fc1_sms = -1;
  // -1: PHISHARD_DECODE_FC1_SMS_MIN_KV_TOKENS when set, else DecodeFc1SmsMinKvTokensDefault of
  // the model's shape; 0: every step in the row range.
  int decode_fc1_sms_min_kv_tokens = -1;
  // Base decode steps of at most this many rows (on one GPU, with the fused decode attention and
  // fc2 on the MLP stream) run dense through the bulk GEMV (kernels/cuda/gemv_bulk.cu) as a
  // programmatic dependent that the attention lets launch at its start, so dense's weights
  // stream into shared memory beside the attention instead of after it, and each layer's
  // LayerNorm as a programmatic dependent of the GEMV before it (its weights loaded while that
  // finishes); 0: cuBLASLt and plain launches. Another summation order for dense than cuBLASLt's
  // (bf16 bounds). -1: PHISHARD_DECODE_DENSE_BULK_ROWS when set, else
  // kDecodeDenseBulkRowsDefault. Measured (H200, Phi-2 shape, alternated in one process, perf-log
  // 18:17 / 18:20 / 19:06): the dense overlap b1 ctx1024 x0.991-0.992, ctx4096 x0.976-0.981, b2
  // x1.002, b4 x1.03 (bigger attention grids leave no SM room beside them), hence 1; the
  // LayerNorm's programmatic launch on top x0.985-0.988 at ctx 128 / 1024 / 4096.
  int decode_dense_bulk_rows = -1;
  // 1: decode steps that take fc1's SM count target (decode_fc1_sms, so the MLP branch is the
  // layer's critical path) write fc2's rows (with its bias) in float32 to rows of their own
  // instead of adding them into h, so dense adds into h right after the attention without
  // waiting for the MLP branch; the next layer's LayerNorm adds them (LayerNormParams::fold_delta)
  // after the join, the last layer joins as before. Another rounding order of the two residual
  // terms (bf16 bounds). 0: off. -1: PHISHARD_DECODE_FC2_DEFER when set, else
  // kDecodeFc2DeferDefault. Measured (H200, alternated in one process, perf-log 2026-11-30 08:15
  // on every step of 1-64 rows, 08:44 as landed): Phi-2 b8 ctx1024 x0.936, b12 x0.982, b16
  // x0.99, b8 ctx4096 x0.994, b16 ctx4096 x1.00 (all steps of fc1's target), but b1 / b2 x1.020 /
  // x1.011 and b8 ctx128 x1.016 on every step (the attention branch the longer), hence the tie;
  // Phi-1.5 b8 / b16 ctx1024 x0.944 / x0.939.
  int decode_fc2_defer = -1;
  // At the first PrepareDecode (Warmup), the layer GEMMs (qkv, fc1, dense, fc2) of every decode
  // graph bucket of at least this many rows time cuBLASLt's candidates on this GPU and keep one
  // that beat the heuristic's first pick by 8 % in every alternation (the first such in the
  // heuristic's order, model/gemm_tune_rule.h) for GEMMs of exactly that row count
  // (CudaPhiModel::set_decode_gemm_tune); 0: off. Another summation order where a choice is
  // kept (bf16 bounds). Costs ~1 s of Warmup at Phi-2's shape. -1:
  // PHISHARD_DECODE_GEMM_TUNE_ROWS when set, else kDecodeGemmTuneRowsDefault. Measured (H200,
  // perf-log 2026-11-30 13:01-13:32: the candidates under sustained load, then steps tuned /
  // untuned alternated by process): Phi-2 at 256 rows fc2 without split-K x0.85 at Warmup's
  // clock (x0.92 sustained), b256 ctx128 x0.956, b256 ctx1024 x0.99, b64 / b128 even; Phi-1.5
  // fc2 at 128 rows x0.83-0.87, b128 ctx128 x0.988-0.994, the rest even.
  int decode_gemm_tune_rows = -1;
  // 1: the same Warmup tuning for prefill-sized GEMMs — 512, 1024, 2048, 4096 and 8192 rows, those
  // the step arena holds then (Warmup's prefill has grown it) — each choice kept for rows in
  // [3/4, 3/2) of its size. 0: off. -1: PHISHARD_PREFILL_GEMM_TUNE when set, else
  // kPrefillGemmTuneDefault. Measured (H200, Phi-2 shape, perf-log 2026-11-30 13:46 / 13:50):
  // fc1 + GELU at 1024 rows x0.86-0.89 (tile 20, cluster 3), nothing else at 512-2048 clears the
  // margin; steps tuned / untuned alternated: 8x128 x0.972, 1x1400 x0.966, 1x512 / 1x768 /
  // 1x1024 / 1x2048 within +-0.6 %. ~0.6 s more Warmup (~2.3 s when the arena holds 8192 rows).
  int prefill_gemm_tune = -1;
};

}  // namespace phishard
