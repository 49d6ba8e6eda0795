// Device helpers shared by the SGMV kernels (sgmv.cu, sgmv_decode.cu, sgmv_fused.cu) and the
// expand ops' host-side check. Included by those .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gelu_math.cuh"
#include "kernels/kernel_status.h"
#include "kernels/sgmv.h"

namespace phishard::cuda {

// Programmatic dependent launch (Hopper): everything before GridDepWait may overlap the previous
// kernel, so it reads only what no kernel of the step writes (plan, table, A / B).
__device__ __forceinline__ void GridDepWait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// 8 16-bit values of one 16-byte load as floats.
template <typename T>
__device__ __forceinline__ void Unpack8(const uint4& v, float f[8]) {
  const float2 a = Word2ToFloat2<T>(v.x), b = Word2ToFloat2<T>(v.y);
  const float2 c = Word2ToFloat2<T>(v.z), d = Word2ToFloat2<T>(v.w);
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y, f[4] = c.x, f[5] = c.y, f[6] = d.x, f[7] = d.y;
}

// The activation an expand applies after its delta. kAct: 0 none, 1 GELU tanh, 2 GELU erf.
template <int kAct>
__device__ __forceinline__ float SgmvAct(float x) {
  return GeluAct<kAct>(x);
}

// The expand ops of `p` against t's width (p.ldt) and the rank bound `max_rank`: kInvalidShape
// for a bad out / ldy / term count / t window, kNullPointer for a missing y unless `empty` (the
// launch has nothing to do); *max_out = the widest op's out.
inline KernelStatus CheckExpandOps(const SgmvGroupedExpandParams& p, int max_rank, bool empty,
                                   int* max_out) {
  *max_out = 0;
  for (int o = 0; o < p.num_ops; ++o) {
    const SgmvExpandOp& op = p.ops[o];
    if (op.out <= 0 || (op.ldy != 0 && op.ldy < op.out) || op.num_terms < 1 ||
        op.num_terms > kSgmvMaxTerms) {
      return KernelStatus::kInvalidShape;
    }
    for (int k = 0; k < op.num_terms; ++k) {
      if (op.terms[k].t_col < 0 || static_cast<int64_t>(op.terms[k].t_col) + max_rank > p.ldt) {
        return KernelStatus::kInvalidShape;
      }
    }
    if (!empty && op.y == nullptr) return KernelStatus::kNullPointer;
    *max_out = std::max(*max_out, op.out);
  }
  return KernelStatus::kOk;
}

}  // namespace phishard::cuda
