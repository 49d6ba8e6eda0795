#ifdef PHISHARD_HAVE_CUDA

#include "model/cuda_lora.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kernels/cuda/gelu_cuda.h"
#include "kernels/cuda/sgmv_cuda.h"
#include "model/lora_adapter.h"
#include "model/safetensors.h"

namespace phishard {
namespace {

constexpr size_t kAlign = 256;
constexpr size_t kHeaderBytes = 16;  // int32 {token tiles, logit tiles, 0, 0}
constexpr int kMinRankCap = 16;

size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Targets by index: 0 q_proj, 1 k_proj, 2 v_proj, 3 dense, 4 fc1, 5 fc2 (LoraTarget order).
constexpr int kQ = 0, kK = 1, kV = 2, kDense = 3, kFc1 = 4, kFc2 = 5;

}  // namespace

CudaLora::CudaLora(const PhiConfig& config, DataType dtype, int device)
    : config_(config), dtype_(dtype), device_(device) {
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_MIN_ROWS"); v != nullptr && *v != 0) {
    gemm_min_rows_ = std::max(0, std::atoi(v));
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_FUSED_GELU"); v != nullptr && *v == '0') {
    gemm_fused_gelu_ = false;
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_SPLIT_T"); v != nullptr && *v != 0) {
    gemm_split_t_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_MAX_SEGMENTS"); v != nullptr && *v != 0) {
    gemm_max_segments_ = std::max(0, std::atoi(v));
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_SEGMENT_ROWS"); v != nullptr && *v != 0) {
    gemm_segment_rows_ = std::max(0, std::atoi(v));
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_DELTA_FIRST"); v != nullptr && *v != 0) {
    gemm_delta_first_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_PREFETCH"); v != nullptr && *v != 0) {
    gemm_prefetch_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_QKV_MERGE"); v != nullptr && *v != 0) {
    gemm_qkv_merge_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_FC1_KERNEL"); v != nullptr && *v != 0) {
    gemm_fc1_kernel_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_SEGMENT_SHRINK"); v != nullptr && *v != 0) {
    gemm_segment_shrink_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_GEMM_SGMV_SHRINK"); v != nullptr && *v != 0) {
    gemm_sgmv_shrink_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_OVERLAP"); v != nullptr && *v == '0') {
    overlap_ = false;
  }
  if (const char* v = std::getenv("PHISHARD_LORA_FUSED"); v != nullptr && *v == '0') {
    fused_ = false;
  }
  if (const char* v = std::getenv("PHISHARD_LORA_BRANCH"); v != nullptr && *v != 0) {
    const std::string s(v);
    if (s == "0" || s == "1" || s == "2" || s == "3") {
      branch_mode_ = s[0] - '0';
    } else {
      PHI_LOG(WARNING) << "PHISHARD_LORA_BRANCH='" << s << "' is not 0, 1, 2 or 3: keeping "
                       << branch_mode_;
    }
  }
  if (const char* v = std::getenv("PHISHARD_LORA_JOIN_EARLY"); v != nullptr && *v != 0) {
    join_early_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_BRANCH_PRIORITY"); v != nullptr && *v != 0) {
    branch_priority_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_BESIDE"); v != nullptr && *v != 0) {
    beside_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_DENSE_BESIDE"); v != nullptr && *v != 0) {
    if (*v >= '0' && *v <= '2' && v[1] == 0) {
      dense_beside_ = *v - '0';
    } else {
      PHI_LOG(WARNING) << "PHISHARD_LORA_DENSE_BESIDE='" << v << "' is not 0, 1 or 2: keeping "
                       << dense_beside_;
    }
  }
  if (const char* v = std::getenv("PHISHARD_LORA_ROTARY_FOLD"); v != nullptr && *v != 0) {
    rotary_fold_ = *v != '0';
  }
  if (const char* v = std::getenv("PHISHARD_LORA_DECODE_TUNING"); v != nullptr && *v != 0) {
    if (absl::Status st = SetDecodeTuning(v); !st.ok()) {
      PHI_LOG(WARNING) << "PHISHARD_LORA_DECODE_TUNING ignored: " << st.message();
    }
  }
}

CudaLora::~CudaLora() {
  DeviceSet(device_);
  FreeAll();
  FreeGemm();
  if (table_dev_) DeviceFree(table_dev_);
  if (plan_dev_) DeviceFree(plan_dev_);
  if (plan_host_) DeviceFreeHost(plan_host_);
  if (t_dev_) DeviceFree(t_dev_);
  if (side_) {
    DeviceStreamSync(side_);
    DeviceStreamDestroy(side_);
  }
  DeviceEventDestroy(fork_ev_);
  DeviceEventDestroy(join_ev_);
  FreeBeside();
}

