#include "model/cpu_phi_model.h"

#include <cblas.h>
#include <sched.h>
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
#include "common/status_macros.h"
#include "kernels/embedding.h"
#include "kernels/gemm.h"
#include "kernels/layer_norm.h"
#include "kernels/paged_attention.h"
#include "kernels/sgmv.h"
#include "model/kv_cache.h"
#include "model/lora_shard.h"
#include "model/rotary_params.h"

namespace phishard {
namespace {

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

// An adapter in the registry must have this rank's shapes (ModelBackend::ShardAdapter): the
// kernels index its matrices with the local dims. A full adapter under tensor parallelism (or a
// shard of another world size) is refused instead of read out of bounds.
absl::Status CheckLocalShapes(const LoraAdapter& a, const PhiConfig& local, uint32_t index) {
  for (LoraTarget t : kAllLoraTargets) {
    const auto [in, out] = LoraTargetDims(local, t);
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : a.num_layers()); ++l) {
      const LoraModule& m = a.module(l, t);
      if (!m.present()) continue;
      if (static_cast<int64_t>(m.a.size()) != m.rank * in ||
          static_cast<int64_t>(m.b.size()) != m.rank * out) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "adapter index %d ('%s'): %s has A of %d and B of %d values, but this rank computes "
            "[%d, %d] x rank %d (was it sharded with ModelBackend::ShardAdapter?)",
            index, a.name(), LoraModuleName(t, l), m.a.size(), m.b.size(), in, out, m.rank));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

CpuPhiModel::CpuPhiModel(PhiConfig config, PhiShard shard, CpuParallel parallel,
                         PhiWeightsF32 weights)
    : config_(std::move(config)),
      shard_(shard),
      local_(LocalPhiConfig(config_, shard_)),
      parallel_(parallel),
      w_(std::move(weights)) {}

absl::StatusOr<std::unique_ptr<CpuPhiModel>> CpuPhiModel::Load(
    const std::filesystem::path& model_dir, CpuParallel parallel) {
  absl::StatusOr<PhiConfig> config = LoadPhiConfig(model_dir);
  if (!config.ok()) return config.status();
  absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenDir(model_dir);
  if (!store.ok()) return store.status();
  return Create(*config, **store, parallel);
}

absl::StatusOr<std::unique_ptr<CpuPhiModel>> CpuPhiModel::Create(const PhiConfig& config,
                                                                 const WeightStore& store,
                                                                 CpuParallel parallel) {
  Communicator* comm = parallel.comm;
  if (comm != nullptr && comm->memory_space() != MemorySpace::kHost) {
    return absl::InvalidArgumentError(
        "the CPU backend needs a host-memory communicator (Gloo), not a device one (NCCL)");
  }
  if (parallel.ranks_on_host < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("ranks_on_host = %d must be >= 1", parallel.ranks_on_host));
  }
  absl::StatusOr<PhiShard> shard = comm == nullptr
                                       ? MakePhiShard(config, 0, 1)
                                       : MakePhiShard(config, comm->rank(), comm->world_size());
  if (!shard.ok()) return shard.status();
  absl::StatusOr<PhiWeightsF32> weights = LoadPhiWeightsF32(store, config, *shard);
  if (!weights.ok()) return weights.status();
  Log(LogLevel::kInfo,
      absl::StrFormat("CPU Phi model: %d layers, hidden %d, heads %d/%d x %d, rotary %d, vocab %d, "
                      "float32%s%s",
                      config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                      config.num_key_value_heads, config.head_dim, config.rotary_dim,
                      config.vocab_size, weights->lm_head_tied() ? ", lm_head tied" : "",
                      weights->lm_head_bias.empty() ? "" : ", lm_head bias"));
  if (shard->sharded()) {
    Log(LogLevel::kInfo,
        absl::StrFormat("tensor parallel rank %d of %d: heads [%d, %d), KV heads [%d, %d)%s, "
                        "intermediate [%d, %d), embedding rows [%d, %d), lm_head %s",
                        shard->rank, shard->world_size, shard->q_head_begin,
                        shard->q_head_begin + shard->num_heads, shard->kv_head_begin,
                        shard->kv_head_begin + shard->num_kv_heads,
                        shard->kv_replicated ? " (replicated)" : "", shard->intermediate_begin,
                        shard->intermediate_begin + shard->intermediate, shard->vocab_begin,
                        shard->vocab_end,
                        shard->lm_head_parallel
                            ? absl::StrFormat("rows [%d, %d) + all-gather", shard->lm_head_begin,
                                              shard->lm_head_end)
                            : std::string("replicated (vocab not divisible by the shards)")));
    // Ranks on one host share its cores: without a cap every rank's OpenBLAS would start a
    // thread per core and they would preempt each other inside every GEMM. An explicit
    // OPENBLAS_NUM_THREADS wins.
    cpu_set_t cpus;
    if (parallel.ranks_on_host > 1 && std::getenv("OPENBLAS_NUM_THREADS") == nullptr &&
        sched_getaffinity(0, sizeof(cpus), &cpus) == 0) {
      const int threads = std::max(1, CPU_COUNT(&cpus) / parallel.ranks_on_host);
      openblas_set_num_threads(threads);
      Log(LogLevel::kInfo, absl::StrFormat("%d ranks on this host: %d OpenBLAS thread(s) each",
                                           parallel.ranks_on_host, threads));
    }
  } else {
    parallel.comm = nullptr;  // world size 1: no collectives at all
  }
  return std::unique_ptr<CpuPhiModel>(
      new CpuPhiModel(config, *shard, parallel, *std::move(weights)));
}

