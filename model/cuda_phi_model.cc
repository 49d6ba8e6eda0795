#ifdef PHISHARD_HAVE_CUDA

#include "model/cuda_phi_model.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "kernels/cuda/embedding_cuda.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/layer_norm_cuda.h"
#include "kernels/cuda/paged_attention_cuda.h"
#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "kernels/kernel_status.h"
#include "model/kv_cache.h"

namespace phishard {
namespace {

#define PHI_RETURN_IF_ERROR(expr) \
  do {                            \
    absl::Status _st = (expr);    \
    if (!_st.ok()) return _st;    \
  } while (0)

constexpr size_t kAlign = 256;  // every device sub-buffer starts 256-byte aligned (cuBLASLt)
constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;
// Decode split-K partials are reserved for this many sequences x kMaxDecodeSplits; bigger decode
// batches fill the GPU without splitting (see DecodeSplits in kernels/cuda/paged_attention.cu).
constexpr int kDecodeSplitRows = 256;
constexpr int kMaxDecodeSplits = 16;

size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
// Logit rows are padded to 64 floats so every row starts 256-byte aligned.
int VocabPad(int v) { return (v + 63) / 64 * 64; }

double GiB(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

// Byte offsets of the step arena for `tokens` tokens (all sub-buffers [tokens, width]).
struct ArenaLayout {
  size_t h, normed, qkv, attn, mlp, last, logits, attn_ws, attn_ws_bytes, total;
};

ArenaLayout MakeArenaLayout(const PhiConfig& c, int tokens) {
  const size_t t = static_cast<size_t>(tokens), e = 2;  // 16-bit storage
  const size_t qkv_w =
      static_cast<size_t>(c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
  ArenaLayout l;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += AlignUp(bytes);
    return at;
  };
  l.h = take(t * c.hidden_size * e);       // residual stream
  l.normed = take(t * c.hidden_size * e);  // LayerNorm output feeding attention and MLP
  l.qkv = take(t * qkv_w * e);
  l.attn = take(t * c.num_attention_heads * c.head_dim * e);
  l.mlp = take(t * c.intermediate_size * e);
  l.last = take(t * c.hidden_size * e);                         // hidden rows that return logits
  l.logits = take(t * VocabPad(c.vocab_size) * sizeof(float));  // float32 logits
  l.attn_ws_bytes = PagedAttentionCudaWorkspaceBytes(
      std::min(tokens, kDecodeSplitRows), c.num_attention_heads, c.head_dim, kMaxDecodeSplits);
  l.attn_ws = take(l.attn_ws_bytes);
  l.total = off;
  return l;
}

// Per-step metadata, one contiguous block (host pinned and device): int64 slots first.
struct MetaLayout {
  size_t slots, ids, positions, cu_q_lens, context_lens, logit_rows, block_tables, total;
};

MetaLayout MakeMetaLayout(int T, int S, int R, int max_blocks) {
  MetaLayout m;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += (bytes + 15) / 16 * 16;
    return at;
  };
  m.slots = take(sizeof(int64_t) * T);
  m.ids = take(sizeof(int32_t) * T);
  m.positions = take(sizeof(int32_t) * T);
  m.cu_q_lens = take(sizeof(int32_t) * (S + 1));
  m.context_lens = take(sizeof(int32_t) * S);
  m.logit_rows = take(sizeof(int32_t) * std::max(R, 1));
  m.block_tables = take(sizeof(int32_t) * static_cast<size_t>(S) * max_blocks);
  m.total = off;
  return m;
}

absl::StatusOr<DataType> ResolveDtype(const std::string& requested, const PhiConfig& c,
                                      int cc_major) {
  if (requested == "float32") {
    return absl::InvalidArgumentError(
        "dtype 'float32' is not available on device 'cuda': the CUDA backend stores weights in "
        "float16 or bfloat16 (use --device cpu for float32)");
  }
  if (requested == "float16") return DataType::kF16;
  if (requested == "bfloat16") {
    if (cc_major < 8) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "dtype 'bfloat16' needs a GPU of compute capability >= 8.0; this one is %d.x", cc_major));
    }
    return DataType::kBF16;
  }
  if (!requested.empty()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "dtype '%s' must be one of float16, bfloat16 (or empty for the config's)", requested));
  }
  if (c.torch_dtype == "bfloat16") {
    if (cc_major >= 8) return DataType::kBF16;
    PHI_LOG(WARNING) << "config.json asks for bfloat16 but this GPU lacks it: using float16";
  }
  return DataType::kF16;  // float16, float32 and absent all run in float16 (spec 6.1)
}

}  // namespace

