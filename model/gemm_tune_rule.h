// The decision rule of the decode GEMMs' warm-up tuning (CudaPhiModel::TuneDecodeGemms,
// model/cuda_gemm_tune.cc): which cuBLASLt configuration, if any, replaces the heuristic's first
// pick for one GEMM form. Host code only, so it is unit-tested without a GPU
// (tests/model/gemm_tune_rule_test.cc).
#pragma once

#include <algorithm>
#include <vector>

namespace phishard {

// The tuning times every candidate (CudaGemm::ListAlgos) once, then alternates the fastest
// kGemmTuneFinalists other than the heuristic's first with that first pick, kGemmTuneRounds times
// each (first, finalist, first).
inline constexpr int kGemmTuneFinalists = 2;
inline constexpr int kGemmTuneRounds = 3;
// A finalist replaces the heuristic's pick only when every one of its alternations timed it at
// most 1 - margin of the first pick's time around it. The margin is wide so that only clear wins
// are taken and the choices (and with them the logits' last bits) stay the same from one Warmup
// to the next: one GEMM timed in blocks at one clock varies by ~1-2 % (phishard_kernel_bench
// gemm-sustained, perf-log 2026-11-30 13:03), and a ~3-5 % gain was kept in one process and not
// in the next (dense at 256 rows: 0.966, perf-log 13:09), while fc2's split-K pick at 256 rows
// loses clearly to a non-split candidate (0.85 at Warmup's clock, 0.92 under sustained load).
inline constexpr double kGemmTuneMarginDefault = 0.08;

// ratios[j][r]: finalist j's time over the first pick's (the mean of its timings just before and
// after) in alternation r. Returns the finalist with the lowest median ratio among those whose
// every ratio is at most 1 - margin, or -1: keep the heuristic's pick. A finalist without ratios
// never wins. A negative margin also accepts finalists slower than the first pick (tests use it
// to force a choice).
inline int PickTunedGemm(const std::vector<std::vector<double>>& ratios, double margin) {
  int best = -1;
  double best_median = 0.0;
  for (size_t j = 0; j < ratios.size(); ++j) {
    std::vector<double> r = ratios[j];
    const bool every_gain = std::all_of(r.begin(), r.end(), [&](double x) {
      return x <= 1.0 - margin;  // false for NaN
    });
    if (r.empty() || !every_gain) continue;
    std::sort(r.begin(), r.end());
    const double median = r[r.size() / 2];
    if (best < 0 || median < best_median) {
      best = static_cast<int>(j);
      best_median = median;
    }
  }
  return best;
}

}  // namespace phishard
