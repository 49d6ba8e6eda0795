#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "parallel/abort_watch.h"
#include "parallel/copy_engine_all_reduce.h"

namespace phishard {
namespace {

std::string NcclText(ncclResult_t r, ncclComm_t comm) {
  const char* last = ncclGetLastError(comm);
  return absl::StrCat(ncclGetErrorString(r), last != nullptr && last[0] != '\0' ? " (" : "",
                      last != nullptr ? last : "", last != nullptr && last[0] != '\0' ? ")" : "");
}

ncclDataType_t NcclType(DataType t) {
  switch (t) {
    case DataType::kF32:
      return ncclFloat32;
    case DataType::kF16:
      return ncclFloat16;
    case DataType::kBF16:
      return ncclBfloat16;
  }
  return ncclFloat32;
}

// Polling cadence while waiting on the GPU or on NCCL: spin (yielding) for the first `spin`, then
// sleep 100 us per check to leave the CPU to others. A standalone collective spins 50 us (a
// decode-sized all-reduce); a model step spins longer (SyncStream), since a 100 us sleep would
// add to every decode step.
void PollPause(absl::Time start, absl::Duration spin = absl::Microseconds(50)) {
  if (absl::Now() - start < spin) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

}  // namespace

struct NcclCommunicator::Impl {
  int rank = 0;
  int world_size = 1;
  int device = 0;
  absl::Duration op_timeout;
  cudaStream_t stream = nullptr;
  float* scratch = nullptr;  // [1] float, device memory; Barrier's all-reduce operand
  ncclComm_t comm = nullptr;
  // PHISHARD_TP_ALLREDUCE and the custom all-reduce, when the group can use it. The custom
  // kernels' waits end when `abort_flag` ([1] int, device memory) turns 1: RequestAbort copies
  // `abort_one` (pinned host int holding 1) there on `abort_stream`, beside the spinning kernel.
  std::atomic<AllReduceMode> mode{AllReduceMode::kAuto};
  std::unique_ptr<CustomAllReduce> car;
  std::unique_ptr<CopyEngineAllReduce> ce;  // beside `car`, on its buffers
  int* abort_flag = nullptr;
  int* abort_one = nullptr;
  cudaStream_t abort_stream = nullptr;
  std::atomic<bool> abort_flag_set{false};

  absl::Mutex op_mu;  // one collective at a time; also guards the comm's lifetime
  bool comm_gone ABSL_GUARDED_BY(op_mu) = false;
  std::atomic<bool> abort_requested{false};
  absl::Mutex reason_mu;
  std::string abort_reason ABSL_GUARDED_BY(reason_mu);
  // Tells the peers when we abort and tells us when they abort or die; NCCL itself may not notice
  // a dead peer over peer-to-peer transports.
  std::unique_ptr<AbortWatch> watch;
  // ncclCommAbort runs here (AbortCommLocked); `abort_done` is set when it has returned.
  std::thread abort_thread;
  std::shared_ptr<std::atomic<bool>> abort_done = std::make_shared<std::atomic<bool>>(false);

