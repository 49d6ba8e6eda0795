#include "kernels/rotary_kv_write.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using testing_util::CacheIndex;
using testing_util::kF32Unit;
using testing_util::Poisoned;
using testing_util::RandomVector;

struct Case {
  int num_heads, num_kv_heads, head_dim, rotary_dim;
};

class RotaryKvWriteTest : public ::testing::TestWithParam<Case> {};

// Naive rotate-half in double on one head (rot dims only), straight from the HF formula
// q_embed = q * cos + rotate_half(q) * sin with cos/sin = cat(freqs, freqs).
std::vector<double> NaiveRotate(const float* x, int head_dim, int rot, int pos, double theta) {
  std::vector<double> out(x, x + head_dim);
  const int half = rot / 2;
  for (int i = 0; i < rot; ++i) {
    const int j = i % half;
    const double angle = pos * std::pow(theta, -2.0 * j / rot);
    const double rotated_half = i < half ? -x[i + half] : x[i - half];
    out[i] = x[i] * std::cos(angle) + rotated_half * std::sin(angle);
  }
  return out;
}

// Tolerance: float32 computes inv_freq (<= 2 u relative, pow + divide) and the angle p * inv_freq
// (1 u) like the HF reference does, so the angle carries up to 3 u * p absolute error -- inherent
// to fp32 rotary, ~1.8e-4 rad at p = 1023 -- and each rotated output then errs by that times |x1| +
// |x2|, plus ~4 u for cos/sin and the two products. We allow 2x:
//   tol = 2 (3 p + 4) u (|x1| + |x2|).
// Unrotated dims and V must be copied bit-exactly.
TEST_P(RotaryKvWriteTest, MatchesNaiveReferenceAndWritesOnlyItsSlots) {
  const Case c = GetParam();
  const int block_size = 16, num_blocks = 70;
  const int64_t num_slots = static_cast<int64_t>(num_blocks) * block_size;
  const std::vector<int32_t> positions = {0, 1, 7, 15, 16, 17, 39, 200, 1023};
  const int T = static_cast<int>(positions.size());
  const int width = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
  const int stride = width + 3;  // padding columns must stay untouched
  const int kv_row = c.num_kv_heads * c.head_dim;
  const float theta = 10000.0f;

  std::vector<float> qkv = Poisoned(static_cast<size_t>(T) * stride);
  const std::vector<float> vals = RandomVector(static_cast<size_t>(T) * width, c.head_dim);
  for (int t = 0; t < T; ++t) {
    std::copy_n(vals.begin() + static_cast<size_t>(t) * width, width, qkv.begin() + t * stride);
  }
  const std::vector<float> qkv_in = qkv;
  // Distinct pseudo-random slots, including the first and the last of the pool.
  std::vector<int64_t> all(num_slots);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin() + 1, all.end() - 1, std::mt19937(c.head_dim));
  std::vector<int64_t> slots(all.begin(), all.begin() + T - 1);
  slots.push_back(num_slots - 1);
  std::vector<float> k_cache = Poisoned(num_slots * kv_row), v_cache = Poisoned(num_slots * kv_row);

  RotaryKvWriteParams p{.qkv = qkv.data(),
                        .positions = positions.data(),
                        .slots = slots.data(),
                        .k_cache = k_cache.data(),
                        .v_cache = v_cache.data(),
                        .num_slots = num_slots,
                        .block_size = block_size,
                        .num_tokens = T,
                        .qkv_stride = stride,
                        .num_heads = c.num_heads,
                        .num_kv_heads = c.num_kv_heads,
                        .head_dim = c.head_dim,
                        .rotary_dim = c.rotary_dim,
                        .theta = theta};
  ASSERT_EQ(RotaryKvWriteCpu(p), KernelStatus::kOk);

  for (int t = 0; t < T; ++t) {
    const float* in = qkv_in.data() + t * stride;
    const float* out = qkv.data() + t * stride;
    for (int h = 0; h < c.num_heads + c.num_kv_heads; ++h) {  // Q heads then K heads
      const float* x = in + h * c.head_dim;
      const std::vector<double> ref = NaiveRotate(x, c.head_dim, c.rotary_dim, positions[t], theta);
      for (int d = 0; d < c.head_dim; ++d) {
        const float got = out[h * c.head_dim + d];
        if (d >= c.rotary_dim) {
          ASSERT_EQ(got, x[d]) << "pass-through dim changed: t=" << t << " h=" << h << " d=" << d;
          continue;
        }
        const int half = c.rotary_dim / 2;
        const double mag = std::fabs(x[d % half]) + std::fabs(x[d % half + half]);
        const double tol = 2.0 * (3.0 * positions[t] + 4.0) * kF32Unit * mag;
        ASSERT_NEAR(got, ref[d], tol)
            << "t=" << t << " pos=" << positions[t] << " h=" << h << " d=" << d;
      }
    }
    // V is not rotated; padding columns stay NaN.
    for (int i = (c.num_heads + c.num_kv_heads) * c.head_dim; i < width; ++i) {
      ASSERT_EQ(out[i], in[i]);
    }
    for (int i = width; i < stride; ++i) ASSERT_TRUE(std::isnan(out[i]));
    // The cache rows of this token's slot hold exactly the rotated K and the V.
    const float* k = out + c.num_heads * c.head_dim;
    for (int h = 0; h < c.num_kv_heads; ++h) {
      for (int d = 0; d < c.head_dim; ++d) {
        const size_t i = CacheIndex(slots[t], h, d, block_size, c.num_kv_heads, c.head_dim);
        ASSERT_EQ(k_cache[i], k[h * c.head_dim + d]);
        ASSERT_EQ(v_cache[i], k[kv_row + h * c.head_dim + d]);
      }
    }
  }
  // Every other slot is untouched.
  std::vector<bool> used(num_slots, false);
  for (int64_t s : slots) used[s] = true;
  for (int64_t s = 0; s < num_slots; ++s) {
    if (used[s]) continue;
    for (int h = 0; h < c.num_kv_heads; ++h) {
      for (int d = 0; d < c.head_dim; ++d) {
        const size_t i = CacheIndex(s, h, d, block_size, c.num_kv_heads, c.head_dim);
        ASSERT_TRUE(std::isnan(k_cache[i]) && std::isnan(v_cache[i])) << "slot " << s << " written";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Heads, RotaryKvWriteTest,
                         ::testing::Values(Case{4, 4, 64, 32},   // Phi-1.5 style, partial 0.5
                                           Case{8, 2, 80, 32},   // GQA, Phi-2 partial 0.4
                                           Case{3, 1, 80, 80},   // full rotary, MQA
                                           Case{2, 2, 32, 16},   // tiny-phi-code
                                           Case{2, 1, 64, 0}));  // no rotary at all

// The fold (RotaryKvWriteParams::fold_delta, LoRA decode steps): the same outputs, bit for bit, as
// adding the delta to q | k | v first (float32: the same single add) and running the plain op;
// columns past the q | k | v width stay untouched, and a short ld_fold is refused.
TEST(RotaryKvWrite, FoldEqualsAddThenPlain) {
  const int nH = 3, nKV = 1, hd = 8, T = 4, stride = 45, ld = 50;
  const int width = (nH + 2 * nKV) * hd;
  const std::vector<float> qkv_in = RandomVector(T * stride, 21);
  const std::vector<float> delta = RandomVector(T * ld, 22, -0.1f, 0.1f);
  const std::vector<int32_t> positions = {3, 9, 100, 7};
  const std::vector<int64_t> slots = {5, 0, 9, 2};
  auto params = [&](std::vector<float>& qkv, std::vector<float>& kc, std::vector<float>& vc,
                    const float* fold, int ld_fold) {
    return RotaryKvWriteParams{.qkv = qkv.data(),
                               .positions = positions.data(),
                               .slots = slots.data(),
                               .k_cache = kc.data(),
                               .v_cache = vc.data(),
                               .num_slots = 10,
                               .block_size = 5,
                               .num_tokens = T,
                               .qkv_stride = stride,
                               .num_heads = nH,
                               .num_kv_heads = nKV,
                               .head_dim = hd,
                               .rotary_dim = 4,
                               .fold_delta = fold,
                               .ld_fold = ld_fold};
  };
  auto run = [&](std::vector<float>& qkv, std::vector<float>& kc, std::vector<float>& vc,
                 const float* fold) {
    kc = Poisoned(10 * nKV * hd);
    vc = Poisoned(10 * nKV * hd);
    return RotaryKvWriteCpu(params(qkv, kc, vc, fold, ld));
  };
  std::vector<float> a = qkv_in, b = qkv_in, ka, va, kb, vb;
  for (int t = 0; t < T; ++t) {
    for (int c = 0; c < width; ++c) b[t * stride + c] += delta[t * ld + c];
  }
  ASSERT_EQ(run(a, ka, va, delta.data()), KernelStatus::kOk);
  ASSERT_EQ(run(b, kb, vb, nullptr), KernelStatus::kOk);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << "qkv at " << i;
  for (size_t i = 0; i < ka.size(); ++i) {
    ASSERT_TRUE(std::isnan(ka[i]) ? std::isnan(kb[i]) : ka[i] == kb[i]) << "k cache at " << i;
    ASSERT_TRUE(std::isnan(va[i]) ? std::isnan(vb[i]) : va[i] == vb[i]) << "v cache at " << i;
  }
  EXPECT_NE(a, qkv_in);
  std::vector<float> c = qkv_in;
  // A fold whose rows are narrower than q + k + v is refused.
  EXPECT_EQ(RotaryKvWriteCpu(params(c, ka, va, delta.data(), width - 1)),
            KernelStatus::kInvalidShape);
}

TEST(RotaryKvWrite, BadSlotOrPositionChangesNothing) {
  const int nH = 2, nKV = 1, hd = 8, T = 3;
  const int width = (nH + 2 * nKV) * hd;
  std::vector<float> qkv = RandomVector(T * width, 1);
  const std::vector<float> qkv_in = qkv;
  std::vector<int32_t> positions = {0, 1, 2};
  std::vector<int64_t> slots = {0, 1, 32};  // 32 == num_slots: out of range
  std::vector<float> k_cache = Poisoned(32 * nKV * hd), v_cache = Poisoned(32 * nKV * hd);
  RotaryKvWriteParams p{.qkv = qkv.data(),
                        .positions = positions.data(),
                        .slots = slots.data(),
                        .k_cache = k_cache.data(),
                        .v_cache = v_cache.data(),
                        .num_slots = 32,
                        .block_size = 16,
                        .num_tokens = T,
                        .num_heads = nH,
                        .num_kv_heads = nKV,
                        .head_dim = hd,
                        .rotary_dim = 4};
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kOutOfRange);
  slots[2] = -1;
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kOutOfRange);
  slots[2] = 2;
  positions[1] = -5;
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kOutOfRange);
  EXPECT_EQ(qkv, qkv_in);
  for (float v : k_cache) ASSERT_TRUE(std::isnan(v));
  positions[1] = 1;
  p.rotary_dim = 3;  // odd
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kInvalidShape);
  p.rotary_dim = 10;  // > head_dim
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kInvalidShape);
  p.rotary_dim = 4;
  p.qkv_stride = width - 1;
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kInvalidShape);
  p.qkv_stride = 0;
  p.block_size = 0;  // a cache write needs the block size (the layout's second extent)
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kInvalidShape);
  p.block_size = 5;  // does not divide num_slots
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kInvalidShape);
  p.block_size = 16;
  p.dtype = DataType::kBF16;
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kUnsupportedDtype);
  p.dtype = DataType::kF32;
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kOk);
}

