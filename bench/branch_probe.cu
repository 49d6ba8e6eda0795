// phishard_branch_probe: the b1 decode layer's MLP branch as ONE fused streaming launch
// (bench/fused_mlp.cuh) instead of cuBLASLt's fc1 + fc2, inside a layer schedule like the model's
// (measurement only; docs/performance.md, decode b1; docs/decode-stream-design.md).
//
// Why: the whole-layer stream (bench/layer_probe.cu) gains only with non-deterministic sums. A
// smaller change keeps the model's schedule — main stream: q/k/v GEMM → attention → dense; MLP
// branch forked at the layer's start, joined at its end — and replaces only the branch's two
// GEMMs (36.5 us alone) by the fused kernel (31.7 us alone, holding shared memory, not whole SMs,
// so the main stream's kernels can share its SMs).
//
// Per layer (32 layers of distinct weights; Phi-2: K 2560, I 10240, 32 heads x 80, bf16; one
// sequence of ctx tokens; the LayerNorms and the residual adds are left out, the same in every
// schedule):
//   A  branch: cuBLASLt fc1 + GELU, then fc2 accumulating into y (the model's branch today);
//   B  branch: the fused kernel (S ring stages) into a float32 vector;
//   C  as B, the branch waiting for the q/k/v GEMM first (no contention with it);
//   D  no branch: q/k/v, fused MLP, attention, dense one after the other.
// Main stream: cuBLASLt q/k/v, the library decode attention (kAuto), cuBLASLt dense accumulating
// into y. The attention's blocks can share an SM with the fused kernel's only if both kernels
// have the same shared-memory carveout (bench/layer_probe.cu); the library kernel sets none, so
// this probe was run with a local build setting it (perf-log says which). Schedule A's fc2 and
// dense both add into y on two streams at once (its values are not meaningful; the timing is).
// Measured (perf-log 2026-11-30 18:59, ctx 1024, us a layer): A 58.9-59.0, B 60.2-62.0, C 56.7-56.9
// with the attention's carveout at 100 (57.5-60.7 without), D 66.0-66.4: ~4 % at best.
// Usage: phishard_branch_probe [ctx (default 1024)]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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

constexpr const char* kProg = "phishard_branch_probe";

#define BP_CHECK(call) PHI_BENCH_CHECK(kProg, call)

#include "bench/fused_mlp.cuh"

float ElapsedMs(cudaEvent_t a, cudaEvent_t b) { return ElapsedMsOrDie(a, b, kProg); }

