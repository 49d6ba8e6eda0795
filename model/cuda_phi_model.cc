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
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/layer_norm_cuda.h"
#include "kernels/cuda/paged_attention_cuda.h"
#include "kernels/cuda/paged_attention_generic_cuda.h"
#include "kernels/cuda/random_fill_cuda.h"
#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "kernels/device_event.h"
#include "kernels/kernel_status.h"
#include "model/cuda_gemm_choices.h"
#include "model/cuda_graph_runner.h"
#include "model/cuda_lora.h"
#include "model/cuda_phi_internal.h"
#include "model/kv_cache.h"

namespace phishard {
namespace {

using cuda_model::AlignUp;
using cuda_model::ArenaLayout;
using cuda_model::GiB;
using cuda_model::kGemmWorkspaceBytes;
using cuda_model::MakeArenaLayout;

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

CudaPhiModel::CudaPhiModel(PhiConfig config, PhiShard shard, Communicator* comm, DataType dtype,
                           int device)
    : config_(LocalPhiConfig(config, shard)),
      full_config_(std::move(config)),
      shard_(shard),
      comm_(shard.sharded() ? comm : nullptr),
      embed_rows_(static_cast<int>(shard.vocab_end - shard.vocab_begin)),
      embed_row_offset_(static_cast<int>(shard.vocab_begin)),
      dtype_(dtype),
      device_(device) {}

CudaPhiModel::~CudaPhiModel() {
  DeviceSet(device_);
  if (stream_) DeviceStreamSync(stream_);
  graphs_.reset();
  lora_graphs_.reset();
  lora_.reset();
  if (mlp_stream_) DeviceStreamSync(mlp_stream_);
  mlp_gemm_.reset();
  DeviceEventDestroy(mlp_fork_ev_);
  DeviceEventDestroy(mlp_join_ev_);
  DeviceEventDestroy(qkv_done_ev_);
  if (mlp_stream_) DeviceStreamDestroy(mlp_stream_);
  gemm_.reset();
  if (step_timer_) DeviceTimerDestroy(step_timer_);
  for (DeviceTimer* t : phase_timers_) {
    if (t != nullptr) DeviceTimerDestroy(t);
  }
  if (fc2_defer_dev_) DeviceFree(fc2_defer_dev_);
  if (fc2_bias_f32_) DeviceFree(fc2_bias_f32_);
  if (decode_dev_) DeviceFree(decode_dev_);
  if (decode_host_) DeviceFreeHost(decode_host_);
  if (logits_host_) DeviceFreeHost(logits_host_);
  if (picks_dev_) DeviceFree(picks_dev_);
  if (picks_host_) DeviceFreeHost(picks_host_);
  if (weights_) DeviceFree(weights_);
  if (kv_) DeviceFree(kv_);
  if (arena_) DeviceFree(arena_);
  if (meta_dev_) DeviceFree(meta_dev_);
  if (meta_host_) DeviceFreeHost(meta_host_);
  if (ping_dev_) DeviceFree(ping_dev_);
  if (ping_host_) DeviceFreeHost(ping_host_);
  if (tp_logits_) DeviceFree(tp_logits_);
  if (mega_buf_) DeviceFree(mega_buf_);
  if (stream_buf_) DeviceFree(stream_buf_);
  if (stream_timeline_) DeviceFree(stream_timeline_);
  if (mega_timeline_) DeviceFree(mega_timeline_);
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
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> m = Init(config, options);
  if (!m.ok()) return m.status();
  PHI_RETURN_IF_ERROR((*m)->UploadWeights(store));
  PHI_RETURN_IF_ERROR((*m)->Finish(options));
  return m;
}

absl::StatusOr<std::unique_ptr<CudaPhiModel>> CudaPhiModel::CreateRandom(
    const PhiConfig& config, const CudaModelOptions& options, uint64_t seed) {
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> m = Init(config, options);
  if (!m.ok()) return m.status();
  PHI_RETURN_IF_ERROR((*m)->FillRandomWeights(seed));
  PHI_RETURN_IF_ERROR((*m)->Finish(options));
  return m;
}

absl::StatusOr<std::unique_ptr<CudaPhiModel>> CudaPhiModel::Init(const PhiConfig& config,
                                                                 const CudaModelOptions& options) {
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
  if (config.head_dim > kPagedAttentionGenericMaxHeadDim) {
    return absl::UnimplementedError(absl::StrFormat(
        "the CUDA backend supports head_dim up to %d; this model has head_dim %d (hidden_size %d "
        "/ num_attention_heads %d)",
        kPagedAttentionGenericMaxHeadDim, config.head_dim, config.hidden_size,
        config.num_attention_heads));
  }
  if (!PagedAttentionCudaSupportsHeadDim(config.head_dim)) {
    PHI_LOG(WARNING) << "head_dim " << config.head_dim << " has no tuned CUDA attention kernel "
                     << "(16, 32, 64, 80, 96, 128): attention runs the generic kernel (slow)";
  }
  if (config.num_key_value_heads <= 0 ||
      config.num_attention_heads % config.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("num_attention_heads %d is not a multiple of num_key_value_heads %d",
                        config.num_attention_heads, config.num_key_value_heads));
  }
  Communicator* comm = options.comm;
  if (comm != nullptr && comm->world_size() > 1 && comm->memory_space() != MemorySpace::kDevice) {
    return absl::InvalidArgumentError(
        "CudaModelOptions.comm: the CUDA backend needs a device communicator (NCCL), not a "
        "host-memory one");
  }
  absl::StatusOr<PhiShard> shard = comm == nullptr
                                       ? MakePhiShard(config, 0, 1)
                                       : MakePhiShard(config, comm->rank(), comm->world_size());
  if (!shard.ok()) return shard.status();
  std::unique_ptr<CudaPhiModel> m(new CudaPhiModel(config, *shard, comm, *dtype, options.device));
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
  if (options.max_graph_batch < 1 || options.gemv_max_rows < 0 ||
      options.gemv_max_rows > kGemvMaxRows) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CudaModelOptions: max_graph_batch = %d must be >= 1 and gemv_max_rows = %d in [0, %d]",
        options.max_graph_batch, options.gemv_max_rows, kGemvMaxRows));
  }
  m->graphs_ = std::make_unique<CudaGraphRunner>(options.max_graph_batch, kDecodeGraphVariants);
  m->lora_graphs_ = std::make_unique<CudaGraphRunner>(options.max_graph_batch);
  m->lora_ = std::make_unique<CudaLora>(m->config_, m->dtype_, options.device);
  m->lora_graphs_->set_node_priority(m->lora_->BranchPriority());  // model/cuda_lora.h
  PHI_RETURN_IF_ERROR(m->InitTpOverlap(options));
  PHI_RETURN_IF_ERROR(m->ApplySettings(options, props.cc_major));  // cuda_phi_settings.cc
  m->props_name_ = props.name;
  return m;
}

