#include "kernels/sgmv.h"

#include <cblas.h>

namespace phishard {
namespace {

// Checks the segment table shared by shrink and expand: starts non-decreasing inside
// [0, num_rows], ranks in [0, ldt].
KernelStatus CheckSegments(const int32_t* seg_starts, const int32_t* ranks, int num_segments,
                           int num_rows, int ldt) {
  if (num_segments < 0 || num_rows < 0) return KernelStatus::kInvalidShape;
  if (num_segments == 0) return KernelStatus::kOk;
  if (seg_starts == nullptr || ranks == nullptr) return KernelStatus::kNullPointer;
  if (seg_starts[0] < 0) return KernelStatus::kInvalidShape;
  for (int s = 0; s < num_segments; ++s) {
    if (seg_starts[s + 1] < seg_starts[s] || seg_starts[s + 1] > num_rows) {
      return KernelStatus::kInvalidShape;
    }
    if (ranks[s] < 0 || ranks[s] > ldt) return KernelStatus::kInvalidShape;
  }
  return KernelStatus::kOk;
}

}  // namespace

KernelStatus SgmvShrinkCpu(const SgmvShrinkParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.in <= 0 || p.ldt <= 0) return KernelStatus::kInvalidShape;
  const int ldx = p.ldx == 0 ? p.in : p.ldx;
  if (ldx < p.in) return KernelStatus::kInvalidShape;
  const KernelStatus st = CheckSegments(p.seg_starts, p.ranks, p.num_segments, p.num_rows, p.ldt);
  if (st != KernelStatus::kOk || p.num_segments == 0) return st;
  if (p.a == nullptr) return KernelStatus::kNullPointer;
  const auto* x = static_cast<const float*>(p.x);
  for (int s = 0; s < p.num_segments; ++s) {
    const int begin = p.seg_starts[s], rows = p.seg_starts[s + 1] - begin, r = p.ranks[s];
    if (rows == 0 || r == 0 || p.a[s] == nullptr) continue;
    if (x == nullptr || p.t == nullptr) return KernelStatus::kNullPointer;
    // t[rows, r] = x[rows, in] · A[r, in]ᵀ
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, r, p.in, 1.0f,
                x + static_cast<size_t>(begin) * ldx, ldx, static_cast<const float*>(p.a[s]), p.in,
                0.0f, p.t + static_cast<size_t>(begin) * p.ldt, p.ldt);
  }
  return KernelStatus::kOk;
}

KernelStatus SgmvExpandCpu(const SgmvExpandParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.out <= 0 || p.ldt <= 0) return KernelStatus::kInvalidShape;
  const int ldy = p.ldy == 0 ? p.out : p.ldy;
  if (ldy < p.out) return KernelStatus::kInvalidShape;
  const KernelStatus st = CheckSegments(p.seg_starts, p.ranks, p.num_segments, p.num_rows, p.ldt);
  if (st != KernelStatus::kOk || p.num_segments == 0) return st;
  if (p.b == nullptr) return KernelStatus::kNullPointer;
  auto* y = static_cast<float*>(p.y);
  for (int s = 0; s < p.num_segments; ++s) {
    const int begin = p.seg_starts[s], rows = p.seg_starts[s + 1] - begin, r = p.ranks[s];
    if (rows == 0 || r == 0 || p.b[s] == nullptr) continue;
    if (y == nullptr || p.t == nullptr) return KernelStatus::kNullPointer;
    const float scale = p.scales == nullptr ? 1.0f : p.scales[s];
    // y[rows, out] += scale · t[rows, r] · B[out, r]ᵀ
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, p.out, r, scale,
                p.t + static_cast<size_t>(begin) * p.ldt, p.ldt, static_cast<const float*>(p.b[s]),
                r, 1.0f, y + static_cast<size_t>(begin) * ldy, ldy);
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
