// Internal to bench/phishard_bench.cc: the Phi-2 shape (or a config.json's) with random weights,
// the floors of a step (bytes / copy bandwidth, FLOPs / GEMM rate), a result row, and Bench, which
// times decode steps (graph, greedy, copy, eager; a fixed context over a random-filled KV pool) and
// prefill steps of a loaded CudaPhiModel.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/types/span.h"
#include "bench/bench_ceilings.h"
#include "bench/bench_util.h"
#include "bench/kernel_trace.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "model/phi_config.h"
#include "model/text_file.h"
#include "nlohmann/json.hpp"
#include "nvtx3/nvToolsExt.h"

namespace phishard {
namespace bench {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

inline PhiConfig Phi2Config(int layers) {
  const std::string text = absl::StrFormat(
      R"({"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_size": 2560,
          "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": %d,
          "intermediate_size": 10240, "vocab_size": 51200, "partial_rotary_factor": 0.4,
          "rope_theta": 10000.0, "layer_norm_eps": 1e-5, "hidden_act": "gelu_new",
          "max_position_embeddings": 8192, "tie_word_embeddings": false,
          "torch_dtype": "bfloat16"})",
      layers);
  absl::StatusOr<PhiConfig> c = ParsePhiConfig(text, "phi-2 shape");
  BENCH_OK(c.status());
  return *c;
}

// The benchmarked shape: an HF config.json (`path`, e.g. bench/configs/phi-1_5.json) or, when
// `path` is empty, the Phi-2 shape. `layers` > 0 replaces the file's num_hidden_layers.
inline PhiConfig BenchConfig(const std::string& path, int layers) {
  if (path.empty()) return Phi2Config(layers > 0 ? layers : 32);
  const absl::StatusOr<std::string> text = ReadTextFile(path);
  BENCH_OK(text.status());
  absl::StatusOr<PhiConfig> c = ParsePhiConfig(*text, path);
  BENCH_OK(c.status());
  if (layers > 0) c->num_hidden_layers = layers;
  return *c;
}

// A random rank-`rank` LoRA adapter on q, k, v, dense, fc1 and fc2 of every layer (uniform
// +-0.02 A and B, scale 2): the shape of a typical PEFT adapter, for timing only.
inline LoraAdapter RandomAdapter(const PhiConfig& c, int rank, uint64_t seed) {
  LoraAdapter a("bench-r" + std::to_string(rank), c.num_hidden_layers);
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  auto fill = [&](std::vector<float>* v, size_t n) {
    v->resize(n);
    for (float& x : *v) {
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      x = (static_cast<float>(state >> 40) / static_cast<float>(1 << 24) - 0.5f) * 0.04f;
    }
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    for (LoraTarget t : kAllLoraTargets) {
      if (t == LoraTarget::kLmHead) continue;
      const auto [in, out] = LoraTargetDims(c, t);
      LoraModule m;
      m.rank = rank;
      m.scale = 2.0f;
      fill(&m.a, static_cast<size_t>(rank) * in);
      fill(&m.b, static_cast<size_t>(out) * rank);
      BENCH_OK(a.SetModule(c, l, t, std::move(m)));
    }
  }
  return a;
}

// Work of one step, for the floors.
struct StepCost {
  double bytes = 0;
  double flops = 0;
};

struct Shape {
  double linear_params;  // per layer, all layers
  double lm_head_params;
  double weight_bytes;
  double kv_bytes_per_token;  // K and V of every layer
  int V, H, nH, hd, L;
};

inline StepCost DecodeCost(const Shape& s, int batch, int ctx) {
  StepCost c;
  c.bytes = s.weight_bytes + static_cast<double>(batch) * ctx * s.kv_bytes_per_token +
            static_cast<double>(batch) * s.V * 4;
  c.flops = 2.0 * batch * (s.linear_params + s.lm_head_params) +
            4.0 * batch * static_cast<double>(ctx) * s.hd * s.nH * s.L;
  return c;
}

inline StepCost PrefillCost(const Shape& s, int seqs, int len) {
  StepCost c;
  const double tokens = static_cast<double>(seqs) * len;
  c.bytes = s.weight_bytes + tokens * s.kv_bytes_per_token;
  // Causal: query i attends to i + 1 keys; QKᵀ and PV are 2 FLOPs per multiply-add each.
  c.flops = 2.0 * tokens * s.linear_params + 2.0 * seqs * s.lm_head_params +
            4.0 * seqs * (static_cast<double>(len) * (len + 1) / 2) * s.hd * s.nH * s.L;
  return c;
}

