// CudaGemm's recorded algorithm choices (kernels/cuda/gemm_cuda.h: GemmAlgoChoice, SetAlgoChoices)
// and the configurations its sweep lists (ListAlgos / RunAlgo): every configuration computes the
// same GEMM as a naive CPU reference, a recorded choice is taken where it matches and cuBLASLt
// accepts it, and anything else falls back to the heuristic's pick.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/gemm_cuda.h"
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

// The Phi-2 prefill GEMM forms (model/cuda_phi_step.cc) at a row count small enough for the CPU
// reference: qkv, fc1 + GELU, and dense / fc2 accumulating into the residual, all with bias.
struct Form {
  const char* name;
  int n, k;
  GemmEpilogue epi;
  bool acc;
};
constexpr int kH = 2560, kI = 10240, kM = 192;
const Form kForms[] = {{"qkv", 3 * kH, kH, GemmEpilogue::kNone, false},
                       {"fc1", kI, kH, GemmEpilogue::kGeluTanh, false},
                       {"dense", kH, kH, GemmEpilogue::kNone, true},
                       {"fc2", kH, kI, GemmEpilogue::kNone, true}};

class CudaGemmAlgoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    PHI_REQUIRE_GPU();
    ASSERT_EQ(CudaGemm::Create(size_t{32} << 20, &gemm_), KernelStatus::kOk);
  }

  // Operands of form f in bf16 on the device and the float32 CPU reference (GemmCpu on the same
  // rounded values, GELU-tanh applied by it for fc1).
  void Prepare(const Form& f) {
    x_ = RandomVector(static_cast<size_t>(kM) * f.k, f.k + 1);
    w_ = RandomVector(static_cast<size_t>(f.n) * f.k, f.n + 2, -0.05f, 0.05f);
    bias_ = RandomVector(f.n, f.n + 3);
    y_old_ = RandomVector(static_cast<size_t>(kM) * f.n, f.n + 4);
    d_x_ = DeviceBuffer::From(Encode(x_, DataType::kBF16));
    d_w_ = DeviceBuffer::From(Encode(w_, DataType::kBF16));
    d_b_ = DeviceBuffer::From(Encode(bias_, DataType::kBF16));
    y_old_bytes_ = Encode(y_old_, DataType::kBF16);
    ref_ = f.acc ? y_old_ : std::vector<float>(y_old_.size(), 0.0f);
    GemmParams pc = Params(f, nullptr);
    pc.x = x_.data();
    pc.w = w_.data();
    pc.bias = bias_.data();
    pc.y = ref_.data();
    pc.dtype = DataType::kF32;
    ASSERT_EQ(GemmCpu(pc), KernelStatus::kOk);
  }
  GemmParams Params(const Form& f, void* y) const {
    return GemmParams{.x = d_x_.get(),
                      .w = d_w_.get(),
                      .bias = d_b_.get(),
                      .y = y,
                      .m = kM,
                      .n = f.n,
                      .k = f.k,
                      .accumulate = f.acc,
                      .epilogue = f.epi,
                      .dtype = DataType::kBF16};
  }
  // A fresh output: y_old for accumulating forms, NaN otherwise (an unwritten element shows).
  DeviceBuffer FreshY(const Form& f) const {
    DeviceBuffer y(y_old_bytes_.size());
    if (f.acc) {
      y.Upload(y_old_bytes_.data(), y_old_bytes_.size());
    } else {
      y.Poison();
    }
    return y;
  }
  // One bf16 output rounding (OneRoundingTol), 1.5x for GELU (as cuda_ops_test's GEMM cases:
  // the epilogue's tanh may differ from the reference's by a fraction of a rounding).
  void ExpectMatches(const Form& f, DeviceBuffer& y) const {
    const gpu_test::Diff d = Compare(Decode(y.DownloadBytes(), DataType::kBF16), ref_);
    EXPECT_EQ(d.nonfinite, 0u);
    EXPECT_LE(d.rel, OneRoundingTol(DataType::kBF16) * (f.epi == GemmEpilogue::kNone ? 1 : 1.5))
        << gpu_test::ToString(d);
  }

  std::unique_ptr<CudaGemm> gemm_;
  std::vector<float> x_, w_, bias_, y_old_, ref_;
  std::vector<char> y_old_bytes_;
  DeviceBuffer d_x_, d_w_, d_b_;
};

