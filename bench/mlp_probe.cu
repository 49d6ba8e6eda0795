// phishard_mlp_probe: a 1-row MLP (fc2(gelu(fc1(x)))) as ONE streaming launch, alone and beside the
// decode attention, against the two-launch form the b1 step runs today (measurement only;
// docs/performance.md, decode b1).
//
// Why: every 1-row GEMV form tops out at ~3.5 TB/s a 52 MB launch (each launch's start, ramp and
// tail; perf-log 2026-11-30 17:55), and fc2 cannot start before fc1's last row is written. Here one
// persistent block an SM takes chunks of R = 10 intermediate rows from a global counter; for each,
// a producer warp bulk-copies fc1's 10 rows [10, K] and then the same 10 rows of fc2's weight
// TRANSPOSED (w2t [I, K] = fc2.weight [K, I] transposed, contiguous for a chunk) into a shared-
// memory ring; the 10 consumer warps take one fc1 row each (dot with x, + bias, GELU, rounded to
// the dtype as the GEMM epilogue does), then every consumer thread owns 8 output columns and adds
// g[r] * w2t[r, cols] over the chunk's rows into float32 registers. The block's partial output
// (K floats) is added into a float32 [K] vector at its end (float4 atomics). So no launch boundary
// and no dependency wait sit between fc1 and fc2, and the stream holds shared memory, not
// registers (room for the attention's blocks beside it).
//
// Shape: Phi-2's MLP (K = 2560, I = 10240, bf16, 105 MB of weights); launches back to back over
// 4 distinct weight copies (420 MB, so no launch finds its weights in the 50 MB L2).
// Measured (perf-log 2026-11-30 18:20-18:22, session 27): max |out - ref| 3e-6 of 6.4; cuBLASLt's
// two launches 36.5 us (2.88 TB/s), the fused launch 33.1 / 31.8 / 31.7 us at 2 / 3 / 4 stages
// (3.17-3.30 TB/s), 36.4 at 2 blocks an SM; one launch over 2 / 4 copies 54.4 / 99.7 us: 4.64
// TB/s in steady state and ~9 us a launch of start, ramp and tail. The attention beside: x2.2-3.1
// (its blocks did not share SMs with the fused kernel's: see bench/layer_probe.cu, carveout).
// Usage: phishard_mlp_probe [ctx (default 1024)]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#include "bench/bench_device.h"
#include "kernels/cuda/gelu_math.cuh"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/sm90_ptx.cuh"
#include "kernels/cuda/stream_stage.cuh"