CudaPhiModel::CudaPhiModel(PhiConfig config, DataType dtype, int device)
    : config_(std::move(config)), dtype_(dtype), device_(device) {}

CudaPhiModel::~CudaPhiModel() {
  DeviceSet(device_);
  if (stream_) DeviceStreamSync(stream_);
  gemm_.reset();
  if (weights_) DeviceFree(weights_);
  if (kv_) DeviceFree(kv_);
  if (arena_) DeviceFree(arena_);
  if (meta_dev_) DeviceFree(meta_dev_);
  if (meta_host_) DeviceFreeHost(meta_host_);
  if (ping_dev_) DeviceFree(ping_dev_);
  if (ping_host_) DeviceFreeHost(ping_host_);
  if (stream_) DeviceStreamDestroy(stream_);
  if (ping_stream_) DeviceStreamDestroy(ping_stream_);
}

std::string CudaPhiModel::dtype_name() const {
  return dtype_ == DataType::kBF16 ? "torch.bfloat16" : "torch.float16";
}

bool CudaPhiModel::gelu_in_gemm_epilogue() const { return gemm_->gelu_tanh_in_epilogue(); }

absl::Status CudaPhiModel::DeviceStatus(int err, const char* what) {
  if (err == 0) return absl::OkStatus();
  DeviceGetLastError();  // clear a non-sticky error so the next call starts clean
  return absl::InternalError(
      absl::StrFormat("CUDA %s failed on device %d: %s", what, device_, DeviceErrorString(err)));
}

absl::Status CudaPhiModel::KernelResult(KernelStatus st, const char* op) {
  if (st == KernelStatus::kOk) return absl::OkStatus();
  // The model validates every input first, so any kernel error is a bug or a device fault.
  healthy_ = false;
  std::string detail;
  if (st == KernelStatus::kDeviceError) {
    const int err = DeviceGetLastError();
    detail = err != 0 ? DeviceErrorString(err) : gemm_->last_error();
  }
  return absl::InternalError(absl::StrCat("CUDA op ", op, " failed on device ", device_, ": ",
                                          KernelStatusName(st), detail.empty() ? "" : ": ",
                                          detail));
}

absl::StatusOr<std::unique_ptr<CudaPhiModel>> CudaPhiModel::Load(
    const std::filesystem::path& model_dir, const CudaModelOptions& options) {
  absl::StatusOr<PhiConfig> config = LoadPhiConfig(model_dir);
  if (!config.ok()) return config.status();
  absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenDir(model_dir);
  if (!store.ok()) return store.status();
  return Create(*config, **store, options);
}

