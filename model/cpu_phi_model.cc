#include "model/cpu_phi_model.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "kernels/embedding.h"
#include "kernels/gemm.h"
#include "kernels/layer_norm.h"
#include "kernels/paged_attention.h"
#include "kernels/rotary_kv_write.h"
#include "kernels/sgmv.h"
#include "model/kv_cache.h"

namespace phishard {
namespace {

#define PHI_RETURN_IF_ERROR(expr) \
  do {                            \
    absl::Status _st = (expr);    \
    if (!_st.ok()) return _st;    \
  } while (0)

// The model validates every input before calling a kernel, so a kernel error is a bug: INTERNAL.
absl::Status KernelResult(KernelStatus st, const char* op) {
  if (st == KernelStatus::kOk) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CPU kernel ", op, " failed: ", KernelStatusName(st)));
}

// MemAvailable from /proc/meminfo (what can be allocated without swapping), else free pages.
int64_t AvailableHostBytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line)) {
    int64_t kib = 0;
    if (std::sscanf(line.c_str(), "MemAvailable: %ld kB", &kib) == 1) return kib * 1024;
  }
  const long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : 0;
}

// The MLP activation, applied on its own when a LoRA delta must land between fc1 and the GELU.
void ActivateInPlace(float* x, size_t n, Activation act) {
  float (*f)(float) = act == Activation::kGeluTanh ? GeluTanh : GeluErf;
  for (size_t i = 0; i < n; ++i) x[i] = f(x[i]);
}

// Appends rows [.., end) for `adapter` to `segs`, extending the last segment when it has the
// same adapter (so consecutive sequences of one adapter form one segment).
void AppendSegment(std::vector<int32_t>* starts, std::vector<const LoraAdapter*>* adapters,
                   const LoraAdapter* adapter, int end) {
  if (!adapters->empty() && adapters->back() == adapter) {
    starts->back() = end;
  } else {
    adapters->push_back(adapter);
    starts->push_back(end);
  }
}

}  // namespace

CpuPhiModel::CpuPhiModel(PhiConfig config, PhiWeightsF32 weights)
    : config_(std::move(config)), w_(std::move(weights)) {}

absl::StatusOr<std::unique_ptr<CpuPhiModel>> CpuPhiModel::Load(
    const std::filesystem::path& model_dir) {
  absl::StatusOr<PhiConfig> config = LoadPhiConfig(model_dir);
  if (!config.ok()) return config.status();
  absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenDir(model_dir);
  if (!store.ok()) return store.status();
  return Create(*config, **store);
}

absl::StatusOr<std::unique_ptr<CpuPhiModel>> CpuPhiModel::Create(const PhiConfig& config,
                                                                 const WeightStore& store) {
  absl::StatusOr<PhiWeightsF32> weights = LoadPhiWeightsF32(store, config);
  if (!weights.ok()) return weights.status();
  Log(LogLevel::kInfo,
      absl::StrFormat("CPU Phi model: %d layers, hidden %d, heads %d/%d x %d, rotary %d, vocab %d, "
                      "float32%s%s",
                      config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                      config.num_key_value_heads, config.head_dim, config.rotary_dim,
                      config.vocab_size, weights->lm_head_tied() ? ", lm_head tied" : "",
                      weights->lm_head_bias.empty() ? "" : ", lm_head bias"));
  return std::unique_ptr<CpuPhiModel>(new CpuPhiModel(config, *std::move(weights)));
}

int64_t CpuPhiModel::KvBytesPerToken() const {
  return int64_t{2} * config_.num_hidden_layers * config_.num_key_value_heads * config_.head_dim *
         static_cast<int64_t>(sizeof(float));
}

