// phishard_tp_bench: tensor-parallel step times of a Phi-2-shaped model with random weights, one
// process per rank (forked; NCCL between them), for each world size of --tp. Per case it times
// the step as the caller of Forward sees it (host clock, logits in host memory; median of --steps)
// twice: as served, and with every collective skipped (CudaPhiModel::set_tp_skip_collectives:
// wrong logits, same kernels), so `comm %` = 1 - skipped / served is the share of the step spent
// in (and waiting at) the all-reduces and the logits all-gather.
// Decode cases run once per --decode-modes entry, each the way a caller takes the logits:
//   view   ForwardView: logits left in the pinned staging buffer (the server's batch engine for
//          sampled rows, and phishard_bench's "graph" rows);
//   copy   Forward: the same, then copied into a std::vector (the tool's only mode before
//          2026-11-29: at b128 the copy of 26 MB is ~1 ms of host time that no world size shares);
//   greedy ForwardGreedy with every row marked (the engine's plain-greedy rows: token choice on
//          the device, (id, logprob) pairs downloaded).
// Each decode row also gives the device time of the step (CudaPhiModel::set_step_timing: inputs
// upload to logits download), and the timed steps run inside an NVTX range
// "r<rank>-<case>-<served|compute>" (ncu --nvtx --nvtx-include picks one rank's kernels).
//
//   phishard_tp_bench [--tp 1,2] [--batches 1,32,128] [--context 1024] [--decode-modes view]
//                     [--mlp-tp -1]
//                     [--prefills 1x2048,8x2048] [--prefill-chunks 1,2]
//                     [--prefill-min-rows 4096] [--allreduce-modes auto,copy]
//                     [--prefill-forms -1] [--prefill-tilings -1] [--json out.json]
// --prefill-chunks: at W > 1 each prefill case once per value (CudaModelOptions::
// tp_prefill_chunks: 1 = whole, N = N row chunks with overlapped all-reduces); TP=1 runs it whole.
// --allreduce-modes: at W > 1 each prefill case (and chunk count) once per PHISHARD_TP_ALLREDUCE
// value, switched on every rank alike between cases (NcclCommunicator::set_all_reduce_mode); the
// table names the mode after the chunk count. Unset: the environment's mode only. `copy` runs
// only where the step is chunked (whole steps run it exactly as `custom`).
// --prefill-forms: at W > 1 each prefill case once per value, a bit mask of
// CudaPhiModel::set_prefill_sharded_forms: 1 = fc1 on the MLP stream (whole steps), 2 = the
// trimmed last layer (the logit rows only); -1 = as the model was created. TP=1 runs both forms
// (its defaults). The table names it "f<mask>" after the mode.
// --prefill-tilings: every world size runs each prefill case once per value of
// CudaPhiModel::set_prefill_attention_tiling (0 kAuto, 1 kQ128, 2 kQ128Warps8, 3 kWgmma, 4 the
// warp-specialised kWgmmaWs), innermost so the values alternate; -1 = as created. The table names
// it "a<tiling>" after the case (and TP=1's row of the same tiling is the "x TP1" reference).
//   phishard_tp_bench --write-checkpoint DIR [--layers 32] [--tokenizer-dir D]
//     writes a Phi-2-shaped random bf16 checkpoint (config.json, model.safetensors, the
//     tokenizer files of D) for serving tests without a download.
//
// Ranks of world W use GPUs 0..W-1 (cuda:{rank % visible}). At W > 1 each rank's random weights
// are its own (not slices of one model): timings only.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "common/logging.h"
#include "kernels/device.h"
#include "model/cuda_phi_model.h"
#include "model/kv_cache.h"
#include "model/phi_config.h"
#include "model/tp_prefill_split.h"
#include "nlohmann/json.hpp"
#include "nvtx3/nvToolsExt.h"
#include "parallel/nccl_communicator.h"
#include "parallel/rendezvous.h"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

