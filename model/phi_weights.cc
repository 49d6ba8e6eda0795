#include "model/phi_weights.h"

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "model/load_progress.h"

namespace phishard {
namespace {

std::string ShapeStr(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Resolves the -1 ends of `slice` against `shape` and checks the ranges; returns the tensor.
absl::StatusOr<const TensorView*> CheckSlice(const WeightStore& store, std::string_view name,
                                             absl::Span<const int64_t> shape, TensorSlice* slice) {
  absl::StatusOr<const TensorView*> t = store.Get(name);
  if (!t.ok()) return t.status();
  if (absl::Span<const int64_t>((*t)->shape) != shape) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tensor '%s' in '%s' has shape %s, expected %s", name, (*t)->file,
                        ShapeStr((*t)->shape), ShapeStr(shape)));
  }
  if (shape.size() != 1 && shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor '%s': slices are for 1-D and 2-D tensors, not %s", name, ShapeStr(shape)));
  }
  const int64_t rows = shape[0], cols = shape.size() == 2 ? shape[1] : 1;
  if (slice->row_end < 0) slice->row_end = rows;
  if (slice->col_end < 0) slice->col_end = cols;
  if (slice->row_begin < 0 || slice->row_begin > slice->row_end || slice->row_end > rows ||
      slice->col_begin < 0 || slice->col_begin > slice->col_end || slice->col_end > cols) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor '%s' of shape %s: slice rows [%d, %d) x columns [%d, %d) is out of range", name,
        ShapeStr(shape), slice->row_begin, slice->row_end, slice->col_begin, slice->col_end));
  }
  return t;
}

// Converts n elements of dtype `src` at `p` (unaligned) with `fn(float) -> Out`.
template <typename Out, typename Fn>
void ConvertRun(DType src, const std::byte* p, int64_t n, Out* out, Fn fn) {
  switch (src) {
    case DType::kF32:
      for (int64_t i = 0; i < n; ++i) {
        float f;
        std::memcpy(&f, p + 4 * i, 4);
        out[i] = fn(f);
      }
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = fn(HalfToFloat(h));
      }
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, p + 2 * i, 2);
        out[i] = fn(BF16ToFloat(b));
      }
      return;
  }
}

// Row by row over the slice: each row's column range is one contiguous run of the source.
template <typename Out, typename Fn>
void ConvertSlice(const TensorView& t, const TensorSlice& s, Out* out, Fn fn) {
  const int64_t cols = t.shape.size() == 2 ? t.shape[1] : 1;
  const int64_t width = s.col_end - s.col_begin;
  const size_t esize = DTypeSize(t.dtype);
  for (int64_t r = s.row_begin; r < s.row_end; ++r) {
    const std::byte* src = t.data + (r * cols + s.col_begin) * static_cast<int64_t>(esize);
    ConvertRun(t.dtype, src, width, out + (r - s.row_begin) * width, fn);
  }
}

bool IsWhole(const TensorSlice& s, absl::Span<const int64_t> shape) {
  return s.row_begin == 0 && s.row_end == shape[0] && s.col_begin == 0 &&
         s.col_end == (shape.size() == 2 ? shape[1] : 1);
}

