// phishard_stream_probe: how fast one persistent block an SM can stream DRAM, in the forms the
// persistent decode kernel (kernels/cuda/decode_mega.cu) could use, with nothing else in the
// way. mega2's runs (docs/perf-log.md) found that kernel reading ~16 KB/us a block (~2.1 TB/s)
// whatever its consumer (per-stage CTA barrier or none), producer (one bulk copy a stage, 8, or
// cp.async from 32 lanes) or ring depth (3-10 stages of 20-40 KB); this tells whether the ring
// itself or the rest of the kernel sets that rate.
//
// One cooperative launch of B blocks (288 threads: 8 consumer warps + 1 producer warp, as the
// kernel) reads a [bytes] device buffer once, block b a contiguous 1/B slice, in one of:
//   bulk      the producer lane fills an S-stage ring of cp.async.bulk copies (mbarrier full /
//             empty, as the kernel); each consumer warp waits for a stage and releases it
//   bulk-read as bulk, and every consumer thread also sums its share of the stage's words from
//             shared memory (the kernel's shared-memory traffic, no FMAs)
//   bulk-bar  as bulk-read, plus a grid barrier every 1/96 of the slice (the kernel's 3 a layer
//             over 32 layers)
//   ldg       no ring: the 256 consumer threads load the slice with 16-byte ld.global.cg, U loads
//             in flight a thread (U = 8: 32 KB a block, U = 16: 64 KB); also with 4-8 blocks an
//             SM (a copy kernel's occupancy: what reads can reach on this GPU at all)
// and first the device-to-device copy that phishard_bench's floor divides by (read + write).
// Usage: phishard_stream_probe [GiB (default 4)] [reps (default 3)]. One line a case:
//   mode blocks stages stage_kb  ms  GB/s
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

#define PROBE_CHECK(call)                                                           \
  do {                                                                              \
    const cudaError_t e = (call);                                                   \
    if (e != cudaSuccess) {                                                         \
      std::fprintf(stderr, "stream_probe: %s: %s\n", #call, cudaGetErrorString(e)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

constexpr int kConsumers = 256;
constexpr int kThreads = kConsumers + 32;
constexpr int kMaxStages = 16;

enum Mode : int { kBulk = 0, kBulkRead = 1, kBulkBar = 2, kLdg8 = 3, kLdg16 = 4 };

struct Params {
  const char* src;
  size_t slice;  // bytes a block (a multiple of stage_bytes)
  int stages, stage_bytes, mode, barriers;
  uint32_t* sync;  // [64] zeroed: arrivals at [0], generation at [32]
  unsigned* sink;  // [blocks] keeps the reads live
};

__device__ __forceinline__ uint32_t Smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void Wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\nPROBE_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra PROBE_DONE;\nbra PROBE_WAIT;\nPROBE_DONE:\n}\n" ::"r"(Smem(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void ConsumerSync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
}

// As the decode kernel's GridSync: every consumer of every block arrives, the last releases.
__device__ void GridSync(uint32_t* sync) {
  ConsumerSync();
  if (threadIdx.x == 0) {
    __threadfence();
    uint32_t gen;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(gen) : "l"(sync + 32) : "memory");
    if (atomicAdd(sync, 1u) == gridDim.x - 1) {
      atomicExch(sync, 0u);
      __threadfence();
      asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(sync + 32), "r"(gen + 1) : "memory");
    } else {
      uint32_t now;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(now) : "l"(sync + 32) : "memory");
      } while (now == gen);
    }
    __threadfence();
  }
  ConsumerSync();
}