void CudaLora::FreeSlot(int slot) {
  Slot& s = slots_[slot];
  if (s.mem != nullptr) DeviceFree(s.mem);
  adapter_bytes_ -= static_cast<int64_t>(s.bytes);
  s = Slot{};
  std::fill_n(table_host_.begin() + static_cast<size_t>(slot) * stride(), stride(), SgmvWeight{});
}

void CudaLora::FreeAll() {
  for (size_t i = 0; i < slots_.size(); ++i) FreeSlot(static_cast<int>(i));
}

absl::Status CudaLora::SetRegistry(const AdapterRegistry* registry, cudaStream_t stream) {
  DeviceSet(device_);
  if (registry != registry_) {
    if (int err = DeviceStreamSync(stream); err != 0) {
      DeviceGetLastError();
      return absl::InternalError(absl::StrFormat("CUDA synchronize failed on device %d: %s",
                                                 device_, DeviceErrorString(err)));
    }
    FreeAll();
    if (table_dev_) DeviceFree(table_dev_);
    table_dev_ = nullptr;
    slots_.clear();
    table_host_.clear();
    loaded_present_.clear();
    registry_ = registry;
    synced_generation_ = ~uint64_t{0};
    graphs_stale_ = true;  // the table moved
    active_ = false;
    if (registry == nullptr) return absl::OkStatus();
    const size_t entries = static_cast<size_t>(registry->num_slots()) * stride();
    void* table = nullptr;
    if (int err = DeviceMalloc(&table, entries * sizeof(SgmvWeight)); err != 0) {
      DeviceGetLastError();
      registry_ = nullptr;
      return absl::ResourceExhaustedError(absl::StrFormat(
          "cannot allocate the LoRA weight table (%d slots x %d modules) on CUDA device %d: %s",
          registry->num_slots(), stride(), device_, DeviceErrorString(err)));
    }
    table_dev_ = static_cast<SgmvWeight*>(table);
    DeviceMemset(table_dev_, 0, entries * sizeof(SgmvWeight), stream);
    slots_.resize(registry->num_slots());
    table_host_.assign(entries, SgmvWeight{});
  }
  return Sync(stream);
}

absl::Status CudaLora::Upload(int slot, const LoraAdapter& a, cudaStream_t stream) {
  const int L = config_.num_hidden_layers;
  if (a.num_layers() != L) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "adapter '%s' has %d layers but this model has %d", a.name(), a.num_layers(), L));
  }
  // Layout: A then B of every adapted module, each 256-byte aligned.
  struct Piece {
    const LoraModule* m;
    int entry;
    size_t a_off, b_off;
    LoraTarget target;
    int layer;
  };
  std::vector<Piece> pieces;
  size_t total = 0;
  Slot s;
  s.present.assign(stride(), false);
  for (LoraTarget t : kAllLoraTargets) {
    const auto [in, out] = LoraTargetDims(config_, t);
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : L); ++l) {
      const LoraModule& m = a.module(l, t);
      if (!m.present()) continue;
      if (m.a.size() != static_cast<size_t>(m.rank) * in ||
          m.b.size() != static_cast<size_t>(out) * m.rank) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "adapter '%s': %s has A of %d and B of %d values, but this model computes [%d, %d] x "
            "rank %d",
            a.name(), LoraModuleName(t, l), m.a.size(), m.b.size(), in, out, m.rank));
      }
      if (m.rank > kSgmvCudaMaxRank) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "adapter '%s': %s has rank %d; the CUDA backend supports ranks up to %d", a.name(),
            LoraModuleName(t, l), m.rank, kSgmvCudaMaxRank));
      }
      const int entry = t == LoraTarget::kLmHead ? 6 * L : Entry(l, static_cast<int>(t));
      Piece p{&m, entry, AlignUp(total), 0, t, l};
      p.b_off = AlignUp(p.a_off + m.a.size() * 2);
      total = p.b_off + m.b.size() * 2;
      pieces.push_back(p);
      s.present[entry] = true;
      s.max_rank = std::max(s.max_rank, m.rank);
    }
  }
  if (pieces.empty()) return absl::OkStatus();  // the registry refuses these anyway
  total = AlignUp(total);
  std::vector<uint16_t> staging(total / 2, 0);
  // The weights in the model's dtype; a finite value past its range (float16: 65504) would
  // become inf there and every output the module touches inf or NaN: refused, naming it.
  const bool bf16 = dtype_ == DataType::kBF16;
  auto convert = [&](const std::vector<float>& src, size_t off, const Piece& p,
                     const char* which) -> absl::Status {
    uint16_t* dst = staging.data() + off / 2;
    for (size_t i = 0; i < src.size(); ++i) {
      dst[i] = bf16 ? FloatToBF16(src[i]) : FloatToHalf(src[i]);
      if (!std::isfinite(bf16 ? BF16ToFloat(dst[i]) : HalfToFloat(dst[i]))) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "adapter '%s': %s of %s holds %g, outside the range of the model's dtype %s", a.name(),
            which, LoraModuleName(p.target, p.layer), src[i],
            bf16 ? "bfloat16" : "float16"));
      }
    }
    return absl::OkStatus();
  };
  for (const Piece& p : pieces) {
    PHI_RETURN_IF_ERROR(convert(p.m->a, p.a_off, p, "lora_A"));
    PHI_RETURN_IF_ERROR(convert(p.m->b, p.b_off, p, "lora_B"));
  }
  void* mem = nullptr;
  if (int err = DeviceMalloc(&mem, total); err != 0) {
    DeviceGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    DeviceMemGetInfo(&free_bytes, &total_bytes);
    return absl::ResourceExhaustedError(
        absl::StrFormat("adapter '%s' needs %d bytes on CUDA device %d, which has %d free: %s",
                        a.name(), total, device_, free_bytes, DeviceErrorString(err)));
  }
  int err = DeviceCopyToDevice(mem, staging.data(), total, stream);
  if (err == 0) err = DeviceStreamSync(stream);  // staging dies with this call
  if (err != 0) {
    DeviceGetLastError();
    DeviceFree(mem);
    return absl::InternalError(absl::StrFormat("uploading adapter '%s' to CUDA device %d: %s",
                                               a.name(), device_, DeviceErrorString(err)));
  }
  SgmvWeight* row = table_host_.data() + static_cast<size_t>(slot) * stride();
  char* base = static_cast<char*>(mem);
  for (const Piece& p : pieces) {
    row[p.entry] = {base + p.a_off, base + p.b_off, p.m->rank, p.m->scale};
  }
  s.mem = mem;
  s.bytes = total;
  adapter_bytes_ += static_cast<int64_t>(total);
  slots_[slot] = std::move(s);
  return absl::OkStatus();
}

