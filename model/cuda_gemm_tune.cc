// Warm-up tuning of the layers' cuBLASLt GEMMs (CudaPhiModel::set_decode_gemm_tune /
// set_prefill_gemm_tune, CudaModelOptions::decode_gemm_tune_rows / prefill_gemm_tune). cuBLASLt's
// heuristic ranks candidate kernels by a model of the GPU, not by timing, and at some shapes its
// first pick is measurably slower than another candidate (H200, Phi-2: fc2's split-K pick at 256
// rows x1.09 of a non-split one, perf-log 2026-11-30 13:01; fc1 + GELU at 1024 rows x1.16, 13:46).
// So at the first PrepareDecode each layer GEMM form of every decode graph bucket of at least
// gemm_tune_rows_ rows, and of the prefill sizes 512-8192 the arena holds, is timed here on the
// model's own weights and arena: every candidate of CudaGemm::ListAlgos once, then those clearly
// faster than the heuristic's first, in its order, alternated with that first pick
// (model/gemm_tune_rule.h decides). A winner becomes a GemmAlgoChoice for exactly that row count
// (a decode bucket) or for [3/4, 3/2) of it (a prefill size). Everything runs on the model's
// stream before any graph is captured; the arena rows it writes are step scratch.
#ifdef PHISHARD_HAVE_CUDA

#include <algorithm>
#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "kernels/cuda/gemm_cuda.h"
#include "kernels/cuda/random_fill_cuda.h"
#include "model/cuda_graph_runner.h"
#include "model/cuda_phi_internal.h"
#include "model/cuda_phi_model.h"
#include "model/gemm_tune_rule.h"