absl::Status LoadLayer(const WeightStore& store, const PhiConfig& c, const PhiShard& sh, int i,
                       PhiLayerWeightsF32* l) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim;
  const int64_t q_out = static_cast<int64_t>(c.num_attention_heads) * hd;
  const int64_t q0 = static_cast<int64_t>(sh.q_head_begin) * hd;
  const int64_t q1 = q0 + static_cast<int64_t>(sh.num_heads) * hd;
  const int64_t i0 = sh.intermediate_begin, i1 = i0 + sh.intermediate;
  const bool bias = sh.adds_row_parallel_bias();
  const std::string p = absl::StrCat("model.layers.", i, ".");
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "input_layernorm.weight", {H}, &l->ln_weight));
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "input_layernorm.bias", {H}, &l->ln_bias));

  // Fuse this rank's q, k, v row blocks into one [(nH + 2 nKV) hd, H] matrix (local counts).
  l->qkv_weight.clear();
  l->qkv_bias.clear();
  std::vector<float> w, b;
  for (const QkvPart& part : QkvParts(c, sh)) {
    const std::string base = absl::StrCat(p, "self_attn.", part.proj);
    const TensorSlice rows{.row_begin = part.row_begin,
                           .row_end = part.row_begin + part.local_rows};
    PHI_RETURN_IF_ERROR(ReadF32Slice(store, base + ".weight", {part.rows, H}, rows, &w));
    PHI_RETURN_IF_ERROR(ReadF32Slice(store, base + ".bias", {part.rows}, rows, &b));
    l->qkv_weight.insert(l->qkv_weight.end(), w.begin(), w.end());
    l->qkv_bias.insert(l->qkv_bias.end(), b.begin(), b.end());
  }
  if (c.qk_layernorm) {  // over head_dim, shared by the heads: the same on every rank
    PHI_RETURN_IF_ERROR(store.ReadF32(p + "self_attn.q_layernorm.weight", {hd}, &l->q_norm_weight));
    PHI_RETURN_IF_ERROR(store.ReadF32(p + "self_attn.q_layernorm.bias", {hd}, &l->q_norm_bias));
    PHI_RETURN_IF_ERROR(store.ReadF32(p + "self_attn.k_layernorm.weight", {hd}, &l->k_norm_weight));
    PHI_RETURN_IF_ERROR(store.ReadF32(p + "self_attn.k_layernorm.bias", {hd}, &l->k_norm_bias));
  }
  PHI_RETURN_IF_ERROR(ReadF32Slice(store, p + "self_attn.dense.weight", {H, q_out},
                                   {.col_begin = q0, .col_end = q1}, &l->dense_weight));
  PHI_RETURN_IF_ERROR(ReadF32Slice(store, p + "mlp.fc1.weight", {I, H},
                                   {.row_begin = i0, .row_end = i1}, &l->fc1_weight));
  PHI_RETURN_IF_ERROR(
      ReadF32Slice(store, p + "mlp.fc1.bias", {I}, {.row_begin = i0, .row_end = i1}, &l->fc1_bias));
  PHI_RETURN_IF_ERROR(ReadF32Slice(store, p + "mlp.fc2.weight", {H, I},
                                   {.col_begin = i0, .col_end = i1}, &l->fc2_weight));
  // Row-parallel biases: read (and shape-checked) everywhere, kept on rank 0 only.
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "self_attn.dense.bias", {H}, &l->dense_bias));
  PHI_RETURN_IF_ERROR(store.ReadF32(p + "mlp.fc2.bias", {H}, &l->fc2_bias));
  if (!bias) {
    l->dense_bias = {};
    l->fc2_bias = {};
  }
  return absl::OkStatus();
}

}  // namespace

void EncodeKvBlockCount(int64_t blocks, float out[2]) {
  out[0] = static_cast<float>(blocks >> 20);
  out[1] = static_cast<float>(blocks & 0xFFFFF);
}

absl::StatusOr<int> FewestKvBlocks(const float* counts, int world, int rank, int64_t mine) {
  int64_t fewest = mine;
  int poorest = rank;
  for (int r = 0; r < world; ++r) {
    const int64_t n =
        (static_cast<int64_t>(counts[2 * r]) << 20) + static_cast<int64_t>(counts[2 * r + 1]);
    if (n < fewest) {
      fewest = n;
      poorest = r;
    }
  }
  if (fewest < 1) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("no KV block fits on tensor-parallel rank %d (this rank %d fits %d blocks)",
                        poorest, rank, mine));
  }
  return static_cast<int>(fewest);
}

absl::Status CheckKvPoolSizing(double memory_fraction, int max_batch_tokens) {
  if (!(memory_fraction > 0.0 && memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("memory_fraction = %g must be in (0, 1]", memory_fraction));
  }
  if (max_batch_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("max_batch_tokens = %d must be >= 0", max_batch_tokens));
  }
  return absl::OkStatus();
}

