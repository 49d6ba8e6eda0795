#include "server/next_token_chooser.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/logging.h"

namespace phishard {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// NaN sorts below everything so comparators stay strict weak orderings.
float Key(float s) { return std::isnan(s) ? kNegInf : s; }

// A penalty's result `v` from the finite score `s`, held inside float32: valid but extreme
// parameters (a repetition_penalty of 1e-38 divides a positive logit past FLT_MAX, a
// frequency_penalty of -3e38 subtracts past it) would otherwise make +inf scores — an infinite
// logprob, and inf - inf = NaN in a second penalty or the log-sum-exp. At +-FLT_MAX the token is
// still (almost) surely chosen or impossible, as the limit of those parameters has it. A
// non-finite logit (a faulty model) stays as it is, visible.
float Saturated(float s, float v) {
  if (!std::isfinite(s) || std::isfinite(v)) return v;
  return v > 0.0f ? std::numeric_limits<float>::max() : std::numeric_limits<float>::lowest();
}

// The largest finite score; -inf when there is none.
float FiniteMax(absl::Span<const float> scores) {
  float max = kNegInf;
  for (float s : scores) {
    if (std::isfinite(s) && s > max) max = s;
  }
  return max;
}

// Index of the largest score, first index on ties, NaN ignored; 0 if every entry is NaN.
int32_t ArgMax(const std::vector<float>& scores) {
  int32_t best = 0;
  float best_score = kNegInf;
  bool found = false;
  for (size_t i = 0; i < scores.size(); ++i) {
    const float s = scores[i];
    if (std::isnan(s)) continue;
    if (!found || s > best_score) {
      best = static_cast<int32_t>(i);
      best_score = s;
      found = true;
    }
  }
  return best;
}

// Stable ascending order of indices by Key(score) (ties: lower index first). Built as the three
// groups such a sort yields: Key -inf (NaN, -inf) in index order, the finite scores stably sorted,
// +inf in index order; after top-k nearly every score is -inf, so only the survivors are sorted
// (a 51,200-entry stable sort a token was the sampling path's largest cost).
void SortAscending(const std::vector<float>& scores, std::vector<int32_t>* order) {
  const int32_t n = static_cast<int32_t>(scores.size());
  order->clear();
  order->reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    if (Key(scores[i]) == kNegInf) order->push_back(i);
  }
  const size_t first_finite = order->size();
  for (int32_t i = 0; i < n; ++i) {
    if (std::isfinite(scores[i])) order->push_back(i);
  }
  std::stable_sort(order->begin() + first_finite, order->end(),
                   [&](int32_t a, int32_t b) { return scores[a] < scores[b]; });
  for (int32_t i = 0; i < n; ++i) {
    if (scores[i] == std::numeric_limits<float>::infinity()) order->push_back(i);
  }
}

// probs[i] = softmax(scores)[i] in double; non-finite scores get probability 0.
void Softmax(const std::vector<float>& scores, std::vector<double>* probs) {
  const double lse = LogSumExp(scores);
  probs->resize(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    const float s = scores[i];
    (*probs)[i] = (std::isfinite(s) && std::isfinite(lse)) ? std::exp(s - lse) : 0.0;
  }
}

}  // namespace

PortableRng::PortableRng(uint64_t seed) {
  uint64_t x = seed;
  for (auto& s : s_) s = SplitMix64(&x);
}

uint64_t PortableRng::Next() {
  const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = Rotl(s_[3], 45);
  return result;
}

double PortableRng::Uniform01() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

uint64_t PortableRng::UniformInt(uint64_t n) {
  PHI_CHECK(n > 0);
  unsigned __int128 m = static_cast<unsigned __int128>(Next()) * n;
  uint64_t low = static_cast<uint64_t>(m);
  if (low < n) {
    const uint64_t threshold = (0 - n) % n;
    while (low < threshold) {
      m = static_cast<unsigned __int128>(Next()) * n;
      low = static_cast<uint64_t>(m);
    }
  }
  return static_cast<uint64_t>(m >> 64);
}

double LogSumExp(absl::Span<const float> scores) {
  const float max = FiniteMax(scores);
  if (!std::isfinite(max)) return -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  for (float s : scores) {
    if (std::isfinite(s)) sum += std::exp(static_cast<double>(s) - max);
  }
  return max + std::log(sum);
}

std::vector<int32_t> WatermarkGreenList(int32_t previous_token, int vocab_size, double gamma) {
  std::vector<int32_t> perm(vocab_size);
  std::iota(perm.begin(), perm.end(), 0);
  const int green = std::clamp(static_cast<int>(vocab_size * gamma), 0, vocab_size);
  // 15485863 is the hash key of the reference implementation; the product wraps mod 2^64.
  PortableRng rng(15485863ULL * static_cast<uint64_t>(static_cast<uint32_t>(previous_token)));
  for (int i = 0; i < green; ++i) {  // partial Fisher–Yates: only the first `green` matter
    const int j = i + static_cast<int>(rng.UniformInt(vocab_size - i));
    std::swap(perm[i], perm[j]);
  }
  perm.resize(green);
  return perm;
}

