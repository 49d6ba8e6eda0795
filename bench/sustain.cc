#include "bench/sustain.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "bench/bench_device.h"
#include "bench/sustain_kernels.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/random_fill_cuda.h"
#include "kernels/device.h"

namespace phishard::bench {
namespace {

#define SU_CHECK(cond, what) DieUnless((cond), "sustain", (what))

using Clock = std::chrono::steady_clock;

// The few NVML calls used, resolved from the driver's library at run time (the toolkit here has
// no nvml.h; the device machine's driver has the library). Signatures as in NVML's nvml.h.
class PowerProbe {
 public:
  PowerProbe() {
    lib_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib_ == nullptr) return;
    auto init = reinterpret_cast<int (*)()>(dlsym(lib_, "nvmlInit_v2"));
    auto handle =
        reinterpret_cast<int (*)(unsigned, void**)>(dlsym(lib_, "nvmlDeviceGetHandleByIndex_v2"));
    energy_ = reinterpret_cast<int (*)(void*, unsigned long long*)>(
        dlsym(lib_, "nvmlDeviceGetTotalEnergyConsumption"));
    power_ = reinterpret_cast<int (*)(void*, unsigned*)>(dlsym(lib_, "nvmlDeviceGetPowerUsage"));
    clock_ =
        reinterpret_cast<int (*)(void*, int, unsigned*)>(dlsym(lib_, "nvmlDeviceGetClockInfo"));
    if (!init || !handle || !energy_ || !power_ || !clock_ || init() != 0) return;
    int cuda_dev = 0;
    DeviceGetCurrent(&cuda_dev);  // one GPU machines: NVML index = CUDA index
    ok_ = handle(static_cast<unsigned>(cuda_dev), &dev_) == 0;
  }
  bool ok() const { return ok_; }
  // Joules since the driver loaded (NVML's energy counter, mJ), or 0.
  double EnergyJ() const {
    unsigned long long mj = 0;
    return ok_ && energy_(dev_, &mj) == 0 ? 1e-3 * static_cast<double>(mj) : 0.0;
  }
  double Watts() const {
    unsigned mw = 0;
    return ok_ && power_(dev_, &mw) == 0 ? 1e-3 * mw : 0.0;
  }
  int SmMhz() const {
    unsigned mhz = 0;
    return ok_ && clock_(dev_, /*NVML_CLOCK_SM=*/1, &mhz) == 0 ? static_cast<int>(mhz) : 0;
  }

 private:
  void* lib_ = nullptr;
  void* dev_ = nullptr;
  bool ok_ = false;
  int (*energy_)(void*, unsigned long long*) = nullptr;
  int (*power_)(void*, unsigned*) = nullptr;
  int (*clock_)(void*, int, unsigned*) = nullptr;
};

PowerProbe& Probe() {
  static PowerProbe p;
  return p;
}

void* Alloc(size_t bytes) { return DeviceAllocOrDie(bytes, "sustain"); }

void Fill(void* p, size_t count, uint64_t seed, DataType t, cudaStream_t s, float spread = 1.0f) {
  RandomFillOrDie(p, count, seed, t, s, "sustain", spread);
}

struct Window {
  double t_s, us, gbps, watts, mhz, j_per_gb;
  int launches;
  double ms, joules;
};

}  // namespace