  ~Impl() {
    watch.reset();  // joins its thread, which may call RequestAbort()
    if (comm == nullptr && scratch == nullptr && stream == nullptr) return;
    cudaSetDevice(device);
    absl::MutexLock lock(&op_mu);
    if (abort_requested.load()) AbortCommLocked();  // a broken group cannot finalize
    if (comm != nullptr && !comm_gone) {
      // Finalize waits until the group is quiescent (non-blocking: poll, bounded); abort if it
      // does not get there.
      ncclResult_t r = ncclCommFinalize(comm);
      absl::Time start = absl::Now();
      ncclResult_t state = r;
      while (state == ncclInProgress && absl::Now() - start < absl::Seconds(10)) {
        PollPause(start);
        ncclCommGetAsyncError(comm, &state);
      }
      if (state == ncclSuccess) {
        ncclCommDestroy(comm);
      } else {
        ncclCommAbort(comm);
      }
      comm_gone = true;
    }
    if (abort_thread.joinable()) {
      // Normally quick: the users of the communicator (a model and its CUDA graphs) are gone by
      // now. A CUDA graph that still holds one of its collectives would keep the abort waiting
      // forever; then the process leaves it behind rather than hang here.
      const absl::Time until = absl::Now() + absl::Seconds(10);
      while (!abort_done->load() && absl::Now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      if (abort_done->load()) {
        abort_thread.join();
      } else {
        PHI_LOG(WARNING) << "rank " << rank
                         << ": ncclCommAbort has not returned after 10 s (a CUDA graph still "
                            "holds the communicator's collectives); leaving it behind";
        abort_thread.detach();
        return;  // its device resources may still be in use
      }
    }
    // Leaving the group: a custom kernel still waiting for the peer (a graph left running) ends.
    SetAbortFlag();
    if (abort_stream != nullptr) cudaStreamSynchronize(abort_stream);
    ce.reset();
    car.reset();
    if (abort_flag != nullptr) cudaFree(abort_flag);
    if (abort_one != nullptr) cudaFreeHost(abort_one);
    if (abort_stream != nullptr) cudaStreamDestroy(abort_stream);
    if (scratch != nullptr) cudaFree(scratch);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  bool UseCopyEngine() const { return ce != nullptr && mode.load() == AllReduceMode::kCopy; }

  bool UseCustom(size_t count, DataType dtype) const {
    return car != nullptr && mode.load() != AllReduceMode::kNccl && car->Fits(count, dtype);
  }

  std::string AbortReason() {
    absl::MutexLock lock(&reason_mu);
    return abort_reason;
  }

  // Any thread: makes the collective in flight (if any) and every later one abort the comm and
  // fail. The op thread calls ncclCommAbort, so it never races another NCCL call on the comm.
  void RequestAbort(const std::string& reason) {
    {
      absl::MutexLock lock(&reason_mu);
      if (abort_reason.empty()) abort_reason = reason.empty() ? "communicator aborted" : reason;
    }
    abort_requested.store(true);
    // After abort_requested: a custom kernel that ends on the flag finds the reason set.
    SetAbortFlag();
  }

  // Any thread, once: abort_flag = 1 by a copy on abort_stream (a copy engine; runs beside a
  // custom kernel that spins on the flag).
  void SetAbortFlag() {
    if (abort_flag == nullptr || abort_flag_set.exchange(true)) return;
    cudaSetDevice(device);
    cudaMemcpyAsync(abort_flag, abort_one, sizeof(int), cudaMemcpyHostToDevice, abort_stream);
  }

  // ncclCommAbort first raises NCCL's abort flag, which ends its kernels (a collective waiting
  // for a dead peer returns), and then waits until every CUDA graph that captured one of the
  // comm's collectives has been destroyed. Those graphs belong to our caller (a model's decode
  // graphs), which can drop them only once the failed call has returned, so the abort runs on
  // its own thread and the call returns at once.
  void AbortCommLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu) {
    if (comm != nullptr && !comm_gone) {
      comm_gone = true;
      PHI_LOG(WARNING) << "rank " << rank << ": aborting the NCCL communicator";
      abort_thread = std::thread([c = comm, dev = device, done = abort_done] {
        cudaSetDevice(dev);
        ncclCommAbort(c);
        done->store(true);
      });
    }
  }

  absl::Status FailLocked(absl::StatusCode code, const std::string& message)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu) {
    RequestAbort(message);
    if (watch != nullptr) watch->Trigger(message);
    AbortCommLocked();
    return absl::Status(code, message);
  }

  // Entry check of every collective: not aborted, and the calling thread on our device.
  absl::Status BeginLocked(const std::string& what) ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu) {
    if (abort_requested.load() || comm_gone) {
      AbortCommLocked();
      return absl::AbortedError(
          absl::StrCat("rank ", rank, ": ", what, " on an aborted communicator: ", AbortReason()));
    }
    if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
      return FailLocked(
          absl::StatusCode::kInternal,
          absl::StrCat("rank ", rank, ": cudaSetDevice(", device, "): ", cudaGetErrorString(e)));
    }
    return absl::OkStatus();
  }

