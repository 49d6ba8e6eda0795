// One-shot peer-to-peer all-reduce (sum) of two ranks whose GPUs can address each other's memory
// (CUDA IPC over NVLink): parallel/custom_all_reduce.h sets up the buffers and calls this.
//
// Per call, every block b of the fixed grid (same on both ranks, same for every call: the per-block
// call counters must advance together) does, on each rank:
//   1. push: its grid-stride share of this rank's `data` -> the peer's receive buffer (remote
//      stores over NVLink), half `epoch & 1` of it;
//   2. barrier: st.release.sys of the block's call counter `epoch` into the peer's flag b, then
//      spin until this rank's flag b (written by the peer's block b) reaches `epoch`;
//   3. sum: data[i] = round(float(data[i]) + float(received[i])), the same share as in 1, so the
//      block reads exactly what the peer's block b wrote before releasing its flag.
// The sum of two values is commutative, so both ranks get the same bits, and they are the bits of
// NCCL's two-rank sum (one rounding of the float sum of the two partials).
// Two receive halves alternate by call: a rank writes half p again only two calls later, after
// its block passed the barrier of the call in between, i.e. after the peer finished every read of
// the older call (stream order). Flags compare as `(int32)(flag - epoch) >= 0`, so a peer that is
// already one call ahead still releases the waiter.
// The spin never hangs: it ends when *abort_flag (device memory, which the communicator's abort
// sets by a copy on a stream of its own) turns nonzero or after timeout_ns (%globaltimer), writing
// an error code to *error (mapped host memory) that the host checks once the stream is idle; the
// block then returns.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

inline constexpr int kCustomAllReduceMaxBlocks = 1024;
inline constexpr int kCustomAllReduceThreads = 512;

// Values the kernel writes to CustomAllReduceParams::error.
inline constexpr int kCustomAllReduceOk = 0;
inline constexpr int kCustomAllReduceTimedOut = 1;  // the peer's flag did not come in time
inline constexpr int kCustomAllReduceAborted = 2;   // *abort_flag was set while waiting

struct CustomAllReduceParams {
  void* data = nullptr;  // [count] device, dtype: in this rank's partial, out the two-rank sum
  size_t count = 0;
  DataType dtype = DataType::kBF16;
  void* peer_recv = nullptr;            // [2][capacity_bytes] the peer's receive halves (mapped)
  const void* own_recv = nullptr;       // [2][capacity_bytes] this rank's, written by the peer
  size_t capacity_bytes = 0;            // of one half; count * DataTypeSize(dtype) must fit
  uint32_t* peer_flags = nullptr;       // [blocks] the peer's arrival flags (mapped)
  const uint32_t* own_flags = nullptr;  // [blocks] this rank's, written by the peer's blocks
  uint32_t* epochs = nullptr;           // [blocks] device, this rank's call counter per block
  const int* abort_flag = nullptr;      // device int; nonzero: give up
  int* error = nullptr;                 // mapped host int (device address), see above
  unsigned long long timeout_ns = 0;    // of one block's wait for its peer block
  int blocks = 0;                       // the fixed grid, <= kCustomAllReduceMaxBlocks
};

// kNullPointer / kInvalidShape (count too large for the halves, blocks out of range) /
// kUnsupportedDtype; count == 0 launches nothing. `data` 16-byte aligned with a multiple of 16
// bytes moves 16-byte packs, anything else single elements.
KernelStatus CustomAllReduceCuda(const CustomAllReduceParams& p, cudaStream_t stream);

// Loads CustomAllReduceCuda's kernels (every dtype) now, for the reason LoadCopyEngineKernelsCuda
// gives (kernels/cuda/copy_engine_all_reduce_cuda.h). kDeviceError when a load fails.
KernelStatus LoadCustomAllReduceKernelsCuda();

}  // namespace phishard
