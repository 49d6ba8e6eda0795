// The weights of a PhiForCausalLM as float32 host arrays (CPU backend), loaded from a WeightStore
// with every shape taken from PhiConfig. q/k/v are fused at load into one [q; k; v] projection so a
// layer runs one QKV GEMM. Linear weights keep the HF layout [out, in].
//
// Tensor parallelism (spec §6.8): PhiShard says which slice of every weight rank r of W holds,
// and the loaders read only that slice from the mmapped files. Contiguous splits:
//   q/k/v, fc1 (column-parallel)  output rows of the rank's heads / intermediate units
//   dense, fc2 (row-parallel)     input columns of the same heads / units; their biases are
//                                 added by rank 0 only (the all-reduce would add them W times)
//   embed_tokens (vocab-parallel) rows [vocab_begin, vocab_end): ceil(V / W) per rank, the last
//                                 rank fewer when W does not divide V; other ids embed to zero
//                                 and the all-reduce fills them in
//   lm_head                       vocab-parallel rows (and bias) when W divides V, else replicated
//   layernorms                    replicated
// GQA: KV heads are split when W divides nKV; when nKV < W and nKV divides W, each KV head is
// replicated on the W / nKV ranks whose query heads use it (rank r holds KV head r / (W / nKV)).
// A device backend follows the same layout by reading its tensors through ReadSlice16.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/phi_config.h"
#include "model/safetensors.h"

namespace phishard {

// Rank `rank`'s slice of the model (all counts local to the rank; *_begin are global indices).
struct PhiShard {
  int rank = 0;
  int world_size = 1;
  int num_heads = 0, q_head_begin = 0;           // query heads [q_head_begin, +num_heads)
  int num_kv_heads = 0, kv_head_begin = 0;       // KV heads [kv_head_begin, +num_kv_heads)
  bool kv_replicated = false;                    // nKV < W: W / nKV ranks hold each KV head
  int intermediate = 0, intermediate_begin = 0;  // fc1 rows / fc2 input columns
  int64_t vocab_begin = 0, vocab_end = 0;        // embedding rows held
  bool lm_head_parallel = false;                 // W divides V: lm_head rows split, all-gathered
  int64_t lm_head_begin = 0, lm_head_end = 0;    // lm_head rows held (all when replicated)

