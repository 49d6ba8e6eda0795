// CudaPhiModel: PhiForCausalLM on one CUDA device, bf16 or fp16 storage with float32
// accumulation; with a communicator of world size W > 1, one tensor-parallel rank of W holding
// its PhiShard slices (model/cuda_phi_tp.cc, docs/tensor-parallel.md). Plain C++: every device
// call goes through kernels/device.h and the CUDA ops' entry points (kernels/cuda/*_cuda.h), so
// this file needs no CUDA headers. Built only when PHISHARD_HAVE_CUDA (the .cc is empty
// otherwise).
//
// Memory (device): the weights in one allocation (q/k/v fused into one [(nH + 2 nKV) hd, H]
// projection at load); the KV pool in one allocation (per layer K then V, each
// [num_blocks, nKV, block_size, hd], kernels/kv_layout.h); one step arena sized for
// `workspace_tokens()` tokens (activations, full-vocabulary float32 logits for every token, decode
// split-K partials); a small metadata buffer (ids, positions, slots, block tables) uploaded once
// per step from pinned host memory. Forward allocates nothing unless a step exceeds what was
// reserved (then it grows the arena once, with a warning).
//
// Two step paths (model/cuda_phi_step.cc):
//  * prefill (any sequence with more than one new token): eager launches, varlen flash attention;
//  * decode (every sequence one new token): the batch is padded to a bucket of CudaGraphRunner
//    (1, 2, 4, ..., max_graph_batch), its inputs go to fixed device buffers in one copy, and the
//    step is the bucket's CUDA graph, captured right after the bucket's first (eager) step.
//    Eager and replayed steps launch the same kernels with the same shapes, so their logits are
//    bit-identical. Linear layers of steps with at most gemv_max_rows rows use the GEMV kernel
//    (dense and fc2 fused into one pass), larger ones cuBLASLt.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/gemm.h"
#include "kernels/kernel_status.h"
#include "kernels/paged_attention.h"
#include "kernels/rotary_kv_write.h"
#include "model/cuda_model_options.h"
#include "model/decode_variant_rules.h"
#include "model/forward_batch.h"
#include "model/gemm_tune_rule.h"
#include "model/model_backend.h"
#include "model/phi_config.h"
#include "model/phi_weights.h"
#include "model/safetensors.h"
#include "model/tp_prefill_split.h"
#include "parallel/communicator.h"

namespace phishard {

class CudaGemm;
class CudaGraphRunner;
class CudaLora;
struct DeviceEvent;
struct TpPrefillOverlap;

class CudaPhiModel final : public ModelBackend {
 public:
  static absl::StatusOr<std::unique_ptr<CudaPhiModel>> Load(const std::filesystem::path& model_dir,
                                                            const CudaModelOptions& options);
  static absl::StatusOr<std::unique_ptr<CudaPhiModel>> Create(const PhiConfig& config,
                                                              const WeightStore& store,
                                                              const CudaModelOptions& options);
  // A model of `config`'s shape with random weights made on the device (benchmarks): linear
  // weights uniform with std 0.02 (the HF initialiser's), LayerNorm weights 1 +- 0.1, biases
  // +- 0.01; lm_head untied, with a bias. Reproducible for a given seed.
  static absl::StatusOr<std::unique_ptr<CudaPhiModel>> CreateRandom(const PhiConfig& config,
                                                                    const CudaModelOptions& options,
                                                                    uint64_t seed);
  ~CudaPhiModel() override;
  CudaPhiModel(const CudaPhiModel&) = delete;
  CudaPhiModel& operator=(const CudaPhiModel&) = delete;

  const PhiConfig& config() const override { return full_config_; }
  std::string device_type() const override { return "cuda"; }
  std::string dtype_name() const override;

  // Blocks of kKvBlockSize tokens that fit in
  //   free device memory + the current KV pool (AllocateKvCache frees it first)
  //   - the growth of the step arena to `max_batch_tokens` tokens
  //   - the decode graphs not yet captured (kDecodeGraphBytes each) - (1 - fraction) x total.
  // Remembers max_batch_tokens: the next AllocateKvCache grows the arena to it first.
  absl::StatusOr<int> MaxKvBlocks(double memory_fraction, int max_batch_tokens) const override;
  absl::Status CheckSameOnEveryRank(absl::Span<const RankSetting> settings) const override;
  absl::Status AllocateKvCache(int num_blocks, int block_size) override;
  int kv_num_blocks() const override { return kv_num_blocks_; }
  int kv_block_size() const { return kv_block_size_; }

  absl::Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  // Multi-LoRA (model/cuda_lora.h): device copies of the registry's adapters are made / freed
  // here and whenever its generation changed at the next Forward; RESOURCE_EXHAUSTED when a copy
  // does not fit. Decode steps with adapter rows replay their own graphs (one per bucket).
  absl::Status SetAdapterRegistry(const AdapterRegistry* registry) override;
  // Device bytes held by adapter copies (tests: back to 0 after every offload).
  int64_t adapter_device_bytes() const;
  int num_lora_decode_graphs() const;
  // Graphs of steps with adapter rows: replays and captures so far (benchmarks: a capture
  // during timed steps means the graphs were invalidated, and the step ran eagerly).
  int64_t lora_decode_graph_replays() const;
  int64_t lora_decode_graph_captures() const;
  // Decode steps with adapter rows that ran the LoRA beside mode (model/cuda_lora.h BeforeQkv).
  int64_t lora_beside_decode_steps() const;
  // Benchmarks: CudaLora::SetDecodeTuning (LoRA branch mode, fused column blocks); drops the LoRA
  // decode graphs.
  absl::Status set_lora_decode_tuning(const std::string& spec);
  std::string lora_decode_tuning() const;
  // Benchmarks: CudaLora::SetPrefillTuning (GEMM-form prefill: q / k / v deltas first or after).
  absl::Status set_lora_prefill_tuning(const std::string& spec);
  std::string lora_prefill_tuning() const;
  // Layers of GEMM-form LoRA steps whose q / k / v deltas ran before the qkv GEMM (so far).
  int64_t lora_qkv_first_layers() const;
  // ... and whose next layer's gathers were prefetched beside them (CudaLora, prefetch).
  int64_t lora_prefetched_layers() const;
  // Layers whose q / k / v deltas ran as one merged expand (CudaLora::qkv_merged_layers).
  int64_t lora_qkv_merged_layers() const;
  // Layers whose fc1 delta + GELU ran as one kernel (CudaLora::fc1_kernel_layers).
  int64_t lora_fc1_kernel_layers() const;
  // Tensor parallelism (model/cuda_phi_tp.cc).
  int tp_rank() const override { return shard_.rank; }
  int tp_world_size() const override { return shard_.world_size; }
  absl::StatusOr<LoraAdapter> ShardAdapter(LoraAdapter full) const override;
  const PhiShard& shard() const { return shard_; }
  // Benchmarks only: skip every collective (wrong results; every rank must set the same value).
  // Times a step without its all-reduces. Drops graphs.
  void set_tp_skip_collectives(bool on);
  // CudaModelOptions::mlp_stream_sharded from the next step on (every rank the same). `join`: 0
  // the branch joins after attention; 1 before it (the branch runs beside qkv and rotary only,
  // attention ends the layer alone); 2 as 1 with fc2 on the main stream after the join (mode 2).
  // Drops graphs.
  void set_mlp_stream_sharded(bool on, int join = 0);
  // CudaModelOptions::tp_prefill_chunks / tp_prefill_min_rows from the next step on (chunks in
  // [1, kMaxPrefillChunks], min_rows >= 1); every rank must set the same values.
  absl::Status set_tp_prefill_chunks(int chunks, int min_rows);
  int tp_prefill_chunks() const;
  // Chunks the last prefill step ran in (1: whole).
  int last_prefill_chunks() const;
  // Decode steps of a graph bucket view the pinned download buffer (no host copy); others as
  // ModelBackend's default.
  absl::Status ForwardView(const ForwardBatch& batch, absl::Span<const float>* logits) override;
  // Decode steps of a graph bucket choose the marked rows on the device (kernels/greedy_pick.h,
  // after the graph, from the float32 logits it left) and download only their (id, logprob) pairs
  // plus the unmarked rows; others as ModelBackend's default (model/cuda_phi_greedy.cc).
  absl::Status ForwardGreedy(const ForwardBatch& batch, absl::Span<const float>* logits,
                             absl::Span<const GreedyPick>* picks) override;
  // A 4-byte device-to-host copy on a separate stream, safe while Forward runs on another thread.
  absl::Status Ping() override;

