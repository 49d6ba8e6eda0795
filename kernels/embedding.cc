#include "kernels/embedding.h"

#include <cstring>

namespace phishard {

KernelStatus EmbeddingCpu(const EmbeddingParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.num_tokens < 0 || p.num_rows < 0 || p.dim <= 0) return KernelStatus::kInvalidShape;
  if (p.num_tokens == 0) return KernelStatus::kOk;
  if (p.ids == nullptr || p.out == nullptr || (p.table == nullptr && p.num_rows > 0)) {
    return KernelStatus::kNullPointer;
  }
  for (int t = 0; t < p.num_tokens; ++t) {
    if (p.ids[t] < 0) return KernelStatus::kOutOfRange;
  }
  const auto* table = static_cast<const float*>(p.table);
  auto* out = static_cast<float*>(p.out);
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(p.dim);
  for (int t = 0; t < p.num_tokens; ++t) {
    const int64_t local = static_cast<int64_t>(p.ids[t]) - p.row_offset;
    float* dst = out + static_cast<size_t>(t) * p.dim;
    if (local >= 0 && local < p.num_rows) {
      std::memcpy(dst, table + static_cast<size_t>(local) * p.dim, row_bytes);
    } else {
      std::memset(dst, 0, row_bytes);
    }
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