// write_cache = false: the same rotation as with the write (bit for bit: the same code computes
// it), no cache access at all (null caches and slots are accepted), and a given slot list is
// still checked.
TEST(RotaryKvWrite, RotateOnlyLeavesTheCache) {
  const int nH = 4, nKV = 2, hd = 16, T = 5;
  const int width = (nH + 2 * nKV) * hd;
  std::vector<float> with_write = RandomVector(T * width, 3);
  std::vector<float> rotate_only = with_write;
  std::vector<int32_t> positions = {0, 3, 17, 300, 1023};
  std::vector<int64_t> slots = {4, 0, 9, 2, 7};
  std::vector<float> k_cache = Poisoned(16 * nKV * hd), v_cache = Poisoned(16 * nKV * hd);
  RotaryKvWriteParams p{.qkv = with_write.data(),
                        .positions = positions.data(),
                        .slots = slots.data(),
                        .k_cache = k_cache.data(),
                        .v_cache = v_cache.data(),
                        .num_slots = 16,
                        .block_size = 4,
                        .num_tokens = T,
                        .num_heads = nH,
                        .num_kv_heads = nKV,
                        .head_dim = hd,
                        .rotary_dim = 8};
  ASSERT_EQ(RotaryKvWriteCpu(p), KernelStatus::kOk);
  std::vector<float> k2 = Poisoned(k_cache.size()), v2 = Poisoned(v_cache.size());
  RotaryKvWriteParams r = p;
  r.qkv = rotate_only.data();
  r.k_cache = k2.data();
  r.v_cache = v2.data();
  r.write_cache = false;
  ASSERT_EQ(RotaryKvWriteCpu(r), KernelStatus::kOk);
  EXPECT_EQ(rotate_only, with_write);
  for (float v : k2) ASSERT_TRUE(std::isnan(v));
  for (float v : v2) ASSERT_TRUE(std::isnan(v));
  r.slots = nullptr;
  r.k_cache = r.v_cache = nullptr;
  std::vector<float> again = RandomVector(T * width, 3);
  r.qkv = again.data();
  ASSERT_EQ(RotaryKvWriteCpu(r), KernelStatus::kOk);
  EXPECT_EQ(again, with_write);
  r.slots = slots.data();
  slots[2] = 16;  // out of range: still refused when slots are given
  EXPECT_EQ(RotaryKvWriteCpu(r), KernelStatus::kOutOfRange);
}

