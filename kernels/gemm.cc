#include "kernels/gemm.h"

#include <cblas.h>

#include <cmath>
#include <cstring>

namespace phishard {

float GeluTanh(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

float GeluErf(float x) {
  constexpr float kInvSqrt2 = 0.7071067811865476f;
  return 0.5f * x * (1.0f + std::erf(x * kInvSqrt2));
}

KernelStatus GemmCpu(const GemmParams& p) {
  if (p.dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.batch < 1 || (p.batch > 1 && p.bias != nullptr)) return KernelStatus::kInvalidShape;
  if (p.batch > 1) {
    for (int i = 0; i < p.batch; ++i) {
      GemmParams q = p;
      q.batch = 1;
      q.x = static_cast<const float*>(p.x) + i * p.batch_stride_x;
      q.w = static_cast<const float*>(p.w) + i * p.batch_stride_w;
      q.y = static_cast<float*>(p.y) + i * p.batch_stride_y;
      if (KernelStatus st = GemmCpu(q); st != KernelStatus::kOk) return st;
    }
    return KernelStatus::kOk;
  }
  if (p.m < 0 || p.n <= 0 || p.k <= 0) return KernelStatus::kInvalidShape;
  const int ldx = p.ldx == 0 ? p.k : p.ldx;
  const int ldy = p.ldy == 0 ? p.n : p.ldy;
  const int ldw = p.ldw == 0 ? p.k : p.ldw;
  if (ldx < p.k || ldy < p.n || ldw < p.k) return KernelStatus::kInvalidShape;
  if (p.m == 0) return KernelStatus::kOk;
  if (!p.x || !p.w || !p.y) return KernelStatus::kNullPointer;

  const auto* x = static_cast<const float*>(p.x);
  const auto* w = static_cast<const float*>(p.w);
  const auto* bias = static_cast<const float*>(p.bias);
  auto* y = static_cast<float*>(p.y);

  // The bias goes into y first so one sgemm with beta = 1 adds the product on top of it
  // (and on top of the old y when accumulating).
  if (bias != nullptr) {
    for (int i = 0; i < p.m; ++i) {
      float* yi = y + static_cast<size_t>(i) * ldy;
      if (p.accumulate) {
        for (int j = 0; j < p.n; ++j) yi[j] += bias[j];
      } else {
        std::memcpy(yi, bias, sizeof(float) * p.n);
      }
    }
  }
  const float beta = (bias != nullptr || p.accumulate) ? 1.0f : 0.0f;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p.m, p.n, p.k, 1.0f, x, ldx, w, ldw, beta, y,
              ldy);

  if (p.epilogue != GemmEpilogue::kNone) {
    float (*act)(float) = p.epilogue == GemmEpilogue::kGeluTanh ? GeluTanh : GeluErf;
    for (int i = 0; i < p.m; ++i) {
      float* yi = y + static_cast<size_t>(i) * ldy;
      for (int j = 0; j < p.n; ++j) yi[j] = act(yi[j]);
    }
  }
  return KernelStatus::kOk;
}

}  // namespace phishard
