#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gelu_cuda.h"
#include "kernels/cuda/gemm_algo.cuh"
#include "kernels/cuda/gemm_cuda.h"

namespace phishard {
namespace {

cudaDataType_t CudaType(DataType t) {
  switch (t) {
    case DataType::kF32:
      return CUDA_R_32F;
    case DataType::kF16:
      return CUDA_R_16F;
    case DataType::kBF16:
      return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

// Largest power of two (<= 256) dividing the address: what the heuristic may assume.
uint32_t Alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

constexpr int kMaxCandidates = 32;  // heuristic candidates asked for at most

// Everything the algorithm choice depends on.
using PlanKey = std::tuple<int, int, int, int, int, int, int, int, int, bool, uint32_t, uint32_t,
                           uint32_t, uint32_t, int, int64_t, int64_t, int64_t, int>;
// (m, n, k, ldx, ldy, ldw, dtype, y_dtype, cublas epilogue, accumulate, align x, w, y, bias,
//  batch, batch strides x, w, y, SM count target)

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr;  // w viewed column-major [k, n], ld ldw, op T
  cublasLtMatrixLayout_t b = nullptr;  // x viewed column-major [k, m], ld ldx, op N
  cublasLtMatrixLayout_t d = nullptr;  // y viewed column-major [n, m], ld ldy (also C)
  cublasLtMatmulAlgo_t algo;
  size_t workspace = 0;
  std::string info;     // the algorithm's configuration, for diagnostics (CudaGemm::last_plan_info)
  bool chosen = false;  // built from a GemmAlgoChoice (CudaGemm::SetAlgoChoices)
};

void DestroyPlan(Plan& p) {
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  if (p.a) cublasLtMatrixLayoutDestroy(p.a);
  if (p.b) cublasLtMatrixLayoutDestroy(p.b);
  if (p.d) cublasLtMatrixLayoutDestroy(p.d);
  p = Plan{};
}

}  // namespace

struct CudaGemm::Impl {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  std::map<PlanKey, Plan> plans;
  bool gelu_tanh_in_epilogue = false;
  bool gelu_accumulate_in_epilogue = false;  // epilogue applies to alpha·AB + beta·C (probed)
  double probe_accumulate_err = -1.0;        // worst error / tolerance of that probe
  double probe_err_tanh = -1.0;
  double probe_err_erf = -1.0;
  std::string last_error;
  bool f32_split_k = false;  // RequireFloat32SplitK
  std::string last_plan_info;
  std::vector<GemmAlgoChoice> choices;                         // SetAlgoChoices
  std::map<std::pair<PlanKey, std::string>, Plan> algo_plans;  // RunAlgo's, by configuration

  ~Impl() {
    for (auto& [key, plan] : plans) DestroyPlan(plan);
    for (auto& [key, plan] : algo_plans) DestroyPlan(plan);
    if (workspace) cudaFree(workspace);
    if (handle) cublasLtDestroy(handle);
  }

  KernelStatus Fail(const char* what, cublasStatus_t st) {
    last_error = std::string(what) + ": " + cublasLtGetStatusString(st);
    return KernelStatus::kDeviceError;
  }

  PlanKey KeyOf(const GemmParams& p, DataType y_dtype, int ldx, int ldy,
                cublasLtEpilogue_t epi) const {
    return PlanKey{p.m,
                   p.n,
                   p.k,
                   ldx,
                   ldy,
                   p.ldw == 0 ? p.k : p.ldw,
                   static_cast<int>(p.dtype),
                   static_cast<int>(y_dtype),
                   static_cast<int>(epi),
                   p.accumulate,
                   Alignment(p.x),
                   Alignment(p.w),
                   Alignment(p.y),
                   p.bias ? Alignment(p.bias) : 256u,
                   p.batch,
                   p.batch > 1 ? p.batch_stride_x : 0,
                   p.batch > 1 ? p.batch_stride_w : 0,
                   p.batch > 1 ? p.batch_stride_y : 0,
                   std::max(p.sm_count_target, 0)};
  }

