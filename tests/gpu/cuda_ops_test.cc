// Each CUDA op against its CPU reference (kernels/*.cc) on the same random inputs: the inputs are
// rounded to the device dtype first, so the two sides compute on identical values and the
// comparison measures only the device's own rounding (tolerances in gpu_test_util.h unless a
// test says otherwise). Outputs are NaN-poisoned before every launch; a NaN left behind fails.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda/embedding_cuda.h"
#include "kernels/cuda/gelu_cuda.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/layer_norm_cuda.h"
#include "kernels/cuda/log_softmax_cuda.h"
#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::Compare;
using gpu_test::Decode;
using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using gpu_test::OneRoundingTol;
using testing_util::RandomVector;

constexpr DataType kAllTypes[] = {DataType::kBF16, DataType::kF16, DataType::kF32};
constexpr DataType kHalfTypes[] = {DataType::kBF16, DataType::kF16};

// ---------------------------------------------------------------------------------------------
TEST(CudaEmbedding, GathersExactlyAndZeroesForeignIds) {
  PHI_REQUIRE_GPU();
  for (DataType t : kAllTypes) {
    for (int dim : {256, 80, 81}) {  // 81: not a multiple of 16 bytes, element-wise path
      SCOPED_TRACE(testing::Message() << DataTypeName(t) << " dim " << dim);
      const int num_rows = 500, row_offset = 100, T = 37;
      std::vector<float> table = RandomVector(static_cast<size_t>(num_rows) * dim, 11 + dim);
      const std::vector<char> table_dev_bytes = Encode(table, t);
      std::vector<int32_t> ids(T);
      std::mt19937 rng(dim);
      for (int i = 0; i < T; ++i) ids[i] = static_cast<int32_t>(rng() % 800);  // some foreign
      ids[0] = row_offset;
      ids[1] = row_offset + num_rows - 1;
      ids[2] = row_offset + num_rows;  // just past the slice: zero row
      DeviceBuffer d_table = DeviceBuffer::From(table_dev_bytes);
      DeviceBuffer d_ids = DeviceBuffer::From(ids);
      DeviceBuffer d_out(static_cast<size_t>(T) * dim * DataTypeSize(t));
      d_out.Poison();
      ASSERT_EQ(EmbeddingCuda({.ids = d_ids.as<int32_t>(),
                               .table = d_table.get(),
                               .out = d_out.get(),
                               .num_tokens = T,
                               .num_rows = num_rows,
                               .dim = dim,
                               .row_offset = row_offset,
                               .dtype = t},
                              nullptr),
                KernelStatus::kOk);
      gpu_test::ExpectDeviceClean(nullptr);
      std::vector<float> ref(static_cast<size_t>(T) * dim);
      ASSERT_EQ(EmbeddingCpu({.ids = ids.data(),
                              .table = table.data(),
                              .out = ref.data(),
                              .num_tokens = T,
                              .num_rows = num_rows,
                              .dim = dim,
                              .row_offset = row_offset}),
                KernelStatus::kOk);
      const std::vector<float> out = Decode(d_out.DownloadBytes(), t);
      EXPECT_EQ(out, ref);  // a copy: bit-exact, and no poison left
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One LayerNorm launch against the CPU reference. `offset` elements in front of x and y (and of
// weight and bias) move them off 16-byte alignment when odd, which must take the element-wise
// fallback kernel.
void CheckLayerNorm(DataType t, int rows, int cols, bool in_place, int offset,
                    bool programmatic = false) {
  SCOPED_TRACE(testing::Message() << DataTypeName(t) << " rows " << rows << " cols " << cols
                                  << " in_place " << in_place << " offset " << offset
                                  << " programmatic " << programmatic);
  // Offset mean (values in [2, 4]) so a one-pass E[x²] - E[x]² variance would lose bits.
  std::vector<float> x = RandomVector(static_cast<size_t>(rows) * cols, rows + cols, 2, 4);
  std::vector<float> w = RandomVector(cols, 3 * cols, 0.5f, 1.5f);
  std::vector<float> b = RandomVector(cols, 5 * cols);
  const size_t skip = static_cast<size_t>(offset) * DataTypeSize(t);
  // Encode rounds its argument to the dtype in place, so the reference sees the device's values.
  auto shifted_bytes = [&](std::vector<float>& v) {
    std::vector<char> out(skip, 0);
    const std::vector<char> bytes = Encode(v, t);
    out.insert(out.end(), bytes.begin(), bytes.end());
    return out;
  };
  DeviceBuffer d_x = DeviceBuffer::From(shifted_bytes(x));
  DeviceBuffer d_w = DeviceBuffer::From(shifted_bytes(w));
  DeviceBuffer d_b = DeviceBuffer::From(shifted_bytes(b));
  DeviceBuffer d_y(d_x.bytes());
  d_y.Poison();
  char* x_at = static_cast<char*>(d_x.get()) + skip;
  char* y_at = in_place ? x_at : static_cast<char*>(d_y.get()) + skip;
  cudaStream_t stream = nullptr;  // a stream of its own for the programmatic launch
  if (programmatic) ASSERT_EQ(DeviceStreamCreate(&stream), 0);
  ASSERT_EQ(LayerNormCuda({.x = x_at,
                           .weight = static_cast<char*>(d_w.get()) + skip,
                           .bias = static_cast<char*>(d_b.get()) + skip,
                           .y = y_at,
                           .rows = rows,
                           .cols = cols,
                           .eps = 1e-5f,
                           .dtype = t,
                           .programmatic_launch = programmatic},
                          stream),
            KernelStatus::kOk);
  ASSERT_EQ(DeviceStreamSync(stream), 0);
  gpu_test::ExpectDeviceClean(stream);
  if (stream != nullptr) DeviceStreamDestroy(stream);
  std::vector<float> ref(x.size());
  ASSERT_EQ(LayerNormCpu({.x = x.data(),
                          .weight = w.data(),
                          .bias = b.data(),
                          .y = ref.data(),
                          .rows = rows,
                          .cols = cols,
                          .eps = 1e-5f}),
            KernelStatus::kOk);
  std::vector<float> out = Decode((in_place ? d_x : d_y).DownloadBytes(), t);
  out.erase(out.begin(), out.begin() + offset);
  // float32 statistics in a different summation order than the double reference, then one
  // rounding to the storage type: OneRoundingTol.
  const gpu_test::Diff d = Compare(out, ref);
  EXPECT_EQ(d.nonfinite, 0u);
  EXPECT_LE(d.rel, OneRoundingTol(t)) << gpu_test::ToString(d);
}

TEST(CudaLayerNorm, MatchesCpuReference) {
  PHI_REQUIRE_GPU();
  for (DataType t : kAllTypes) {
    // 2560: Phi-2, 2048: Phi-1.5 (vector kernel, one pack per thread; from 1024 rows a warp per
    // row); 5000: two packs per thread; 12000: four (bf16; float32 takes the fallback); 81: not in
    // 16-byte packs; 20000: longer than the vector kernel's registers (fallback, re-reads x).
    for (int cols : {256, 2048, 2560, 81, 5000, 12000, 20000}) {
      for (int rows : {1, 7, 64, 1100}) {
        if (rows > 64 && cols != 2560 && cols != 2048 && cols != 256) continue;
        for (bool in_place : {false, true}) CheckLayerNorm(t, rows, cols, in_place, 0);
      }
    }
  }
}

// LayerNormParams::programmatic_launch (decode steps after the dense bulk GEMV): the same
// kernels, weight and bias loaded before griddepcontrol.wait; launched as a programmatic
// dependent on a stream of its own (every kernel path: the flag is ignored where unsupported).
TEST(CudaLayerNorm, ProgrammaticLaunchMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  for (DataType t : kAllTypes) {
    for (int cols : {2560, 81, 20000}) {
      for (int rows : {1, 4}) CheckLayerNorm(t, rows, cols, false, 0, true);
    }
  }
}

TEST(CudaLayerNorm, MisalignedPointersFallBack) {
  PHI_REQUIRE_GPU();
  for (DataType t : kAllTypes) {
    for (bool in_place : {false, true}) CheckLayerNorm(t, 5, 2560, in_place, 1);
  }
}

// ---------------------------------------------------------------------------------------------
// The output is float32 whatever the input, so the only difference from the reference is
// expf/logf versus std::exp/std::log and summation order over <= 51200 terms: a few float32 ulp
// of the row's log-sum-exp (|lse| < 15 here), so 1e-5 absolute.
TEST(CudaLogSoftmax, MatchesCpuReference) {
  PHI_REQUIRE_GPU();
  for (DataType t : kAllTypes) {
    for (int cols : {4095, 51200}) {
      for (int rows : {1, 3}) {
        SCOPED_TRACE(testing::Message() << DataTypeName(t) << " rows " << rows << " cols " << cols);
        std::vector<float> x = RandomVector(static_cast<size_t>(rows) * cols, cols + rows, -8, 8);
        DeviceBuffer d_x = DeviceBuffer::From(Encode(x, t));
        DeviceBuffer d_y(x.size() * sizeof(float));
        d_y.Poison();
        ASSERT_EQ(
            LogSoftmaxCuda(
                {.x = d_x.get(), .y = d_y.as<float>(), .rows = rows, .cols = cols, .dtype = t},
                nullptr),
            KernelStatus::kOk);
        gpu_test::ExpectDeviceClean(nullptr);
        std::vector<float> ref(x.size());
        ASSERT_EQ(LogSoftmaxCpu({.x = x.data(), .y = ref.data(), .rows = rows, .cols = cols}),
                  KernelStatus::kOk);
        const gpu_test::Diff d = Compare(Decode(d_y.DownloadBytes(), DataType::kF32), ref);
        EXPECT_EQ(d.nonfinite, 0u);
        EXPECT_LE(d.max_abs, 1e-5) << gpu_test::ToString(d);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
struct RotaryShape {
  int tokens, num_heads, num_kv_heads, head_dim, rotary_dim;
  int row_pad = 16;  // qkv_stride - width: not a multiple of 8 forces the element-wise path
};

class CudaRotaryKvWrite : public ::testing::TestWithParam<RotaryShape> {};

TEST_P(CudaRotaryKvWrite, MatchesCpuReferenceAndWritesOnlyItsSlots) {
  PHI_REQUIRE_GPU();
  const RotaryShape s = GetParam();
  const int width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim;
  const int stride = width + s.row_pad;  // a padded row: the tail must stay untouched
  const int block_size = 16;
  const int64_t num_slots = 64 * block_size;
  const size_t kv_row = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  // write_cache = false (the prefill attention kernel stores K/V then): the same rotation, and
  // the cache untouched. qk_norm: the q / k LayerNorm first (HF qk_layernorm), its weights
  // [head_dim] float32 on the device.
  const std::vector<float> norm_host[4] = {
      RandomVector(s.head_dim, 41, 0.5f, 1.5f), RandomVector(s.head_dim, 42, -0.5f, 0.5f),
      RandomVector(s.head_dim, 43, 0.5f, 1.5f), RandomVector(s.head_dim, 44, -0.5f, 0.5f)};
  DeviceBuffer norm_dev[4] = {DeviceBuffer::From(norm_host[0]), DeviceBuffer::From(norm_host[1]),
                              DeviceBuffer::From(norm_host[2]), DeviceBuffer::From(norm_host[3])};
  for (DataType t : kAllTypes) {
    // rope_factor: linear RoPE scaling, through the row kernel and the rotate-only one.
    struct Form {
      bool write_cache, qk_norm;
      float rope_factor;
    };
    for (auto [write_cache, qk_norm, rope_factor] :
         {Form{true, false, 1.0f}, Form{false, false, 1.0f}, Form{true, true, 1.0f},
          Form{false, true, 1.0f}, Form{true, false, 2.5f}, Form{false, false, 2.5f}}) {
      SCOPED_TRACE(testing::Message()
                   << DataTypeName(t) << " T " << s.tokens << " hd " << s.head_dim << " rot "
                   << s.rotary_dim << " write_cache " << write_cache << " qk_norm " << qk_norm
                   << " rope_factor " << rope_factor);
      auto norm_d = [&](int i) { return qk_norm ? norm_dev[i].as<float>() : nullptr; };
      auto norm_h = [&](int i) { return qk_norm ? norm_host[i].data() : nullptr; };
      std::vector<float> qkv = RandomVector(static_cast<size_t>(s.tokens) * stride, s.tokens + 7);
      const std::vector<char> qkv_bytes = Encode(qkv, t);
      std::vector<int32_t> positions(s.tokens);
      std::vector<int64_t> slots(s.tokens);
      std::mt19937 rng(s.tokens * 31 + s.head_dim);
      std::vector<int64_t> perm(num_slots);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int i = 0; i < s.tokens; ++i) {
        positions[i] = static_cast<int32_t>(rng() % 4096);  // large angles too
        slots[i] = perm[i];
      }
      positions[0] = 0;
      positions[s.tokens - 1] = 4095;
      // A padding row (slot -1) when there are several tokens: its q/k rotate, nothing is cached.
      // The CPU reference takes only valid slots, so it caches that row in an extra slot
      // (num_slots, the first of an extra block) of its own, outside the compared range.
      const int pad_tok = s.tokens > 1 ? s.tokens / 2 : -1;
      std::vector<int64_t> ref_slots = slots;
      if (pad_tok >= 0) {
        slots[pad_tok] = -1;
        ref_slots[pad_tok] = num_slots;
      }
      DeviceBuffer d_qkv = DeviceBuffer::From(qkv_bytes);
      DeviceBuffer d_pos = DeviceBuffer::From(positions);
      DeviceBuffer d_slots = DeviceBuffer::From(slots);
      DeviceBuffer d_k(num_slots * kv_row * DataTypeSize(t));
      DeviceBuffer d_v(d_k.bytes());
      d_k.Poison();
      d_v.Poison();
      ASSERT_EQ(RotaryKvWriteCuda({.qkv = d_qkv.get(),
                                   .positions = d_pos.as<int32_t>(),
                                   .slots = d_slots.as<int64_t>(),
                                   .k_cache = d_k.get(),
                                   .v_cache = d_v.get(),
                                   .num_slots = num_slots,
                                   .block_size = block_size,
                                   .num_tokens = s.tokens,
                                   .qkv_stride = stride,
                                   .num_heads = s.num_heads,
                                   .num_kv_heads = s.num_kv_heads,
                                   .head_dim = s.head_dim,
                                   .rotary_dim = s.rotary_dim,
                                   .theta = 10000.0f,
                                   .rope_factor = rope_factor,
                                   .dtype = t,
                                   .write_cache = write_cache,
                                   .q_norm_w = norm_d(0),
                                   .q_norm_b = norm_d(1),
                                   .k_norm_w = norm_d(2),
                                   .k_norm_b = norm_d(3)},
                                  nullptr),
                KernelStatus::kOk);
      gpu_test::ExpectDeviceClean(nullptr);

      std::vector<float> ref_qkv = qkv;
      std::vector<float> ref_k((num_slots + block_size) * kv_row, testing_util::kNaN);
      std::vector<float> ref_v(ref_k.size(), testing_util::kNaN);
      ASSERT_EQ(RotaryKvWriteCpu({.qkv = ref_qkv.data(),
                                  .positions = positions.data(),
                                  .slots = ref_slots.data(),
                                  .k_cache = ref_k.data(),
                                  .v_cache = ref_v.data(),
                                  .num_slots = num_slots + block_size,
                                  .block_size = block_size,
                                  .num_tokens = s.tokens,
                                  .qkv_stride = stride,
                                  .num_heads = s.num_heads,
                                  .num_kv_heads = s.num_kv_heads,
                                  .head_dim = s.head_dim,
                                  .rotary_dim = s.rotary_dim,
                                  .theta = 10000.0f,
                                  .rope_factor = rope_factor,
                                  .write_cache = write_cache,
                                  .q_norm_w = norm_h(0),
                                  .q_norm_b = norm_h(1),
                                  .k_norm_w = norm_h(2),
                                  .k_norm_b = norm_h(3)}),
                KernelStatus::kOk);
      const std::vector<float> out_qkv = Decode(d_qkv.DownloadBytes(), t);
      const std::vector<float> out_k = Decode(d_k.DownloadBytes(), t);
      const std::vector<float> out_v = Decode(d_v.DownloadBytes(), t);
      // Rotated q/k: one rounding of a float32 rotation. The device's powf may differ from
      // std::pow by 1 ulp in inv_freq (it does for rotary_dim 20 and 40), which moves an angle of
      // up to 4095 rad by up to 4095 * 2^-24 = 2.4e-4 rad: invisible after a bf16/fp16 rounding,
      // but above float32's 1e-5, so float32 gets 2.5e-4. With the norm a bf16 / fp16 q / k
      // value is rounded twice (the normalised head, then its rotation): 2 x one rounding.
      const double tol = t == DataType::kF32 ? 2.5e-4 : OneRoundingTol(t) * (qk_norm ? 2 : 1);
      const gpu_test::Diff dq = Compare(out_qkv, ref_qkv);
      EXPECT_EQ(dq.nonfinite, 0u);
      EXPECT_LE(dq.rel, tol) << "qkv: " << gpu_test::ToString(dq);
      // Dims that do not rotate (and V, and the row padding) are copied bit for bit; with the
      // norm every q / k dim changes (compared above).
      for (int tok = 0; tok < s.tokens; ++tok) {
        for (int c = 0; c < stride; ++c) {
          const bool qk = c < (s.num_heads + s.num_kv_heads) * s.head_dim;
          const bool rotated = qk && (qk_norm || c % s.head_dim < s.rotary_dim);
          if (rotated) continue;
          const size_t i = static_cast<size_t>(tok) * stride + c;
          ASSERT_EQ(out_qkv[i], qkv[i]) << "token " << tok << " column " << c;
        }
      }
      // Cache: written slots match, every other slot still holds the NaN poison.
      std::vector<char> written(num_slots, 0);
      for (int64_t sl : slots) {
        if (sl >= 0 && write_cache) written[sl] = 1;
      }
      std::vector<float> got_k, want_k;
      for (int64_t sl = 0; sl < num_slots; ++sl) {
        for (size_t j = 0; j < kv_row; ++j) {  // head j / hd, dim j % hd
          const int hd = s.head_dim;
          const size_t i = testing_util::CacheIndex(sl, static_cast<int>(j / hd),
                                                    static_cast<int>(j % hd), block_size,
                                                    s.num_kv_heads, hd);
          if (written[sl]) {
            got_k.push_back(out_k[i]);
            want_k.push_back(ref_k[i]);
            ASSERT_EQ(out_v[i], ref_v[i]) << "V slot " << sl;  // V is a plain copy
          } else {
            ASSERT_TRUE(std::isnan(out_k[i]) && std::isnan(out_v[i]))
                << "slot " << sl << " was written";
          }
        }
      }
      const gpu_test::Diff dk = Compare(got_k, want_k);
      EXPECT_EQ(dk.nonfinite, 0u);
      EXPECT_LE(dk.rel, tol) << "k cache: " << gpu_test::ToString(dk);
    }
  }
}

// Decode sizes use blocks of head groups, >= 512 tokens whole-row blocks; without the cache write
// the in-place rotation kernel where half the rotary dims is a whole number of packs (else those
// blocks); head_dim, qkv_stride and the pointers multiples of 16 bytes take 16-byte packs,
// anything else the element-wise path.
INSTANTIATE_TEST_SUITE_P(Shapes, CudaRotaryKvWrite,
                         ::testing::Values(RotaryShape{1, 32, 32, 80, 32},      // Phi-2 decode
                                           RotaryShape{600, 32, 32, 80, 32},    // Phi-2 prefill
                                           RotaryShape{520, 8, 2, 80, 32, 3},   // GQA, odd stride
                                           RotaryShape{512, 4, 1, 64, 32},      // rows, GQA
                                           RotaryShape{700, 6, 2, 64, 16},      // rows, half 8
                                           RotaryShape{530, 4, 2, 80, 20},      // half 10: rows
                                           RotaryShape{17, 32, 32, 64, 32},     // Phi-1.5
                                           RotaryShape{64, 8, 2, 80, 32},       // GQA
                                           RotaryShape{33, 8, 8, 32, 16},       // demo model
                                           RotaryShape{5, 4, 1, 64, 0},         // no rotation
                                           RotaryShape{7, 6, 3, 48, 20},        // half-rotated pack
                                           RotaryShape{4, 3, 1, 40, 40},        // all dims rotate
                                           RotaryShape{9, 4, 2, 80, 32, 3},     // odd stride
                                           RotaryShape{6, 5, 5, 18, 10},        // odd head_dim
                                           RotaryShape{3, 2, 1, 136, 64, 1},    // head > block
                                           RotaryShape{3, 4, 2, 16, 8},         // tiny, decode
                                           RotaryShape{600, 4, 4, 16, 6},       // half 3: rows
                                           RotaryShape{513, 4, 2, 16, 8},       // tiny, rows
                                           RotaryShape{40, 8, 2, 96, 48},       // custom 96
                                           RotaryShape{520, 4, 1, 128, 32},     // 128, rows
                                           RotaryShape{2, 16, 16, 128, 128}));  // full rotary

// ---------------------------------------------------------------------------------------------
struct GemmShape {
  int m, n, k;
};

class CudaGemmTest : public ::testing::TestWithParam<GemmShape> {
 protected:
  static void SetUpTestSuite() {
    int n = 0;
    DeviceGetCount(&n);
    if (n > 0) {
      ASSERT_EQ(CudaGemm::Create(size_t{32} << 20, &gemm_), KernelStatus::kOk);
      std::printf("cuBLASLt GELU epilogue: %s (probe max |err| vs tanh %.3g, vs erf %.3g)\n",
                  gemm_->gelu_tanh_in_epilogue() ? "tanh, fused" : "not tanh, separate kernel",
                  gemm_->probe_err_tanh(), gemm_->probe_err_erf());
    }
  }
  static void TearDownTestSuite() { gemm_.reset(); }
  static std::unique_ptr<CudaGemm> gemm_;
};
std::unique_ptr<CudaGemm> CudaGemmTest::gemm_;

// Every epilogue x bias x accumulate, with row strides wider than the matrices (a window of a
// wider buffer, as the model uses), for bf16 and fp16. Tolerance: one output rounding (see
// OneRoundingTol); the GELU variants run either in the epilogue (one rounding) or as a separate
// kernel after a rounded pre-activation (|gelu'| <= 1.13 times one more rounding), so 1.5x.
TEST_P(CudaGemmTest, MatchesCpuReference) {
  PHI_REQUIRE_GPU();
  const GemmShape s = GetParam();
  for (DataType t : kHalfTypes) {
    for (bool padded : {false, true}) {
      const int ldx = padded ? s.k + 8 : s.k, ldy = padded ? s.n + 8 + (s.n % 2) : s.n;
      std::vector<float> x = RandomVector(static_cast<size_t>(s.m) * ldx, s.m + s.k);
      std::vector<float> w = RandomVector(static_cast<size_t>(s.n) * s.k, s.n + 1, -0.1f, 0.1f);
      std::vector<float> bias = RandomVector(s.n, s.n + 2);
      std::vector<float> y_old = RandomVector(static_cast<size_t>(s.m) * ldy, s.m + 3);
      DeviceBuffer d_x = DeviceBuffer::From(Encode(x, t));
      DeviceBuffer d_w = DeviceBuffer::From(Encode(w, t));
      DeviceBuffer d_b = DeviceBuffer::From(Encode(bias, t));
      const std::vector<char> y_old_bytes = Encode(y_old, t);
      for (GemmEpilogue epi :
           {GemmEpilogue::kNone, GemmEpilogue::kGeluTanh, GemmEpilogue::kGeluErf}) {
        for (bool with_bias : {false, true}) {
          for (bool acc : {false, true}) {
            if (acc && epi != GemmEpilogue::kNone) continue;
            SCOPED_TRACE(testing::Message()
                         << DataTypeName(t) << " m " << s.m << " n " << s.n << " k " << s.k
                         << " padded " << padded << " epi " << static_cast<int>(epi) << " bias "
                         << with_bias << " acc " << acc);
            DeviceBuffer d_y(y_old_bytes.size());
            if (acc) {
              d_y.Upload(y_old_bytes.data(), y_old_bytes.size());
            } else {
              d_y.Poison();
            }
            GemmParams p{.x = d_x.get(),
                         .w = d_w.get(),
                         .bias = with_bias ? d_b.get() : nullptr,
                         .y = d_y.get(),
                         .m = s.m,
                         .n = s.n,
                         .k = s.k,
                         .ldx = ldx,
                         .ldy = ldy,
                         .accumulate = acc,
                         .epilogue = epi,
                         .dtype = t};
            ASSERT_EQ(gemm_->Run(p, nullptr), KernelStatus::kOk) << gemm_->last_error();
            gpu_test::ExpectDeviceClean(nullptr);
            std::vector<float> ref = acc ? y_old : std::vector<float>(y_old.size(), 0.0f);
            GemmParams pc = p;
            pc.x = x.data();
            pc.w = w.data();
            pc.bias = with_bias ? bias.data() : nullptr;
            pc.y = ref.data();
            pc.dtype = DataType::kF32;
            ASSERT_EQ(GemmCpu(pc), KernelStatus::kOk);
            std::vector<float> out = Decode(d_y.DownloadBytes(), t);
            // Compare the [m, n] window; padding columns must be untouched (poison or y_old).
            ASSERT_NO_FATAL_FAILURE(
                gpu_test::ExpectPaddingUntouched(out, s.m, s.n, ldy, acc ? &y_old : nullptr));
            const gpu_test::Diff d = gpu_test::CompareRows(out, ref, s.m, s.n, ldy);
            EXPECT_EQ(d.nonfinite, 0u);
            const double tol = OneRoundingTol(t) * (epi == GemmEpilogue::kNone ? 1.0 : 1.5);
            EXPECT_LE(d.rel, tol) << gpu_test::ToString(d);
          }
        }
      }
    }
  }
}

// lm_head style: 16-bit operands, float32 output and bias, padded row stride. Nothing is rounded
// to 16 bits, so the only error is float32 accumulation order over k <= 2560 products (exact in
// float32): ~1e-6 relative. 5e-4 still fails a result rounded to bf16 (~1e-3).
TEST_P(CudaGemmTest, Float32OutputMatchesCpuReference) {
  PHI_REQUIRE_GPU();
  const GemmShape s = GetParam();
  for (DataType t : kHalfTypes) {
    SCOPED_TRACE(testing::Message()
                 << DataTypeName(t) << " m " << s.m << " n " << s.n << " k " << s.k);
    const int ldy = (s.n + 63) / 64 * 64;
    std::vector<float> x = RandomVector(static_cast<size_t>(s.m) * s.k, s.m + 5 * s.k);
    std::vector<float> w = RandomVector(static_cast<size_t>(s.n) * s.k, s.n + 6);
    std::vector<float> bias = RandomVector(s.n, s.n + 7);  // stays float32
    DeviceBuffer d_x = DeviceBuffer::From(Encode(x, t));
    DeviceBuffer d_w = DeviceBuffer::From(Encode(w, t));
    DeviceBuffer d_b = DeviceBuffer::From(bias);
    DeviceBuffer d_y(static_cast<size_t>(s.m) * ldy * sizeof(float));
    d_y.Poison();
    GemmParams p{.x = d_x.get(),
                 .w = d_w.get(),
                 .bias = d_b.get(),
                 .y = d_y.get(),
                 .m = s.m,
                 .n = s.n,
                 .k = s.k,
                 .ldy = ldy,
                 .dtype = t};
    ASSERT_EQ(gemm_->Run(p, DataType::kF32, nullptr), KernelStatus::kOk) << gemm_->last_error();
    gpu_test::ExpectDeviceClean(nullptr);
    std::vector<float> ref(static_cast<size_t>(s.m) * ldy, 0.0f);
    ASSERT_EQ(GemmCpu({.x = x.data(),
                       .w = w.data(),
                       .bias = bias.data(),
                       .y = ref.data(),
                       .m = s.m,
                       .n = s.n,
                       .k = s.k,
                       .ldy = ldy}),
              KernelStatus::kOk);
    const std::vector<float> out = Decode(d_y.DownloadBytes(), DataType::kF32);
    const gpu_test::Diff d = gpu_test::CompareRows(out, ref, s.m, s.n, ldy);
    EXPECT_EQ(d.nonfinite, 0u);
    EXPECT_LE(d.rel, 5e-4) << gpu_test::ToString(d);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaGemmTest,
                         ::testing::Values(GemmShape{1, 768, 256},   // decode, demo qkv
                                           GemmShape{7, 4095, 256},  // odd n (demo vocab)
                                           GemmShape{33, 320, 384},  // odd m
                                           GemmShape{64, 1024, 256},
                                           GemmShape{128, 7680, 2560},   // Phi-2 qkv
                                           GemmShape{5, 2560, 10240}));  // Phi-2 fc2, long k

TEST(CudaGemmErrors, RejectsWhatItCannotDo) {
  PHI_REQUIRE_GPU();
  std::unique_ptr<CudaGemm> gemm;
  ASSERT_EQ(CudaGemm::Create(size_t{1} << 20, &gemm), KernelStatus::kOk);
  DeviceBuffer buf(4096);
  GemmParams p{.x = buf.get(),
               .w = buf.get(),
               .y = buf.get(),
               .m = 4,
               .n = 8,
               .k = 8,
               .dtype = DataType::kF32};
  EXPECT_EQ(gemm->Run(p, nullptr), KernelStatus::kUnsupportedDtype);
  p.dtype = DataType::kBF16;
  p.accumulate = true;
  p.ldx = 4;  // < k
  EXPECT_EQ(gemm->Run(p, nullptr), KernelStatus::kInvalidShape);
  p.ldx = 0;
  p.x = nullptr;
  EXPECT_EQ(gemm->Run(p, nullptr), KernelStatus::kNullPointer);
}

// ---------------------------------------------------------------------------------------------
// The in-place GELU (kernels/gelu.h) on a [rows, cols] window of a [rows, ld] buffer placed
// `offset` elements into the allocation, against GeluInPlaceCpu on the same (dtype-rounded)
// values. Shapes take the 16-byte path (contiguous: the whole window as one row; padded rows) and
// the element path (cols or ld not a multiple of 16 bytes' elements, a misaligned pointer).
// Tolerance per element: both sides evaluate the same float32 formula (tanhf / erff against
// std::tanh / std::erf, each within a few float32 ulps), so the two float values may differ by
// the CPU test's bound d = 4 float32 ulps of |x| + 1e-7 (0.5 |x| times a few ulps of 1 in 1 + t,
// which cancels as t -> -1); the device then rounds once to the storage type, so a 16-bit result
// may also land one storage ulp away when they straddle a rounding boundary: d + 1 ulp of the
// dtype at the reference (fp16: at least its smallest subnormal, 2^-24). Every byte outside the
// window (padding columns, the bytes before it) must keep its value.
struct GeluShape {
  int rows, cols, ld, offset;
};

void CheckGelu(DataType t, GemmEpilogue act, const GeluShape& s) {
  SCOPED_TRACE(testing::Message() << DataTypeName(t) << " act " << static_cast<int>(act) << " rows "
                                  << s.rows << " cols " << s.cols << " ld " << s.ld << " offset "
                                  << s.offset);
  const int ld = s.ld == 0 ? s.cols : s.ld;
  const size_t n = static_cast<size_t>(s.offset) + static_cast<size_t>(s.rows) * ld;
  std::vector<float> x = RandomVector(n, 17 + s.cols + s.rows, -8.0f, 8.0f);
  if (n > static_cast<size_t>(s.offset) + 3) {
    x[s.offset] = 0.0f;
    x[s.offset + 1] = -30.0f;  // tanh / erf saturate: -0
    x[s.offset + 2] = 30.0f;   // saturates to x
  }
  const std::vector<char> in_bytes = Encode(x, t);  // x now holds the device's values
  DeviceBuffer d_y = DeviceBuffer::From(in_bytes);
  ASSERT_EQ(GeluInPlaceCuda({.y = static_cast<char*>(d_y.get()) + s.offset * DataTypeSize(t),
                             .rows = s.rows,
                             .cols = s.cols,
                             .ld = s.ld,
                             .act = act,
                             .dtype = t},
                            nullptr),
            KernelStatus::kOk);
  gpu_test::ExpectDeviceClean(nullptr);
  std::vector<float> ref = x;
  ASSERT_EQ(GeluInPlaceCpu({.y = ref.data() + s.offset,
                            .rows = s.rows,
                            .cols = s.cols,
                            .ld = s.ld,
                            .act = act,
                            .dtype = DataType::kF32}),
            KernelStatus::kOk);
  const std::vector<char> out_bytes = d_y.DownloadBytes();
  const std::vector<float> out = Decode(out_bytes, t);
  const size_t es = DataTypeSize(t);
  const int mantissa = t == DataType::kBF16 ? 7 : 10;  // stored mantissa bits (16-bit types)
  int bad = 0;
  for (size_t i = 0; i < n && bad < 5; ++i) {
    const bool inside =
        i >= static_cast<size_t>(s.offset) && (i - s.offset) % ld < static_cast<size_t>(s.cols);
    if (!inside) {
      if (std::memcmp(&out_bytes[i * es], &in_bytes[i * es], es) != 0) {
        ++bad;
        ADD_FAILURE() << "element " << i << " outside the window changed";
      }
      continue;
    }
    double tol = 4 * std::fabs(x[i]) * 1.2e-7 + 1e-7;
    if (t != DataType::kF32) {
      const double r = std::fabs(ref[i]);
      double ulp = r > 0 ? std::ldexp(1.0, std::ilogb(r) - mantissa) : 0.0;
      if (t == DataType::kF16) ulp = std::max(ulp, std::ldexp(1.0, -24));
      tol += ulp;
    }
    if (!(std::fabs(out[i] - ref[i]) <= tol)) {
      ++bad;
      ADD_FAILURE() << "element " << i << ": x " << x[i] << " out " << out[i] << " ref " << ref[i]
                    << " tol " << tol;
    }
  }
}

TEST(CudaGeluInPlace, MatchesCpuReference) {
  PHI_REQUIRE_GPU();
  const GeluShape shapes[] = {
      {1, 8, 0, 0},      // one 16-byte vector (bf16 / fp16)
      {3, 10240, 0, 0},  // Phi-2's fc1 width, contiguous
      {37, 80, 96, 0},   // padded rows, 16-byte path
      {5, 81, 0, 0},     // odd width: element path
      {4, 100, 104, 0},  // 16-bit: element path (100 % 8); f32: 16-byte path
      {6, 64, 64, 3},    // misaligned pointer: element path
      {0, 64, 0, 0},     // nothing to do: the buffer keeps every byte
  };
  for (DataType t : kAllTypes) {
    for (GemmEpilogue act : {GemmEpilogue::kGeluTanh, GemmEpilogue::kGeluErf}) {
      for (const GeluShape& s : shapes) CheckGelu(t, act, s);
    }
  }
}

TEST(CudaGeluInPlace, RejectsBadParams) {
  PHI_REQUIRE_GPU();
  DeviceBuffer buf(256);
  const GeluInPlaceParams ok{.y = buf.get(), .rows = 2, .cols = 8, .dtype = DataType::kBF16};
  EXPECT_EQ(GeluInPlaceCuda(ok, nullptr), KernelStatus::kOk);
  GeluInPlaceParams p = ok;
  p.ld = 4;  // < cols
  EXPECT_EQ(GeluInPlaceCuda(p, nullptr), KernelStatus::kInvalidShape);
  p = ok;
  p.act = GemmEpilogue::kNone;
  EXPECT_EQ(GeluInPlaceCuda(p, nullptr), KernelStatus::kInvalidShape);
  p = ok;
  p.y = nullptr;
  EXPECT_EQ(GeluInPlaceCuda(p, nullptr), KernelStatus::kNullPointer);
  gpu_test::ExpectDeviceClean(nullptr);
}

}  // namespace
}  // namespace phishard