#define TPB_OK(expr)                                                                      \
  do {                                                                                    \
    const absl::Status _st = (expr);                                                      \
    if (!_st.ok()) {                                                                      \
      std::fprintf(stderr, "phishard_tp_bench: %s: %s\n", #expr, _st.ToString().c_str()); \
      std::fflush(stderr);                                                                \
      _exit(1);                                                                           \
    }                                                                                     \
  } while (0)

std::string Phi2ConfigJson(int layers) {
  return absl::StrFormat(
      R"({"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_size": 2560,
  "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": %d,
  "intermediate_size": 10240, "vocab_size": 51200, "partial_rotary_factor": 0.4,
  "rope_theta": 10000.0, "layer_norm_eps": 1e-5, "hidden_act": "gelu_new",
  "max_position_embeddings": 8192, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "bos_token_id": 50256, "eos_token_id": 50256}
)",
      layers);
}

using bench::Median;
using bench::ParseInts;

struct Options {
  std::vector<int> batches;
  std::vector<std::string> decode_modes = {"view"};
  // At W > 1 each decode case once per value: 0 = one stream (the default), 1 / 2 = the MLP
  // branch on its own stream in mode 1 (fc1) / 2 (fc1 + fc2) (CudaModelOptions::
  // mlp_stream_sharded, mlp_stream), joined after attention; 3 / 4 = mode 2 joined before
  // attention, fc2 on the branch / on the main stream (set_mlp_stream_sharded's join 1 / 2).
  // -1: as the model was created (environment).
  std::vector<int> mlp_tp = {-1};
  int context = 1024;
  std::vector<std::pair<int, int>> prefills;
  std::vector<int> prefill_chunks = {kTpPrefillChunksDefault};
  int prefill_min_rows = kTpPrefillMinRowsDefault;
  std::vector<std::string> allreduce_modes;  // empty: leave the communicator's mode alone
  std::vector<int> prefill_forms = {-1};
  std::vector<int> prefill_tilings = {-1};  // set_prefill_attention_tiling, -1 as created
  int steps = 20;
  int layers = 32;
  double fraction = 0.85;
};

struct Timing {
  double host_ms = 0;  // median host-clock time of one call, as its caller sees it
  double dev_ms = 0;   // median device time of its step (0 when the model did not time it)
};

// Times one step call (`mode`: "view", "copy", "greedy", see the header; prefill steps always
// "copy") as the median of `reps` after `warm` untimed calls, the timed ones inside NVTX `range`.
Timing TimeSteps(CudaPhiModel& m, const ForwardBatch& b, const std::string& mode, int warm,
                 int reps, const std::string& range) {
  std::vector<float> copied;
  absl::Span<const float> logits;
  absl::Span<const GreedyPick> picks;
  auto step = [&] {
    if (mode == "view") {
      TPB_OK(m.ForwardView(b, &logits));
    } else if (mode == "greedy") {
      TPB_OK(m.ForwardGreedy(b, &logits, &picks));
    } else {
      TPB_OK(m.Forward(b, &copied));
      logits = absl::MakeConstSpan(copied);
    }
  };
  for (int i = 0; i < warm; ++i) step();
  std::vector<double> ms, dev;
  nvtxRangePushA(range.c_str());
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    step();
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    dev.push_back(m.last_step_device_ms());
  }
  nvtxRangePop();
  for (float x : logits) {
    if (!std::isfinite(x)) {
      std::fprintf(stderr, "phishard_tp_bench: non-finite logits\n");
      _exit(1);
    }
  }
  for (const GreedyPick& p : picks) {
    if (p.id < 0 || !std::isfinite(p.logprob)) {
      std::fprintf(stderr, "phishard_tp_bench: bad greedy pick (%d, %g)\n", p.id, p.logprob);
      _exit(1);
    }
  }
  return {Median(ms), Median(dev)};
}

ForwardBatch DecodeBatch(int batch, int ctx, int vocab) {
  ForwardBatch b;
  std::mt19937 rng(batch * 1000 + ctx);
  const int per = KvBlockAllocator::BlocksFor(ctx);
  for (int s = 0; s < batch; ++s) {
    std::vector<int32_t> table(per);
    for (int i = 0; i < per; ++i) table[i] = s * per + i;
    b.token_ids.push_back(static_cast<int32_t>(rng() % vocab));
    b.positions.push_back(ctx - 1);
    b.seqs.push_back({.num_new_tokens = 1, .context_len = ctx, .block_table = table});
    b.logit_rows.push_back(s);
  }
  b.greedy_rows.assign(batch, 1);  // read by ForwardGreedy only
  return b;
}

