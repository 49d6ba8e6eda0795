// fc1's LoRA delta + GELU in the GEMM form's segmented prefill steps as ONE pass over the
// pre-activation (kernels/cuda/lora_expand_act_cuda.h) instead of a cuBLASLt GEMM per run of
// segments with the GELU epilogue (a read-modify-write of mlp [rows, I] with K = w x width_a)
// plus GeluInPlaceCuda over each run of base rows. The same sum: float32 y + T_fc1 · B_fc1ᵀ (T
// split hi + lo as the GEMMs read it), the GELU on it, one rounding; base rows (k = 0) get the
// same float GELU as GeluInPlaceCuda.
#ifdef PHISHARD_HAVE_CUDA

#include "common/logging.h"
#include "kernels/cuda/lora_expand_act_cuda.h"
#include "model/cuda_lora.h"

namespace phishard {

// *done = false (and kOk) when the kernel does not take this step: switched off, the GELU not
// fused (PHISHARD_LORA_GEMM_FUSED_GELU=0 keeps the separate kernel), more runs than its segment
// table holds, or a shape it cannot serve; the caller then runs the GEMMs.
KernelStatus CudaLora::GemmFc1Kernel(void* mlp, GemmEpilogue act, cudaStream_t stream, bool* done) {
  *done = false;
  const int runs = static_cast<int>(gemm_segments_.size() + gemm_base_runs_.size());
  if (!gemm_fc1_kernel_ || !gemm_fused_gelu_ || !gemm_segmented_ ||
      runs > kLoraExpandActMaxSegments) {
    return KernelStatus::kOk;
  }
  const int I = config_.intermediate_size, tw = gemm_split_t_ ? 2 : 1;
  LoraExpandActParams p;
  p.y = mlp;  // [rows_, I] device, dtype_: fc1's output without its activation
  p.ldy = I;
  p.n = I;
  p.t = gb_.tm;  // compact T [rows_, gemm_ldt_]: fc1's block at 3 w W, a row's own w width_a
  p.ldt = gemm_ldt_;
  p.t_col = 3 * tw * gemm_max_width_;
  p.b = gb_.b_fc1;  // [I, w R]: adapter a's [B | B] at w col_a
  p.ldb = tw * gemm_r_;
  for (const LoraSegment& g : gemm_segments_) {
    p.segments[p.num_segments++] = {g.row, g.rows, tw * g.col, tw * g.width};
  }
  if (act != GemmEpilogue::kNone) {  // the base rows: the activation only
    for (const LoraSegment& g : gemm_base_runs_) {
      p.segments[p.num_segments++] = {g.row, g.rows, 0, 0};
    }
  }
  p.act = act;
  p.dtype = dtype_;
  const KernelStatus st = LoraExpandActCuda(p, stream);
  if (st == KernelStatus::kInvalidShape || st == KernelStatus::kUnsupportedDtype) {
    return KernelStatus::kOk;  // not launched: the GEMMs serve this shape
  }
  if (st != KernelStatus::kOk) {
    PHI_LOG(ERROR) << "LoRA fc1 delta + activation kernel failed: " << KernelStatusName(st);
    return st;
  }
  ++fc1_kernel_layers_;
  *done = true;
  return KernelStatus::kOk;
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