namespace phishard::bench {
namespace {

constexpr const char* kProg = "phishard_mlp_probe";

#define MLP_CHECK(call) PHI_BENCH_CHECK(kProg, call)

#include "bench/fused_mlp.cuh"

float ElapsedMs(cudaEvent_t a, cudaEvent_t b) { return ElapsedMsOrDie(a, b, kProg); }

float Bf(const __nv_bfloat16& v) { return __bfloat162float(v); }

int Main(int argc, char** argv) {
  const int ctx = argc > 1 ? std::atoi(argv[1]) : 1024;
  constexpr int KC = 10, K = 2560, I = 10240, R = KC, heads = 32, hd = 80;
  cudaStream_t fg, bg;
  MLP_CHECK(cudaStreamCreateWithFlags(&fg, cudaStreamNonBlocking));
  MLP_CHECK(cudaStreamCreateWithFlags(&bg, cudaStreamNonBlocking));

  // Weights: kCopies distinct (w1, w2, w2t) sets; x, b1, b2; outputs.
  constexpr int kCopies = 4;
  const size_t wn = size_t{I} * K;
  __nv_bfloat16* w1 = static_cast<__nv_bfloat16*>(DeviceAllocOrDie(2 * wn * kCopies, kProg));
  __nv_bfloat16* w2 = static_cast<__nv_bfloat16*>(DeviceAllocOrDie(2 * wn * kCopies, kProg));
  __nv_bfloat16* w2t = static_cast<__nv_bfloat16*>(DeviceAllocOrDie(2 * wn * kCopies, kProg));
  __nv_bfloat16* x = static_cast<__nv_bfloat16*>(DeviceAllocOrDie(2 * K, kProg));
  __nv_bfloat16* b1 = static_cast<__nv_bfloat16*>(DeviceAllocOrDie(2 * I * kCopies, kProg));
  __nv_bfloat16* b2 = static_cast<__nv_bfloat16*>(DeviceAllocOrDie(2 * K, kProg));
  __nv_bfloat16* mid = static_cast<__nv_bfloat16*>(DeviceAllocOrDie(2 * I, kProg));
  __nv_bfloat16* y = static_cast<__nv_bfloat16*>(DeviceAllocOrDie(2 * K, kProg));
  float* out = static_cast<float*>(DeviceAllocOrDie(4 * K, kProg));
  int* counters = static_cast<int*>(DeviceAllocOrDie(64, kProg));
  MLP_CHECK(cudaMemset(counters, 0, 64));
  RandomFillOrDie(w1, wn * kCopies, 41, DataType::kBF16, fg, kProg, 0.05f);
  RandomFillOrDie(w2, wn * kCopies, 42, DataType::kBF16, fg, kProg, 0.05f);
  RandomFillOrDie(x, K, 43, DataType::kBF16, fg, kProg);
  RandomFillOrDie(b1, I * kCopies, 44, DataType::kBF16, fg, kProg);
  RandomFillOrDie(b2, K, 45, DataType::kBF16, fg, kProg);
  MLP_CHECK(cudaDeviceSynchronize());
  // w2t of every copy (host transpose of the first copy, device copies for the rest: the timing
  // does not depend on the values, the check reads copy 0 only).
  std::vector<__nv_bfloat16> h_w1(wn), h_w2(wn), h_w2t(wn), h_x(K), h_b1(I);
  MLP_CHECK(cudaMemcpy(h_w1.data(), w1, 2 * wn, cudaMemcpyDeviceToHost));
  MLP_CHECK(cudaMemcpy(h_w2.data(), w2, 2 * wn, cudaMemcpyDeviceToHost));
  MLP_CHECK(cudaMemcpy(h_x.data(), x, 2 * K, cudaMemcpyDeviceToHost));
  MLP_CHECK(cudaMemcpy(h_b1.data(), b1, 2 * I, cudaMemcpyDeviceToHost));
  for (int j = 0; j < K; ++j) {
    for (int i = 0; i < I; ++i)
      h_w2t[static_cast<size_t>(i) * K + j] = h_w2[static_cast<size_t>(j) * I + i];
  }
  for (int c = 0; c < kCopies; ++c) {
    MLP_CHECK(cudaMemcpy(w2t + wn * c, h_w2t.data(), 2 * wn, cudaMemcpyHostToDevice));
  }
  // Reference (double): out_ref[j] = sum_i bf16(gelu(w1[i] . x + b1[i])) w2[j, i] (no fc2 bias).
  std::vector<double> g(I), out_ref(K, 0.0);
  for (int i = 0; i < I; ++i) {
    double d = 0;
    for (int k = 0; k < K; ++k) d += double(Bf(h_w1[static_cast<size_t>(i) * K + k])) * Bf(h_x[k]);
    const float pre = static_cast<float>(d) + Bf(h_b1[i]);
    const float ge =
        0.5f * pre * (1.0f + std::tanh(0.7978845608028654f * (pre + 0.044715f * pre * pre * pre)));
    g[i] = Bf(__float2bfloat16(ge));
  }
  for (int j = 0; j < K; ++j) {
    double s = 0;
    for (int i = 0; i < I; ++i) s += g[i] * Bf(h_w2[static_cast<size_t>(j) * I + i]);
    out_ref[j] = s;
  }
  double ref_scale = 0;
  for (double v : out_ref) ref_scale = std::max(ref_scale, std::fabs(v));

  std::unique_ptr<CudaGemm> gemm;
  if (CudaGemm::Create(size_t{32} << 20, &gemm) != KernelStatus::kOk) {
    std::fprintf(stderr, "%s: CudaGemm::Create failed\n", kProg);
    return 1;
  }
  int launch = 0;
  // The two-launch form (as the b1 step's MLP branch): cuBLASLt fc1 + GELU, then y += fc2.
  auto cublas_pair = [&](cudaStream_t st) {
    const int c = launch++ % kCopies;
    const GemmParams p1{.x = x,
                        .w = w1 + wn * c,
                        .bias = b1,
                        .y = mid,
                        .m = 1,
                        .n = I,
                        .k = K,
                        .epilogue = GemmEpilogue::kGeluTanh,
                        .dtype = DataType::kBF16};
    GemmParams p2{.x = mid,
                  .w = w2 + wn * c,
                  .bias = nullptr,
                  .y = y,
                  .m = 1,
                  .n = K,
                  .k = I,
                  .dtype = DataType::kBF16};
    p2.accumulate = true;
    if (gemm->Run(p1, st) != KernelStatus::kOk || gemm->Run(p2, st) != KernelStatus::kOk) {
      std::fprintf(stderr, "%s: cuBLASLt failed\n", kProg);
      std::exit(1);
    }
  };
  // mult > 1: one launch streams `mult` consecutive copies (mult x 105 MB; the rate's slope
  // against mult separates the launch's fixed start / tail from its streaming rate).
  auto fused = [&](int stages, int bpsm, int mult = 1) {
    const int smem = FusedMlpSmem(KC, stages);
    // The largest form's size, so that every form may launch.
    MLP_CHECK(cudaFuncSetAttribute(FusedMlp<KC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   FusedMlpSmem(KC, 4)));
    return [=, &launch](cudaStream_t st) {
      const int c = mult > 1 ? 0 : launch++ % kCopies;
      const FusedMlpArgs a{.x = x,
                           .w1 = w1 + wn * c,
                           .b1 = b1,
                           .w2t = w2t + wn * c,
                           .out = out,
                           .counters = counters,
                           .chunks = I / R * mult,
                           .stages = stages};
      FusedMlp<KC><<<132 * bpsm, 32 * KC + 32, smem, st>>>(a);
    };
  };
  struct Form {
    const char* name;
    std::function<void(cudaStream_t)> run;
  };
  std::vector<Form> forms = {{"cuBLASLt fc1+GELU, fc2 (2 launches)", cublas_pair},
                             {"fused, 2 stages (100 KB)", fused(2, 1)},
                             {"fused, 3 stages (150 KB)", fused(3, 1)},
                             {"fused, 4 stages (200 KB)", fused(4, 1)},
                             {"fused, 2 stages, 2 blocks an SM", fused(2, 2)}};
  // The slope forms (timed alone only): [name, form, mult].
  const std::vector<std::pair<Form, int>> slope = {
      {{"fused 3 stages x2 work", fused(3, 1, 2)}, 2},
      {{"fused 3 stages x4 work", fused(3, 1, 4)}, 4},
      {{"fused 2 st 2 bpsm x2 work", fused(2, 2, 2)}, 2},
      {{"fused 2 st 2 bpsm x4 work", fused(2, 2, 4)}, 4}};
  // Check the fused forms against the reference (copy 0).
  for (size_t f = 1; f < forms.size(); ++f) {
    MLP_CHECK(cudaMemset(out, 0, 4 * K));
    launch = 0;
    forms[f].run(fg);
    MLP_CHECK(cudaStreamSynchronize(fg));
    MLP_CHECK(cudaGetLastError());
    std::vector<float> got(K);
    MLP_CHECK(cudaMemcpy(got.data(), out, 4 * K, cudaMemcpyDeviceToHost));
    double md = 0;
    for (int j = 0; j < K; ++j) {
      const double d = std::fabs(got[j] - out_ref[j]);
      md = std::isfinite(d) ? std::max(md, d) : INFINITY;
    }
    std::printf("check %-36s max |out - ref| = %.3g (ref max %.3g)\n", forms[f].name, md,
                ref_scale);
  }

  cudaEvent_t e0, e1, b0, b1e;
  MLP_CHECK(cudaEventCreate(&e0));
  MLP_CHECK(cudaEventCreate(&e1));
  MLP_CHECK(cudaEventCreate(&b0));
  MLP_CHECK(cudaEventCreate(&b1e));
  const double mlp_bytes = 4.0 * wn;
  // Alone: 200 launches after 10.
  std::vector<double> alone_us(forms.size());
  for (int round = 0; round < 2; ++round) {
    for (size_t f = 0; f < forms.size(); ++f) {
      for (int i = 0; i < 10; ++i) forms[f].run(bg);
      MLP_CHECK(cudaEventRecord(b0, bg));
      for (int i = 0; i < 200; ++i) forms[f].run(bg);
      MLP_CHECK(cudaEventRecord(b1e, bg));
      MLP_CHECK(cudaStreamSynchronize(bg));
      MLP_CHECK(cudaGetLastError());
      alone_us[f] = ElapsedMs(b0, b1e) * 1e3 / 200;
      std::printf("round %d %-40s alone %7.2f us a launch, %6.0f GB/s\n", round, forms[f].name,
                  alone_us[f], mlp_bytes / (alone_us[f] * 1e-6) / 1e9);
    }
  }

  for (const auto& [form, mult] : slope) {
    for (int i = 0; i < 3; ++i) form.run(bg);
    MLP_CHECK(cudaEventRecord(b0, bg));
    for (int i = 0; i < 50; ++i) form.run(bg);
    MLP_CHECK(cudaEventRecord(b1e, bg));
    MLP_CHECK(cudaStreamSynchronize(bg));
    MLP_CHECK(cudaGetLastError());
    const double us = ElapsedMs(b0, b1e) * 1e3 / 50;
    std::printf("%-40s alone %7.2f us a launch, %6.0f GB/s\n", form.name, us,
                mlp_bytes * mult / (us * 1e-6) / 1e9);
  }

  // Beside the library decode attention (one sequence of ctx tokens, 32 x 80): the attention's
  // 400 launches on fg while the MLP runs back to back on bg.
  DecodeAttentionInputs in = MakeDecodeAttentionInputs(1, ctx, heads, hd, 16, fg, kProg);
  const PagedDecodeCudaPlan plan = DecodePlanOrDie(in, kProg);
  auto attn = [&] {
    if (PagedDecodeCuda(in.p, plan, fg) != KernelStatus::kOk) {
      std::fprintf(stderr, "%s: PagedDecodeCuda failed\n", kProg);
      std::exit(1);
    }
  };
  constexpr int kAttn = 400;
  auto time_attn = [&] {
    for (int i = 0; i < 20; ++i) attn();
    MLP_CHECK(cudaEventRecord(e0, fg));
    for (int i = 0; i < kAttn; ++i) attn();
    MLP_CHECK(cudaEventRecord(e1, fg));
    MLP_CHECK(cudaDeviceSynchronize());
    MLP_CHECK(cudaGetLastError());
    return ElapsedMs(e0, e1) * 1e3 / kAttn;
  };
  const double attn_alone = time_attn();
  std::printf("attention alone (ctx %d): %.2f us\n", ctx, attn_alone);
  for (size_t f = 0; f < forms.size(); ++f) {
    const int units = static_cast<int>(attn_alone * kAttn * 3 / alone_us[f]) + 20;
    MLP_CHECK(cudaEventRecord(b0, bg));
    for (int i = 0; i < units; ++i) forms[f].run(bg);
    MLP_CHECK(cudaEventRecord(b1e, bg));
    MLP_CHECK(cudaStreamWaitEvent(fg, b0));
    const double beside = time_attn();
    const double gbps = units * mlp_bytes / (ElapsedMs(b0, b1e) * 1e-3) / 1e9;
    // The MLP's rate while the attention runs back to back on fg for ~3x the MLP's 100 launches.
    const int attn_units = static_cast<int>(alone_us[f] * 100 * 3 / attn_alone) + 20;
    for (int i = 0; i < attn_units; ++i) attn();
    MLP_CHECK(cudaEventRecord(e0, fg));
    MLP_CHECK(cudaStreamWaitEvent(bg, e0));  // after the first attention launches were queued
    MLP_CHECK(cudaEventRecord(b0, bg));
    for (int i = 0; i < 100; ++i) forms[f].run(bg);
    MLP_CHECK(cudaEventRecord(b1e, bg));
    MLP_CHECK(cudaDeviceSynchronize());
    MLP_CHECK(cudaGetLastError());
    const double mlp_us = ElapsedMs(b0, b1e) * 1e3 / 100;
    std::printf(
        "%-40s attention beside %7.2f us (x%.2f); MLP %6.0f GB/s over its run, %7.2f us "
        "a launch (%6.0f GB/s) under a continuous attention\n",
        forms[f].name, beside, beside / attn_alone, gbps, mlp_us,
        mlp_bytes / (mlp_us * 1e-6) / 1e9);
  }
  in.Free();
  return 0;
}

}  // namespace
}  // namespace phishard::bench

int main(int argc, char** argv) { return phishard::bench::Main(argc, argv); }
