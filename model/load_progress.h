// Startup progress of a weight load (docs/observability.md, spec §1.8): one INFO line
// "Weights loaded: X/Y GB (P%), DETAIL" at most every `interval`, and always once the last byte
// is in, so a long load (a Phi-2 upload, a cold network volume) shows it is moving.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

namespace phishard {

class LoadProgress {
 public:
  using Clock = std::chrono::steady_clock;
  using Sink = std::function<void(const std::string& line)>;

  // `total_bytes` > 0 is what Add() will sum to. `sink` receives each line (default: the log).
  explicit LoadProgress(uint64_t total_bytes, Clock::duration interval = std::chrono::seconds(2),
                        Sink sink = nullptr);

  // `bytes` more are loaded; `detail` ("layer 3/32") ends the line if one is written now.
  void Add(uint64_t bytes, const std::string& detail = "");

  uint64_t done() const { return done_; }
  int lines() const { return lines_; }

 private:
  uint64_t total_;
  uint64_t done_ = 0;
  Clock::duration interval_;
  Clock::time_point last_;
  Sink sink_;
  int lines_ = 0;
};

}  // namespace phishard
