// config.json parsing (model/phi_config.h ParsePhiConfig) on arbitrary text. Beyond "no crash,
// errors name the file": an accepted config must satisfy every shape invariant the model code
// relies on without re-checking (head_dim x heads = hidden, KV heads divide heads, an even
// rotary_dim in [2, head_dim], positive sizes, finite positive eps and theta).
#include <cmath>
#include <cstdint>
#include <string>

#include "model/phi_config.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  phishard::fuzz::QuietLogs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace phishard;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<PhiConfig> c = ParsePhiConfig(text, "fuzz/config.json");
  if (!c.ok()) {
    FUZZ_CHECK(c.status().message().find("fuzz/config.json") != std::string_view::npos)
        << "error does not name the file: " << c.status();
    return 0;
  }
  FUZZ_CHECK(c->model_type == "phi");
  FUZZ_CHECK(c->hidden_size > 0 && c->num_attention_heads > 0 && c->num_key_value_heads > 0 &&
             c->num_hidden_layers > 0 && c->intermediate_size > 0 && c->vocab_size > 0 &&
             c->max_position_embeddings > 0);
  FUZZ_CHECK(c->head_dim * c->num_attention_heads == c->hidden_size);
  FUZZ_CHECK(c->num_attention_heads % c->num_key_value_heads == 0);
  FUZZ_CHECK(c->rotary_dim >= 2 && c->rotary_dim % 2 == 0 && c->rotary_dim <= c->head_dim);
  FUZZ_CHECK(std::isfinite(c->layer_norm_eps) && c->layer_norm_eps > 0) << c->layer_norm_eps;
  FUZZ_CHECK(std::isfinite(c->rope_theta) && c->rope_theta > 0);
  for (int id : c->eos_token_ids) FUZZ_CHECK(id >= 0);
  return 0;
}
