#include "kernels/lora_expand_act.h"

#include <cstddef>

namespace phishard {

KernelStatus LoraExpandActCheck(const LoraExpandActParams& p) {
  if (p.num_segments < 0 || p.num_segments > kLoraExpandActMaxSegments || p.n < 0 || p.ldy < p.n ||
      p.t_col < 0 || p.ldt < 0 || p.ldb < 0) {
    return KernelStatus::kInvalidShape;
  }
  bool any_k = false;
  for (int s = 0; s < p.num_segments; ++s) {
    const LoraExpandActSegment& g = p.segments[s];
    if (g.row < 0 || g.rows < 0 || g.k < 0 || g.k % 8 != 0 || g.b_col < 0) {
      return KernelStatus::kInvalidShape;
    }
    if (g.k > 0 && (p.t_col + g.k > p.ldt || g.b_col + g.k > p.ldb)) {
      return KernelStatus::kInvalidShape;
    }
    any_k = any_k || (g.k > 0 && g.rows > 0);
  }
  if (p.num_segments > 0 && p.y == nullptr) return KernelStatus::kNullPointer;
  if (any_k && p.n > 0 && (p.t == nullptr || p.b == nullptr)) return KernelStatus::kNullPointer;
  return KernelStatus::kOk;
}

KernelStatus LoraExpandActCpu(const LoraExpandActParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (KernelStatus st = LoraExpandActCheck(p); st != KernelStatus::kOk) return st;
  auto* y = static_cast<float*>(p.y);
  const auto* t = static_cast<const float*>(p.t);
  const auto* b = static_cast<const float*>(p.b);
  for (int s = 0; s < p.num_segments; ++s) {
    const LoraExpandActSegment& g = p.segments[s];
    for (int i = g.row; i < g.row + g.rows; ++i) {
      for (int c = 0; c < p.n; ++c) {
        float& out = y[static_cast<size_t>(i) * p.ldy + c];
        double acc = out;
        for (int k = 0; k < g.k; ++k) {
          acc += static_cast<double>(t[static_cast<size_t>(i) * p.ldt + p.t_col + k]) *
                 b[static_cast<size_t>(c) * p.ldb + g.b_col + k];
        }
        const float v = static_cast<float>(acc);
        out = p.act == GemmEpilogue::kGeluTanh  ? GeluTanh(v)
              : p.act == GemmEpilogue::kGeluErf ? GeluErf(v)
                                                : v;
      }
    }
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