// Linear RoPE scaling (RotaryKvWriteParams::rope_factor): every frequency divided by the factor,
// against the naive double rotation with angle p theta^(-2j / rot) / factor. Tolerance as
// RotaryKvWriteTest's, one more float32 rounding (the division) in the angle:
//   tol = 2 (4 p + 4) u (|x1| + |x2|).
TEST(RotaryKvWrite, LinearScalingDividesTheFrequencies) {
  const int nH = 2, nKV = 1, hd = 16, rot = 8, half = rot / 2, T = 4;
  const int width = (nH + 2 * nKV) * hd;
  const float factor = 2.5f;
  const std::vector<float> in = RandomVector(T * width, 51);
  std::vector<float> qkv = in;
  const std::vector<int32_t> positions = {0, 7, 300, 2047};
  RotaryKvWriteParams p{.qkv = qkv.data(),
                        .positions = positions.data(),
                        .num_tokens = T,
                        .num_heads = nH,
                        .num_kv_heads = nKV,
                        .head_dim = hd,
                        .rotary_dim = rot,
                        .rope_factor = factor,
                        .write_cache = false};
  ASSERT_EQ(RotaryKvWriteCpu(p), KernelStatus::kOk);
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < nH + nKV; ++h) {
      const float* x = in.data() + t * width + h * hd;
      for (int d = 0; d < hd; ++d) {
        const float got = qkv[t * width + h * hd + d];
        if (d >= rot) {
          ASSERT_EQ(got, x[d]);
          continue;
        }
        const int j = d % half;
        const double angle = positions[t] * std::pow(10000.0, -2.0 * j / rot) / factor;
        const double ref = d < half ? x[j] * std::cos(angle) - x[j + half] * std::sin(angle)
                                    : x[j + half] * std::cos(angle) + x[j] * std::sin(angle);
        const double mag = std::fabs(x[j]) + std::fabs(x[j + half]);
        ASSERT_NEAR(got, ref, 2.0 * (4.0 * positions[t] + 4.0) * kF32Unit * mag)
            << "t=" << t << " h=" << h << " d=" << d;
      }
    }
  }
  p.rope_factor = 0.0f;  // no scaling is 1, not 0
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kInvalidShape);
}