ForwardBatch PrefillBatch(int seqs, int len, int vocab) {
  ForwardBatch b;
  std::mt19937 rng(seqs * 7 + len);
  const int per = KvBlockAllocator::BlocksFor(len);
  for (int s = 0; s < seqs; ++s) {
    std::vector<int32_t> table(per);
    for (int i = 0; i < per; ++i) table[i] = s * per + i;
    for (int i = 0; i < len; ++i) {
      b.token_ids.push_back(static_cast<int32_t>(rng() % vocab));
      b.positions.push_back(i);
    }
    b.seqs.push_back({.num_new_tokens = len, .context_len = len, .block_table = table});
    b.logit_rows.push_back((s + 1) * len - 1);
  }
  return b;
}

// One rank of world W: everything on its GPU; rank 0 writes the rows to `out`.
int RankMain(int rank, int world, int port, const Options& o, const std::string& out) {
  SetLogRank(rank);  // the forked rank's own lines say which rank they come from
  int visible = 0;
  DeviceGetCount(&visible);
  if (visible < world) {
    std::fprintf(stderr, "phishard_tp_bench: world %d needs %d GPUs, %d visible\n", world, world,
                 visible);
    return 2;
  }
  std::unique_ptr<ControlChannel> control;
  std::unique_ptr<NcclCommunicator> comm;
  if (world > 1) {
    auto c = Rendezvous({.rank = rank,
                         .world_size = world,
                         .master_addr = "127.0.0.1",
                         .master_port = port,
                         .timeout = absl::Seconds(60)});
    TPB_OK(c.status());
    control = std::move(*c);
    auto n = NcclCommunicator::Create(*control, absl::Seconds(60), absl::Seconds(120));
    TPB_OK(n.status());
    comm = std::move(*n);
  }
  absl::StatusOr<PhiConfig> config = ParsePhiConfig(Phi2ConfigJson(o.layers), "phi-2 shape");
  TPB_OK(config.status());
  int max_tokens = 1, max_batch = 1;
  for (auto [s, l] : o.prefills) max_tokens = std::max(max_tokens, s * l);
  for (int b : o.batches) max_batch = std::max(max_batch, b);
  const auto t0 = Clock::now();
  auto made = CudaPhiModel::CreateRandom(*config,
                                         {.dtype = "bfloat16",
                                          .device = rank % visible,
                                          .reserve_tokens = max_tokens,
                                          .max_graph_batch = max_batch,
                                          .comm = comm.get()},
                                         1234 + rank);
  TPB_OK(made.status());
  CudaPhiModel& m = **made;
  auto blocks = m.MaxKvBlocks(o.fraction, max_tokens);
  TPB_OK(blocks.status());
  TPB_OK(m.AllocateKvCache(*blocks, kKvBlockSize));
  TPB_OK(m.FillKvCacheRandom(99));
  TPB_OK(m.CaptureDecodeGraphs(max_batch));
  const double setup_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const int V = config->vocab_size;

  m.set_step_timing(true);
  json rows = json::array();
  auto both = [&](const ForwardBatch& b, const std::string& mode, int warm, int reps,
                  const std::string& name, json row) {
    // "-compute": the steps without collectives (all of them at W = 1), so one ncu filter
    // (--nvtx-include "r0-<case>-compute/") picks the same kernels at every world size.
    const std::string range = absl::StrFormat("r%d-%s", rank, name);
    const Timing served =
        TimeSteps(m, b, mode, warm, reps, range + (world > 1 ? "-served" : "-compute"));
    Timing skipped = served;
    if (world > 1) {
      m.set_tp_skip_collectives(true);
      skipped = TimeSteps(m, b, mode, warm, reps, range + "-compute");
      m.set_tp_skip_collectives(false);
    }
    row["ms"] = served.host_ms;
    row["dev_ms"] = served.dev_ms;
    row["ms_no_comm"] = skipped.host_ms;
    row["dev_ms_no_comm"] = skipped.dev_ms;
    row["comm_share"] = 1.0 - skipped.host_ms / served.host_ms;
    rows.push_back(row);
  };
  const int mlp_mode0 = m.mlp_stream_mode();
  for (int b : o.batches) {
    const int need = b * KvBlockAllocator::BlocksFor(o.context);
    if (need > m.kv_num_blocks()) continue;
    for (int mlp : world > 1 ? o.mlp_tp : std::vector<int>{-1}) {
      if (mlp >= 0) {
        m.set_mlp_stream_sharded(mlp > 0, mlp >= 3 ? mlp - 2 : 0);
        TPB_OK(m.set_mlp_stream_mode(mlp == 0 ? mlp_mode0 : mlp == 1 ? 1 : 2));
      }
      for (const std::string& mode : o.decode_modes) {
        both(DecodeBatch(b, o.context, V), mode, 3, o.steps,
             absl::StrFormat("b%d-%s-mlp%d", b, mode, mlp),
             {{"kind", "decode"},
              {"batch", b},
              {"context", o.context},
              {"mode", mode},
              {"mlp_tp", mlp}});
      }
    }
  }
  for (auto [s, l] : o.prefills) {
    if (s * KvBlockAllocator::BlocksFor(l) > m.kv_num_blocks()) continue;
    for (int chunks : world > 1 ? o.prefill_chunks : std::vector<int>{1}) {
      TPB_OK(m.set_tp_prefill_chunks(chunks, o.prefill_min_rows));
      const std::vector<std::string> modes = world > 1 && !o.allreduce_modes.empty()
                                                 ? o.allreduce_modes
                                                 : std::vector<std::string>{""};
      const bool chunked = SplitPrefillRows(s * l, chunks, o.prefill_min_rows).size() > 1;
      for (const std::string& mode : modes) {
        if (mode == "copy" && !chunked) continue;  // the same step as `custom`
        if (!mode.empty()) {
          absl::StatusOr<AllReduceMode> parsed = ParseAllReduceMode(mode);
          TPB_OK(parsed.status());
          comm->set_all_reduce_mode(*parsed);
        }
        for (int forms : world > 1 ? o.prefill_forms : std::vector<int>{-1}) {
          if (forms >= 0) m.set_prefill_sharded_forms((forms & 1) != 0, (forms & 2) != 0);
          for (int tiling : o.prefill_tilings) {
            if (tiling >= 0) TPB_OK(m.set_prefill_attention_tiling(tiling));
            both(PrefillBatch(s, l, V), "copy", 1, std::max(3, o.steps / 4),
                 absl::StrFormat("prefill%dx%d-c%d%s%s-f%d-a%d", s, l, chunks,
                                 mode.empty() ? "" : "-", mode, forms, tiling),
                 {{"kind", "prefill"},
                  {"batch", s},
                  {"tokens", l},
                  {"chunks", chunks},
                  {"allreduce", mode},
                  {"forms", forms},
                  {"tiling", tiling}});
            rows.back()["chunks_run"] = m.last_prefill_chunks();
          }
        }
      }
    }
  }
  // Leave together: a rank that exits while its peer is still in a step (a profiled rank runs
  // much slower) would make the peer's abort watch fail that step.
  if (comm != nullptr) TPB_OK(comm->Barrier());
  if (rank == 0) {
    json j = {{"world", world},
              {"setup_s", setup_s},
              {"weight_gb_per_rank", m.weight_bytes() / 1e9},
              {"kv_blocks", m.kv_num_blocks()},
              {"rows", rows}};
    std::ofstream f(out);
    f << j.dump(1) << "\n";
    if (!f.good()) return 1;
  }
  return 0;
}

