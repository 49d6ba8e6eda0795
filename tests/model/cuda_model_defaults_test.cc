// The CUDA model's shape-derived tuning defaults (model/cuda_model_options.h) — host code, no GPU:
// the decode attention fold's row bound, the ShortRegs context bound and the K/V bound of fc1's SM
// count target.
#include "gtest/gtest.h"
#include "model/cuda_model_options.h"

namespace phishard {
namespace {

TEST(CudaModelDefaults, FoldRowsFollowTheHeadDim) {
  EXPECT_EQ(DecodeAttentionFoldRowsDefault(80), kDecodeAttentionFoldRowsDefault);      // Phi-2
  EXPECT_EQ(DecodeAttentionFoldRowsDefault(64), 2 * kDecodeAttentionFoldRowsDefault);  // Phi-1.5
  EXPECT_EQ(DecodeAttentionFoldRowsDefault(32), 2 * kDecodeAttentionFoldRowsDefault);
}

// The ShortRegs steps' context bound follows the pipelined decode attention's lanes a key: 256
// where a head's 16-byte slices fill 8 lanes (head dims a multiple of 64), 160 where that kernel
// takes 4 lanes (16, 32, 80, 96: PipeLanesPerKey in kernels/cuda/paged_decode_common.cuh).
TEST(CudaModelDefaults, ShortRegsContextFollowsTheHeadDim) {
  EXPECT_EQ(DecodeShortRegsCtxDefault(64), 256);  // Phi-1.5
  EXPECT_EQ(DecodeShortRegsCtxDefault(128), 256);
  EXPECT_EQ(DecodeShortRegsCtxDefault(80), 160);  // Phi-2
  EXPECT_EQ(DecodeShortRegsCtxDefault(96), 160);
  EXPECT_EQ(DecodeShortRegsCtxDefault(32), 160);
}

// Where a layer's K/V bytes (summed context x 2 x kv heads x head dim) reach 1.6 x fc1's weights
// (hidden x intermediate): Phi-2 8,192 tokens (the measured neutral point), Phi-1.5 6,554; a
// model with few KV heads needs far more context before the attention is worth the SMs.
TEST(CudaModelDefaults, Fc1KvBoundScalesWithTheShape) {
  EXPECT_EQ(DecodeFc1SmsMinKvTokensDefault(2560, 10240, 32, 80), 8192);
  EXPECT_EQ(DecodeFc1SmsMinKvTokensDefault(2048, 8192, 32, 64), 6554);
  EXPECT_EQ(DecodeFc1SmsMinKvTokensDefault(2560, 10240, 4, 80), 8 * 8192);
  EXPECT_GT(DecodeFc1SmsMinKvTokensDefault(256, 1024, 8, 32), 0);
  EXPECT_GT(DecodeFc1SmsMinKvTokensDefault(256, 1024, 0, 32), 0) << "a zero KV width stays finite";
}

}  // namespace
}  // namespace phishard