  // The descriptors of `p` (no algorithm yet) and up to `max_results` heuristic candidates, best
  // first, into results[0 .. *returned). On any failure the plan is destroyed and *returned is 0
  // (a cuBLAS error is also a kDeviceError).
  KernelStatus Describe(const GemmParams& p, DataType y_dtype, int ldx, int ldy,
                        cublasLtEpilogue_t epi, int max_results,
                        cublasLtMatmulHeuristicResult_t* results, int* returned, Plan* pl) {
    *returned = 0;
    cublasStatus_t st = cublasLtMatmulDescCreate(&pl->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (st != CUBLAS_STATUS_SUCCESS) return Fail("cublasLtMatmulDescCreate", st);
    const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t));
    cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n));
    cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi));
    if (p.sm_count_target > 0) {
      const int32_t sms = p.sm_count_target;
      cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sms,
                                     sizeof(sms));
    }
    if (p.bias) {
      // The bias has the output's type (the default: float32 for float32 logits).
      cublasLtMatmulDescSetAttribute(pl->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias,
                                     sizeof(p.bias));
    }
    st = cublasLtMatrixLayoutCreate(&pl->a, CudaType(p.dtype), p.k, p.n, p.ldw == 0 ? p.k : p.ldw);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatrixLayoutCreate(&pl->b, CudaType(p.dtype), p.k, p.m, ldx);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatrixLayoutCreate(&pl->d, CudaType(y_dtype), p.n, p.m, ldy);
    if (st == CUBLAS_STATUS_SUCCESS && p.batch > 1) {
      const int32_t count = p.batch;
      const std::pair<cublasLtMatrixLayout_t, int64_t> items[3] = {
          {pl->a, p.batch_stride_w}, {pl->b, p.batch_stride_x}, {pl->d, p.batch_stride_y}};
      for (const auto& [layout, stride] : items) {
        if (st == CUBLAS_STATUS_SUCCESS) {
          st = cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                sizeof(count));
        }
        if (st == CUBLAS_STATUS_SUCCESS) {
          st = cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                &stride, sizeof(stride));
        }
      }
    }
    if (st != CUBLAS_STATUS_SUCCESS) {
      DestroyPlan(*pl);
      return Fail("cublasLtMatrixLayoutCreate", st);
    }
    cublasLtMatmulPreference_t pref = nullptr;
    st = cublasLtMatmulPreferenceCreate(&pref);
    if (st != CUBLAS_STATUS_SUCCESS) {
      DestroyPlan(*pl);
      return Fail("cublasLtMatmulPreferenceCreate", st);
    }
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                         &workspace_bytes, sizeof(workspace_bytes));
    if (f32_split_k && y_dtype != DataType::kF32) {  // float32 outputs reduce in float32 anyway
      const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;  // (or none: no split-K)
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                           &schemes, sizeof(schemes));
    }
    const uint32_t al_a = Alignment(p.w), al_b = Alignment(p.x), al_d = Alignment(p.y);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                         sizeof(al_a));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                         sizeof(al_b));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d,
                                         sizeof(al_d));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d,
                                         sizeof(al_d));
    int n = 0;
    st = cublasLtMatmulAlgoGetHeuristic(handle, pl->desc, pl->a, pl->b, pl->d, pl->d, pref,
                                        max_results, results, &n);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || n == 0 || results[0].state != CUBLAS_STATUS_SUCCESS) {
      DestroyPlan(*pl);
      return KernelStatus::kOk;  // no algorithm: the caller may fall back
    }
    *returned = n;
    return KernelStatus::kOk;
  }

  // Finds or builds the plan; *plan stays null when no algorithm supports the configuration.
  KernelStatus GetPlan(const GemmParams& p, DataType y_dtype, int ldx, int ldy,
                       cublasLtEpilogue_t epi, Plan** plan) {
    *plan = nullptr;
    const PlanKey key = KeyOf(p, y_dtype, ldx, ldy, epi);
    if (auto it = plans.find(key); it != plans.end()) {
      *plan = &it->second;
      return KernelStatus::kOk;
    }
    cublasLtMatmulHeuristicResult_t result = {};
    int returned = 0;
    Plan pl;
    if (KernelStatus s = Describe(p, y_dtype, ldx, ldy, epi, 1, &result, &returned, &pl);
        s != KernelStatus::kOk || returned == 0) {
      return s;
    }
    pl.algo = result.algo;
    pl.workspace = result.workspaceSize;
    pl.info = PlanInfo(result);
    if (const GemmAlgoChoice* c = FindChoice(p, y_dtype, epi); c != nullptr) {
      cublasLtMatmulAlgo_t algo;
      size_t ws = 0;
      if (BuildAlgo(p, y_dtype, c->config, pl, &algo, &ws)) {  // else the heuristic's pick
        pl.algo = algo;
        pl.workspace = ws;
        pl.info = "chosen " + gemm_algo::Describe(c->config);
        pl.chosen = true;
      }
    }
    auto [it, inserted] = plans.emplace(key, pl);
    *plan = &it->second;
    return KernelStatus::kOk;
  }

  // The first recorded choice that matches p (see GemmAlgoChoice), or null.
  const GemmAlgoChoice* FindChoice(const GemmParams& p, DataType y_dtype,
                                   cublasLtEpilogue_t epi) const {
    if (choices.empty() || p.batch != 1 || p.sm_count_target > 0 || y_dtype != p.dtype) {
      return nullptr;
    }
    const bool gelu = epi == CUBLASLT_EPILOGUE_GELU_BIAS || epi == CUBLASLT_EPILOGUE_GELU;
    for (const GemmAlgoChoice& c : choices) {
      if (p.m >= c.min_m && p.m <= c.max_m && p.n == c.n && p.k == c.k &&
          p.accumulate == c.accumulate && gelu == c.gelu && (p.bias != nullptr) == c.bias &&
          p.dtype == c.dtype) {
        // A split-K choice must reduce in float32 once RequireFloat32SplitK was called.
        const bool split_ok = !f32_split_k || c.config.split_k <= 1 ||
                              c.config.reduction == CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
        return split_ok ? &c : nullptr;
      }
    }
    return nullptr;
  }

  // Builds configuration c on pl's descriptors; true when cuBLASLt accepts it for p's operands:
  // the check passes, its workspace fits, and p's pointers meet its minimum alignments.
  bool BuildAlgo(const GemmParams& p, DataType y_dtype, const GemmAlgoConfig& c, const Plan& pl,
                 cublasLtMatmulAlgo_t* algo, size_t* ws) {
    if (gemm_algo::Build(handle, CudaType(p.dtype), CudaType(y_dtype), c, pl.desc, pl.a, pl.b, pl.d,
                         algo, ws) != CUBLAS_STATUS_SUCCESS ||
        *ws > workspace_bytes) {
      return false;
    }
    const std::pair<cublasLtMatmulAlgoCapAttributes_t, uint32_t> needs[] = {
        {CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_A_BYTES, Alignment(p.w)},
        {CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_B_BYTES, Alignment(p.x)},
        {CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_C_BYTES, Alignment(p.y)},
        {CUBLASLT_ALGO_CAP_MIN_ALIGNMENT_D_BYTES, Alignment(p.y)}};
    for (const auto& [cap, have] : needs) {
      uint32_t need = 0;
      size_t written = 0;
      if (cublasLtMatmulAlgoCapGetAttribute(algo, cap, &need, sizeof(need), &written) !=
              CUBLAS_STATUS_SUCCESS ||
          have < need) {
        return false;
      }
    }
    return true;
  }

  // Runs each of results[0 .. n) `repeats` times back to back on p's operands (after one warm-up
  // run), writing a scratch output so y is untouched (accumulating steps read y as C), and
  // appends one entry per candidate that ran (us = mean of one run). Synchronises `stream`;
  // refuses (kInvalidShape) inside a stream capture.
  KernelStatus TimeAlgos(const GemmParams& p, DataType y_dtype, int ldy, const Plan& pl,
                         const cublasLtMatmulHeuristicResult_t* results, int n, int repeats,
                         cudaStream_t stream, std::vector<GemmCandidateTime>* out) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
        capture != cudaStreamCaptureStatusNone) {
      cudaGetLastError();
      return KernelStatus::kInvalidShape;
    }
    const size_t bytes = static_cast<size_t>(p.m) * ldy * DataTypeSize(y_dtype);
    void* scratch = nullptr;
    cudaEvent_t start = nullptr, stop = nullptr;
    if (cudaMalloc(&scratch, bytes) != cudaSuccess || cudaEventCreate(&start) != cudaSuccess ||
        cudaEventCreate(&stop) != cudaSuccess) {
      if (scratch) cudaFree(scratch);
      if (start) cudaEventDestroy(start);
      cudaGetLastError();
      return KernelStatus::kDeviceError;
    }
    // Scratch starts as a copy of y: accumulating candidates then see the same C values.
    cudaMemcpyAsync(scratch, p.y, bytes, cudaMemcpyDeviceToDevice, stream);
    const float alpha = 1.0f;
    const float beta = p.accumulate ? 1.0f : 0.0f;
    auto run = [&](int i) {
      return cublasLtMatmul(handle, pl.desc, &alpha, p.w, pl.a, p.x, pl.b, &beta, scratch, pl.d,
                            scratch, pl.d, &results[i].algo, workspace, workspace_bytes, stream);
    };
    for (int i = 0; i < n; ++i) {
      if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > workspace_bytes ||
          run(i) != CUBLAS_STATUS_SUCCESS) {
        continue;
      }
      bool ok = cudaEventRecord(start, stream) == cudaSuccess;
      for (int r = 0; ok && r < repeats; ++r) ok = run(i) == CUBLAS_STATUS_SUCCESS;
      ok = ok && cudaEventRecord(stop, stream) == cudaSuccess &&
           cudaEventSynchronize(stop) == cudaSuccess;
      float ms = 0.0f;
      if (!ok || cudaEventElapsedTime(&ms, start, stop) != cudaSuccess) continue;
      GemmCandidateTime t = ConfigOf(results[i]);
      t.index = i;
      t.us = 1e3f * ms / static_cast<float>(repeats);
      out->push_back(t);
    }
    cudaStreamSynchronize(stream);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    cudaFree(scratch);
    cudaGetLastError();  // a candidate's failure is no step error
    return KernelStatus::kOk;
  }

  static GemmCandidateTime ConfigOf(const cublasLtMatmulHeuristicResult_t& r) {
    const GemmAlgoConfig c = gemm_algo::ReadConfig(r.algo);
    GemmCandidateTime t;
    t.algo_id = c.algo_id;
    t.tile_id = c.tile_id;
    t.stages_id = c.stages_id;
    t.split_k = c.split_k;
    t.reduction = c.reduction;
    t.swizzle = c.swizzle;
    t.custom = c.custom;
    t.cluster_id = c.cluster_id;
    t.workspace = r.workspaceSize;
    t.waves = r.wavesCount;
    return t;
  }

  // "algo A tile T stages S split-K K scheme R impl 0x..": ConfigOf's ids and the algorithm's
  // numerical implementation flags (cublasLtNumericalImplFlags_t).
  static std::string PlanInfo(const cublasLtMatmulHeuristicResult_t& r) {
    const GemmCandidateTime t = ConfigOf(r);
    uint64_t impl = 0;
    size_t written = 0;
    cublasLtMatmulAlgoCapGetAttribute(&r.algo, CUBLASLT_ALGO_CAP_NUMERICAL_IMPL_FLAGS, &impl,
                                      sizeof(impl), &written);
    char buf[128];
    std::snprintf(buf, sizeof(buf), "algo %d tile %d stages %d split-K %d scheme %d impl 0x%llx",
                  t.algo_id, t.tile_id, t.stages_id, t.split_k, t.reduction,
                  static_cast<unsigned long long>(impl));
    return buf;
  }

  KernelStatus Matmul(const GemmParams& p, DataType y_dtype, int ldx, int ldy,
                      cublasLtEpilogue_t epi, bool* no_algo, cudaStream_t stream) {
    Plan* plan = nullptr;
    if (KernelStatus s = GetPlan(p, y_dtype, ldx, ldy, epi, &plan); s != KernelStatus::kOk) {
      return s;
    }
    *no_algo = plan == nullptr;
    if (!plan) return KernelStatus::kOk;
    if (p.bias) {
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias,
                                     sizeof(p.bias));
    }
    const float alpha = 1.0f;
    const float beta = p.accumulate ? 1.0f : 0.0f;
    const cublasStatus_t st =
        cublasLtMatmul(handle, plan->desc, &alpha, p.w, plan->a, p.x, plan->b, &beta, p.y, plan->d,
                       p.y, plan->d, &plan->algo, workspace, workspace_bytes, stream);
    if (st != CUBLAS_STATUS_SUCCESS) return Fail("cublasLtMatmul", st);
    last_plan_info = plan->info;
    return KernelStatus::kOk;
  }

  // The epilogue Run asks cuBLASLt for first: GELU fused when the probes allow it.
  bool FusedGelu(const GemmParams& p) const {
    return p.epilogue == GemmEpilogue::kGeluTanh && gelu_tanh_in_epilogue &&
           (!p.accumulate || gelu_accumulate_in_epilogue);
  }
  cublasLtEpilogue_t EpilogueFor(const GemmParams& p) const {
    if (FusedGelu(p)) return p.bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    return p.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  }

  KernelStatus Probe();
  void ProbeAccumulate();
};