absl::Status CudaPhiModel::Finish(const CudaModelOptions& options) {
  // Decode steps of the largest bucket run in the arena too.
  PHI_RETURN_IF_ERROR(
      ReserveWorkspace(std::max({options.reserve_tokens, graphs_->max_batch(), 1})));
  const int pitch = KvBlockAllocator::BlocksFor(std::max(config_.max_position_embeddings, 1));
  PHI_RETURN_IF_ERROR(EnsureDecodeCapacity(graphs_->max_batch(), pitch));
  PHI_RETURN_IF_ERROR(ReserveGreedyPicks(graphs_->max_batch()));
  PHI_RETURN_IF_ERROR(ReserveMegaDecode());  // model/cuda_phi_mega.cc
  PHI_RETURN_IF_ERROR(MakeFc2BiasF32());      // model/cuda_phi_weights.cc
  // CudaModelOptions::decode_stream (ApplySettings read it): transposed copies of the weights
  // uploaded above, before the KV pool is sized.
  // Too little memory for the copies is not a reason to refuse the model: the op-by-op path.
  if (stream_requested_) {
    const absl::Status st = set_decode_stream(true);  // cuda_phi_stream.cc
    if (absl::IsResourceExhausted(st)) {
      PHI_LOG(WARNING) << st.message() << "; 1-row decode steps keep the op-by-op path";
    } else {
      PHI_RETURN_IF_ERROR(st);
    }
  }
  const PhiConfig& config = config_;  // this rank's shapes
  Log(LogLevel::kInfo,
      absl::StrFormat(
          "CUDA Phi model on device %d (%s, %d SMs), tensor-parallel rank %d of %d: %d layers, "
          "hidden %d, heads %d/%d x %d, rotary %d, vocab %d, %s, weights %.2f GiB, GELU %s "
          "(probe |err| tanh %.2g erf %.2g)",
          device_, props_name_, multiprocessors_, shard_.rank, shard_.world_size,
          config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
          config.num_key_value_heads, config.head_dim, config.rotary_dim, config.vocab_size,
          dtype_name(), GiB(static_cast<double>(weights_bytes_)),
          gemm_->gelu_tanh_in_epilogue() ? "in the cuBLASLt epilogue" : "as a separate kernel",
          gemm_->probe_err_tanh(), gemm_->probe_err_erf()));
  return absl::OkStatus();
}

