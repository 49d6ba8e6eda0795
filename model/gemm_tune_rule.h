// The decision rule of the Warmup GEMM tuning (CudaPhiModel::TuneGemms,
// model/cuda_gemm_tune.cc): which cuBLASLt configuration, if any, replaces the heuristic's first
// pick for one GEMM form. Host code only, so it is unit-tested without a GPU
// (tests/model/gemm_tune_rule_test.cc).
#pragma once

#include <algorithm>
#include <vector>

namespace phishard {

// The tuning times every candidate (CudaGemm::ListAlgos, in the heuristic's order) once; those
// at most 1 - margin of the heuristic's first pick's time are finalists, taken in the heuristic's
// order (kGemmTuneFinalists at most), each alternated kGemmTuneRounds times with that first pick
// (first, finalist, first); the first finalist that wins every alternation by the margin is kept.
// Taking finalists by rank rather than by speed keeps the choice the same from one Warmup to the
// next when two candidates both clear the margin (Phi-1.5's fc2 at 128 rows: candidates 2 and 5,
// 0.83 / 0.87, picked by speed in one process each, perf-log 2026-11-30 13:32).
inline constexpr int kGemmTuneFinalists = 3;
inline constexpr int kGemmTuneRounds = 3;
// The margin is wide so that only clear wins are taken and the choices (and with them the logits'
// last bits) stay put from one Warmup to the next: one GEMM timed in blocks at one clock varies by
// ~1-2 % (phishard_kernel_bench gemm-sustained, perf-log 2026-11-30 13:01), and a ~3-5 % gain was
// kept in one process and not in the next (dense at 256 rows: 0.966, perf-log 13:09), while fc2's
// split-K pick at 256 rows loses clearly to a non-split candidate (0.85 at Warmup's clock, 0.92
// under sustained load).
inline constexpr double kGemmTuneMarginDefault = 0.08;

// times[i]: candidate i's time from the first timing (times[0] the heuristic's first pick; <= 0:
// cuBLASLt refused it). Returns the finalists: candidates 1.. whose time is at most 1 - margin of
// the first's, in rank order, at most `max_finalists`. A negative margin also admits slower ones
// (tests use it to force a choice).
inline std::vector<int> GemmTuneFinalists(const std::vector<double>& times, double margin,
                                          int max_finalists = kGemmTuneFinalists) {
  std::vector<int> out;
  if (times.empty() || !(times[0] > 0.0)) return out;
  for (size_t i = 1; i < times.size() && static_cast<int>(out.size()) < max_finalists; ++i) {
    if (times[i] > 0.0 && times[i] <= (1.0 - margin) * times[0]) out.push_back(static_cast<int>(i));
  }
  return out;
}

// ratios: a finalist's times over the first pick's (the mean of its timings just before and
// after), one per alternation. True when there is at least one and every one is at most
// 1 - margin (never for a NaN). The tuning also requires all kGemmTuneRounds of them (a refused
// timing leaves one out).
inline bool GemmTuneWins(const std::vector<double>& ratios, double margin) {
  return !ratios.empty() &&
         std::all_of(ratios.begin(), ratios.end(), [&](double x) { return x <= 1.0 - margin; });
}

}  // namespace phishard
