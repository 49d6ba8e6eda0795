// phishard_bench --attn-variant-rounds: decode steps with each decode attention kernel
// (CudaPhiModel::set_decode_attention_variant: 0 auto, 1 register-staged, 2 pipelined, 3 tensor
// core) alternated (bench/setting_sweep.h). With --steps 100 or more at b256 each case is seconds
// of one kernel, i.e. the sustained (power-capped) clock.
#pragma once

#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "bench/setting_sweep.h"
#include "model/cuda_phi_model.h"

namespace phishard::bench {

// cases: "BATCHxCTX,..."; variants: "2,3" (set_decode_attention_variant values).
inline void AttnVariantSweep(CudaPhiModel& m, Bench& bench, const std::string& cases,
                             const std::string& variants, const std::string& mode, int rounds,
                             std::vector<Row>* rows) {
  const int start = m.decode_attention_variant();
  std::vector<SweepSetting> settings;
  for (int v : ParseInts(variants)) {
    settings.push_back(
        {absl::StrFormat("attn%d", v), [&m, v] { BENCH_OK(m.set_decode_attention_variant(v)); }});
  }
  SettingSweep(bench, "decode attention variant sweep", "--attn-variant-cases", cases, mode, rounds,
               settings, rows);
  BENCH_OK(m.set_decode_attention_variant(start));
}

}  // namespace phishard::bench