absl::StatusOr<LoraAdapter> CpuPhiModel::ShardAdapter(LoraAdapter full) const {
  if (!shard_.sharded()) return full;
  return ShardLoraAdapter(full, config_, shard_.rank, shard_.world_size);
}

absl::Status CpuPhiModel::Collective(absl::Status st, const char* what) const {
  if (st.ok()) return st;
  return absl::InternalError(absl::StrFormat("tensor-parallel rank %d of %d: %s failed: %s",
                                             shard_.rank, shard_.world_size, what, st.message()));
}

int64_t CpuPhiModel::KvBytesPerToken() const {
  return int64_t{2} * local_.num_hidden_layers * local_.num_key_value_heads * local_.head_dim *
         static_cast<int64_t>(sizeof(float));
}

int64_t CpuPhiModel::WorkspaceBytes(int num_tokens) const {
  const PhiConfig& c = local_;
  const int64_t per_token = 3 * c.hidden_size  // h, normed, last
                            + (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim +
                            c.num_attention_heads * c.head_dim + c.intermediate_size +
                            config_.vocab_size +  // logits when every row asks for them
                            (shard_.sharded() ? c.hidden_size : 0) +  // partial sums
                            (shard_.lm_head_parallel ? config_.vocab_size + c.vocab_size : 0);
  return static_cast<int64_t>(num_tokens) * per_token * static_cast<int64_t>(sizeof(float));
}

absl::StatusOr<int> CpuPhiModel::MaxKvBlocks(double memory_fraction, int max_batch_tokens) const {
  absl::StatusOr<int> local = LocalMaxKvBlocks(memory_fraction, max_batch_tokens);
  if (!shard_.sharded()) return local;
  // Every rank must allocate the same pool (the engine on each rank hands out the same block ids),
  // so the ranks agree on the smallest fit. An error is sent as 0 blocks, after the collective,
  // so that no rank leaves a peer waiting in it. Counts go as two floats of < 2^24 (exact).
  const int64_t mine = local.ok() ? *local : 0;
  float send[2];
  EncodeKvBlockCount(mine, send);
  std::vector<float> all(2 * static_cast<size_t>(shard_.world_size));
  if (absl::Status st = Collective(parallel_.comm->AllGather(send, all.data(), 2),
                                   "all-gather of the KV block counts");
      !st.ok()) {
    return st;
  }
  if (!local.ok()) return local.status();
  return FewestKvBlocks(all.data(), shard_.world_size, shard_.rank, mine);
}

absl::Status CpuPhiModel::CheckSameOnEveryRank(absl::Span<const RankSetting> settings) const {
  if (!shard_.sharded() || settings.empty()) return absl::OkStatus();
  const size_t n = settings.size() * kRankSettingFloats;
  std::vector<float> send(n), all(n * static_cast<size_t>(shard_.world_size));
  EncodeRankSettings(settings, send.data());
  if (absl::Status st = Collective(parallel_.comm->AllGather(send.data(), all.data(), n),
                                   "all-gather of the rank settings");
      !st.ok()) {
    return st;
  }
  return CheckRankSettingsAgree(settings, all.data(), shard_.world_size);
}

absl::StatusOr<int> CpuPhiModel::LocalMaxKvBlocks(double memory_fraction,
                                                  int max_batch_tokens) const {
  if (absl::Status s = CheckKvPoolSizing(memory_fraction, max_batch_tokens); !s.ok()) return s;
  // Ranks on one host share its memory.
  const int64_t available = AvailableHostBytes() / parallel_.ranks_on_host;
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
  return ValidateForwardBatch(b, config_.vocab_size, kv_num_blocks_, kv_block_size_);
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
    if (a != nullptr && (i == 0 || per_seq[i - 1] != a)) {
      PHI_RETURN_IF_ERROR(CheckLocalShapes(*a, local_, batch.seqs[i].adapter_index));
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
  const auto [in, out] = LoraTargetDims(local_, t);
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

absl::Status CpuPhiModel::Embed(const ForwardBatch& batch, float* h) {
  const int T = batch.num_tokens(), H = config_.hidden_size;
  if (!shard_.sharded()) {
    return KernelResult(EmbeddingCpu({.ids = batch.token_ids.data(),
                                      .table = w_.embed.data(),
                                      .out = h,
                                      .num_tokens = T,
                                      .num_rows = config_.vocab_size,
                                      .dim = H}),
                        "embedding");
  }
  // Vocab-parallel: this rank's rows, zeros for ids another rank holds; the sum over ranks has
  // exactly one non-zero term per token.
  for (int t = 0; t < T; ++t) {
    const int64_t id = batch.token_ids[t];
    float* row = h + static_cast<size_t>(t) * H;
    if (id >= shard_.vocab_begin && id < shard_.vocab_end) {
      std::copy_n(w_.embed.data() + (id - shard_.vocab_begin) * H, H, row);
    } else {
      std::fill_n(row, H, 0.0f);
    }
  }
  return Collective(parallel_.comm->AllReduceSum(h, static_cast<size_t>(T) * H),
                    "embedding all-reduce");
}

absl::Status CpuPhiModel::LmHead(const float* last, int R, std::vector<float>* logits) {
  const int H = config_.hidden_size, V = config_.vocab_size;
  logits->resize(static_cast<size_t>(R) * V);
  if (!shard_.lm_head_parallel) {  // world size 1, or a replicated head
    PHI_RETURN_IF_ERROR(
        KernelResult(GemmCpu({.x = last,
                              .w = w_.lm_head(),
                              .bias = w_.lm_head_bias.empty() ? nullptr : w_.lm_head_bias.data(),
                              .y = logits->data(),
                              .m = R,
                              .n = V,
                              .k = H}),
                     "lm_head gemm"));
    return ApplyLora(step_.lora_rows, 0, LoraTarget::kLmHead, last, H, logits->data(), V);
  }
  // Vocab-parallel: local logits [R, Vl] (bias slice and LoRA B rows of the same vocab range),
  // all-gathered to [W, R, Vl], then laid out as [R, V] with rank w's columns at w * Vl.
  const int W = shard_.world_size, Vl = local_.vocab_size;
  Step& s = step_;
  s.local_logits.resize(static_cast<size_t>(R) * Vl);
  s.gathered.resize(static_cast<size_t>(W) * R * Vl);
  PHI_RETURN_IF_ERROR(
      KernelResult(GemmCpu({.x = last,
                            .w = w_.lm_head(),
                            .bias = w_.lm_head_bias.empty() ? nullptr : w_.lm_head_bias.data(),
                            .y = s.local_logits.data(),
                            .m = R,
                            .n = Vl,
                            .k = H}),
                   "lm_head gemm"));
  PHI_RETURN_IF_ERROR(
      ApplyLora(s.lora_rows, 0, LoraTarget::kLmHead, last, H, s.local_logits.data(), Vl));
  PHI_RETURN_IF_ERROR(Collective(
      parallel_.comm->AllGather(s.local_logits.data(), s.gathered.data(), s.local_logits.size()),
      "logits all-gather"));
  for (int w = 0; w < W; ++w) {
    for (int r = 0; r < R; ++r) {
      std::copy_n(s.gathered.data() + (static_cast<size_t>(w) * R + r) * Vl, Vl,
                  logits->data() + static_cast<size_t>(r) * V + static_cast<size_t>(w) * Vl);
    }
  }
  return absl::OkStatus();
}

absl::Status CpuPhiModel::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  PHI_RETURN_IF_ERROR(ValidateBatch(batch));
  // Shapes are this rank's (local_): nH, nKV and I are divided among the ranks.
  const PhiConfig& c = local_;
  const int T = batch.num_tokens(), S = static_cast<int>(batch.seqs.size());
  const int R = static_cast<int>(batch.logit_rows.size());
  const int H = c.hidden_size, nH = c.num_attention_heads, nKV = c.num_key_value_heads;
  const int hd = c.head_dim, qkv_width = (nH + 2 * nKV) * hd;
  const bool tp = shard_.sharded();

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
  if (tp) s.partial.resize(s.h.size());
  s.last.resize(static_cast<size_t>(R) * H);
  const GemmEpilogue act =
      c.hidden_act == Activation::kGeluTanh ? GemmEpilogue::kGeluTanh : GemmEpilogue::kGeluErf;

  PHI_RETURN_IF_ERROR(Embed(batch, s.h.data()));
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
    RotaryKvWriteParams rot = RotaryParamsOf(c);
    rot.qkv = s.qkv.data();
    rot.positions = batch.positions.data();
    rot.slots = s.slots.data();
    rot.k_cache = k_cache;
    rot.v_cache = v_cache;
    rot.num_slots = static_cast<int64_t>(kv_num_blocks_) * kv_block_size_;
    rot.block_size = kv_block_size_;
    rot.num_tokens = T;
    if (c.qk_layernorm) {
      rot.q_norm_w = w.q_norm_weight.data();
      rot.q_norm_b = w.q_norm_bias.data();
      rot.k_norm_w = w.k_norm_weight.data();
      rot.k_norm_b = w.k_norm_bias.data();
    }
    PHI_RETURN_IF_ERROR(KernelResult(RotaryKvWriteCpu(rot), "rotary_kv_write"));
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
    // World 1: h += dense(attn) + fc2(mlp), both accumulated straight into the residual stream.
    // W > 1 (spec §6.9): the two row-parallel partials (biases on rank 0 only, LoRA deltas of the
    // rank's input slice included) are summed in `partial`, all-reduced ONCE, then added to h.
    float* out = tp ? s.partial.data() : s.h.data();
    PHI_RETURN_IF_ERROR(
        KernelResult(GemmCpu({.x = s.attn.data(),
                              .w = w.dense_weight.data(),
                              .bias = w.dense_bias.empty() ? nullptr : w.dense_bias.data(),
                              .y = out,
                              .m = T,
                              .n = H,
                              .k = nH * hd,
                              .accumulate = !tp}),
                     "dense gemm"));
    PHI_RETURN_IF_ERROR(
        ApplyLora(s.lora_tokens, l, LoraTarget::kDense, s.attn.data(), nH * hd, out, H));
    PHI_RETURN_IF_ERROR(
        KernelResult(GemmCpu({.x = s.mlp.data(),
                              .w = w.fc2_weight.data(),
                              .bias = w.fc2_bias.empty() ? nullptr : w.fc2_bias.data(),
                              .y = out,
                              .m = T,
                              .n = H,
                              .k = c.intermediate_size,
                              .accumulate = true}),
                     "fc2 gemm"));
    PHI_RETURN_IF_ERROR(
        ApplyLora(s.lora_tokens, l, LoraTarget::kFc2, s.mlp.data(), c.intermediate_size, out, H));
    if (tp) {
      PHI_RETURN_IF_ERROR(Collective(
          parallel_.comm->AllReduceSum(s.partial.data(), s.partial.size()), "layer all-reduce"));
      for (size_t i = 0; i < s.h.size(); ++i) s.h[i] += s.partial[i];
    }
  }
  if (R == 0) {
    logits->clear();
    return absl::OkStatus();
  }
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
  return LmHead(s.last.data(), R, logits);
}

}  // namespace phishard