namespace phishard {
namespace {

using cuda_model::ArenaLayout;
using cuda_model::MakeArenaLayout;

// Wall-clock bound of one tuning: forms not reached by then keep the heuristic's picks.
constexpr double kTuneBudgetS = 5.0;

struct TuneForm {
  const char* name;
  GemmParams p;
};

}  // namespace

absl::Status CudaPhiModel::TuneGemms(int max_batch) {
  // Nothing to tune, or choices switched off (set_prefill_gemm_algos(false): nothing would be
  // installed; a later PrepareDecode tunes once they are on).
  if (gemm_tuned_ || (gemm_tune_rows_ <= 0 && !prefill_tune_) || graphs_ == nullptr ||
      !prefill_gemm_algos_) {
    return absl::OkStatus();
  }
  gemm_tuned_ = true;
  tuned_algos_.clear();
  tuned_forms_ = 0;
  // A failed tuning keeps none of its choices (a later ApplyGemmChoices would install them).
  bool finished = false;
  const absl::Cleanup forget_on_error = [&] {
    if (!finished) tuned_algos_.clear();
  };
  DeviceSet(device_);
  const PhiConfig& c = config_;  // this rank's shapes
  const int H = c.hidden_size, I = c.intermediate_size;
  const int qkv_width = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
  const int attn_width = c.num_attention_heads * c.head_dim;
  const DataType dt = dtype_;
  const GemmEpilogue act =
      c.hidden_act == Activation::kGeluTanh ? GemmEpilogue::kGeluTanh : GemmEpilogue::kGeluErf;
  const ArenaLayout al = MakeArenaLayout(c, arena_tokens_);
  char* a = static_cast<char*>(arena_);
  const Layer& w = layers_[0];  // every layer's GEMMs have these shapes
  // As a base decode step issues them (EnqueueLayers): with fc2 on the MLP stream dense adds to
  // h and fc2 adds (rank 0) or starts the partial, else the other way round. Prefill steps issue
  // the latter; on one GPU both forms are the same (both add), on a rank other than 0 the
  // prefill's dense / fc2 forms differ and their choices are not taken (the heuristic's stay).
  const bool fc2_branch = mlp_mode_ == kMlpStreamFc1Fc2 && (!shard_.sharded() || mlp_sharded_);
  const bool rank_adds = shard_.adds_row_parallel_bias();
  auto form = [&](const char* name, size_t x_off, const void* wt, const void* bias, size_t y_off,
                  int n, int k, bool acc, GemmEpilogue epi) {
    return TuneForm{name, GemmParams{.x = a + x_off,
                                     .w = wt,
                                     .bias = bias,
                                     .y = a + y_off,
                                     .n = n,
                                     .k = k,
                                     .accumulate = acc,
                                     .epilogue = epi,
                                     .dtype = dt}};
  };
  std::vector<TuneForm> forms = {
      form("qkv", al.normed, w.qkv_w, w.qkv_b, al.qkv, qkv_width, H, false, GemmEpilogue::kNone),
      form("fc1", al.normed, w.fc1_w, w.fc1_b, al.mlp, I, H, false, act),
      form("dense", al.attn, w.dense_w, w.dense_b, al.h, H, attn_width, fc2_branch || rank_adds,
           GemmEpilogue::kNone),
      form("fc2", al.mlp, w.fc2_w, w.fc2_b, al.h, H, I, !fc2_branch || rank_adds,
           GemmEpilogue::kNone)};
  // The row counts timed and the rows each one's choice covers: every decode bucket of at least
  // gemm_tune_rows_ rows exactly; a prefill size s, [3 s / 4, 3 s / 2).
  struct Rows {
    int m, min_m, max_m;
  };
  std::vector<Rows> rows;
  for (int b : graphs_->buckets()) {
    if (gemm_tune_rows_ > 0 && b >= gemm_tune_rows_ && b <= max_batch && b <= arena_tokens_) {
      rows.push_back({b, b, b});
    }
  }
  for (int size : {512, 1024, 2048, 4096, 8192}) {
    if (prefill_tune_ && size <= arena_tokens_) {
      rows.push_back({size, size * 3 / 4, size * 3 / 2 - 1});
    }
  }
  if (rows.empty()) return absl::OkStatus();

  // Inputs of unit scale (zeros would time faster than real data), h too (it is accumulated).
  int m_max = 1;
  for (const Rows& r : rows) m_max = std::max(m_max, r.m);
  uint64_t seed = 0x7a11;
  for (const auto& [off, width] :
       {std::pair<size_t, int>{al.normed, H}, {al.attn, attn_width}, {al.mlp, I}, {al.h, H}}) {
    PHI_RETURN_IF_ERROR(KernelResult(RandomFillCuda({.data = a + off,
                                                     .count = static_cast<int64_t>(m_max) * width,
                                                     .spread = 1.0f,
                                                     .seed = ++seed,
                                                     .dtype = dt},
                                                    stream_),
                                     "tuning inputs"));
  }
  DeviceTimer* timer = nullptr;
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceTimerCreate(&timer), "tuning timer"));
  const absl::Cleanup destroy_timer = [timer] { DeviceTimerDestroy(timer); };
  CudaGemm& g = *gemm_;
  absl::Status failed;
  // Mean µs of `reps` back-to-back runs of configuration `cfg` after one untimed run; < 0 when
  // cuBLASLt refuses it for these operands (kInvalidShape) or on a device error (into `failed`).
  auto time = [&](const GemmParams& p, const GemmAlgoConfig& cfg, int reps) -> double {
    KernelStatus st = g.RunAlgo(p, dt, cfg, stream_);
    int err = st == KernelStatus::kOk ? DeviceTimerStart(timer, stream_) : 0;
    for (int i = 0; i < reps && st == KernelStatus::kOk && err == 0; ++i) {
      st = g.RunAlgo(p, dt, cfg, stream_);
    }
    if (st == KernelStatus::kInvalidShape) return -1.0;
    if (st != KernelStatus::kOk) {
      // A launch cuBLASLt refused at run time leaves the device usable (its error is cleared
      // here): skip the candidate. Only one that also fails the stream (a sticky error) ends
      // the tuning.
      const int sync = DeviceStreamSync(stream_);
      DeviceGetLastError();
      if (sync != 0) failed = KernelResult(st, "tuning GEMM");
      return -1.0;
    }
    float ms = 0.0f;
    if (err == 0) err = DeviceTimerStop(timer, stream_);
    if (err == 0) err = DeviceTimerElapsedMs(timer, &ms);
    if (err != 0) {
      failed = DeviceStatus(err, "tuning timer");
      return -1.0;
    }
    return 1e3 * ms / reps;
  };
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> notes;
  for (const Rows& rr : rows) {
    const int m = rr.m;
    for (TuneForm& f : forms) {
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() >
          kTuneBudgetS) {
        notes.push_back(absl::StrFormat("%s m=%d not tuned (time budget)", f.name, m));
        continue;
      }
      GemmParams p = f.p;
      p.m = m;
      std::vector<GemmAlgoConfig> cands;
      if (g.ListAlgos(p, dt, 16, true, &cands) != KernelStatus::kOk || cands.size() < 2) continue;
      ++tuned_forms_;
      // ~0.3 ms a timing: the form's time at 3 TB/s or 500 TFLOP/s, whichever is longer.
      const double bytes = 2.0 * (static_cast<double>(p.n) * p.k + static_cast<double>(m) * p.k);
      const double est_us = std::max(bytes / 3e6, 2.0 * m * p.n * static_cast<double>(p.k) / 5e8);
      const int reps = std::clamp(static_cast<int>(300.0 / std::max(est_us, 1.0)), 3, 50);
      std::vector<double> t1(cands.size());
      for (size_t i = 0; i < cands.size() && failed.ok(); ++i) t1[i] = time(p, cands[i], reps);
      PHI_RETURN_IF_ERROR(failed);
      // Finalists by rank; the first to win every alternation by the margin is kept.
      int pick = -1;
      std::vector<double> won;
      for (int c : GemmTuneFinalists(t1, gemm_tune_margin_)) {
        std::vector<double> ratios;
        for (int r = 0; r < kGemmTuneRounds && failed.ok(); ++r) {
          const double before = time(p, cands[0], reps);
          const double cand = time(p, cands[c], reps);
          const double after = time(p, cands[0], reps);
          if (before > 0 && cand > 0 && after > 0) {
            ratios.push_back(cand / (0.5 * (before + after)));
          }
        }
        PHI_RETURN_IF_ERROR(failed);
        // Every alternation timed (none refused) and won.
        if (static_cast<int>(ratios.size()) == kGemmTuneRounds &&
            GemmTuneWins(ratios, gemm_tune_margin_)) {
          pick = c;
          won = std::move(ratios);
          break;
        }
      }
      if (pick < 0) continue;
      std::sort(won.begin(), won.end());
      const GemmAlgoConfig& cfg = cands[pick];
      tuned_algos_.push_back(
          {.min_m = rr.min_m,
           .max_m = rr.max_m,
           .n = p.n,
           .k = p.k,
           .accumulate = p.accumulate,
           .gelu = p.epilogue == GemmEpilogue::kGeluTanh && g.gelu_tanh_in_epilogue(),
           .bias = p.bias != nullptr,
           .dtype = dt,
           .config = cfg});
      notes.push_back(absl::StrFormat(
          "%s m=%d: candidate %d of %zu, %.3f of the heuristic's pick (algo %d tile %d stages %d "
          "split-k %d cluster %d)",
          f.name, m, pick, cands.size(), won[won.size() / 2], cfg.algo_id, cfg.tile_id,
          cfg.stages_id, cfg.split_k, cfg.cluster_id));
    }
  }
  PHI_RETURN_IF_ERROR(DeviceStatus(DeviceStreamSync(stream_), "tuning"));
  finished = true;
  ApplyGemmChoices();
  Log(LogLevel::kInfo,
      absl::StrFormat("GEMM tuning: %d forms at %zu row counts (decode buckets >= %d rows%s) "
                      "timed in %.2f s, %zu choices%s%s",
                      tuned_forms_, rows.size(), gemm_tune_rows_,
                      prefill_tune_ ? ", prefill sizes the arena holds" : "",
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                      tuned_algos_.size(), notes.empty() ? "" : ": ", absl::StrJoin(notes, "; ")));
  return absl::OkStatus();
}

}  // namespace phishard

#endif  // PHISHARD_HAVE_CUDA
