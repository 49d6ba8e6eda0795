// phishard_bench --fold-rounds: decode steps with the decode attention's fold
// (CudaPhiModel::set_decode_attention_fold_rows: rotary + K/V write and the split merge inside
// the attention launch) off and on (every step size), alternated (bench/setting_sweep.h).
#pragma once

#include <string>
#include <vector>

#include "bench/setting_sweep.h"
#include "model/cuda_phi_model.h"

namespace phishard::bench {

inline void DecodeFoldSweep(CudaPhiModel& m, Bench& bench, const std::string& cases,
                            const std::string& mode, int rounds, std::vector<Row>* rows) {
  const int start = m.decode_attention_fold_rows();
  SettingSweep(bench, "decode attention fold sweep", "--fold-cases", cases, mode, rounds,
               {{"fold0", [&] { m.set_decode_attention_fold_rows(0); }},
                {"fold1", [&] { m.set_decode_attention_fold_rows(65536); }}},
               rows);
  m.set_decode_attention_fold_rows(start);
}

}  // namespace phishard::bench
