// NextTokenChooser: per-request token selection of spec §5.2–5.6, one logits row at a time.
// Each request owns its chooser (parameters + its own RNG), so the token a request gets depends
// only on its own logits, history and seed — never on the other requests of the batch, on the
// rank, or on how batches were filtered or concatenated (the RNG state travels with the request;
// upstream's re-seeding on concatenation [QUIRK §4.9] is not reproduced).
//
// Processing order (§5.2), each step applied only to a request whose parameter is non-neutral:
//   watermark → repetition penalty → frequency/presence penalty → (schema: rejected upstream of
//   here) → temperature → top-k → top-p → typical-p → greedy argmax or categorical sample →
//   logprob = log_softmax(processed scores)[chosen] (§5.5).
// Temperature 0 means greedy: the request never samples and the sampling warpers (temperature,
// top-k, top-p, typical-p) are skipped, so it cannot hit upstream's divide-by-zero [QUIRK §5.3].
#pragma once

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "server/batch_types.h"

namespace phishard {

// xoshiro256** (Blackman & Vigna, 2018) seeded through splitmix64: a fixed, portable generator,
// so a seed yields the same stream on every rank, compiler and run. (std:: distributions are
// implementation-defined and are deliberately not used.)
class PortableRng {
 public:
  explicit PortableRng(uint64_t seed);
  uint64_t Next();
  // Uniform double in [0, 1) from the top 53 bits of one Next().
  double Uniform01();
  // Uniform integer in [0, n), n > 0, unbiased (Lemire's multiply-and-reject).
  uint64_t UniformInt(uint64_t n);

 private:
  uint64_t s_[4];
};

// "A Watermark for LLMs" (Kirchenbauer et al.) constants; spec §5.3 defaults. The service reads
// WATERMARK_GAMMA / WATERMARK_DELTA once at startup, never in the hot path.
struct WatermarkParams {
  double gamma = 0.5;  // fraction of the vocabulary on the green list
  double delta = 2.0;  // logit bias added to green tokens
};

struct TokenChoice {
  int32_t id = 0;
  float logprob = 0.0f;             // log_softmax(processed scores)[id]
  std::vector<int32_t> alt_ids;     // min(return_k_alternatives, V) best ids, descending logprob
  std::vector<float> alt_logprobs;  // same order; -inf for tokens removed by a warper
};

// Scratch buffers reused across calls (one per engine, not per request: a row is V floats).
struct ChooserWorkspace {
  std::vector<float> scores;     // [V] processed scores
  std::vector<int32_t> order;    // [V] index permutations for sorts
  std::vector<uint32_t> counts;  // [V] token counts for penalties
  std::vector<double> probs;     // [V]
};

class NextTokenChooser {
 public:
  // `params` must already be validated (request_validation.h); vocab_size = logits row width.
  NextTokenChooser(const SamplingParams& params, int vocab_size, WatermarkParams watermark = {});

  // logits: [vocab_size] host float32, the raw model output predicting the next token.
  // history: this request's prompt + generated tokens so far (non-empty, ids in [0, V)).
  // Advances the RNG by exactly one draw when sampling, none when greedy.
  TokenChoice Choose(absl::Span<const float> logits, absl::Span<const int32_t> history,
                     ChooserWorkspace* ws);

  // True when the request samples (§5.4 auto-enable; never for temperature 0).
  bool sampling() const { return sampling_; }
  // True when Choose reduces to argmax + log_softmax of the raw row: greedy, no logits processor
  // (watermark, repetition / frequency / presence penalty) and no alternatives asked for. Such a
  // choice equals GreedyPickCpu (kernels/greedy_pick.h) on the row, so a backend may make it.
  bool plain_greedy() const {
    return !sampling_ && !params_.watermark && params_.repetition_penalty == 1.0f &&
           params_.frequency_penalty == 0.0f && params_.presence_penalty == 0.0f &&
           params_.return_k_alternatives == 0;
  }
  uint64_t seed() const { return params_.seed; }
  const SamplingParams& params() const { return params_; }

  // Steps of Choose, exposed for tests. Each modifies `scores` ([V]) in place.
  void ApplyWatermark(absl::Span<const int32_t> history, std::vector<float>* scores,
                      std::vector<int32_t>* perm) const;
  void ApplyRepetitionPenalty(absl::Span<const int32_t> history, std::vector<float>* scores,
                              std::vector<uint32_t>* counts) const;
  void ApplyFrequencyPresencePenalty(absl::Span<const int32_t> history, std::vector<float>* scores,
                                     std::vector<uint32_t>* counts) const;
  // scores / temperature (shifted by their max first where that division would leave float32).
  void ApplyTemperature(std::vector<float>* scores) const;
  void ApplyTopK(std::vector<float>* scores, std::vector<int32_t>* order) const;
  void ApplyTopP(std::vector<float>* scores, std::vector<int32_t>* order,
                 std::vector<double>* probs) const;
  void ApplyTypicalP(std::vector<float>* scores, std::vector<int32_t>* order,
                     std::vector<double>* probs) const;

 private:
  SamplingParams params_;
  int vocab_size_;
  WatermarkParams watermark_;
  bool sampling_;
  PortableRng rng_;
};

// Green list of the watermark for a given previous token: the first int(V × gamma) entries of a
// permutation of [0, V) drawn from PortableRng(15485863 × previous_token) (§5.3).
std::vector<int32_t> WatermarkGreenList(int32_t previous_token, int vocab_size, double gamma);

// Numerically stable log-sum-exp over the finite entries (double accumulation); -inf if none.
double LogSumExp(absl::Span<const float> scores);

}  // namespace phishard