absl::StatusOr<std::unique_ptr<CudaPhiModel>> CudaPhiModel::Create(
    const PhiConfig& config, const WeightStore& store, const CudaModelOptions& options) {
  int count = 0;
  DeviceGetCount(&count);
  if (options.device < 0 || options.device >= count) {
    return absl::FailedPreconditionError(
        absl::StrFormat("CUDA device %d is not visible (%d devices; check CUDA_VISIBLE_DEVICES)",
                        options.device, count));
  }
  if (int err = DeviceSet(options.device); err != 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("cannot use CUDA device %d: %s", options.device, DeviceErrorString(err)));
  }
  DeviceProps props;
  if (int err = DeviceGetProps(options.device, &props); err != 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("cannot query CUDA device %d: %s", options.device, DeviceErrorString(err)));
  }
  if (int err = DeviceCheckKernelImage(); err != 0) {
    DeviceGetLastError();
    return absl::FailedPreconditionError(absl::StrFormat(
        "this binary has no CUDA kernels for device %d (%s, sm_%d%d): %s; rebuild with "
        "-DCMAKE_CUDA_ARCHITECTURES for that GPU",
        options.device, props.name, props.cc_major, props.cc_minor, DeviceErrorString(err)));
  }
  absl::StatusOr<DataType> dtype = ResolveDtype(options.dtype, config, props.cc_major);
  if (!dtype.ok()) return dtype.status();
  if (!PagedAttentionCudaSupportsHeadDim(config.head_dim)) {
    return absl::UnimplementedError(absl::StrFormat(
        "the CUDA backend supports head_dim 32, 64 and 80; this model has head_dim %d "
        "(hidden_size %d / num_attention_heads %d)",
        config.head_dim, config.hidden_size, config.num_attention_heads));
  }
  if (config.num_key_value_heads <= 0 ||
      config.num_attention_heads % config.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("num_attention_heads %d is not a multiple of num_key_value_heads %d",
                        config.num_attention_heads, config.num_key_value_heads));
  }
  std::unique_ptr<CudaPhiModel> m(new CudaPhiModel(config, *dtype, options.device));
  m->multiprocessors_ = props.multiprocessors;
  PHI_RETURN_IF_ERROR(m->DeviceStatus(DeviceStreamCreate(&m->stream_), "stream create"));
  PHI_RETURN_IF_ERROR(m->DeviceStatus(DeviceStreamCreate(&m->ping_stream_), "stream create"));
  PHI_RETURN_IF_ERROR(m->DeviceStatus(DeviceMalloc(&m->ping_dev_, 16), "malloc"));
  PHI_RETURN_IF_ERROR(m->DeviceStatus(DeviceMallocHost(&m->ping_host_, 16), "host malloc"));
  PHI_RETURN_IF_ERROR(m->DeviceStatus(DeviceMemset(m->ping_dev_, 0, 16, m->stream_), "memset"));
  if (KernelStatus st = CudaGemm::Create(kGemmWorkspaceBytes, &m->gemm_); st != KernelStatus::kOk) {
    return absl::InternalError(absl::StrCat("cuBLASLt initialisation failed on device ",
                                            options.device, ": ", KernelStatusName(st)));
  }
  PHI_RETURN_IF_ERROR(m->UploadWeights(store));
  PHI_RETURN_IF_ERROR(m->ReserveWorkspace(std::max(options.reserve_tokens, 1)));
  Log(LogLevel::kInfo,
      absl::StrFormat(
          "CUDA Phi model on device %d (%s, %d SMs): %d layers, hidden %d, heads %d/%d x %d, "
          "rotary %d, vocab %d, %s, weights %.2f GiB, GELU %s (probe |err| tanh %.2g erf %.2g)",
          options.device, props.name, props.multiprocessors, config.num_hidden_layers,
          config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
          config.head_dim, config.rotary_dim, config.vocab_size, m->dtype_name(),
          GiB(static_cast<double>(m->weights_bytes_)),
          m->gemm_->gelu_tanh_in_epilogue() ? "in the cuBLASLt epilogue" : "as a separate kernel",
          m->gemm_->probe_err_tanh(), m->gemm_->probe_err_erf()));
  return m;
}