// Decides whether CUBLASLT_EPILOGUE_GELU_BIAS computes the tanh approximation (HF gelu_new), by
// running it on pre-activations -4 + j/8 (exact in bf16) with a float32 output, where the
// tanh/erf difference (up to 4.7e-4, at |x| = 2.75) is far above float32 rounding.
KernelStatus CudaGemm::Impl::Probe() {
  constexpr int kM = 8, kN = 64, kK = 16;
  std::vector<uint16_t> x(kM * kK, 0), w(kN * kK, 0);
  std::vector<float> bias(kN, 0.0f), pre(kN);
  auto to_bf16 = [](float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);  // exact: every value used has <= 8 significant bits
  };
  for (int i = 0; i < kM; ++i) x[i * kK] = to_bf16(1.0f);
  for (int j = 0; j < kN; ++j) {
    pre[j] = -4.0f + 0.125f * j;
    w[j * kK] = to_bf16(pre[j]);
  }
  void* dx = nullptr;
  void* dw = nullptr;
  void* db = nullptr;
  void* dy = nullptr;
  cudaError_t err = cudaMalloc(&dx, x.size() * 2);
  if (err == cudaSuccess) err = cudaMalloc(&dw, w.size() * 2);
  if (err == cudaSuccess) err = cudaMalloc(&db, bias.size() * 4);
  if (err == cudaSuccess) err = cudaMalloc(&dy, kM * kN * 4);
  std::vector<float> y(kM * kN, NAN);
  KernelStatus status = KernelStatus::kOk;
  if (err == cudaSuccess) err = cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) err = cudaMemcpy(dw, w.data(), w.size() * 2, cudaMemcpyHostToDevice);
  if (err == cudaSuccess)
    err = cudaMemcpy(db, bias.data(), bias.size() * 4, cudaMemcpyHostToDevice);
  bool no_algo = true;
  if (err == cudaSuccess) {
    GemmParams p;
    p.x = dx;
    p.w = dw;
    p.bias = db;
    p.y = dy;
    p.m = kM;
    p.n = kN;
    p.k = kK;
    p.dtype = DataType::kBF16;
    status = Matmul(p, DataType::kF32, kK, kN, CUBLASLT_EPILOGUE_GELU_BIAS, &no_algo, nullptr);
    if (status == KernelStatus::kOk && !no_algo) {
      err = cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost);
    }
  }
  if (dx) cudaFree(dx);
  if (dw) cudaFree(dw);
  if (db) cudaFree(db);
  if (dy) cudaFree(dy);
  if (err != cudaSuccess) {
    last_error = std::string("GELU probe: ") + cudaGetErrorString(err);
    return KernelStatus::kDeviceError;
  }
  // A probe that cannot run (no algorithm, cuBLAS error) just means "use the separate kernel".
  if (status != KernelStatus::kOk || no_algo) return KernelStatus::kOk;
  double err_tanh = 0.0, err_erf = 0.0;
  for (int i = 0; i < kM; ++i) {
    for (int j = 0; j < kN; ++j) {
      const double v = y[i * kN + j];
      const double xx = pre[j];
      const double gt =
          0.5 * xx * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (xx + 0.044715 * xx * xx * xx)));
      const double ge = 0.5 * xx * (1.0 + std::erf(xx / std::sqrt(2.0)));
      err_tanh = std::isfinite(v) ? std::max(err_tanh, std::fabs(v - gt)) : INFINITY;
      err_erf = std::isfinite(v) ? std::max(err_erf, std::fabs(v - ge)) : INFINITY;
    }
  }
  probe_err_tanh = err_tanh;
  probe_err_erf = err_erf;
  // Within 1e-4 of tanh GELU (a fast tanh unit is fine: the bf16 output rounding is ~8e-3 at
  // |x| = 2) and clearly closer to it than to erf GELU.
  gelu_tanh_in_epilogue = err_tanh < 1e-4 && err_tanh * 4 < err_erf;
  if (gelu_tanh_in_epilogue) ProbeAccumulate();
  return KernelStatus::kOk;
}