int64_t CpuPhiModel::WorkspaceBytes(int num_tokens) const {
  const PhiConfig& c = config_;
  const int64_t per_token = 3 * c.hidden_size  // h, normed, last
                            + (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim +
                            c.num_attention_heads * c.head_dim + c.intermediate_size +
                            c.vocab_size;  // logits when every row asks for them
  return static_cast<int64_t>(num_tokens) * per_token * static_cast<int64_t>(sizeof(float));
}

absl::StatusOr<int> CpuPhiModel::MaxKvBlocks(double memory_fraction, int max_batch_tokens) const {
  if (!(memory_fraction > 0.0 && memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("memory_fraction = %g must be in (0, 1]", memory_fraction));
  }
  if (max_batch_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("max_batch_tokens = %d must be >= 0", max_batch_tokens));
  }
  const int64_t available = AvailableHostBytes();
  const int64_t budget =
      std::min<int64_t>(static_cast<int64_t>(memory_fraction * static_cast<double>(available)) -
                            WorkspaceBytes(max_batch_tokens),
                        kMaxKvCacheBytes);
  const int64_t per_block = KvBytesPerToken() * kKvBlockSize;
  const int64_t blocks = std::min<int64_t>(budget / per_block, std::numeric_limits<int>::max());
  if (blocks < 1) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "no KV block fits on the host: %.1f MiB available x fraction %g, minus %.1f MiB of "
        "workspace for %d tokens, leaves less than one block of %.1f KiB",
        available / 1048576.0, memory_fraction, WorkspaceBytes(max_batch_tokens) / 1048576.0,
        max_batch_tokens, per_block / 1024.0));
  }
  return static_cast<int>(blocks);
}

absl::Status CpuPhiModel::AllocateKvCache(int num_blocks, int block_size) {
  if (num_blocks < 1 || block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV cache needs num_blocks >= 1 and block_size >= 1, got %d and %d",
                        num_blocks, block_size));
  }
  const int64_t per_token = KvBytesPerToken();
  const int64_t tokens = static_cast<int64_t>(num_blocks) * block_size;
  if (tokens > std::numeric_limits<int64_t>::max() / per_token ||
      tokens * per_token > kMaxKvCacheBytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache of %d blocks x %d tokens needs %.1f GiB, over the CPU backend's limit of "
        "%.1f GiB",
        num_blocks, block_size, static_cast<double>(tokens) * per_token / (1 << 30),
        static_cast<double>(kMaxKvCacheBytes) / (1 << 30)));
  }
  kv_.reset();
  kv_num_blocks_ = 0;
  kv_block_size_ = 0;
  const int64_t total_floats = tokens * per_token / static_cast<int64_t>(sizeof(float));
  float* mem = static_cast<float*>(std::calloc(static_cast<size_t>(total_floats), sizeof(float)));
  if (mem == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("cannot allocate %.1f MiB of host memory for the KV cache",
                        static_cast<double>(total_floats) * sizeof(float) / 1048576.0));
  }
  kv_.reset(mem);
  kv_layer_floats_ = total_floats / (2 * config_.num_hidden_layers);
  kv_num_blocks_ = num_blocks;
  kv_block_size_ = block_size;
  return absl::OkStatus();
}

