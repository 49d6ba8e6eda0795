#include "parallel/custom_all_reduce.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "kernels/cuda/custom_all_reduce_cuda.h"

namespace phishard {
namespace {

constexpr size_t kFlagsOffset = 0;
constexpr size_t kEpochsOffset = 4096;
constexpr size_t kCopyEngineFlagOffset = 8192;
constexpr size_t kRecvOffset = size_t{64} << 10;
static_assert(kCustomAllReduceMaxBlocks * sizeof(uint32_t) <= kEpochsOffset - kFlagsOffset);
static_assert(kEpochsOffset + kCustomAllReduceMaxBlocks * sizeof(uint32_t) <=
              kCopyEngineFlagOffset);

// One rank's part of a set-up exchange: a fixed header, then free text (why it cannot take part).
struct SetupHeader {
  uint8_t ok = 0;
  char bus_id[32] = {};   // cudaDeviceGetPCIBusId
  uint64_t capacity = 0;  // bytes of one receive half
  uint32_t blocks = 0;    // the fixed grid
  cudaIpcMemHandle_t handle = {};
};

std::string Encode(const SetupHeader& h, const std::string& reason) {
  std::string out(sizeof(h), '\0');
  std::memcpy(out.data(), &h, sizeof(h));
  return out + reason;
}

bool Decode(const std::string& blob, SetupHeader* h, std::string* reason) {
  if (blob.size() < sizeof(SetupHeader)) return false;
  std::memcpy(h, blob.data(), sizeof(SetupHeader));
  h->bus_id[sizeof(h->bus_id) - 1] = '\0';
  *reason = blob.substr(sizeof(SetupHeader));
  return true;
}

std::string CudaText(const char* call, cudaError_t e) {
  return absl::StrCat(call, ": ", cudaGetErrorString(e));
}

}  // namespace

absl::StatusOr<AllReduceMode> ParseAllReduceMode(std::string_view text) {
  std::string t(text);
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
  if (t == "auto") return AllReduceMode::kAuto;
  if (t == "nccl") return AllReduceMode::kNccl;
  if (t == "custom") return AllReduceMode::kCustom;
  if (t == "copy") return AllReduceMode::kCopy;
  return absl::InvalidArgumentError(absl::StrCat("PHISHARD_TP_ALLREDUCE=", std::string(text),
                                                 ": want auto, nccl, custom or copy"));
}

const char* AllReduceModeName(AllReduceMode mode) {
  switch (mode) {
    case AllReduceMode::kAuto:
      return "auto";
    case AllReduceMode::kNccl:
      return "nccl";
    case AllReduceMode::kCustom:
      return "custom";
    case AllReduceMode::kCopy:
      return "copy";
  }
  return "unknown";
}

absl::StatusOr<AllReduceMode> AllReduceModeFromEnv(AllReduceMode fallback) {
  const char* v = std::getenv("PHISHARD_TP_ALLREDUCE");
  if (v == nullptr || v[0] == '\0') return fallback;
  return ParseAllReduceMode(v);
}

absl::StatusOr<std::unique_ptr<CustomAllReduce>> CustomAllReduce::Create(ControlChannel& control,
                                                                         const Options& options,
                                                                         std::string* why_not) {
  const int rank = control.rank();
  const int world = control.world_size();
  why_not->clear();
  // Decided alike on every rank without an exchange.
  if (world != 2) {
    *why_not = absl::StrCat("world size ", world, " (the custom all-reduce is for 2 ranks)");
    return nullptr;
  }
  if (control.local_world_size() != world) {
    *why_not = "the ranks are on different hosts";
    return nullptr;
  }
  const int peer_rank = 1 - rank;
  std::unique_ptr<CustomAllReduce> car(new CustomAllReduce());
  car->rank_ = rank;
  car->device_ = options.device;
  car->capacity_ = options.capacity_bytes / 16 * 16;
  car->timeout_ns_ = static_cast<unsigned long long>(
      std::max<int64_t>(1, absl::ToInt64Nanoseconds(options.op_timeout)));
  car->abort_flag_ = options.abort_flag;

  // Exchange 1: our buffer's handle, or why we cannot take part.
  SetupHeader mine;
  std::string reason;
  auto local = [&]() -> std::string {
    if (!options.wanted) return "PHISHARD_TP_ALLREDUCE=nccl";
    if (options.abort_flag == nullptr) return "no abort flag";
    if (cudaError_t e = cudaDeviceGetPCIBusId(mine.bus_id, sizeof(mine.bus_id), options.device);
        e != cudaSuccess) {
      return CudaText("cudaDeviceGetPCIBusId", e);
    }
    int sms = 0;
    if (cudaError_t e =
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, options.device);
        e != cudaSuccess) {
      return CudaText("cudaDeviceGetAttribute", e);
    }
    // One block per SM: the fixed grid. Both ranks must launch the same grid (checked below).
    car->blocks_ = std::clamp(sms, 1, kCustomAllReduceMaxBlocks);
    // Loaded now, not at a first launch that may come while a wait for the peer runs.
    if (LoadCustomAllReduceKernelsCuda() != KernelStatus::kOk) {
      return CudaText("loading the custom all-reduce kernels", cudaGetLastError());
    }
    void* p = nullptr;
    if (cudaError_t e = cudaMalloc(&p, kRecvOffset + 4 * car->capacity_); e != cudaSuccess) {
      cudaGetLastError();
      return CudaText("cudaMalloc of the receive buffers", e);
    }
    car->own_ = static_cast<char*>(p);
    // Zero flags and counters before the peer learns the handle (it writes only after that).
    if (cudaError_t e = cudaMemset(car->own_, 0, kRecvOffset); e != cudaSuccess) {
      return CudaText("cudaMemset", e);
    }
    if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
      return CudaText("cudaDeviceSynchronize", e);
    }
    if (cudaError_t e = cudaIpcGetMemHandle(&mine.handle, car->own_); e != cudaSuccess) {
      return CudaText("cudaIpcGetMemHandle", e);
    }
    void* eh = nullptr;
    if (cudaError_t e = cudaHostAlloc(&eh, sizeof(int), cudaHostAllocMapped); e != cudaSuccess) {
      return CudaText("cudaHostAlloc of the error word", e);
    }
    car->error_host_ = static_cast<int*>(eh);
    *car->error_host_ = kCustomAllReduceOk;
    void* ed = nullptr;
    if (cudaError_t e = cudaHostGetDevicePointer(&ed, eh, 0); e != cudaSuccess) {
      return CudaText("cudaHostGetDevicePointer", e);
    }
    car->error_dev_ = static_cast<int*>(ed);
    mine.capacity = car->capacity_;
    mine.blocks = static_cast<uint32_t>(car->blocks_);
    return "";
  };
  reason = local();
  mine.ok = reason.empty() ? 1 : 0;
  auto all = control.AllGather(Encode(mine, reason), options.setup_timeout);
  if (!all.ok()) return all.status();
  SetupHeader peer;
  std::string peer_reason;
  if (!Decode((*all)[peer_rank], &peer, &peer_reason)) {
    return absl::InternalError(
        absl::StrCat("rank ", rank, ": malformed custom all-reduce set-up from rank ", peer_rank));
  }
  std::string fail;
  if (!mine.ok) {
    fail = absl::StrCat("rank ", rank, ": ", reason);
  } else if (!peer.ok) {
    fail = absl::StrCat("rank ", peer_rank, ": ", peer_reason);
  } else if (peer.capacity != mine.capacity || peer.blocks != mine.blocks) {
    fail = "the ranks' buffer sizes or grids differ";
  }

  // Exchange 2: whether we could map the peer's buffer.
  if (fail.empty()) {
    auto open = [&]() -> std::string {
      int peer_device = -1;
      if (cudaError_t e = cudaDeviceGetByPCIBusId(&peer_device, peer.bus_id); e != cudaSuccess) {
        cudaGetLastError();
        return absl::StrCat("rank ", peer_rank, "'s GPU ", peer.bus_id,
                            " is not visible here (CUDA_VISIBLE_DEVICES)");
      }
      int can = 0;
      if (peer_device == options.device) return "both ranks on one GPU";
      if (cudaError_t e = cudaDeviceCanAccessPeer(&can, options.device, peer_device);
          e != cudaSuccess || can == 0) {
        cudaGetLastError();
        return absl::StrCat("cuda:", options.device, " cannot access cuda:", peer_device,
                            "'s memory (no peer-to-peer path)");
      }
      void* p = nullptr;
      if (cudaError_t e = cudaIpcOpenMemHandle(&p, peer.handle, cudaIpcMemLazyEnablePeerAccess);
          e != cudaSuccess) {
        cudaGetLastError();
        return CudaText("cudaIpcOpenMemHandle", e);
      }
      car->peer_ = static_cast<char*>(p);
      return "";
    };
    std::string opened = open();
    auto all2 = control.AllGather(opened, options.setup_timeout);
    if (!all2.ok()) return all2.status();
    if (!opened.empty()) {
      fail = absl::StrCat("rank ", rank, ": ", opened);
    } else if (!(*all2)[peer_rank].empty()) {
      fail = absl::StrCat("rank ", peer_rank, ": ", (*all2)[peer_rank]);
    }
  }
  if (!fail.empty()) {
    *why_not = fail;
    return nullptr;  // the destructor releases what was set up
  }
  PHI_LOG(INFO) << "rank " << rank << ": custom all-reduce ready on cuda:" << options.device
                << " (peer-to-peer, " << car->blocks_ << " blocks, up to " << car->capacity_
                << " bytes a call)";
  return car;
}

