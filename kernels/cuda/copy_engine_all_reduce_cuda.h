// The SM side of the copy-engine all-reduce of a two-rank group
// (parallel/copy_engine_all_reduce.h): the copy engine has pushed this rank's partial into the
// peer's receive buffer and the driver has written the call's epoch into the peer's arrival flag
// (both on the same stream, before this launch); the peer did the same towards us. Here, on that
// stream:
//   1. wait: one thread spins until this rank's arrival flag reaches `epoch` (the peer's copy of
//      this call is complete), ending early on *abort_flag or after timeout_ns with an error code
//      in *error, as the custom all-reduce's barrier does (kernels/cuda/peer_sync.cuh);
//   2. add: data[i] = round(float(data[i]) + float(received[i])) over the whole grid.
// Step 1 is a kernel of one warp, not a stream wait, so that an abort or the deadline ends it:
// it holds one SM slot while it waits, the add only SMs once the data is there.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct CopyEngineAddParams {
  void* data = nullptr;            // [count] device, dtype: in this rank's partial, out the sum
  const void* received = nullptr;  // [count] device, dtype: the peer's partial (its copy)
  size_t count = 0;
  DataType dtype = DataType::kBF16;
  const uint32_t* own_flag = nullptr;  // device uint32, written by the peer's stream
  uint32_t epoch = 0;                  // this call's number (the same on both ranks)
  const int* abort_flag = nullptr;     // device int; nonzero: give up
  int* error = nullptr;                // mapped host int (device address): kCustomAllReduce* codes
  unsigned long long timeout_ns = 0;   // of the wait
  int blocks = 0;                      // grid of the add (grid-stride), >= 1
};

// kNullPointer / kInvalidShape (blocks < 1) / kUnsupportedDtype; count == 0 launches nothing.
// `data` and `received` 16-byte aligned with a multiple of 16 bytes move 16-byte packs.
KernelStatus CopyEngineWaitAddCuda(const CopyEngineAddParams& p, cudaStream_t stream);

// Loads the kernels CopyEngineWaitAddCuda launches (every dtype) now. Under CUDA's lazy module
// loading (the default) a kernel's first launch loads it, and a load while this GPU runs a kernel
// that waits for the peer stalls the launching thread — and the abort that should end that wait
// — until the wait's deadline (perf-log 2026-11-29 16:40: AbortEndsThePeersWait passed only with
// CUDA_MODULE_LOADING=EAGER). kDeviceError when a load fails.
KernelStatus LoadCopyEngineKernelsCuda();

}  // namespace phishard
