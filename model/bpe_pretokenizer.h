// Pre-tokenizer of a byte-level BPE tokenizer.json (Hugging Face `tokenizers` semantics):
// `ByteLevel` (optionally splitting with the GPT-2 regex) or a `Sequence` of `Split` and
// `ByteLevel` steps. Regexes are compiled with PCRE2 (UTF + UCP, JIT when available) from the
// pattern string in the file. All strings here are host memory, raw UTF-8 bytes (before the
// byte-to-unicode mapping, which the BPE model does on ids).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace phishard {

// GPT-2's pre-tokenizer pattern, used by ByteLevel(use_regex = true).
inline constexpr std::string_view kGpt2SplitPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Rewrites `\s` / `\S` so that PCRE2 matches Unicode White_Space exactly, as Oniguruma (HF's
// regex engine) and Rust's regex do: PCRE2's UCP `\s` also matches U+180E (MONGOLIAN VOWEL
// SEPARATOR, not White_Space since Unicode 6.3). `\S` inside a character class is left as is.
std::string RewriteWhitespaceClasses(std::string_view pattern);

// A compiled PCRE2 regex; Find is thread-safe (match data and JIT stack are per thread).
class BpeRegex {
 public:
  // `what` names the JSON field in errors. The pattern goes through RewriteWhitespaceClasses.
  static absl::StatusOr<std::unique_ptr<BpeRegex>> Compile(std::string_view pattern,
                                                           std::string_view what);
  ~BpeRegex();
  BpeRegex(const BpeRegex&) = delete;
  BpeRegex& operator=(const BpeRegex&) = delete;

  // Calls fn(start, end) for each match in `text`, left to right, with Oniguruma's iteration
  // rule (an empty match right where the previous match ended is skipped). `text` is the whole
  // subject: its ends are the ends seen by lookarounds. Invalid UTF-8 never matches any item.
  void FindAll(std::string_view text, absl::FunctionRef<void(size_t, size_t)> fn) const;

 private:
  BpeRegex() = default;
  void* code_ = nullptr;     // pcre2_code_8*
  void* context_ = nullptr;  // pcre2_match_context_8* (JIT stack callback)
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

class PreTokenizer {
 public:
  // `config` is tokenizer.json's "pre_tokenizer" value (may be null: no splitting).
  static absl::StatusOr<PreTokenizer> FromJson(const nlohmann::json& config);
  PreTokenizer();  // no steps: each piece is one word

  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;
  ~PreTokenizer();

  // Splits one added-token-free piece of the input into words, appended to `out` as views
  // into `piece` or into buffers owned by `scratch` (valid until the next call with the same
  // scratch). Empty words are dropped. `piece` boundaries act as the ends of the text.
  struct Segment {
    size_t start, end;
    bool is_match;
  };
  struct Scratch {
    std::vector<std::string_view> a, b;
    std::vector<Segment> segments;
    std::vector<std::unique_ptr<std::string>> buffers;  // only used by add_prefix_space
  };
  void Split(std::string_view piece, Scratch* scratch, std::vector<std::string_view>* out) const;

  // True when some step is ByteLevel (this tokenizer only does byte-level BPE).
  bool has_byte_level() const;

  struct Step;  // defined in the .cc

 private:
  std::vector<Step> steps_;
};

}  // namespace phishard