// Every configuration the sweep would time (the heuristic's first 16 and the tile x cluster
// variants) computes the same GEMM.
TEST_F(CudaGemmAlgoTest, EveryListedConfigurationMatchesCpuReference) {
  ASSERT_TRUE(gemm_);
  for (const Form& f : kForms) {
    if (f.epi != GemmEpilogue::kNone && !gemm_->gelu_tanh_in_epilogue()) continue;  // unfused
    SCOPED_TRACE(f.name);
    Prepare(f);
    std::vector<GemmAlgoConfig> cands;
    ASSERT_EQ(gemm_->ListAlgos(Params(f, d_x_.get()), DataType::kBF16, 16, true, &cands),
              KernelStatus::kOk);
    ASSERT_GE(cands.size(), 2u);
    for (const GemmAlgoConfig& c : cands) {
      SCOPED_TRACE(testing::Message() << "algo " << c.algo_id << " tile " << c.tile_id
                                      << " cluster " << c.cluster_id << " custom " << c.custom);
      DeviceBuffer y = FreshY(f);
      ASSERT_EQ(gemm_->RunAlgo(Params(f, y.get()), DataType::kBF16, c, nullptr), KernelStatus::kOk)
          << gemm_->last_error();
      gpu_test::ExpectDeviceClean(nullptr);
      ExpectMatches(f, y);
    }
  }
}

// A recorded choice that matches is taken (and correct); one cuBLASLt refuses, one for other
// rows or another form is not; an empty list restores the heuristic's pick.
TEST_F(CudaGemmAlgoTest, RecordedChoiceTakenOnlyWhereItMatchesAndRuns) {
  ASSERT_TRUE(gemm_);
  const Form& f = kForms[3];  // fc2: accumulate + bias
  Prepare(f);
  std::vector<GemmAlgoConfig> cands;
  ASSERT_EQ(gemm_->ListAlgos(Params(f, d_x_.get()), DataType::kBF16, 16, true, &cands),
            KernelStatus::kOk);
  ASSERT_GE(cands.size(), 2u);
  const GemmAlgoConfig other = cands.back();  // not the heuristic's first
  GemmAlgoChoice c{.min_m = kM - 10,
                   .max_m = kM + 10,
                   .n = f.n,
                   .k = f.k,
                   .accumulate = true,
                   .gelu = false,
                   .bias = true,
                   .dtype = DataType::kBF16,
                   .config = other};
  auto run = [&](const std::vector<GemmAlgoChoice>& choices, bool taken) {
    gemm_->SetAlgoChoices(choices);
    DeviceBuffer y = FreshY(f);
    ASSERT_EQ(gemm_->Run(Params(f, y.get()), nullptr), KernelStatus::kOk) << gemm_->last_error();
    EXPECT_EQ(gemm_->num_chosen_plans(), taken ? 1u : 0u);
    EXPECT_EQ(gemm_->last_plan_info().rfind("chosen ", 0) == 0, taken) << gemm_->last_plan_info();
    ExpectMatches(f, y);
  };
  run({c}, true);
  GemmAlgoChoice refused = c;
  refused.config.tile_id = 1;  // CUBLASLT_MATMUL_TILE_8x8: no Hopper kernel has it
  run({refused}, false);
  GemmAlgoChoice rows = c;
  rows.min_m = kM + 1;
  run({rows}, false);
  GemmAlgoChoice form = c;
  form.accumulate = false;
  run({form}, false);
  run({}, false);
  run({form, c}, true);  // the first that matches
}

TEST_F(CudaGemmAlgoTest, RunAlgoRefusesAConfigurationCublasLtDoesNotRun) {
  ASSERT_TRUE(gemm_);
  const Form& f = kForms[0];
  Prepare(f);
  GemmAlgoConfig bad;
  bad.algo_id = 66;
  bad.tile_id = 1;  // 8x8
  DeviceBuffer y = FreshY(f);
  EXPECT_EQ(gemm_->RunAlgo(Params(f, y.get()), DataType::kBF16, bad, nullptr),
            KernelStatus::kInvalidShape);
}

}  // namespace
}  // namespace phishard
