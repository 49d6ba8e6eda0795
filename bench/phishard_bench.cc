// phishard_bench: decode and prefill step times of a Phi-shaped model with random weights made on
// the GPU (no checkpoint, no download), next to the hardware floor of each step measured in the
// same run:
//   memory floor  = bytes the step must move (weights once, the K/V it attends to, the logits)
//                   / the device-to-device copy bandwidth (bytes read + written) measured here;
//   compute floor = FLOPs (2 x tokens x linear params, QKᵀ and PV) / a big cuBLASLt bf16 GEMM's
//                   rate measured here;
//   floor = the larger; ratio = measured / floor (1.0 is the hardware, lower is impossible).
// A decode step keeps its context fixed (it rewrites position ctx - 1), with the KV pool filled
// with random K/V instead of prefills. Times are medians over --steps steps: `ms` is what the
// caller of Forward sees (host clock, logits in host memory), `device ms` the device events from
// the inputs' upload to the logits' download.
//
//   phishard_bench [--json out.json] [--config config.json] [--layers 32] [--steps 20] [--quick]
//   [--trace-csv out.csv]
// --trace-csv writes every kernel of two extra steps per decode case and one per prefill case
// (labels "prefill-base SxL" / "prefill-lora SxL"; start / end, stream, grid; CUDA graphs
// included) from CUPTI (bench/kernel_trace.h): what overlapped with what. Timings
// of a traced run read ~5-7 % slower (per-kernel timestamps cost a little).
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/types/span.h"
#include "bench/attn_variant_sweep.h"
#include "bench/bench_ceilings.h"
#include "bench/bench_steps.h"
#include "bench/bench_util.h"
#include "bench/fold_sweep.h"
#include "bench/kernel_trace.h"
#include "bench/lora_pairs.h"
#include "bench/mega_sweep.h"
#include "bench/model_sweeps.h"
#include "bench/setting_sweep.h"
#include "bench/stream_timeline.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/device.h"
#include "model/adapter_registry.h"
#include "model/cuda_gemm_choices.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "model/phi_config.h"
#include "nlohmann/json.hpp"
#include "nvtx3/nvToolsExt.h"