  // Captures the decode graphs of every bucket up to `max_batch` now (warmup) instead of at each
  // bucket's first step; runs one all-padding step per bucket (writes no KV slot).
  absl::Status CaptureDecodeGraphs(int max_batch);
  // The Warmup GEMM tuning (set_decode_gemm_tune, set_prefill_gemm_tune; model/cuda_gemm_tune.cc)
  // for decode steps of up to max_batch rows and the prefill sizes the arena holds.
  absl::Status TuneGemms(int max_batch);
  absl::Status PrepareDecode(int max_batch) override { return CaptureDecodeGraphs(max_batch); }
  // Graphs on or off from the next step (off also drops the captured ones).
  void set_cuda_graphs(bool on);
  bool cuda_graphs() const { return use_graphs_; }
  // Linear layers of at most `rows` rows use the GEMV kernel (0..kGemvMaxRows; drops graphs).
  absl::Status set_gemv_max_rows(int rows);
  void set_pdl(bool on);  // drops graphs
  // Benchmarks: qkv and fc1 through the GEMV kernel too (CudaModelOptions::gemv_single_segment;
  // drops graphs).
  void set_gemv_single_segment(bool on);
  bool pdl() const { return pdl_; }
  // CudaModelOptions::bulk_gemv_rows / _pdl / _ln (drops graphs).
  absl::Status set_bulk_gemv(int rows, bool pdl, bool ln);
  int bulk_gemv_rows() const { return bulk_rows_; }
  bool bulk_gemv_pdl() const { return bulk_pdl_; }
  bool bulk_gemv_ln() const { return bulk_ln_; }
  // CudaModelOptions::decode_attention_fold_rows (drops graphs when it changes).
  void set_decode_attention_fold_rows(int rows) { SetDroppingGraphs(&decode_fold_rows_, rows); }
  int decode_attention_fold_rows() const { return decode_fold_rows_; }
  // CudaModelOptions::decode_fold_short_rows / _ctx. The row bound also splits the short-context
  // variant between the fold and ShortRegs, so its graphs are dropped when it changes.
  void set_decode_fold_short(int rows, int ctx) {
    SetDroppingGraphs(&fold_short_rows_, rows);
    fold_short_ctx_ = ctx;
  }
  int decode_fold_short_rows() const { return fold_short_rows_; }
  int decode_fold_short_ctx() const { return fold_short_ctx_; }
  // CudaModelOptions::decode_short_regs_rows; drops graphs when it changes.
  void set_decode_short_regs_rows(int rows) { SetDroppingGraphs(&short_regs_rows_, rows); }
  int decode_short_regs_rows() const { return short_regs_rows_; }
  // CudaModelOptions::decode_short_regs_ctx; drops graphs when it changes (it can change which
  // variants a bucket captures).
  void set_decode_short_regs_ctx(int ctx) { SetDroppingGraphs(&short_regs_ctx_, ctx); }
  int decode_short_regs_ctx() const { return short_regs_ctx_; }
  // Decode steps enqueued so far with the short-context register-staged attention (ShortRegs).
  int64_t decode_short_regs_steps() const { return short_regs_steps_; }
  // CudaModelOptions::decode_warp_heads; drops graphs when it changes.
  void set_decode_warp_heads(bool on) { SetDroppingGraphs(&warp_heads_, on); }
  bool decode_warp_heads() const { return warp_heads_; }
  // DecodeVariantRules' kWarpHeads bounds (live query heads, mean context; two tiers): the
  // defaults come from the SM count (kDecodeWarpHeads*); tests and benches move them. Drops graphs.
  void set_decode_warp_heads_bounds(int64_t min_warps, int ctx, int64_t more_warps, int more_ctx) {
    DropGraphs();
    warp_min_warps_ = min_warps;
    warp_ctx_ = ctx;
    warp_more_warps_ = more_warps;
    warp_more_ctx_ = more_ctx;
  }
  void set_decode_warp_heads_default_bounds() {
    set_decode_warp_heads_bounds(
        int64_t{kDecodeWarpHeadsMinWarpsPerSm} * multiprocessors_, kDecodeWarpHeadsCtx,
        int64_t{kDecodeWarpHeadsMoreWarpsPerSm} * multiprocessors_, kDecodeWarpHeadsMoreCtx);
  }
  // Decode steps enqueued so far with the one-warp-a-head decode attention.
  int64_t decode_warp_heads_steps() const { return warp_heads_steps_; }
  // CudaModelOptions::decode_fc1_sms for steps of min_rows..max_rows rows (0: every SM); drops
  // graphs when it changes.
  void set_decode_fc1_sms(int sms, int min_rows = kDecodeFc1SmsMinRows,
                          int max_rows = kDecodeFc1SmsMaxRows) {
    if (sms != fc1_sms_ || min_rows != fc1_sms_min_rows_ || max_rows != fc1_sms_max_rows_) {
      DropGraphs();
    }
    fc1_sms_ = sms;
    fc1_sms_min_rows_ = min_rows;
    fc1_sms_max_rows_ = max_rows;
  }
  int decode_fc1_sms() const { return fc1_sms_; }
  // CudaModelOptions::decode_fc1_sms_min_kv_tokens (graphs are per variant: nothing to drop).
  void set_decode_fc1_sms_min_kv_tokens(int tokens) { fc1_sms_min_kv_ = tokens; }
  int decode_fc1_sms_min_kv_tokens() const { return fc1_sms_min_kv_; }
  // Decode steps enqueued (eager or captured) with fc1's SM count target.
  int64_t decode_fc1_sms_steps() const { return fc1_sms_steps_; }
  // CudaModelOptions::decode_dense_bulk_rows; drops graphs when it changes.
  void set_decode_dense_bulk_rows(int rows) { SetDroppingGraphs(&dense_bulk_rows_, rows); }
  int decode_dense_bulk_rows() const { return dense_bulk_rows_; }
  // Steps enqueued so far with dense through the bulk GEMV.
  int64_t decode_dense_bulk_steps() const { return dense_bulk_steps_; }
  // CudaModelOptions::decode_fc2_defer; drops graphs when it changes.
  void set_decode_fc2_defer(bool on) { SetDroppingGraphs(&fc2_defer_, on); }
  bool decode_fc2_defer() const { return fc2_defer_; }
  // Decode steps enqueued so far with fc2 deferred to the next LayerNorm.
  int64_t decode_fc2_defer_steps() const { return fc2_defer_steps_; }
  int64_t decode_attention_fold_steps() const { return decode_fold_steps_; }  // steps so far
  // The decode attention kernel of decode steps: a PagedDecodeVariant value
  // (kernels/cuda/paged_decode_cuda.h; 0 = kAuto, the default; 3 = kTensorCore, 4 =
  // kWarpPerHead, every step). For benches
  // (phishard_bench --attn-variant-rounds); drops graphs when it changes.
  absl::Status set_decode_attention_variant(int v) {
    if (v < 0 || v > 4) {
      return absl::InvalidArgumentError(
          "decode attention variant: 0 (auto) to 4 (one warp a head)");
    }
    SetDroppingGraphs(&decode_attention_variant_, v);
    return absl::OkStatus();
  }
  int decode_attention_variant() const { return decode_attention_variant_; }
  // CudaModelOptions::decode_stream (drops graphs; on: allocates the transposed fc2 / dense
  // weights and the stream's buffers, ResourceExhausted when they do not fit; an unsupported
  // model or device logs and stays off; off: frees them). model/cuda_phi_stream.cc.
  absl::Status set_decode_stream(bool on);
  bool decode_stream() const { return stream_on_; }
  // Decode steps enqueued through the stream so far (eager steps and graph captures).
  int64_t decode_stream_steps() const { return stream_steps_; }
  // Benchmarks: the stream steps record their per-block timeline (%globaltimer stamps, ns) into a
  // device buffer of this model (drops graphs); decode_stream_timeline() copies the last step's
  // out: per layer kStreamTimelineBlocks rows of kDecodeStreamTimelineEvents words (the stream
  // kernel's blocks), then kStreamTimelineAttnBlocks rows of kPagedDecodeTimelineEvents words
  // (the attention's blocks); after the layers one more such row for the LM head form (its
  // stream blocks; the attention rows stay 0); 0 where an event did not happen.
  static constexpr int kStreamTimelineBlocks = 256, kStreamTimelineAttnBlocks = 1024;
  // The attention beside the stream: K/V stages each block requests before its wait for the
  // q/k/v row (PagedDecodeCudaPlan::preload_stages, 0-2, default 2; drops graphs).
  void set_decode_stream_preload(int stages);
  int decode_stream_preload() const { return stream_preload_; }
  // Benchmarks: the stream kernel's grid (DecodeStreamParams::blocks, 0: the SM count) and
  // DecodeStreamParams::dense_attn_in_smem (drop graphs).
  void set_decode_stream_blocks(int blocks);
  int decode_stream_blocks() const { return stream_blocks_; }
  void set_decode_stream_attn_smem(bool on);
  bool decode_stream_attn_smem() const { return stream_attn_smem_; }
  // The final LayerNorm and the LM head as one more stream launch (DecodeStreamParams::
  // head_vocab) where the vocabulary is a multiple of hidden / 256 and no LoRA is active, instead
  // of the fold + the LM head's bulk GEMV (drops graphs).
  void set_decode_stream_head(bool on);
  // DecodeStreamParams::dense_poll_attn (where nH hd == hidden): the dense chunks wait for the
  // attention output itself, the attention counts nothing (drops graphs; arms the buffers).
  absl::Status set_decode_stream_poll(bool on);
  bool decode_stream_poll() const { return stream_poll_; }
  // DecodeStreamParams::one_in_flight for the stream's launches of 1-row steps whose context is
  // at least `ctx` tokens (a graph variant of bucket 1: DecodeVariantRules::kStreamLong); 0:
  // every step; < 0: none (drops graphs).
  void set_decode_stream_one_in_flight_ctx(int ctx);
  int decode_stream_one_in_flight_ctx() const { return stream_one_in_flight_ctx_; }
  bool decode_stream_head() const { return stream_head_; }
  // DecodeStreamLayer::logits_host: the LM head form also writes a 1-row step's logits into the
  // pinned logits staging, so a step that wants them downloads nothing (drops graphs).
  void set_decode_stream_host_logits(bool on);
  bool decode_stream_host_logits() const { return stream_host_logits_; }
  // Steps whose host logits the LM head form should have written and did not (a bug: the
  // download then ran after the step; tests check it stays 0).
  int64_t decode_stream_host_logits_misses() const { return host_logits_misses_; }
  absl::Status set_decode_stream_timeline(bool on);
  absl::StatusOr<std::vector<uint64_t>> decode_stream_timeline();
  // CudaModelOptions::decode_megakernel (drops graphs).
  absl::Status set_decode_megakernel(bool on);
  bool decode_megakernel() const { return mega_on_; }
  // Benchmarks: the kernel's grid (blocks, <= SMs), ring depth (stages), stage size (KiB), L2
  // lookahead (KiB, < 0 off); 0 = its defaults; form (kDecodeMegaForm* bits, < 0 its default).
  // Drops graphs.
  void set_decode_megakernel_tuning(int blocks, int stages, int stage_kb = 0, int prefetch_kb = 0,
                                    int form = -1);
  // Benchmarks: the kernel records its phase timeline (DecodeMegaEvent) of the first `layers`
  // layers (0: off) into a device buffer of this model; decode_megakernel_timeline() copies the
  // last launch's out ([blocks, layers + 1, events] words; rows of blocks that did not run are 0).
  absl::Status set_decode_megakernel_timeline(int layers);
  absl::StatusOr<std::vector<uint64_t>> decode_megakernel_timeline();
  // Launches of the persistent decode kernel enqueued so far (eager steps and graph captures).
  int64_t mega_decode_launches() const { return mega_launches_; }
  // Tests: every byte of the KV pool 0xFF (NaN in f16 and bf16), so a read of a slot no step
  // wrote shows in the logits.
  absl::Status PoisonKvCache();
  // Prefill steps: the attention kernel stores the new tokens' K/V into the cache as it reads them
  // from the qkv rows, and RotaryKvWrite only rotates (PagedAttentionCudaPlan::store_new_k; on by
  // default, PHISHARD_PREFILL_KV_STORE=0 turns it off). Bit-identical either way.
  void set_prefill_kv_store(bool on) { prefill_kv_store_ = on; }
  bool prefill_kv_store() const { return prefill_kv_store_; }
  // Prefill steps whose logit rows are the last row of each sequence (unsharded; adapters too):
  // the last layer's attention and MLP run on those rows only (model/cuda_phi_last_rows.cc; on by
  // default, PHISHARD_PREFILL_LAST_ROWS=0 turns it off). Same K/V cache, logits within rounding.
  void set_prefill_last_rows(bool on) { prefill_last_rows_ = on; }
  bool prefill_last_rows() const { return prefill_last_rows_; }
  int64_t prefill_last_rows_steps() const { return prefill_last_rows_steps_; }  // steps that did
  // Prefill steps (unsharded, mlp_stream mode not 0; without adapter rows or in the LoRA GEMM
  // form, fc1's delta then on the branch too): fc1 on the MLP stream beside qkv -> rotary ->
  // attention, dense + fc2 after the join (bit-identical to one stream; on by default,
  // PHISHARD_PREFILL_MLP_FORK=0 turns it off).
  void set_prefill_mlp_fork(bool on) { prefill_mlp_fork_ = on; }
  bool prefill_mlp_fork() const { return prefill_mlp_fork_; }
  int64_t prefill_mlp_fork_steps() const { return prefill_mlp_fork_steps_; }  // steps that did
  // Those prefill forks without adapter rows: fc1 as a bias-only GEMM, then its GELU as its own
  // kernel (GeluInPlaceCuda) on the MLP stream before the join, meant to run beside attention
  // instead of in cuBLASLt's epilogue. One more rounding of the pre-activation to the storage
  // type, as the LoRA fc1 split has. Off by default (PHISHARD_PREFILL_GELU_SPLIT=1 turns it on):
  // on the H200 the attention's blocks fill the SMs' registers, so the GELU runs only on the
  // attention's tail and after it; the epilogue costs ~9 us of fc1's ~180 at 2048 rows. 1x2048 /
  // 1x512 within the spread, 8x2048 4 % slower (docs/perf-log.md, gelu helper).
  void set_prefill_gelu_split(bool on) { prefill_gelu_split_ = on; }
  bool prefill_gelu_split() const { return prefill_gelu_split_; }
  int64_t prefill_gelu_split_steps() const { return prefill_gelu_split_steps_; }  // steps that did
  // Recorded cuBLASLt algorithm choices (model/cuda_gemm_choices.h) that GEMMs of their form run
  // instead of the heuristic's first picks: none by default, those PHISHARD_PREFILL_GEMM_ALGOS
  // lists at creation. set_gemm_algo_choices replaces them (benchmarks, tests; drops the cuBLASLt
  // plans made so far and the captured decode graphs); set_prefill_gemm_algos(false) runs the
  // heuristic's picks without forgetting them. Same results up to the GEMMs' summation order.
  // chosen_gemm_plans(): plans made so far that run a choice.
  void set_gemm_algo_choices(std::vector<GemmAlgoChoice> choices);
  // Benchmarks: the prefill attention kernel's query tiling (PrefillTiling of
  // kernels/cuda/paged_attention_cuda.h as an int: 0 = its automatic choice, the default; 3, the
  // wgmma kernel, only with set_prefill_kv_store(false); 4, the warp-specialised wgmma kernel).
  absl::Status set_prefill_attention_tiling(int tiling) {
    if (tiling < 0 || tiling > 4) {
      return absl::InvalidArgumentError("prefill attention tiling must be 0, 1, 2, 3 or 4");
    }
    prefill_attention_tiling_ = tiling;
    return absl::OkStatus();
  }
  const std::vector<GemmAlgoChoice>& gemm_algo_choices() const { return gemm_algos_; }
  // Warm-up tuning of the decode steps' cuBLASLt GEMMs (CudaModelOptions::decode_gemm_tune_rows,
  // model/cuda_gemm_tune.cc): at the first PrepareDecode, the layer GEMMs of every graph bucket of
  // at least `rows` rows (0: none) time the heuristic's candidates and keep the first (in the
  // heuristic's order) that was faster by `margin` in every alternation (model/gemm_tune_rule.h)
  // as a choice of their own exact row count, after the recorded ones (set_gemm_algo_choices wins
  // where both match). A change drops the tuned choices, the plans and the graphs; the next
  // PrepareDecode tunes again.
  void set_decode_gemm_tune(int rows, double margin = kGemmTuneMarginDefault);
  int decode_gemm_tune_rows() const { return gemm_tune_rows_; }
  // The same for prefill-sized GEMMs (CudaModelOptions::prefill_gemm_tune): 512-8192 rows, those
  // the step arena holds at the first PrepareDecode, each choice for rows in [3/4, 3/2) of its
  // size; the margin is set_decode_gemm_tune's. A change drops the tuned choices as above.
  void set_prefill_gemm_tune(bool on);
  bool prefill_gemm_tune() const { return prefill_tune_; }
  const std::vector<GemmAlgoChoice>& tuned_gemm_choices() const { return tuned_algos_; }
  int tuned_gemm_forms() const { return tuned_forms_; }  // forms timed by the last tuning
  void set_prefill_gemm_algos(bool on);
  bool prefill_gemm_algos() const { return prefill_gemm_algos_; }
  size_t chosen_gemm_plans() const;
  // Sharded prefill steps (issue #6) may use the two forms above as well: `mlp_fork` (unchunked
  // steps; the all-reduce after dense + fc2 as before) and `last_rows` (steps without adapter
  // rows; the trimmed rows' partial dense + fc2 then goes through one all-reduce of those rows).
  // Off by default; each still needs its own switch above on.
  void set_prefill_sharded_forms(bool mlp_fork, bool last_rows) {
    prefill_mlp_fork_tp_ = mlp_fork;
    prefill_last_rows_tp_ = last_rows;
  }
  // The MLP branch's stream (CudaModelOptions::mlp_stream); a change drops the captured graphs,
  // and one that moves fc2 on or off the branch the warm-up tuning's choices (re-timed at the next
  // PrepareDecode: the dense / fc2 forms differ).
  absl::Status set_mlp_stream_mode(int mode);
  int mlp_stream_mode() const { return mlp_mode_; }
  // Benchmarks: when on, each step records device events around its device work (inputs upload
  // to logits download) and last_step_device_ms() reads them after the step.
  void set_step_timing(bool on);
  float last_step_device_ms() const { return last_step_device_ms_; }
  // Benchmarks, decode steps with step timing on: two more event pairs split the step into the
  // graph (or eager layers: after the inputs upload to the logits) and the tail (logits to the
  // picks / download done, before the sync); the step's rest is the upload and the sync's end.
  // The extra events cost a little themselves: off by default.
  void set_step_phase_timing(bool on);
  struct StepPhases {
    float graph_ms = 0, tail_ms = 0;
  };
  StepPhases last_step_phases() const { return last_step_phases_; }
  // Benchmarks: fills the whole KV pool with random values of unit scale, as if every slot held a
  // prefilled token (decode timings at long contexts without the prefills).
  absl::Status FillKvCacheRandom(uint64_t seed);