absl::StatusOr<PhiShard> MakePhiShard(const PhiConfig& c, int rank, int world_size) {
  if (c.hidden_size <= 0 || c.num_attention_heads <= 0 || c.num_key_value_heads <= 0 ||
      c.head_dim <= 0 || c.intermediate_size <= 0 || c.vocab_size <= 0 ||
      c.num_hidden_layers <= 0) {
    return absl::InvalidArgumentError("PhiConfig has a non-positive size; was it parsed?");
  }
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("rank %d of world size %d: need world_size >= 1 and 0 <= rank < world_size",
                        rank, world_size));
  }
  const int W = world_size, nH = c.num_attention_heads, nKV = c.num_key_value_heads;
  for (const auto& [what, value] : {std::pair<const char*, int>{"num_attention_heads", nH},
                                    {"intermediate_size", c.intermediate_size}}) {
    if (value % W != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "config.json: %s = %d must be divisible by the number of shards (%d) for tensor "
          "parallelism",
          what, value, W));
    }
  }
  if (nKV % W != 0 && (nKV > W || W % nKV != 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "config.json: num_key_value_heads = %d must be divisible by the number of shards (%d), or "
        "divide it (each KV head then replicated on %d / num_key_value_heads ranks)",
        nKV, W, W));
  }
  PhiShard s;
  s.rank = rank;
  s.world_size = W;
  s.num_heads = nH / W;
  s.q_head_begin = rank * s.num_heads;
  if (nKV % W == 0) {
    s.num_kv_heads = nKV / W;
    s.kv_head_begin = rank * s.num_kv_heads;
  } else {
    // nKV divides W; the rank's query heads [r nH/W, (r+1) nH/W) all belong to KV head
    // (r nH/W) / (nH/nKV) = r / (W/nKV) because nH/W divides the group size nH/nKV.
    s.num_kv_heads = 1;
    s.kv_head_begin = rank / (W / nKV);
    s.kv_replicated = true;
  }
  s.intermediate = c.intermediate_size / W;
  s.intermediate_begin = rank * s.intermediate;
  const int64_t V = c.vocab_size;
  const int64_t per_rank = (V + W - 1) / W;
  s.vocab_begin = std::min<int64_t>(V, rank * per_rank);
  s.vocab_end = std::min<int64_t>(V, (rank + 1) * per_rank);
  s.lm_head_parallel = W > 1 && V % W == 0;
  s.lm_head_begin = s.lm_head_parallel ? rank * (V / W) : 0;
  s.lm_head_end = s.lm_head_parallel ? (rank + 1) * (V / W) : V;
  return s;
}

PhiConfig LocalPhiConfig(const PhiConfig& config, const PhiShard& shard) {
  PhiConfig local = config;
  local.num_attention_heads = shard.num_heads;
  local.num_key_value_heads = shard.num_kv_heads;
  local.intermediate_size = shard.intermediate;
  local.vocab_size = static_cast<int>(shard.lm_head_end - shard.lm_head_begin);
  return local;
}

std::vector<QkvPart> QkvParts(const PhiConfig& c, const PhiShard& sh) {
  const int64_t hd = c.head_dim;
  const int64_t q_rows = static_cast<int64_t>(c.num_attention_heads) * hd;
  const int64_t kv_rows = static_cast<int64_t>(c.num_key_value_heads) * hd;
  return {{"q_proj", q_rows, sh.q_head_begin * hd, sh.num_heads * hd},
          {"k_proj", kv_rows, sh.kv_head_begin * hd, sh.num_kv_heads * hd},
          {"v_proj", kv_rows, sh.kv_head_begin * hd, sh.num_kv_heads * hd}};
}

absl::Status ReadF32Slice(const WeightStore& store, std::string_view name,
                          absl::Span<const int64_t> shape, const TensorSlice& slice,
                          std::vector<float>* out) {
  TensorSlice s = slice;
  absl::StatusOr<const TensorView*> t = CheckSlice(store, name, shape, &s);
  if (!t.ok()) return t.status();
  if (IsWhole(s, shape)) return store.ReadF32(name, shape, out);  // the vectorised whole read
  out->resize(static_cast<size_t>((s.row_end - s.row_begin) * (s.col_end - s.col_begin)));
  ConvertSlice(**t, s, out->data(), [](float f) { return f; });
  return absl::OkStatus();
}

absl::Status ReadSlice16(const WeightStore& store, std::string_view name,
                         absl::Span<const int64_t> shape, const TensorSlice& slice, DType want,
                         std::vector<uint16_t>* out) {
  if (want != DType::kF16 && want != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrFormat("ReadSlice16 of '%s': want F16 or BF16, not %s", name, DTypeName(want)));
  }
  TensorSlice s = slice;
  absl::StatusOr<const TensorView*> t = CheckSlice(store, name, shape, &s);
  if (!t.ok()) return t.status();
  if (IsWhole(s, shape)) {
    return want == DType::kF16 ? store.ReadF16(name, shape, out) : store.ReadBF16(name, shape, out);
  }
  out->resize(static_cast<size_t>((s.row_end - s.row_begin) * (s.col_end - s.col_begin)));
  // Same-dtype runs are bit copies (the float round trip is exact for F16/BF16 values, NaN
  // payloads aside); cross conversions round once, as WeightStore's readers do.
  if (want == DType::kF16) {
    ConvertSlice(**t, s, out->data(), [](float f) { return FloatToHalf(f); });
  } else {
    ConvertSlice(**t, s, out->data(), [](float f) { return FloatToBF16(f); });
  }
  return absl::OkStatus();
}