  bool sharded() const { return world_size > 1; }
  // Row-parallel biases (dense, fc2) are added by one rank only.
  bool adds_row_parallel_bias() const { return rank == 0; }
};

// The layout of rank `rank` of `world_size`. INVALID_ARGUMENT naming the config field when
// num_attention_heads or intermediate_size is not divisible by world_size, or when
// num_key_value_heads neither divides by world_size nor divides it (replication).
absl::StatusOr<PhiShard> MakePhiShard(const PhiConfig& config, int rank, int world_size);

// The shapes one rank computes with, as a PhiConfig: heads, KV heads, intermediate size local;
// vocab_size local when the lm_head is vocab-parallel. LoraTargetDims of it are the local [in,
// out] of every LoRA target (lora_shard.h uses it).
PhiConfig LocalPhiConfig(const PhiConfig& config, const PhiShard& shard);

// Every rank of a sharded model allocates the same KV pool (each rank's engine hands out the same
// block ids), so the ranks all-gather their fits and take the smallest. A count travels as two
// floats of < 2^20 each (exact in float32; collectives are float): EncodeKvBlockCount writes them,
// FewestKvBlocks reads `world` such pairs ([world, 2], rank-major) and answers the smallest
// count, or RESOURCE_EXHAUSTED naming the poorest rank when it is < 1.
void EncodeKvBlockCount(int64_t blocks, float out[2]);
absl::StatusOr<int> FewestKvBlocks(const float* counts, int world, int rank, int64_t mine);

// The arguments of ModelBackend::MaxKvBlocks, checked alike by every backend: INVALID_ARGUMENT
// naming memory_fraction unless it is in (0, 1], or max_batch_tokens when it is negative.
absl::Status CheckKvPoolSizing(double memory_fraction, int max_batch_tokens);

// Part of a 1-D or 2-D tensor: elements [row_begin, row_end) of a 1-D tensor; rows
// [row_begin, row_end) x columns [col_begin, col_end) of a 2-D one. -1 ends mean "to the end".
struct TensorSlice {
  int64_t row_begin = 0, row_end = -1;
  int64_t col_begin = 0, col_end = -1;
};

// Checks that tensor `name` has `shape`, then converts `slice` of it (row-major) to float32 into
// `out` (resized). Errors name the tensor: missing, wrong shape, slice outside the shape.
absl::Status ReadF32Slice(const WeightStore& store, std::string_view name,
                          absl::Span<const int64_t> shape, const TensorSlice& slice,
                          std::vector<float>* out);
// The same into IEEE half (`want` = kF16) or bfloat16 (kBF16) bit patterns (device uploads).
absl::Status ReadSlice16(const WeightStore& store, std::string_view name,
                         absl::Span<const int64_t> shape, const TensorSlice& slice, DType want,
                         std::vector<uint16_t>* out);

// The slices of the fused QKV projection of one layer, in the order they are concatenated
// locally ([q_r; k_r; v_r]): {tensor suffix, global rows, first global row, local rows}.
struct QkvPart {
  const char* proj;  // "q_proj", "k_proj", "v_proj"
  int64_t rows, row_begin, local_rows;
};
std::vector<QkvPart> QkvParts(const PhiConfig& config, const PhiShard& shard);

struct PhiLayerWeightsF32 {
  std::vector<float> ln_weight, ln_bias;  // [H], [H]
  std::vector<float> qkv_weight;          // [(nH + 2 nKV) hd, H]: rows of q_proj, k_proj, v_proj
  std::vector<float> qkv_bias;            // [(nH + 2 nKV) hd]
  std::vector<float> dense_weight;        // [H, nH hd]
  std::vector<float> dense_bias;          // [H]; empty on ranks other than 0 when sharded
  std::vector<float> fc1_weight;          // [I, H]
  std::vector<float> fc1_bias;            // [I]
  std::vector<float> fc2_weight;          // [H, I]
  std::vector<float> fc2_bias;            // [H]; empty on ranks other than 0 when sharded
  // PhiConfig::qk_layernorm only (else empty): self_attn.{q,k}_layernorm, [hd] each, every rank.
  std::vector<float> q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias;
};
// (Shapes above are local: nH, nKV and I are the shard's counts.)

struct PhiWeightsF32 {
  std::vector<float> embed;  // [vocab_end - vocab_begin, H] rows of model.embed_tokens.weight
  std::vector<PhiLayerWeightsF32> layers;
  std::vector<float> final_ln_weight, final_ln_bias;  // [H]
  // [lm_head rows, H] lm_head.weight; empty when the head is tied to `embed` and both hold the
  // same rows (tie_word_embeddings and no lm_head.weight in the checkpoint). Use lm_head() to read
  // it either way.
  std::vector<float> lm_head_weight;
  std::vector<float> lm_head_bias;  // [lm_head rows] lm_head.bias, or empty when the checkpoint has
                                    // none

  const float* lm_head() const {
    return lm_head_weight.empty() ? embed.data() : lm_head_weight.data();
  }
  bool lm_head_tied() const { return lm_head_weight.empty(); }
};

// Reads every tensor of spec §6.2 (converted to float32 from F32/F16/BF16). A missing tensor or a
// shape that disagrees with `config` is an error naming the tensor.
absl::StatusOr<PhiWeightsF32> LoadPhiWeightsF32(const WeightStore& store, const PhiConfig& config);
// Only the slices `shard` holds (the overload above is world size 1).
absl::StatusOr<PhiWeightsF32> LoadPhiWeightsF32(const WeightStore& store, const PhiConfig& config,
                                                const PhiShard& shard);

}  // namespace phishard
