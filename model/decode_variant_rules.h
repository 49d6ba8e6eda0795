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
//  * kWarpHeads: the one-warp-a-head decode attention (PagedDecodeVariant::kWarpPerHead; MHA,
//    unsharded, above both fold bounds' rows) where the live sequences' query heads fill the GPU
//    several times over at short or medium contexts: at least warp_min_warps of them with a mean
//    context of at most warp_ctx, or warp_more_warps with a mean of at most warp_more_ctx
//    (kernels/cuda/paged_decode_warp.cu; its 4-warp blocks run 4 an SM, 16 warps, so the
//    defaults, 36 and 44 warps an SM, are 2.25 and 2.75 waves). It takes precedence over the
//    short-context bit: a step has at most one of the two.
//  * kStreamLong: a 1-row step through the decode stream (model/cuda_phi_stream.cc) whose
//    context is at least stream_long_ctx keeps one weight copy in flight a stream block
//    (DecodeStreamParams::one_in_flight): shorter loaded round trips for its attention's chain,
//    which pays from ~1,536 tokens of context and costs below (perf-log 2026-11-30 23:18).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace phishard {

struct DecodeVariantRules {
  static constexpr int kFc1Narrow = 1;
  static constexpr int kShortContext = 2;
  static constexpr int kWarpHeads = 4;
  static constexpr int kStreamLong = 8;
  static constexpr int kVariants = 16;  // every combination of the bits (not all possible)

  int fc1_sms = 0;  // 0: no SM target
  int fc1_min_rows = 0, fc1_max_rows = -1;
  int64_t fc1_min_kv = 0;  // summed context from which fc1 takes its target
  bool sharded = false;    // tensor-parallel steps take neither short-context form
  bool mha = false;        // every query head has its own K/V head (ShortRegs needs it)
  int fold_rows = 0;       // decode_attention_fold_rows: steps up to it always fold
  int fold_short_rows = 0, fold_short_ctx = 0;
  int short_regs_rows = 0, short_regs_ctx = 0;
  int num_heads = 0;           // query heads (this rank's)
  int64_t warp_min_warps = 0;  // 0: no kWarpHeads
  int warp_ctx = 0;
  int64_t warp_more_warps = 0;
  int warp_more_ctx = 0;
  int stream_long_ctx = -1;  // < 0: no kStreamLong (no decode stream, or never one in flight)

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
  bool WarpHeads(int rows, int64_t kv_tokens, int live) const {
    // Not in the rows that fold (their fused attention launch is the register-staged kernel's).
    if (sharded || !mha || warp_min_warps <= 0 || rows <= std::max(fold_rows, fold_short_rows)) {
      return false;
    }
    const int64_t warps = static_cast<int64_t>(live) * num_heads;
    return (warps >= warp_min_warps && MeanAtMost(kv_tokens, live, warp_ctx)) ||
           (warps >= warp_more_warps && MeanAtMost(kv_tokens, live, warp_more_ctx));
  }
  bool StreamLong(int rows, int64_t kv_tokens) const {
    return stream_long_ctx >= 0 && rows == 1 && kv_tokens >= stream_long_ctx;
  }
  // The variant of a step of `rows` rows whose `live` sequences' contexts sum to kv_tokens.
  int Variant(int rows, int64_t kv_tokens, int live) const {
    const bool warp = WarpHeads(rows, kv_tokens, live);
    const bool short_context =
        !warp && (FoldShort(rows, kv_tokens, live) || ShortRegs(rows, kv_tokens, live));
    return (Fc1Narrow(rows, kv_tokens) ? kFc1Narrow : 0) | (short_context ? kShortContext : 0) |
           (warp ? kWarpHeads : 0) | (StreamLong(rows, kv_tokens) ? kStreamLong : 0);
  }
  // Whether some step of a `rows`-row bucket (at most `rows` live sequences) can be in `variant`.
  bool Possible(int rows, int variant) const {
    if ((variant & kStreamLong) != 0) {  // with whatever else a 1-row step of a long context takes
      return StreamLong(rows, std::numeric_limits<int64_t>::max()) &&
             PossibleWithoutStream(rows, variant & ~kStreamLong);
    }
    return PossibleWithoutStream(rows, variant);
  }

 private:
  bool PossibleWithoutStream(int rows, int variant) const {
    const bool narrow = (variant & kFc1Narrow) != 0, short_context = (variant & kShortContext) != 0;
    const bool warp = (variant & kWarpHeads) != 0;
    if (narrow && !Fc1Narrow(rows, std::numeric_limits<int64_t>::max())) return false;
    if (warp) {  // never with the short-context bit; with fc1's target only where a summed
                 // context >= its bound can still take the warp kernel (a mean within bounds)
      return !short_context && WarpHeads(rows, 0, rows) &&
             (!narrow || WarpHeads(rows, fc1_min_kv, rows));
    }
    if (short_context && !FoldShort(rows, 0, rows) && !ShortRegs(rows, 0, rows)) return false;
    // Both: a summed context >= the fc1 bound with a mean <= the short one (of the form these rows
    // take), over <= rows sequences.
    const int short_ctx = ShortRegsRows(rows) ? short_regs_ctx : fold_short_ctx;
    return !(narrow && short_context) || MeanAtMost(fc1_min_kv, rows, short_ctx);
  }
};

}  // namespace phishard
