#include "kernels/gelu.h"

#include <cstddef>

namespace phishard {

KernelStatus GeluInPlaceCpu(const GeluInPlaceParams& p) {
  const int ld = p.ld == 0 ? p.cols : p.ld;
  if (p.rows < 0 || p.cols <= 0 || ld < p.cols || p.act == GemmEpilogue::kNone) {
    return KernelStatus::kInvalidShape;
  }
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.rows == 0) return KernelStatus::kOk;
  if (p.y == nullptr) return KernelStatus::kNullPointer;
  float (*act)(float) = p.act == GemmEpilogue::kGeluTanh ? GeluTanh : GeluErf;
  auto* y = static_cast<float*>(p.y);
  for (int r = 0; r < p.rows; ++r) {
    float* row = y + static_cast<size_t>(r) * ld;
    for (int c = 0; c < p.cols; ++c) row[c] = act(row[c]);
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
