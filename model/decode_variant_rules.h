// DecodeVariantRules: which decode graph variant a base decode step takes (CudaPhiModel's
// decode_fc1_sms / decode_fold_short / decode_short_regs switches), and which variants a graph
// bucket can take — the rules alone, plain C++, so they are tested on the host
// (tests/model/decode_variant_rules_test.cc). CudaPhiModel builds one from its settings
// (CudaPhiModel::VariantRules) for every step and at warm-up.
//
// A decode step's launch choices depend on its row count (its graph bucket) and, for these
// switches, on its contexts; a replayed graph bakes them in, so each combination is a graph of
// its own, a bit of the variant:
//  * kFc1Narrow: fc1 with decode_fc1_sms's cuBLASLt SM count target — rows in
//    [fc1_min_rows, fc1_max_rows] whose live sequences' contexts sum to >= fc1_min_kv;
//  * kShortContext: a short mean context — up to fold_short_rows rows (and above fold_rows) of at
//    most fold_short_ctx, the decode attention fold (FoldShort); above both fold bounds, up to
//    short_regs_rows rows of at most short_regs_ctx and only for MHA models, the register-staged
//    attention kernel (ShortRegs). The two row ranges are disjoint, so one bit serves both.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace phishard {

struct DecodeVariantRules {
  static constexpr int kFc1Narrow = 1;
  static constexpr int kShortContext = 2;
  static constexpr int kVariants = 4;  // every combination of the bits

  int fc1_sms = 0;  // 0: no SM target
  int fc1_min_rows = 0, fc1_max_rows = -1;
  int64_t fc1_min_kv = 0;  // summed context from which fc1 takes its target
  bool sharded = false;    // tensor-parallel steps take neither short-context form
  bool mha = false;        // every query head has its own K/V head (ShortRegs needs it)
  int fold_rows = 0;       // decode_attention_fold_rows: steps up to it always fold
  int fold_short_rows = 0, fold_short_ctx = 0;
  int short_regs_rows = 0, short_regs_ctx = 0;

  bool Fc1Narrow(int rows, int64_t kv_tokens) const {
    return fc1_sms > 0 && rows >= fc1_min_rows && rows <= fc1_max_rows && kv_tokens >= fc1_min_kv;
  }
  static bool MeanAtMost(int64_t kv_tokens, int live, int ctx) {
    return kv_tokens <= static_cast<int64_t>(ctx) * std::max(live, 1);
  }
  bool FoldShort(int rows, int64_t kv_tokens, int live) const {
    return !sharded && fold_rows > 0 && rows > fold_rows && rows <= fold_short_rows &&
           MeanAtMost(kv_tokens, live, fold_short_ctx);
  }
  // Rows whose short-context variant is ShortRegs (not FoldShort).
  bool ShortRegsRows(int rows) const {
    return rows > std::max(fold_short_rows, fold_rows) && rows <= short_regs_rows;
  }
  bool ShortRegs(int rows, int64_t kv_tokens, int live) const {
    return !sharded && short_regs_rows > 0 && mha && ShortRegsRows(rows) &&
           MeanAtMost(kv_tokens, live, short_regs_ctx);
  }
  // The variant of a step of `rows` rows whose `live` sequences' contexts sum to kv_tokens.
  int Variant(int rows, int64_t kv_tokens, int live) const {
    const bool short_context = FoldShort(rows, kv_tokens, live) || ShortRegs(rows, kv_tokens, live);
    return (Fc1Narrow(rows, kv_tokens) ? kFc1Narrow : 0) | (short_context ? kShortContext : 0);
  }
  // Whether some step of a `rows`-row bucket (at most `rows` live sequences) can be in `variant`.
  bool Possible(int rows, int variant) const {
    const bool narrow = (variant & kFc1Narrow) != 0, short_context = (variant & kShortContext) != 0;
    if (narrow && !Fc1Narrow(rows, std::numeric_limits<int64_t>::max())) return false;
    if (short_context && !FoldShort(rows, 0, rows) && !ShortRegs(rows, 0, rows)) return false;
    // Both: a summed context >= the fc1 bound with a mean <= the short one (of the form these rows
    // take), over <= rows sequences.
    const int short_ctx = ShortRegsRows(rows) ? short_regs_ctx : fold_short_ctx;
    return !(narrow && short_context) || MeanAtMost(fc1_min_kv, rows, short_ctx);
  }
};

}  // namespace phishard