struct Row {
  std::string kind, mode;
  int batch = 0, context = 0, tokens = 0;
  double ms = 0, device_ms = 0, floor_ms = 0, mem_floor_ms = 0, compute_floor_ms = 0;
  std::string note;
};

inline json RowJson(const Row& r) {
  json j = {{"kind", r.kind},
            {"mode", r.mode},
            {"batch", r.batch},
            {"ms", r.ms},
            {"device_ms", r.device_ms},
            {"floor_ms", r.floor_ms},
            {"mem_floor_ms", r.mem_floor_ms},
            {"compute_floor_ms", r.compute_floor_ms},
            {"ratio", r.floor_ms > 0 ? r.ms / r.floor_ms : 0.0},
            {"device_ratio", r.floor_ms > 0 ? r.device_ms / r.floor_ms : 0.0}};
  if (r.kind == "decode") {
    j["context"] = r.context;
    j["tok_s"] = r.batch / (r.ms * 1e-3);
  } else {
    j["tokens"] = r.tokens;
  }
  if (!r.note.empty()) j["note"] = r.note;
  return j;
}

class Bench {
 public:
  Bench(CudaPhiModel& m, const Ceilings& c, const Shape& s, int steps)
      : m_(m), ceil_(c), shape_(s), steps_(steps), alloc_(m.kv_num_blocks()) {}

  void Floors(const StepCost& cost, Row* r) const {
    r->mem_floor_ms = cost.bytes / ceil_.copy_bytes_per_s * 1e3;
    r->compute_floor_ms = cost.flops / ceil_.gemm_flops * 1e3;
    r->floor_ms = std::max(r->mem_floor_ms, r->compute_floor_ms);
  }