// With accumulate (beta = 1) the epilogue must apply GELU to the sum y + x·wᵀ, not GELU(x·wᵀ)
// + y: y starts at 0.5 and the product gives pre-activations pre_j = -24 + 0.75 j (exact in bf16;
// wider than Probe's range, since a LoRA delta can move fc1's pre-activations far out), so the
// output must be GELU-tanh(pre_j + 0.5) within 1e-4 + 1e-5 |x| (float32 output). Any failure
// just leaves the separate activation kernel in use.
void CudaGemm::Impl::ProbeAccumulate() {
  constexpr int kM = 8, kN = 64, kK = 16;
  std::vector<float> pre(kN);
  for (int j = 0; j < kN; ++j) pre[j] = -24.0f + 0.75f * j;
  std::vector<uint16_t> x(kM * kK, 0), w(kN * kK, 0);
  auto to_bf16 = [](float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);
  };
  for (int i = 0; i < kM; ++i) x[i * kK] = to_bf16(1.0f);
  for (int j = 0; j < kN; ++j) w[j * kK] = to_bf16(pre[j]);
  std::vector<float> y(kM * kN, 0.5f);
  void* dx = nullptr;
  void* dw = nullptr;
  void* dy = nullptr;
  cudaError_t err = cudaMalloc(&dx, x.size() * 2);
  if (err == cudaSuccess) err = cudaMalloc(&dw, w.size() * 2);
  if (err == cudaSuccess) err = cudaMalloc(&dy, y.size() * 4);
  if (err == cudaSuccess) err = cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) err = cudaMemcpy(dw, w.data(), w.size() * 2, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) err = cudaMemcpy(dy, y.data(), y.size() * 4, cudaMemcpyHostToDevice);
  bool no_algo = true;
  KernelStatus status = KernelStatus::kDeviceError;
  if (err == cudaSuccess) {
    GemmParams p;
    p.x = dx;
    p.w = dw;
    p.y = dy;
    p.m = kM;
    p.n = kN;
    p.k = kK;
    p.accumulate = true;
    p.dtype = DataType::kBF16;
    status = Matmul(p, DataType::kF32, kK, kN, CUBLASLT_EPILOGUE_GELU, &no_algo, nullptr);
    if (status == KernelStatus::kOk && !no_algo) {
      err = cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost);
    }
  }
  if (dx) cudaFree(dx);
  if (dw) cudaFree(dw);
  if (dy) cudaFree(dy);
  if (err != cudaSuccess || status != KernelStatus::kOk || no_algo) {
    cudaGetLastError();
    return;
  }
  double worst = 0.0;  // |error| / allowed
  for (int i = 0; i < kM; ++i) {
    for (int j = 0; j < kN; ++j) {
      const double v = y[i * kN + j], xx = pre[j] + 0.5;
      const double gt =
          0.5 * xx * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (xx + 0.044715 * xx * xx * xx)));
      const double q = std::fabs(v - gt) / (1e-4 + 1e-5 * std::fabs(xx));
      worst = std::isfinite(v) ? std::max(worst, q) : INFINITY;
    }
  }
  probe_accumulate_err = worst;
  gelu_accumulate_in_epilogue = worst <= 1.0;
}