  // --- introspection for tests and benchmarks ---
  // Device memory a decode graph is assumed to take in MaxKvBlocks (instantiated graphs keep
  // their kernel parameters and node tables on the device; measured in bench/ and the perf log).
  static constexpr size_t kDecodeGraphBytes = size_t{4} << 20;
  int num_decode_graphs() const;
  // Base decode graphs CaptureDecodeGraphs(max_graph_batch) makes: every variant each bucket can
  // take (DecodeVariantPossible: variant 0 always, the fc1-target and short-context ones where
  // their row ranges reach).
  int planned_decode_graphs() const;
  int64_t decode_graph_replays() const;
  int64_t decode_graph_captures() const;
  size_t decode_graph_nodes() const;
  int decode_bucket(int batch) const;
  DataType dtype() const { return dtype_; }
  int workspace_tokens() const { return arena_tokens_; }
  bool gelu_in_gemm_epilogue() const;
  int last_decode_splits() const { return last_decode_splits_; }
  int64_t weight_bytes() const { return static_cast<int64_t>(weights_bytes_); }
  // Device bytes of the step arena for `tokens` tokens.
  size_t ArenaBytes(int tokens) const;
  // Grows the step arena to hold steps of `tokens` tokens (never shrinks).
  absl::Status ReserveWorkspace(int tokens);
  // Device stream the model runs on (for timing from tests).
  cudaStream_t stream() const { return stream_; }
  int multiprocessors() const { return multiprocessors_; }  // of its device

