#include "model/rank_settings.h"

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace phishard {
namespace {

int64_t Decode(const float* f) {
  uint64_t u = 0;
  for (int i = 0; i < kRankSettingFloats; ++i) {
    u |= static_cast<uint64_t>(static_cast<uint32_t>(f[i])) << (16 * i);
  }
  return static_cast<int64_t>(u);
}

std::string Format(const RankSetting& s, int64_t v) {
  if (!s.is_double) return absl::StrCat(v);
  double d;
  std::memcpy(&d, &v, sizeof d);
  return absl::StrFormat("%g", d);
}

}  // namespace

RankSetting RankSetting::Double(std::string name, double v) {
  int64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return {std::move(name), bits, true};
}

void EncodeRankSettings(absl::Span<const RankSetting> settings, float* out) {
  for (const RankSetting& s : settings) {
    const uint64_t u = static_cast<uint64_t>(s.value);
    for (int i = 0; i < kRankSettingFloats; ++i) {
      *out++ = static_cast<float>((u >> (16 * i)) & 0xffff);
    }
  }
}

absl::Status CheckRankSettingsAgree(absl::Span<const RankSetting> mine, const float* all,
                                    int world) {
  const size_t stride = mine.size() * kRankSettingFloats;
  for (size_t k = 0; k < mine.size(); ++k) {
    std::vector<int64_t> values(world);
    bool same = true;
    for (int r = 0; r < world; ++r) {
      values[r] = Decode(all + r * stride + k * kRankSettingFloats);
      same &= values[r] == values[0];
    }
    if (same) continue;
    std::vector<std::string> per_rank;
    for (int r = 0; r < world; ++r) {
      per_rank.push_back(absl::StrCat("rank ", r, " ", Format(mine[k], values[r])));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "the tensor-parallel ranks were started with different ", mine[k].name, " (",
        absl::StrJoin(per_rank, ", "),
        "): every rank must use the same value, or their KV pools would hand out different "
        "blocks (`phishard launch` passes one value to every rank)"));
  }
  return absl::OkStatus();
}

}  // namespace phishard
