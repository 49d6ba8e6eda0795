// phishard_kernel_bench's sustained GEMM sweep (bench/gemm_sustained.cc).
#pragma once

#include <cuda_runtime.h>

#include <vector>

namespace phishard::bench {

struct GemmSustainedOptions {
  std::vector<int> rows;    // M of each swept prefill size
  double warmup_ms = 1500;  // the fc1 GEMM back to back first: the GPU at its power cap
  double block_ms = 50;     // round 1: each candidate back to back this long
  double block2_ms = 80;    // round 2: each block this long
  int top = 4;              // round 2: the best `top` of round 1 besides the heuristic's first
  int rounds2 = 3;          // round 2: alternations (first, c1, first, c2, ...) per shape
  int hidden = 2560, inter = 10240;  // Phi-2
};

// Times the cuBLASLt candidates (CudaGemm::ListAlgos: the heuristic's first 16 and tile x
// cluster variants) of each Phi prefill GEMM (qkv, fc1 + GELU, dense and fc2 accumulating with
// bias) at each M under sustained load, i.e. at the clock the 700 W cap leaves, and prints per
// shape the winner as a PHISHARD_PREFILL_GEMM_ALGOS entry (model/cuda_gemm_choices.h).
void GemmSustainedCases(cudaStream_t s, const GemmSustainedOptions& o);

}  // namespace phishard::bench