 private:
  CudaPhiModel(PhiConfig config, PhiShard shard, Communicator* comm, DataType dtype, int device);
  // The recorded choices, then the tuned ones, on both cuBLASLt handles (or none when
  // set_prefill_gemm_algos is off); drops the captured graphs.
  void ApplyGemmChoices();
  void ForgetTunedGemms();  // the next PrepareDecode tunes again
  static absl::StatusOr<std::unique_ptr<CudaPhiModel>> Init(const PhiConfig& config,
                                                            const CudaModelOptions& options);
  absl::Status Finish(const CudaModelOptions& options);
  // Init's settings from `options` and the environment (model/cuda_phi_settings.cc).
  absl::Status ApplySettings(const CudaModelOptions& options, int cc_major);
  // Weights (model/cuda_phi_weights.cc): from a checkpoint, or random on the device.
  absl::Status UploadWeights(const WeightStore& store);
  absl::Status FillRandomWeights(uint64_t seed);
  void SetWeightPointers(const void* weight_plan);  // a WeightPlan of cuda_phi_weights.cc
  absl::Status ValidateBatch(const ForwardBatch& batch) const;
  // Step paths (model/cuda_phi_step.cc).
  struct StepInputs;
  absl::Status PrefillStep(const ForwardBatch& batch, std::vector<float>* logits);
  // Exactly one of `logits` (copied out) and `view` (the pinned buffer) is non-null.
  absl::Status DecodeStep(const ForwardBatch& batch, std::vector<float>* logits,
                          absl::Span<const float>* view = nullptr);
  // Decode graph variants of a bucket (bits; model/decode_variant_rules.h): base decode steps whose
  // choices depend on their contexts, not only on their row count, replay a graph of their own.
  static constexpr int kVariantFc1Narrow = DecodeVariantRules::kFc1Narrow;
  // The short-context variant: the decode attention fold (FoldShort) up to decode_fold_short_rows
  // rows, the register-staged attention kernel above (ShortRegs); their row ranges are disjoint.
  static constexpr int kVariantFoldShort = DecodeVariantRules::kShortContext;
  // The one-warp-a-head decode attention (DecodeVariantRules::WarpHeads).
  static constexpr int kVariantWarpHeads = DecodeVariantRules::kWarpHeads;
  // A 1-row step of a long context through the decode stream (DecodeVariantRules::StreamLong).
  static constexpr int kVariantStreamLong = DecodeVariantRules::kStreamLong;
  static constexpr int kDecodeGraphVariants = DecodeVariantRules::kVariants;
  // The captured part of a decode step of `rows` rows (its bucket) in graph variant `variant`.
  absl::Status EnqueueDecode(int rows, int variant);
  // The variant rules of the current settings.
  DecodeVariantRules VariantRules() const {
    return DecodeVariantRules{
        .fc1_sms = fc1_sms_,
        .fc1_min_rows = fc1_sms_min_rows_,
        .fc1_max_rows = fc1_sms_max_rows_,
        .fc1_min_kv = fc1_sms_min_kv_,
        .sharded = shard_.sharded(),
        .mha = config_.num_key_value_heads == config_.num_attention_heads,
        .fold_rows = decode_fold_rows_,
        .fold_short_rows = fold_short_rows_,
        .fold_short_ctx = fold_short_ctx_,
        .short_regs_rows = short_regs_rows_,
        .short_regs_ctx = short_regs_ctx_,
        .num_heads = config_.num_attention_heads,
        .warp_min_warps = warp_heads_ ? warp_min_warps_ : 0,
        .warp_ctx = warp_ctx_,
        .warp_more_warps = warp_more_warps_,
        .warp_more_ctx = warp_more_ctx_,
        .stream_long_ctx = stream_on_ && !shard_.sharded() ? stream_one_in_flight_ctx_ : -1};
  }
  // The step inputs of `variant` for a decode step of `rows` rows.
  void SetDecodeVariant(int rows, int variant, StepInputs* in) const;
  // The variant of a base decode step of `rows` rows (its bucket) whose `live` sequences'
  // context lengths sum to kv_tokens.
  int DecodeVariant(int rows, int64_t kv_tokens, int live) const {
    return VariantRules().Variant(rows, kv_tokens, live);
  }
  // DecodeVariant of a decode batch run as `rows` rows (its bucket, or its own row count).
  int DecodeVariantOf(const ForwardBatch& batch, int rows) const {
    int64_t kv_tokens = 0;
    for (const SequenceInput& seq : batch.seqs) kv_tokens += seq.context_len;
    return DecodeVariant(rows, kv_tokens, static_cast<int>(batch.seqs.size()));
  }
  // Whether some step of a `rows`-row bucket can be in `variant`.
  bool DecodeVariantPossible(int rows, int variant) const {
    return VariantRules().Possible(rows, variant);
  }
  // The embedding rows of `tokens` ids (device) into out [tokens, H] (device, dtype).
  absl::Status EnqueueEmbedding(const int32_t* ids, void* out, int tokens);
  absl::Status EnqueueLayers(const StepInputs& in);
  // Embedding + every layer through the persistent kernel (model/cuda_phi_mega.cc) when the step
  // qualifies (decode_megakernel, one row, no adapter rows, unsharded, supported shape); false:
  // nothing enqueued.
  absl::StatusOr<bool> TryEnqueueMegaDecode(const StepInputs& in);
  // Embedding + every layer through the decode stream (model/cuda_phi_stream.cc) when the step
  // qualifies (decode_stream on, one row, no adapter rows, unsharded); false: nothing enqueued.
  // A timeline buffer's `words` uint64 (device) copied to the host after the stream's work.
  absl::StatusOr<std::vector<uint64_t>> CopyTimelineWords(const void* timeline, size_t words);
  // *logits_done: the step's logits were enqueued too (the LM head form of the stream).
  absl::StatusOr<bool> TryEnqueueStreamDecode(const StepInputs& in, bool* logits_done);
  absl::Status ReserveMegaDecode();  // its buffer and layer table, at load (unsharded models)
  // Sharded prefill (model/cuda_phi_tp_overlap.cc): EnqueueLayers in row chunks whose
  // all-reduces run on a second stream beside the next chunk's work; EnqueueLayers(in) itself
  // when the step is not sharded, too short, a decode batch or has adapter rows.
  absl::Status EnqueuePrefillLayers(const StepInputs& in);
  absl::Status InitTpOverlap(const CudaModelOptions& options);
  absl::Status EnqueueLogits(const void* hidden, int rows, float* logits);
  // The trimmed last layer of a prefill (model/cuda_phi_last_rows.cc): whether `batch` may use it,
  // and the layer itself, leaving the final hidden rows of the `rows` logit rows in `out`
  // [rows, H].
  bool PrefillLastRowsApplies(const ForwardBatch& batch) const;
  absl::Status EnqueueLastLayerRows(const StepInputs& in, const int32_t* logit_rows, int rows,
                                    void* out);
  // One layer's rotary + K/V write of `tokens` rows (with layer's q / k LayerNorm when the
  // config has them) and its attention over the step's block tables, shapes from config_
  // (defined in model/cuda_phi_internal.h).
  RotaryKvWriteParams LayerRotaryParams(int layer, void* qkv, const int32_t* positions,
                                        const int64_t* slots, int tokens, void* k_cache,
                                        void* v_cache) const;
  PagedAttentionParams LayerAttentionParams(const StepInputs& in, const void* q, void* out,
                                            int tokens, const void* k_cache,
                                            const void* v_cache) const;
  // On `stream` with `gemm` (the MLP branch's pair when it runs on its own stream).
  absl::Status Linear(const GemmParams& p, DataType y_dtype, const char* op,
                      const GemmParams* second = nullptr, cudaStream_t stream = nullptr,
                      CudaGemm* gemm = nullptr);
  // Whether a decode step of `rows` rows (its bucket; after PlanLora) goes through the decode
  // stream, and whether the stream's steps end with the LM head form (TryEnqueueStreamDecode).
  bool StreamTakesDecode(int rows) const;
  // Whether the fused decode forms that rotate q / k themselves (the attention's fold, the decode
  // stream's attention, the megakernel) may run: plain RoPE, no q / k LayerNorm (PhiConfig::
  // qk_layernorm) and no RoPE scaling, which only RotaryKvWriteCuda applies.
  bool PlainRotary() const { return !config_.qk_layernorm && config_.rope_linear_factor == 1.0; }
  bool StreamHeadForm() const;
  // `host_row0`: the step's only logit row, row 0, is written into logits_host_ by the step
  // itself (set_decode_stream_host_logits; its first word held a sentinel before).
  absl::Status CopyLogitsOut(const ForwardBatch& batch, const float* d_logits, int step_rows,
                             std::vector<float>* logits, absl::Span<const float>* view,
                             bool host_row0 = false);
  // While greedy_step_: enqueues GreedyPickCuda over the step's device logit rows holding marked
  // rows, and the download of their pairs into picks_host_ (model/cuda_phi_greedy.cc).
  absl::Status EnqueueGreedyPicks(const ForwardBatch& batch, const float* d_logits, int step_rows);
  // picks_dev_ / picks_host_ for `rows` rows (Finish: every decode bucket, so no step allocates).
  absl::Status ReserveGreedyPicks(int rows);
  // Tensor-parallel pieces (model/cuda_phi_tp.cc); no-ops (or the world-size-1 path) unsharded.
  absl::Status TpAllReduce(void* data, int rows, const char* what);  // [rows, H] dtype, in place
  // Where the LM head writes its [rows, VocabPad(Vl)] float32 rows: `logits` unless the head is
  // vocab-parallel, then this rank's block of the gathered buffer.
  float* TpLocalLogits(float* logits, int rows);
  absl::Status TpGatherLogits(int rows);
  // Host rows [n, V] <- device logit rows [first, first + n) of a step of `step_rows` rows.
  absl::Status DownloadLogitRows(float* host, const float* d_logits, int first, int n,
                                 int step_rows);
  absl::Status SyncStep();  // waits for the step (through the communicator when sharded)
  absl::Status TpFailed(const absl::Status& st, const char* what);  // marks the model failed
  absl::Status ReserveTpLogits(int tokens);
  absl::StatusOr<int> AgreeKvBlocks(absl::StatusOr<int> local) const;
  // Every rank's `mine` ([W, mine.size()] floats, rank-major) through the communicator: a blocking
  // collective that every rank must enter.
  absl::StatusOr<std::vector<float>> AllGatherHost(absl::Span<const float> mine,
                                                   const char* what) const;
  absl::StatusOr<int> LocalMaxKvBlocks(double memory_fraction, int max_batch_tokens) const;
  absl::Status EnsureDecodeCapacity(int rows, int table_pitch);
  void StepTimerStart();
  void StepTimerStop();
  static size_t DecodeBufferBytes(int rows, int64_t table_ints, int heads);
  void DropGraphs();
  // Sets a setting the captured graphs bake in, dropping them when it changes.
  template <typename V>
  void SetDroppingGraphs(V* field, V value) {
    if (value != *field) DropGraphs();
    *field = value;
  }
  absl::Status EnsureMetadataCapacity(size_t bytes);
  absl::Status DeviceStatus(int err, const char* what);
  absl::Status KernelResult(KernelStatus status, const char* op);
  int64_t KvBytesPerBlock(int block_size) const;
  // model/cuda_phi_lora.cc: plans the step's adapter rows (CudaLora::Plan) and drops LoRA graphs
  // that no longer fit its buffers; bytes MaxKvBlocks keeps free for adapters.
  absl::Status PlanLora(const ForwardBatch& batch, bool decode, int rows);
  double LoraReserveBytes(int tokens) const;