absl::Status CudaLora::Sync(cudaStream_t stream) {
  if (registry_ == nullptr || registry_->generation() == synced_generation_) {
    return absl::OkStatus();
  }
  DeviceSet(device_);
  if (int err = DeviceStreamSync(stream); err != 0) {  // no step still reads an old copy
    DeviceGetLastError();
    return absl::InternalError(absl::StrFormat("CUDA synchronize failed on device %d: %s", device_,
                                               DeviceErrorString(err)));
  }
  absl::Status result = absl::OkStatus();
  std::vector<int> dirty;
  for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
    uint64_t serial = 0;
    const LoraAdapter* want = registry_->SlotAdapter(i, &serial);
    Slot& have = slots_[i];
    if (have.adapter == want && (want == nullptr || have.serial == serial)) continue;
    if (have.mem != nullptr || have.adapter != nullptr) FreeSlot(i);
    dirty.push_back(i);
    if (want == nullptr) continue;
    if (absl::Status st = Upload(i, *want, stream); !st.ok()) {
      if (result.ok()) result = st;
      continue;  // the slot stays empty; synced_generation_ is not advanced, so a retry happens
    }
    slots_[i].adapter = want;
    slots_[i].serial = serial;
  }
  for (int i : dirty) {
    const size_t off = static_cast<size_t>(i) * stride();
    DeviceCopyToDevice(table_dev_ + off, table_host_.data() + off, stride() * sizeof(SgmvWeight),
                       stream);
  }
  int max_rank = 0;
  if (loaded_present_.size() != static_cast<size_t>(stride())) {
    loaded_present_.assign(stride(), false);
  }
  for (const Slot& s : slots_) {
    max_rank = std::max(max_rank, s.max_rank);
    for (size_t e = 0; e < s.present.size(); ++e) {
      if (s.present[e] && !loaded_present_[e]) {
        loaded_present_[e] = true;
        graphs_stale_ = true;  // decode graphs now need this module's launches
      }
    }
  }
  int cap = std::max(rank_cap_, kMinRankCap);
  while (cap < max_rank) cap *= 2;
  if (cap != rank_cap_) {
    rank_cap_ = cap;
    graphs_stale_ = true;  // the t buffer's width and the shrink grid change
  }
  if (int err = DeviceStreamSync(stream); err != 0) {  // table_host_ may change after this
    DeviceGetLastError();
    return absl::InternalError(absl::StrFormat("CUDA LoRA table upload failed on device %d: %s",
                                               device_, DeviceErrorString(err)));
  }
  if (!result.ok()) return result;
  synced_generation_ = registry_->generation();
  return ReserveNow(stream);
}