absl::Status CudaPhiModel::UploadWeights(const WeightStore& store) {
  const PhiConfig& c = config_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, hd = c.head_dim;
  const int64_t q_out = c.num_attention_heads * hd, kv_out = c.num_key_value_heads * hd;
  const size_t e = 2;

  // Pass 1: what goes where. Each entry is one checkpoint tensor; q/k/v land back to back.
  struct Item {
    std::string name;
    std::vector<int64_t> shape;
    bool f32;
    size_t offset;
  };
  std::vector<Item> items;
  size_t off = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool f32 = false,
                 bool aligned = true) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    if (aligned) off = AlignUp(off);
    items.push_back({std::move(name), std::move(shape), f32, off});
    off += static_cast<size_t>(n) * (f32 ? 4 : e);
    return items.size() - 1;
  };
  const size_t embed_i = add("model.embed_tokens.weight", {V, H});
  const size_t fln_w_i = add("model.final_layernorm.weight", {H});
  const size_t fln_b_i = add("model.final_layernorm.bias", {H});
  size_t lm_w_i = SIZE_MAX, lm_b_i = SIZE_MAX;
  if (store.Has("lm_head.weight")) {
    lm_w_i = add("lm_head.weight", {V, H});
  } else if (!c.tie_word_embeddings) {
    return absl::NotFoundError(
        "tensor 'lm_head.weight' is missing and config.json does not set tie_word_embeddings");
  }
  if (store.Has("lm_head.bias")) lm_b_i = add("lm_head.bias", {V}, /*f32=*/true);
  std::vector<std::array<size_t, 10>> layer_items(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    auto& li = layer_items[l];
    li[0] = add(p + "input_layernorm.weight", {H});
    li[1] = add(p + "input_layernorm.bias", {H});
    li[2] = add(p + "self_attn.q_proj.weight", {q_out, H});
    add(p + "self_attn.k_proj.weight", {kv_out, H}, false, /*aligned=*/false);
    add(p + "self_attn.v_proj.weight", {kv_out, H}, false, /*aligned=*/false);
    li[3] = add(p + "self_attn.q_proj.bias", {q_out});
    add(p + "self_attn.k_proj.bias", {kv_out}, false, /*aligned=*/false);
    add(p + "self_attn.v_proj.bias", {kv_out}, false, /*aligned=*/false);
    li[4] = add(p + "self_attn.dense.weight", {H, q_out});
    li[5] = add(p + "self_attn.dense.bias", {H});
    li[6] = add(p + "mlp.fc1.weight", {I, H});
    li[7] = add(p + "mlp.fc1.bias", {I});
    li[8] = add(p + "mlp.fc2.weight", {H, I});
    li[9] = add(p + "mlp.fc2.bias", {H});
  }
  weights_bytes_ = AlignUp(off);

  size_t free_bytes = 0, total_bytes = 0;
  DeviceMemGetInfo(&free_bytes, &total_bytes);
  if (int err = DeviceMalloc(&weights_, weights_bytes_); err != 0) {
    weights_ = nullptr;
    DeviceGetLastError();
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot allocate %.2f GiB for the weights on CUDA device %d (%.2f GiB free): %s",
        GiB(weights_bytes_), device_, GiB(free_bytes), DeviceErrorString(err)));
  }

  // Pass 2: convert on the host (round to nearest even) and upload, one tensor at a time.
  std::vector<uint16_t> half;
  std::vector<float> f32;
  char* base = static_cast<char*>(weights_);
  for (const Item& it : items) {
    const void* src = nullptr;
    size_t bytes = 0;
    if (it.f32) {
      PHI_RETURN_IF_ERROR(store.ReadF32(it.name, it.shape, &f32));
      src = f32.data();
      bytes = f32.size() * sizeof(float);
    } else {
      PHI_RETURN_IF_ERROR(dtype_ == DataType::kBF16 ? store.ReadBF16(it.name, it.shape, &half)
                                                    : store.ReadF16(it.name, it.shape, &half));
      src = half.data();
      bytes = half.size() * sizeof(uint16_t);
    }
    PHI_RETURN_IF_ERROR(
        DeviceStatus(DeviceCopyToDevice(base + it.offset, src, bytes, stream_), "weight upload"));
    // The host buffer is reused for the next tensor.
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "weight upload"));
  }
  auto at = [&](size_t i) -> const void* { return base + items[i].offset; };
  embed_ = at(embed_i);
  final_ln_w_ = at(fln_w_i);
  final_ln_b_ = at(fln_b_i);
  lm_head_w_ = lm_w_i == SIZE_MAX ? embed_ : at(lm_w_i);
  lm_head_b_ = lm_b_i == SIZE_MAX ? nullptr : static_cast<const float*>(at(lm_b_i));
  layers_.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const auto& li = layer_items[l];
    layers_[l] = Layer{at(li[0]), at(li[1]), at(li[2]), at(li[3]), at(li[4]),
                       at(li[5]), at(li[6]), at(li[7]), at(li[8]), at(li[9])};
  }
  return absl::OkStatus();
}

size_t CudaPhiModel::ArenaBytes(int tokens) const { return MakeArenaLayout(config_, tokens).total; }