  // Waits for the NCCL call that returned `issued`: first its enqueue (ncclInProgress while the
  // non-blocking communicator is still posting it), then its completion on `stream`, watching
  // for asynchronous NCCL errors, Abort() and the deadline all along.
  absl::Status WaitLocked(const std::string& what, ncclResult_t issued, cudaStream_t on = nullptr,
                          absl::Duration spin = absl::Microseconds(50))
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu) {
    if (on == nullptr) on = stream;
    if (issued != ncclSuccess && issued != ncclInProgress) {
      return FailLocked(absl::StatusCode::kInternal,
                        absl::StrCat("rank ", rank, ": NCCL ", what, ": ", NcclText(issued, comm)));
    }
    const absl::Time start = absl::Now();
    const absl::Time deadline = start + op_timeout;
    for (;;) {
      if (abort_requested.load()) {
        AbortCommLocked();
        return absl::AbortedError(
            absl::StrCat("rank ", rank, ": ", what, " interrupted by abort: ", AbortReason()));
      }
      ncclResult_t state = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm, &state);
      if (r != ncclSuccess) state = r;
      if (state != ncclSuccess && state != ncclInProgress) {
        // A peer that died or aborted surfaces here (remote error / system error).
        return FailLocked(
            absl::StatusCode::kUnavailable,
            absl::StrCat("rank ", rank, ": NCCL ", what, " failed: ", NcclText(state, comm)));
      }
      if (state == ncclSuccess) {
        cudaError_t q = cudaStreamQuery(on);
        if (q == cudaSuccess) return absl::OkStatus();
        if (q != cudaErrorNotReady) {
          // A peer that died may take its memory with it before the abort watch (milliseconds)
          // reports it: give the watch a moment so the error names the cause.
          const absl::Time until = absl::Now() + absl::Milliseconds(500);
          while (!abort_requested.load() && absl::Now() < until) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
          }
          const std::string cause =
              abort_requested.load() ? absl::StrCat(" (group aborted: ", AbortReason(), ")") : "";
          return FailLocked(absl::StatusCode::kInternal,
                            absl::StrCat("rank ", rank, ": CUDA error during NCCL ", what, ": ",
                                         cudaGetErrorString(q), cause));
        }
      }
      if (absl::Now() >= deadline) {
        return FailLocked(
            absl::StatusCode::kDeadlineExceeded,
            absl::StrCat("rank ", rank, ": NCCL ", what, " did not complete within ",
                         absl::FormatDuration(op_timeout), " (a peer is missing or stuck)"));
      }
      PollPause(start, spin);
    }
  }

  // Waits until the non-blocking communicator has posted the call that returned `issued` onto
  // its stream (ncclInProgress until then); never touches the stream, which may be capturing.
  absl::Status PostedLocked(const std::string& what, ncclResult_t issued)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu) {
    if (issued == ncclSuccess) return absl::OkStatus();
    if (issued != ncclInProgress) {
      return FailLocked(absl::StatusCode::kInternal,
                        absl::StrCat("rank ", rank, ": NCCL ", what, ": ", NcclText(issued, comm)));
    }
    const absl::Time start = absl::Now();
    for (;;) {
      if (abort_requested.load()) {
        AbortCommLocked();
        return absl::AbortedError(
            absl::StrCat("rank ", rank, ": ", what, " interrupted by abort: ", AbortReason()));
      }
      ncclResult_t state = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm, &state);
      if (r != ncclSuccess) state = r;
      if (state == ncclSuccess) return absl::OkStatus();
      if (state != ncclInProgress) {
        return FailLocked(
            absl::StatusCode::kUnavailable,
            absl::StrCat("rank ", rank, ": NCCL ", what, " failed: ", NcclText(state, comm)));
      }
      if (absl::Now() - start >= op_timeout) {
        return FailLocked(absl::StatusCode::kDeadlineExceeded,
                          absl::StrCat("rank ", rank, ": NCCL ", what, " was not posted within ",
                                       absl::FormatDuration(op_timeout)));
      }
      PollPause(start);
    }
  }
};

