// phishard_bench --lora-prefill-pairs: the multi-LoRA prefill against the base prefill measured
// one step at a time, B L B L ..., so that both steps of a pair run at the same SM clock (the
// H200 moves its clock under the 700 W cap within a fraction of a second; a block of base steps
// then a block of LoRA steps carries that drift into the ratio: single rounds of the old
// --lora-rounds comparison ranged 80.8-92.8 % for the same code). With several LoRA prefill
// tunings the pairs of the tunings interleave (B L1 B L2, then B L2 B L1, ...: the order of the
// tunings reversed every other round, so none always follows the other), each ratio against the
// base step right before its LoRA step. With repeat R > 1 each pair runs R base steps then R
// LoRA steps and times the last of each (B B L L with R = 2): what the first step after a switch
// between base and LoRA steps costs, beside the clock. Host side only.
#pragma once

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace phishard::bench {

// Order statistics of a sample: quartiles by linear interpolation between order statistics
// (q = 0.25 of n sorted values: position 0.25 (n - 1)), the median the same way at 0.5.
struct Spread {
  double median = 0, q1 = 0, q3 = 0, min = 0, max = 0;
};

inline double Quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0.0;
  const double pos = q * (sorted.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (pos - lo) * (sorted[hi] - sorted[lo]);
}

inline Spread SpreadOf(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  Spread s;
  if (v.empty()) return s;
  s.median = Quantile(v, 0.5);
  s.q1 = Quantile(v, 0.25);
  s.q3 = Quantile(v, 0.75);
  s.min = v.front();
  s.max = v.back();
  return s;
}

// One clock (host or device events) of one tuning's pairs.
struct PairClock {
  std::vector<double> base_ms, lora_ms;  // per pair
  // Per pair 100 x base / LoRA (% of base throughput); and 100 x median(base) / median(LoRA).
  std::vector<double> pct() const {
    std::vector<double> p;
    for (size_t i = 0; i < base_ms.size(); ++i) p.push_back(100.0 * base_ms[i] / lora_ms[i]);
    return p;
  }
  double ratio_of_medians() const {
    const double l = SpreadOf(lora_ms).median;
    return l > 0 ? 100.0 * SpreadOf(base_ms).median / l : 0.0;
  }
};

struct PairResult {
  std::string tuning;
  int warmup = 0, repeat = 1;
  PairClock host, device;
};

// step(lora, &host_ms, &device_ms): one prefill step, base (false) or with the adapters (true);
// tune(t): switches the LoRA prefill tuning (empty: leave it). Runs `warmup` untimed pairs per
// tuning, then `pairs` timed pairs per tuning (each `repeat` >= 1 steps of each kind, the last
// timed), interleaved over the tunings (reversed order in odd
// rounds).
inline std::vector<PairResult> RunLoraPrefillPairs(
    const std::vector<std::string>& tunings, int pairs, int warmup, int repeat,
    const std::function<void(const std::string&)>& tune,
    const std::function<void(bool, double*, double*)>& step) {
  std::vector<PairResult> out(tunings.size());
  for (size_t t = 0; t < tunings.size(); ++t) {
    out[t].tuning = tunings[t];
    out[t].warmup = warmup;
    out[t].repeat = repeat;
  }
  for (int i = 0; i < warmup + pairs; ++i) {
    for (size_t j = 0; j < tunings.size(); ++j) {
      const size_t t = i % 2 == 0 ? j : tunings.size() - 1 - j;
      tune(tunings[t]);
      double bh = 0, bd = 0, lh = 0, ld = 0;
      for (int k = 0; k < repeat; ++k) step(false, &bh, &bd);
      for (int k = 0; k < repeat; ++k) step(true, &lh, &ld);
      if (i < warmup) continue;
      out[t].host.base_ms.push_back(bh);
      out[t].host.lora_ms.push_back(lh);
      out[t].device.base_ms.push_back(bd);
      out[t].device.lora_ms.push_back(ld);
    }
  }
  return out;
}

inline std::string FormatPairClock(const char* clock, const PairClock& c) {
  const Spread p = SpreadOf(c.pct());
  return absl::StrFormat(
      "  %-6s per-pair %% of base: median %.1f, quartiles %.1f-%.1f, min %.1f, max %.1f; ratio of "
      "medians %.1f %% (base %.3f ms, LoRA %.3f ms)\n",
      clock, p.median, p.q1, p.q3, p.min, p.max, c.ratio_of_medians(), SpreadOf(c.base_ms).median,
      SpreadOf(c.lora_ms).median);
}

inline std::string FormatPairs(const std::string& what, const PairResult& r) {
  std::string s = absl::StrFormat(
      "lora prefill pairs %s tuning %s: %zu pairs (base, LoRA %d step(s) each, the last timed, "
      "alternated) after %d untimed pairs\n",
      what, r.tuning.empty() ? "(model's)" : r.tuning, r.host.base_ms.size(), r.repeat, r.warmup);
  s += FormatPairClock("host", r.host);
  s += FormatPairClock("device", r.device);
  return s;
}

inline nlohmann::json PairClockJson(const PairClock& c) {
  const Spread p = SpreadOf(c.pct());
  return {{"pct_median", p.median},
          {"pct_q1", p.q1},
          {"pct_q3", p.q3},
          {"pct_min", p.min},
          {"pct_max", p.max},
          {"pct_ratio_of_medians", c.ratio_of_medians()},
          {"base_median_ms", SpreadOf(c.base_ms).median},
          {"lora_median_ms", SpreadOf(c.lora_ms).median},
          {"base_ms", c.base_ms},
          {"lora_ms", c.lora_ms}};
}

inline nlohmann::json PairsJson(const std::string& what, const PairResult& r) {
  return {{"case", what},
          {"tuning", r.tuning},
          {"pairs", r.host.base_ms.size()},
          {"warmup_pairs", r.warmup},
          {"repeat", r.repeat},
          {"host", PairClockJson(r.host)},
          {"device", PairClockJson(r.device)}};
}

}  // namespace phishard::bench