void CudaLora::EnsureOverlapStream() {
  if (!overlap_ || side_ != nullptr) return;
  int err = DeviceStreamCreate(&side_);
  if (err == 0) err = DeviceEventCreate(&fork_ev_);
  if (err == 0) err = DeviceEventCreate(&join_ev_);
  if (err != 0) {  // the shrinks stay on the main stream
    DeviceGetLastError();
    PHI_LOG(WARNING) << "LoRA shrink overlap off: cannot create a stream / events on CUDA device "
                     << device_ << ": " << DeviceErrorString(err);
    overlap_ = false;
  }
}

absl::Status CudaLora::Reserve(int step_rows, int decode_rows, cudaStream_t stream) {
  reserve_rows_ = std::max(reserve_rows_, step_rows);
  reserve_decode_rows_ = std::max(reserve_decode_rows_, decode_rows);
  return ReserveNow(stream);
}

absl::Status CudaLora::ReserveNow(cudaStream_t stream) {
  if (registry_ == nullptr || adapter_bytes_ == 0) return absl::OkStatus();
  DeviceSet(device_);
  EnsureOverlapStream();
  if (absl::Status st = EnsureBuffers(std::max(reserve_rows_, reserve_decode_rows_), stream);
      !st.ok()) {
    return st;
  }
  // Beside mode that cannot get its buffer stays off (PlanBeside logs why): steps take the fused
  // launches, with the same results.
  if (reserve_decode_rows_ > 0) PlanBeside(reserve_decode_rows_, /*grow=*/true);
  if (gemm_min_rows_ > 0 && reserve_rows_ >= gemm_min_rows_) {
    return EnsureGemmBuffers(reserve_rows_, stream);
  }
  return absl::OkStatus();
}

size_t CudaLora::WorkspaceBytes(int rows, int rank) const {
  const size_t r = static_cast<size_t>(std::max(rows, 1));
  // The beside mode's delta buffer (model/cuda_lora_beside.cc) for decode steps of up to 512
  // rows (larger ones allocate more, or fall back to the fused launches).
  const PhiConfig& c = config_;
  const size_t delta_cols =
      static_cast<size_t>((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim) +
      c.intermediate_size + c.hidden_size;
  const size_t delta_rows = (std::min<size_t>(r, 512) + 255) / 256 * 256;
  return AlignUp(kHeaderBytes + 2 * r * sizeof(SgmvTile)) + AlignUp(r * 6 * rank * sizeof(float)) +
         (gemm_min_rows_ > 0 ? kLoraGemmReserveBytes : 0) +
         (beside_ ? AlignUp(delta_rows * delta_cols * sizeof(float)) : 0);
}

bool CudaLora::TakeGraphsStale() {
  const bool stale = graphs_stale_;
  graphs_stale_ = false;
  return stale;
}

absl::Status CudaLora::EnsureBuffers(int rows, cudaStream_t stream) {
  const int want = (std::max(rows, 1) + 255) / 256 * 256;
  if (want <= t_rows_ && rank_cap_ <= t_rank_ && 2 * want <= plan_tiles_) return absl::OkStatus();
  if (int err = DeviceStreamSync(stream); err != 0) {
    DeviceGetLastError();
    return absl::InternalError(absl::StrFormat("CUDA synchronize failed on device %d: %s", device_,
                                               DeviceErrorString(err)));
  }
  const int new_rows = std::max(want, t_rows_);
  const int tiles = 2 * new_rows;
  if (plan_dev_) DeviceFree(plan_dev_);
  if (plan_host_) DeviceFreeHost(plan_host_);
  if (t_dev_) DeviceFree(t_dev_);
  plan_dev_ = plan_host_ = nullptr;
  t_dev_ = nullptr;
  plan_tiles_ = t_rows_ = t_rank_ = 0;
  graphs_stale_ = true;
  const size_t plan_bytes = kHeaderBytes + static_cast<size_t>(tiles) * sizeof(SgmvTile);
  const size_t t_bytes = static_cast<size_t>(new_rows) * 6 * rank_cap_ * sizeof(float);
  void* t = nullptr;
  int err = DeviceMalloc(&plan_dev_, plan_bytes);
  if (err == 0) err = DeviceMallocHost(&plan_host_, plan_bytes);
  if (err == 0) err = DeviceMalloc(&t, t_bytes);
  if (err != 0) {
    DeviceGetLastError();
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot allocate %d bytes of LoRA step workspace (%d rows x rank %d) on CUDA device %d: %s",
        plan_bytes + t_bytes, new_rows, rank_cap_, device_, DeviceErrorString(err)));
  }
  t_dev_ = static_cast<float*>(t);
  plan_tiles_ = tiles;
  t_rows_ = new_rows;
  t_rank_ = rank_cap_;
  return absl::OkStatus();
}

