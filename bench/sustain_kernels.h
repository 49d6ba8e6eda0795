// Streaming kernels on the SMs for phishard_kernel_bench's sustained mode (bench/sustain.h): the
// floor an SM kernel can reach in joules per byte, against the driver's device-to-device copy
// (whichever engine runs it) and the decode attention. 16-byte `ld.global.nc.L1::no_allocate`
// loads, 4 in flight a thread, 8 blocks of 256 threads an SM, grid-stride over the buffer.
// `bytes` a multiple of 16, buffers 16-byte aligned; `sms` sizes the grid; `sink` (device
// uint32[256]) is written only for values random data does not give (keeps the loads live).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace phishard::bench {

// dst = src: reads and writes `bytes` each.
void SmCopy(const void* src, void* dst, size_t bytes, int sms, cudaStream_t s);
// Reads `bytes`, folds the words by xor (~0.06 integer ops a byte).
void SmRead(const void* src, size_t bytes, uint32_t* sink, int sms, cudaStream_t s);
// Reads `bytes` as bf16, one float conversion and one FMA an element (the decode attention's
// arithmetic per K or V byte, without its shuffles, softmax and addressing).
void SmReadFma(const void* src, size_t bytes, uint32_t* sink, int sms, cudaStream_t s);

}  // namespace phishard::bench
