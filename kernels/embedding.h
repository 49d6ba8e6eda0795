// Embedding gather: out[t, :] = table[ids[t] - row_offset, :].
// The table holds rows [row_offset, row_offset + num_rows) of the full vocabulary, so a
// vocab-parallel rank passes its slice; an id outside that range gives a zero row (the all-reduce
// over ranks then sums exactly one non-zero row). With row_offset 0 and num_rows = V this is a
// plain gather, and it is also how the model gathers the hidden rows that need logits.
// An id < 0 is kOutOfRange (nothing written): it is never a valid token of any rank.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_status.h"

namespace phishard {

struct EmbeddingParams {
  const int32_t* ids = nullptr;  // [num_tokens]
  const void* table = nullptr;   // [num_rows, dim] row-major, dtype
  void* out = nullptr;           // [num_tokens, dim] row-major, dtype; must not alias table
  int num_tokens = 0;
  int num_rows = 0;
  int dim = 0;
  int row_offset = 0;  // first vocabulary id held by `table`
  DataType dtype = DataType::kF32;
};

// Host memory, kF32 only.
KernelStatus EmbeddingCpu(const EmbeddingParams& p);

}  // namespace phishard