  // Decode at `ctx` (context after the step) for `batch` sequences; false when the KV pool
  // cannot hold them.
  bool Decode(int batch, int ctx, const std::string& mode, Row* r) {
    alloc_.Reset();
    ForwardBatch b;
    std::mt19937 rng(batch * 1000 + ctx);
    for (int s = 0; s < batch; ++s) {
      absl::StatusOr<std::vector<int32_t>> blocks =
          alloc_.Allocate(KvBlockAllocator::BlocksFor(ctx));
      if (!blocks.ok()) return false;
      b.token_ids.push_back(static_cast<int32_t>(rng() % shape_.V));
      b.positions.push_back(ctx - 1);
      b.seqs.push_back({.num_new_tokens = 1,
                        .context_len = ctx,
                        .block_table = *blocks,
                        .adapter_index = AdapterOf(s)});
      b.logit_rows.push_back(s);
    }
    // ForwardView, as the server's batch engine calls it (logits left in the pinned buffer);
    // "copy" mode times Forward, which copies them into a std::vector.
    // "greedy" mode times ForwardGreedy with every row marked, as the batch engine calls it for
    // greedy requests: the argmax and logprob on the device, only those pairs downloaded.
    const bool greedy = mode.rfind("greedy", 0) == 0;
    if (greedy) b.greedy_rows.assign(batch, 1);
    std::vector<float> copied;
    absl::Span<const float> logits;
    absl::Span<const GreedyPick> picks;
    auto step = [&] {
      if (mode == "copy") {
        BENCH_OK(m_.Forward(b, &copied));
        logits = absl::MakeConstSpan(copied);
      } else if (greedy) {
        BENCH_OK(m_.ForwardGreedy(b, &logits, &picks));
      } else {
        BENCH_OK(m_.ForwardView(b, &logits));
      }
    };
    for (int i = 0; i < 3; ++i) step();  // first: eager + capture
    std::vector<double> host, dev, graph_ms, tail_ms;
    // Graph activity during the timed steps: every step should be one replay and no capture.
    const int64_t replays0 = m_.decode_graph_replays() + m_.lora_decode_graph_replays();
    const int64_t captures0 = m_.decode_graph_captures() + m_.lora_decode_graph_captures();
    const int64_t beside0 = m_.lora_beside_decode_steps();
    // The timed steps as an NVTX range "decode-<mode>" (ncu --nvtx --nvtx-include picks them).
    const std::string range = absl::StrFormat("decode-%s", absl::StrReplaceAll(mode, {{" ", "-"}}));
    nvtxRangePushA(range.c_str());
    for (int i = 0; i < steps_; ++i) {
      const auto t0 = Clock::now();
      step();
      host.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      dev.push_back(m_.last_step_device_ms());
      graph_ms.push_back(m_.last_step_phases().graph_ms);
      tail_ms.push_back(m_.last_step_phases().tail_ms);
    }
    nvtxRangePop();
    if (print_steps_ > 0) {  // --print-steps N: device ms of each N timed steps (clock drift)
      std::string line;
      for (size_t i = 0; i < dev.size(); i += print_steps_) {
        const size_t end = std::min(dev.size(), i + print_steps_);
        double sum = 0;
        for (size_t j = i; j < end; ++j) sum += dev[j];
        line += absl::StrFormat(" %.3f", sum / static_cast<double>(end - i));
      }
      std::printf("steps %s b%d ctx%d, device ms per %d steps:%s\n", mode.c_str(), batch, ctx,
                  print_steps_, line.c_str());
    }
    // --trace-csv: two more steps' kernels (labelled with the mode, the batch, the context and the
    // LoRA decode tuning).
    KernelTrace::Window(
        absl::StrFormat("%s b%d ctx%d %s", mode, batch, ctx, m_.lora_decode_tuning()), [&] {
          for (int i = 0; i < 2; ++i) step();
          BENCH_CHECK(DeviceSynchronize() == 0, "trace sync");
        });
    BENCH_CHECK(logits.size() == static_cast<size_t>(batch) * shape_.V, "decode logits size");
    if (greedy) {  // the marked rows' logits are not downloaded: check the picks instead
      BENCH_CHECK(picks.size() == static_cast<size_t>(batch), "greedy picks size");
      for (const GreedyPick& p : picks) {
        BENCH_CHECK(p.id >= 0 && p.id < shape_.V && std::isfinite(p.logprob) && p.logprob <= 0,
                    "greedy pick in range");
      }
    } else {
      for (float x : logits) BENCH_CHECK(std::isfinite(x), "finite decode logits");
    }
    r->kind = "decode";
    r->mode = mode;
    r->batch = batch;
    r->context = ctx;
    r->ms = Median(host);
    r->device_ms = Median(dev);
    r->note.clear();
    if (Median(graph_ms) > 0) {  // --step-phases (CudaPhiModel::set_step_phase_timing)
      r->note = absl::StrFormat("phases us: graph %.2f, tail %.2f, rest %.2f; ",
                                Median(graph_ms) * 1e3, Median(tail_ms) * 1e3,
                                (r->device_ms - Median(graph_ms) - Median(tail_ms)) * 1e3);
    }
    Floors(DecodeCost(shape_, batch, ctx), r);
    r->note += absl::StrFormat("splits<=%d", m_.last_decode_splits());
    if (m_.lora_beside_decode_steps() > beside0) r->note += "; LoRA beside mode";
    const int64_t replays = m_.decode_graph_replays() + m_.lora_decode_graph_replays() - replays0;
    const int64_t captures =
        m_.decode_graph_captures() + m_.lora_decode_graph_captures() - captures0;
    if (mode != "eager" && mode.rfind("eager ", 0) != 0 && (replays != steps_ || captures != 0)) {
      r->note += absl::StrFormat("; graphs: %lld replays, %lld captures in %d steps",
                                 static_cast<long long>(replays), static_cast<long long>(captures),
                                 steps_);
    }
    return true;
  }

  // `seqs` prompts of `len` random tokens (the same ones every call), each its own KV blocks and
  // adapter (set_adapters), the last row of each asked for; false when the KV pool is too small.
  bool PrefillBatch(int seqs, int len, ForwardBatch* out) {
    alloc_.Reset();
    ForwardBatch& b = *out;
    b = ForwardBatch();
    std::mt19937 rng(seqs * 7 + len);
    for (int s = 0; s < seqs; ++s) {
      absl::StatusOr<std::vector<int32_t>> blocks =
          alloc_.Allocate(KvBlockAllocator::BlocksFor(len));
      if (!blocks.ok()) return false;
      for (int i = 0; i < len; ++i) {
        b.token_ids.push_back(static_cast<int32_t>(rng() % shape_.V));
        b.positions.push_back(i);
      }
      b.seqs.push_back({.num_new_tokens = len,
                        .context_len = len,
                        .block_table = *blocks,
                        .adapter_index = AdapterOf(s)});
      b.logit_rows.push_back((s + 1) * len - 1);
    }
    return true;
  }

  // One prefill step as Prefill times it (host clock around Forward, logits copied to the host;
  // the model's device events), no warm-up.
  bool PrefillStep(int seqs, int len, double* host_ms, double* device_ms) {
    ForwardBatch b;
    if (!PrefillBatch(seqs, len, &b)) return false;
    std::vector<float> logits;
    const auto t0 = Clock::now();
    BENCH_OK(m_.Forward(b, &logits));
    *host_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    *device_ms = m_.last_step_device_ms();
    for (float x : logits) BENCH_CHECK(std::isfinite(x), "finite prefill logits");
    return true;
  }