absl::Status CudaPhiModel::ReserveWorkspace(int tokens) {
  if (tokens <= arena_tokens_) return absl::OkStatus();
  DeviceSet(device_);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "synchronize"));
  const int old_tokens = arena_tokens_;
  if (arena_) DeviceFree(arena_);
  arena_ = nullptr;
  arena_bytes_ = 0;
  arena_tokens_ = 0;
  const size_t bytes = ArenaBytes(tokens);
  if (int err = DeviceMalloc(&arena_, bytes); err != 0) {
    arena_ = nullptr;
    DeviceGetLastError();
    // Put the previous arena back so the model keeps serving what it served before.
    if (old_tokens > 0 && DeviceMalloc(&arena_, ArenaBytes(old_tokens)) == 0) {
      arena_bytes_ = ArenaBytes(old_tokens);
      arena_tokens_ = old_tokens;
    } else {
      arena_ = nullptr;
      DeviceGetLastError();
    }
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot allocate %.2f GiB of step workspace for %d tokens on CUDA device %d: %s",
        GiB(bytes), tokens, device_, DeviceErrorString(err)));
  }
  arena_bytes_ = bytes;
  arena_tokens_ = tokens;
  return absl::OkStatus();
}

absl::Status CudaPhiModel::EnsureMetadataCapacity(size_t bytes) {
  if (bytes <= meta_bytes_) return absl::OkStatus();
  const size_t want = std::max(bytes, size_t{1} << 20);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "synchronize"));
  if (meta_dev_) DeviceFree(meta_dev_);
  if (meta_host_) DeviceFreeHost(meta_host_);
  meta_dev_ = meta_host_ = nullptr;
  meta_bytes_ = 0;
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMalloc(&meta_dev_, want), "malloc (step metadata)"));
  PHI_RETURN_IF_ERROR(
      DeviceStatus(DeviceMallocHost(&meta_host_, want), "host malloc (step metadata)"));
  meta_bytes_ = want;
  return absl::OkStatus();
}

int64_t CudaPhiModel::KvBytesPerBlock(int block_size) const {
  return int64_t{2} * config_.num_hidden_layers * block_size * config_.num_key_value_heads *
         config_.head_dim * 2;
}

absl::StatusOr<int> CudaPhiModel::MaxKvBlocks(double memory_fraction, int max_batch_tokens) const {
  if (!(memory_fraction > 0.0 && memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("memory_fraction = %g must be in (0, 1]", memory_fraction));
  }
  if (max_batch_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("max_batch_tokens = %d must be >= 0", max_batch_tokens));
  }
  DeviceSet(device_);
  size_t free_bytes = 0, total_bytes = 0;
  if (int err = DeviceMemGetInfo(&free_bytes, &total_bytes); err != 0) {
    DeviceGetLastError();
    return absl::InternalError(
        absl::StrFormat("cudaMemGetInfo failed on device %d: %s", device_, DeviceErrorString(err)));
  }
  const int reserve = std::max(max_batch_tokens, arena_tokens_);
  const double grow = static_cast<double>(ArenaBytes(reserve)) - static_cast<double>(arena_bytes_);
  const double budget = static_cast<double>(free_bytes) + static_cast<double>(kv_bytes_) -
                        std::max(grow, 0.0) -
                        (1.0 - memory_fraction) * static_cast<double>(total_bytes);
  const double per_block = static_cast<double>(KvBytesPerBlock(kKvBlockSize));
  const double blocks = std::floor(std::max(budget, 0.0) / per_block);
  if (blocks < 1) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "no KV block fits on CUDA device %d: %.2f GiB free (+%.2f GiB of current KV pool) minus "
        "%.2f GiB more step workspace for %d tokens minus (1 - fraction %g) x %.2f GiB total "
        "leaves less than one block of %.1f KiB",
        device_, GiB(free_bytes), GiB(kv_bytes_), GiB(std::max(grow, 0.0)), reserve,
        memory_fraction, GiB(total_bytes), per_block / 1024.0));
  }
  reserve_tokens_ = reserve;
  return static_cast<int>(std::min<double>(blocks, std::numeric_limits<int>::max()));
}

