// adapter_config.json parsing (model/lora_adapter.h ParseLoraAdapterConfig) on arbitrary text,
// then module resolution (user regexes for target_modules / exclude_modules / layers_pattern go
// to PCRE2) over every Phi module name. Properties: errors name the file or field; a resolved
// module has r > 0 and a finite alpha (the scale alpha/r, alpha/sqrt(r) is then finite).
#include <cmath>
#include <cstdint>
#include <string>

#include "model/lora_adapter.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  phishard::fuzz::QuietLogs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace phishard;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<LoraAdapterConfig> c = ParseLoraAdapterConfig(text, "fuzz/adapter_config.json");
  if (!c.ok()) {
    FUZZ_CHECK(!c.status().message().empty());
    return 0;
  }
  FUZZ_CHECK(c->r > 0 && std::isfinite(c->lora_alpha));
  // Three layers are enough to exercise layers_to_transform / layers_pattern.
  for (int layer = 0; layer < 3; ++layer) {
    for (LoraTarget t : kAllLoraTargets) {
      if (t == LoraTarget::kLmHead && layer > 0) continue;
      const std::string name = LoraModuleName(t, layer);
      absl::StatusOr<LoraModuleSpec> spec = ResolveLoraModule(*c, name);
      if (!spec.ok()) {
        FUZZ_CHECK(spec.status().code() == absl::StatusCode::kInvalidArgument) << spec.status();
        return 0;  // a regex that does not compile fails every module alike
      }
      if (spec->targeted) {
        FUZZ_CHECK(spec->r > 0 && std::isfinite(spec->alpha)) << name;
      }
    }
  }
  return 0;
}