CudaGemm::CudaGemm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaGemm::~CudaGemm() = default;

KernelStatus CudaGemm::Create(size_t workspace_bytes, std::unique_ptr<CudaGemm>* out) {
  out->reset();
  auto impl = std::make_unique<Impl>();
  if (cublasLtCreate(&impl->handle) != CUBLAS_STATUS_SUCCESS) return KernelStatus::kDeviceError;
  if (workspace_bytes > 0) {
    if (cudaMalloc(&impl->workspace, workspace_bytes) != cudaSuccess) {
      impl->workspace = nullptr;
      return KernelStatus::kDeviceError;
    }
    impl->workspace_bytes = workspace_bytes;
  }
  if (KernelStatus s = impl->Probe(); s != KernelStatus::kOk) return s;
  out->reset(new CudaGemm(std::move(impl)));
  return KernelStatus::kOk;
}

KernelStatus CudaGemm::Run(const GemmParams& p, cudaStream_t stream) {
  return Run(p, p.dtype, stream);
}

KernelStatus CudaGemm::Run(const GemmParams& p, DataType y_dtype, cudaStream_t stream) {
  if (p.dtype != DataType::kF16 && p.dtype != DataType::kBF16) {
    impl_->last_error =
        std::string("gemm operands must be f16 or bf16, got ") + DataTypeName(p.dtype);
    return KernelStatus::kUnsupportedDtype;
  }
  if (y_dtype != p.dtype && y_dtype != DataType::kF32) {
    impl_->last_error = "gemm output must be the operand dtype or f32";
    return KernelStatus::kUnsupportedDtype;
  }
  if (p.m < 0 || p.n <= 0 || p.k <= 0 || p.batch < 1 || (p.batch > 1 && p.bias != nullptr)) {
    return KernelStatus::kInvalidShape;
  }
  const int ldx = p.ldx == 0 ? p.k : p.ldx;
  const int ldy = p.ldy == 0 ? p.n : p.ldy;
  if (ldx < p.k || ldy < p.n || (p.ldw != 0 && p.ldw < p.k)) return KernelStatus::kInvalidShape;
  if (p.m == 0) return KernelStatus::kOk;
  if (!p.x || !p.w || !p.y) return KernelStatus::kNullPointer;

  const bool want_gelu = p.epilogue != GemmEpilogue::kNone;
  // With accumulate the epilogue must act on y + x·wᵀ (probed), else the separate kernel does.
  const bool fused_gelu = impl_->FusedGelu(p);
  const cublasLtEpilogue_t plain = p.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  bool no_algo = true;
  if (fused_gelu) {
    const cublasLtEpilogue_t epi = impl_->EpilogueFor(p);
    if (KernelStatus s = impl_->Matmul(p, y_dtype, ldx, ldy, epi, &no_algo, stream);
        s != KernelStatus::kOk) {
      return s;
    }
    if (!no_algo) return KernelStatus::kOk;
  }
  if (KernelStatus s = impl_->Matmul(p, y_dtype, ldx, ldy, plain, &no_algo, stream);
      s != KernelStatus::kOk) {
    return s;
  }
  if (no_algo) {
    impl_->last_error = "cuBLASLt has no algorithm for this gemm (check alignment and dtypes)";
    return KernelStatus::kDeviceError;
  }
  if (!want_gelu) return KernelStatus::kOk;
  // The activation cuBLASLt did not apply (erf GELU; tanh GELU when the probe says its epilogue is
  // not the tanh form or does not act on the accumulated sum): the in-place GELU op
  // (kernels/gelu.h) on y[m, n] (row stride ldy), one launch per batch item.
  const int64_t item_bytes = p.batch_stride_y * static_cast<int64_t>(DataTypeSize(y_dtype));
  for (int i = 0; i < p.batch; ++i) {
    const GeluInPlaceParams g{.y = static_cast<char*>(p.y) + i * item_bytes,
                              .rows = p.m,
                              .cols = p.n,
                              .ld = ldy,
                              .act = p.epilogue,
                              .dtype = y_dtype};
    if (KernelStatus s = GeluInPlaceCuda(g, stream); s != KernelStatus::kOk) return s;
  }
  return KernelStatus::kOk;
}

