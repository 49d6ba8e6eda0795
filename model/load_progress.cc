#include "model/load_progress.h"

#include <utility>

#include "absl/strings/str_format.h"
#include "common/logging.h"

namespace phishard {

LoadProgress::LoadProgress(uint64_t total_bytes, Clock::duration interval, Sink sink)
    : total_(total_bytes), interval_(interval), last_(Clock::now()), sink_(std::move(sink)) {}

void LoadProgress::Add(uint64_t bytes, const std::string& detail) {
  done_ += bytes;
  const Clock::time_point now = Clock::now();
  const bool finished = done_ >= total_;
  if (!finished && now - last_ < interval_) return;
  last_ = now;
  const double gb = 1e9;
  std::string line = absl::StrFormat(
      "Weights loaded: %.2f/%.2f GB (%d%%)", static_cast<double>(done_) / gb,
      static_cast<double>(total_) / gb,
      total_ == 0 ? 100 : static_cast<int>(100.0 * static_cast<double>(done_) / total_));
  if (!detail.empty()) line += ", " + detail;
  ++lines_;
  if (sink_) {
    sink_(line);
  } else {
    PHI_LOG(INFO) << line;
  }
}

}  // namespace phishard