template <int kUnroll>
__device__ unsigned LdgSlice(const char* base, size_t slice) {
  const uint4* s = reinterpret_cast<const uint4*>(base);
  const size_t n = slice / 16;
  unsigned acc = 0;
  for (size_t i0 = threadIdx.x; i0 < n; i0 += static_cast<size_t>(kConsumers) * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const size_t i = i0 + static_cast<size_t>(u) * kConsumers;
      v[u] = i < n ? __ldcg(s + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc ^= v[u].x ^ v[u].w;
  }
  return acc;
}

__global__ void __launch_bounds__(kThreads, 1) ProbeKernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const char* base = p.src + p.slice * blockIdx.x;
  const int t = threadIdx.x;
  if (p.mode == kLdg8 || p.mode == kLdg16) {
    if (t >= kConsumers) return;
    const unsigned acc = p.mode == kLdg8 ? LdgSlice<8>(base, p.slice) : LdgSlice<16>(base, p.slice);
    if (acc == 0x9e3779b9u) p.sink[blockIdx.x] = acc;  // (never, but the loads stay)
    return;
  }
  uint64_t* full =
      reinterpret_cast<uint64_t*>(smem + static_cast<size_t>(p.stages) * p.stage_bytes);
  uint64_t* empty = full + kMaxStages;
  if (t == 0) {
    for (int s = 0; s < p.stages; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(Smem(&full[s])), "r"(1));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(Smem(&empty[s])), "r"(8));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const uint32_t n = static_cast<uint32_t>(p.slice / p.stage_bytes);
  if (t >= kConsumers) {
    if (t != kConsumers) return;
    for (uint32_t it = 0; it < n; ++it) {
      const int s = static_cast<int>(it % p.stages);
      if (it >= static_cast<uint32_t>(p.stages)) Wait(&empty[s], ((it / p.stages) - 1) & 1);
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(Smem(&full[s])),
                   "r"(p.stage_bytes)
                   : "memory");
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
          "[%3];" ::"r"(Smem(smem + static_cast<size_t>(s) * p.stage_bytes)),
          "l"(base + static_cast<size_t>(it) * p.stage_bytes), "r"(p.stage_bytes),
          "r"(Smem(&full[s]))
          : "memory");
    }
    return;
  }
  const uint32_t seg = p.barriers > 0 ? (n + p.barriers - 1) / p.barriers : 0;
  unsigned acc = 0;
  for (uint32_t it = 0; it < n; ++it) {
    const int s = static_cast<int>(it % p.stages);
    Wait(&full[s], (it / p.stages) & 1);
    if (p.mode != kBulk) {
      const uint32_t* w =
          reinterpret_cast<const uint32_t*>(smem + static_cast<size_t>(s) * p.stage_bytes);
      for (int i = t; i < p.stage_bytes / 4; i += kConsumers) acc ^= w[i];
    }
    __syncwarp();
    if ((t & 31) == 0) {
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(Smem(&empty[s])) : "memory");
    }
    if (p.mode == kBulkBar && seg > 0 && (it + 1) % seg == 0) GridSync(p.sync);
  }
  if (acc == 0x9e3779b9u) p.sink[blockIdx.x] = acc;
}

const char* ModeName(int m) {
  static const char* names[] = {"bulk", "bulk-read", "bulk-bar", "ldg8", "ldg16"};
  return names[m];
}

}  // namespace