absl::StatusOr<bool> CudaLora::Plan(const ForwardBatch& batch, bool decode, int padded_rows,
                                    cudaStream_t stream) {
  active_ = false;
  if (registry_ == nullptr) return false;
  if (absl::Status st = Sync(stream); !st.ok()) return st;
  if (adapter_bytes_ == 0) return false;
  const int S = static_cast<int>(batch.seqs.size());
  seq_slot_.assign(S, -1);
  bool any = false;
  for (int i = 0; i < S; ++i) {
    const int slot = registry_->SlotOf(batch.seqs[i].adapter_index);
    if (slot >= 0 && slots_[slot].mem != nullptr) {
      seq_slot_[i] = slot;
      any = true;
    }
  }
  if (!any) return false;
  qkv_pending_ = res_pending_ = false;
  EnsureOverlapStream();
  const int T = batch.num_tokens();
  const int R = static_cast<int>(batch.logit_rows.size());
  const int rows = decode ? std::max(padded_rows, T) : T;
  if (absl::Status st = EnsureBuffers(rows, stream); !st.ok()) return st;

  auto* header = static_cast<int32_t*>(plan_host_);
  auto* tiles = reinterpret_cast<SgmvTile*>(static_cast<char*>(plan_host_) + kHeaderBytes);
  int n = 0;
  // Runs of consecutive rows with one slot, cut into tiles of at most kSgmvTileRows rows (one
  // row each in decode: the few-rows kernels stream A at full width with many loads in flight,
  // and a shared adapter's A / B stay in L2 across its rows).
  // Decode steps also get tiles of base rows (slot -1): the kernels skip them, except the fc1
  // expand, which applies the GELU to every row (SgmvDecodeExpandCuda).
  const int tile_rows = decode ? 1 : kSgmvTileRows;
  auto emit = [&](int slot, int begin, int end) {
    for (int b = begin; b < end; b += tile_rows) {
      tiles[n++] = {slot, b, std::min(end, b + tile_rows), 0};
    }
  };
  step_present_.assign(stride(), false);
  std::vector<bool> seen(slots_.size(), false);
  int run_slot = -1, run_begin = 0, row = 0;
  for (int i = 0; i < S; ++i) {
    const int slot = seq_slot_[i];
    if (slot != run_slot || i == 0) {
      if (run_slot >= 0 || (decode && i > 0)) emit(run_slot, run_begin, row);
      run_slot = slot;
      run_begin = row;
    }
    row += batch.seqs[i].num_new_tokens;
    if (slot >= 0 && !seen[slot]) {
      seen[slot] = true;
      for (int e = 0; e < stride(); ++e) {
        if (slots_[slot].present[e]) step_present_[e] = true;
      }
    }
  }
  if (run_slot >= 0 || (decode && S > 0)) emit(run_slot, run_begin, row);
  const int n_tok = n;
  int n_logit = 0;
  if (!decode) {
    // Logit row r comes from the sequence whose token range holds batch.logit_rows[r].
    int seq = 0, first = 0;  // first token of `seq`
    run_slot = -1;
    run_begin = 0;
    for (int r = 0; r < R; ++r) {
      while (seq < S && batch.logit_rows[r] >= first + batch.seqs[seq].num_new_tokens) {
        first += batch.seqs[seq++].num_new_tokens;
      }
      const int slot = seq < S ? seq_slot_[seq] : -1;
      if (slot != run_slot) {
        if (run_slot >= 0) emit(run_slot, run_begin, r);
        run_slot = slot;
        run_begin = r;
      }
    }
    if (run_slot >= 0) emit(run_slot, run_begin, R);
    n_logit = n - n_tok;
  }
  header[0] = n_tok;
  header[1] = n_logit;
  header[2] = header[3] = 0;
  const size_t bytes = kHeaderBytes + static_cast<size_t>(n) * sizeof(SgmvTile);
  if (int err = DeviceCopyToDevice(plan_dev_, plan_host_, bytes, stream); err != 0) {
    DeviceGetLastError();
    return absl::InternalError(absl::StrFormat("CUDA LoRA plan upload failed on device %d: %s",
                                               device_, DeviceErrorString(err)));
  }
  all_ops_ = decode;
  rows_ = rows;
  max_tok_tiles_ = decode ? rows : n_tok;
  logit_rows_ = decode ? rows : R;
  max_logit_tiles_ = decode ? rows : n_logit;
  logit_offset_ = decode ? 0 : n_tok;
  active_ = true;
  gemm_step_ = false;
  qkv_first_layer_ = -1;
  beside_pending_[0] = beside_pending_[1] = dense_pending_ = qkv_fold_pending_ = false;
  beside_step_ = decode && PlanBeside(rows, /*grow=*/false);
  if (beside_step_) ++beside_steps_;
  if (!decode && gemm_min_rows_ > 0 && T >= gemm_min_rows_) {
    if (absl::Status st = PlanGemm(batch, stream); !st.ok()) return st;
  }
  return true;
}