int RunWorld(int world, const Options& o, const std::string& out) {
  const int port = 29700 + (getpid() % 1000) + world;
  std::vector<pid_t> kids;
  for (int r = 0; r < world; ++r) {
    std::fflush(stdout);
    std::fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) _exit(RankMain(r, world, port, o, out));
    kids.push_back(pid);
  }
  int worst = 0;
  for (pid_t pid : kids) {
    int status = 0;
    waitpid(pid, &status, 0);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code != 0 && worst == 0) {
      worst = code;  // the first failure; the others die of the SIGKILL below
      for (pid_t other : kids) kill(other, SIGKILL);  // a lone rank would wait for its peer
    }
  }
  return worst;
}

// --- random checkpoint ---------------------------------------------------------------------------

uint16_t ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

// Uniform values in center +- spread as bf16, from a counter hash (reproducible, parallel).
void FillRandom(uint16_t* out, size_t n, uint64_t seed, float center, float spread) {
  const unsigned threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([=] {
      for (size_t i = n * t / threads; i < n * (t + 1) / threads; ++i) {
        uint64_t z = seed * 0x9E3779B97F4A7C15ull + i;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = static_cast<float>(z >> 40) / static_cast<float>(1 << 24);  // [0, 1)
        out[i] = ToBF16(center + spread * (2.0f * u - 1.0f));
      }
    });
  }
  for (std::thread& th : pool) th.join();
}

