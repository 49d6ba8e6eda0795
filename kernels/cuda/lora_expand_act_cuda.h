// CUDA entry of kernels/lora_expand_act.h: fc1's LoRA delta + GELU in one read and one write of
// the pre-activation (tensor cores, mma.sync m16n8k16, float32 accumulation).
#pragma once

#include "kernels/device.h"
#include "kernels/lora_expand_act.h"

namespace phishard {

// kF16 / kBF16 (kUnsupportedDtype otherwise). Besides LoraExpandActCheck: kInvalidShape unless
// n, ldy, ldt, t_col, ldb and every b_col are multiples of 8 and y, t, b 16-byte aligned (the
// fragments load 8 elements of a row of T / a column of B at a time), or rows_per_block is not
// 0, 32, 64 or 128.
KernelStatus LoraExpandActCuda(const LoraExpandActParams& p, cudaStream_t stream);

}  // namespace phishard
