// CudaGemm's accumulate + GELU contract (kernels/gemm.h: y = act(y + x·wᵀ + bias)) against a
// double reference, in bf16: the fc1 expand of the GEMM form of multi-LoRA (no bias, strided x and
// y) and an fc1 GEMM adding to a LoRA delta written first (bias, the model's fc1 shapes). Either
// way the GELU must act on the whole sum (GELU before adding y0, or the bias after it, is off by
// far more than the tolerance). Moved from cuda_lora_gemm_test.cc, whose LoRA kernels it serves.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/gemm_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/kernel_test_util.h"

namespace phishard {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::Encode;
using testing_util::RandomVector;

// One case of y = GELU-tanh(y0 + x·wᵀ + bias) in bf16 with accumulate = true on a fresh CudaGemm
// (4 MiB workspace). Host inputs, rounded to their bf16 values in place by Encode (the reference
// computes on those): x [m, ldx], w [n, k], bias [n] (empty: none), y0 [m, ldy]; ldx / ldy 0
// means packed (k / n), as in GemmParams. Rows `check` are compared, every column of them:
// columns [0, n) against a double reference, columns [n, ldy) must keep y0.
// Tolerance: the output's bf16 rounding (|out| 2^-8), on the unfused path also the sum's (1.13
// |pre| 2^-8: the GELU's slope times one rounding of the pre-activation; y0 is bf16, exact), and
// float32 accumulation over k (4 sqrt(k) 2^-24 Σ|x w|; negligible at k = 48).
struct AccumulateGeluCase {
  int m = 0, n = 0, k = 0;
  int ldx = 0, ldy = 0;
  std::vector<float> x = {}, w = {}, bias = {}, y0 = {};
  std::vector<int> check = {};
};

void CheckAccumulateGelu(AccumulateGeluCase c) {
  std::unique_ptr<CudaGemm> gemm;
  ASSERT_EQ(CudaGemm::Create(size_t{4} << 20, &gemm), KernelStatus::kOk);
  std::printf(
      "cuBLASLt GELU epilogue: tanh %d (probe err %.3g), acts on the accumulated sum %d (wide "
      "probe err / tol %.3g)\n",
      gemm->gelu_tanh_in_epilogue(), gemm->probe_err_tanh(), gemm->gelu_accumulate_in_epilogue(),
      gemm->probe_accumulate_err());
  const int m = c.m, n = c.n, k = c.k;
  const int ldx = c.ldx > 0 ? c.ldx : k, ldy = c.ldy > 0 ? c.ldy : n;
  const std::vector<char> xb = Encode(c.x, DataType::kBF16), wb = Encode(c.w, DataType::kBF16);
  const std::vector<char> bb = Encode(c.bias, DataType::kBF16), yb = Encode(c.y0, DataType::kBF16);
  // An empty bias uploads to a null pointer: no bias.
  DeviceBuffer dx = DeviceBuffer::From(xb), dw = DeviceBuffer::From(wb),
               dbias = DeviceBuffer::From(bb), dy = DeviceBuffer::From(yb);
  const GemmParams p{.x = dx.get(),
                     .w = dw.get(),
                     .bias = dbias.get(),
                     .y = dy.get(),
                     .m = m,
                     .n = n,
                     .k = k,
                     .ldx = c.ldx,
                     .ldy = c.ldy,
                     .accumulate = true,
                     .epilogue = GemmEpilogue::kGeluTanh,
                     .dtype = DataType::kBF16};
  ASSERT_EQ(gemm->Run(p, nullptr), KernelStatus::kOk) << gemm->last_error();
  gpu_test::ExpectDeviceClean(nullptr);
  const std::vector<float> got = gpu_test::Decode(dy.DownloadBytes(), DataType::kBF16);
  int bad = 0;
  double worst = 0;  // |error| / tolerance
  for (int i : c.check) {
    for (int j = 0; j < ldy && bad < 10; ++j) {
      const size_t at = static_cast<size_t>(i) * ldy + j;
      if (j >= n) {
        if (got[at] != c.y0[at]) {
          ++bad;
          ADD_FAILURE() << "y[" << i << "][" << j << "] outside the window changed";
        }
        continue;
      }
      double pre = static_cast<double>(c.y0[at]) + (c.bias.empty() ? 0.0f : c.bias[j]), mag = 0;
      for (int q = 0; q < k; ++q) {
        const double xw = static_cast<double>(c.x[static_cast<size_t>(i) * ldx + q]) *
                          c.w[static_cast<size_t>(j) * k + q];
        pre += xw;
        mag += std::fabs(xw);
      }
      const double want = testing_util::NaiveGeluTanh(pre);
      const double tol = 1.13 * std::fabs(pre) / 256 + std::fabs(want) / 256 +
                         4 * std::sqrt(static_cast<double>(k)) * std::ldexp(mag, -24) + 1e-5;
      const double got_ij = got[at];
      worst = std::max(worst, std::fabs(got_ij - want) / tol);
      if (!(std::fabs(got_ij - want) <= tol)) {
        ++bad;
        ADD_FAILURE() << m << "x" << n << "x" << k << " y[" << i << "][" << j << "]: " << got_ij
                      << " want " << want << " (pre " << pre << ")";
      }
    }
  }
  std::printf("accumulate%s + GELU %dx%dx%d: worst error / tolerance %.3f (fused %d; %s)\n",
              c.bias.empty() ? "" : " + bias", m, n, k, worst, gemm->gelu_accumulate_in_epilogue(),
              gemm->last_plan_info().c_str());
}

// y = GELU-tanh(y0 + x·wᵀ) in bf16 (the fc1 expand of the GEMM form): the fused epilogue when
// the probe found it to act on the accumulated sum, else the product then the activation
// kernel. x and y strided (x a 48-wide window of a 6 x 48 row, y 200 of 256 columns); every row
// checked. Pre-activations up to |20| (a strong adapter moves fc1's far out).
TEST(CudaLoraGemm, AccumulateWithGeluActsOnTheSum) {
  PHI_REQUIRE_GPU();
  AccumulateGeluCase c{.m = 37, .n = 200, .k = 48, .ldx = 6 * 48, .ldy = 256};
  c.x = RandomVector(static_cast<size_t>(c.m) * c.ldx, 1, -0.5f, 0.5f);
  c.w = RandomVector(static_cast<size_t>(c.n) * c.k, 2, -0.5f, 0.5f);
  c.y0 = RandomVector(static_cast<size_t>(c.m) * c.ldy, 3, -20.0f, 20.0f);
  for (int i = 0; i < c.m; ++i) c.check.push_back(i);
  CheckAccumulateGelu(std::move(c));
}

// y = GELU-tanh(y0 + x·wᵀ + bias) in bf16 with a plain CudaGemm (the model's), kernels/gemm.h's
// accumulate contract with bias and GELU: what an fc1 GEMM adding to a LoRA delta written first
// runs (tried on branch lorap4-fc1first, docs/perf-log.md lorap4). The accumulate probe
// (CudaGemm::gelu_accumulate_in_epilogue) runs the GELU epilogue without bias on a small shape;
// this checks the bias epilogue at the model's fc1 shapes (tiny-phi-code's prefill of 17 rows,
// Phi-2's 8 x 512), whatever algorithm cuBLASLt picks there. H200: fused, algo 66, no split-K,
// worst 0.44 / 0.46 of the tolerance. Packed x and y; a sample of rows checked.
AccumulateGeluCase Fc1Case(int m, int n, int k, std::vector<int> check) {
  AccumulateGeluCase c{.m = m, .n = n, .k = k};
  c.x = RandomVector(static_cast<size_t>(m) * k, 11);
  c.w = RandomVector(static_cast<size_t>(n) * k, 12, -0.1f, 0.1f);
  c.bias = RandomVector(n, 13, -2.0f, 2.0f);
  c.y0 = RandomVector(static_cast<size_t>(m) * n, 14, -6.0f, 6.0f);
  c.check = std::move(check);
  return c;
}

TEST(CudaLoraGemm, AccumulateWithBiasAndGeluActsOnTheSumAtFc1Shapes) {
  PHI_REQUIRE_GPU();
  CheckAccumulateGelu(Fc1Case(17, 1024, 256, {0, 1, 9, 16}));
  CheckAccumulateGelu(Fc1Case(4096, 10240, 2560, {0, 511, 512, 2049, 4095}));
}

}  // namespace
}  // namespace phishard