namespace phishard {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

using bench::Median;
using bench::ParseInts;

using bench::Ceilings;
using bench::KernelTimes;
using bench::KernelTrace;
using bench::MeasureCeilings;

using bench::Bench;
using bench::BenchConfig;
using bench::DecodeCost;
using bench::PrefillCost;
using bench::PrintRow;
using bench::RandomAdapter;
using bench::Row;
using bench::RowJson;
using bench::Shape;

int Main(int argc, char** argv) {
  CLI::App app{"phishard_bench: Phi-shaped decode/prefill timings vs the hardware floor"};
  std::string json_path, config_path, batches = "1,8,32,128,256", contexts = "128,1024,4096";
  std::string prefills = "1x512,1x2048,8x2048";
  int layers = 0, steps = 20, mega_sweep = 0;
  double fraction = 0.92;
  bool quick = false, gemv_sweep = true;
  app.add_option("--json", json_path, "also write the results as JSON here");
  app.add_option("--config", config_path,
                 "an HF config.json to take the shape from (default: Phi-2; "
                 "bench/configs/phi-1_5.json is Phi-1.5's)");
  app.add_option("--layers", layers, "decoder layers (default: the config's; Phi-2: 32)");
  app.add_option("--steps", steps, "timed decode steps per case (median)");
  app.add_option("--batches", batches, "decode batch sizes");
  app.add_option("--contexts", contexts, "decode contexts");
  app.add_option("--prefills", prefills, "prefill cases SEQSxLEN");
  app.add_option("--memory-fraction", fraction, "device memory the model may use");
  app.add_flag("--quick", quick, "batches 1,256 at context 1024, prefill 1x2048 only");
  app.add_option("--gemv-sweep", gemv_sweep, "time batches 2-8 with and without the GEMV path");
  bool bulk_sweep = false;
  app.add_option("--bulk-sweep", bulk_sweep,
                 "time batch 1 (and 2-8) with the bulk GEMV: PDL, LayerNorm folded, each MLP "
                 "stream mode");
  int lora_rank = 0, lora_batch = 64, lora_context = 1024;
  std::string lora_prefill = "8x512";
  bool lora_only = false;
  app.add_option("--lora-rank", lora_rank,
                 "also time multi-LoRA steps: every sequence its own random adapter of this rank "
                 "on q,k,v,dense,fc1,fc2 (0 = off)");
  app.add_option("--lora-batch", lora_batch, "decode batch of the LoRA comparison");
  app.add_option("--lora-context", lora_context, "decode context of the LoRA comparison");
  app.add_option("--lora-prefill", lora_prefill, "prefill SEQSxLEN of the LoRA comparison");
  app.add_option("--mega-sweep", mega_sweep,
                 "rounds of decode b1 at contexts 128/1024/4096 with the persistent decode kernel "
                 "off and on");
  std::string mega_tunings = "0.5.0.0,0.4.0.0,0.0.20.0,0.6.20.0,120.0.0.0";
  app.add_option("--mega-tunings", mega_tunings,
                 "the mega sweep's variants at context 1024, BLOCKS.STAGES.KB.PREFETCHKB[.FORM] "
                 "each (0: the kernel's default; prefetch < 0: off; form: kDecodeMegaForm* bits, "
                 "default the kernel's)");
  std::string mega_forms = "-1";
  app.add_option("--mega-forms", mega_forms,
                 "the mega sweep's rounds time the persistent kernel in each of these forms "
                 "(kDecodeMegaForm* bits, -1: its default; FORMsN: with N ring stages)");
  int mega_timeline_form = -1;
  int mega_timeline = 0;
  std::string mega_timeline_pf = "";
  app.add_option("--mega-timeline", mega_timeline,
                 "print the persistent decode kernel's phase timeline over this many layers at b1 "
                 "contexts 128/1024/4096 (0: off)");
  app.add_option("--mega-timeline-pf", mega_timeline_pf,
                 "also the timeline at context 1024 with each of these L2 lookaheads (KiB)");
  app.add_option("--mega-timeline-form", mega_timeline_form,
                 "the kernel form of the timelines (-1: its default)");
  std::string stream_timeline;
  app.add_option("--stream-timeline", stream_timeline,
                 "print the decode stream's per-layer timeline (bench/stream_timeline.h) of a b1 "
                 "graph step at each of these contexts, comma-separated (empty: off)");
  std::string stream_timeline_preload;
  app.add_option("--stream-timeline-preload", stream_timeline_preload,
                 "the timelines with each of these set_decode_stream_preload values (empty: the "
                 "model's)");
  app.add_flag("--lora-only", lora_only, "only the LoRA comparison (and the ceilings)");
  int lora_rounds = 3;
  app.add_option("--lora-rounds", lora_rounds,
                 "base / LoRA alternations of the graph decode (a different adapter per sequence) "
                 "and of the prefill comparison; each round's ratio is printed and the median "
                 "over rounds reported (the SM clock drifts within a process under the power "
                 "cap, so one base-then-LoRA pair carries the drift into its ratio)")
      ->check(CLI::Range(1, 20));
  double prefill_warmup_ms = 0;
  app.add_option("--prefill-warmup-ms", prefill_warmup_ms,
                 "untimed prefills of each case for at least this long first (0: one, as before)");
  bool prefill_only = false;
  app.add_flag("--prefill-only", prefill_only, "only the prefill cases (and the ceilings)");
  std::string prefill_modes;
  app.add_option("--prefill-modes", prefill_modes,
                 "each prefill case once per mode S.L[.F[.G[.A[.E]]]] of this list, in order, in "
                 "one process (S: CudaPhiModel::set_prefill_kv_store, L: set_prefill_last_rows, "
                 "F: set_prefill_mlp_fork, G: set_prefill_gemm_algos or a --gemm-algo-sets index, "
                 "A: set_prefill_attention_tiling 0-4, E: set_prefill_gelu_split; the model's "
                 "default when omitted; repeat modes to alternate them, e.g. 0.0,1.1,0.0,1.1)");
  std::string gemm_algo_sets;
  app.add_option("--gemm-algo-sets", gemm_algo_sets,
                 "'|'-separated sets of recorded cuBLASLt choices (model/cuda_gemm_choices.h "
                 "form, e.g. from phishard_kernel_bench gemm-sustained); a --prefill-modes G of "
                 "1..N then runs set G (CudaPhiModel::set_gemm_algo_choices), 0 the heuristic's "
                 "picks; without this option G = 1 is the model's own choices");
  std::string lora_variants;
  app.add_option("--lora-variants", lora_variants,
                 "after the LoRA comparison, its graph decode again under each tuning, in the "
                 "same process (CudaPhiModel::set_lora_decode_tuning: BRANCH, "
                 "BRANCH:QKV.FC1.FC2.DENSE column blocks, then :PDL, then :BESIDE; e.g. "
                 "1,3:0.0.0.2,3:0.0.0.0:0,3:0.0.0.0:1:0; docs/flags.md has every field; fields a "
                 "spec leaves out keep their start-of-run values); an entry 'base' times the base "
                 "step again and the later entries' % use it; then base again");
  std::string lora_prefill_variants;
  app.add_option(
      "--lora-prefill-variants", lora_prefill_variants,
      "after the LoRA comparison, --lora-rounds more rounds of the LoRA prefill: each "
      "round the base step, then the LoRA step under each tuning of this list, in the "
      "same process (CudaPhiModel::set_lora_prefill_tuning F[:G[:P[:M[:E]]]]: F 1 = q / k / "
      "v deltas before the qkv GEMM, 0 = after; G the gathers' chunks a thread, 8 or 1; "
      "P 1 = the next layer's gathers prefetched; M 1 = the merged q / k / v expand; E 1 = "
      "fc1's delta + GELU as one kernel; e.g. 1:8:1:0,1:8:1:1); medians per tuning");
  int lora_prefill_pairs = 0, lora_prefill_pair_warmup = 3, lora_prefill_pair_repeat = 1;
  std::string lora_prefill_pair_tunings;
  app.add_option("--lora-prefill-pairs", lora_prefill_pairs,
                 "after the LoRA comparison, this many pairs of one base and one LoRA prefill "
                 "step, alternated one step at a time (B L B L ...; both steps of a pair at the "
                 "same clock), per tuning of --lora-prefill-pair-tunings (interleaved: B L1 B L2 "
                 "...); per-pair % of base (median, quartiles, min, max) and the ratio of the "
                 "medians, host and device clocks, in the table and the JSON (0: off)")
      ->check(CLI::Range(0, 1000));
  app.add_option("--lora-prefill-pair-warmup", lora_prefill_pair_warmup,
                 "untimed pairs per tuning before the timed ones")
      ->check(CLI::Range(0, 100));
  app.add_option("--lora-prefill-pair-repeat", lora_prefill_pair_repeat,
                 "steps of each kind a pair runs back to back, the last one timed (1: B L B L; "
                 "2: B B L L ..., what the first step after a switch costs)")
      ->check(CLI::Range(1, 10));
  app.add_option("--lora-prefill-pair-tunings", lora_prefill_pair_tunings,
                 "LoRA prefill tunings of the pairs (CudaPhiModel::set_lora_prefill_tuning, "
                 "comma-separated, e.g. 1:8:1:0,1:8:1:1; empty: the model's own)");
  int attn_variant_rounds = 0, print_steps = 0;
  std::string attn_variant_cases = "256x1024", attn_variants = "2,3", attn_variant_mode = "greedy";
  app.add_option(
      "--attn-variant-rounds", attn_variant_rounds,
      "rounds of the decode cases --attn-variant-cases with each decode attention "
      "kernel of --attn-variants, alternated (CudaPhiModel::set_decode_attention_variant)");
  app.add_option("--attn-variant-cases", attn_variant_cases, "BATCHxCTX decode steps of it");
  app.add_option("--attn-variants", attn_variants,
                 "0 auto, 1 register-staged, 2 pipelined, 3 tensor core, 4 one warp a head "
                 "(the first is the base)");
  app.add_option("--attn-variant-mode", attn_variant_mode, "decode mode (greedy, graph)");
  app.add_option("--print-steps", print_steps,
                 "print the mean device ms of every N timed decode steps (clock drift; 0: off)");
  bool step_phases = false;
  app.add_flag("--step-phases", step_phases,
               "decode rows' notes split the step's device time into the graph, the tail (picks / "
               "download) and the rest (upload, sync), two more event pairs a step "
               "(CudaPhiModel::set_step_phase_timing)");
  int fold_rounds = 0;
  std::string fold_cases = "1x1024,8x1024,32x1024,128x1024,256x1024,1x4096", fold_mode = "greedy";
  app.add_option("--fold-rounds", fold_rounds,
                 "rounds of the decode cases --fold-cases with the decode attention fold off and "
                 "on, alternated (CudaPhiModel::set_decode_attention_fold_rows; 0: none)");
  app.add_option("--fold-cases", fold_cases, "BATCHxCTX decode steps of --fold-rounds");
  app.add_option("--fold-mode", fold_mode, "decode mode of --fold-rounds (greedy, graph)");
  bench::ModelSettingSweeps sweeps;
  sweeps.AddFlags(app);
  std::string trace_csv;
  app.add_option("--trace-csv", trace_csv,
                 "CUPTI kernel timeline of two extra steps after each decode case (graphs "
                 "included; bench/kernel_trace.h) into this CSV");
  CLI11_PARSE(app, argc, argv);
  if (!trace_csv.empty()) BENCH_CHECK(KernelTrace::Enable(trace_csv), "--trace-csv: CUPTI");
  if (lora_only) prefills = lora_prefill;
  const bool no_decode = lora_only || prefill_only;
  // (kv store, last rows, prefill MLP fork, GEMM algorithm choices, attention tiling, GELU split);
  // -1: the model's defaults.
  std::vector<std::array<int, 6>> modes;
  for (absl::string_view mode : absl::StrSplit(prefill_modes, ',', absl::SkipEmpty())) {
    const std::vector<absl::string_view> f = absl::StrSplit(mode, '.');
    BENCH_CHECK(f.size() >= 2 && f.size() <= 6,
                "--prefill-modes S.L[.F[.G[.A[.E]]]],... with 0 or 1 each (G: 0..N, A: 0..4)");
    std::array<int, 6> m4 = {0, 0, -1, -1, -1, -1};
    for (size_t k = 0; k < f.size(); ++k) {
      BENCH_CHECK(
          f[k] == "0" || f[k] == "1" || ((k == 3 || k == 4) && absl::SimpleAtoi(f[k], &m4[k])),
          "--prefill-modes S.L[.F[.G[.A[.E]]]],... with 0 or 1 each (G: 0..N, A: 0..4)");
      if (k < 3 || f[k] == "0" || f[k] == "1") m4[k] = f[k] == "1";
    }
    BENCH_CHECK(m4[4] <= 4, "--prefill-modes: A (attention tiling) must be 0 to 4");
    modes.push_back(m4);
  }
  // --gemm-algo-sets: index 0 = none (the heuristic's picks).
  std::vector<std::vector<GemmAlgoChoice>> algo_sets(1);
  for (absl::string_view set : absl::StrSplit(gemm_algo_sets, '|', absl::SkipEmpty())) {
    absl::StatusOr<std::vector<GemmAlgoChoice>> c =
        ParseGemmAlgoChoices(set, DataType::kBF16, "--gemm-algo-sets");
    BENCH_OK(c.status());
    algo_sets.push_back(*std::move(c));
  }
  for (const auto& m4 : modes) {
    BENCH_CHECK(m4[3] < static_cast<int>(std::max<size_t>(algo_sets.size(), 2)),
                "--prefill-modes: G names no --gemm-algo-sets entry");
  }
  if (modes.empty()) modes.push_back({-1, -1, -1, -1, -1, -1});
  if (quick) {
    batches = "1,256";
    contexts = "1024";
    prefills = "1x2048";
  }

  int count = 0;
  DeviceGetCount(&count);
  BENCH_CHECK(count > 0, "a visible CUDA device");
  DeviceProps props;
  DeviceGetProps(0, &props);
  const Ceilings ceil = MeasureCeilings();
  std::printf(
      "device %s, %d SMs; measured: copy %.2f TB/s (read + write), bf16 GEMM %.0f TFLOP/s\n",
      props.name.c_str(), props.multiprocessors, ceil.copy_bytes_per_s / 1e12,
      ceil.gemm_flops / 1e12);

  const json kernels = no_decode ? json::array() : KernelTimes(ceil);
  const PhiConfig config = BenchConfig(config_path, layers);
  layers = config.num_hidden_layers;
  int max_prefill_tokens = 1;
  std::vector<std::pair<int, int>> prefill_cases;
  for (absl::string_view p : absl::StrSplit(prefills, ',', absl::SkipEmpty())) {
    std::vector<std::string> ab = absl::StrSplit(p, 'x');
    BENCH_CHECK(ab.size() == 2, "--prefills SEQSxLEN");
    prefill_cases.emplace_back(std::stoi(ab[0]), std::stoi(ab[1]));
    max_prefill_tokens =
        std::max(max_prefill_tokens, prefill_cases.back().first * prefill_cases.back().second);
  }
  auto t0 = Clock::now();
  absl::StatusOr<std::unique_ptr<CudaPhiModel>> made = CudaPhiModel::CreateRandom(
      config, {.dtype = "bfloat16", .device = 0, .reserve_tokens = max_prefill_tokens}, 1234);
  BENCH_OK(made.status());
  CudaPhiModel& m = **made;
  const double create_s = std::chrono::duration<double>(Clock::now() - t0).count();
  // LoRA adapters first, so that the KV sizing leaves their budget free (as serve does).
  std::unique_ptr<AdapterRegistry> registry;
  int lora_seqs = 0, lora_len = 0;
  if (lora_rank > 0) {
    std::vector<std::string> ab = absl::StrSplit(lora_prefill, 'x');
    BENCH_CHECK(ab.size() == 2, "--lora-prefill SEQSxLEN");
    lora_seqs = std::stoi(ab[0]);
    lora_len = std::stoi(ab[1]);
    const int n = std::max(lora_batch, lora_seqs);
    t0 = Clock::now();
    const LoraAdapter proto = RandomAdapter(config, lora_rank, 1);
    const int64_t bytes = proto.num_params() * 2;
    absl::StatusOr<std::unique_ptr<AdapterRegistry>> r =
        AdapterRegistry::Create(n, bytes * n + (int64_t{64} << 20), 2);
    BENCH_OK(r.status());
    registry = *std::move(r);
    for (int i = 0; i < n; ++i) {
      BENCH_OK(registry->Load(static_cast<uint32_t>(1 + i), LoraAdapter(proto)).status());
    }
    BENCH_OK(m.SetAdapterRegistry(registry.get()));
    std::printf(
        "lora: %d adapters of rank %d (%.1f MB each in bf16, %.2f GB on the device) made "
        "and placed in %.1f s\n",
        n, lora_rank, bytes / 1e6, m.adapter_device_bytes() / 1e9,
        std::chrono::duration<double>(Clock::now() - t0).count());
  }
  absl::StatusOr<int> blocks = m.MaxKvBlocks(fraction, max_prefill_tokens);
  BENCH_OK(blocks.status());
  BENCH_OK(m.AllocateKvCache(*blocks, kKvBlockSize));
  BENCH_OK(m.FillKvCacheRandom(99));
  size_t free0 = 0, free1 = 0, total = 0;
  DeviceMemGetInfo(&free0, &total);
  t0 = Clock::now();
  BENCH_OK(m.CaptureDecodeGraphs(256));
  const double capture_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  const int num_graphs = m.num_decode_graphs();
  const size_t graph_nodes = m.decode_graph_nodes();
  DeviceMemGetInfo(&free1, &total);
  const double graph_mib = (static_cast<double>(free0) - static_cast<double>(free1)) / (1 << 20);
  m.set_step_timing(true);
  m.set_step_phase_timing(step_phases);

  const int H = config.hidden_size, I = config.intermediate_size, V = config.vocab_size;
  Shape shape;
  const double q_width = 1.0 * config.num_attention_heads * config.head_dim;
  const double kv_width = 1.0 * config.num_key_value_heads * config.head_dim;
  // qkv + dense + fc1 + fc2 of each layer
  shape.linear_params =
      static_cast<double>(layers) * (H * (q_width + 2.0 * kv_width) + q_width * H + 2.0 * H * I);
  shape.lm_head_params = static_cast<double>(V) * H;
  // The embedding is gathered (a row a token), not streamed, unless it is also the LM head.
  shape.weight_bytes =
      static_cast<double>(m.weight_bytes()) - (config.tie_word_embeddings ? 0.0 : 2.0 * V * H);
  shape.kv_bytes_per_token = 2.0 * layers * config.num_key_value_heads * config.head_dim * 2;
  shape.V = V;
  shape.H = H;
  shape.nH = config.num_attention_heads;
  shape.hd = config.head_dim;
  shape.L = layers;
  std::printf(
      "model: %s shape (hidden %d, %d x %d heads, %d kv heads, MLP %d), %d layers, bf16 random "
      "weights %.2f GB (created in %.1f s); KV pool %d "
      "blocks x %d tokens (%.1f GB); %d decode graphs (%zu nodes) captured in %.0f ms, %.1f MiB\n",
      config_path.empty() ? "phi-2" : config_path.c_str(), H, config.num_attention_heads,
      config.head_dim, config.num_key_value_heads, I, layers, m.weight_bytes() / 1e9, create_s,
      m.kv_num_blocks(), kKvBlockSize,
      m.kv_num_blocks() * kKvBlockSize * shape.kv_bytes_per_token / 1e9, num_graphs, graph_nodes,
      capture_ms, graph_mib);

  Bench bench(m, ceil, shape, steps);
  bench.set_prefill_warmup_ms(prefill_warmup_ms);
  bench.set_print_steps(print_steps);
  std::vector<Row> rows;
  std::printf("\n%-34s %9s %9s %9s %6s %6s %10s  %s\n", "step", "ms", "dev ms", "floor", "ratio",
              "dev r", "tok/s", "note");
  for (int ctx : ParseInts(no_decode ? std::string() : contexts)) {
    for (int b : ParseInts(batches)) {
      Row r;
      if (!bench.Decode(b, ctx, "graph", &r)) {
        std::printf("decode b%d ctx%d: skipped, KV pool too small\n", b, ctx);
        continue;
      }
      PrintRow(r);
      rows.push_back(r);
    }
  }
  // The same steps choosing greedily on the device (ForwardGreedy): no logits download.
  for (int ctx : ParseInts(no_decode ? std::string() : contexts)) {
    for (int b : ParseInts(batches)) {
      Row r;
      if (bench.Decode(b, ctx, "greedy", &r)) {
        PrintRow(r);
        rows.push_back(r);
      }
    }
  }
  // GEMVs as programmatic dependents (PDL) at small batches.
  m.set_pdl(!m.pdl());
  for (int b : no_decode ? std::vector<int>{} : std::vector<int>{1, 2, 4}) {
    Row r;
    if (bench.Decode(b, 1024, m.pdl() ? "graph-pdl" : "graph-nopdl", &r)) {
      PrintRow(r);
      rows.push_back(r);
    }
  }
  m.set_pdl(!m.pdl());
  // The logits copied into a std::vector (Forward) instead of viewed (ForwardView).
  for (int b : prefill_only ? std::vector<int>{} : std::vector<int>{256}) {
    Row r;
    if (bench.Decode(b, 1024, "copy", &r)) {
      PrintRow(r);
      rows.push_back(r);
    }
  }
  // The same steps without graphs (same kernels, launched one by one).
  m.set_cuda_graphs(false);
  for (int b : no_decode ? std::vector<int>{} : std::vector<int>{1, 256}) {
    Row r;
    if (bench.Decode(b, 1024, "eager", &r)) {
      PrintRow(r);
      rows.push_back(r);
    }
  }
  m.set_cuda_graphs(true);
  if (gemv_sweep && !quick && !prefill_only) {
    // Where the GEMV belongs (CudaModelOptions gemv_max_rows, gemv_single_segment): on the fused
    // dense + fc2 pair and the LM head only ("gemv-pair") or on every linear layer ("gemv-all"),
    // up to 8 rows, against cuBLASLt alone ("cublas").
    const CudaModelOptions defaults;
    struct Variant {
      const char* name;
      int rows;
      bool all;
    };
    const Variant variants[] = {
        {"cublas", 0, false}, {"gemv-pair", kGemvMaxRows, false}, {"gemv-all", kGemvMaxRows, true}};
    for (const Variant& v : variants) {
      BENCH_OK(m.set_gemv_max_rows(v.rows));
      m.set_gemv_single_segment(v.all);
      for (int b : {1, 2, 4, 8}) {
        Row r;
        if (bench.Decode(b, 1024, v.name, &r)) {
          PrintRow(r);
          rows.push_back(r);
        }
      }
    }
    BENCH_OK(m.set_gemv_max_rows(defaults.gemv_max_rows));
    m.set_gemv_single_segment(defaults.gemv_single_segment);
  }
  if (bulk_sweep && !no_decode) {
    // CudaModelOptions::bulk_gemv_rows / _pdl / _ln and mlp_stream, at context 1024.
    const int rows0 = m.bulk_gemv_rows(), mode0 = m.mlp_stream_mode();
    const bool pdl0 = m.bulk_gemv_pdl(), ln0 = m.bulk_gemv_ln();
    struct Variant {
      int rows, pdl, ln, mode;
      std::vector<int> batches;
    };
    const Variant variants[] = {
        {0, 0, 0, 2, {1}},       {1, 0, 0, 2, {1}},       {1, 1, 0, 2, {1}},
        {1, 1, 1, 2, {1}},       {1, 1, 0, 1, {1}},       {1, 1, 1, 1, {1}},
        {1, 1, 0, 0, {1}},       {1, 0, 0, 1, {1}},       {8, 1, 0, 2, {2, 4, 8}},
        {8, 1, 1, 2, {2, 4, 8}}, {0, 0, 0, 2, {2, 4, 8}}, {0, 0, 0, 2, {1}}};
    for (const Variant& v : variants) {
      BENCH_OK(m.set_bulk_gemv(v.rows, v.pdl != 0, v.ln != 0));
      BENCH_OK(m.set_mlp_stream_mode(v.mode));
      const std::string name =
          absl::StrFormat("bulk r%d pdl%d ln%d mlp%d", v.rows, v.pdl, v.ln, v.mode);
      for (int b : v.batches) {
        Row r;
        if (bench.Decode(b, 1024, name.c_str(), &r)) {
          PrintRow(r);
          rows.push_back(r);
        }
      }
    }
    BENCH_OK(m.set_bulk_gemv(rows0, pdl0, ln0));
    BENCH_OK(m.set_mlp_stream_mode(mode0));
  }
  if (attn_variant_rounds > 0 && !lora_only) {
    bench::AttnVariantSweep(m, bench, attn_variant_cases, attn_variants, attn_variant_mode,
                            attn_variant_rounds, &rows);
  }
  if (fold_rounds > 0 && !lora_only) {
    DecodeFoldSweep(m, bench, fold_cases, fold_mode, fold_rounds, &rows);
  }
  if (!lora_only) sweeps.Run(m, bench, &rows);
  const bench::MegaSweepOptions mega{.rounds = mega_sweep,
                                     .forms = mega_forms,
                                     .tunings = mega_tunings,
                                     .timeline = mega_timeline,
                                     .timeline_pf = mega_timeline_pf,
                                     .timeline_form = mega_timeline_form,
                                     .model_layers = layers};
  if (mega_sweep > 0 && !lora_only) {
    if (const int rc = bench::MegaSweep(m, bench, mega, &rows); rc != 0) return rc;
  }
  if (mega_timeline > 0 && !lora_only) bench::MegaTimeline(m, bench, mega);
  if (!stream_timeline.empty() && !lora_only) {
    const bool on0 = m.decode_stream();
    BENCH_OK(m.set_decode_stream(true));
    const int preload0 = m.decode_stream_preload();
    std::vector<int> preloads = ParseInts(stream_timeline_preload);
    if (preloads.empty()) preloads.push_back(preload0);
    for (int preload : preloads) {
      m.set_decode_stream_preload(preload);
      BENCH_OK(m.set_decode_stream_timeline(true));
      for (int ctx : ParseInts(stream_timeline)) {
        Row r;  // (a step the stream did not take shows as "no block stamped" below)
        if (!bench.Decode(1, ctx, "graph", &r)) continue;
        r.mode += absl::StrFormat(" timeline preload%d", preload);
        PrintRow(r);
        absl::StatusOr<std::vector<uint64_t>> tl = m.decode_stream_timeline();
        BENCH_OK(tl.status());
        std::printf("%s", FormatStreamTimeline(
                              *tl, layers,
                              absl::StrFormat("stream timeline b1 ctx%d preload%d", ctx, preload),
                              r.device_ms)
                              .c_str());
      }
    }
    m.set_decode_stream_preload(preload0);
    BENCH_OK(m.set_decode_stream_timeline(false));
    BENCH_OK(m.set_decode_stream(on0));
  }
  for (auto [seqs, len] : lora_only ? std::vector<std::pair<int, int>>{} : prefill_cases) {
    for (auto [store, last, fork, algos, tiling, gelu_split] : modes) {
      if (store >= 0) {
        m.set_prefill_kv_store(store != 0);
        m.set_prefill_last_rows(last != 0);
        if (fork >= 0) m.set_prefill_mlp_fork(fork != 0);
        if (algos >= 0 && algo_sets.size() > 1) {
          m.set_gemm_algo_choices(algo_sets[algos]);
        } else if (algos >= 0) {
          m.set_prefill_gemm_algos(algos != 0);
        }
        BENCH_OK(m.set_prefill_attention_tiling(std::max(tiling, 0)));
        if (gelu_split >= 0) m.set_prefill_gelu_split(gelu_split != 0);
      }
      Row r;
      if (!bench.Prefill(seqs, len, &r)) {
        std::printf("prefill %dx%d: skipped, KV pool too small\n", seqs, len);
        break;
      }
      if (store >= 0) {
        r.note = absl::StrFormat(
            "kv store %d, last rows %d, mlp fork %d, gemm algos %d (%zu "
            "chosen plans), attention tiling %d, gelu split %d; %s",
            store, last, fork >= 0 ? fork : (m.prefill_mlp_fork() ? 1 : 0),
            algos >= 0 ? algos : (m.prefill_gemm_algos() ? 1 : 0), m.chosen_gemm_plans(),
            std::max(tiling, 0), m.prefill_gelu_split() ? 1 : 0, r.note);
      }
      PrintRow(r);
      rows.push_back(r);
    }
  }

  json pairs_json = json::array();  // --lora-prefill-pairs
  if (registry) {
    // The same steps with every sequence on its own adapter (and all on one), against base-only.
    auto compare = [&](Row base, Row lora, const char* what) {
      lora.note =
          absl::StrFormat("%s; %.1f %% of base throughput (host), %.1f %% (device)", lora.note,
                          100.0 * base.ms / lora.ms, 100.0 * base.device_ms / lora.device_ms);
      PrintRow(lora);
      rows.push_back(lora);
      std::printf("  -> %s: %.1f %% of base-only throughput\n", what, 100.0 * base.ms / lora.ms);
    };
    // Rounds of base then LoRA; the median of the rounds' ratios (host and device).
    auto rounds = [&](const char* what, const std::function<bool(bool, Row*)>& run, Row* base_out,
                      Row* lora_out) {
      std::vector<double> host, dev;
      std::string each;
      for (int i = 0; i < lora_rounds; ++i) {
        Row b, l;
        bench.set_adapters(0, 0);
        BENCH_CHECK(run(false, &b), what);
        PrintRow(b);
        rows.push_back(b);
        BENCH_CHECK(run(true, &l), what);
        compare(b, l, what);
        host.push_back(100.0 * b.ms / l.ms);
        dev.push_back(100.0 * b.device_ms / l.device_ms);
        absl::StrAppendFormat(&each, "%s%.1f", i ? " / " : "", host.back());
        if (i == 0) *base_out = b, *lora_out = l;
      }
      std::printf(
          "  => %s: median %.1f %% of base throughput (host), %.1f %% (device) over %d "
          "alternated rounds (host: %s)\n",
          what, Median(host), Median(dev), lora_rounds, each.c_str());
    };
    Row base, distinct, one, eager_base, eager_lora;
    rounds(
        "decode, a different adapter per sequence",
        [&](bool lora, Row* r) {
          if (lora) bench.set_adapters(1, lora_batch);
          return bench.Decode(lora_batch, lora_context, lora ? "graph lora-each" : "graph base", r);
        },
        &base, &distinct);
    bench.set_adapters(1, 1);
    BENCH_CHECK(bench.Decode(lora_batch, lora_context, "graph lora-one", &one), "lora decode");
    compare(base, one, "decode, one adapter for all");
    if (!lora_variants.empty()) {
      const std::string tuning0 = m.lora_decode_tuning();
      const std::vector<std::string> variants = absl::StrSplit(lora_variants, ',');
      for (const std::string& v : variants) {
        if (v == "base") {  // the base step again, a same-time reference for the next variants
          Row again;
          bench.set_adapters(0, 0);
          BENCH_CHECK(bench.Decode(lora_batch, lora_context, "graph base", &again), "base");
          PrintRow(again);
          rows.push_back(again);
          base = again;  // the later variants' % use it
          continue;
        }
        // Fields a spec leaves out keep their start-of-run values, not the last variant's.
        BENCH_OK(m.set_lora_decode_tuning(tuning0));
        BENCH_OK(m.set_lora_decode_tuning(v));
        std::printf("lora variant %s\n", m.lora_decode_tuning().c_str());
        Row each, all_one;
        bench.set_adapters(1, lora_batch);
        BENCH_CHECK(bench.Decode(lora_batch, lora_context, "graph lora-each", &each), "variant");
        compare(base, each, "decode, a different adapter per sequence");
        bench.set_adapters(1, 1);
        BENCH_CHECK(bench.Decode(lora_batch, lora_context, "graph lora-one", &all_one), "variant");
        compare(base, all_one, "decode, one adapter for all");
      }
      BENCH_OK(m.set_lora_decode_tuning(tuning0));
      Row base2;
      bench.set_adapters(0, 0);
      BENCH_CHECK(bench.Decode(lora_batch, lora_context, "graph base", &base2), "base again");
      PrintRow(base2);
      rows.push_back(base2);
    }
    m.set_cuda_graphs(false);
    bench.set_adapters(0, 0);
    BENCH_CHECK(bench.Decode(lora_batch, lora_context, "eager base", &eager_base), "eager");
    bench.set_adapters(1, lora_batch);
    BENCH_CHECK(bench.Decode(lora_batch, lora_context, "eager lora-each", &eager_lora), "eager");
    compare(eager_base, eager_lora, "eager decode, a different adapter per sequence");
    m.set_cuda_graphs(true);
    Row pbase, plora;
    rounds(
        "prefill, a different adapter per sequence",
        [&](bool lora, Row* r) {
          if (lora) bench.set_adapters(1, lora_seqs);
          if (!bench.Prefill(lora_seqs, lora_len, r)) return false;
          if (lora) r->mode = "lora-each";
          return true;
        },
        &pbase, &plora);
    bench.set_adapters(0, 0);
    if (!lora_prefill_variants.empty()) {
      const std::string tuning0 = m.lora_prefill_tuning();
      const std::vector<std::string> variants = absl::StrSplit(lora_prefill_variants, ',');
      std::vector<std::vector<double>> host(variants.size()), dev(variants.size());
      for (int i = 0; i < lora_rounds; ++i) {
        Row b;
        bench.set_adapters(0, 0);
        BENCH_CHECK(bench.Prefill(lora_seqs, lora_len, &b), "prefill variants: base");
        PrintRow(b);
        rows.push_back(b);
        for (size_t v = 0; v < variants.size(); ++v) {
          BENCH_OK(m.set_lora_prefill_tuning(variants[v]));
          Row l;
          bench.set_adapters(1, lora_seqs);
          BENCH_CHECK(bench.Prefill(lora_seqs, lora_len, &l), "prefill variants: LoRA");
          l.mode = "lora-each tuning " + variants[v];
          compare(b, l, "prefill, a different adapter per sequence");
          host[v].push_back(100.0 * b.ms / l.ms);
          dev[v].push_back(100.0 * b.device_ms / l.device_ms);
        }
      }
      for (size_t v = 0; v < variants.size(); ++v) {
        std::string each;
        for (size_t i = 0; i < host[v].size(); ++i) {
          absl::StrAppendFormat(&each, "%s%.1f", i ? " / " : "", host[v][i]);
        }
        std::printf(
            "  => prefill tuning %s: median %.1f %% of base throughput (host), %.1f %% (device) "
            "over %d rounds (host: %s)\n",
            variants[v].c_str(), Median(host[v]), Median(dev[v]), lora_rounds, each.c_str());
      }
      BENCH_OK(m.set_lora_prefill_tuning(tuning0));
      bench.set_adapters(0, 0);
    }
    if (lora_prefill_pairs > 0) {
      const std::string tuning0 = m.lora_prefill_tuning();
      std::vector<std::string> tunings = absl::StrSplit(lora_prefill_pair_tunings, ',');
      const std::string what = absl::StrFormat("%dx%d", lora_seqs, lora_len);
      const std::vector<bench::PairResult> res = bench::RunLoraPrefillPairs(
          tunings, lora_prefill_pairs, lora_prefill_pair_warmup, lora_prefill_pair_repeat,
          [&](const std::string& t) {
            // Each tuning from the start-of-run one, so fields a spec leaves out do not carry.
            BENCH_OK(m.set_lora_prefill_tuning(tuning0));
            if (!t.empty()) BENCH_OK(m.set_lora_prefill_tuning(t));
          },
          [&](bool lora, double* host_ms, double* device_ms) {
            if (lora) {
              bench.set_adapters(1, lora_seqs);
            } else {
              bench.set_adapters(0, 0);
            }
            BENCH_CHECK(bench.PrefillStep(lora_seqs, lora_len, host_ms, device_ms),
                        "lora prefill pairs: KV pool too small");
          });
      for (const bench::PairResult& r : res) {
        std::printf("%s", bench::FormatPairs(what, r).c_str());
        pairs_json.push_back(bench::PairsJson(what, r));
      }
      BENCH_OK(m.set_lora_prefill_tuning(tuning0));
      bench.set_adapters(0, 0);
    }
  }

  if (!json_path.empty()) {
    json out = {{"device", props.name},
                {"multiprocessors", props.multiprocessors},
                {"copy_tbps", ceil.copy_bytes_per_s / 1e12},
                {"gemm_tflops", ceil.gemm_flops / 1e12},
                {"layers", layers},
                {"weight_gb", m.weight_bytes() / 1e9},
                {"kv_blocks", m.kv_num_blocks()},
                {"graphs", num_graphs},
                {"graph_nodes", graph_nodes},
                {"graph_capture_ms", capture_ms},
                {"graph_mib", graph_mib},
                {"kernels", kernels},
                {"rows", json::array()}};
    for (const Row& r : rows) out["rows"].push_back(RowJson(r));
    if (!pairs_json.empty()) out["lora_prefill_pairs"] = pairs_json;
    std::ofstream f(json_path);
    f << out.dump(1) << "\n";
    BENCH_CHECK(f.good(), "writing --json");
  }
  return 0;
}

}  // namespace
}  // namespace phishard

int main(int argc, char** argv) { return phishard::Main(argc, argv); }