SgmvTableRef CudaLora::Ref(bool logits) const {
  SgmvTableRef r;
  r.table = table_dev_;
  r.stride = stride();
  r.num_slots = static_cast<int>(slots_.size());
  const auto* header = static_cast<const int32_t*>(plan_dev_);
  const auto* tiles =
      reinterpret_cast<const SgmvTile*>(static_cast<const char*>(plan_dev_) + kHeaderBytes);
  const bool separate = logits && !all_ops_;  // decode: the logit rows are the token rows
  r.tiles = separate ? tiles + logit_offset_ : tiles;
  r.num_tiles = separate ? header + 1 : header;
  r.max_tiles = separate ? max_logit_tiles_ : max_tok_tiles_;
  r.num_rows = logits ? logit_rows_ : rows_;
  r.max_rank = rank_cap_;
  return r;
}

bool CudaLora::SplitFc1(int layer) const { return active_ && Launch(Entry(layer, kFc1)); }

SgmvGroupedShrinkParams CudaLora::QkvShrink(int layer, const void* normed) const {
  const int H = config_.hidden_size;
  SgmvGroupedShrinkParams sp;
  for (int t : {kQ, kK, kV, kFc1}) {
    if (!Launch(Entry(layer, t))) continue;
    sp.ops[sp.num_ops++] = {
        .x = normed, .ldx = H, .in = H, .t_col = t * rank_cap_, .entry = Entry(layer, t)};
  }
  sp.t = t_dev_;
  sp.ldt = 6 * rank_cap_;
  sp.ref = Ref(false);
  sp.dtype = dtype_;
  return sp;
}

SgmvGroupedShrinkParams CudaLora::ResidualShrink(int layer, const void* attn,
                                                 const void* mlp) const {
  const PhiConfig& c = config_;
  const int A = c.num_attention_heads * c.head_dim, I = c.intermediate_size;
  SgmvGroupedShrinkParams sp;
  if (Launch(Entry(layer, kDense))) {
    sp.ops[sp.num_ops++] = {
        .x = attn, .ldx = A, .in = A, .t_col = kDense * rank_cap_, .entry = Entry(layer, kDense)};
  }
  if (Launch(Entry(layer, kFc2))) {
    sp.ops[sp.num_ops++] = {
        .x = mlp, .ldx = I, .in = I, .t_col = kFc2 * rank_cap_, .entry = Entry(layer, kFc2)};
  }
  sp.t = t_dev_;
  sp.ldt = 6 * rank_cap_;
  sp.ref = Ref(false);
  sp.dtype = dtype_;
  return sp;
}

