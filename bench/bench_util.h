// Small helpers the benchmark programs share (bench/*.cc): host-side only.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace phishard::bench {

// The median of `v` (the upper one of an even count); 0 for an empty vector.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// "1,32,128" -> {1, 32, 128}; empty parts are skipped. Throws std::invalid_argument /
// std::out_of_range on a part that is not an int (CLI11 reports it as a bad flag value).
inline std::vector<int> ParseInts(const std::string& s) {
  std::vector<int> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    out.push_back(std::stoi(std::string(p)));
  }
  return out;
}

}  // namespace phishard::bench