size_t CudaPhiModel::ArenaBytes(int tokens) const { return MakeArenaLayout(config_, tokens).total; }

absl::Status CudaPhiModel::ReserveWorkspace(int tokens) {
  if (tokens <= arena_tokens_) return absl::OkStatus();
  DeviceSet(device_);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "synchronize"));
  DropGraphs();  // they point into the arena
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
  // Prefill metadata for steps of `tokens` tokens in up to 256 sequences of any length (larger
  // batches of sequences grow it when they come).
  const int seqs = std::min(tokens, 256);
  const int pitch = KvBlockAllocator::BlocksFor(std::max(config_.max_position_embeddings, 1));
  PHI_RETURN_IF_ERROR(
      EnsureMetadataCapacity(cuda_model::MakeMetaLayout(tokens, seqs, seqs, pitch).total));
  PHI_RETURN_IF_ERROR(lora_->Reserve(tokens, graphs_->max_batch(), stream_));
  if (lora_->TakeGraphsStale()) lora_graphs_->Clear();
  return ReserveTpLogits(tokens);
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
  return AgreeKvBlocks(LocalMaxKvBlocks(memory_fraction, max_batch_tokens));
}

absl::StatusOr<int> CudaPhiModel::LocalMaxKvBlocks(double memory_fraction,
                                                   int max_batch_tokens) const {
  if (absl::Status s = CheckKvPoolSizing(memory_fraction, max_batch_tokens); !s.ok()) return s;
  DeviceSet(device_);
  size_t free_bytes = 0, total_bytes = 0;
  if (int err = DeviceMemGetInfo(&free_bytes, &total_bytes); err != 0) {
    DeviceGetLastError();
    return absl::InternalError(
        absl::StrFormat("cudaMemGetInfo failed on device %d: %s", device_, DeviceErrorString(err)));
  }
  const int reserve = std::max(max_batch_tokens, arena_tokens_);
  const double grow = static_cast<double>(ArenaBytes(reserve)) - static_cast<double>(arena_bytes_);
  // Graphs are (re)captured after the KV pool is allocated: keep room for all of them.
  const double graphs =
      use_graphs_
          ? static_cast<double>(std::max(planned_decode_graphs() - graphs_->num_graphs(), 0)) *
                static_cast<double>(kDecodeGraphBytes)
          : 0.0;
  const double budget = static_cast<double>(free_bytes) + static_cast<double>(kv_bytes_) -
                        std::max(grow, 0.0) - graphs - LoraReserveBytes(reserve) -
                        (1.0 - memory_fraction) * static_cast<double>(total_bytes);
  const double per_block = static_cast<double>(KvBytesPerBlock(kKvBlockSize));
  const double blocks = std::floor(std::max(budget, 0.0) / per_block);
  if (blocks < 1) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "no KV block fits on CUDA device %d: %.2f GiB free (+%.2f GiB of current KV pool) minus "
        "%.2f GiB more step workspace for %d tokens minus %.2f GiB for decode graphs minus (1 - "
        "fraction %g) x %.2f GiB total leaves less than one block of %.1f KiB",
        device_, GiB(free_bytes), GiB(kv_bytes_), GiB(std::max(grow, 0.0)), reserve, GiB(graphs),
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
  DropGraphs();  // they point into the KV pool
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

absl::Status CudaPhiModel::EnsureDecodeCapacity(int rows, int table_pitch) {
  const int want_rows = std::max(rows, decode_rows_);
  const int64_t want_ints =
      std::max<int64_t>(static_cast<int64_t>(rows) * table_pitch, decode_table_ints_);
  if (want_rows == decode_rows_ && want_ints == decode_table_ints_) return absl::OkStatus();
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "synchronize"));
  DropGraphs();  // they point into the decode buffer
  if (decode_dev_) DeviceFree(decode_dev_);
  if (fc2_defer_dev_) DeviceFree(fc2_defer_dev_);
  fc2_defer_dev_ = nullptr;
  if (decode_host_) DeviceFreeHost(decode_host_);
  if (logits_host_) DeviceFreeHost(logits_host_);
  decode_dev_ = decode_host_ = nullptr;
  logits_host_ = nullptr;
  decode_bytes_ = 0;
  decode_rows_ = 0;
  decode_table_ints_ = 0;
  const size_t bytes = DecodeBufferBytes(want_rows, want_ints, config_.num_attention_heads);
  const size_t logit_bytes =
      static_cast<size_t>(want_rows) * full_config_.vocab_size * sizeof(float);
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMalloc(&decode_dev_, bytes), "malloc (decode inputs)"));
  PHI_RETURN_IF_ERROR(DeviceStatus(
      DeviceMalloc(&fc2_defer_dev_, static_cast<size_t>(want_rows) * config_.hidden_size * 4),
      "malloc (fc2 rows)"));
  PHI_RETURN_IF_ERROR(
      DeviceStatus(DeviceMallocHost(&decode_host_, bytes), "host malloc (decode inputs)"));
  void* lh = nullptr;
  PHI_RETURN_IF_ERROR(
      DeviceStatus(DeviceMallocHost(&lh, logit_bytes), "host malloc (decode logits)"));
  logits_host_ = static_cast<float*>(lh);
  // Rows past a step's batch are never read, but keep them defined.
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceMemset(decode_dev_, 0, bytes, stream_), "memset"));
  std::memset(decode_host_, 0, bytes);
  decode_bytes_ = bytes;
  decode_rows_ = want_rows;
  decode_table_ints_ = want_ints;
  return absl::OkStatus();
}

