// Small helpers the benchmark programs share (bench/*.cc): host-side only.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "kernels/gemm.h"

namespace phishard::bench {

// The median of `v` (the upper one of an even count); 0 for an empty vector.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// "1,32,128" -> {1, 32, 128}; empty parts are skipped. A part that is not an int ends the
// program with exit code 2 and a message naming it and the list (these lists come from flags).
inline std::vector<int> ParseInts(const std::string& s) {
  std::vector<int> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(p, &v)) {
      std::fprintf(stderr, "'%s' in the list '%s' is not an integer\n", std::string(p).c_str(),
                   s.c_str());
      std::exit(2);
    }
    out.push_back(v);
  }
  return out;
}

// The linear layers of a Phi decoder layer (hidden H, MLP width I) and the LM head (vocab V) as
// the kernel timings see them: y[m, n] (+)= x[m, k] · w[n, k]ᵀ (+ x2[m, k2] · w2[n, k2]ᵀ for the
// fused dense + fc2 residual pair), float32 output and bias for the LM head.
struct PhiLinear {
  const char* name;
  int n, k, k2;
  GemmEpilogue epi;
  bool acc, f32;
};
inline std::vector<PhiLinear> PhiLinears(int H, int I, int V) {
  return {{"qkv", 3 * H, H, 0, GemmEpilogue::kNone, false, false},
          {"fc1+gelu", I, H, 0, GemmEpilogue::kGeluTanh, false, false},
          {"dense+fc2", H, H, I, GemmEpilogue::kNone, true, false},
          {"lm_head_f32", V, H, 0, GemmEpilogue::kNone, false, true}};
}

// The first segment of `l` at m rows as a bf16 GEMM (the LM head's float32 bias only where the
// layer has one; the output dtype is PhiLinearOutput(l)).
inline GemmParams PhiLinearGemm(const PhiLinear& l, int m, const void* x, const void* w,
                                const void* f32_bias, void* y) {
  return GemmParams{.x = x,
                    .w = w,
                    .bias = l.f32 ? f32_bias : nullptr,
                    .y = y,
                    .m = m,
                    .n = l.n,
                    .k = l.k,
                    .accumulate = l.acc,
                    .epilogue = l.epi,
                    .dtype = DataType::kBF16};
}
inline DataType PhiLinearOutput(const PhiLinear& l) {
  return l.f32 ? DataType::kF32 : DataType::kBF16;
}

}  // namespace phishard::bench
