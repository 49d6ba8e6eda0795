#include "model/cuda_gemm_choices.h"

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#ifdef PHISHARD_HAVE_CUDA
#include "model/cuda_phi_model.h"
#endif

namespace phishard {
namespace {

bool ParseBool(absl::string_view s, bool* out) {
  if (s != "0" && s != "1") return false;
  *out = s == "1";
  return true;
}

}  // namespace

absl::StatusOr<std::vector<GemmAlgoChoice>> ParseGemmAlgoChoices(absl::string_view spec,
                                                                 DataType dtype,
                                                                 absl::string_view what) {
  std::vector<GemmAlgoChoice> out;
  for (absl::string_view entry : absl::StrSplit(spec, ';', absl::SkipWhitespace())) {
    entry = absl::StripAsciiWhitespace(entry);
    auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": entry '", entry, "' ", why,
          " (form MMIN-MMAX:N:K:ACC:GELU:BIAS=ALGO.TILE.STAGES.SPLITK.RED.SWIZZLE.CUSTOM.CLUSTER."
          "INNER)"));
    };
    const std::vector<absl::string_view> sides = absl::StrSplit(entry, '=');
    if (sides.size() != 2) return bad("needs one '='");
    const std::vector<absl::string_view> f = absl::StrSplit(sides[0], ':');
    if (f.size() != 6) return bad("needs 6 ':'-separated fields before '='");
    const std::vector<absl::string_view> range = absl::StrSplit(f[0], '-');
    GemmAlgoChoice c;
    c.dtype = dtype;
    if (range.size() != 2 || !absl::SimpleAtoi(range[0], &c.min_m) ||
        !absl::SimpleAtoi(range[1], &c.max_m) || c.min_m < 1 || c.max_m < c.min_m) {
      return bad("has no row range MMIN-MMAX with 1 <= MMIN <= MMAX");
    }
    if (!absl::SimpleAtoi(f[1], &c.n) || !absl::SimpleAtoi(f[2], &c.k) || c.n < 1 || c.k < 1) {
      return bad("has no positive N and K");
    }
    if (!ParseBool(f[3], &c.accumulate) || !ParseBool(f[4], &c.gelu) || !ParseBool(f[5], &c.bias)) {
      return bad("needs ACC, GELU and BIAS of 0 or 1");
    }
    const std::vector<absl::string_view> v = absl::StrSplit(sides[1], '.');
    int* dst[] = {&c.config.algo_id, &c.config.tile_id,    &c.config.stages_id,
                  &c.config.split_k, &c.config.reduction,  &c.config.swizzle,
                  &c.config.custom,  &c.config.cluster_id, &c.config.inner_shape_id};
    if (v.size() != 9) return bad("needs 9 '.'-separated configuration values");
    for (size_t i = 0; i < v.size(); ++i) {
      if (!absl::SimpleAtoi(v[i], dst[i]) || *dst[i] < 0) {
        return bad("has a configuration value that is not a non-negative integer");
      }
    }
    out.push_back(c);
  }
  return out;
}

absl::StatusOr<std::vector<GemmAlgoChoice>> GemmAlgoChoicesFromEnv(DataType dtype) {
  const char* v = std::getenv("PHISHARD_PREFILL_GEMM_ALGOS");
  const absl::string_view s = v == nullptr ? absl::string_view() : absl::string_view(v);
  if (s.empty() || s == "0") return std::vector<GemmAlgoChoice>{};
  return ParseGemmAlgoChoices(s, dtype, "environment variable PHISHARD_PREFILL_GEMM_ALGOS");
}

#ifdef PHISHARD_HAVE_CUDA
void CudaPhiModel::set_gemm_algo_choices(std::vector<GemmAlgoChoice> choices) {
  gemm_algos_ = std::move(choices);
  ApplyGemmChoices();
}

void CudaPhiModel::set_prefill_gemm_algos(bool on) {
  prefill_gemm_algos_ = on;
  ApplyGemmChoices();
}

void CudaPhiModel::set_decode_gemm_tune(int rows, double margin) {
  gemm_tune_rows_ = std::max(0, rows);
  gemm_tune_margin_ = margin;
  ForgetTunedGemms();
}

void CudaPhiModel::set_prefill_gemm_tune(bool on) {
  prefill_tune_ = on;
  ForgetTunedGemms();
}

void CudaPhiModel::ForgetTunedGemms() {
  gemm_tuned_ = false;
  tuned_forms_ = 0;
  tuned_algos_.clear();
  ApplyGemmChoices();
}

void CudaPhiModel::ApplyGemmChoices() {
  std::vector<GemmAlgoChoice> all;
  if (prefill_gemm_algos_) {
    all = gemm_algos_;  // the first match wins: recorded choices before tuned ones
    all.insert(all.end(), tuned_algos_.begin(), tuned_algos_.end());
  }
  for (CudaGemm* g : {gemm_.get(), mlp_gemm_.get()}) {
    if (g != nullptr) g->SetAlgoChoices(all);
  }
  DropGraphs();  // captured decode steps hold the old plans' kernels
}

size_t CudaPhiModel::chosen_gemm_plans() const {
  size_t n = 0;
  for (const CudaGemm* g : {gemm_.get(), mlp_gemm_.get()}) n += g ? g->num_chosen_plans() : 0;
  return n;
}
#endif  // PHISHARD_HAVE_CUDA

}  // namespace phishard
