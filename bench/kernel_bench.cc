// phishard_kernel_bench: the small per-layer ops of a Phi-2-shaped (bf16) step alone, against the
// copy bandwidth measured in the same run: RotaryKvWrite and LayerNorm at decode and prefill token
// counts, and the linear layers of 1..8-row steps through the GEMV kernel (every ksplit/unroll
// setting, and the defaults) and cuBLASLt.
//
// Each case is timed with device events over `reps` back-to-back launches after one warm-up.
// Linear layers read COLD weights: every launch takes the next of several copies of the weight
// in a 640 MB pool, so no launch finds its weights in the 60 MB L2 (phishard_bench's KernelTimes
// reuse one copy, which makes qkv (39 MB) and fc1 (52 MB) look faster than inside a step).
//
// Usage: phishard_kernel_bench [reps (default 20)]. One line per case on stdout:
//   op  shape  config  us  GB/s  of_copy
// phishard_kernel_bench REPS gemm-candidates M1,M2,...: the heuristic's first 16 cuBLASLt
// candidates of each Phi-2 layer GEMM at those row counts (prefill sizes), one line each.
// phishard_kernel_bench 1 gemm-sustained M1,M2,... [BLOCK_MS [TOP]]: those GEMMs' candidates under
// sustained load, at the power-capped clock (bench/gemm_sustained.h), and the winners.
// phishard_kernel_bench 1 sustain [MS [SEQS CTX [WINDOW_MS [ONLY [HEADS]]]]]: the copy, the decode
// attention variants (HEADS x 80, default 32) and fc1 at M = SEQS each back to back for MS
// (default 3000), with power, SM clock and energy per GB (bench/sustain.h); ONLY: the cases whose
// name contains one of its comma-separated parts.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_device.h"
#include "bench/bench_util.h"
#include "bench/gemm_sustained.h"
#include "bench/sustain.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/layer_norm_cuda.h"
#include "kernels/cuda/random_fill_cuda.h"
#include "kernels/cuda/rotary_kv_write_cuda.h"
#include "kernels/device.h"

