// Nesting guard for the JSON files phishard reads (config.json, generation_config.json,
// tokenizer.json, tokenizer_config.json, adapter_config.json). nlohmann parses iteratively, but
// dump() — used to quote a wrong value in an error message — recurses once per level: a file of
// a few hundred thousand '[' overflowed the stack (found by tests/fuzz/phi_config_fuzzer). Real
// files nest at most ~6 levels, so anything past kMaxJsonNesting is refused before parsing.
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace phishard {

inline constexpr int kMaxJsonNesting = 64;

// Max nesting of '{' / '[' in `text`, ignoring brackets inside strings; stops counting once it
// passes `limit`.
inline int JsonNestingDepth(std::string_view text, int limit) {
  int depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > max_depth) max_depth = depth;
      if (max_depth > limit) return max_depth;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return max_depth;
}

// INVALID_ARGUMENT naming `source` when `text` nests deeper than kMaxJsonNesting.
inline absl::Status CheckJsonNesting(std::string_view text, std::string_view source) {
  if (JsonNestingDepth(text, kMaxJsonNesting) <= kMaxJsonNesting) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(absl::string_view(source.data(), source.size()),
                                                 ": JSON nested deeper than ", kMaxJsonNesting,
                                                 " levels"));
}

}  // namespace phishard