// The q / k LayerNorm (RotaryKvWriteParams::q_norm_w, HF qk_layernorm): each Q and K head is
// normalised over head_dim with its own weight / bias pair (q_* for Q heads, k_* for K heads),
// then rotated; compared with a naive double LayerNorm + rotate-half. V and padding stay as they
// were, the cache holds the normalised, rotated K. Tolerance: the normalised value y carries
// ~5 u (|y| + |b|) (x - mean, * inv_std, inv_std itself, * w, + b, each one float32 rounding),
// which the rotation carries over onto its two inputs, plus RotaryKvWriteTest's angle error:
//   tol = 2 (3 p + 4) u (|y1| + |y2|) + 2 * 5 u (|y1| + |y2| + |b1| + |b2|).
// Heads with a constant value (var 0: y = b exactly up to the eps) are included.
TEST(RotaryKvWrite, QkNormThenRotateMatchesNaive) {
  const int nH = 4, nKV = 2, hd = 16, rot = 8, half = rot / 2, T = 5;
  const int width = (nH + 2 * nKV) * hd, stride = width + 2;
  const float eps = 1e-5f;
  std::vector<float> qkv = Poisoned(T * stride);
  const std::vector<float> vals = RandomVector(T * width, 31, -3.0f, 3.0f);
  for (int t = 0; t < T; ++t)
    std::copy_n(vals.begin() + t * width, width, qkv.begin() + t * stride);
  std::fill_n(qkv.begin() + 2 * stride + hd, hd, 0.75f);  // token 2, Q head 1: constant
  const std::vector<float> qkv_in = qkv;
  std::vector<float> qw = RandomVector(hd, 32, 0.8f, 1.2f), qb = RandomVector(hd, 33, -0.2f, 0.2f);
  std::vector<float> kw = RandomVector(hd, 34, 0.8f, 1.2f), kb = RandomVector(hd, 35, -0.2f, 0.2f);
  const std::vector<int32_t> positions = {0, 5, 17, 300, 1023};
  const std::vector<int64_t> slots = {3, 0, 9, 2, 7};
  std::vector<float> k_cache = Poisoned(16 * nKV * hd), v_cache = Poisoned(16 * nKV * hd);
  RotaryKvWriteParams p{.qkv = qkv.data(),
                        .positions = positions.data(),
                        .slots = slots.data(),
                        .k_cache = k_cache.data(),
                        .v_cache = v_cache.data(),
                        .num_slots = 16,
                        .block_size = 4,
                        .num_tokens = T,
                        .qkv_stride = stride,
                        .num_heads = nH,
                        .num_kv_heads = nKV,
                        .head_dim = hd,
                        .rotary_dim = rot,
                        .q_norm_w = qw.data(),
                        .q_norm_b = qb.data(),
                        .k_norm_w = kw.data(),
                        .k_norm_b = kb.data(),
                        .norm_eps = eps};
  ASSERT_EQ(RotaryKvWriteCpu(p), KernelStatus::kOk);
  for (int t = 0; t < T; ++t) {
    const float* in = qkv_in.data() + t * stride;
    const float* out = qkv.data() + t * stride;
    for (int h = 0; h < nH + nKV; ++h) {
      const float* w = h < nH ? qw.data() : kw.data();
      const float* b = h < nH ? qb.data() : kb.data();
      const float* x = in + h * hd;
      double mean = 0, var = 0;
      for (int d = 0; d < hd; ++d) mean += x[d];
      mean /= hd;
      for (int d = 0; d < hd; ++d) var += (x[d] - mean) * (x[d] - mean);
      var /= hd;
      std::vector<double> y(hd);
      for (int d = 0; d < hd; ++d) y[d] = (x[d] - mean) / std::sqrt(var + eps) * w[d] + b[d];
      for (int d = 0; d < hd; ++d) {
        double ref = y[d], mag = std::fabs(y[d]) + std::fabs(b[d]), angle_mag = 0;
        if (d < rot) {
          const int j = d % half;
          const double angle = positions[t] * std::pow(10000.0, -2.0 * j / rot);
          ref = d < half ? y[j] * std::cos(angle) - y[j + half] * std::sin(angle)
                         : y[j + half] * std::cos(angle) + y[j] * std::sin(angle);
          angle_mag = std::fabs(y[j]) + std::fabs(y[j + half]);
          mag = angle_mag + std::fabs(b[j]) + std::fabs(b[j + half]);
        }
        const double tol =
            2.0 * (3.0 * positions[t] + 4.0) * kF32Unit * angle_mag + 10.0 * kF32Unit * mag;
        ASSERT_NEAR(out[h * hd + d], ref, tol) << "t=" << t << " h=" << h << " d=" << d;
      }
    }
    for (int i = (nH + nKV) * hd; i < width; ++i) ASSERT_EQ(out[i], in[i]);  // V as it was
    for (int i = width; i < stride; ++i) ASSERT_TRUE(std::isnan(out[i]));
    for (int h = 0; h < nKV; ++h) {
      for (int d = 0; d < hd; ++d) {
        const size_t i = CacheIndex(slots[t], h, d, 4, nKV, hd);
        ASSERT_EQ(k_cache[i], out[(nH + h) * hd + d]);
        ASSERT_EQ(v_cache[i], out[(nH + nKV + h) * hd + d]);
      }
    }
  }
  // A norm needs all four vectors.
  p.k_norm_b = nullptr;
  EXPECT_EQ(RotaryKvWriteCpu(p), KernelStatus::kNullPointer);
}

}  // namespace
}  // namespace phishard