void CudaPhiModel::DropGraphs() {
  if (graphs_) graphs_->Clear();
  if (lora_graphs_) lora_graphs_->Clear();
}

void CudaPhiModel::set_cuda_graphs(bool on) {
  use_graphs_ = on;
  if (!on) DropGraphs();
}

absl::Status CudaPhiModel::set_mlp_stream_mode(int mode) {
  if (mode < kMlpStreamOff || mode > kMlpStreamFc1Fc2) {
    return absl::InvalidArgumentError(
        absl::StrFormat("mlp_stream = %d must be 0 (off), 1 (fc1) or 2 (fc1 and fc2)", mode));
  }
  if (mode == mlp_mode_) return absl::OkStatus();
  DeviceSet(device_);
  if (mode != kMlpStreamOff && mlp_stream_ == nullptr) {
    PHI_RETURN_IF_ERROR(DeviceStatus(lora_->BranchPriority()
                                         ? DeviceStreamCreateHighPriority(&mlp_stream_)
                                         : DeviceStreamCreate(&mlp_stream_),
                                     "MLP stream create"));
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceEventCreate(&mlp_fork_ev_), "MLP fork event"));
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceEventCreate(&mlp_join_ev_), "MLP join event"));
    PHI_RETURN_IF_ERROR(DeviceStatus(DeviceEventCreate(&qkv_done_ev_), "qkv done event"));
    if (KernelStatus st = CudaGemm::Create(kGemmWorkspaceBytes, &mlp_gemm_);
        st != KernelStatus::kOk) {
      return absl::InternalError(
          absl::StrCat("cuBLASLt initialisation (MLP stream) failed: ", KernelStatusName(st)));
    }
  }
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "synchronize"));
  // fc2 on the MLP branch or not changes the dense / fc2 forms the warm-up tuning timed
  // (TuneGemms): forget its choices, the next PrepareDecode times the new forms.
  const bool retune = (mode == kMlpStreamFc1Fc2) != (mlp_mode_ == kMlpStreamFc1Fc2);
  mlp_mode_ = mode;
  // Either way ApplyGemmChoices runs: the MLP stream's GEMMs take the choices too, and the graphs
  // (they bake in the old branch layout) are dropped.
  if (retune) {
    ForgetTunedGemms();
  } else {
    ApplyGemmChoices();
  }
  return absl::OkStatus();
}