CustomAllReduce::~CustomAllReduce() {
  if (peer_ != nullptr) cudaIpcCloseMemHandle(peer_);
  if (own_ != nullptr) cudaFree(own_);
  if (error_host_ != nullptr) cudaFreeHost(error_host_);
}

CustomAllReduce::CopyEngineRegion CustomAllReduce::copy_engine_region() const {
  CopyEngineRegion r;
  r.rank = rank_;
  r.own_recv = own_ + kRecvOffset + 2 * capacity_;
  r.peer_recv = peer_ + kRecvOffset + 2 * capacity_;
  r.capacity = capacity_;
  r.own_flag = reinterpret_cast<uint32_t*>(own_ + kCopyEngineFlagOffset);
  r.peer_flag = reinterpret_cast<uint32_t*>(peer_ + kCopyEngineFlagOffset);
  r.abort_flag = abort_flag_;
  r.error = error_dev_;
  r.timeout_ns = timeout_ns_;
  return r;
}

bool CustomAllReduce::Fits(size_t count, DataType dtype) const {
  return count <= capacity_ / DataTypeSize(dtype);
}

absl::Status CustomAllReduce::Enqueue(void* data, size_t count, DataType dtype,
                                      cudaStream_t stream) {
  CustomAllReduceParams p;
  p.data = data;
  p.count = count;
  p.dtype = dtype;
  p.peer_recv = peer_ + kRecvOffset;
  p.own_recv = own_ + kRecvOffset;
  p.capacity_bytes = capacity_;
  p.peer_flags = reinterpret_cast<uint32_t*>(peer_ + kFlagsOffset);
  p.own_flags = reinterpret_cast<const uint32_t*>(own_ + kFlagsOffset);
  p.epochs = reinterpret_cast<uint32_t*>(own_ + kEpochsOffset);
  p.abort_flag = abort_flag_;
  p.error = error_dev_;
  p.timeout_ns = timeout_ns_;
  p.blocks = blocks_;
  KernelStatus k = CustomAllReduceCuda(p, stream);
  if (k == KernelStatus::kOk) return absl::OkStatus();
  std::string text = KernelStatusName(k);
  if (k == KernelStatus::kDeviceError) {
    absl::StrAppend(&text, ": ", cudaGetErrorString(cudaGetLastError()));
  }
  return absl::InternalError(absl::StrCat("rank ", rank_, ": custom all-reduce of ", count, " ",
                                          DataTypeName(dtype), " elements: ", text));
}

absl::Status CustomAllReduce::CheckError() const {
  const int e = *static_cast<volatile int*>(error_host_);
  if (e == kCustomAllReduceTimedOut) {
    return absl::DeadlineExceededError(absl::StrCat(
        "rank ", rank_, ": custom all-reduce: rank ", 1 - rank_, " did not arrive within ",
        absl::FormatDuration(absl::Nanoseconds(timeout_ns_)), " (a peer is missing or stuck)"));
  }
  if (e == kCustomAllReduceAborted) {
    return absl::AbortedError(
        absl::StrCat("rank ", rank_, ": custom all-reduce interrupted by abort"));
  }
  return absl::OkStatus();
}

}  // namespace phishard
