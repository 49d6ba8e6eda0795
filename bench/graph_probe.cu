// phishard_graph_probe [trace]: the gap between a CUDA graph's first two kernels, and the host time
// of cudaGraphLaunch, for graphs shaped like the decode graphs (docs/perf-log.md 2026-11-30 04:20):
// N spinning kernels (2 us each) chained, or forked onto a second stream every 7 and joined,
// launched plainly or as programmatic dependents, with 200 KB of shared memory on every third or
// none. Each kernel stamps %globaltimer at its start and end. `trace`: the same under the bench's
// CUPTI concurrent-kernel tracer (bench/kernel_trace.h), which is what --trace-csv timelines run
// under.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/kernel_trace.h"
#include "kernels/cuda/cuda_common.cuh"

namespace {

__device__ unsigned long long Now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void Spin(unsigned long long* stamps, int i, int spin_ns) {
  extern __shared__ char smem[];
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const unsigned long long t0 = Now();
  if (threadIdx.x == 0 && blockIdx.x == 0) stamps[2 * i] = t0;
  if (spin_ns < 0) smem[threadIdx.x] = 1;  // never: keeps the dynamic shared memory declared
  while (Now() - t0 < static_cast<unsigned long long>(spin_ns)) {
  }
  __syncthreads();
  if (threadIdx.x == 0 && blockIdx.x == 0) stamps[2 * i + 1] = Now();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  using phishard::bench::KernelTrace;
  const bool trace = argc > 1 && std::string(argv[1]) == "trace";
  if (trace && !KernelTrace::Enable("/tmp/phishard_graph_probe.csv")) return 1;
  cudaStream_t s, s2;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking);
  unsigned long long* stamps = nullptr;
  void *dbuf = nullptr, *hbuf = nullptr;
  cudaMalloc(&stamps, 16 * 512);
  cudaMalloc(&dbuf, 4096);
  cudaMallocHost(&hbuf, 4096);
  cudaEvent_t fork_ev, join_ev;
  cudaEventCreateWithFlags(&fork_ev, cudaEventDisableTiming);
  cudaEventCreateWithFlags(&join_ev, cudaEventDisableTiming);
  cudaFuncSetAttribute(Spin, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
  auto launch = [&](cudaStream_t st, int i, bool pdl, size_t smem) {
    phishard::cuda::LaunchMaybeProgrammatic(Spin, dim3(132), dim3(128), smem, st, pdl, stamps, i,
                                            2000);
  };
  for (int mode = 0; mode < 4; ++mode) {
    for (int fork = 0; fork < 2; ++fork) {
      for (int n : {2, 30, 230}) {
        const bool pdl = mode & 1, big = mode & 2;
        cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
        for (int i = 0; i < n; ++i) {
          const size_t smem = big && i % 3 == 2 ? 200 * 1024 : 0;
          if (fork && i % 7 == 2) {  // a kernel on the side stream, joined 3 kernels later
            cudaEventRecord(fork_ev, s);
            cudaStreamWaitEvent(s2, fork_ev);
            launch(s2, i, pdl && i > 0, smem);
            cudaEventRecord(join_ev, s2);
            continue;
          }
          launch(s, i, pdl && i > 0, smem);
          if (fork && i % 7 == 5) cudaStreamWaitEvent(s, join_ev);
        }
        cudaGraph_t g = nullptr;
        cudaGraphExec_t e = nullptr;
        if (cudaStreamEndCapture(s, &g) != cudaSuccess ||
            cudaGraphInstantiate(&e, g, 0) != cudaSuccess) {
          std::printf("capture failed: %s\n", cudaGetErrorString(cudaGetLastError()));
          return 1;
        }
        cudaGraphUpload(e, s);
        cudaStreamSynchronize(s);
        std::vector<double> gap, span, host;
        for (int r = 0; r < 30; ++r) {
          cudaMemcpyAsync(dbuf, hbuf, 4096, cudaMemcpyHostToDevice, s);  // as a decode step
          double launch_us = 0.0;
          KernelTrace::Window("probe", [&] {
            const auto h0 = std::chrono::steady_clock::now();
            cudaGraphLaunch(e, s);
            launch_us =
                std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0)
                    .count();
            cudaStreamSynchronize(s);
          });
          std::vector<unsigned long long> v(2 * n);
          cudaMemcpy(v.data(), stamps, 16 * n, cudaMemcpyDeviceToHost);
          if (r < 5) continue;  // warm-up replays
          gap.push_back((v[2] - v[1]) / 1e3);
          span.push_back((v[2 * n - 1] - v[0]) / 1e3);
          host.push_back(launch_us);
        }
        std::printf(
            "%s pdl %d bigsmem %d fork %d kernels %3d: first gap %6.2f us, span %8.2f us, "
            "cudaGraphLaunch %7.2f us\n",
            trace ? "traced" : "plain", pdl, big, fork, n, Median(gap), Median(span), Median(host));
        cudaGraphExecDestroy(e);
        cudaGraphDestroy(g);
      }
    }
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
