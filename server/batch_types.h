// Plain structs exchanged between the gRPC layer (server/lorax_service.*, which converts protos)
// and the BatchEngine (server/batch_engine.*, which owns batch state and drives the model).
// They mirror generate.v1 messages field by field so the conversion is mechanical.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace phishard {

// The FAILED_PRECONDITION message of a Prefill before any Warmup: `phishard client generate`
// runs the router's startup first only when a shard answers this (server/client_command.cc).
inline constexpr char kNotWarmedUpMessage[] =
    "KV cache is not allocated: Warmup must succeed first";

struct SamplingParams {
  float temperature = 1.0f;
  uint32_t top_k = 0;
  float top_p = 1.0f;
  float typical_p = 1.0f;
  bool do_sample = false;
  uint64_t seed = 0;
  float repetition_penalty = 1.0f;
  float frequency_penalty = 0.0f;
  float presence_penalty = 0.0f;
  bool watermark = false;
  std::string adapter_id;
  std::optional<std::string> schema;
  uint32_t return_k_alternatives = 0;
};

struct StoppingParams {
  uint32_t max_new_tokens = 20;
  std::vector<std::string> stop_sequences;
  bool ignore_eos_token = false;
};

struct RequestInput {
  uint64_t id = 0;
  std::string inputs;                   // prompt text
  std::vector<int32_t> token_ids;       // tokenized_inputs.ids (empty = tokenize `inputs`)
  uint32_t truncate = 0;
  SamplingParams parameters;
  StoppingParams stopping;
  bool prefill_logprobs = false;
  uint32_t adapter_index = 0;
  std::vector<uint32_t> blocks;  // router blocks: used when present, else the shard allocates
  std::vector<int64_t> slots;
  uint32_t cache_len = 0;
  std::optional<uint32_t> chunk_len;
};

struct BatchInput {
  uint64_t id = 0;
  std::vector<RequestInput> requests;
  uint32_t size = 0;
  uint32_t max_tokens = 0;
  uint32_t max_blocks = 0;
};

struct AlternativeTokensOut {
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
  std::vector<std::string> texts;
};

struct TokensOut {  // generate.v1.NextTokens
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
  std::vector<std::string> texts;                     // always valid UTF-8
  std::vector<bool> is_special;
  std::vector<AlternativeTokensOut> alternative_tokens;
};

enum class FinishReason { kLength = 0, kEosToken = 1, kStopSequence = 2 };

struct GeneratedTextOut {
  std::string text;               // generated part only, valid UTF-8
  uint32_t generated_tokens = 0;
  FinishReason finish_reason = FinishReason::kLength;
  std::optional<uint64_t> seed;   // only for sampled requests
  uint32_t skipped_tokens = 0;
};

struct GenerationOut {
  uint64_t request_id = 0;
  std::optional<TokensOut> prefill_tokens;
  uint32_t prefill_tokens_length = 0;
  TokensOut next_tokens;
  std::optional<GeneratedTextOut> generated_text;
};

struct CachedBatchOut {
  uint64_t id = 0;
  std::vector<uint64_t> request_ids;
  uint32_t size = 0;
  uint32_t max_tokens = 0;
  uint32_t current_tokens = 0;
};

struct StepResult {
  std::vector<GenerationOut> generations;   // only requests this rank owns (id % W == rank)
  std::optional<CachedBatchOut> batch;      // absent when every request stopped
};

}  // namespace phishard