absl::Status CudaPhiModel::AllocateKvCache(int num_blocks, int block_size) {
  if (num_blocks < 1 || block_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV cache needs num_blocks >= 1 and block_size >= 1, got %d and %d",
                        num_blocks, block_size));
  }
  DeviceSet(device_);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "synchronize"));
  if (kv_) DeviceFree(kv_);
  kv_ = nullptr;
  kv_bytes_ = 0;
  kv_num_blocks_ = 0;
  kv_block_size_ = 0;
  if (reserve_tokens_ > arena_tokens_) PHI_RETURN_IF_ERROR(ReserveWorkspace(reserve_tokens_));
  const double bytes = static_cast<double>(num_blocks) * KvBytesPerBlock(block_size);
  if (bytes > static_cast<double>(std::numeric_limits<int64_t>::max() / 2)) {
    return absl::ResourceExhaustedError("KV cache size overflows");
  }
  const size_t nbytes = static_cast<size_t>(bytes);
  if (int err = DeviceMalloc(&kv_, nbytes); err != 0) {
    kv_ = nullptr;
    DeviceGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    DeviceMemGetInfo(&free_bytes, &total_bytes);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot allocate %.2f GiB for a KV cache of %d blocks x %d tokens on CUDA device %d "
        "(%.2f GiB free): %s",
        GiB(bytes), num_blocks, block_size, device_, GiB(free_bytes), DeviceErrorString(err)));
  }
  kv_bytes_ = nbytes;
  kv_num_blocks_ = num_blocks;
  kv_block_size_ = block_size;
  return absl::OkStatus();
}