absl::Status CudaPhiModel::set_gemv_max_rows(int rows) {
  if (rows < 0 || rows > kGemvMaxRows) {
    return absl::InvalidArgumentError(
        absl::StrFormat("gemv_max_rows = %d must be in [0, %d]", rows, kGemvMaxRows));
  }
  gemv_max_rows_ = rows;
  DropGraphs();
  return absl::OkStatus();
}

void CudaPhiModel::set_pdl(bool on) {
  pdl_ = on;
  DropGraphs();
}

absl::Status CudaPhiModel::set_bulk_gemv(int rows, bool pdl, bool ln) {
  if (rows < 0 || rows > kGemvMaxRows) {
    return absl::InvalidArgumentError(
        absl::StrFormat("bulk_gemv_rows = %d must be in [0, %d]", rows, kGemvMaxRows));
  }
  bulk_rows_ = rows;
  bulk_pdl_ = pdl;  // the bulk kernel itself needs sm_90 (GemvCudaSupports checks)
  bulk_ln_ = ln;
  DropGraphs();
  return absl::OkStatus();
}

void CudaPhiModel::set_gemv_single_segment(bool on) {
  gemv_single_segment_ = on;
  DropGraphs();
}

namespace {
// Creates (on) or destroys (off) a benchmark timer; a failed creation leaves it null (no timing).
void SwitchTimer(DeviceTimer*& t, bool on) {
  if (on && t == nullptr) {
    if (DeviceTimerCreate(&t) != 0) {
      DeviceGetLastError();
      t = nullptr;
    }
  } else if (!on && t != nullptr) {
    DeviceTimerDestroy(t);
    t = nullptr;
  }
}
}  // namespace

void CudaPhiModel::set_step_timing(bool on) { SwitchTimer(step_timer_, on); }

void CudaPhiModel::set_step_phase_timing(bool on) {
  for (DeviceTimer*& t : phase_timers_) SwitchTimer(t, on);
}

void CudaPhiModel::PhaseTimerStart(int i) {
  if (phase_timers_[i] != nullptr) DeviceTimerStart(phase_timers_[i], stream_);
}

void CudaPhiModel::PhaseTimerStop(int i) {
  if (phase_timers_[i] != nullptr) DeviceTimerStop(phase_timers_[i], stream_);
  if (i == 1 && phase_timers_[0] != nullptr && phase_timers_[1] != nullptr) phases_recorded_ = true;
}

void CudaPhiModel::StepTimerStart() {
  last_step_phases_ = {};
  phases_recorded_ = false;
  if (step_timer_) DeviceTimerStart(step_timer_, stream_);
}

