// Settings every rank of a tensor-parallel group must share although each rank reads them from
// its own command line (--max-kv-blocks, --unrouted-kv-blocks, MEMORY_WIGGLE_ROOM): a rank with
// another value would size or split its KV pool differently and hand out other block ids than its
// peers (ModelBackend::CheckSameOnEveryRank all-gathers them at Warmup). Each value travels as
// four floats of 16 bits (exact in float32; the collectives are float).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace phishard {

struct RankSetting {
  std::string name;   // as the user sets it: "--unrouted-kv-blocks"
  int64_t value = 0;  // the integer, or (is_double) the bits of a double
  bool is_double = false;

  static RankSetting Int(std::string name, int64_t v) { return {std::move(name), v, false}; }
  static RankSetting Double(std::string name, double v);
};

inline constexpr int kRankSettingFloats = 4;

// `settings` as settings.size() * kRankSettingFloats floats into `out`.
void EncodeRankSettings(absl::Span<const RankSetting> settings, float* out);

// `all`: every rank's EncodeRankSettings of the same settings ([world, settings.size() * 4],
// rank-major); `mine` names them. OK when every rank sent the same values; otherwise
// FAILED_PRECONDITION naming the first setting that differs and every rank's value of it — the
// same message on every rank, which gathered the same floats.
absl::Status CheckRankSettingsAgree(absl::Span<const RankSetting> mine, const float* all,
                                    int world);

}  // namespace phishard
