// Recorded cuBLASLt algorithm choices for the prefill GEMMs (issue #4): which configuration a GEMM
// of a given form runs instead of the heuristic's first pick (kernels/cuda/gemm_cuda.h,
// GemmAlgoChoice, CudaGemm::SetAlgoChoices), in a text form that phishard_kernel_bench's
// gemm-sustained sweep prints and PHISHARD_PREFILL_GEMM_ALGOS / phishard_bench --gemm-algo-sets
// read. There is no built-in table: on the H200 no choice beat the heuristic's picks in the step
// beyond the run-to-run spread (docs/perf-log.md, pre4), so by default every GEMM keeps them.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/dtype.h"

namespace phishard {

// Entries separated by ';', each
//   MMIN-MMAX:N:K:ACC:GELU:BIAS=ALGO.TILE.STAGES.SPLITK.REDUCTION.SWIZZLE.CUSTOM.CLUSTER.INNER
// (rows, the GEMM's n and k, accumulate 0/1, fused GELU 0/1, bias 0/1, then the
// CUBLASLT_ALGO_CONFIG_* values as phishard_kernel_bench prints them); operands `dtype`.
// InvalidArgument naming `what` and the entry on a malformed one.
absl::StatusOr<std::vector<GemmAlgoChoice>> ParseGemmAlgoChoices(absl::string_view spec,
                                                                 DataType dtype,
                                                                 absl::string_view what);

// What PHISHARD_PREFILL_GEMM_ALGOS lists (unset, empty or "0": no choice) for operands `dtype`;
// InvalidArgument naming the variable on a malformed list.
absl::StatusOr<std::vector<GemmAlgoChoice>> GemmAlgoChoicesFromEnv(DataType dtype);

}  // namespace phishard