bool CudaGemm::gelu_tanh_in_epilogue() const { return impl_->gelu_tanh_in_epilogue; }
bool CudaGemm::gelu_accumulate_in_epilogue() const { return impl_->gelu_accumulate_in_epilogue; }
double CudaGemm::probe_accumulate_err() const { return impl_->probe_accumulate_err; }
double CudaGemm::probe_err_tanh() const { return impl_->probe_err_tanh; }
double CudaGemm::probe_err_erf() const { return impl_->probe_err_erf; }
const std::string& CudaGemm::last_error() const { return impl_->last_error; }
void CudaGemm::RequireFloat32SplitK() {
  if (impl_->f32_split_k) return;
  for (auto& [key, plan] : impl_->plans) DestroyPlan(plan);
  impl_->plans.clear();
  impl_->f32_split_k = true;
}
const std::string& CudaGemm::last_plan_info() const { return impl_->last_plan_info; }
size_t CudaGemm::num_cached_plans() const { return impl_->plans.size(); }

void CudaGemm::SetAlgoChoices(std::vector<GemmAlgoChoice> choices) {
  for (auto& [key, plan] : impl_->plans) DestroyPlan(plan);
  impl_->plans.clear();
  impl_->choices = std::move(choices);
}

size_t CudaGemm::num_chosen_plans() const {
  size_t n = 0;
  for (const auto& [key, plan] : impl_->plans) n += plan.chosen ? 1 : 0;
  return n;
}

