// Detokenization for emitted strings (spec §4.4, §5.6, §5.9, §5.10). Every string returned here
// is valid UTF-8: the tokenizer's Decode is lossy (U+FFFD per invalid subpart), and a token that
// ends inside a multi-byte character yields "" until the character is complete.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/types/span.h"
#include "model/tokenizer.h"

namespace phishard {

// Text that `new_text` adds to `prefix_text` under the §5.9 rule: empty unless new_text is longer
// (in code points) and does not end with U+FFFD; the byte suffix when new_text starts with
// prefix_text, else new_text minus its first cp_len(prefix_text) code points.
std::string TextDelta(std::string_view prefix_text, std::string_view new_text);

// Per-request incremental detokenizer: prefix/read offsets into the request's token history
// (prompt + generated), HF TGI algorithm. Decodes keep special tokens and use the tokenizer's
// default clean-up.
class IncrementalDetokenizer {
 public:
  // prefix_offset = max(P - 5, 0) (clamped instead of upstream's negative slicing [QUIRK §5.9]),
  // read_offset = P.
  explicit IncrementalDetokenizer(int prompt_len);

  // `all_ids` = history including the token just appended. Returns that token's text and moves
  // the offsets when it is non-empty.
  std::string Next(const Tokenizer& tokenizer, absl::Span<const int32_t> all_ids);

  // Text `candidate` would get if it were appended to `ids_before` (the history *before* the
  // chosen token) — for alternative tokens, decoded in place of the chosen one with the
  // pre-choice offsets (the recommended fix of [QUIRK §5.6]). No state change.
  std::string Peek(const Tokenizer& tokenizer, absl::Span<const int32_t> ids_before,
                   int32_t candidate) const;

  int prefix_offset() const { return prefix_offset_; }
  int read_offset() const { return read_offset_; }

 private:
  int prefix_offset_;
  int read_offset_;
};

// §5.10 GeneratedText.text: decode(last prompt token + generated) minus decode(last prompt
// token), special tokens skipped, default clean-up. all_ids = prompt (prompt_len >= 1) +
// generated. Unlike upstream, a trailing incomplete character does not blank the whole text: it
// shows up as U+FFFD (still valid UTF-8) and the rest of the text is kept.
std::string DecodeGeneratedText(const Tokenizer& tokenizer, absl::Span<const int32_t> all_ids,
                                int prompt_len);

// §4.4 prefill texts: one id decoded alone, special tokens kept, no clean-up, lossy UTF-8.
std::string DecodeSingleToken(const Tokenizer& tokenizer, int32_t id);

}  // namespace phishard