  bool Prefill(int seqs, int len, Row* r) {
    ForwardBatch b;
    if (!PrefillBatch(seqs, len, &b)) return false;
    std::vector<float> logits;
    // Untimed prefills for at least prefill_warmup_ms_ (at least one). The H200 holds its 700 W
    // cap by lowering the SM clock within ~0.3 s of GEMM load (1980 -> 1300-1700 MHz): the first
    // timed 2048-token prefills after one warm-up ran ~19.0 ms, later ones 20.5-21 (pre2 run 2,
    // docs/perf-log.md); after --prefill-warmup-ms 200 they ran at that sustained rate.
    const auto w0 = Clock::now();
    do {
      BENCH_OK(m_.Forward(b, &logits));
    } while (std::chrono::duration<double, std::milli>(Clock::now() - w0).count() <
             prefill_warmup_ms_);
    std::vector<double> host, dev;
    nvtxRangePushA(num_adapters_ > 0 ? "prefill-lora" : "prefill-base");  // as in Decode
    for (int i = 0; i < std::max(3, steps_ / 4); ++i) {
      const auto t0 = Clock::now();
      BENCH_OK(m_.Forward(b, &logits));
      host.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      dev.push_back(m_.last_step_device_ms());
    }
    nvtxRangePop();
    // --trace-csv: one more step's kernels, labelled base / LoRA (with its prefill tuning) and the
    // shape.
    if (KernelTrace::enabled()) {
      KernelTrace::Window(num_adapters_ > 0 ? absl::StrFormat("prefill-lora %dx%d %s", seqs, len,
                                                              m_.lora_prefill_tuning())
                                            : absl::StrFormat("prefill-base %dx%d", seqs, len),
                          [&] {
                            BENCH_OK(m_.Forward(b, &logits));
                            BENCH_CHECK(DeviceSynchronize() == 0, "trace sync");
                          });
    }
    for (float x : logits) BENCH_CHECK(std::isfinite(x), "finite prefill logits");
    r->kind = "prefill";
    r->mode = "eager";
    r->batch = seqs;
    r->tokens = len;
    r->ms = Median(host);
    r->device_ms = Median(dev);
    Floors(PrefillCost(shape_, seqs, len), r);
    const double tflops = PrefillCost(shape_, seqs, len).flops / (r->ms * 1e-3) / 1e12;
    r->note = absl::StrFormat("%.0f TFLOP/s; device ms per step:", tflops);
    for (double d : dev) absl::StrAppendFormat(&r->note, " %.2f", d);
    return true;
  }

  void set_prefill_warmup_ms(double ms) { prefill_warmup_ms_ = ms; }
  void set_print_steps(int every) { print_steps_ = every; }

  // Sequence s uses adapter index first + s % count (count 0: every sequence the base model).
  void set_adapters(uint32_t first, int count) {
    first_adapter_ = first;
    num_adapters_ = count;
  }

 private:
  uint32_t AdapterOf(int s) const {
    return num_adapters_ > 0 ? first_adapter_ + static_cast<uint32_t>(s % num_adapters_) : 0;
  }
  uint32_t first_adapter_ = 0;
  int num_adapters_ = 0;
  CudaPhiModel& m_;
  Ceilings ceil_;
  Shape shape_;
  int steps_;
  int print_steps_ = 0;
  double prefill_warmup_ms_ = 0;
  KvBlockAllocator alloc_;
};

inline void PrintRow(const Row& r) {
  const std::string what = r.kind == "decode"
                               ? absl::StrFormat("decode %s b%d ctx%d", r.mode, r.batch, r.context)
                               : absl::StrFormat("prefill %dx%d", r.batch, r.tokens);
  std::printf(
      "%-34s %9.3f %9.3f %9.3f %6.2f %6.2f %10.0f  %s\n", what.c_str(), r.ms, r.device_ms,
      r.floor_ms, r.ms / r.floor_ms, r.device_ms / r.floor_ms,
      r.kind == "decode" ? r.batch / (r.ms * 1e-3) : r.batch * r.tokens / (r.ms * 1e-3),
      (std::string(r.mem_floor_ms >= r.compute_floor_ms ? "mem" : "flop") + "-bound; " + r.note)
          .c_str());
}

}  // namespace bench
}  // namespace phishard