SustainResult SustainKernel(const std::string& name, double bytes, const SustainOptions& o,
                            double ref_gbps, cudaStream_t s, const std::function<void()>& launch) {
  PowerProbe& probe = Probe();
  cudaEvent_t a, b;
  SU_CHECK(cudaEventCreate(&a) == cudaSuccess && cudaEventCreate(&b) == cudaSuccess, "events");
  // Estimate one launch (cold clock is fine: it only sizes the windows), then let the GPU idle.
  launch();
  cudaEventRecord(a, s);
  for (int i = 0; i < 3; ++i) launch();
  cudaEventRecord(b, s);
  SU_CHECK(cudaEventSynchronize(b) == cudaSuccess, "estimate");
  float est_ms = 0;
  cudaEventElapsedTime(&est_ms, a, b);
  const double est_us = std::max(1.0, 1e3 * est_ms / 3);
  std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(o.idle_ms));

  std::vector<Window> win;
  const auto t0 = Clock::now();
  double e_prev = probe.EnergyJ();
  auto w_prev = Clock::now();
  const int per_window = std::max(1, static_cast<int>(o.window_ms * 1e3 / est_us));
  while (std::chrono::duration<double, std::milli>(Clock::now() - t0).count() < o.ms) {
    cudaEventRecord(a, s);
    for (int i = 0; i < per_window; ++i) launch();
    cudaEventRecord(b, s);
    SU_CHECK(cudaEventSynchronize(b) == cudaSuccess, "window");
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    const auto now = Clock::now();
    const double e = probe.EnergyJ();
    const double wall_s = std::chrono::duration<double>(now - w_prev).count();
    Window w;
    w.t_s = std::chrono::duration<double>(now - t0).count();
    w.us = 1e3 * ms / per_window;
    w.gbps = bytes / (w.us * 1e-6) / 1e9;
    w.watts = probe.ok() && wall_s > 0 ? (e - e_prev) / wall_s : 0;
    w.mhz = probe.SmMhz();
    // Joules per GB moved: the window's energy over the window's bytes.
    w.j_per_gb = probe.ok() ? (e - e_prev) / (bytes * per_window / 1e9) : 0;
    w.launches = per_window;
    w.ms = ms;
    w.joules = probe.ok() ? e - e_prev : 0;
    e_prev = e;
    w_prev = now;
    win.push_back(w);
    if (o.print_windows) {
      std::printf(
          "sustain %-20s t %5.2f s: %9.1f us %7.0f GB/s %5.3f of copy  %4.0f W  %4.0f MHz  "
          "%.4f J/GB\n",
          name.c_str(), w.t_s, w.us, w.gbps, ref_gbps > 0 ? w.gbps / ref_gbps : 0.0, w.watts, w.mhz,
          w.j_per_gb);
    }
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  SU_CHECK(DeviceGetLastError() == 0, name.c_str());
  SustainResult r;
  if (win.empty()) return r;
  r.first_us = win.front().us;
  // The sustained state: every window after the first 0.3 s, pooled (the power controller lets a
  // kernel run above 700 W for ~0.8 s, then clamps the clock for ~0.2 s: medians would hide the
  // clamps). Mean time a launch, energy over bytes, mean power and mean sampled clock.
  double ms = 0, joules = 0, wall = 0, mhz = 0;
  int64_t launches = 0, n = 0;
  for (size_t i = 0; i < win.size(); ++i) {
    if (win[i].t_s < 0.3 && i + 1 < win.size()) continue;
    ms += win[i].ms;
    joules += win[i].joules;
    launches += win[i].launches;
    wall += win[i].t_s - (i > 0 ? win[i - 1].t_s : 0.0);
    mhz += win[i].mhz;
    ++n;
  }
  r.late_us = 1e3 * ms / static_cast<double>(launches);
  r.late_gbps = bytes / (r.late_us * 1e-6) / 1e9;
  r.late_watts = wall > 0 ? joules / wall : 0;
  r.late_mhz = mhz / static_cast<double>(n);
  r.late_j_per_gb = joules / (bytes * static_cast<double>(launches) / 1e9);
  std::printf(
      "sustain-summary %-20s first %9.1f us, sustained %9.1f us (x%.3f), %7.0f GB/s = %5.3f of "
      "burst copy, %4.0f W, %4.0f MHz, %.4f J/GB\n",
      name.c_str(), r.first_us, r.late_us, r.late_us / r.first_us, r.late_gbps,
      ref_gbps > 0 ? r.late_gbps / ref_gbps : 0.0, r.late_watts, r.late_mhz, r.late_j_per_gb);
  std::fflush(stdout);
  return r;
}