absl::Status CudaPhiModel::ValidateBatch(const ForwardBatch& b) const {
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

absl::Status CudaPhiModel::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  if (!healthy_) {
    return absl::InternalError(absl::StrFormat(
        "CUDA device %d failed an earlier step; the shard must be restarted", device_));
  }
  PHI_RETURN_IF_ERROR(ValidateBatch(batch));
  DeviceSet(device_);
  const PhiConfig& c = config_;
  const int T = batch.num_tokens(), S = static_cast<int>(batch.seqs.size());
  const int R = static_cast<int>(batch.logit_rows.size());
  const int H = c.hidden_size, nH = c.num_attention_heads, nKV = c.num_key_value_heads;
  const int hd = c.head_dim, qkv_width = (nH + 2 * nKV) * hd, V = c.vocab_size;
  if (T > arena_tokens_) {
    PHI_LOG(WARNING) << "step of " << T << " tokens exceeds the reserved workspace of "
                     << arena_tokens_ << " tokens: growing it (a device allocation on the step "
                     << "path; reserve more at warmup)";
    PHI_RETURN_IF_ERROR(ReserveWorkspace(T));
  }

  // Plan: slots, varlen offsets, the padded block-table matrix; one upload.
  int max_blocks = 1, max_q_len = 0, max_ctx = 0;
  for (const SequenceInput& seq : batch.seqs) {
    max_blocks = std::max(max_blocks, static_cast<int>(seq.block_table.size()));
    max_q_len = std::max(max_q_len, seq.num_new_tokens);
    max_ctx = std::max(max_ctx, seq.context_len);
  }
  const MetaLayout ml = MakeMetaLayout(T, S, R, max_blocks);
  PHI_RETURN_IF_ERROR(EnsureMetadataCapacity(ml.total));
  char* mh = static_cast<char*>(meta_host_);
  auto* slots = reinterpret_cast<int64_t*>(mh + ml.slots);
  auto* cu_q_lens = reinterpret_cast<int32_t*>(mh + ml.cu_q_lens);
  auto* ctx_lens = reinterpret_cast<int32_t*>(mh + ml.context_lens);
  auto* tables = reinterpret_cast<int32_t*>(mh + ml.block_tables);
  std::memcpy(mh + ml.ids, batch.token_ids.data(), sizeof(int32_t) * T);
  std::memcpy(mh + ml.positions, batch.positions.data(), sizeof(int32_t) * T);
  if (R > 0) std::memcpy(mh + ml.logit_rows, batch.logit_rows.data(), sizeof(int32_t) * R);
  std::memset(tables, 0, sizeof(int32_t) * static_cast<size_t>(S) * max_blocks);
  cu_q_lens[0] = 0;
  for (int i = 0, t = 0; i < S; ++i) {
    const SequenceInput& seq = batch.seqs[i];
    std::copy(seq.block_table.begin(), seq.block_table.end(),
              tables + static_cast<size_t>(i) * max_blocks);
    cu_q_lens[i + 1] = cu_q_lens[i] + seq.num_new_tokens;
    ctx_lens[i] = seq.context_len;
    for (int j = 0; j < seq.num_new_tokens; ++j, ++t) {
      const int pos = batch.positions[t];
      slots[t] = static_cast<int64_t>(seq.block_table[pos / kv_block_size_]) * kv_block_size_ +
                 pos % kv_block_size_;
    }
  }
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceCopyToDevice(meta_dev_, meta_host_, ml.total, stream_),
                                   "metadata upload"));
  char* md = static_cast<char*>(meta_dev_);
  const auto* d_slots = reinterpret_cast<const int64_t*>(md + ml.slots);
  const auto* d_ids = reinterpret_cast<const int32_t*>(md + ml.ids);
  const auto* d_pos = reinterpret_cast<const int32_t*>(md + ml.positions);
  const auto* d_cu = reinterpret_cast<const int32_t*>(md + ml.cu_q_lens);
  const auto* d_ctx = reinterpret_cast<const int32_t*>(md + ml.context_lens);
  const auto* d_rows = reinterpret_cast<const int32_t*>(md + ml.logit_rows);
  const auto* d_tables = reinterpret_cast<const int32_t*>(md + ml.block_tables);

  const ArenaLayout al = MakeArenaLayout(c, arena_tokens_);
  char* a = static_cast<char*>(arena_);
  void* h = a + al.h;
  void* normed = a + al.normed;
  void* qkv = a + al.qkv;
  void* attn = a + al.attn;
  void* mlp = a + al.mlp;
  void* last = a + al.last;
  float* d_logits = reinterpret_cast<float*>(a + al.logits);
  const size_t layer_kv_bytes = static_cast<size_t>(kv_num_blocks_) * kv_block_size_ * nKV * hd * 2;
  const GemmEpilogue act =
      c.hidden_act == Activation::kGeluTanh ? GemmEpilogue::kGeluTanh : GemmEpilogue::kGeluErf;
  const DataType dt = dtype_;
  auto gemm = [&](const void* x, const void* w, const void* bias, void* y, int m, int n, int k,
                  bool accumulate, GemmEpilogue epi, const char* op) {
    GemmParams p;
    p.x = x;
    p.w = w;
    p.bias = bias;
    p.y = y;
    p.m = m;
    p.n = n;
    p.k = k;
    p.accumulate = accumulate;
    p.epilogue = epi;
    p.dtype = dt;
    return KernelResult(gemm_->Run(p, stream_), op);
  };

  PHI_RETURN_IF_ERROR(KernelResult(EmbeddingCuda({.ids = d_ids,
                                                  .table = embed_,
                                                  .out = h,
                                                  .num_tokens = T,
                                                  .num_rows = V,
                                                  .dim = H,
                                                  .dtype = dt},
                                                 stream_),
                                   "embedding"));
  PagedAttentionCudaPlan plan;
  plan.max_q_len = max_q_len;
  plan.max_context_len = max_ctx;
  plan.workspace = a + al.attn_ws;
  plan.workspace_bytes = al.attn_ws_bytes;
  plan.num_multiprocessors = multiprocessors_;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const Layer& w = layers_[l];
    char* k_cache = static_cast<char*>(kv_) + 2 * l * layer_kv_bytes;
    char* v_cache = k_cache + layer_kv_bytes;
    // n = LN(h) feeds both branches (parallel residual); h += dense(attn) + fc2(gelu(fc1(n))),
    // both GEMMs accumulating straight into the residual stream (beta = 1).
    PHI_RETURN_IF_ERROR(KernelResult(LayerNormCuda({.x = h,
                                                    .weight = w.ln_w,
                                                    .bias = w.ln_b,
                                                    .y = normed,
                                                    .rows = T,
                                                    .cols = H,
                                                    .eps = c.layer_norm_eps,
                                                    .dtype = dt},
                                                   stream_),
                                     "layer_norm"));
    PHI_RETURN_IF_ERROR(gemm(normed, w.qkv_w, w.qkv_b, qkv, T, qkv_width, H, false,
                             GemmEpilogue::kNone, "qkv gemm"));
    PHI_RETURN_IF_ERROR(KernelResult(
        RotaryKvWriteCuda({.qkv = qkv,
                           .positions = d_pos,
                           .slots = d_slots,
                           .k_cache = k_cache,
                           .v_cache = v_cache,
                           .num_slots = static_cast<int64_t>(kv_num_blocks_) * kv_block_size_,
                           .num_tokens = T,
                           .num_heads = nH,
                           .num_kv_heads = nKV,
                           .head_dim = hd,
                           .rotary_dim = c.rotary_dim,
                           .theta = static_cast<float>(c.rope_theta),
                           .dtype = dt},
                          stream_),
        "rotary_kv_write"));
    PHI_RETURN_IF_ERROR(
        KernelResult(PagedAttentionCuda({.q = qkv,
                                         .k_cache = k_cache,
                                         .v_cache = v_cache,
                                         .out = attn,
                                         .cu_q_lens = d_cu,
                                         .context_lens = d_ctx,
                                         .block_tables = d_tables,
                                         .num_seqs = S,
                                         .num_tokens = T,
                                         .max_blocks_per_seq = max_blocks,
                                         .num_blocks = kv_num_blocks_,
                                         .block_size = kv_block_size_,
                                         .num_heads = nH,
                                         .num_kv_heads = nKV,
                                         .head_dim = hd,
                                         .q_stride = qkv_width,
                                         .scale = 1.0f / std::sqrt(static_cast<float>(hd)),
                                         .dtype = dt},
                                        plan, stream_, &last_decode_splits_),
                     "paged_attention"));
    PHI_RETURN_IF_ERROR(
        gemm(normed, w.fc1_w, w.fc1_b, mlp, T, c.intermediate_size, H, false, act, "fc1 gemm"));
    PHI_RETURN_IF_ERROR(
        gemm(attn, w.dense_w, w.dense_b, h, T, H, nH * hd, true, GemmEpilogue::kNone, "dense"));
    PHI_RETURN_IF_ERROR(gemm(mlp, w.fc2_w, w.fc2_b, h, T, H, c.intermediate_size, true,
                             GemmEpilogue::kNone, "fc2 gemm"));
  }
  logits->resize(static_cast<size_t>(R) * V);
  if (R > 0) {
    // Only the requested rows go through the final norm and the LM head (float32 logits).
    PHI_RETURN_IF_ERROR(KernelResult(EmbeddingCuda({.ids = d_rows,
                                                    .table = h,
                                                    .out = last,
                                                    .num_tokens = R,
                                                    .num_rows = T,
                                                    .dim = H,
                                                    .dtype = dt},
                                                   stream_),
                                     "gather logit rows"));
    PHI_RETURN_IF_ERROR(KernelResult(LayerNormCuda({.x = last,
                                                    .weight = final_ln_w_,
                                                    .bias = final_ln_b_,
                                                    .y = last,
                                                    .rows = R,
                                                    .cols = H,
                                                    .eps = c.layer_norm_eps,
                                                    .dtype = dt},
                                                   stream_),
                                     "final layer_norm"));
    GemmParams p;
    p.x = last;
    p.w = lm_head_w_;
    p.bias = lm_head_b_;
    p.y = d_logits;
    p.m = R;
    p.n = V;
    p.k = H;
    p.ldy = VocabPad(V);
    p.dtype = dt;
    PHI_RETURN_IF_ERROR(KernelResult(gemm_->Run(p, DataType::kF32, stream_), "lm_head gemm"));
    PHI_RETURN_IF_ERROR(
        DeviceStatus(DeviceCopy2DToHost(logits->data(), sizeof(float) * V, d_logits,
                                        sizeof(float) * VocabPad(V), sizeof(float) * V, R, stream_),
                     "logits download"));
  }
  if (absl::Status st = DeviceStatus(DeviceStreamSync(stream_), "step"); !st.ok()) {
    healthy_ = false;
    return st;
  }
  return absl::OkStatus();
}

absl::Status CudaPhiModel::Ping() {
  std::lock_guard<std::mutex> lock(ping_mu_);
  DeviceSet(device_);
  int err = DeviceCopyToHost(ping_host_, ping_dev_, 4, ping_stream_);
  if (err == 0) err = DeviceStreamSync(ping_stream_);
  if (err != 0) {
    return absl::InternalError(
        absl::StrFormat("CUDA device %d does not answer: %s", device_, DeviceErrorString(err)));
  }
  if (!healthy_) {
    return absl::InternalError(absl::StrFormat("CUDA device %d failed an earlier step", device_));
  }
  return absl::OkStatus();
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