NcclCommunicator::NcclCommunicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

NcclCommunicator::~NcclCommunicator() = default;

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(
    ControlChannel& control, absl::Duration setup_timeout, absl::Duration op_timeout) {
  auto impl = std::make_unique<Impl>();
  impl->rank = control.rank();
  impl->world_size = control.world_size();
  impl->op_timeout = op_timeout;
  const std::string me = absl::StrCat("rank ", impl->rank, ": ");
  absl::StatusOr<AllReduceMode> mode = AllReduceModeFromEnv();
  if (!mode.ok()) return absl::InvalidArgumentError(absl::StrCat(me, mode.status().message()));
  impl->mode.store(*mode);
  auto cuda_error = [&](const char* call, cudaError_t e) {
    return absl::InternalError(absl::StrCat(me, call, ": ", cudaGetErrorString(e)));
  };

  int visible = 0;
  if (cudaError_t e = cudaGetDeviceCount(&visible); e != cudaSuccess) {
    return absl::FailedPreconditionError(
        absl::StrCat(me, "no usable CUDA device for NCCL: ", cudaGetErrorString(e)));
  }
  if (visible == 0) return absl::FailedPreconditionError(absl::StrCat(me, "no CUDA device"));
  if (control.local_world_size() > visible) {
    // Two ranks on one GPU would make NCCL fail or hang; upstream asserts the same.
    return absl::FailedPreconditionError(
        absl::StrCat(me, control.local_world_size(), " ranks on this host but only ", visible,
                     " visible CUDA device(s) (CUDA_VISIBLE_DEVICES)"));
  }
  impl->device = impl->rank % visible;
  if (cudaError_t e = cudaSetDevice(impl->device); e != cudaSuccess) {
    return cuda_error("cudaSetDevice", e);
  }
  int least = 0, greatest = 0;
  if (cudaError_t e = cudaDeviceGetStreamPriorityRange(&least, &greatest); e != cudaSuccess) {
    return cuda_error("cudaDeviceGetStreamPriorityRange", e);
  }
  // Upstream runs NCCL on a high-priority stream so that collectives are not queued behind compute.
  if (cudaError_t e = cudaStreamCreateWithPriority(&impl->stream, cudaStreamNonBlocking, greatest);
      e != cudaSuccess) {
    return cuda_error("cudaStreamCreateWithPriority", e);
  }
  if (cudaError_t e = cudaMalloc(&impl->scratch, sizeof(float)); e != cudaSuccess) {
    return cuda_error("cudaMalloc", e);
  }
  void* one = nullptr;
  if (cudaError_t e = cudaHostAlloc(&one, sizeof(int), cudaHostAllocDefault); e != cudaSuccess) {
    return cuda_error("cudaHostAlloc", e);
  }
  impl->abort_one = static_cast<int*>(one);
  *impl->abort_one = 1;
  if (cudaError_t e = cudaStreamCreateWithFlags(&impl->abort_stream, cudaStreamNonBlocking);
      e != cudaSuccess) {
    return cuda_error("cudaStreamCreateWithFlags", e);
  }
  void* flag = nullptr;
  if (cudaError_t e = cudaMalloc(&flag, sizeof(int)); e != cudaSuccess) {
    return cuda_error("cudaMalloc", e);
  }
  impl->abort_flag = static_cast<int*>(flag);
  if (cudaError_t e = cudaMemset(impl->abort_flag, 0, sizeof(int)); e != cudaSuccess) {
    return cuda_error("cudaMemset", e);
  }
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
    return cuda_error("cudaDeviceSynchronize", e);
  }

  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (impl->rank == 0) {
    if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
      // The peers learn of this when our control channel closes.
      return absl::InternalError(absl::StrCat(me, "ncclGetUniqueId: ", NcclText(r, nullptr)));
    }
  }
  auto blob =
      control.BroadcastBlob(std::string_view(id.internal, sizeof(id.internal)), setup_timeout);
  if (!blob.ok()) return blob.status();
  if (blob->size() != sizeof(id.internal)) {
    return absl::InternalError(absl::StrCat(me, "NCCL unique id from rank 0 has ", blob->size(),
                                            " bytes, want ", sizeof(id.internal)));
  }
  std::memcpy(id.internal, blob->data(), sizeof(id.internal));

  Impl* raw = impl.get();
  auto watch = AbortWatch::Create(control, setup_timeout,
                                  [raw](const std::string& reason) { raw->RequestAbort(reason); });
  if (!watch.ok()) return watch.status();
  impl->watch = std::move(*watch);

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // so that a missing peer is a timeout here, not a hang
  ncclResult_t r = ncclCommInitRankConfig(&impl->comm, impl->world_size, id, impl->rank, &config);
  absl::Time start = absl::Now();
  ncclResult_t state = r;
  while (state == ncclInProgress) {
    if (impl->abort_requested.load()) {
      absl::MutexLock lock(&impl->op_mu);
      impl->AbortCommLocked();
      return absl::AbortedError(
          absl::StrCat(me, "NCCL initialisation interrupted: ", impl->AbortReason()));
    }
    if (absl::Now() - start > setup_timeout) {
      absl::MutexLock lock(&impl->op_mu);
      impl->AbortCommLocked();
      return absl::DeadlineExceededError(
          absl::StrCat(me, "NCCL communicator initialisation did not finish within ",
                       absl::FormatDuration(setup_timeout), " (a peer is missing?)"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ncclResult_t q = ncclCommGetAsyncError(impl->comm, &state);
    if (q != ncclSuccess) state = q;
  }
  if (state != ncclSuccess) {
    std::string text = NcclText(state, impl->comm);
    absl::MutexLock lock(&impl->op_mu);
    impl->AbortCommLocked();
    impl->comm_gone = true;  // also when comm was never set
    return absl::InternalError(absl::StrCat(me, "ncclCommInitRankConfig: ", text));
  }
  PHI_LOG(INFO) << "rank " << impl->rank << ": NCCL communicator ready on cuda:" << impl->device
                << ", world " << impl->world_size;
  // Every rank takes part (the group must agree even when this rank's mode is nccl).
  if (impl->world_size > 1) {
    CustomAllReduce::Options co;
    co.device = impl->device;
    co.wanted = *mode != AllReduceMode::kNccl;
    co.setup_timeout = setup_timeout;
    co.op_timeout = op_timeout;
    co.abort_flag = impl->abort_flag;
    std::string why_not;
    auto car = CustomAllReduce::Create(control, co, &why_not);
    if (!car.ok()) return car.status();
    impl->car = std::move(*car);
    if (impl->car == nullptr && *mode != AllReduceMode::kNccl) {
      PHI_LOG(INFO) << "rank " << impl->rank
                    << ": PHISHARD_TP_ALLREDUCE=" << AllReduceModeName(*mode)
                    << " but the custom all-reduce is unavailable (" << why_not
                    << "): NCCL runs every all-reduce";
    }
    if (impl->car != nullptr) {
      // The copy-engine all-reduce rides on the custom one's buffers. The ranks must agree on
      // using it: each sends whether its mode asks for it ('1'/'0') and why it cannot run.
      std::string ce_why;
      impl->ce = CopyEngineAllReduce::Create(*impl->car, impl->device, &ce_why);
      const char want = *mode == AllReduceMode::kCopy ? '1' : '0';
      auto all = control.AllGather(std::string(1, want) + ce_why, setup_timeout);
      if (!all.ok()) return all.status();
      for (int r = 0; r < impl->world_size && ce_why.empty(); ++r) {
        const std::string& theirs = (*all)[r];
        if (theirs.empty() || theirs[0] != want) {
          ce_why = absl::StrCat("rank ", r, " has another PHISHARD_TP_ALLREDUCE");
        } else if (theirs.size() > 1) {
          ce_why = absl::StrCat("rank ", r, ": ", theirs.substr(1));
        }
      }
      if (!ce_why.empty()) {
        impl->ce.reset();
        if (*mode == AllReduceMode::kCopy) {
          PHI_LOG(INFO) << "rank " << impl->rank << ": PHISHARD_TP_ALLREDUCE=copy but the "
                        << "copy-engine all-reduce is unavailable (" << ce_why
                        << "): the custom kernel runs the overlapped all-reduces";
        }
      }
    }
  }
  return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(std::move(impl)));
}

int NcclCommunicator::rank() const { return impl_->rank; }
int NcclCommunicator::world_size() const { return impl_->world_size; }
void* NcclCommunicator::stream() const { return impl_->stream; }
int NcclCommunicator::device() const { return impl_->device; }

absl::Status NcclCommunicator::AllReduceSum(float* data, size_t count) {
  absl::MutexLock lock(&impl_->op_mu);
  const std::string what = absl::StrCat("all-reduce of ", count, " floats");
  if (absl::Status s = impl_->BeginLocked(what); !s.ok() || count == 0) return s;
  ncclResult_t r =
      ncclAllReduce(data, data, count, ncclFloat32, ncclSum, impl_->comm, impl_->stream);
  return impl_->WaitLocked(what, r);
}

absl::Status NcclCommunicator::AllGather(const float* send, float* recv, size_t count) {
  const int world = impl_->world_size;
  const float* own_slot = recv + static_cast<size_t>(impl_->rank) * count;
  if (send != own_slot && send < recv + world * count && recv < send + count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", impl_->rank, ": AllGather send buffer overlaps recv other than in place"));
  }
  absl::MutexLock lock(&impl_->op_mu);
  const std::string what = absl::StrCat("all-gather of ", count, " floats");
  if (absl::Status s = impl_->BeginLocked(what); !s.ok() || count == 0) return s;
  ncclResult_t r = ncclAllGather(send, recv, count, ncclFloat32, impl_->comm, impl_->stream);
  return impl_->WaitLocked(what, r);
}

absl::Status NcclCommunicator::Broadcast(void* data, size_t bytes, int root) {
  if (root < 0 || root >= impl_->world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", impl_->rank, ": broadcast root ", root,
                                                   " not in [0, ", impl_->world_size, ")"));
  }
  absl::MutexLock lock(&impl_->op_mu);
  const std::string what = absl::StrCat("broadcast of ", bytes, " bytes from rank ", root);
  if (absl::Status s = impl_->BeginLocked(what); !s.ok() || bytes == 0) return s;
  ncclResult_t r = ncclBroadcast(data, data, bytes, ncclUint8, root, impl_->comm, impl_->stream);
  return impl_->WaitLocked(what, r);
}