KernelStatus CudaLora::ForkShrink(const SgmvGroupedShrinkParams& sp, cudaStream_t stream,
                                  bool* pending) {
  *pending = false;
  if (DeviceEventRecord(fork_ev_, stream) != 0 || DeviceStreamWaitEvent(side_, fork_ev_) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  const KernelStatus st = SgmvGroupedShrinkCuda(sp, side_);
  // Recorded even after a failed launch, so that the join below stays well-formed.
  if (DeviceEventRecord(join_ev_, side_) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  *pending = true;
  return st;
}

KernelStatus CudaLora::Join(bool* pending, cudaStream_t stream) {
  if (!*pending) return KernelStatus::kOk;
  *pending = false;
  if (DeviceStreamWaitEvent(stream, join_ev_) != 0) {
    DeviceGetLastError();
    return KernelStatus::kDeviceError;
  }
  return KernelStatus::kOk;
}

KernelStatus CudaLora::BeforeQkv(int layer, const void* normed, cudaStream_t stream) {
  if (active_ && beside_step_ && FusedStep()) return BesideFork(layer, normed, stream);
  if (!active_ || gemm_step_ || !overlap_ || FusedStep()) return KernelStatus::kOk;
  const SgmvGroupedShrinkParams sp = QkvShrink(layer, normed);
  if (sp.num_ops == 0) return KernelStatus::kOk;
  return ForkShrink(sp, stream, &qkv_pending_);
}

KernelStatus CudaLora::BeforeResidual(int layer, const void* attn, const void* mlp,
                                      cudaStream_t stream) {
  if (!active_ || gemm_step_ || !overlap_ || FusedStep()) return KernelStatus::kOk;
  const SgmvGroupedShrinkParams sp = ResidualShrink(layer, attn, mlp);
  if (sp.num_ops == 0) return KernelStatus::kOk;
  return ForkShrink(sp, stream, &res_pending_);
}

KernelStatus CudaLora::AfterQkv(int layer, const void* normed, void* qkv, cudaStream_t stream) {
  if (!active_) return KernelStatus::kOk;
  if (gemm_step_) return GemmAfterQkv(layer, normed, qkv, stream);
  const PhiConfig& c = config_;
  const int hd = c.head_dim;
  const int nq = c.num_attention_heads * hd, nkv = c.num_key_value_heads * hd;
  const int width = nq + 2 * nkv;
  if (beside_pending_[0]) return BesideAfterQkv(layer, qkv, stream);
  if (FusedStep()) {
    SgmvFusedParams fp;
    const int offsets[] = {0, nq, nq + nkv};
    const int outs[] = {nq, nkv, nkv};
    for (int t : {kQ, kK, kV}) {
      if (!Launch(Entry(layer, t))) continue;
      SgmvFusedOp& op = fp.ops[fp.num_ops++];
      op.y = static_cast<char*>(qkv) + static_cast<size_t>(offsets[t]) * 2;
      op.ldy = width;
      op.out = outs[t];
      op.terms[0] = {
          .x = normed, .ldx = c.hidden_size, .in = c.hidden_size, .entry = Entry(layer, t)};
    }
    return Fused(fp, GemmEpilogue::kNone, stream, kHookQkv);
  }
  if (qkv_pending_) {
    if (KernelStatus st = Join(&qkv_pending_, stream); st != KernelStatus::kOk) return st;
  } else {
    const SgmvGroupedShrinkParams sp = QkvShrink(layer, normed);
    if (sp.num_ops == 0) return KernelStatus::kOk;
    if (KernelStatus st = SgmvGroupedShrinkCuda(sp, stream); st != KernelStatus::kOk) return st;
  }
  SgmvGroupedExpandParams ep;
  const int offsets[] = {0, nq, nq + nkv};
  const int outs[] = {nq, nkv, nkv};
  for (int t : {kQ, kK, kV}) {
    if (!Launch(Entry(layer, t))) continue;
    SgmvExpandOp& op = ep.ops[ep.num_ops++];
    op.y = static_cast<char*>(qkv) + static_cast<size_t>(offsets[t]) * 2;
    op.ldy = width;
    op.out = outs[t];
    op.terms[0] = {t * rank_cap_, Entry(layer, t)};
  }
  if (ep.num_ops == 0) return KernelStatus::kOk;
  ep.t = t_dev_;
  ep.ldt = 6 * rank_cap_;
  ep.ref = Ref(false);
  ep.dtype = dtype_;
  return Expand(ep, GemmEpilogue::kNone, stream);
}

bool CudaLora::FusedStep() const { return all_ops_ && fused_ && rank_cap_ <= kSgmvFusedMaxRank; }

KernelStatus CudaLora::Fused(SgmvFusedParams& fp, GemmEpilogue act, cudaStream_t stream,
                             int hook) const {
  if (fp.num_ops == 0) return KernelStatus::kOk;
  fp.ref = Ref(false);
  fp.dtype = dtype_;
  fp.col_blocks = hook_cols_[hook];
  fp.programmatic = fused_pdl_;
  return SgmvDecodeFusedCuda(fp, act, stream);
}

KernelStatus CudaLora::Expand(const SgmvGroupedExpandParams& ep, GemmEpilogue act,
                              cudaStream_t stream) const {
  if (all_ops_) return SgmvDecodeExpandCuda(ep, act, stream);  // decode: single-row tiles
  PHI_CHECK(act == GemmEpilogue::kNone);
  return SgmvGroupedExpandCuda(ep, stream);
}

KernelStatus CudaLora::AfterFc1(int layer, const void* normed, void* mlp, GemmEpilogue act,
                                cudaStream_t stream) {
  if (!SplitFc1(layer)) return KernelStatus::kOk;
  if (gemm_step_) return GemmAfterFc1(layer, mlp, act, stream);
  const int I = config_.intermediate_size;
  if (beside_pending_[1]) return BesideFold(true, layer, mlp, act, stream);
  if (FusedStep()) {  // every decode row has a tile: mlp = act(mlp + delta), base rows act(mlp)
    const int H = config_.hidden_size;
    SgmvFusedParams fp;
    fp.ops[0].y = mlp;
    fp.ops[0].out = I;
    fp.ops[0].terms[0] = {.x = normed, .ldx = H, .in = H, .entry = Entry(layer, kFc1)};
    fp.num_ops = 1;
    return Fused(fp, act, stream, kHookFc1);
  }
  SgmvGroupedExpandParams ep;
  ep.ops[0].y = mlp;
  ep.ops[0].out = I;
  ep.ops[0].terms[0] = {kFc1 * rank_cap_, Entry(layer, kFc1)};
  ep.num_ops = 1;
  ep.t = t_dev_;
  ep.ldt = 6 * rank_cap_;
  ep.ref = Ref(false);
  ep.dtype = dtype_;
  if (all_ops_) return Expand(ep, act, stream);  // every decode row has a tile: GELU fused
  if (KernelStatus st = Expand(ep, GemmEpilogue::kNone, stream); st != KernelStatus::kOk) return st;
  return GeluInPlaceCuda({.y = mlp, .rows = rows_, .cols = I, .act = act, .dtype = dtype_}, stream);
}

KernelStatus CudaLora::AfterFc2(int layer, const void* mlp, void* h, cudaStream_t stream) {
  if (!active_) return KernelStatus::kOk;
  PHI_CHECK(FusedStep());  // the model forks the MLP branch only when BranchHooks()
  const int H = config_.hidden_size, I = config_.intermediate_size;
  SgmvFusedParams fp;
  // Branch mode 2: fc2's delta is AfterResidual's second term (after the join).
  if (branch_mode_ != 2 && Launch(Entry(layer, kFc2))) {
    fp.ops[0].y = h;
    fp.ops[0].ldy = H;
    fp.ops[0].out = H;
    fp.ops[0].terms[0] = {.x = mlp, .ldx = I, .in = I, .entry = Entry(layer, kFc2)};
    fp.num_ops = 1;
  }
  return Fused(fp, GemmEpilogue::kNone, stream, kHookFc2);
}

KernelStatus CudaLora::AfterResidual(int layer, const void* attn, const void* mlp, void* h,
                                     cudaStream_t stream, bool fc2_done) {
  if (!active_) return KernelStatus::kOk;
  PHI_CHECK(!fc2_done || FusedStep());
  if (gemm_step_) return GemmAfterResidual(layer, attn, mlp, h, stream);
  const int H = config_.hidden_size;
  if (dense_pending_) return DenseAfterResidual(layer, h, stream);  // the only term: BeforeDense
  if (FusedStep()) {  // h += dense(attn) and fc2(mlp) deltas, one rounding (fc2's: AfterFc2)
    const int A = config_.num_attention_heads * config_.head_dim, I = config_.intermediate_size;
    SgmvFusedParams fp;
    SgmvFusedOp& op = fp.ops[0];
    op.y = h;
    op.ldy = H;
    op.out = H;
    op.num_terms = 0;
    if (Launch(Entry(layer, kDense))) {
      op.terms[op.num_terms++] = {.x = attn, .ldx = A, .in = A, .entry = Entry(layer, kDense)};
    }
    if ((!fc2_done || branch_mode_ == 2) && Launch(Entry(layer, kFc2))) {
      op.terms[op.num_terms++] = {.x = mlp, .ldx = I, .in = I, .entry = Entry(layer, kFc2)};
    }
    fp.num_ops = op.num_terms > 0 ? 1 : 0;
    return Fused(fp, GemmEpilogue::kNone, stream, kHookResidual);
  }
  SgmvExpandOp y;
  y.y = h;
  y.ldy = H;
  y.out = H;
  y.num_terms = 0;
  for (int t : {kDense, kFc2}) {
    if (Launch(Entry(layer, t))) y.terms[y.num_terms++] = {t * rank_cap_, Entry(layer, t)};
  }
  if (res_pending_) {
    if (KernelStatus st = Join(&res_pending_, stream); st != KernelStatus::kOk) return st;
  } else {
    const SgmvGroupedShrinkParams sp = ResidualShrink(layer, attn, mlp);
    if (sp.num_ops == 0) return KernelStatus::kOk;
    if (KernelStatus st = SgmvGroupedShrinkCuda(sp, stream); st != KernelStatus::kOk) return st;
  }
  if (y.num_terms == 0) return KernelStatus::kOk;
  SgmvGroupedExpandParams ep;
  ep.ops[0] = y;
  ep.num_ops = 1;
  ep.t = t_dev_;
  ep.ldt = 6 * rank_cap_;
  ep.ref = Ref(false);
  ep.dtype = dtype_;
  return Expand(ep, GemmEpilogue::kNone, stream);
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