NextTokenChooser::NextTokenChooser(const SamplingParams& params, int vocab_size,
                                   WatermarkParams watermark)
    : params_(params), vocab_size_(vocab_size), watermark_(watermark), rng_(params.seed) {
  PHI_CHECK(vocab_size > 0);
  const float t = params_.temperature;
  const bool warper = (t != 0.0f && t != 1.0f) || params_.top_k != 0 || params_.top_p < 1.0f ||
                      params_.typical_p < 1.0f;
  // §5.4: sampling is auto-enabled by any warper; temperature 0 is greedy (recommended
  // behaviour instead of upstream's [QUIRK] of sampling at temperature 1).
  sampling_ = t != 0.0f && (params_.do_sample || warper);
}

void NextTokenChooser::ApplyWatermark(absl::Span<const int32_t> history, std::vector<float>* scores,
                                      std::vector<int32_t>* perm) const {
  // Same as WatermarkGreenList, but reusing `perm` (a [V] buffer) for the permutation.
  const int v = vocab_size_;
  perm->resize(v);
  std::iota(perm->begin(), perm->end(), 0);
  const int green = std::clamp(static_cast<int>(v * watermark_.gamma), 0, v);
  PortableRng rng(15485863ULL * static_cast<uint64_t>(static_cast<uint32_t>(history.back())));
  const float delta = static_cast<float>(watermark_.delta);
  for (int i = 0; i < green; ++i) {
    const int j = i + static_cast<int>(rng.UniformInt(v - i));
    std::swap((*perm)[i], (*perm)[j]);
    (*scores)[(*perm)[i]] += delta;
  }
}

void NextTokenChooser::ApplyTemperature(std::vector<float>* scores) const {
  const float t = params_.temperature;
  const float max = FiniteMax(*scores);
  // s / t, as the reference divides. A temperature so small that the largest finite score divided
  // by it leaves float32 (1e-38 against a logit of 10: +inf; or -inf when every score is negative)
  // would drop the most likely token from the draw (non-finite scores are impossible tokens) and
  // report an infinite logprob: there the scores are shifted by their max first, which changes no
  // probability — the largest becomes 0, the others (s - max) / t, -inf past float32 (probability
  // 0, the limit of a vanishing temperature).
  const bool shift = std::isfinite(max) && !std::isfinite(max / t);
  for (float& s : *scores) s = shift ? (s - max) / t : s / t;
}

void NextTokenChooser::ApplyRepetitionPenalty(absl::Span<const int32_t> history,
                                              std::vector<float>* scores,
                                              std::vector<uint32_t>* counts) const {
  // CTRL penalty, once per distinct id of the true history (no padding zeros: [QUIRK §5.1]).
  const float p = params_.repetition_penalty;
  counts->assign(vocab_size_, 0);
  for (int32_t t : history) {
    if ((*counts)[t]) continue;
    (*counts)[t] = 1;
    float& s = (*scores)[t];
    s = Saturated(s, s < 0.0f ? s * p : s / p);
  }
}

void NextTokenChooser::ApplyFrequencyPresencePenalty(absl::Span<const int32_t> history,
                                                     std::vector<float>* scores,
                                                     std::vector<uint32_t>* counts) const {
  // Upstream variant (§5.3): counts over prompt + generated, frequency term divided by the row
  // width L — here the request's true history length instead of the padded batch width.
  counts->assign(vocab_size_, 0);
  for (int32_t t : history) ++(*counts)[t];
  const double length = static_cast<double>(history.size());
  for (int32_t t : history) {
    const uint32_t c = (*counts)[t];
    if (c == 0) continue;  // already penalised
    float& s = (*scores)[t];
    s = Saturated(
        s, s - static_cast<float>(params_.frequency_penalty * c / length + params_.presence_penalty));
    (*counts)[t] = 0;
  }
}

void NextTokenChooser::ApplyTopK(std::vector<float>* scores, std::vector<int32_t>* order) const {
  const int k =
      std::min<int>(static_cast<int>(std::min<uint32_t>(params_.top_k, 1u << 30)), vocab_size_);
  if (k <= 0 || k >= vocab_size_) return;
  order->resize(vocab_size_);
  std::iota(order->begin(), order->end(), 0);
  const std::vector<float>& s = *scores;
  std::nth_element(order->begin(), order->begin() + (k - 1), order->end(),
                   [&](int32_t a, int32_t b) { return Key(s[a]) > Key(s[b]); });
  const float kth = Key(s[(*order)[k - 1]]);
  for (float& x : *scores) {
    if (!(Key(x) >= kth)) x = kNegInf;  // ties with the k-th largest are kept
  }
}

void NextTokenChooser::ApplyTopP(std::vector<float>* scores, std::vector<int32_t>* order,
                                 std::vector<double>* probs) const {
  Softmax(*scores, probs);
  SortAscending(*scores, order);
  const double threshold = 1.0 - static_cast<double>(params_.top_p);
  double cumulative = 0.0;
  // Ascending order: remove while the cumulative mass is <= 1 - top_p; the last (most probable)
  // token is always kept.
  for (int i = 0; i + 1 < vocab_size_; ++i) {
    const int32_t t = (*order)[i];
    cumulative += (*probs)[t];
    if (cumulative <= threshold) (*scores)[t] = kNegInf;
  }
}

