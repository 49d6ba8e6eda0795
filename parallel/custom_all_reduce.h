// CustomAllReduce: the stream-ordered all-reduce of a two-rank tensor-parallel group done by our
// own kernel over CUDA IPC (kernels/cuda/custom_all_reduce_cuda.h) instead of NCCL: each rank
// pushes its partial straight into the peer's memory over NVLink, one flag exchange per block,
// then adds. At a decode step's size (128 x 2560 bf16, 655 KB) that is a few microseconds where
// NCCL's ring takes tens. NcclCommunicator owns one when PHISHARD_TP_ALLREDUCE allows it (auto,
// custom) and the group can use it; all-reduces that do not fit its buffers stay on NCCL.
//
// Memory, per rank, one cudaMalloc exported with cudaIpcGetMemHandle and opened by the peer:
//   [0, 4 KiB)            arrival flags, uint32 [kCustomAllReduceMaxBlocks]: written by the peer
//   [4 KiB, 8 KiB)        call counters, uint32 [kCustomAllReduceMaxBlocks]: this rank only
//   [8 KiB, +4)           the copy-engine all-reduce's arrival flag, uint32: written by the peer
//   [64 KiB, +2 capacity) two receive halves of `capacity_bytes`, written by the peer
//   [+2 capacity, +4 cap) the copy-engine all-reduce's two receive halves
//   (copy_engine_all_reduce.h)
// Addresses are fixed for the communicator's life and the counters live in device memory, so the
// kernel can be captured into CUDA graphs and replayed: every replay advances the counters on both
// ranks alike. Built only with CUDA (PHISHARD_HAVE_NCCL).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "parallel/control_channel.h"

namespace phishard {

// PHISHARD_TP_ALLREDUCE: which implementation runs a model step's all-reduces.
enum class AllReduceMode {
  kAuto,    // the custom kernel where the group can use it and the size fits; NCCL otherwise
  kNccl,    // always NCCL
  kCustom,  // as auto (kept apart so that logs and benchmarks say what was asked for)
  kCopy,    // as auto, and the overlapped prefill's all-reduces on the copy engines
            // (parallel/copy_engine_all_reduce.h) where the custom kernel is available
};

// "auto" | "nccl" | "custom" | "copy" (any case); INVALID_ARGUMENT naming PHISHARD_TP_ALLREDUCE
// otherwise.
absl::StatusOr<AllReduceMode> ParseAllReduceMode(std::string_view text);
const char* AllReduceModeName(AllReduceMode mode);
// PHISHARD_TP_ALLREDUCE from the environment; `fallback` when unset or empty.
absl::StatusOr<AllReduceMode> AllReduceModeFromEnv(AllReduceMode fallback = AllReduceMode::kAuto);

class CustomAllReduce {
 public:
  // Receive half per rank: an all-reduce of up to this many bytes runs here. 32 MiB holds a
  // 6,553-row Phi-2 bf16 partial (a 1 x 2048 prefill is 10.5 MB).
  static constexpr size_t kDefaultCapacityBytes = size_t{32} << 20;

  struct Options {
    int device = 0;  // this rank's CUDA ordinal (current on the calling thread)
    size_t capacity_bytes = kDefaultCapacityBytes;
    bool wanted = true;               // false: this rank runs NCCL only; the group agrees
    absl::Duration setup_timeout;     // the two handle exchanges over the control channel
    absl::Duration op_timeout;        // one block's wait for its peer inside the kernel
    const int* abort_flag = nullptr;  // device int, set nonzero on abort
  };

  // Collective: every rank of the group calls it at the same point. Returns nullptr, with the
  // reason in *why_not and the same answer on every rank, when the group cannot use it: world
  // size other than 2, ranks on different hosts, GPUs without peer access, a rank that does not
  // want it, or any rank's set-up failing. An error status only when the control channel fails
  // (a peer is gone: the group is unusable anyway).
  static absl::StatusOr<std::unique_ptr<CustomAllReduce>> Create(ControlChannel& control,
                                                                 const Options& options,
                                                                 std::string* why_not);
  ~CustomAllReduce();  // closes the peer's mapping and frees ours; the device must be current
  CustomAllReduce(const CustomAllReduce&) = delete;
  CustomAllReduce& operator=(const CustomAllReduce&) = delete;

  // Whether an all-reduce of `count` elements of `dtype` fits the receive halves.
  bool Fits(size_t count, DataType dtype) const;
  size_t capacity_bytes() const { return capacity_; }
  int blocks() const { return blocks_; }

  // Enqueues the all-reduce of `data` ([count] device, dtype; summed in place) on `stream`, which
  // may be capturing a graph. INTERNAL on a launch error (the kernel's KernelStatus named).
  // Calls must run one after another on the device (one stream, or streams joined by events, as
  // the model's step and its overlapped prefill do): two at once would share the per-block call
  // counters and pair up wrongly with the peer's.
  absl::Status Enqueue(void* data, size_t count, DataType dtype, cudaStream_t stream);

  // What the copy-engine all-reduce (parallel/copy_engine_all_reduce.h) uses of the mapped
  // buffers and of this object's abort flag, error word and timeout. Separate receive halves and
  // flag: the two paths' calls never share a slot, whatever their order.
  struct CopyEngineRegion {
    int rank = 0;
    char* own_recv = nullptr;       // [2][capacity] device, written by the peer's copy engine
    char* peer_recv = nullptr;      // [2][capacity] the peer's (mapped)
    size_t capacity = 0;            // bytes of one half
    uint32_t* own_flag = nullptr;   // device uint32, written by the peer's stream
    uint32_t* peer_flag = nullptr;  // the peer's (mapped)
    const int* abort_flag = nullptr;
    int* error = nullptr;  // the error word CheckError reads (device address)
    unsigned long long timeout_ns = 0;
  };
  CopyEngineRegion copy_engine_region() const;

  // The kernels' error word, read once the stream that ran them is idle: OK, or
  // DEADLINE_EXCEEDED (a peer block never arrived within the op timeout) / ABORTED (the abort
  // flag ended a wait). Sticky: once set, every later call reports it.
  absl::Status CheckError() const;

 private:
  CustomAllReduce() = default;

  int rank_ = 0;
  int device_ = 0;
  size_t capacity_ = 0;
  int blocks_ = 0;
  unsigned long long timeout_ns_ = 0;
  char* own_ = nullptr;        // our exported allocation (layout above)
  char* peer_ = nullptr;       // the peer's, opened with cudaIpcOpenMemHandle
  int* error_host_ = nullptr;  // mapped pinned host int
  int* error_dev_ = nullptr;   // its device address
  const int* abort_flag_ = nullptr;
};

}  // namespace phishard