  // config_: the shapes this rank computes with (LocalPhiConfig: local heads, KV heads,
  // intermediate units and LM-head rows); full_config_: the checkpoint's, what config() reports.
  // The two are equal at world size 1.
  PhiConfig config_;
  PhiConfig full_config_;
  PhiShard shard_;
  Communicator* comm_ = nullptr;  // non-null only when sharded
  bool tp_skip_collectives_ = false;
  std::unique_ptr<TpPrefillOverlap> tp_overlap_;  // always set after Init
  // Vocab-parallel LM head: [W, rows, VocabPad(Vl)] float32 logits of every rank (device),
  // sized for arena_tokens_ rows; rank r's LM head writes block r, the all-gather fills the rest.
  float* tp_logits_ = nullptr;
  int tp_logits_tokens_ = 0;
  // Embedding rows this rank holds: ids [embed_row_offset_, + embed_rows_).
  int embed_rows_ = 0;
  int embed_row_offset_ = 0;
  DataType dtype_;
  int device_ = 0;
  int multiprocessors_ = 132;
  std::string props_name_;
  std::atomic<bool> healthy_{true};  // false after a device fault; read by Ping's thread

  cudaStream_t stream_ = nullptr;
  std::unique_ptr<CudaGemm> gemm_;
  // The MLP branch (CudaModelOptions::mlp_stream): its own stream and cuBLASLt workspace (the two
  // branches' GEMMs run at the same time), forked from stream_ after each layer's LN and joined
  // back before the dense GEMM (a fork / join inside a captured graph).
  int mlp_mode_ = kMlpStreamOff;
  bool mlp_sharded_ = false;       // CudaModelOptions::mlp_stream_sharded
  bool prefill_kv_store_ = true;   // set_prefill_kv_store
  bool prefill_last_rows_ = true;  // set_prefill_last_rows
  bool prefill_mlp_fork_ = true;   // set_prefill_mlp_fork
  int64_t prefill_last_rows_steps_ = 0;
  bool prefill_gemm_algos_ = true;          // set_prefill_gemm_algos
  int prefill_attention_tiling_ = 0;        // set_prefill_attention_tiling
  std::vector<GemmAlgoChoice> gemm_algos_;  // what it applies (PrefillGemmAlgoChoicesFromEnv)
  int gemm_tune_rows_ = kDecodeGemmTuneRowsDefault;  // set_decode_gemm_tune
  double gemm_tune_margin_ = kGemmTuneMarginDefault;
  bool prefill_tune_ = kPrefillGemmTuneDefault != 0;  // set_prefill_gemm_tune
  bool gemm_tuned_ = false;                           // TuneGemms ran for these settings
  int tuned_forms_ = 0;
  std::vector<GemmAlgoChoice> tuned_algos_;  // its choices, applied after gemm_algos_
  int64_t prefill_mlp_fork_steps_ = 0;
  bool prefill_gelu_split_ = false;  // set_prefill_gelu_split
  int64_t prefill_gelu_split_steps_ = 0;
  int mlp_join_sharded_ = 0;          // CudaModelOptions::mlp_join_sharded (set_mlp_stream_sharded)
  bool prefill_mlp_fork_tp_ = false;  // set_prefill_sharded_forms
  bool prefill_last_rows_tp_ = false;  // set_prefill_sharded_forms
  cudaStream_t mlp_stream_ = nullptr;
  std::unique_ptr<CudaGemm> mlp_gemm_;
  DeviceEvent* mlp_fork_ev_ = nullptr;
  DeviceEvent* mlp_join_ev_ = nullptr;
  // LayerNorm folded into the GEMVs with fc2 on the MLP stream: fc2 (h +=) waits for qkv (reads h).
  DeviceEvent* qkv_done_ev_ = nullptr;

