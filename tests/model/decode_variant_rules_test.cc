// DecodeVariantRules (model/decode_variant_rules.h) on the host: which graph variant a decode step
// takes and which variants warm-up captures per bucket, at the CUDA model's default settings
// (model/cuda_model_options.h) for Phi-2, Phi-1.5, the embedded tiny-phi-code and a GQA model.
#include "model/decode_variant_rules.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "model/cuda_model_options.h"

namespace phishard {
namespace {

using R = DecodeVariantRules;

constexpr int kSms = 132;  // an H100 / H200

// The rules CudaPhiModel::VariantRules builds from its defaults for a model of this head shape.
R Defaults(int hidden, int intermediate, int heads, int kv_heads, int head_dim) {
  return R{.fc1_sms = kDecodeFc1SmsDefault,
           .fc1_min_rows = kDecodeFc1SmsMinRows,
           .fc1_max_rows = kDecodeFc1SmsMaxRows,
           .fc1_min_kv = DecodeFc1SmsMinKvTokensDefault(hidden, intermediate, kv_heads, head_dim),
           .sharded = false,
           .mha = heads == kv_heads,
           .fold_rows = DecodeAttentionFoldRowsDefault(head_dim),
           .fold_short_rows = kDecodeFoldShortRowsDefault,
           .fold_short_ctx = kDecodeFoldShortCtxDefault,
           .short_regs_rows = kDecodeShortRegsRowsDefault,
           .short_regs_ctx = DecodeShortRegsCtxDefault(head_dim),
           .num_heads = heads,
           .warp_min_warps = int64_t{kDecodeWarpHeadsMinWarpsPerSm} * kSms,
           .warp_ctx = kDecodeWarpHeadsCtx,
           .warp_more_warps = int64_t{kDecodeWarpHeadsMoreWarpsPerSm} * kSms,
           .warp_more_ctx = kDecodeWarpHeadsMoreCtx,
           .stream_long_ctx = kDecodeStreamOneInFlightCtxDefault};  // (the stream on: the default)
}
R Phi2() { return Defaults(2560, 10240, 32, 32, 80); }
R Phi15() { return Defaults(2048, 8192, 32, 32, 64); }

// Graphs warm-up captures over these buckets (CudaPhiModel::planned_decode_graphs).
int Planned(const R& r, const std::vector<int>& buckets) {
  int n = 0;
  for (int b : buckets) {
    for (int v = 0; v < R::kVariants; ++v) n += r.Possible(b, v) ? 1 : 0;
  }
  return n;
}

TEST(DecodeVariantRules, Phi2StepsByRowsAndContext) {
  const R r = Phi2();
  // b1-b8 fold always (no variant); b8 at ctx1024 (8,192 tokens) takes fc1's target.
  EXPECT_EQ(r.Variant(1, 1024, 1), 0);
  EXPECT_EQ(r.Variant(8, 8 * 128, 8), 0);
  EXPECT_EQ(r.Variant(8, 8 * 1024, 8), R::kFc1Narrow);
  // b16 ctx128: the fold of short contexts; ctx1024: fc1's target; ctx512 (8,192): both.
  EXPECT_EQ(r.Variant(16, 16 * 128, 16), R::kShortContext);
  EXPECT_EQ(r.Variant(16, 16 * 1024, 16), R::kFc1Narrow);
  EXPECT_EQ(r.Variant(16, 16 * 512, 16), R::kFc1Narrow);  // mean 512 > 256
  EXPECT_EQ(r.Variant(16, 16 * 256 + 0, 16), R::kShortContext);
  // b32 short: the fold; b64-b256 short: the register-staged kernel, same bit.
  EXPECT_TRUE(r.FoldShort(32, 32 * 128, 32));
  EXPECT_FALSE(r.ShortRegs(32, 32 * 128, 32));
  EXPECT_TRUE(r.ShortRegs(64, 64 * 128, 64));
  EXPECT_FALSE(r.FoldShort(64, 64 * 128, 64));
  EXPECT_TRUE(r.ShortRegs(256, 256 * 128, 256));
  EXPECT_EQ(r.Variant(128, 128 * 128, 128), R::kShortContext);
  EXPECT_EQ(r.Variant(128, 128 * 1024, 128), 0);
  // 256 live sequences of 32 heads fill the GPU (8,192 warps): the warp kernel up to a mean
  // context of 512, ahead of ShortRegs; above short_regs_rows (the eager path past the largest
  // bucket) too; not at ctx1024.
  EXPECT_EQ(r.Variant(256, 256 * 128, 256), R::kWarpHeads);
  EXPECT_EQ(r.Variant(256, 256 * 512, 256), R::kWarpHeads);
  EXPECT_EQ(r.Variant(256, 256 * 1024, 256), 0);
  EXPECT_EQ(r.Variant(300, 300 * 128, 300), R::kWarpHeads);
  // The mean is over the live sequences, not the bucket's rows: 40 live of a 64-row bucket.
  EXPECT_EQ(r.Variant(64, 40 * 160, 40), R::kShortContext);
  EXPECT_EQ(r.Variant(64, 40 * 161, 40), 0);
}

// Each short form has its own context bound: the fold's 256 tokens; ShortRegs' 160 at head dim 80
// (the pipelined kernel's 4 lanes a key: faster there than the register-staged one from ~192)
// and 256 at head dim 64.
TEST(DecodeVariantRules, ShortFormsHaveTheirOwnContextBounds) {
  const R phi2 = Phi2(), phi15 = Phi15();
  EXPECT_EQ(phi2.short_regs_ctx, 160);
  EXPECT_EQ(phi15.short_regs_ctx, 256);
  EXPECT_TRUE(phi2.FoldShort(32, 32 * 256, 32));
  EXPECT_TRUE(phi2.ShortRegs(128, 128 * 160, 128));
  EXPECT_FALSE(phi2.ShortRegs(128, 128 * 192, 128));
  EXPECT_EQ(phi2.Variant(128, 128 * 192, 128), 0);
  EXPECT_TRUE(phi15.ShortRegs(128, 128 * 256, 128));
  EXPECT_EQ(phi15.Variant(128, 128 * 256, 128), R::kShortContext);
  EXPECT_EQ(phi15.Variant(128, 128 * 257, 128), 0);
  // Only the bound of the form the rows take counts.
  R r = Phi2();
  r.short_regs_ctx = 64;
  EXPECT_TRUE(r.FoldShort(32, 32 * 256, 32));
  EXPECT_FALSE(r.ShortRegs(64, 64 * 128, 64));
  r = Phi2();
  r.fold_short_ctx = 64;
  EXPECT_FALSE(r.FoldShort(32, 32 * 128, 32));
  EXPECT_TRUE(r.ShortRegs(64, 64 * 128, 64));
}

TEST(DecodeVariantRules, ShortFormsAreDisjointAndNeedTheirModels) {
  for (const R& r : {Phi2(), Phi15()}) {
    // The short-context bit is possible exactly where one of the two forms applies, never both.
    for (int rows = 1; rows <= 512; ++rows) {
      EXPECT_FALSE(r.FoldShort(rows, 0, rows) && r.ShortRegs(rows, 0, rows)) << rows;
      EXPECT_EQ(r.Possible(rows, R::kShortContext),
                r.FoldShort(rows, 0, rows) || r.ShortRegs(rows, 0, rows))
          << rows;
    }
    EXPECT_TRUE(r.FoldShort(r.fold_rows + 1, 0, 1));
    EXPECT_TRUE(r.ShortRegs(kDecodeFoldShortRowsDefault + 1, 0, 1));
    EXPECT_FALSE(r.ShortRegs(kDecodeShortRegsRowsDefault + 1, 0, 1));
  }
  R gqa = Defaults(2560, 10240, 32, 8, 80);
  EXPECT_FALSE(gqa.ShortRegs(128, 0, 128)) << "GQA keeps the pipelined kernel";
  EXPECT_TRUE(gqa.FoldShort(16, 0, 16)) << "the fold serves GQA";
  R tp = Phi2();
  tp.sharded = true;
  EXPECT_FALSE(tp.FoldShort(16, 0, 16));
  EXPECT_FALSE(tp.ShortRegs(128, 0, 128));
  R off = Phi2();
  off.short_regs_rows = 0;
  EXPECT_FALSE(off.ShortRegs(128, 0, 128));
  EXPECT_TRUE(off.FoldShort(32, 0, 32)) << "switching ShortRegs off leaves the fold";
  R no_fold = Phi2();
  no_fold.fold_rows = 0;  // no step folds; ShortRegs then starts above fold_short_rows
  EXPECT_FALSE(no_fold.FoldShort(16, 0, 16));
  EXPECT_FALSE(no_fold.ShortRegs(32, 0, 32));
  EXPECT_TRUE(no_fold.ShortRegs(33, 0, 33));
}

// The one-warp-a-head kernel (kWarpHeads): by the live sequences' query heads against the SM count
// and their mean context — from 36 an SM (4,752 at 132 SMs: 149 live Phi-2 sequences) up to a mean
// of 256, from 44 an SM (5,808: 182 sequences) up to 512; MHA and unsharded only, above the fold's
// rows; never together with the short-context bit.
TEST(DecodeVariantRules, WarpHeadsByHeadsAndContext) {
  const R r = Phi2();
  EXPECT_FALSE(r.WarpHeads(256, 148 * 128, 148));
  EXPECT_TRUE(r.WarpHeads(256, 149 * 128, 149));
  EXPECT_TRUE(r.WarpHeads(256, 160 * 256, 160));
  EXPECT_FALSE(r.WarpHeads(256, 160 * 256 + 1, 160)) << "mean above 256 below 44 an SM";
  EXPECT_FALSE(r.WarpHeads(256, 181 * 512, 181));
  EXPECT_TRUE(r.WarpHeads(256, 182 * 512, 182));
  EXPECT_FALSE(r.WarpHeads(256, 182 * 512 + 1, 182));
  EXPECT_FALSE(r.WarpHeads(256, 256 * 1024, 256)) << "long contexts keep the pipelined kernel";
  // A 256-row bucket: 160 live at ctx128 takes it instead of ShortRegs; 140 live keeps ShortRegs.
  EXPECT_EQ(r.Variant(256, 160 * 128, 160), R::kWarpHeads);
  EXPECT_EQ(r.Variant(256, 140 * 128, 140), R::kShortContext);
  EXPECT_EQ(r.Variant(256, 140 * 1024, 140), 0);
  // Possible: the 256 bucket (and wider), not 128 (4,096 warps at most).
  EXPECT_TRUE(r.Possible(256, R::kWarpHeads));
  EXPECT_FALSE(r.Possible(128, R::kWarpHeads));
  EXPECT_FALSE(r.Possible(256, R::kWarpHeads | R::kShortContext));
  for (int rows = 1; rows <= 512; ++rows) {
    for (int live : {rows / 2 + 1, rows}) {
      for (int ctx : {64, 256, 257, 512, 513, 4096}) {
        const int v = r.Variant(rows, static_cast<int64_t>(live) * ctx, live);
        EXPECT_TRUE(r.Possible(rows, v)) << rows << " " << live << " " << ctx;
        EXPECT_FALSE((v & R::kWarpHeads) && (v & R::kShortContext));
      }
    }
  }
  R gqa = Defaults(2560, 10240, 32, 8, 80);
  EXPECT_FALSE(gqa.WarpHeads(256, 256 * 128, 256)) << "GQA keeps the pipelined kernel";
  R tp = Phi2();
  tp.sharded = true;
  EXPECT_FALSE(tp.WarpHeads(256, 256 * 128, 256));
  R off = Phi2();
  off.warp_min_warps = 0;  // decode_warp_heads off
  EXPECT_FALSE(off.WarpHeads(256, 256 * 128, 256));
  EXPECT_EQ(off.Variant(256, 256 * 128, 256), R::kShortContext);
  // 64 heads (a wider model): 128 live sequences reach 8,192 warps.
  const R wide = Defaults(4096, 16384, 64, 64, 64);
  EXPECT_EQ(wide.Variant(128, 128 * 512, 128), R::kWarpHeads);
  EXPECT_EQ(wide.Variant(128, 128 * 513, 128), 0);
  EXPECT_TRUE(wide.Possible(128, R::kWarpHeads));
  EXPECT_FALSE(wide.WarpHeads(32, 32 * 128, 32 * 1000)) << "rows that fold keep the fold";
}

// The decode stream's long-context bit: 1-row steps only, from the bound on; none without the
// stream (stream_long_ctx < 0); bound 0: every 1-row step.
TEST(DecodeVariantRules, StreamLongOnlyForOneRowFromItsBound) {
  R r = Phi2();
  EXPECT_EQ(r.Variant(1, 1535, 1), 0);
  EXPECT_EQ(r.Variant(1, 1536, 1), R::kStreamLong);
  EXPECT_EQ(r.Variant(1, 4096, 1), R::kStreamLong);
  EXPECT_EQ(r.Variant(2, 2 * 4096, 2), 0);  // the stream takes 1-row steps only
  EXPECT_TRUE(r.Possible(1, R::kStreamLong));
  EXPECT_FALSE(r.Possible(2, R::kStreamLong));
  EXPECT_FALSE(r.Possible(1, R::kStreamLong | R::kFc1Narrow));  // (fc1's rows start at 5)
  r.stream_long_ctx = -1;
  EXPECT_EQ(r.Variant(1, 4096, 1), 0);
  EXPECT_FALSE(r.Possible(1, R::kStreamLong));
  r.stream_long_ctx = 0;
  EXPECT_EQ(r.Variant(1, 0, 0), R::kStreamLong);
  EXPECT_EQ(r.Variant(1, 7, 1), R::kStreamLong);
}

// Warm-up's graph count: every bucket's variant 0, the stream's long-context variant of bucket 1,
// fc1's target at 8 and 16, the short-context variant above the fold's rows; both bits only where
// a summed context can reach fc1's bound with a short mean (Phi-2 at 16 rows: 16 x 256 = 4,096 <
// 8,192, so not there).
TEST(DecodeVariantRules, PlannedGraphsPerModel) {
  const std::vector<int> buckets = {1, 2, 4, 8, 16, 32, 64, 128, 256};
  // Phi-2 (fold rows 8): 9 + stream {1} + fc1 {8, 16} + short {16, 32, 64, 128, 256} + warp {256}
  // = 18.
  EXPECT_FALSE(Phi2().Possible(16, R::kFc1Narrow | R::kShortContext));
  EXPECT_FALSE(Phi2().Possible(8, R::kShortContext));
  EXPECT_EQ(Planned(Phi2(), buckets), 18);
  R wide = Phi2();  // a bound the short mean can reach: both bits at 16 rows
  wide.fc1_min_kv = 16 * 256;
  EXPECT_TRUE(wide.Possible(16, R::kFc1Narrow | R::kShortContext));
  EXPECT_EQ(wide.Variant(16, 16 * 256, 16), R::kFc1Narrow | R::kShortContext);
  // Phi-1.5 (head_dim 64: fold rows 16): 9 + stream {1} + fc1 {8, 16} + short {32, 64, 128,
  // 256} + warp {256} = 17.
  EXPECT_FALSE(Phi15().Possible(16, R::kShortContext));
  EXPECT_EQ(Planned(Phi15(), buckets), 17);
  // tiny-phi-code (MHA 8 x 32, hidden 256; max_graph_batch 48 as in cuda_graph_test): 7 + stream
  // {1} + fc1 {8, 16} + short {32 (fold), 48 (ShortRegs)} = 12.
  const R tiny = Defaults(256, 1024, 8, 8, 32);
  EXPECT_EQ(Planned(tiny, {1, 2, 4, 8, 16, 32, 48}), 12);
  // A GQA model of Phi-2's width (8 K/V heads): no ShortRegs buckets; fc1's bound, 4 x 8,192
  // tokens, is out of reach of a short mean at 16 rows.
  const R gqa = Defaults(2560, 10240, 32, 8, 80);
  EXPECT_FALSE(gqa.Possible(16, R::kFc1Narrow | R::kShortContext));
  EXPECT_EQ(Planned(gqa, buckets), 9 + 1 + 2 + 2);
}

}  // namespace
}  // namespace phishard