absl::Status NcclCommunicator::Barrier() {
  absl::MutexLock lock(&impl_->op_mu);
  if (absl::Status s = impl_->BeginLocked("barrier"); !s.ok()) return s;
  ncclResult_t r = ncclAllReduce(impl_->scratch, impl_->scratch, 1, ncclFloat32, ncclSum,
                                 impl_->comm, impl_->stream);
  return impl_->WaitLocked("barrier", r);
}

absl::Status NcclCommunicator::EnqueueAllReduceSum(void* data, size_t count, DataType dtype,
                                                   void* stream) {
  absl::MutexLock lock(&impl_->op_mu);
  if (absl::Status s = impl_->BeginLocked("all-reduce"); !s.ok() || count == 0) return s;
  if (impl_->UseCustom(count, dtype)) {
    absl::Status s = impl_->car->Enqueue(data, count, dtype, static_cast<cudaStream_t>(stream));
    return s.ok() ? s : impl_->FailLocked(s.code(), std::string(s.message()));
  }
  ncclResult_t r = ncclAllReduce(data, data, count, NcclType(dtype), ncclSum, impl_->comm,
                                 static_cast<cudaStream_t>(stream));
  return impl_->PostedLocked(
      absl::StrCat("all-reduce of ", count, " ", DataTypeName(dtype), " elements"), r);
}