int WriteCheckpoint(const fs::path& dir, int layers, const fs::path& tokenizer_dir) {
  absl::StatusOr<PhiConfig> c = ParsePhiConfig(Phi2ConfigJson(layers), "phi-2 shape");
  TPB_OK(c.status());
  const int64_t H = c->hidden_size, I = c->intermediate_size, V = c->vocab_size;
  struct T {
    std::string name;
    std::vector<int64_t> shape;
    float center, spread;
  };
  const float w = 0.02f * 1.7320508f;  // uniform with std 0.02 (the HF initialiser's)
  std::vector<T> ts = {{"model.embed_tokens.weight", {V, H}, 0, w},
                       {"model.final_layernorm.weight", {H}, 1, 0.1f},
                       {"model.final_layernorm.bias", {H}, 0, 0.01f},
                       {"lm_head.weight", {V, H}, 0, w},
                       {"lm_head.bias", {V}, 0, 0.01f}};
  for (int l = 0; l < layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    ts.push_back({p + "input_layernorm.weight", {H}, 1, 0.1f});
    ts.push_back({p + "input_layernorm.bias", {H}, 0, 0.01f});
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "dense"}) {
      ts.push_back({absl::StrCat(p, "self_attn.", proj, ".weight"), {H, H}, 0, w});
      ts.push_back({absl::StrCat(p, "self_attn.", proj, ".bias"), {H}, 0, 0.01f});
    }
    ts.push_back({p + "mlp.fc1.weight", {I, H}, 0, w});
    ts.push_back({p + "mlp.fc1.bias", {I}, 0, 0.01f});
    ts.push_back({p + "mlp.fc2.weight", {H, I}, 0, w});
    ts.push_back({p + "mlp.fc2.bias", {H}, 0, 0.01f});
  }
  json header = json::object();
  size_t off = 0;
  for (const T& t : ts) {
    size_t n = 1;
    for (int64_t d : t.shape) n *= static_cast<size_t>(d);
    header[t.name] = {{"dtype", "BF16"}, {"shape", t.shape}, {"data_offsets", {off, off + 2 * n}}};
    off += 2 * n;
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  fs::create_directories(dir);
  std::ofstream f(dir / "model.safetensors", std::ios::binary);
  const uint64_t hlen = h.size();
  f.write(reinterpret_cast<const char*>(&hlen), 8);
  f.write(h.data(), static_cast<std::streamsize>(h.size()));
  std::vector<uint16_t> buf;
  for (size_t i = 0; i < ts.size(); ++i) {
    size_t n = 1;
    for (int64_t d : ts[i].shape) n *= static_cast<size_t>(d);
    buf.resize(n);
    FillRandom(buf.data(), n, 77 + i, ts[i].center, ts[i].spread);
    f.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(2 * n));
  }
  std::ofstream(dir / "config.json") << Phi2ConfigJson(layers);
  if (!tokenizer_dir.empty()) {
    for (const auto& e : fs::directory_iterator(tokenizer_dir)) {
      const std::string name = e.path().filename().string();
      if (e.is_regular_file() && name != "config.json" && e.path().extension() == ".json") {
        fs::copy_file(e.path(), dir / e.path().filename(), fs::copy_options::overwrite_existing);
      }
    }
  }
  if (!f.good()) {
    std::fprintf(stderr, "phishard_tp_bench: writing %s failed\n", dir.c_str());
    return 1;
  }
  std::printf("wrote %s: %zu tensors, %.2f GB bf16\n", dir.c_str(), ts.size(), off / 1e9);
  return 0;
}