int main(int argc, char** argv) {
  const double gib = argc > 1 ? std::atof(argv[1]) : 4.0;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 3;
  const size_t bytes = static_cast<size_t>(gib * (1ull << 30));
  int sms = 0, optin = 0, dev = 0;
  PROBE_CHECK(cudaGetDevice(&dev));
  PROBE_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  PROBE_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  char* src = nullptr;
  uint32_t* sync = nullptr;
  unsigned* sink = nullptr;
  PROBE_CHECK(cudaMalloc(&src, bytes));
  PROBE_CHECK(cudaMemset(src, 0x3c, bytes));
  PROBE_CHECK(cudaMalloc(&sync, 64 * sizeof(uint32_t)));
  PROBE_CHECK(cudaMemset(sync, 0, 64 * sizeof(uint32_t)));
  PROBE_CHECK(cudaMalloc(&sink, 1024 * sizeof(unsigned)));
  PROBE_CHECK(
      cudaFuncSetAttribute(ProbeKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin - 1024));
  cudaEvent_t e0, e1;
  PROBE_CHECK(cudaEventCreate(&e0));
  PROBE_CHECK(cudaEventCreate(&e1));
  struct Case {
    int mode, blocks, stages, stage_kb;
  };
  const int half = sms / 2;
  const std::vector<Case> cases = {
      {kLdg8, sms, 0, 0},      {kLdg16, sms, 0, 0},     {kBulk, sms, 5, 40},
      {kBulk, sms, 10, 20},    {kBulk, sms, 2, 40},     {kBulk, sms, 16, 12},
      {kBulk, sms, 3, 64},     {kBulkRead, sms, 5, 40}, {kBulkBar, sms, 5, 40},
      {kBulk, half, 5, 40},    {kLdg16, half, 0, 0},    {kBulk, sms, 12, 16},
      {kLdg16, 4 * sms, 0, 0}, {kLdg8, 8 * sms, 0, 0},  // many blocks: a copy kernel's occupancy
  };
  std::printf("device %d: %d SMs; %.2f GiB read once a launch, mean of %d launches\n", dev, sms,
              gib, reps);
  {  // The bench's copy ceiling: device-to-device copy of half the buffer, read + written bytes.
    const size_t h = bytes / 2;
    PROBE_CHECK(cudaMemcpy(src + h, src, h, cudaMemcpyDeviceToDevice));
    PROBE_CHECK(cudaEventRecord(e0));
    for (int r = 0; r < reps; ++r) {
      PROBE_CHECK(cudaMemcpyAsync(src + h, src, h, cudaMemcpyDeviceToDevice));
    }
    PROBE_CHECK(cudaEventRecord(e1));
    PROBE_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    PROBE_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    ms /= reps;
    std::printf("%-10s %4s %3s %4s  %8.3f ms  %7.1f GB/s  (read + write)\n", "memcpy", "-", "-",
                "-", ms, 2.0 * h / (ms * 1e-3) / 1e9);
  }
  for (const Case& c : cases) {
    const int stage_bytes = c.stage_kb * 1024;
    const size_t unit = stage_bytes > 0 ? static_cast<size_t>(stage_bytes) : 4096;
    const size_t slice = bytes / c.blocks / unit * unit;
    const size_t smem =
        static_cast<size_t>(c.stages) * stage_bytes + 2 * kMaxStages * sizeof(uint64_t);
    if (smem + 1024 > static_cast<size_t>(optin) || c.stages > kMaxStages) {
      std::printf("%-10s %4d %3d %4d  (does not fit)\n", ModeName(c.mode), c.blocks, c.stages,
                  c.stage_kb);
      continue;
    }
    Params p{src, slice, c.stages, stage_bytes, c.mode, c.mode == kBulkBar ? 96 : 0, sync, sink};
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(c.blocks);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    config.attrs = attr;
    config.numAttrs = c.mode == kBulkBar ? 1 : 0;  // only the grid barrier needs co-residence
    PROBE_CHECK(cudaLaunchKernelEx(&config, ProbeKernel, p));  // warm-up
    PROBE_CHECK(cudaEventRecord(e0));
    for (int r = 0; r < reps; ++r) PROBE_CHECK(cudaLaunchKernelEx(&config, ProbeKernel, p));
    PROBE_CHECK(cudaEventRecord(e1));
    PROBE_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    PROBE_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    ms /= reps;
    const double read = static_cast<double>(slice) * c.blocks;
    std::printf("%-10s %4d %3d %4d  %8.3f ms  %7.1f GB/s  (%.1f KB/us a block)\n", ModeName(c.mode),
                c.blocks, c.stages, c.stage_kb, ms, read / (ms * 1e-3) / 1e9,
                read / c.blocks / (ms * 1e3) / 1e3);
    std::fflush(stdout);
  }
  return 0;
}