absl::Status CpuPhiModel::ValidateBatch(const ForwardBatch& b) const {
  if (kv_ == nullptr) {
    return absl::FailedPreconditionError("KV cache is not allocated (AllocateKvCache first)");
  }
  const int T = b.num_tokens();
  if (T == 0 || b.seqs.empty()) {
    return absl::InvalidArgumentError("batch has no tokens or no sequences");
  }
  if (static_cast<int>(b.positions.size()) != T) {
    return absl::InvalidArgumentError(
        absl::StrFormat("positions has %d entries but token_ids has %d", b.positions.size(), T));
  }
  for (int t = 0; t < T; ++t) {
    if (b.token_ids[t] < 0 || b.token_ids[t] >= config_.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("token_ids[%d] = %d is out of the vocabulary [0, %d)", t, b.token_ids[t],
                          config_.vocab_size));
    }
  }
  const int64_t capacity = static_cast<int64_t>(kv_num_blocks_) * kv_block_size_;
  int64_t t = 0;
  for (size_t s = 0; s < b.seqs.size(); ++s) {
    const SequenceInput& seq = b.seqs[s];
    if (seq.num_new_tokens < 1 || seq.num_new_tokens > T - t) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "seqs[%d].num_new_tokens = %d does not fit the %d tokens left of the batch", s,
          seq.num_new_tokens, T - t));
    }
    if (seq.context_len < seq.num_new_tokens || seq.context_len > capacity) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "seqs[%d].context_len = %d must be in [num_new_tokens = %d, KV capacity %d]", s,
          seq.context_len, seq.num_new_tokens, capacity));
    }
    const int64_t needed = KvBlockAllocator::BlocksFor(seq.context_len, kv_block_size_);
    if (static_cast<int64_t>(seq.block_table.size()) < needed) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "seqs[%d].block_table has %d blocks; context_len %d needs %d blocks of %d", s,
          seq.block_table.size(), seq.context_len, needed, kv_block_size_));
    }
    for (size_t i = 0; i < seq.block_table.size(); ++i) {
      if (seq.block_table[i] < 0 || seq.block_table[i] >= kv_num_blocks_) {
        return absl::InvalidArgumentError(
            absl::StrFormat("seqs[%d].block_table[%d] = %d is not a KV block id in [0, %d)", s, i,
                            seq.block_table[i], kv_num_blocks_));
      }
    }
    for (int j = 0; j < seq.num_new_tokens; ++j, ++t) {
      const int want = seq.context_len - seq.num_new_tokens + j;
      if (b.positions[t] != want) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "positions[%d] = %d but seqs[%d] (context_len %d, num_new_tokens %d) puts that token "
            "at position %d",
            t, b.positions[t], s, seq.context_len, seq.num_new_tokens, want));
      }
    }
  }
  if (t != T) {
    return absl::InvalidArgumentError(
        absl::StrFormat("sum of seqs[].num_new_tokens is %d but the batch has %d tokens", t, T));
  }
  for (size_t i = 0; i < b.logit_rows.size(); ++i) {
    if (b.logit_rows[i] < 0 || b.logit_rows[i] >= T) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "logit_rows[%d] = %d is not a token row in [0, %d)", i, b.logit_rows[i], T));
    }
  }
  return absl::OkStatus();
}

absl::Status CpuPhiModel::SetAdapterRegistry(const AdapterRegistry* registry) {
  adapters_ = registry;
  return absl::OkStatus();
}

absl::Status CpuPhiModel::PlanLora(const ForwardBatch& batch) {
  LoraSegments& tok = step_.lora_tokens;
  LoraSegments& rows = step_.lora_rows;
  for (LoraSegments* segs : {&tok, &rows}) {
    segs->starts.assign(1, 0);
    segs->adapters.clear();
    segs->any = false;
  }
  if (adapters_ == nullptr) return absl::OkStatus();
  std::vector<const LoraAdapter*>& per_seq = step_.lora_seq_adapters;
  per_seq.resize(batch.seqs.size());
  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    const LoraAdapter* a = adapters_->Find(batch.seqs[i].adapter_index);
    if (a != nullptr && a->num_layers() != config_.num_hidden_layers) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "adapter index %d ('%s') has %d layers but this model has %d",
          batch.seqs[i].adapter_index, a->name(), a->num_layers(), config_.num_hidden_layers));
    }
    per_seq[i] = a;
    tok.any = tok.any || a != nullptr;
    AppendSegment(&tok.starts, &tok.adapters, a, step_.cu_q_lens[i + 1]);
  }
  // Logit row r belongs to the sequence whose token range holds batch.logit_rows[r].
  for (size_t r = 0; r < batch.logit_rows.size(); ++r) {
    const size_t seq =
        std::upper_bound(step_.cu_q_lens.begin(), step_.cu_q_lens.end(), batch.logit_rows[r]) -
        step_.cu_q_lens.begin() - 1;
    rows.any = rows.any || per_seq[seq] != nullptr;
    AppendSegment(&rows.starts, &rows.adapters, per_seq[seq], static_cast<int>(r) + 1);
  }
  return absl::OkStatus();
}