int Main(int argc, char** argv) {
  CLI::App app{"phishard_tp_bench: tensor-parallel Phi-2-shaped step times (TP=1 vs TP=N)"};
  std::string tp = "1,2", batches = "1,32,128", prefills = "1x2048,8x2048", json_path;
  std::string checkpoint, tokenizer_dir;
  Options o;
  app.add_option("--tp", tp, "world sizes to run, one after the other");
  app.add_option("--batches", batches, "decode batch sizes");
  app.add_option("--context", o.context, "decode context");
  std::string decode_modes = "view";
  app.add_option("--decode-modes", decode_modes,
                 "how decode steps take their logits: view (ForwardView, as the server), copy "
                 "(Forward into a vector), greedy (ForwardGreedy, every row greedy)");
  app.add_option("--prefills", prefills, "prefill cases SEQSxLEN");
  app.add_option("--steps", o.steps, "timed decode steps per case (median)");
  app.add_option("--layers", o.layers, "decoder layers (Phi-2: 32)");
  app.add_option("--memory-fraction", o.fraction, "device memory each rank may use");
  std::string prefill_chunks = absl::StrCat(kTpPrefillChunksDefault);
  app.add_option("--prefill-chunks", prefill_chunks, "tp_prefill_chunks values to time at W > 1");
  std::string mlp_tp = "-1";
  app.add_option("--mlp-tp", mlp_tp,
                 "at W > 1, decode cases once per value: 0 one stream, 1 / 2 the MLP branch on "
                 "its own stream in mode 1 / 2, 3 / 4 mode 2 joined before attention (fc2 on the "
                 "branch / main stream), -1 as created (PHISHARD_MLP_STREAM[_TP])");
  app.add_option("--prefill-min-rows", o.prefill_min_rows, "tp_prefill_min_rows (rows a chunk)");
  std::string allreduce_modes;
  app.add_option("--allreduce-modes", allreduce_modes,
                 "PHISHARD_TP_ALLREDUCE values to time each prefill with at W > 1");
  std::string prefill_forms = "-1";
  app.add_option("--prefill-forms", prefill_forms,
                 "at W > 1, prefill cases once per value: a mask of set_prefill_sharded_forms (1 "
                 "MLP fork, 2 trimmed last layer), -1 as created");
  std::string prefill_tilings = "-1";
  app.add_option("--prefill-tilings", prefill_tilings,
                 "prefill cases once per value, every world size: set_prefill_attention_tiling 0-4 "
                 "(0 kAuto, 4 kWgmmaWs), -1 as created");
  app.add_option("--json", json_path, "also write every world's rows here");
  app.add_option("--write-checkpoint", checkpoint, "write a random checkpoint here and exit");
  app.add_option("--tokenizer-dir", tokenizer_dir, "tokenizer files for --write-checkpoint");
  CLI11_PARSE(app, argc, argv);
  if (!checkpoint.empty()) return WriteCheckpoint(checkpoint, o.layers, tokenizer_dir);
  o.batches = ParseInts(batches);
  o.decode_modes = absl::StrSplit(decode_modes, ',', absl::SkipEmpty());
  for (const std::string& mode : o.decode_modes) {
    if (mode != "view" && mode != "copy" && mode != "greedy") {
      std::fprintf(stderr, "--decode-modes: '%s' is not view, copy or greedy\n", mode.c_str());
      return 2;
    }
  }
  o.prefill_chunks = ParseInts(prefill_chunks);
  for (absl::string_view m : absl::StrSplit(allreduce_modes, ',', absl::SkipEmpty())) {
    if (!ParseAllReduceMode(std::string(m)).ok()) {
      std::fprintf(stderr, "--allreduce-modes: '%s' is not auto, nccl, custom or copy\n",
                   std::string(m).c_str());
      return 2;
    }
    o.allreduce_modes.emplace_back(m);
  }
  o.prefill_forms = ParseInts(prefill_forms);
  for (int v : o.prefill_forms) {
    if (v < -1 || v > 3) {
      std::fprintf(stderr, "--prefill-forms: %d is not in -1..3\n", v);
      return 2;
    }
  }
  o.prefill_tilings = ParseInts(prefill_tilings);
  for (int v : o.prefill_tilings) {
    if (v < -1 || v > 4) {
      std::fprintf(stderr, "--prefill-tilings: %d is not in -1..4\n", v);
      return 2;
    }
  }
  o.mlp_tp = ParseInts(mlp_tp);
  for (int v : o.mlp_tp) {
    if (v < -1 || v > 4) {
      std::fprintf(stderr, "--mlp-tp: %d is not in -1..4\n", v);
      return 2;
    }
  }
  for (absl::string_view p : absl::StrSplit(prefills, ',', absl::SkipEmpty())) {
    std::vector<std::string> ab = absl::StrSplit(p, 'x');
    if (ab.size() != 2) {
      std::fprintf(stderr, "--prefills: '%s' is not SEQSxLEN\n", std::string(p).c_str());
      return 2;
    }
    o.prefills.emplace_back(std::stoi(ab[0]), std::stoi(ab[1]));
  }
  // No CUDA in this process: the ranks are forked children.
  json all = json::array();
  for (int world : ParseInts(tp)) {
    const std::string out = absl::StrCat("/tmp/phishard_tp_bench_", getpid(), "_", world, ".json");
    const auto t0 = Clock::now();
    if (int code = RunWorld(world, o, out); code != 0) {
      std::fprintf(stderr, "phishard_tp_bench: world %d failed (exit %d)\n", world, code);
      return 1;
    }
    std::ifstream in(out);
    json j = json::parse(in);
    std::remove(out.c_str());
    std::printf("TP=%d: ready in %.1f s (weights %.2f GB/rank, %d KV blocks), total %.1f s\n",
                world, j["setup_s"].get<double>(), j["weight_gb_per_rank"].get<double>(),
                j["kv_blocks"].get<int>(),
                std::chrono::duration<double>(Clock::now() - t0).count());
    std::fflush(stdout);
    all.push_back(j);
  }
  // Table: one line per case (prefills once per chunk count), one column group per world size.
  std::printf("\n%-26s", "case");
  for (const json& w : all) {
    std::printf(" | TP=%-2d ms    dev ms  comm%%  x TP1", w["world"].get<int>());
  }
  std::printf("\n");
  std::map<std::string, double> tp1;
  auto key = [](const json& r) {
    return r["kind"] == "decode"
               ? absl::StrFormat("decode b%d ctx%d %s", r["batch"].get<int>(),
                                 r["context"].get<int>(), r["mode"].get<std::string>())
               : absl::StrCat(
                     absl::StrFormat("prefill %dx%d", r["batch"].get<int>(), r["tokens"].get<int>()),
                     r.value("tiling", -1) < 0 ? "" : absl::StrCat(" a", r["tiling"].get<int>()));
  };
  auto line_key = [&](const json& r) {
    if (r["kind"] != "decode") {
      const std::string mode = r.value("allreduce", std::string());
      const int forms = r.value("forms", -1);
      return absl::StrCat(key(r), " c", r["chunks_run"].get<int>(), mode.empty() ? "" : " ", mode,
                          forms < 0 ? "" : absl::StrCat(" f", forms));
    }
    const int mlp = r["mlp_tp"].get<int>();
    return mlp < 0 ? key(r) : absl::StrCat(key(r), " mlp", mlp);
  };
  for (const json& r : all[0]["rows"]) tp1[key(r)] = r["ms"].get<double>();
  std::vector<std::string> lines;
  for (const json& w : all) {
    for (const json& r : w["rows"]) {
      if (std::find(lines.begin(), lines.end(), line_key(r)) == lines.end()) {
        lines.push_back(line_key(r));
      }
    }
  }
  for (const std::string& k : lines) {
    std::printf("%-26s", k.c_str());
    for (const json& w : all) {
      bool found = false;
      for (const json& r : w["rows"]) {
        if (line_key(r) != k || found) continue;
        found = true;
        const double ms = r["ms"].get<double>();
        std::printf(" | %9.3f %8.3f %6.1f %6.2f", ms, r["dev_ms"].get<double>(),
                    100.0 * r["comm_share"].get<double>(),
                    all[0]["world"] == 1 && tp1.count(key(r)) ? tp1[key(r)] / ms : 0.0);
      }
      if (!found) std::printf(" | %9s %8s %6s %6s", "-", "-", "-", "-");
    }
    std::printf("\n");
  }
  std::printf("(prefill cN: ran in N row chunks; comm%% with the chunking kept: exposed comm)\n");
  std::printf("(x TP1 = TP=1 time / this time: speed-up; decode tok/s scale the same way)\n");
  std::printf(
      "(dev ms = device time of the step, inputs upload to logits download; decode modes: "
      "view = ForwardView, copy = Forward, greedy = ForwardGreedy; prefills: copy)\n");
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << json{{"worlds", all}}.dump(1) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace phishard

int main(int argc, char** argv) { return phishard::Main(argc, argv); }