void NextTokenChooser::ApplyTypicalP(std::vector<float>* scores, std::vector<int32_t>* order,
                                     std::vector<double>* probs) const {
  const double lse = LogSumExp(*scores);
  if (!std::isfinite(lse)) return;
  const int v = vocab_size_;
  // probs holds -log p for now ("surprise"); entropy H = sum p * surprise.
  probs->resize(v);
  double entropy = 0.0;
  for (int i = 0; i < v; ++i) {
    const float s = (*scores)[i];
    const double surprise = std::isfinite(s) ? lse - s : std::numeric_limits<double>::infinity();
    (*probs)[i] = surprise;
    if (std::isfinite(surprise)) entropy += std::exp(-surprise) * surprise;
  }
  // Sort by |surprise - H| ascending (stable: lower id first on ties).
  std::vector<double> shifted(v);
  for (int i = 0; i < v; ++i) shifted[i] = std::fabs((*probs)[i] - entropy);
  order->resize(v);
  std::iota(order->begin(), order->end(), 0);
  std::stable_sort(order->begin(), order->end(),
                   [&](int32_t a, int32_t b) { return shifted[a] < shifted[b]; });
  // last = number of sorted positions whose cumulative mass is still < typical_p (clamped to
  // V-1); keep every token scoring no worse than the token at `last` (HF TypicalLogitsWarper).
  const double mass = params_.typical_p;
  double cumulative = 0.0;
  int last = 0;
  for (int i = 0; i < v; ++i) {
    const double surprise = (*probs)[(*order)[i]];
    cumulative += std::isfinite(surprise) ? std::exp(-surprise) : 0.0;
    if (cumulative < mass) last = i + 1;
  }
  last = std::min(last, v - 1);
  const double limit = shifted[(*order)[last]];
  for (int i = 1; i < v; ++i) {  // position 0 (min_tokens_to_keep = 1) always stays
    const int32_t t = (*order)[i];
    if (shifted[t] > limit) (*scores)[t] = kNegInf;
  }
}

TokenChoice NextTokenChooser::Choose(absl::Span<const float> logits,
                                     absl::Span<const int32_t> history, ChooserWorkspace* ws) {
  PHI_CHECK(static_cast<int>(logits.size()) == vocab_size_)
      << "logits row has " << logits.size() << " entries, vocab is " << vocab_size_;
  PHI_CHECK(!history.empty());
  std::vector<float>& scores = ws->scores;
  scores.assign(logits.begin(), logits.end());

  if (params_.watermark) ApplyWatermark(history, &scores, &ws->order);
  if (params_.repetition_penalty != 1.0f) ApplyRepetitionPenalty(history, &scores, &ws->counts);
  if (params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f) {
    ApplyFrequencyPresencePenalty(history, &scores, &ws->counts);
  }
  if (sampling_) {
    if (params_.temperature != 1.0f) ApplyTemperature(&scores);
    if (params_.top_k != 0) ApplyTopK(&scores, &ws->order);
    if (params_.top_p < 1.0f) ApplyTopP(&scores, &ws->order, &ws->probs);
    if (params_.typical_p < 1.0f) ApplyTypicalP(&scores, &ws->order, &ws->probs);
  }

  TokenChoice choice;
  const double lse = LogSumExp(scores);
  if (sampling_ && std::isfinite(lse)) {
    // Inverse-CDF categorical draw over softmax(scores), in id order, one uniform per step.
    const double u = rng_.Uniform01();
    double cumulative = 0.0;
    int32_t picked = -1;
    int32_t last_positive = -1;
    for (int i = 0; i < vocab_size_; ++i) {
      const float s = scores[i];
      if (!std::isfinite(s)) continue;
      const double p = std::exp(s - lse);
      if (p <= 0.0) continue;
      last_positive = i;
      cumulative += p;
      if (u < cumulative) {
        picked = i;
        break;
      }
    }
    // Rounding can leave the total mass a hair below 1: fall back to the last possible token.
    choice.id = picked >= 0 ? picked : last_positive;
  } else {
    choice.id = ArgMax(scores);
  }
  choice.logprob = static_cast<float>(scores[choice.id] - lse);

  const int k = static_cast<int>(
      std::min<uint32_t>(params_.return_k_alternatives, static_cast<uint32_t>(vocab_size_)));
  if (k > 0) {
    std::vector<int32_t>& order = ws->order;
    order.resize(vocab_size_);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      const float sa = Key(scores[a]), sb = Key(scores[b]);
      return sa > sb || (sa == sb && a < b);
    });
    choice.alt_ids.assign(order.begin(), order.begin() + k);
    choice.alt_logprobs.reserve(k);
    for (int32_t t : choice.alt_ids) {
      choice.alt_logprobs.push_back(static_cast<float>(scores[t] - lse));
    }
  }
  return choice;
}

}  // namespace phishard