KernelStatus CudaGemm::ListAlgos(const GemmParams& p, DataType y_dtype, int max_heuristic,
                                 bool variants, std::vector<GemmAlgoConfig>* out) {
  out->clear();
  if (p.m <= 0 || p.n <= 0 || p.k <= 0 || p.batch != 1) return KernelStatus::kInvalidShape;
  const int ldx = p.ldx == 0 ? p.k : p.ldx;
  const int ldy = p.ldy == 0 ? p.n : p.ldy;
  cublasLtMatmulHeuristicResult_t results[kMaxCandidates] = {};
  int returned = 0;
  Plan pl;
  if (KernelStatus s = impl_->Describe(p, y_dtype, ldx, ldy, impl_->EpilogueFor(p), kMaxCandidates,
                                       results, &returned, &pl);
      s != KernelStatus::kOk || returned == 0) {
    return s;
  }
  auto add = [&](const GemmAlgoConfig& c) {
    if (std::find(out->begin(), out->end(), c) == out->end()) out->push_back(c);
  };
  for (int i = 0; i < returned && static_cast<int>(out->size()) < max_heuristic; ++i) {
    if (results[i].state == CUBLAS_STATUS_SUCCESS &&
        results[i].workspaceSize <= impl_->workspace_bytes) {
      add(gemm_algo::ReadConfig(results[i].algo));
    }
  }
  if (variants) {
    const GemmAlgoConfig base = gemm_algo::ReadConfig(results[0].algo);
    for (int tile : gemm_algo::VariantTiles()) {
      for (int cluster : gemm_algo::VariantClusters()) {
        GemmAlgoConfig c = base;
        c.tile_id = tile;
        c.cluster_id = cluster;
        cublasLtMatmulAlgo_t algo;
        size_t ws = 0;
        if (impl_->BuildAlgo(p, y_dtype, c, pl, &algo, &ws)) add(c);
      }
    }
  }
  DestroyPlan(pl);
  return KernelStatus::kOk;
}

