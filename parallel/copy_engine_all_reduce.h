// CopyEngineAllReduce: the two-rank all-reduce (sum) of a tensor-parallel group done mostly by the
// copy engines, for all-reduces that run on a side stream beside compute (the overlapped sharded
// prefill, model/cuda_phi_tp_overlap.cc). The custom all-reduce (custom_all_reduce.h) keeps a
// grid of SMs busy for the whole call, pushing and spinning; beside SM-filling GEMMs its blocks
// and the GEMM's wait for each other. Here, per call on the caller's stream, each rank:
//   1. cudaMemcpyAsync of its partial into the peer's receive half `epoch & 1` (CUDA IPC mapping
//      over NVLink: a copy engine, no SM);
//   2. cuStreamWriteValue32 of the call's epoch into the peer's arrival flag (the driver fences
//      the stream's earlier writes, the copy included, before the write);
//   3. a one-warp kernel waits for its own flag to reach the epoch (abort and timeout end it),
//      then an add kernel: data[i] = round(float(data[i]) + float(received[i])) — the same bits
//      as NCCL's and the custom kernel's two-rank sum, on both ranks.
// Calls larger than a receive half go as consecutive pieces, each its own call. A rank pushes into
// a half again only two calls later, after its wait of the call between, which the peer's stream
// signalled after its add of the older call: calls must run one after another on the device (one
// stream, as the overlapped prefill's communication stream does).
// The epoch is a host counter, so the calls cannot be captured into CUDA graphs (refused).
// Buffers, flag, abort flag and error word are the custom all-reduce's (its CopyEngineRegion);
// errors surface through CustomAllReduce::CheckError like its own. Built only with CUDA.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "parallel/custom_all_reduce.h"

namespace phishard {

class CopyEngineAllReduce {
 public:
  // Local: nullptr with the reason in *why_not when the driver's stream memory operations cannot
  // be found. The group must agree on the answer (NcclCommunicator::Create exchanges it).
  static std::unique_ptr<CopyEngineAllReduce> Create(const CustomAllReduce& car, int device,
                                                     std::string* why_not);

  // Enqueues the all-reduce of `data` ([count] device, dtype; summed in place) on `stream`.
  // FAILED_PRECONDITION when `stream` is capturing; INTERNAL on a CUDA or driver error.
  absl::Status Enqueue(void* data, size_t count, DataType dtype, cudaStream_t stream);

  // Bytes a call moves at most before it is split (default: a whole receive half); tests set it
  // small to exercise the pieces. Clamped to [16, half]; both ranks must set the same value.
  void set_piece_bytes(size_t bytes);
  size_t piece_bytes() const { return piece_bytes_; }
  uint32_t calls() const { return epoch_.load(); }  // pieces enqueued so far

 private:
  CopyEngineAllReduce() = default;

  CustomAllReduce::CopyEngineRegion region_;
  int device_ = 0;
  int add_blocks_ = 0;  // the add's grid: one block per SM
  size_t piece_bytes_ = 0;
  std::atomic<uint32_t> epoch_{0};
  void* write_value32_ = nullptr;  // cuStreamWriteValue32 (driver entry point; cuda.h type in .cc)
};

}  // namespace phishard
