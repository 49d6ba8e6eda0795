#include "parallel/copy_engine_all_reduce.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/copy_engine_all_reduce_cuda.h"

namespace phishard {

std::unique_ptr<CopyEngineAllReduce> CopyEngineAllReduce::Create(const CustomAllReduce& car,
                                                                 int device, std::string* why_not) {
  why_not->clear();
  std::unique_ptr<CopyEngineAllReduce> ce(new CopyEngineAllReduce());
  ce->region_ = car.copy_engine_region();
  ce->device_ = device;
  ce->piece_bytes_ = ce->region_.capacity;
  int sms = 0;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      e != cudaSuccess) {
    *why_not = absl::StrCat("cudaDeviceGetAttribute: ", cudaGetErrorString(e));
    return nullptr;
  }
  ce->add_blocks_ = std::max(1, sms);
  // Loaded now: a first launch of the add while this rank's wait spins would stall the abort.
  if (LoadCopyEngineKernelsCuda() != KernelStatus::kOk) {
    *why_not = absl::StrCat("loading its kernels: ", cudaGetErrorString(cudaGetLastError()));
    return nullptr;
  }
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  // 11070: the version whose signature cudaTypedefs.h names PFN_cuStreamWriteValue32_v11070.
  if (cudaError_t e = cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", &fn, 11070,
                                                       cudaEnableDefault, &found);
      e != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
    cudaGetLastError();
    *why_not = absl::StrCat("the driver has no cuStreamWriteValue32 (",
                            e != cudaSuccess ? cudaGetErrorString(e) : "symbol not found", ")");
    return nullptr;
  }
  ce->write_value32_ = fn;
  return ce;
}

void CopyEngineAllReduce::set_piece_bytes(size_t bytes) {
  piece_bytes_ = std::clamp<size_t>(bytes / 16 * 16, 16, region_.capacity);
}

absl::Status CopyEngineAllReduce::Enqueue(void* data, size_t count, DataType dtype,
                                          cudaStream_t stream) {
  const std::string me = absl::StrCat("rank ", region_.rank, ": copy-engine all-reduce of ", count,
                                      " ", DataTypeName(dtype), " elements: ");
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaError_t e = cudaStreamIsCapturing(stream, &capture); e != cudaSuccess) {
    return absl::InternalError(absl::StrCat(me, "cudaStreamIsCapturing: ", cudaGetErrorString(e)));
  }
  if (capture != cudaStreamCaptureStatusNone) {
    return absl::FailedPreconditionError(
        absl::StrCat(me, "cannot be captured into a CUDA graph (its call numbers are host-side)"));
  }
  const size_t es = DataTypeSize(dtype);
  const size_t piece_elems = std::max<size_t>(1, piece_bytes_ / es);
  auto write = reinterpret_cast<PFN_cuStreamWriteValue32_v11070>(write_value32_);
  char* bytes = static_cast<char*>(data);
  for (size_t done = 0; done < count;) {
    const size_t n = std::min(piece_elems, count - done);
    const uint32_t epoch = epoch_.fetch_add(1) + 1;
    const size_t half = static_cast<size_t>(epoch & 1) * region_.capacity;
    void* piece = bytes + done * es;
    // 1. this rank's partial -> the peer's receive half (a copy engine over NVLink).
    if (cudaError_t e = cudaMemcpyAsync(region_.peer_recv + half, piece, n * es,
                                        cudaMemcpyDeviceToDevice, stream);
        e != cudaSuccess) {
      return absl::InternalError(absl::StrCat(me, "cudaMemcpyAsync: ", cudaGetErrorString(e)));
    }
    // 2. the peer's arrival flag, written after the copy (default flags: fenced after it).
    if (CUresult r =
            write(static_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(region_.peer_flag),
                  epoch, CU_STREAM_WRITE_VALUE_DEFAULT);
        r != CUDA_SUCCESS) {
      return absl::InternalError(absl::StrCat(me, "cuStreamWriteValue32: CUresult ", r));
    }
    // 3. wait for the peer's copy of this call, then add it.
    CopyEngineAddParams p;
    p.data = piece;
    p.received = region_.own_recv + half;
    p.count = n;
    p.dtype = dtype;
    p.own_flag = region_.own_flag;
    p.epoch = epoch;
    p.abort_flag = region_.abort_flag;
    p.error = region_.error;
    p.timeout_ns = region_.timeout_ns;
    p.blocks = add_blocks_;
    if (KernelStatus k = CopyEngineWaitAddCuda(p, stream); k != KernelStatus::kOk) {
      std::string text = KernelStatusName(k);
      if (k == KernelStatus::kDeviceError) {
        absl::StrAppend(&text, ": ", cudaGetErrorString(cudaGetLastError()));
      }
      return absl::InternalError(absl::StrCat(me, text));
    }
    done += n;
  }
  return absl::OkStatus();
}

}  // namespace phishard
