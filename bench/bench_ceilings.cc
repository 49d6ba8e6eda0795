#include "bench/bench_ceilings.h"

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "bench/bench_device.h"
#include "bench/bench_util.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/paged_decode_cuda.h"
#include "kernels/cuda/random_fill_cuda.h"

namespace phishard::bench {

using json = nlohmann::json;

float TimeMs(cudaStream_t stream, int reps, const std::function<void()>& body) {
  DeviceTimer* t = nullptr;
  BENCH_CHECK(DeviceTimerCreate(&t) == 0, "timer");
  body();  // warm-up
  DeviceTimerStart(t, stream);
  for (int i = 0; i < reps; ++i) body();
  DeviceTimerStop(t, stream);
  float ms = 0;
  BENCH_CHECK(DeviceTimerElapsedMs(t, &ms) == 0, "timer");
  DeviceTimerDestroy(t);
  return ms / reps;
}

Ceilings MeasureCeilings() {
  Ceilings c;
  cudaStream_t s = nullptr;
  BENCH_CHECK(DeviceStreamCreate(&s) == 0, "stream");
  const size_t bytes = size_t{2} << 30;  // 2 GiB each way: far past the 60 MB L2
  void *a = nullptr, *b = nullptr;
  BENCH_CHECK(DeviceMalloc(&a, bytes) == 0 && DeviceMalloc(&b, bytes) == 0, "copy buffers");
  BENCH_CHECK(RandomFillCuda({.data = a,
                              .count = static_cast<int64_t>(bytes / 2),
                              .seed = 7,
                              .dtype = DataType::kBF16},
                             s) == KernelStatus::kOk,
              "fill");
  const float copy_ms = TimeMs(s, 10, [&] { DeviceCopyOnDevice(b, a, bytes, s); });
  c.copy_bytes_per_s = 2.0 * bytes / (copy_ms * 1e-3);
  DeviceFree(a);
  DeviceFree(b);

  const int n = 8192;
  std::unique_ptr<CudaGemm> gemm;
  BENCH_CHECK(CudaGemm::Create(size_t{32} << 20, &gemm) == KernelStatus::kOk, "cuBLASLt");
  void *x = nullptr, *w = nullptr, *y = nullptr;
  const size_t mat = size_t{2} * n * n;
  BENCH_CHECK(
      DeviceMalloc(&x, mat) == 0 && DeviceMalloc(&w, mat) == 0 && DeviceMalloc(&y, mat) == 0,
      "gemm buffers");
  RandomFillCuda({.data = x, .count = int64_t{n} * n, .seed = 1, .dtype = DataType::kBF16}, s);
  RandomFillCuda({.data = w, .count = int64_t{n} * n, .seed = 2, .dtype = DataType::kBF16}, s);
  GemmParams p{.x = x, .w = w, .y = y, .m = n, .n = n, .k = n, .dtype = DataType::kBF16};
  const float gemm_ms = TimeMs(s, 10, [&] { gemm->Run(p, s); });
  c.gemm_flops = 2.0 * n * n * static_cast<double>(n) / (gemm_ms * 1e-3);
  DeviceStreamSync(s);
  gemm.reset();
  DeviceFree(x);
  DeviceFree(w);
  DeviceFree(y);
  DeviceStreamDestroy(s);
  BENCH_CHECK(DeviceGetLastError() == 0, "ceilings");
  return c;
}

// One decode attention kernel line: K and V bytes (kv each) over the launch's time.
static json AttentionRow(const char* name, int seqs, int ctx, int splits, float us, size_t kv,
                         const Ceilings& ceil) {
  return {{"op", name},
          {"m", seqs},
          {"context", ctx},
          {"splits", splits},
          {"us", us},
          {"gbps", 2.0 * kv / (us * 1e-6) / 1e9},
          {"of_copy_bw", 2.0 * kv / (us * 1e-6) / ceil.copy_bytes_per_s}};
}

// The fused decode attention as 1-8-row decode steps run it (PagedDecodeCudaPlan::fold_rotary +
// merge_counters: rotary + new K/V write, attention and split merge in one launch), Phi-2 heads
// (32 x 80, rotary 32), one layer. "warm": 20 launches over the same K/V (L2-resident below
// ~50 MB); "cold": launches rotate over enough copies of the inputs (>= 100 MB) that each reads
// its K/V from HBM, as the step does (every layer has its own cache).
static void FusedDecodeAttentionTimes(const Ceilings& ceil, cudaStream_t s, json* out) {
  const int nh = 32, hd = 80, bs = 16;
  struct Att {
    int seqs, ctx;
  };
  for (Att a : {Att{1, 128}, Att{1, 1024}, Att{1, 4096}, Att{2, 1024}, Att{4, 1024}}) {
    struct Set {
      DecodeAttentionInputs in;
      PagedDecodeCudaPlan plan;
    };
    std::vector<Set> sets;
    size_t kv = 0;
    do {
      Set set{.in = MakeDecodeAttentionInputs(a.seqs, a.ctx, nh, hd, bs, s, "phishard_bench"),
              .plan = {}};
      DecodeAttentionInputs& in = set.in;
      kv = in.kv_bytes;
      const PagedAttentionParams& p = in.p;
      // Key ctx - 1 of sequence i is the new token: position ctx - 1, its slot in the last table
      // entry (MakeDecodeAttentionInputs numbers the blocks of sequence i consecutively).
      const int per = p.max_blocks_per_seq;
      std::vector<int32_t> pos(a.seqs, a.ctx - 1);
      std::vector<int64_t> slots(a.seqs);
      for (int i = 0; i < a.seqs; ++i) {
        slots[i] = int64_t{in.host[a.seqs + i * per + (a.ctx - 1) / bs]} * bs + (a.ctx - 1) % bs;
      }
      auto* d_pos = static_cast<int32_t*>(DeviceAllocOrDie(4 * pos.size(), "phishard_bench"));
      auto* d_slots = static_cast<int64_t*>(DeviceAllocOrDie(8 * slots.size(), "phishard_bench"));
      const size_t counters = static_cast<size_t>(a.seqs) * nh;
      auto* d_cnt = static_cast<int32_t*>(DeviceAllocOrDie(4 * counters, "phishard_bench"));
      in.buffers.insert(in.buffers.end(), {d_pos, d_slots, d_cnt});
      DeviceCopyToDevice(d_pos, pos.data(), 4 * pos.size(), s);
      DeviceCopyToDevice(d_slots, slots.data(), 8 * slots.size(), s);
      DeviceMemset(d_cnt, 0, 4 * counters, s);
      set.plan = PagedDecodeCudaPlan{.workspace = in.workspace,
                                     .workspace_bytes = in.workspace_bytes,
                                     .num_multiprocessors = 132,
                                     .fold_rotary = true,
                                     .rotary = {.qkv = const_cast<void*>(p.q),
                                                .positions = d_pos,
                                                .slots = d_slots,
                                                .k_cache = const_cast<void*>(p.k_cache),
                                                .v_cache = const_cast<void*>(p.v_cache),
                                                .num_slots = int64_t{p.num_blocks} * bs,
                                                .block_size = bs,
                                                .num_tokens = a.seqs,
                                                .qkv_stride = p.q_stride,
                                                .num_heads = nh,
                                                .num_kv_heads = nh,
                                                .head_dim = hd,
                                                .rotary_dim = 32,
                                                .dtype = DataType::kBF16},
                                     .merge_counters = d_cnt,
                                     .merge_counters_len = counters};
      sets.push_back(std::move(set));
    } while (sets.size() < 16 && 2 * kv * sets.size() < (size_t{100} << 20));
    int splits = 0;
    BENCH_CHECK(PagedDecodeCuda(sets[0].in.p, sets[0].plan, s, &splits) == KernelStatus::kOk,
                "fused decode attention");
    const float warm =
        1e3f * TimeMs(s, 20, [&] { PagedDecodeCuda(sets[0].in.p, sets[0].plan, s); });
    size_t next = 0;
    const int reps = static_cast<int>(std::max<size_t>(20, 2 * sets.size()));
    const float cold = 1e3f * TimeMs(s, reps, [&] {
                         const Set& set = sets[next++ % sets.size()];
                         PagedDecodeCuda(set.in.p, set.plan, s);
                       });
    BENCH_CHECK(DeviceStreamSync(s) == 0 && DeviceGetLastError() == 0, "fused decode attention");
    for (auto [name, us] :
         {std::pair{"paged_decode fold warm", warm}, {"paged_decode fold", cold}}) {
      out->push_back(AttentionRow(name, a.seqs, a.ctx, splits, us, kv, ceil));
    }
    for (Set& set : sets) set.in.Free();
  }
}

// The decode step's big kernels alone, device events over 20 back-to-back launches (launch gaps
// included, as in a graph): each linear layer of Phi-2 at m = 1 through the GEMV kernel and
// through cuBLASLt (GB/s of weights), and the decode attention (GB/s of K/V) at a few shapes.
json KernelTimes(const Ceilings& ceil) {
  json out = json::array();
  cudaStream_t s = nullptr;
  BENCH_CHECK(DeviceStreamCreate(&s) == 0, "stream");
  const int H = 2560, I = 10240, V = 51200;
  const size_t wbytes = size_t{2} * (size_t{V} * H);  // largest weight: lm_head
  void *w = nullptr, *w2 = nullptr, *x = nullptr, *x2 = nullptr, *y = nullptr, *bias = nullptr;
  BENCH_CHECK(
      DeviceMalloc(&w, wbytes) == 0 && DeviceMalloc(&w2, size_t{2} * H * I) == 0 &&
          DeviceMalloc(&x, size_t{2} * 8 * I) == 0 && DeviceMalloc(&x2, size_t{2} * 8 * I) == 0 &&
          DeviceMalloc(&y, size_t{4} * 8 * V) == 0 && DeviceMalloc(&bias, size_t{4} * V) == 0,
      "kernel buffers");
  RandomFillCuda({.data = w,
                  .count = static_cast<int64_t>(wbytes / 2),
                  .spread = 0.03f,
                  .seed = 3,
                  .dtype = DataType::kBF16},
                 s);
  RandomFillCuda(
      {.data = w2, .count = int64_t{H} * I, .spread = 0.03f, .seed = 4, .dtype = DataType::kBF16},
      s);
  RandomFillCuda({.data = x, .count = int64_t{8} * I, .seed = 5, .dtype = DataType::kBF16}, s);
  RandomFillCuda({.data = x2, .count = int64_t{8} * I, .seed = 6, .dtype = DataType::kBF16}, s);
  RandomFillCuda({.data = bias, .count = V, .spread = 0.01f, .seed = 7, .dtype = DataType::kF32},
                 s);
  std::unique_ptr<CudaGemm> gemm;
  BENCH_CHECK(CudaGemm::Create(size_t{32} << 20, &gemm) == KernelStatus::kOk, "cuBLASLt");
  const std::vector<bench::PhiLinear> lins = bench::PhiLinears(H, I, V);
  for (int m : {1, 4, 8}) {
    for (const bench::PhiLinear& l : lins) {
      const GemmParams g = PhiLinearGemm(l, m, x, w, bias, y);
      const DataType yt = PhiLinearOutput(l);
      GemvParams gv{.a = g, .y_dtype = yt};
      GemmParams g2 = g;
      if (l.k2 > 0) {
        gv.x2 = x2;
        gv.w2 = w2;
        gv.k2 = l.k2;
        g2.x = x2;
        g2.w = w2;
        g2.k = l.k2;
        g2.accumulate = true;
      }
      const double bytes = 2.0 * l.n * (l.k + l.k2);
      for (bool pdl : {false, true}) {
        gv.programmatic_launch = pdl;
        const float us = 1e3f * TimeMs(s, 20, [&] { GemvCuda(gv, s); });
        out.push_back({{"op", std::string("gemv ") + l.name},
                       {"m", m},
                       {"pdl", pdl},
                       {"us", us},
                       {"gbps", bytes / (us * 1e-6) / 1e9},
                       {"of_copy_bw", bytes / (us * 1e-6) / ceil.copy_bytes_per_s}});
      }
      const float us = 1e3f * TimeMs(s, 20, [&] {
                         gemm->Run(g, yt, s);
                         if (l.k2 > 0) gemm->Run(g2, yt, s);
                       });
      out.push_back({{"op", std::string("cublaslt ") + l.name},
                     {"m", m},
                     {"us", us},
                     {"gbps", bytes / (us * 1e-6) / 1e9},
                     {"of_copy_bw", bytes / (us * 1e-6) / ceil.copy_bytes_per_s}});
    }
  }
  BENCH_CHECK(DeviceStreamSync(s) == 0 && DeviceGetLastError() == 0, "linear kernels");
  gemm.reset();
  for (void* p : {w, w2, x, x2, y, bias}) DeviceFree(p);

  // Decode attention, Phi-2 heads (32 x 80), one layer's K/V, sequences on consecutive blocks.
  const int nh = 32, hd = 80, bs = 16;
  struct Att {
    int seqs, ctx;
  };
  for (Att a : {Att{1, 1024}, Att{1, 4096}, Att{32, 1024}, Att{32, 4096}, Att{256, 1024}}) {
    DecodeAttentionInputs in =
        MakeDecodeAttentionInputs(a.seqs, a.ctx, nh, hd, bs, s, "phishard_bench");
    const PagedAttentionParams& p = in.p;
    const size_t kv = in.kv_bytes;
    // Every kernel variant (kAuto is what the model runs).
    const std::pair<PagedDecodeVariant, const char*> variants[] = {
        {PagedDecodeVariant::kAuto, "paged_decode"},
        {PagedDecodeVariant::kRegisterStages, "paged_decode regs"},
        {PagedDecodeVariant::kPipelined, "paged_decode pipe"}};
    for (auto [variant, name] : variants) {
      PagedDecodeCudaPlan plan{.workspace = in.workspace,
                               .workspace_bytes = in.workspace_bytes,
                               .num_multiprocessors = 132,
                               .variant = variant};
      int splits = 0;
      PagedDecodeCuda(p, plan, s, &splits);
      const float us = 1e3f * TimeMs(s, 20, [&] { PagedDecodeCuda(p, plan, s); });
      BENCH_CHECK(DeviceStreamSync(s) == 0 && DeviceGetLastError() == 0, "attention kernel");
      out.push_back(AttentionRow(name, a.seqs, a.ctx, splits, us, kv, ceil));
    }
    in.Free();
  }
  FusedDecodeAttentionTimes(ceil, s, &out);
  DeviceStreamDestroy(s);
  for (const json& j : out) {
    std::printf(
        "kernel %-22s m %3d%s%s: %8.1f us  %7.0f GB/s  %.2f of copy bw\n",
        j["op"].get<std::string>().c_str(), j["m"].get<int>(),
        j.contains("pdl") && j["pdl"].get<bool>() ? " pdl" : "",
        j.contains("context")
            ? absl::StrFormat(" ctx %d splits %d", j["context"].get<int>(), j["splits"].get<int>())
                  .c_str()
            : "",
        j["us"].get<double>(), j["gbps"].get<double>(), j["of_copy_bw"].get<double>());
  }
  return out;
}

}  // namespace phishard::bench