absl::StatusOr<PhiWeightsF32> LoadPhiWeightsF32(const WeightStore& store, const PhiConfig& c) {
  absl::StatusOr<PhiShard> whole = MakePhiShard(c, 0, 1);
  if (!whole.ok()) return whole.status();
  return LoadPhiWeightsF32(store, c, *whole);
}

absl::StatusOr<PhiWeightsF32> LoadPhiWeightsF32(const WeightStore& store, const PhiConfig& c,
                                                const PhiShard& sh) {
  if (c.hidden_size <= 0 || c.num_attention_heads <= 0 || c.num_key_value_heads <= 0 ||
      c.head_dim <= 0 || c.intermediate_size <= 0 || c.vocab_size <= 0 ||
      c.num_hidden_layers <= 0) {
    return absl::InvalidArgumentError("PhiConfig has a non-positive size; was it parsed?");
  }
  const int64_t H = c.hidden_size, V = c.vocab_size;
  PhiWeightsF32 w;
  const TensorSlice vocab_rows{.row_begin = sh.vocab_begin, .row_end = sh.vocab_end};
  PHI_RETURN_IF_ERROR(
      ReadF32Slice(store, "model.embed_tokens.weight", {V, H}, vocab_rows, &w.embed));
  w.layers.resize(c.num_hidden_layers);
  // Startup progress for big models (a Phi-2 conversion takes tens of seconds on CPU), in bytes
  // of the checkpoint: a line at most every 2 s and always at the end (docs/observability.md).
  auto layer_bytes = [&store](const std::string& prefix) {
    uint64_t n = 0;
    for (const std::string& name : store.Names()) {
      absl::StatusOr<const TensorView*> t = store.Get(name);
      if (t.ok() && (prefix.empty() || name.rfind(prefix, 0) == 0)) n += (*t)->nbytes;
    }
    return n;
  };
  const uint64_t checkpoint_bytes = layer_bytes("");
  LoadProgress progress(checkpoint_bytes);
  progress.Add(layer_bytes("model.embed_tokens."), "embeddings");
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    PHI_RETURN_IF_ERROR(LoadLayer(store, c, sh, i, &w.layers[i]));
    progress.Add(layer_bytes(absl::StrCat("model.layers.", i, ".")),
                 absl::StrCat("layer ", i + 1, "/", c.num_hidden_layers));
  }
  PHI_RETURN_IF_ERROR(store.ReadF32("model.final_layernorm.weight", {H}, &w.final_ln_weight));
  PHI_RETURN_IF_ERROR(store.ReadF32("model.final_layernorm.bias", {H}, &w.final_ln_bias));
  const TensorSlice head_rows{.row_begin = sh.lm_head_begin, .row_end = sh.lm_head_end};
  if (store.Has("lm_head.weight")) {
    PHI_RETURN_IF_ERROR(
        ReadF32Slice(store, "lm_head.weight", {V, H}, head_rows, &w.lm_head_weight));
  } else if (!c.tie_word_embeddings) {
    return absl::NotFoundError(
        "tensor 'lm_head.weight' is missing and config.json does not set tie_word_embeddings");
  } else if (sh.lm_head_begin != sh.vocab_begin || sh.lm_head_end != sh.vocab_end) {
    // Tied, but the head needs other rows than the embedding holds (replicated head over a
    // vocab-parallel embedding): its own copy.
    PHI_RETURN_IF_ERROR(
        ReadF32Slice(store, "model.embed_tokens.weight", {V, H}, head_rows, &w.lm_head_weight));
  }
  if (store.Has("lm_head.bias")) {
    PHI_RETURN_IF_ERROR(ReadF32Slice(store, "lm_head.bias", {V}, head_rows, &w.lm_head_bias));
  }
  progress.Add(checkpoint_bytes - progress.done(), "final norm and head");
  return w;
}

}  // namespace phishard