void SustainCases(cudaStream_t s, const SustainOptions& o) {
  std::printf("sustain: NVML %s; %.0f ms a kernel, %.0f ms windows, %.0f ms idle before each\n",
              Probe().ok() ? "found (energy, power, SM clock)" : "NOT found (times only)", o.ms,
              o.window_ms, o.idle_ms);
  // Burst copy bandwidth (the bench's floor definition): 5 copies of 2 GiB after one warm-up.
  const size_t copy_bytes = size_t{2} << 30;
  void* ca = Alloc(copy_bytes);
  void* cb = Alloc(copy_bytes);
  Fill(ca, copy_bytes / 2, 1, DataType::kBF16, s);
  double burst_gbps = 0;
  {
    cudaEvent_t a, b;
    SU_CHECK(cudaEventCreate(&a) == cudaSuccess && cudaEventCreate(&b) == cudaSuccess, "events");
    DeviceCopyOnDevice(cb, ca, copy_bytes, s);
    cudaEventRecord(a, s);
    for (int i = 0; i < 5; ++i) DeviceCopyOnDevice(cb, ca, copy_bytes, s);
    cudaEventRecord(b, s);
    SU_CHECK(cudaEventSynchronize(b) == cudaSuccess, "copy");
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    burst_gbps = 2.0 * copy_bytes * 5 / (ms * 1e-3) / 1e9;
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  std::printf("sustain: burst copy %.0f GB/s (2 GiB device-to-device, 5 copies)\n", burst_gbps);
  auto wanted = [&](const std::string& name) {
    size_t begin = 0;
    while (true) {
      const size_t end = o.only.find(',', begin);
      const std::string part = o.only.substr(begin, end == std::string::npos ? end : end - begin);
      if (name.find(part) != std::string::npos) return true;
      if (end == std::string::npos) return false;
      begin = end + 1;
    }
  };
  if (wanted("copy 2GiB")) {
    SustainKernel("copy 2GiB", 2.0 * copy_bytes, o, burst_gbps, s,
                  [&] { DeviceCopyOnDevice(cb, ca, copy_bytes, s); });
  }
  // The same bytes through the SMs (bench/sustain_kernels.h): a copy, a read, and a read with
  // the decode attention's conversion + FMA an element, i.e. what an SM kernel can reach in J/GB.
  {
    int dev = 0, sms = 132;
    SU_CHECK(cudaGetDevice(&dev) == cudaSuccess &&
                 cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess,
             "multiprocessors");
    uint32_t* sink = static_cast<uint32_t*>(Alloc(256 * sizeof(uint32_t)));
    if (wanted("sm copy 2GiB")) {
      SustainKernel("sm copy 2GiB", 2.0 * copy_bytes, o, burst_gbps, s,
                    [&] { SmCopy(ca, cb, copy_bytes, sms, s); });
    }
    if (wanted("sm read 2GiB")) {
      SustainKernel("sm read 2GiB", static_cast<double>(copy_bytes), o, burst_gbps, s,
                    [&] { SmRead(ca, copy_bytes, sink, sms, s); });
    }
    if (wanted("sm read+fma 2GiB")) {
      SustainKernel("sm read+fma 2GiB", static_cast<double>(copy_bytes), o, burst_gbps, s,
                    [&] { SmReadFma(ca, copy_bytes, sink, sms, s); });
    }
    DeviceFree(sink);
  }
  DeviceFree(ca);
  DeviceFree(cb);

  // Decode attention, Phi-2 heads (o.heads x 80, MHA; 32 = Phi-2), bf16, one layer's K/V in the
  // cache layout [block, head, 16 keys, 80] (kernels/kv_layout.h: each (block, head) one 2,560 B
  // run; before 2026-11-29's change a slot's row held every head, so a block read 160 of every
  // 5,120 bytes, and --heads 1 measured the contiguous case), blocks of 16 slots; each sequence's
  // blocks consecutive in the pool.
  {
    const int nh = o.heads, hd = 80, bs = 16;
    DecodeAttentionInputs in = MakeDecodeAttentionInputs(o.seqs, o.ctx, nh, hd, bs, s, "sustain");
    const PagedAttentionParams& p = in.p;
    const size_t kv = in.kv_bytes;
    const std::vector<int32_t>& host = in.host;
    // The pipelined kernel first and again later (the second pass runs at the clock the others
    // left), the register-staged and tensor-core kernels between.
    const std::pair<PagedDecodeVariant, const char*> variants[] = {
        {PagedDecodeVariant::kPipelined, "attn pipe"},
        {PagedDecodeVariant::kRegisterStages, "attn regs"},
        {PagedDecodeVariant::kTensorCore, "attn mma"},
        {PagedDecodeVariant::kPipelined, "attn pipe"}};
    for (auto [variant, vname] : variants) {
      const PagedDecodeCudaPlan plan{.workspace = in.workspace,
                                     .workspace_bytes = in.workspace_bytes,
                                     .num_multiprocessors = 132,
                                     .variant = variant};
      char name[64];
      std::snprintf(name, sizeof(name), "%s m%d c%d h%d", vname, o.seqs, o.ctx, nh);
      if (!wanted(name)) continue;
      SustainKernel(name, 2.0 * kv, o, burst_gbps, s, [&] {
        SU_CHECK(PagedDecodeCuda(p, plan, s) == KernelStatus::kOk, "PagedDecodeCuda");
      });
    }
    // The attention taken apart (bench/sustain_kernels.h SmAttnMix): the same K / V bytes read
    // as the pipelined kernel reads them, one ingredient added a case, under a block table of the
    // pool's blocks in random order (as a served pool hands them out; "seq": consecutive, as
    // above), then the pipelined kernel itself under the random table.
    std::vector<int32_t> shuffled(host.begin() + o.seqs, host.end());
    std::mt19937 rng(2029);
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    int32_t* rand_table = static_cast<int32_t*>(Alloc(shuffled.size() * 4));
    DeviceCopyToDevice(rand_table, shuffled.data(), shuffled.size() * 4, s);
    uint32_t* sink = static_cast<uint32_t*>(Alloc(128 * sizeof(uint32_t)));
    SU_CHECK(DeviceStreamSync(s) == 0, "upload");
    struct Mix {
      const char* name;
      int level;
      bool smem, random;
    };
    const Mix mixes[] = {
        {"mix1 pattern seq", 1, false, false}, {"mix1 pattern", 1, false, true},
        {"mix2 +dot", 2, false, true},         {"mix3 +softmax", 3, false, true},
        {"mix4 +smem", 3, true, true},         {"mix1 pattern +smem", 1, true, true}};
    for (const Mix& mx : mixes) {
      char name[64];
      std::snprintf(name, sizeof(name), "%s h%d", mx.name, nh);
      if (!wanted(name)) continue;
      const AttnMixParams mp{.k_cache = p.k_cache,
                             .v_cache = p.v_cache,
                             .q = p.q,
                             .q_stride = p.q_stride,
                             .block_tables = mx.random ? rand_table : p.block_tables,
                             .seqs = o.seqs,
                             .ctx = o.ctx,
                             .heads = nh,
                             .head_dim = hd,
                             .max_blocks = p.max_blocks_per_seq,
                             .sink = sink};
      SustainKernel(name, 2.0 * kv, o, burst_gbps, s,
                    [&] { SU_CHECK(SmAttnMix(mp, mx.level, mx.smem, s), "SmAttnMix"); });
    }
    {
      char name[64];
      std::snprintf(name, sizeof(name), "attn pipe rand m%d c%d h%d", o.seqs, o.ctx, nh);
      if (wanted(name)) {
        PagedAttentionParams pr = p;
        pr.block_tables = rand_table;
        const PagedDecodeCudaPlan plan{.workspace = in.workspace,
                                       .workspace_bytes = in.workspace_bytes,
                                       .num_multiprocessors = 132,
                                       .variant = PagedDecodeVariant::kPipelined};
        SustainKernel(name, 2.0 * kv, o, burst_gbps, s, [&] {
          SU_CHECK(PagedDecodeCuda(pr, plan, s) == KernelStatus::kOk, "PagedDecodeCuda");
        });
      }
    }
    in.Free();
    DeviceFree(rand_table);
    DeviceFree(sink);
  }

  // The decode step's fc1 + GELU at M = o.seqs over 8 copies of the weight (418 MB: no launch
  // finds its weights in the 60 MB L2), as a GEMM beside the attention would run.
  if (wanted("fc1+gelu")) {
    const int H = 2560, I = 10240, copies = 8;
    const size_t w_elems = size_t{H} * I;
    void* w = Alloc(2 * w_elems * copies);
    void* x = Alloc(size_t{2} * o.seqs * H);
    void* y = Alloc(size_t{2} * o.seqs * I);
    Fill(w, w_elems * copies, 3, DataType::kBF16, s, 0.03f);
    Fill(x, static_cast<size_t>(o.seqs) * H, 4, DataType::kBF16, s);
    std::unique_ptr<CudaGemm> gemm;
    SU_CHECK(CudaGemm::Create(size_t{32} << 20, &gemm) == KernelStatus::kOk, "cuBLASLt");
    int i = 0;
    char name[64];
    std::snprintf(name, sizeof(name), "fc1+gelu m%d", o.seqs);
    SustainKernel(name, 2.0 * w_elems, o, burst_gbps, s, [&] {
      const GemmParams g{.x = x,
                         .w = static_cast<const char*>(w) + 2 * w_elems * (i++ % copies),
                         .y = y,
                         .m = o.seqs,
                         .n = I,
                         .k = H,
                         .epilogue = GemmEpilogue::kGeluTanh,
                         .dtype = DataType::kBF16};
      SU_CHECK(gemm->Run(g, s) == KernelStatus::kOk, "gemm");
    });
    SU_CHECK(DeviceStreamSync(s) == 0, "gemm");
    gemm.reset();
    for (void* ptr : {w, x, y}) DeviceFree(ptr);
  }
}

}  // namespace phishard::bench
