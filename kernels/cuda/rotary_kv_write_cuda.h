// CUDA entry point of the fused partial rotary + paged K/V write (kernels/rotary_kv_write.h).
// Device pointers; kF32, kF16, kBF16. One kernel: Q and K heads are rotated in place in qkv
// (cos/sin in float32, one rounding to the storage type per element), then the rotated K and
// the V of each token are copied to its slot.
// Deviation from the CPU reference: slots and positions live in device memory, so they are not
// validated before writing; a token whose slot is outside [0, num_slots) is rotated but not
// written to the cache. The model validates slots on the host before upload.
#pragma once

#include "kernels/device.h"
#include "kernels/rotary_kv_write.h"

namespace phishard {

KernelStatus RotaryKvWriteCuda(const RotaryKvWriteParams& p, cudaStream_t stream);

}  // namespace phishard