bool CpuPhiModel::LoraTouches(const LoraSegments& segs, int layer, LoraTarget t) const {
  if (!segs.any) return false;
  for (const LoraAdapter* a : segs.adapters) {
    if (a != nullptr && a->module(layer, t).present()) return true;
  }
  return false;
}

absl::Status CpuPhiModel::ApplyLora(const LoraSegments& segs, int layer, LoraTarget t,
                                    const float* x, int ldx, float* y, int ldy) {
  if (!segs.any) return absl::OkStatus();
  Step& s = step_;
  const int n = static_cast<int>(segs.adapters.size());
  s.lora_a.assign(n, nullptr);
  s.lora_b.assign(n, nullptr);
  s.lora_ranks.assign(n, 0);
  s.lora_scales.assign(n, 0.0f);
  int max_rank = 0;
  for (int i = 0; i < n; ++i) {
    if (segs.adapters[i] == nullptr) continue;
    const LoraModule& m = segs.adapters[i]->module(layer, t);
    if (!m.present()) continue;
    s.lora_a[i] = m.a.data();
    s.lora_b[i] = m.b.data();
    s.lora_ranks[i] = m.rank;
    s.lora_scales[i] = m.scale;
    max_rank = std::max(max_rank, m.rank);
  }
  if (max_rank == 0) return absl::OkStatus();
  const int rows = segs.starts.back();
  s.lora_t.resize(static_cast<size_t>(rows) * max_rank);
  const auto [in, out] = LoraTargetDims(config_, t);
  PHI_RETURN_IF_ERROR(KernelResult(SgmvShrinkCpu({.x = x,
                                                  .t = s.lora_t.data(),
                                                  .seg_starts = segs.starts.data(),
                                                  .a = s.lora_a.data(),
                                                  .ranks = s.lora_ranks.data(),
                                                  .num_segments = n,
                                                  .num_rows = rows,
                                                  .in = static_cast<int>(in),
                                                  .ldx = ldx,
                                                  .ldt = max_rank}),
                                   "lora shrink"));
  return KernelResult(SgmvExpandCpu({.t = s.lora_t.data(),
                                     .y = y,
                                     .seg_starts = segs.starts.data(),
                                     .b = s.lora_b.data(),
                                     .ranks = s.lora_ranks.data(),
                                     .scales = s.lora_scales.data(),
                                     .num_segments = n,
                                     .num_rows = rows,
                                     .out = static_cast<int>(out),
                                     .ldy = ldy,
                                     .ldt = max_rank}),
                      "lora expand");
}

