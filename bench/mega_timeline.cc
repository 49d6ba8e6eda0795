#include "bench/mega_timeline.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdio>

#include "absl/strings/str_format.h"
#include "kernels/cuda/decode_mega_cuda.h"

namespace phishard {
namespace {

// One row of the table: a duration per (block, layer), in cycles, and the barrier whose last
// arriver defines the critical block (0 A, 1 B, 2 C).
struct Phase {
  const char* name;
  int barrier;
  int64_t (*cycles)(const uint64_t* e);
};

int64_t Diff(const uint64_t* e, int to, int from) {
  return static_cast<int64_t>(e[to]) - static_cast<int64_t>(e[from]);
}

}  // namespace

std::string FormatMegaTimeline(const std::vector<uint64_t>& words, int layers, int model_layers,
                               const std::string& title) {
  const int E = kDecodeMegaEvents;
  const size_t per_block = static_cast<size_t>(layers + 1) * E;
  if (layers < 1 || words.size() < per_block) return title + ": no timeline\n";
  const int cap = static_cast<int>(words.size() / per_block);
  std::vector<int> blocks;
  double cyc = 0, ns = 0;  // summed over blocks: cycles and ns of their whole run
  for (int b = 0; b < cap; ++b) {
    const uint64_t* h = words.data() + b * per_block + static_cast<size_t>(layers) * E;
    if (h[4] != 1) continue;
    blocks.push_back(b);
    cyc += static_cast<double>(h[2] - h[0]);
    ns += static_cast<double>(h[3] - h[1]);
  }
  if (blocks.empty() || ns <= 0) return title + ": no block wrote its timeline\n";
  const double ghz = cyc / ns;  // cycles per ns
  auto us = [&](double c) { return c / ghz / 1000.0; };
  // Layers with all three barriers (the model's last layer has no barrier C).
  const int L = layers < model_layers ? layers : model_layers - 1;
  if (L < 1) return title + ": need a layer before the last\n";
  auto ev = [&](int b, int l) { return words.data() + b * per_block + static_cast<size_t>(l) * E; };
  static const Phase kPhases[] = {
      {"LayerNorm (each block, all of h)", 0,
       [](const uint64_t* e) { return Diff(e, kMegaLnEnd, kMegaLayerStart); }},
      {"q/k/v rows + FinishHead", 0,
       [](const uint64_t* e) { return Diff(e, kMegaQkvEnd, kMegaLnEnd); }},
      {"  of which FinishHead", 0,
       [](const uint64_t* e) { return static_cast<int64_t>(e[kMegaFinishHead]); }},
      {"fc1 rows + GELU", 0, [](const uint64_t* e) { return Diff(e, kMegaFc1End, kMegaQkvEnd); }},
      {"  consumer waiting on the ring (qkv+fc1)", 0,
       [](const uint64_t* e) { return static_cast<int64_t>(e[kMegaWaitQkvFc1]); }},
      {"grid barrier A (arrive -> leave)", 0,
       [](const uint64_t* e) { return Diff(e, kMegaBarAEnd, kMegaFc1End); }},
      {"attention items", 1, [](const uint64_t* e) { return Diff(e, kMegaAttnEnd, kMegaBarAEnd); }},
      {"fc2 rows", 1, [](const uint64_t* e) { return Diff(e, kMegaFc2End, kMegaAttnEnd); }},
      {"  consumer waiting on the ring (fc2)", 1,
       [](const uint64_t* e) { return static_cast<int64_t>(e[kMegaWaitFc2]); }},
      {"grid barrier B", 1, [](const uint64_t* e) { return Diff(e, kMegaBarBEnd, kMegaFc2End); }},
      {"dense rows + residual", 2,
       [](const uint64_t* e) { return Diff(e, kMegaDenseEnd, kMegaBarBEnd); }},
      {"  consumer waiting on the ring (dense)", 2,
       [](const uint64_t* e) { return static_cast<int64_t>(e[kMegaWaitDense]); }},
      {"grid barrier C", 2, [](const uint64_t* e) { return Diff(e, kMegaBarCEnd, kMegaDenseEnd); }},
      {"producer blocked, ring full, issuing qkv", -1,
       [](const uint64_t* e) { return static_cast<int64_t>(e[kMegaProdQkv]); }},
      {"producer blocked ... fc1", -1,
       [](const uint64_t* e) { return static_cast<int64_t>(e[kMegaProdFc1]); }},
      {"producer blocked ... fc2", -1,
       [](const uint64_t* e) { return static_cast<int64_t>(e[kMegaProdFc2]); }},
      {"producer blocked ... dense", -1,
       [](const uint64_t* e) { return static_cast<int64_t>(e[kMegaProdDense]); }},
      {"whole layer (start -> barrier C left)", -1,
       [](const uint64_t* e) { return Diff(e, kMegaBarCEnd, kMegaLayerStart); }},
  };
  // Critical block of each (layer, barrier): the one that waited least there (it arrived last).
  static const int kBarrier[3][2] = {
      {kMegaBarAEnd, kMegaFc1End}, {kMegaBarBEnd, kMegaFc2End}, {kMegaBarCEnd, kMegaDenseEnd}};
  std::vector<std::array<int, 3>> critical(L);
  for (int l = 0; l < L; ++l) {
    for (int k = 0; k < 3; ++k) {
      int best = blocks[0];
      int64_t least = INT64_MAX;
      for (int b : blocks) {
        const int64_t w = Diff(ev(b, l), kBarrier[k][0], kBarrier[k][1]);
        if (w < least) least = w, best = b;
      }
      critical[l][k] = best;
    }
  }
  std::string out = absl::StrFormat(
      "%s: %zu blocks, layers 0..%d, SM clock %.3f GHz (clock64 / globaltimer), kernel %.1f us "
      "(block mean)\n",
      title, blocks.size(), L - 1, ghz, ns / blocks.size() / 1000.0);
  out += "| phase | mean us | max us | critical block us |\n|---|---|---|---|\n";
  for (const Phase& ph : kPhases) {
    double sum = 0, mx = 0, crit = 0;
    int n = 0;
    for (int l = 0; l < L; ++l) {
      for (int b : blocks) {
        const double v = static_cast<double>(ph.cycles(ev(b, l)));
        sum += v;
        mx = std::max(mx, v);
        ++n;
      }
      if (ph.barrier >= 0) crit += static_cast<double>(ph.cycles(ev(critical[l][ph.barrier], l)));
    }
    out += absl::StrFormat("| %s | %.2f | %.2f | %s |\n", ph.name, us(sum / n), us(mx),
                           ph.barrier >= 0 ? absl::StrFormat("%.2f", us(crit / L)) : "");
  }
  // Who the critical blocks are: attention items and rows they hold.
  double items_crit_b = 0, items_mean = 0;
  for (int l = 0; l < L; ++l) {
    items_crit_b += static_cast<double>(ev(critical[l][1], l)[kMegaAttnItems]);
    for (int b : blocks) items_mean += static_cast<double>(ev(b, l)[kMegaAttnItems]);
  }
  out += absl::StrFormat(
      "attention items a block: mean %.2f, critical block at B %.2f; critical blocks at A of "
      "layer 0..2: %d %d %d, at B: %d %d %d\n",
      items_mean / (L * blocks.size()), items_crit_b / L, critical[0][0],
      critical[std::min(1, L - 1)][0], critical[std::min(2, L - 1)][0], critical[0][1],
      critical[std::min(1, L - 1)][1], critical[std::min(2, L - 1)][1]);
  return out;
}

}  // namespace phishard
