// phishard_bench --fold-rounds: decode steps with the decode attention's fold
// (CudaPhiModel::set_decode_attention_fold_rows: rotary + K/V write and the split merge inside
// the attention launch) off and on (every step size), alternated in one process round after
// round so the clock and the machine are the same for both; prints each step's row, then per
// case the median over the rounds, each round's value and the ratio on / off.
#pragma once

#include <cstdio>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/bench_steps.h"
#include "bench/bench_util.h"
#include "model/cuda_phi_model.h"

namespace phishard::bench {

// cases: "BATCHxCTX,..." decode steps; mode: a Bench::Decode mode ("greedy", "graph").
inline void DecodeFoldSweep(CudaPhiModel& m, Bench& bench, const std::string& cases,
                            const std::string& mode, int rounds, std::vector<Row>* rows) {
  std::vector<std::pair<int, int>> list;
  for (absl::string_view c : absl::StrSplit(cases, ',', absl::SkipEmpty())) {
    const std::vector<std::string> bc = absl::StrSplit(c, 'x');
    BENCH_CHECK(bc.size() == 2, "--fold-cases BATCHxCTX,...");
    list.emplace_back(std::stoi(bc[0]), std::stoi(bc[1]));
  }
  const int start = m.decode_attention_fold_rows();
  // (batch, ctx, fold) -> host ms / device ms of each round.
  std::map<std::tuple<int, int, int>, std::vector<std::pair<double, double>>> got;
  for (int round = 0; round < rounds; ++round) {
    for (int fold : {0, 1}) {
      m.set_decode_attention_fold_rows(fold ? 65536 : 0);  // drops the graphs
      for (auto [b, ctx] : list) {
        Row r;
        if (!bench.Decode(b, ctx, absl::StrFormat("%s fold%d", mode, fold), &r)) continue;
        r.note += absl::StrFormat("; round %d", round);
        PrintRow(r);
        rows->push_back(r);
        got[{b, ctx, fold}].push_back({r.ms, r.device_ms});
      }
    }
  }
  m.set_decode_attention_fold_rows(start);
  std::printf(
      "\ndecode attention fold sweep (%s), %d rounds: median host ms (device ms) x fold "
      "off [rounds]\n",
      mode.c_str(), rounds);
  for (const auto& [key, v] : got) {
    std::vector<double> host, dev;
    std::vector<std::string> each;
    for (auto [h, d] : v) {
      host.push_back(h);
      dev.push_back(d);
      each.push_back(absl::StrFormat("%.3f", h));
    }
    double ratio = 0;
    const auto [b, ctx, fold] = key;
    if (auto it = got.find({b, ctx, 0}); it != got.end()) {
      std::vector<double> base;
      for (auto [h, d] : it->second) base.push_back(h);
      ratio = Median(host) / Median(base);
    }
    std::printf("  b%-4d ctx%-5d fold%d %8.3f (%8.3f)  x%.3f  [%s]\n", b, ctx, fold, Median(host),
                Median(dev), ratio, absl::StrJoin(each, " ").c_str());
  }
}

}  // namespace phishard::bench