absl::Status NcclCommunicator::EnqueueOverlappedAllReduceSum(void* data, size_t count,
                                                             DataType dtype, void* stream) {
  {
    absl::MutexLock lock(&impl_->op_mu);
    if (impl_->UseCopyEngine()) {
      if (absl::Status s = impl_->BeginLocked("all-reduce"); !s.ok() || count == 0) return s;
      absl::Status s = impl_->ce->Enqueue(data, count, dtype, static_cast<cudaStream_t>(stream));
      // A refused capture enqueued nothing: the group is still in step.
      if (s.ok() || s.code() == absl::StatusCode::kFailedPrecondition) return s;
      return impl_->FailLocked(s.code(), std::string(s.message()));
    }
  }
  return EnqueueAllReduceSum(data, count, dtype, stream);
}

absl::Status NcclCommunicator::EnqueueAllGather(const void* send, void* recv, size_t count,
                                                DataType dtype, void* stream) {
  const size_t esize = DataTypeSize(dtype);
  const char* s_begin = static_cast<const char*>(send);
  const char* r_begin = static_cast<const char*>(recv);
  const char* own_slot = r_begin + static_cast<size_t>(impl_->rank) * count * esize;
  if (s_begin != own_slot && s_begin < r_begin + impl_->world_size * count * esize &&
      r_begin < s_begin + count * esize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", impl_->rank, ": all-gather send buffer overlaps recv other than in place"));
  }
  absl::MutexLock lock(&impl_->op_mu);
  if (absl::Status s = impl_->BeginLocked("all-gather"); !s.ok() || count == 0) return s;
  ncclResult_t r = ncclAllGather(send, recv, count, NcclType(dtype), impl_->comm,
                                 static_cast<cudaStream_t>(stream));
  return impl_->PostedLocked(
      absl::StrCat("all-gather of ", count, " ", DataTypeName(dtype), " elements"), r);
}