absl::Status CpuPhiModel::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  PHI_RETURN_IF_ERROR(ValidateBatch(batch));
  const PhiConfig& c = config_;
  const int T = batch.num_tokens(), S = static_cast<int>(batch.seqs.size());
  const int R = static_cast<int>(batch.logit_rows.size());
  const int H = c.hidden_size, nH = c.num_attention_heads, nKV = c.num_key_value_heads;
  const int hd = c.head_dim, qkv_width = (nH + 2 * nKV) * hd;

  // Plan: slots, varlen offsets and the padded block-table matrix, once per step.
  Step& s = step_;
  s.max_blocks = 0;
  for (const SequenceInput& seq : batch.seqs) {
    s.max_blocks = std::max(s.max_blocks, static_cast<int>(seq.block_table.size()));
  }
  s.slots.resize(T);
  s.cu_q_lens.assign(1, 0);
  s.context_lens.resize(S);
  s.block_tables.assign(static_cast<size_t>(S) * s.max_blocks, 0);
  for (int i = 0, t = 0; i < S; ++i) {
    const SequenceInput& seq = batch.seqs[i];
    std::copy(seq.block_table.begin(), seq.block_table.end(),
              s.block_tables.begin() + static_cast<size_t>(i) * s.max_blocks);
    s.cu_q_lens.push_back(s.cu_q_lens.back() + seq.num_new_tokens);
    s.context_lens[i] = seq.context_len;
    for (int j = 0; j < seq.num_new_tokens; ++j, ++t) {
      const int pos = batch.positions[t];
      s.slots[t] = static_cast<int64_t>(seq.block_table[pos / kv_block_size_]) * kv_block_size_ +
                   pos % kv_block_size_;
    }
  }
  PHI_RETURN_IF_ERROR(PlanLora(batch));
  s.h.resize(static_cast<size_t>(T) * H);
  s.normed.resize(s.h.size());
  s.qkv.resize(static_cast<size_t>(T) * qkv_width);
  s.attn.resize(static_cast<size_t>(T) * nH * hd);
  s.mlp.resize(static_cast<size_t>(T) * c.intermediate_size);
  s.last.resize(static_cast<size_t>(R) * H);
  logits->resize(static_cast<size_t>(R) * c.vocab_size);
  const GemmEpilogue act =
      c.hidden_act == Activation::kGeluTanh ? GemmEpilogue::kGeluTanh : GemmEpilogue::kGeluErf;

  PHI_RETURN_IF_ERROR(KernelResult(EmbeddingCpu({.ids = batch.token_ids.data(),
                                                 .table = w_.embed.data(),
                                                 .out = s.h.data(),
                                                 .num_tokens = T,
                                                 .num_rows = c.vocab_size,
                                                 .dim = H}),
                                   "embedding"));
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const PhiLayerWeightsF32& w = w_.layers[l];
    float* k_cache = kv_.get() + 2 * l * kv_layer_floats_;
    float* v_cache = k_cache + kv_layer_floats_;
    // n = LN(h); the one norm feeds both the attention and the MLP branch (parallel residual).
    PHI_RETURN_IF_ERROR(KernelResult(LayerNormCpu({.x = s.h.data(),
                                                   .weight = w.ln_weight.data(),
                                                   .bias = w.ln_bias.data(),
                                                   .y = s.normed.data(),
                                                   .rows = T,
                                                   .cols = H,
                                                   .eps = c.layer_norm_eps}),
                                     "layer_norm"));
    PHI_RETURN_IF_ERROR(KernelResult(GemmCpu({.x = s.normed.data(),
                                              .w = w.qkv_weight.data(),
                                              .bias = w.qkv_bias.data(),
                                              .y = s.qkv.data(),
                                              .m = T,
                                              .n = qkv_width,
                                              .k = H}),
                                     "qkv gemm"));
    // LoRA q/k/v deltas land in their column slices of the fused output, before rotary.
    const int qkv_offsets[] = {0, nH * hd, (nH + nKV) * hd};
    for (LoraTarget t : {LoraTarget::kQProj, LoraTarget::kKProj, LoraTarget::kVProj}) {
      PHI_RETURN_IF_ERROR(ApplyLora(s.lora_tokens, l, t, s.normed.data(), H,
                                    s.qkv.data() + qkv_offsets[static_cast<int>(t)], qkv_width));
    }
    PHI_RETURN_IF_ERROR(KernelResult(
        RotaryKvWriteCpu({.qkv = s.qkv.data(),
                          .positions = batch.positions.data(),
                          .slots = s.slots.data(),
                          .k_cache = k_cache,
                          .v_cache = v_cache,
                          .num_slots = static_cast<int64_t>(kv_num_blocks_) * kv_block_size_,
                          .num_tokens = T,
                          .num_heads = nH,
                          .num_kv_heads = nKV,
                          .head_dim = hd,
                          .rotary_dim = c.rotary_dim,
                          .theta = static_cast<float>(c.rope_theta)}),
        "rotary_kv_write"));
    PHI_RETURN_IF_ERROR(
        KernelResult(PagedAttentionCpu({.q = s.qkv.data(),
                                        .k_cache = k_cache,
                                        .v_cache = v_cache,
                                        .out = s.attn.data(),
                                        .cu_q_lens = s.cu_q_lens.data(),
                                        .context_lens = s.context_lens.data(),
                                        .block_tables = s.block_tables.data(),
                                        .num_seqs = S,
                                        .num_tokens = T,
                                        .max_blocks_per_seq = s.max_blocks,
                                        .num_blocks = kv_num_blocks_,
                                        .block_size = kv_block_size_,
                                        .num_heads = nH,
                                        .num_kv_heads = nKV,
                                        .head_dim = hd,
                                        .q_stride = qkv_width,
                                        .scale = 1.0f / std::sqrt(static_cast<float>(hd))}),
                     "paged_attention"));
    // An fc1 LoRA delta goes in before the activation, so the GELU then runs on its own.
    const bool fc1_lora = LoraTouches(s.lora_tokens, l, LoraTarget::kFc1);
    PHI_RETURN_IF_ERROR(KernelResult(GemmCpu({.x = s.normed.data(),
                                              .w = w.fc1_weight.data(),
                                              .bias = w.fc1_bias.data(),
                                              .y = s.mlp.data(),
                                              .m = T,
                                              .n = c.intermediate_size,
                                              .k = H,
                                              .epilogue = fc1_lora ? GemmEpilogue::kNone : act}),
                                     "fc1 gemm"));
    if (fc1_lora) {
      PHI_RETURN_IF_ERROR(ApplyLora(s.lora_tokens, l, LoraTarget::kFc1, s.normed.data(), H,
                                    s.mlp.data(), c.intermediate_size));
      ActivateInPlace(s.mlp.data(), s.mlp.size(), c.hidden_act);
    }
    // h += dense(attn) + fc2(mlp): both accumulate straight into the residual stream (world 1;
    // tensor parallelism would sum them in a separate buffer and all-reduce it first).
    PHI_RETURN_IF_ERROR(KernelResult(GemmCpu({.x = s.attn.data(),
                                              .w = w.dense_weight.data(),
                                              .bias = w.dense_bias.data(),
                                              .y = s.h.data(),
                                              .m = T,
                                              .n = H,
                                              .k = nH * hd,
                                              .accumulate = true}),
                                     "dense gemm"));
    PHI_RETURN_IF_ERROR(
        ApplyLora(s.lora_tokens, l, LoraTarget::kDense, s.attn.data(), nH * hd, s.h.data(), H));
    PHI_RETURN_IF_ERROR(KernelResult(GemmCpu({.x = s.mlp.data(),
                                              .w = w.fc2_weight.data(),
                                              .bias = w.fc2_bias.data(),
                                              .y = s.h.data(),
                                              .m = T,
                                              .n = H,
                                              .k = c.intermediate_size,
                                              .accumulate = true}),
                                     "fc2 gemm"));
    PHI_RETURN_IF_ERROR(ApplyLora(s.lora_tokens, l, LoraTarget::kFc2, s.mlp.data(),
                                  c.intermediate_size, s.h.data(), H));
  }
  if (R == 0) return absl::OkStatus();
  // Only the requested rows go through the final norm and the LM head.
  PHI_RETURN_IF_ERROR(KernelResult(EmbeddingCpu({.ids = batch.logit_rows.data(),
                                                 .table = s.h.data(),
                                                 .out = s.last.data(),
                                                 .num_tokens = R,
                                                 .num_rows = T,
                                                 .dim = H}),
                                   "gather logit rows"));
  PHI_RETURN_IF_ERROR(KernelResult(LayerNormCpu({.x = s.last.data(),
                                                 .weight = w_.final_ln_weight.data(),
                                                 .bias = w_.final_ln_bias.data(),
                                                 .y = s.last.data(),
                                                 .rows = R,
                                                 .cols = H,
                                                 .eps = c.layer_norm_eps}),
                                   "final layer_norm"));
  PHI_RETURN_IF_ERROR(
      KernelResult(GemmCpu({.x = s.last.data(),
                            .w = w_.lm_head(),
                            .bias = w_.lm_head_bias.empty() ? nullptr : w_.lm_head_bias.data(),
                            .y = logits->data(),
                            .m = R,
                            .n = c.vocab_size,
                            .k = H}),
                   "lm_head gemm"));
  return ApplyLora(s.lora_rows, 0, LoraTarget::kLmHead, s.last.data(), H, logits->data(),
                   c.vocab_size);
}

}  // namespace phishard