KernelStatus CudaGemm::RunAlgo(const GemmParams& p, DataType y_dtype, const GemmAlgoConfig& c,
                               cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0 || p.k <= 0 || p.batch != 1) return KernelStatus::kInvalidShape;
  if (!p.x || !p.w || !p.y) return KernelStatus::kNullPointer;
  const int ldx = p.ldx == 0 ? p.k : p.ldx;
  const int ldy = p.ldy == 0 ? p.n : p.ldy;
  const cublasLtEpilogue_t epi = impl_->EpilogueFor(p);
  const auto key = std::make_pair(impl_->KeyOf(p, y_dtype, ldx, ldy, epi), gemm_algo::Describe(c));
  auto it = impl_->algo_plans.find(key);
  if (it == impl_->algo_plans.end()) {
    cublasLtMatmulHeuristicResult_t result = {};
    int returned = 0;
    Plan pl;
    if (KernelStatus s = impl_->Describe(p, y_dtype, ldx, ldy, epi, 1, &result, &returned, &pl);
        s != KernelStatus::kOk || returned == 0) {
      return s == KernelStatus::kOk ? KernelStatus::kInvalidShape : s;
    }
    if (!impl_->BuildAlgo(p, y_dtype, c, pl, &pl.algo, &pl.workspace)) {
      DestroyPlan(pl);
      return KernelStatus::kInvalidShape;
    }
    pl.info = gemm_algo::Describe(c);
    it = impl_->algo_plans.emplace(key, pl).first;
  }
  Plan& plan = it->second;
  if (p.bias) {
    cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias,
                                   sizeof(p.bias));
  }
  const float alpha = 1.0f;
  const float beta = p.accumulate ? 1.0f : 0.0f;
  const cublasStatus_t st =
      cublasLtMatmul(impl_->handle, plan.desc, &alpha, p.w, plan.a, p.x, plan.b, &beta, p.y, plan.d,
                     p.y, plan.d, &plan.algo, impl_->workspace, impl_->workspace_bytes, stream);
  if (st != CUBLAS_STATUS_SUCCESS) return impl_->Fail("cublasLtMatmul", st);
  return KernelStatus::kOk;
}

KernelStatus CudaGemm::TimeCandidates(const GemmParams& p, DataType y_dtype, int max_candidates,
                                      int repeats, cudaStream_t stream,
                                      std::vector<GemmCandidateTime>* out) {
  out->clear();
  if (p.dtype != DataType::kF16 && p.dtype != DataType::kBF16)
    return KernelStatus::kUnsupportedDtype;
  if (y_dtype != p.dtype && y_dtype != DataType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.m <= 0 || p.n <= 0 || p.k <= 0 || max_candidates <= 0 || repeats <= 0 ||
      p.batch != 1) {  // (the scratch output holds one item)
    return KernelStatus::kInvalidShape;
  }
  const int ldx = p.ldx == 0 ? p.k : p.ldx;
  const int ldy = p.ldy == 0 ? p.n : p.ldy;
  if (ldx < p.k || ldy < p.n) return KernelStatus::kInvalidShape;
  if (!p.x || !p.w || !p.y) return KernelStatus::kNullPointer;
  const cublasLtEpilogue_t epi = impl_->EpilogueFor(p);
  cublasLtMatmulHeuristicResult_t results[kMaxCandidates] = {};
  int returned = 0;
  Plan pl;
  if (KernelStatus s =
          impl_->Describe(p, y_dtype, ldx, ldy, epi, std::min(max_candidates, kMaxCandidates),
                          results, &returned, &pl);
      s != KernelStatus::kOk || returned == 0) {
    return s;
  }
  const KernelStatus s =
      impl_->TimeAlgos(p, y_dtype, ldy, pl, results, returned, repeats, stream, out);
  DestroyPlan(pl);
  return s;
}

}  // namespace phishard