absl::Status NcclCommunicator::SyncStream(void* stream) {
  absl::MutexLock lock(&impl_->op_mu);
  if (absl::Status s = impl_->BeginLocked("step"); !s.ok()) return s;
  // A whole decode step is a few ms: yield-spin through it (as cudaStreamSynchronize would).
  absl::Status s = impl_->WaitLocked("step", ncclSuccess, static_cast<cudaStream_t>(stream),
                                     absl::Milliseconds(200));
  if (!s.ok() || impl_->car == nullptr) return s;
  // A custom all-reduce that gave up waiting (timeout; an abort is reported above) left a code.
  if (absl::Status e = impl_->car->CheckError(); !e.ok()) {
    const std::string reason = impl_->AbortReason();
    return impl_->FailLocked(e.code(), reason.empty() ? std::string(e.message())
                                                      : absl::StrCat(e.message(), ": ", reason));
  }
  return s;
}

bool NcclCommunicator::custom_all_reduce_ready() const { return impl_->car != nullptr; }

bool NcclCommunicator::UsesCustomAllReduce(size_t count, DataType dtype) const {
  return impl_->UseCustom(count, dtype);
}

bool NcclCommunicator::copy_engine_all_reduce_ready() const { return impl_->ce != nullptr; }

bool NcclCommunicator::UsesCopyEngineAllReduce() const { return impl_->UseCopyEngine(); }

void NcclCommunicator::set_copy_engine_piece_bytes(size_t bytes) {
  if (impl_->ce != nullptr) impl_->ce->set_piece_bytes(bytes);
}

void NcclCommunicator::set_all_reduce_mode(AllReduceMode mode) { impl_->mode.store(mode); }

void NcclCommunicator::Abort(const std::string& reason) {
  impl_->RequestAbort(reason);
  impl_->watch->Trigger(reason);
  // A collective in flight sees the flag within one poll step, aborts the comm and releases the
  // lock; otherwise we abort it here. Either way ncclCommAbort runs on one thread only.
  absl::MutexLock lock(&impl_->op_mu);
  cudaSetDevice(impl_->device);
  impl_->AbortCommLocked();
}

}  // namespace phishard