void CudaPhiModel::StepTimerStop() {
  if (step_timer_ == nullptr) return;
  DeviceTimerStop(step_timer_, stream_);
  if (DeviceTimerElapsedMs(step_timer_, &last_step_device_ms_) != 0) {
    DeviceGetLastError();
    last_step_device_ms_ = 0.0f;
  }
  float* phases[2] = {&last_step_phases_.graph_ms, &last_step_phases_.tail_ms};
  for (int i = 0; i < 2 && phases_recorded_; ++i) {
    if (DeviceTimerElapsedMs(phase_timers_[i], phases[i]) != 0) {
      DeviceGetLastError();
      *phases[i] = 0.0f;
    }
  }
}

absl::Status CudaPhiModel::FillKvCacheRandom(uint64_t seed) {
  if (kv_ == nullptr) return absl::FailedPreconditionError("KV cache is not allocated");
  DeviceSet(device_);
  PHI_RETURN_IF_ERROR(KernelResult(RandomFillCuda({.data = kv_,
                                                   .count = static_cast<int64_t>(kv_bytes_ / 2),
                                                   .center = 0.0f,
                                                   .spread = 1.7320508f,  // std 1
                                                   .seed = seed,
                                                   .dtype = dtype_},
                                                  stream_),
                                   "random KV"));
  return DeviceStatus(DeviceStreamSync(stream_), "random KV");
}

int CudaPhiModel::num_decode_graphs() const { return graphs_->num_graphs(); }
int CudaPhiModel::planned_decode_graphs() const {
  int n = 0;
  for (int b : graphs_->buckets()) {
    for (int v = 0; v < kDecodeGraphVariants; ++v) n += DecodeVariantPossible(b, v) ? 1 : 0;
  }
  return n;
}
int64_t CudaPhiModel::decode_graph_replays() const { return graphs_->replays(); }
int64_t CudaPhiModel::decode_graph_captures() const { return graphs_->captures(); }
size_t CudaPhiModel::decode_graph_nodes() const { return graphs_->total_nodes(); }
int CudaPhiModel::decode_bucket(int batch) const { return graphs_->Bucket(batch); }

absl::Status CudaPhiModel::ValidateBatch(const ForwardBatch& b) const {
  if (kv_ == nullptr) {
    return absl::FailedPreconditionError("KV cache is not allocated (AllocateKvCache first)");
  }
  return ValidateForwardBatch(b, full_config_.vocab_size, kv_num_blocks_, kv_block_size_);
}

absl::Status CudaPhiModel::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  if (!healthy_) {
    return absl::InternalError(absl::StrFormat(
        "CUDA device %d failed an earlier step; the shard must be restarted", device_));
  }
  PHI_RETURN_IF_ERROR(ValidateBatch(batch));
  DeviceSet(device_);
  const bool decode = std::all_of(batch.seqs.begin(), batch.seqs.end(),
                                  [](const SequenceInput& s) { return s.num_new_tokens == 1; });
  // Decode batches above the largest bucket run through the general path (unpadded, eager).
  if (decode && static_cast<int>(batch.seqs.size()) <= graphs_->max_batch()) {
    return DecodeStep(batch, logits);
  }
  return PrefillStep(batch, logits);
}

absl::Status CudaPhiModel::ForwardView(const ForwardBatch& batch, absl::Span<const float>* logits) {
  const bool decode = std::all_of(batch.seqs.begin(), batch.seqs.end(),
                                  [](const SequenceInput& s) { return s.num_new_tokens == 1; });
  if (!healthy_ || !decode || static_cast<int>(batch.seqs.size()) > graphs_->max_batch()) {
    return ModelBackend::ForwardView(batch, logits);  // Forward's checks and paths, then a view
  }
  *logits = {};
  PHI_RETURN_IF_ERROR(ValidateBatch(batch));
  DeviceSet(device_);
  return DecodeStep(batch, nullptr, logits);
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