  // Weights (device, dtype unless noted): one allocation, offsets into it.
  void* weights_ = nullptr;
  size_t weights_bytes_ = 0;
  struct Layer {
    const void *ln_w, *ln_b, *qkv_w, *qkv_b, *dense_w, *dense_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
    // [hd] float32 each; null without PhiConfig::qk_layernorm
    const float *q_norm_w = nullptr, *q_norm_b = nullptr, *k_norm_w = nullptr, *k_norm_b = nullptr;
  };
  std::vector<Layer> layers_;
  const void* embed_ = nullptr;       // [V, H]
  const void* final_ln_w_ = nullptr;  // [H]
  const void* final_ln_b_ = nullptr;  // [H]
  const void* lm_head_w_ = nullptr;   // [V, H] (== embed_ when tied)
  const float* lm_head_b_ = nullptr;  // [V] float32, or null when the checkpoint has none

  // KV pool (device): layer l's K at kv_ + 2 l * layer_bytes, V right after it.
  void* kv_ = nullptr;
  size_t kv_bytes_ = 0;
  int kv_num_blocks_ = 0;
  int kv_block_size_ = 0;

  // Step arena (device), sized for arena_tokens_ tokens.
  void* arena_ = nullptr;
  size_t arena_bytes_ = 0;
  int arena_tokens_ = 0;
  mutable int reserve_tokens_ = 0;  // set by MaxKvBlocks, honoured by AllocateKvCache

