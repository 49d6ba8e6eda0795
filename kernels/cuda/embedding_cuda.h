// CUDA entry point of the embedding gather (kernels/embedding.h). Device pointers.
// kF32, kF16, kBF16. Ids live in device memory, so they are not validated here: an id outside
// [row_offset, row_offset + num_rows) — a negative one included — gives a zero row. The model
// validates token ids on the host before upload.
#pragma once

#include "kernels/device.h"
#include "kernels/embedding.h"

namespace phishard {

KernelStatus EmbeddingCuda(const EmbeddingParams& p, cudaStream_t stream);

}  // namespace phishard
