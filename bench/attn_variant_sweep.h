// phishard_bench --attn-variant-rounds: decode steps with each decode attention kernel
// (CudaPhiModel::set_decode_attention_variant: 0 auto, 1 register-staged, 2 pipelined, 3 tensor
// core) alternated in one process, round after round, the order reversed every other round so
// neither kernel always follows the other (under the 700 W cap a step's clock depends on what ran
// before it). Each case runs Bench::steps() timed steps per round: with --steps
// 100 or more at b256 that is seconds of one kernel, i.e. the sustained (power-capped) clock.
// Prints each step's row, then per case and variant the median over the rounds, each round's value
// and the ratio to the first variant.
#pragma once

#include <algorithm>
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

// cases: "BATCHxCTX,..."; variants: "2,3" (set_decode_attention_variant values); mode: a
// Bench::Decode mode ("greedy", "graph").
inline void AttnVariantSweep(CudaPhiModel& m, Bench& bench, const std::string& cases,
                             const std::string& variants, const std::string& mode, int rounds,
                             std::vector<Row>* rows) {
  std::vector<std::pair<int, int>> list;
  for (absl::string_view c : absl::StrSplit(cases, ',', absl::SkipEmpty())) {
    const std::vector<std::string> bc = absl::StrSplit(c, 'x');
    BENCH_CHECK(bc.size() == 2, "--attn-variant-cases BATCHxCTX,...");
    list.emplace_back(std::stoi(bc[0]), std::stoi(bc[1]));
  }
  const std::vector<int> vs = ParseInts(variants);
  BENCH_CHECK(!vs.empty(), "--attn-variants: at least one");
  const int start = m.decode_attention_variant();
  // (batch, ctx, variant) -> host ms / device ms of each round.
  std::map<std::tuple<int, int, int>, std::vector<std::pair<double, double>>> got;
  for (int round = 0; round < rounds; ++round) {
    std::vector<int> order = vs;
    if (round % 2 == 1) std::reverse(order.begin(), order.end());
    for (auto [b, ctx] : list) {
      for (int v : order) {
        BENCH_OK(m.set_decode_attention_variant(v));  // drops the graphs
        Row r;
        if (!bench.Decode(b, ctx, absl::StrFormat("%s attn%d", mode, v), &r)) {
          continue;
        }
        r.note += absl::StrFormat("; round %d", round);
        PrintRow(r);
        rows->push_back(r);
        got[{b, ctx, v}].push_back({r.ms, r.device_ms});
      }
    }
  }
  BENCH_OK(m.set_decode_attention_variant(start));
  std::printf(
      "\ndecode attention variant sweep (%s), %d rounds: median host ms (device ms) x variant "
      "%d.%d [rounds]\n",
      mode.c_str(), rounds, vs[0] / 10, vs[0] % 10);
  for (const auto& [key, v] : got) {
    std::vector<double> host, dev;
    std::vector<std::string> each;
    for (auto [h, d] : v) {
      host.push_back(h);
      dev.push_back(d);
      each.push_back(absl::StrFormat("%.3f", h));
    }
    double ratio = 0;
    const auto [b, ctx, variant] = key;
    if (auto it = got.find({b, ctx, vs[0]}); it != got.end()) {
      std::vector<double> base;
      for (auto [h, d] : it->second) base.push_back(h);
      ratio = Median(host) / Median(base);
    }
    std::printf("  b%-4d ctx%-5d attn%d.%d %8.3f (%8.3f)  x%.3f  [%s]\n", b, ctx, variant / 10,
                variant % 10, Median(host), Median(dev), ratio, absl::StrJoin(each, " ").c_str());
  }
}

}  // namespace phishard::bench