namespace phishard {
namespace {

#define KB_CHECK(cond, what) bench::DieUnless((cond), "kernel_bench", (what))

int g_reps = 20;
double g_copy_bps = 0;

// Mean ms of one body() call over g_reps calls (after one warm-up call); `i` counts calls.
float TimeMs(cudaStream_t s, const std::function<void(int)>& body) {
  DeviceTimer* t = nullptr;
  KB_CHECK(DeviceTimerCreate(&t) == 0, "timer");
  body(0);
  DeviceTimerStart(t, s);
  for (int i = 1; i <= g_reps; ++i) body(i);
  DeviceTimerStop(t, s);
  float ms = 0;
  KB_CHECK(DeviceTimerElapsedMs(t, &ms) == 0, "timer");
  DeviceTimerDestroy(t);
  KB_CHECK(DeviceGetLastError() == 0, "launches");
  return ms / g_reps;
}

void Report(const std::string& op, const std::string& shape, const std::string& config, double us,
            double bytes) {
  const double bps = bytes / (us * 1e-6);
  std::printf("%-14s %-22s %-16s %9.2f us %8.1f GB/s %6.3f\n", op.c_str(), shape.c_str(),
              config.c_str(), us, bps / 1e9, bps / g_copy_bps);
  std::fflush(stdout);
}

void* Alloc(size_t bytes) { return bench::DeviceAllocOrDie(bytes, "kernel_bench"); }

void Fill(void* p, size_t count, uint64_t seed, DataType t, cudaStream_t s, float spread = 1.0f) {
  bench::RandomFillOrDie(p, count, seed, t, s, "kernel_bench", spread);
}

void CopyCeiling(cudaStream_t s) {
  const size_t bytes = size_t{2} << 30;
  void* a = Alloc(bytes);
  void* b = Alloc(bytes);
  Fill(a, bytes / 2, 1, DataType::kBF16, s);
  const int reps = g_reps;
  g_reps = 5;
  const float ms = TimeMs(s, [&](int) { DeviceCopyOnDevice(b, a, bytes, s); });
  g_reps = reps;
  g_copy_bps = 2.0 * bytes / (ms * 1e-3);
  std::printf("copy ceiling: %.1f GB/s (2 GiB device-to-device copy)\n", g_copy_bps / 1e9);
  DeviceFree(a);
  DeviceFree(b);
}

// Phi-2: 32 heads of 80, rotary_dim 32, hidden 2560.
constexpr int kHeads = 32, kHeadDim = 80, kRotary = 32, kHidden = 2560, kInter = 10240,
              kVocab = 51200;

void RotaryCases(cudaStream_t s) {
  const int width = 3 * kHeads * kHeadDim;
  const int64_t num_slots = 8192;
  const size_t kv_row = static_cast<size_t>(kHeads) * kHeadDim;
  void* k = Alloc(num_slots * kv_row * 2);
  void* v = Alloc(num_slots * kv_row * 2);
  for (int T : {1, 64, 256, 2048}) {
    void* qkv = Alloc(static_cast<size_t>(T) * width * 2);
    Fill(qkv, static_cast<size_t>(T) * width, 2, DataType::kBF16, s);
    std::vector<int32_t> pos(T);
    std::vector<int64_t> slots(T);
    for (int t = 0; t < T; ++t) {
      pos[t] = 1000 + t;
      slots[t] = (static_cast<int64_t>(t) * 37) % num_slots;  // scattered, distinct
    }
    void* d_pos = Alloc(pos.size() * 4);
    void* d_slots = Alloc(slots.size() * 8);
    DeviceCopyToDevice(d_pos, pos.data(), pos.size() * 4, s);
    DeviceCopyToDevice(d_slots, slots.data(), slots.size() * 8, s);
    const RotaryKvWriteParams p{.qkv = qkv,
                                .positions = static_cast<int32_t*>(d_pos),
                                .slots = static_cast<int64_t*>(d_slots),
                                .k_cache = k,
                                .v_cache = v,
                                .num_slots = num_slots,
                                .block_size = 16,
                                .num_tokens = T,
                                .num_heads = kHeads,
                                .num_kv_heads = kHeads,
                                .head_dim = kHeadDim,
                                .rotary_dim = kRotary,
                                .dtype = DataType::kBF16};
    const float ms = TimeMs(s, [&](int) { RotaryKvWriteCuda(p, s); });
    // Read the row, write the rotated Q/K dims back, write K and V to the cache.
    const double bytes = 2.0 * T * (width + 2 * kHeads * kRotary + 2 * kv_row);
    Report("rotary_kv", "T=" + std::to_string(T), "phi2 bf16", 1e3 * ms, bytes);
    DeviceStreamSync(s);
    for (void* q : {qkv, d_pos, d_slots}) DeviceFree(q);
  }
  DeviceFree(k);
  DeviceFree(v);
}

void LayerNormCases(cudaStream_t s) {
  void* w = Alloc(kHidden * 2);
  void* b = Alloc(kHidden * 2);
  Fill(w, kHidden, 3, DataType::kBF16, s);
  Fill(b, kHidden, 4, DataType::kBF16, s);
  for (int rows : {1, 64, 256, 2048}) {
    const size_t n = static_cast<size_t>(rows) * kHidden;
    void* x = Alloc(n * 2);
    void* y = Alloc(n * 2);
    Fill(x, n, 5, DataType::kBF16, s);
    const float ms = TimeMs(s, [&](int) {
      LayerNormCuda({.x = x,
                     .weight = w,
                     .bias = b,
                     .y = y,
                     .rows = rows,
                     .cols = kHidden,
                     .dtype = DataType::kBF16},
                    s);
    });
    Report("layer_norm", "rows=" + std::to_string(rows), "cols 2560 bf16", 1e3 * ms, 4.0 * n);
    DeviceStreamSync(s);
    DeviceFree(x);
    DeviceFree(y);
  }
  DeviceFree(w);
  DeviceFree(b);
}

void LinearCases(cudaStream_t s, const std::vector<int>& rows_list) {
  const size_t pool_bytes = size_t{640} << 20;
  void* pool = Alloc(pool_bytes);
  Fill(pool, pool_bytes / 2, 6, DataType::kBF16, s, 0.03f);
  void* x = Alloc(size_t{2} * 8 * kInter);
  void* x2 = Alloc(size_t{2} * 8 * kInter);
  void* y = Alloc(size_t{4} * 8 * kVocab);
  void* bias = Alloc(size_t{4} * kVocab);
  Fill(x, 8 * kInter, 7, DataType::kBF16, s);
  Fill(x2, 8 * kInter, 8, DataType::kBF16, s);
  Fill(bias, kVocab, 9, DataType::kF32, s, 0.01f);
  std::unique_ptr<CudaGemm> gemm;
  KB_CHECK(CudaGemm::Create(size_t{32} << 20, &gemm) == KernelStatus::kOk, "cuBLASLt");
  std::vector<bench::PhiLinear> lins = bench::PhiLinears(kHidden, kInter, kVocab);
  // The two halves of the pair alone: with the MLP branch on its own stream (the default) dense
  // and fc2 run as separate single-segment layers.
  lins.push_back({"dense", kHidden, kHidden, 0, GemmEpilogue::kNone, true, false});
  lins.push_back({"fc2", kHidden, kInter, 0, GemmEpilogue::kNone, true, false});
  void* ln_w = Alloc(size_t{2} * kHidden);
  void* ln_b = Alloc(size_t{2} * kHidden);
  Fill(ln_w, kHidden, 10, DataType::kBF16, s);
  Fill(ln_b, kHidden, 11, DataType::kBF16, s);
  for (int m : rows_list) {
    for (const bench::PhiLinear& l : lins) {
      const size_t w1_bytes = size_t{2} * l.n * l.k;
      const size_t region = (w1_bytes + size_t{2} * l.n * l.k2 + 4095) / 4096 * 4096;
      const int copies = static_cast<int>(pool_bytes / region);
      KB_CHECK(copies >= 1, "pool");
      auto w_at = [&](int i) { return static_cast<char*>(pool) + (i % copies) * region; };
      const DataType yt = bench::PhiLinearOutput(l);
      const GemmParams g = bench::PhiLinearGemm(l, m, x, pool, bias, y);
      const double bytes = 2.0 * l.n * (l.k + l.k2);
      const std::string shape = std::string("m=") + std::to_string(m) +
                                " n=" + std::to_string(l.n) + " k=" + std::to_string(l.k + l.k2);
      struct Cfg {
        int ksplit, unroll;
      };
      std::vector<Cfg> cfgs = {{0, 0}};
      if (m == 1) {
        for (int u : {4, 8}) {
          for (int ks : {1, 2, 4, 8}) cfgs.push_back({ks, u});
        }
      }
      for (const Cfg& c : cfgs) {
        GemvParams gv{.a = g, .y_dtype = yt, .ksplit = c.ksplit, .unroll = c.unroll};
        if (l.k2 > 0) {
          gv.x2 = x2;
          gv.k2 = l.k2;
        }
        const float ms = TimeMs(s, [&](int i) {
          gv.a.w = w_at(i);
          if (l.k2 > 0) gv.w2 = w_at(i) + w1_bytes;
          KB_CHECK(GemvCuda(gv, s) == KernelStatus::kOk, "GemvCuda");
        });
        const std::string cfg =
            c.ksplit == 0 ? "gemv default"
                          : "gemv ks" + std::to_string(c.ksplit) + " u" + std::to_string(c.unroll);
        Report(l.name, shape, cfg, 1e3 * ms, bytes);
      }
      // The bulk kernel: defaults; at m = 1 its stage size x ring depth x blocks per SM, chained
      // launches as programmatic dependents (the next GEMV's first stages load while the one
      // before finishes, as in a decode step), and with the LayerNorm folded in (one segment).
      struct BulkCfg {
        int kb, stages, bps;
        bool pdl, ln;
      };
      std::vector<BulkCfg> bcfgs = {{0, 0, 0, false, false}, {0, 0, 0, true, false}};
      if (l.k2 == 0 && l.k == kHidden) bcfgs.push_back({0, 0, 0, true, true});  // ln: [kHidden]
      if (m == 1) {
        for (int kb : {16, 32, 48}) {
          for (int st : {2, 4, 6}) {
            for (int bps : {1, 2}) bcfgs.push_back({kb, st, bps, true, false});
          }
        }
      }
      for (const BulkCfg& c : bcfgs) {
        GemvParams gv{.a = g,
                      .y_dtype = yt,
                      .programmatic_launch = c.pdl,
                      .bulk = true,
                      .bulk_stage_kb = c.kb,
                      .bulk_stages = c.stages,
                      .bulk_blocks_per_sm = c.bps};
        if (c.ln) {
          gv.ln_weight = ln_w;
          gv.ln_bias = ln_b;
        }
        if (l.k2 > 0) {
          gv.x2 = x2;
          gv.k2 = l.k2;
        }
        char cfg[64];
        std::snprintf(cfg, sizeof(cfg), "bulk%s%s kb%d s%d b%d", c.pdl ? " pdl" : "",
                      c.ln ? " ln" : "", c.kb, c.stages, c.bps);
        if (!GemvCudaSupports(gv)) {
          std::printf("%-14s %-22s %-16s unsupported\n", l.name, shape.c_str(), cfg);
          continue;
        }
        const float ms = TimeMs(s, [&](int i) {
          gv.a.w = w_at(i);
          if (l.k2 > 0) gv.w2 = w_at(i) + w1_bytes;
          KB_CHECK(GemvCuda(gv, s) == KernelStatus::kOk, "GemvCuda bulk");
        });
        Report(l.name, shape, cfg, 1e3 * ms, bytes);
      }
      // cuBLASLt as the model calls it (two GEMMs for the pair), and with m padded to 8 rows.
      for (int mm : {m, 8}) {
        if (mm != m && m != 1) continue;
        const float ms = TimeMs(s, [&](int i) {
          GemmParams a = g;
          a.m = mm;
          a.w = w_at(i);
          KB_CHECK(gemm->Run(a, yt, s) == KernelStatus::kOk, "cuBLASLt");
          if (l.k2 > 0) {
            GemmParams b2 = a;
            b2.x = x2;
            b2.w = w_at(i) + w1_bytes;
            b2.k = l.k2;
            b2.accumulate = true;
            KB_CHECK(gemm->Run(b2, yt, s) == KernelStatus::kOk, "cuBLASLt");
          }
        });
        Report(l.name, shape, mm == m ? "cublaslt" : "cublaslt m8", 1e3 * ms, bytes);
      }
    }
  }
  DeviceStreamSync(s);
  gemm.reset();
  for (void* p : {pool, x, x2, y, bias, ln_w, ln_b}) DeviceFree(p);
}

// Prefill-sized linear layers through cuBLASLt: the heuristic's first 16 candidates for each Phi-2
// layer GEMM at each row count, timed as CudaGemm::TimeCandidates runs them (hot weights: at
// these sizes the GEMMs are compute-bound), so a choice other than the heuristic's first shows.
void GemmCandidateCases(cudaStream_t s, const std::vector<int>& rows_list) {
  const int max_m = *std::max_element(rows_list.begin(), rows_list.end());
  void* x = Alloc(size_t{2} * max_m * kInter);
  void* w = Alloc(size_t{2} * kInter * 3 * kHidden);
  void* y = Alloc(size_t{2} * max_m * kInter);
  void* bias = Alloc(size_t{2} * kInter);
  Fill(x, static_cast<size_t>(max_m) * kInter, 12, DataType::kBF16, s);
  Fill(w, static_cast<size_t>(kInter) * 3 * kHidden, 13, DataType::kBF16, s, 0.03f);
  Fill(y, static_cast<size_t>(max_m) * kInter, 14, DataType::kBF16, s);
  Fill(bias, kInter, 15, DataType::kBF16, s, 0.01f);
  std::unique_ptr<CudaGemm> gemm;
  KB_CHECK(CudaGemm::Create(size_t{32} << 20, &gemm) == KernelStatus::kOk, "cuBLASLt");
  // As the prefill layer loop calls them: qkv and fc1 with bias (fc1 + GELU), dense and fc2
  // accumulating into the residual (dense with the bias, fc2 with its own).
  struct Lin {
    const char* name;
    int n, k;
    GemmEpilogue epi;
    bool acc;
  };
  const Lin lins[] = {{"qkv", 3 * kHidden, kHidden, GemmEpilogue::kNone, false},
                      {"fc1+gelu", kInter, kHidden, GemmEpilogue::kGeluTanh, false},
                      {"dense", kHidden, kHidden, GemmEpilogue::kNone, true},
                      {"fc2", kHidden, kInter, GemmEpilogue::kNone, true}};
  for (int m : rows_list) {
    for (const Lin& l : lins) {
      const GemmParams g{.x = x,
                         .w = w,
                         .bias = bias,
                         .y = y,
                         .m = m,
                         .n = l.n,
                         .k = l.k,
                         .accumulate = l.acc,
                         .epilogue = l.epi,
                         .dtype = DataType::kBF16};
      std::vector<GemmCandidateTime> times;
      KB_CHECK(gemm->TimeCandidates(g, DataType::kBF16, 16, g_reps, s, &times) == KernelStatus::kOk,
               "TimeCandidates");
      const double flops = 2.0 * m * l.n * l.k;
      float first = 0.0f;
      for (const GemmCandidateTime& t : times) {
        if (t.index == 0) first = t.us;
      }
      for (const GemmCandidateTime& t : times) {
        std::printf(
            "gemm_cand %-9s m=%-6d n=%-6d k=%-6d #%-2d %9.2f us %6.1f TFLOP/s %6.3f of_first  "
            "algo %d tile %d stages %d splitk %d red %d swz %d custom %d cluster %d ws %zu waves "
            "%.2f\n",
            l.name, m, l.n, l.k, t.index, t.us, flops / (t.us * 1e-6) / 1e12,
            first > 0 ? t.us / first : 0.0, t.algo_id, t.tile_id, t.stages_id, t.split_k,
            t.reduction, t.swizzle, t.custom, t.cluster_id, t.workspace, t.waves);
      }
      std::fflush(stdout);
    }
  }
  DeviceStreamSync(s);
  gemm.reset();
  for (void* p : {x, w, y, bias}) DeviceFree(p);
}

int Main(int argc, char** argv) {
  if (argc > 1) g_reps = std::max(1, std::atoi(argv[1]));
  // "gemm-candidates m1,m2,...": only the prefill GEMM candidate table.
  if (argc > 3 && std::string(argv[2]) == "gemm-candidates") {
    std::vector<int> rows;
    for (const char* c = argv[3]; *c != '\0';) {
      rows.push_back(std::max(1, std::atoi(c)));
      while (*c != '\0' && *c != ',') ++c;
      if (*c == ',') ++c;
    }
    cudaStream_t s = nullptr;
    KB_CHECK(DeviceStreamCreate(&s) == 0, "stream");
    GemmCandidateCases(s, rows);
    KB_CHECK(DeviceStreamSync(s) == 0 && DeviceGetLastError() == 0, "the run");
    DeviceStreamDestroy(s);
    return 0;
  }
  if (argc > 3 && std::string(argv[2]) == "gemm-sustained") {
    bench::GemmSustainedOptions o;
    for (const char* c = argv[3]; *c != '\0';) {
      o.rows.push_back(std::max(1, std::atoi(c)));
      while (*c != '\0' && *c != ',') ++c;
      if (*c == ',') ++c;
    }
    if (argc > 4) o.block_ms = std::max(5.0, std::atof(argv[4]));
    if (argc > 5) o.top = std::max(1, std::atoi(argv[5]));
    cudaStream_t s = nullptr;
    KB_CHECK(DeviceStreamCreate(&s) == 0, "stream");
    bench::GemmSustainedCases(s, o);
    KB_CHECK(DeviceStreamSync(s) == 0 && DeviceGetLastError() == 0, "the run");
    DeviceStreamDestroy(s);
    return 0;
  }
  if (argc > 2 && std::string(argv[2]) == "sustain") {
    bench::SustainOptions o;
    if (argc > 3) o.ms = std::max(10.0, std::atof(argv[3]));
    if (argc > 5) {
      o.seqs = std::max(1, std::atoi(argv[4]));
      o.ctx = std::max(1, std::atoi(argv[5]));
    }
    if (argc > 6) o.window_ms = std::max(1.0, std::atof(argv[6]));
    if (argc > 7) o.only = argv[7];
    if (argc > 8) o.heads = std::max(1, std::atoi(argv[8]));
    cudaStream_t s = nullptr;
    KB_CHECK(DeviceStreamCreate(&s) == 0, "stream");
    bench::SustainCases(s, o);
    KB_CHECK(DeviceStreamSync(s) == 0 && DeviceGetLastError() == 0, "the run");
    DeviceStreamDestroy(s);
    return 0;
  }
  int count = 0;
  KB_CHECK(DeviceGetCount(&count) == 0 && count > 0, "a CUDA device");
  KB_CHECK(DeviceCheckKernelImage() == 0, "kernel image for this device");
  cudaStream_t s = nullptr;
  KB_CHECK(DeviceStreamCreate(&s) == 0, "stream");
  CopyCeiling(s);
  std::printf("%-14s %-22s %-16s %12s %13s %6s\n", "op", "shape", "config", "time", "bandwidth",
              "ofcopy");
  RotaryCases(s);
  LayerNormCases(s);
  LinearCases(s, {1, 2, 4, 8});
  KB_CHECK(DeviceStreamSync(s) == 0 && DeviceGetLastError() == 0, "the run");
  DeviceStreamDestroy(s);
  return 0;
}

}  // namespace
}  // namespace phishard

int main(int argc, char** argv) { return phishard::Main(argc, argv); }
