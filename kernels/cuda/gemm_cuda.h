// CUDA GEMM over the GemmParams of kernels/gemm.h, through cuBLASLt: kF16/kBF16 operands, float32
// accumulation, bias in the epilogue, GELU-tanh in the epilogue when this cuBLASLt's GELU is the
// tanh approximation (checked once at Create by a probe, see gelu_tanh_in_epilogue()), else a
// separate in-place activation kernel after a bias epilogue. GELU-erf always uses that kernel.
//
// One CudaGemm owns one cuBLASLt handle and one device workspace, and caches the matmul
// descriptors and the heuristic's algorithm per (shape, strides, dtypes, epilogue, alignment), so
// a repeated shape costs no heuristic query. Not thread-safe: one CudaGemm per issuing thread.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "kernels/device.h"
#include "kernels/gemm.h"

namespace phishard {

// One heuristic candidate timed by CudaGemm::TimeCandidates: its rank in the heuristic's list, its
// mean time, and its cuBLASLt configuration (CUBLASLT_ALGO_CONFIG_* values, for logs).
struct GemmCandidateTime {
  int index = 0;
  float us = 0.0f;
  int algo_id = 0, tile_id = 0, stages_id = 0, split_k = 0, reduction = 0, swizzle = 0, custom = 0,
      cluster_id = 0;
  size_t workspace = 0;
  float waves = 0.0f;
};

// One cuBLASLt algorithm configuration (the CUBLASLT_ALGO_CONFIG_* values): what a plan runs.
struct GemmAlgoConfig {
  int algo_id = 0, tile_id = 0, stages_id = 0, split_k = 1, reduction = 0, swizzle = 0, custom = 0,
      cluster_id = 0, inner_shape_id = 0;
  bool operator==(const GemmAlgoConfig& o) const {
    return algo_id == o.algo_id && tile_id == o.tile_id && stages_id == o.stages_id &&
           split_k == o.split_k && reduction == o.reduction && swizzle == o.swizzle &&
           custom == o.custom && cluster_id == o.cluster_id && inner_shape_id == o.inner_shape_id;
  }
};

// A recorded algorithm choice: GEMMs of this form (rows in [min_m, max_m], n, k, accumulate, GELU
// epilogue fused or not, bias or not, operand dtype; one batch item, output in the operand dtype,
// no SM count target) run `config` instead of the heuristic's first pick, when cuBLASLt accepts
// it for the operands (cublasLtMatmulAlgoCheck; else the heuristic's pick, as before).
struct GemmAlgoChoice {
  int min_m = 0, max_m = 0;
  int n = 0, k = 0;
  bool accumulate = false;
  bool gelu = false;  // GemmEpilogue::kGeluTanh in the epilogue (the fc1 form)
  bool bias = true;
  DataType dtype = DataType::kBF16;
  GemmAlgoConfig config;
};

class CudaGemm {
 public:
  // Creates the handle and a workspace of `workspace_bytes` on the current device, and probes the
  // GELU epilogue. On failure returns kDeviceError and leaves *out empty.
  static KernelStatus Create(size_t workspace_bytes, std::unique_ptr<CudaGemm>* out);
  ~CudaGemm();
  CudaGemm(const CudaGemm&) = delete;
  CudaGemm& operator=(const CudaGemm&) = delete;

  // y = act(x·wᵀ + bias) or y += x·wᵀ + bias, operands of p.dtype (kF16/kBF16), device pointers.
  KernelStatus Run(const GemmParams& p, cudaStream_t stream);
  // Same with the output (and bias) of `y_dtype`, which may be kF32 (lm_head logits) or p.dtype.
  KernelStatus Run(const GemmParams& p, DataType y_dtype, cudaStream_t stream);

  // From now on (plans made so far are dropped) split-K algorithms with a 16-bit output must
  // reduce their partial sums in float32 (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE), never in the
  // output type, in place or in the workspace: for GEMMs whose result should keep more than the
  // output's precision until the final rounding (the LoRA expands multiply a bf16 hi + lo pair by
  // [B | B] and add onto y with beta = 1; a bf16 partial sum would drop the lo part). A guard: the
  // LoRA shapes measured so far picked no split-K. Note that cuBLASLt's default epilogue with
  // beta = 1 was measured (H200, algo 66) to return round(C + round(x·wᵀ)), which drops the lo
  // part anyway; its GELU epilogue sums in float32 (tests/gpu/cuda_gemm_accumulate_gelu_test.cc).
  void RequireFloat32SplitK();
  // The configuration of the algorithm the last successful Run used (algo / tile / stages ids,
  // split-K count, reduction scheme, numerical implementation flags), for diagnostics.
  const std::string& last_plan_info() const;

  // True when the probe found cuBLASLt's GELU epilogue to be the tanh approximation.
  bool gelu_tanh_in_epilogue() const;
  // True when, with accumulate (beta = 1), that epilogue was found to act on y + x·wᵀ; otherwise
  // accumulate + GELU runs the product with beta = 1, then the separate activation kernel.
  bool gelu_accumulate_in_epilogue() const;
  // That probe's worst error as a fraction of its tolerance (-1 when it did not run).
  double probe_accumulate_err() const;
  // Largest |epilogue - tanh GELU| and |epilogue - erf GELU| seen by the probe (float32 output).
  double probe_err_tanh() const;
  double probe_err_erf() const;
  // Human-readable reason for the last kDeviceError / kUnsupportedDtype (cuBLAS status text).
  const std::string& last_error() const;
  size_t num_cached_plans() const;

  // Times the heuristic's first `max_candidates` (<= 32) algorithms for p as Run would launch it
  // (same epilogue; a separate GELU kernel is not timed), `repeats` back-to-back runs each after
  // a warm-up, writing a scratch copy of y (y is untouched). Synchronises `stream` and allocates:
  // for benchmarks (phishard_kernel_bench gemm-candidates), never inside a capture
  // (kInvalidShape there).
  KernelStatus TimeCandidates(const GemmParams& p, DataType y_dtype, int max_candidates,
                              int repeats, cudaStream_t stream,
                              std::vector<GemmCandidateTime>* out);

  // From now on (plans made so far are dropped) GEMMs matching one of `choices` (the first that
  // matches) run its configuration; see GemmAlgoChoice. An empty list restores the heuristic.
  void SetAlgoChoices(std::vector<GemmAlgoChoice> choices);
  // Plans made so far that run a recorded choice (for tests: the path taken).
  size_t num_chosen_plans() const;

  // For benchmarks: the configurations worth timing for p as Run would launch it (same epilogue):
  // the heuristic's first `max_heuristic` (<= 32) that fit the workspace, then, with `variants`,
  // every tile of {128x128, 128x256, 256x128, 64x256, 256x64, 128x192, 192x128} x cluster of
  // {1x1, 2x1, 1x2, 2x2} of the first pick's algorithm (its stages and other settings) that
  // cuBLASLt accepts for these operands, without duplicates. Allocates nothing on the device.
  KernelStatus ListAlgos(const GemmParams& p, DataType y_dtype, int max_heuristic, bool variants,
                         std::vector<GemmAlgoConfig>* out);
  // Runs p with configuration c (fused GELU as Run would; no separate activation kernel, no
  // fallback): kInvalidShape when cuBLASLt refuses c for these operands. Plans are cached.
  KernelStatus RunAlgo(const GemmParams& p, DataType y_dtype, const GemmAlgoConfig& c,
                       cudaStream_t stream);

 private:
  struct Impl;
  explicit CudaGemm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace phishard
