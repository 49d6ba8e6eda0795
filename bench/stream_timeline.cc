#include "bench/stream_timeline.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_format.h"
#include "kernels/cuda/decode_stream_cuda.h"
#include "kernels/cuda/paged_decode_cuda.h"
#include "model/cuda_phi_model.h"

namespace phishard {
namespace {

struct Stat {
  double min = 0, med = 0, max = 0;
  int n = 0;
};

Stat Of(std::vector<double> v) {
  Stat s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  s.min = v.front();
  s.max = v.back();
  s.med = v[v.size() / 2];
  s.n = static_cast<int>(v.size());
  return s;
}

// Sums of Stat over layers (for the mean over layers).
struct Acc {
  double min = 0, med = 0, max = 0, n = 0;
  int layers = 0;
  void Add(const Stat& s) {
    if (s.n == 0) return;
    min += s.min, med += s.med, max += s.max, n += s.n;
    ++layers;
  }
  std::string Row(const char* name) const {
    if (layers == 0) return absl::StrFormat("| %s | - | - | - | 0 |\n", name);
    return absl::StrFormat("| %s | %.2f | %.2f | %.2f | %.0f |\n", name, min / layers, med / layers,
                           max / layers, n / layers);
  }
};

// The step's ends (see the header): layer 0 from its first block's start, the LM head row
// from the last layer's last flush, and the span against the step's device time.
std::string FormatStepEnds(const std::vector<uint64_t>& words, int layers, size_t per_layer,
                           double period_us, double step_device_ms) {
  const int SB = CudaPhiModel::kStreamTimelineBlocks, SE = kDecodeStreamTimelineEvents;
  // min (first) / max (last) of event e over layer row l's stream blocks; 0 when none stamped.
  auto first_last = [&](int l, int e, bool last) {
    uint64_t t = 0;
    for (int b = 0; b < SB; ++b) {
      const uint64_t v = words[l * per_layer + static_cast<size_t>(b) * SE + e];
      if (v != 0 && (t == 0 || (last ? v > t : v < t))) t = v;
    }
    return t;
  };
  const uint64_t t0 = first_last(0, kTlStart, false);
  const uint64_t l0_fold = first_last(0, kTlFolded, true), l0_end = first_last(0, kTlFlushed, true);
  const uint64_t last_end = first_last(layers - 1, kTlFlushed, true);
  if (t0 == 0 || l0_end == 0 || last_end == 0) return "";
  auto us = [](uint64_t a, uint64_t b) { return (static_cast<double>(b) - a) / 1e3; };
  std::string out = absl::StrFormat(
      "\nstep ends (us): layer 0 first start -> last fold %.2f, -> last flush %.2f (steady "
      "period %.2f); layers 0..%d span %.2f (%d x period %.2f)\n",
      us(t0, l0_fold), us(t0, l0_end), period_us, layers - 1, us(t0, last_end), layers,
      layers * period_us);
  uint64_t end = last_end;
  const bool head = words.size() >= per_layer * (layers + 1) && first_last(layers, kTlStart, false);
  if (head) {
    const uint64_t h_start = first_last(layers, kTlStart, false);
    const uint64_t h_fold = first_last(layers, kTlFolded, true);
    const uint64_t h_items = first_last(layers, kTlItemsDone, true);
    end = first_last(layers, kTlFlushed, true);
    out += absl::StrFormat(
        "LM head (us from the last layer's last flush): first start %.2f, last fold %.2f, last "
        "item %.2f, last flush %.2f\n",
        us(last_end, h_start), us(last_end, h_fold), us(last_end, h_items), us(last_end, end));
  }
  if (step_device_ms > 0) {
    const double span = us(t0, end);
    out += absl::StrFormat(
        "stream kernels' span %.2f us of the step's %.2f us device time: %.2f us outside them "
        "(upload, embedding, zeroing, %spicks / download, the gaps between)\n",
        span, step_device_ms * 1e3, step_device_ms * 1e3 - span,
        head ? "" : "the fold after the last layer, the LM head, ");
  }
  return out;
}

}  // namespace

std::string FormatStreamTimeline(const std::vector<uint64_t>& words, int layers,
                                 const std::string& title, double step_device_ms) {
  const int SB = CudaPhiModel::kStreamTimelineBlocks, AB = CudaPhiModel::kStreamTimelineAttnBlocks;
  const int SE = kDecodeStreamTimelineEvents, AE = kPagedDecodeTimelineEvents;
  const size_t per_layer = static_cast<size_t>(SB) * SE + static_cast<size_t>(AB) * AE;
  if (layers < 3 || words.size() < per_layer * layers) {
    return title + ": no timeline (needs >= 3 layers)\n";
  }
  auto srow = [&](int l, int b) {
    return words.data() + l * per_layer + static_cast<size_t>(b) * SE;
  };
  auto arow = [&](int l, int b) {
    return words.data() + l * per_layer + static_cast<size_t>(SB) * SE +
           static_cast<size_t>(b) * AE;
  };
  // The reference of layer l: the last kTlFlushed of layer l - 1.
  auto last_flush = [&](int l) {
    uint64_t t = 0;
    for (int b = 0; b < SB; ++b) t = std::max(t, srow(l, b)[kTlFlushed]);
    return t;
  };
  static const std::pair<int, const char*> kStreamEvents[] = {
      {kTlStart, "stream block start"},
      {kTlFolded, "stream fold + LayerNorm done"},
      {kTlQkvOut, "stream block's q/k/v rows published"},
      {kTlDenseWait, "stream dense wait begins"},
      {kTlDenseGo, "stream dense wait ends"},
      {kTlProducerEnd, "stream producer's last item taken"},
      {kTlItemsDone, "stream consumers' items done"},
      {kTlFlushed, "stream block flushed"},
  };
  static const std::pair<int, const char*> kAttnEvents[] = {
      {kAttnTlStart, "attention block start"},
      {kAttnTlReady, "attention q/k/v ready seen"},
      {kAttnTlKeysDone, "attention keys done"},
      {kAttnTlEnd, "attention block end (stored, counted)"},
  };
  Acc stream_acc[8], attn_acc[4], dense_wait, period, qkv_to_heads, heads_to_dense;
  int stamped = 0;
  for (int l = 1; l + 1 < layers; ++l) {
    const uint64_t ref = last_flush(l - 1);
    if (ref == 0) continue;
    ++stamped;
    auto rel = [&](uint64_t t) {
      return (static_cast<double>(t) - static_cast<double>(ref)) / 1e3;
    };
    for (int i = 0; i < 8; ++i) {
      std::vector<double> v;
      for (int b = 0; b < SB; ++b) {
        const uint64_t t = srow(l, b)[kStreamEvents[i].first];
        if (t != 0) v.push_back(rel(t));
      }
      stream_acc[i].Add(Of(v));
    }
    double heads_end = 0, qkv_end = 0, first_dense = 1e30;
    for (int i = 0; i < 4; ++i) {
      std::vector<double> v;
      for (int b = 0; b < AB; ++b) {
        const uint64_t t = arow(l, b)[kAttnEvents[i].first];
        if (t != 0) v.push_back(rel(t));
      }
      const Stat s = Of(v);
      attn_acc[i].Add(s);
      if (kAttnEvents[i].first == kAttnTlEnd && s.n > 0) heads_end = s.max;
    }
    std::vector<double> waits;
    for (int b = 0; b < SB; ++b) {
      const uint64_t* r = srow(l, b);
      if (r[kTlQkvOut] != 0) qkv_end = std::max(qkv_end, rel(r[kTlQkvOut]));
      if (r[kTlDenseWait] != 0 && r[kTlDenseGo] != 0) {
        waits.push_back((static_cast<double>(r[kTlDenseGo]) - r[kTlDenseWait]) / 1e3);
        first_dense = std::min(first_dense, rel(r[kTlDenseWait]));
      }
    }
    dense_wait.Add(Of(waits));
    Stat p;
    p.n = 1;
    p.min = p.med = p.max = (static_cast<double>(last_flush(l)) - ref) / 1e3;
    period.Add(p);
    Stat q;
    q.n = 1;
    q.min = q.med = q.max = heads_end - qkv_end;
    qkv_to_heads.Add(q);
    if (first_dense < 1e30) {
      Stat d;
      d.n = 1;
      d.min = d.med = d.max = first_dense - heads_end;
      heads_to_dense.Add(d);
    }
  }
  if (stamped == 0) return title + ": no block stamped (was the stream path taken?)\n";
  std::string out = absl::StrFormat(
      "\n%s: us from the layer before's last flush, min / median / max over blocks, mean over "
      "layers 1..%d\n\n| event | min | median | max | blocks |\n|---|---|---|---|---|\n",
      title, layers - 2);
  for (int i = 0; i < 8; ++i) out += stream_acc[i].Row(kStreamEvents[i].second);
  for (int i = 0; i < 4; ++i) out += attn_acc[i].Row(kAttnEvents[i].second);
  out += dense_wait.Row("dense wait (duration, us)");
  out += period.Row("layer period (last flush to last flush)");
  out += qkv_to_heads.Row("last q/k/v publish -> last attention end");
  out += heads_to_dense.Row("last attention end -> first dense wait (< 0: dense waited)");
  out += FormatStepEnds(words, layers, per_layer, period.med / period.layers, step_device_ms);
  return out;
}

}  // namespace phishard