int Main(int argc, char** argv) {
  const int ctx = argc > 1 ? std::atoi(argv[1]) : 1024;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  constexpr int KC = 10, K = 2560, I = 10240, NQ = 3 * K, R = KC, heads = 32, hd = 80, L = 32;
  using bf16 = __nv_bfloat16;
  cudaStream_t mainst, branch;
  BP_CHECK(cudaStreamCreateWithFlags(&mainst, cudaStreamNonBlocking));
  BP_CHECK(cudaStreamCreateWithFlags(&branch, cudaStreamNonBlocking));
  // Per layer: wqkv [NQ, K], w1 [I, K], w2 [K, I], w2t [I, K], wd [K, K]; biases bqkv, b1, bd.
  const size_t per_layer = size_t{NQ} * K + 3 * size_t{I} * K + size_t{K} * K;
  bf16* w = static_cast<bf16*>(DeviceAllocOrDie(2 * per_layer * L, kProg));
  RandomFillOrDie(w, per_layer * L, 51, DataType::kBF16, mainst, kProg, 0.02f);
  const size_t small = size_t{NQ} + I + K;
  bf16* bias = static_cast<bf16*>(DeviceAllocOrDie(2 * small * L, kProg));
  RandomFillOrDie(bias, small * L, 52, DataType::kBF16, mainst, kProg, 0.05f);
  bf16* x = static_cast<bf16*>(DeviceAllocOrDie(2 * K, kProg));
  RandomFillOrDie(x, K, 53, DataType::kBF16, mainst, kProg);
  bf16* qkv = static_cast<bf16*>(DeviceAllocOrDie(2 * NQ, kProg));
  bf16* mid = static_cast<bf16*>(DeviceAllocOrDie(2 * I, kProg));
  bf16* y = static_cast<bf16*>(DeviceAllocOrDie(2 * K, kProg));
  float* out = static_cast<float*>(DeviceAllocOrDie(4 * K, kProg));
  int* counters = static_cast<int*>(DeviceAllocOrDie(4 * 2 * L, kProg));
  BP_CHECK(cudaMemset(counters, 0, 4 * 2 * L));
  BP_CHECK(cudaMemset(y, 0, 2 * K));
  BP_CHECK(cudaMemset(out, 0, 4 * K));
  DecodeAttentionInputs in = MakeDecodeAttentionInputs(1, ctx, heads, hd, 16, mainst, kProg);
  const PagedDecodeCudaPlan plan = DecodePlanOrDie(in, kProg);
  std::unique_ptr<CudaGemm> gemm_main, gemm_branch;
  if (CudaGemm::Create(size_t{32} << 20, &gemm_main) != KernelStatus::kOk ||
      CudaGemm::Create(size_t{32} << 20, &gemm_branch) != KernelStatus::kOk) {
    std::fprintf(stderr, "%s: CudaGemm::Create failed\n", kProg);
    return 1;
  }
  BP_CHECK(cudaFuncSetAttribute(FusedMlp<KC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                FusedMlpSmem(KC, 4)));
  BP_CHECK(cudaFuncSetAttribute(FusedMlp<KC>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  BP_CHECK(cudaDeviceSynchronize());

  auto gemm = [&](CudaGemm* g, const GemmParams& p, cudaStream_t st) {
    if (g->Run(p, st) != KernelStatus::kOk) {
      std::fprintf(stderr, "%s: cuBLASLt failed\n", kProg);
      std::exit(1);
    }
  };
  std::vector<cudaEvent_t> fork(L), qkv_done(L), join(L);
  for (int l = 0; l < L; ++l) {
    BP_CHECK(cudaEventCreateWithFlags(&fork[l], cudaEventDisableTiming));
    BP_CHECK(cudaEventCreateWithFlags(&qkv_done[l], cudaEventDisableTiming));
    BP_CHECK(cudaEventCreateWithFlags(&join[l], cudaEventDisableTiming));
  }
  // One step of 32 layers in schedule `sched` ('A'..'D'), the fused kernel with `stages`.
  auto step = [&](char sched, int stages) {
    for (int l = 0; l < L; ++l) {
      bf16* wl = w + per_layer * l;
      const bf16* wqkv = wl;
      const bf16* w1 = wl + size_t{NQ} * K;
      const bf16* w2 = w1 + size_t{I} * K;
      const bf16* w2t = w2 + size_t{I} * K;
      const bf16* wd = w2t + size_t{I} * K;
      const bf16* bl = bias + small * l;
      const GemmParams pq{.x = x,
                          .w = wqkv,
                          .bias = bl,
                          .y = qkv,
                          .m = 1,
                          .n = NQ,
                          .k = K,
                          .dtype = DataType::kBF16};
      GemmParams pd{.x = in.p.out,
                    .w = wd,
                    .bias = bl + NQ + I,
                    .y = y,
                    .m = 1,
                    .n = K,
                    .k = K,
                    .dtype = DataType::kBF16};
      pd.accumulate = true;
      const FusedMlpArgs fa{.x = x,
                            .w1 = w1,
                            .b1 = bl + NQ,
                            .w2t = w2t,
                            .out = out,
                            .counters = counters + 2 * l,
                            .chunks = I / R,
                            .stages = stages};
      auto fused = [&](cudaStream_t st) {
        FusedMlp<KC><<<132, 32 * KC + 32, FusedMlpSmem(KC, stages), st>>>(fa);
      };
      auto branch_work = [&](cudaStream_t st) {
        if (sched == 'A') {
          const GemmParams p1{.x = x,
                              .w = w1,
                              .bias = bl + NQ,
                              .y = mid,
                              .m = 1,
                              .n = I,
                              .k = K,
                              .epilogue = GemmEpilogue::kGeluTanh,
                              .dtype = DataType::kBF16};
          GemmParams p2{.x = mid,
                        .w = w2,
                        .bias = nullptr,
                        .y = y,
                        .m = 1,
                        .n = K,
                        .k = I,
                        .dtype = DataType::kBF16};
          p2.accumulate = true;
          gemm(gemm_branch.get(), p1, st);
          gemm(gemm_branch.get(), p2, st);
        } else {
          fused(st);
        }
      };
      if (sched == 'D') {
        gemm(gemm_main.get(), pq, mainst);
        fused(mainst);
      } else {
        BP_CHECK(cudaEventRecord(fork[l], mainst));
        BP_CHECK(cudaStreamWaitEvent(branch, fork[l]));
        if (sched == 'C') {
          gemm(gemm_main.get(), pq, mainst);
          BP_CHECK(cudaEventRecord(qkv_done[l], mainst));
          BP_CHECK(cudaStreamWaitEvent(branch, qkv_done[l]));
          branch_work(branch);
        } else {
          branch_work(branch);
          gemm(gemm_main.get(), pq, mainst);
        }
      }
      if (PagedDecodeCuda(in.p, plan, mainst) != KernelStatus::kOk) {
        std::fprintf(stderr, "%s: PagedDecodeCuda failed\n", kProg);
        std::exit(1);
      }
      gemm(gemm_main.get(), pd, mainst);
      if (sched != 'D') {
        BP_CHECK(cudaEventRecord(join[l], branch));
        BP_CHECK(cudaStreamWaitEvent(mainst, join[l]));
      }
    }
  };
  cudaEvent_t e0, e1;
  BP_CHECK(cudaEventCreate(&e0));
  BP_CHECK(cudaEventCreate(&e1));
  struct Form {
    char sched;
    int stages;
  };
  const std::vector<Form> forms = {{'A', 0}, {'B', 2}, {'B', 3}, {'C', 2}, {'C', 3}, {'D', 3}};
  const double layer_bytes = 2.0 * (per_layer - size_t{I} * K) + 2.0 * in.kv_bytes;
  std::printf("ctx %d: %.1f MB of weights + %.1f MB of K/V a layer\n", ctx,
              2e-6 * (per_layer - size_t{I} * K), 2e-6 * in.kv_bytes);
  for (int round = 0; round < 3; ++round) {
    for (const Form& f : forms) {
      for (int i = 0; i < 3; ++i) step(f.sched, f.stages);
      BP_CHECK(cudaEventRecord(e0, mainst));
      constexpr int kSteps = 20;
      for (int i = 0; i < kSteps; ++i) step(f.sched, f.stages);
      BP_CHECK(cudaEventRecord(e1, mainst));
      BP_CHECK(cudaStreamSynchronize(mainst));
      BP_CHECK(cudaGetLastError());
      const double us = ElapsedMs(e0, e1) * 1e3 / kSteps;
      std::printf(
          "round %d schedule %c stages %d: %8.1f us / 32 layers = %6.2f us a layer, %6.0f "
          "GB/s\n",
          round, f.sched, f.stages, us, us / L, layer_bytes * L / (us * 1e-6) / 1e9);
    }
  }
  in.Free();
  return 0;
}

}  // namespace
}  // namespace phishard::bench

int main(int argc, char** argv) { return phishard::bench::Main(argc, argv); }
