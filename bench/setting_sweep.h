// phishard_bench's alternated decode sweeps (--attn-variant-rounds, --fold-rounds,
// --fc1-sms-rounds, --dense-bulk-rounds, --graphs-rounds): decode steps under each of a few model
// settings, alternated in one process round after round — the order reversed every other round so
// neither setting always follows the other (under the 700 W cap a step's clock depends on what ran
// before it) — so the machine and its clock are the same for all. Each case runs Bench::steps()
// timed steps a round. Prints each step's row, then per case and setting the median over the rounds
// (host ms, device ms), the ratio to the first setting's median and each round's value.
#pragma once

#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/bench_steps.h"
#include "bench/bench_util.h"

namespace phishard::bench {

struct SweepSetting {
  std::string label;            // in each row's mode ("<mode> <label>") and the summary
  std::function<void()> apply;  // sets it on the model (and drops the graphs it changes)
};

// cases: "BATCHxCTX,..." (flag: the option's name, for the error); mode: a Bench::Decode mode
// ("greedy", "graph"); title: the summary's heading.
inline void SettingSweep(Bench& bench, const std::string& title, const std::string& flag,
                         const std::string& cases, const std::string& mode, int rounds,
                         const std::vector<SweepSetting>& settings, std::vector<Row>* rows) {
  std::vector<std::pair<int, int>> list;
  for (absl::string_view c : absl::StrSplit(cases, ',', absl::SkipEmpty())) {
    const std::vector<std::string> bc = absl::StrSplit(c, 'x');
    BENCH_CHECK(bc.size() == 2, (flag + ": BATCHxCTX,...").c_str());
    list.emplace_back(std::stoi(bc[0]), std::stoi(bc[1]));
  }
  BENCH_CHECK(!settings.empty(), (title + ": at least one setting").c_str());
  // (batch, ctx) -> per setting index: host ms / device ms of each round.
  std::map<std::pair<int, int>, std::map<size_t, std::vector<std::pair<double, double>>>> got;
  for (int round = 0; round < rounds; ++round) {
    std::vector<size_t> order(settings.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    if (round % 2 == 1) std::reverse(order.begin(), order.end());
    for (auto [b, ctx] : list) {
      for (size_t i : order) {
        settings[i].apply();
        Row r;
        if (!bench.Decode(b, ctx, absl::StrFormat("%s %s", mode, settings[i].label), &r)) continue;
        r.note += absl::StrFormat("; round %d", round);
        PrintRow(r);
        rows->push_back(r);
        got[{b, ctx}][i].push_back({r.ms, r.device_ms});
      }
    }
  }
  std::printf("\n%s (%s), %d rounds: median host ms (device ms) x %s [rounds]\n", title.c_str(),
              mode.c_str(), rounds, settings[0].label.c_str());
  for (const auto& [key, per] : got) {
    double base = 0;
    for (const auto& [i, v] : per) {
      std::vector<double> host, dev;
      std::vector<std::string> each;
      for (auto [h, d] : v) {
        host.push_back(h);
        dev.push_back(d);
        each.push_back(absl::StrFormat("%.3f", h));
      }
      if (i == 0) base = Median(host);
      std::printf("  b%-4d ctx%-5d %-14s %8.3f (%8.3f)  x%.3f  [%s]\n", key.first, key.second,
                  settings[i].label.c_str(), Median(host), Median(dev),
                  base > 0 ? Median(host) / base : 0.0, absl::StrJoin(each, " ").c_str());
    }
  }
}

// One integer model setting swept over a list of values (options --NAME-rounds, --NAME-cases and
// --NAME: the list), each value a SweepSetting labelled LABEL<value>.
struct IntSettingSweep {
  std::string name, label, title;
  std::string cases, values;  // defaults of --NAME-cases and --NAME
  int rounds = 0;
  std::string mode = "greedy";  // the decode steps' mode (Bench::Decode: greedy, graph, ...)

  // `what`: the setting, for the help text; `values_help`: what a value means.
  void AddFlags(CLI::App& app, const std::string& what, const std::string& values_help) {
    app.add_option("--" + name + "-rounds", rounds,
                   "rounds of --" + name + "-cases with each value of --" + name + " (" + what +
                       "), alternated (0: none)");
    app.add_option("--" + name + "-cases", cases, "BATCHxCTX decode steps of it");
    app.add_option("--" + name, values, values_help + ", comma-separated");
  }
  // Decode steps (`mode`) under set(v) for each value; restore() afterwards.
  void Run(Bench& bench, const std::function<void(int)>& set, const std::function<void()>& restore,
           std::vector<Row>* rows) const {
    if (rounds <= 0) return;
    std::vector<SweepSetting> settings;
    for (int v : ParseInts(values)) {
      settings.push_back({absl::StrFormat("%s%d", label, v), [set, v] { set(v); }});
    }
    SettingSweep(bench, title, "--" + name + "-cases", cases, mode, rounds, settings, rows);
    restore();
  }
  // The same for one setting read by `get` and written by `set`: what get() read at the start is
  // set back afterwards.
  void Run(Bench& bench, const std::function<int()>& get, const std::function<void(int)>& set,
           std::vector<Row>* rows) const {
    if (rounds <= 0) return;
    const int start = get();
    Run(bench, set, [&set, start] { set(start); }, rows);
  }
};

}  // namespace phishard::bench