  // Per-step metadata: pinned host staging and its device mirror, same layout.
  void* meta_host_ = nullptr;
  void* meta_dev_ = nullptr;
  size_t meta_bytes_ = 0;
  int last_decode_splits_ = 0;

  // Decode path: fixed device inputs of the graphs and their pinned host staging, same layout
  // (model/cuda_phi_step.cc: DecodeLayout), for decode_rows_ rows and decode_table_ints_ block
  // table entries; pinned staging for decode_rows_ logit rows of V floats.
  void* decode_dev_ = nullptr;
  // set_decode_fc2_defer: fc2's float32 rows [decode_rows_, H] (device), added into h by the next
  // layer's LayerNorm.
  void* fc2_defer_dev_ = nullptr;
  bool fc2_defer_ = kDecodeFc2DeferDefault != 0;
  // fc2's biases widened to float32, [layers, H] (device), for those rows: cuBLASLt reads a bias
  // in the output's type. Null when this rank adds no fc2 bias.
  float* fc2_bias_f32_ = nullptr;
  absl::Status MakeFc2BiasF32();  // at load (Finish), model/cuda_phi_weights.cc
  int64_t fc2_defer_steps_ = 0;
  void* decode_host_ = nullptr;
  size_t decode_bytes_ = 0;
  int decode_rows_ = 0;
  int64_t decode_table_ints_ = 0;
  float* logits_host_ = nullptr;
  // ForwardGreedy (model/cuda_phi_greedy.cc): set during its decode step; pairs by device logit
  // row, device and pinned host, picks_rows_ of room; the view handed out, by logit row.
  bool greedy_step_ = false;
  GreedyPick* picks_dev_ = nullptr;
  GreedyPick* picks_host_ = nullptr;
  int picks_rows_ = 0;
  std::vector<GreedyPick> picks_view_;
  bool use_graphs_ = true;
  int gemv_max_rows_ = 1;
  bool gemv_single_segment_ = false;
  bool pdl_ = false;
  int bulk_rows_ = 0;  // CudaModelOptions::bulk_gemv_*
  bool bulk_pdl_ = false;
  bool bulk_ln_ = false;
  bool mega_on_ = false;                                    // CudaModelOptions::decode_megakernel
  int decode_fold_rows_ = kDecodeAttentionFoldRowsDefault;  // set_decode_attention_fold_rows
  int fc1_sms_ = kDecodeFc1SmsDefault;                      // set_decode_fc1_sms
  int fc1_sms_min_rows_ = kDecodeFc1SmsMinRows, fc1_sms_max_rows_ = kDecodeFc1SmsMaxRows;
  int fold_short_rows_ = kDecodeFoldShortRowsDefault;  // set_decode_fold_short
  int fold_short_ctx_ = kDecodeFoldShortCtxDefault;
  int short_regs_rows_ = kDecodeShortRegsRowsDefault;  // set_decode_short_regs_rows
  int short_regs_ctx_ = DecodeShortRegsCtxDefault(config_.head_dim);  // set_decode_short_regs_ctx
  int64_t short_regs_steps_ = 0;
  bool warp_heads_ = kDecodeWarpHeadsDefault != 0;  // set_decode_warp_heads
  // set_decode_warp_heads_bounds (Init: set_decode_warp_heads_default_bounds)
  int64_t warp_min_warps_ = 0, warp_more_warps_ = 0;
  int warp_ctx_ = 0, warp_more_ctx_ = 0;
  int64_t warp_heads_steps_ = 0;
  int fc1_sms_min_kv_ = 0;                             // set_decode_fc1_sms_min_kv_tokens
  int64_t fc1_sms_steps_ = 0;                          // decode_fc1_sms_steps
  int dense_bulk_rows_ = kDecodeDenseBulkRowsDefault;  // set_decode_dense_bulk_rows
  int64_t dense_bulk_steps_ = 0;
  int64_t decode_fold_steps_ = 0;
  int decode_attention_variant_ = 0;  // set_decode_attention_variant
  bool mega_refused_logged_ = false;
  bool stream_on_ = false;      // CudaModelOptions::decode_stream
  bool stream_requested_ = false;  // the option, applied by Finish (after the weights)
  bool stream_probed_ = false, stream_concurrent_ = false;  // DecodeStreamCudaConcurrencyProbe
  void* stream_buf_ = nullptr;  // device (model/cuda_phi_stream.cc: StreamBufLayout)
  int64_t stream_steps_ = 0;
  void* stream_timeline_ = nullptr;  // device, set_decode_stream_timeline
  // set_decode_stream_preload: 2 measured x0.975 / x0.971 at ctx 1024 / 4096 against 0 (the
  // wait first), x0.999 at 128 (perf-log 2026-11-30 21:13).
  int stream_preload_ = 2;
  int stream_blocks_ = 0;  // set_decode_stream_blocks
  // set_decode_stream_attn_smem: x0.988 at b1 ctx 1024, x0.992 at 4096, x0.997 at 128
  // (perf-log 2026-11-30 21:24).
  bool stream_attn_smem_ = true;
  // set_decode_stream_head: x0.996 at b1 ctx 128 / 1024 / 4096 (perf-log 2026-11-30 21:28).
  bool stream_head_ = true;
  int stream_one_in_flight_ctx_ = kDecodeStreamOneInFlightCtxDefault;
  // set_decode_stream_poll: x0.993 / x0.997 / x0.993 at b1 ctx 128 / 1024 / 4096 (perf-log
  // 2026-11-30 21:41).
  bool stream_poll_ = true;
  // set_decode_stream_host_logits: x0.995 / 0.996 / 0.995 at b1 ctx 128 / 1024 / 4096, graph
  // mode (the ~10 us logits download gone; perf-log 2026-11-30 23:46).
  bool stream_host_logits_ = true;
  int64_t host_logits_misses_ = 0;
  int64_t mega_launches_ = 0;
  int mega_blocks_ = 0;  // set_decode_megakernel_tuning
  int mega_stages_ = 0;
  int mega_stage_kb_ = 0;
  int mega_prefetch_kb_ = 0;
  int mega_form_ = -1;
  int mega_timeline_layers_ = 0;
  void* mega_timeline_ = nullptr;  // device, set_decode_megakernel_timeline
  void* mega_buf_ = nullptr;       // device: layer table, sync words, partials (ReserveMegaDecode)
  std::unique_ptr<CudaGraphRunner> graphs_;
  std::unique_ptr<CudaLora> lora_;                // always set after Init
  std::unique_ptr<CudaGraphRunner> lora_graphs_;  // decode graphs of steps with adapter rows
  DeviceTimer* step_timer_ = nullptr;             // non-null while step timing is on
  float last_step_device_ms_ = 0.0f;
  DeviceTimer* phase_timers_[2] = {nullptr, nullptr};  // set_step_phase_timing: graph, tail
  StepPhases last_step_phases_;
  bool phases_recorded_ = false;  // this step recorded both phase pairs (decode steps)
  void PhaseTimerStart(int i);
  void PhaseTimerStop(int i);

  // Ping: own stream and buffers, serialised by its own mutex.
  std::mutex ping_mu_;
  cudaStream_t ping_stream_ = nullptr;
  void* ping_dev_ = nullptr;
  void* ping_host_ = nullptr;
};

}  // namespace phishard
