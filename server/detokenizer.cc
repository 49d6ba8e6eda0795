#include "server/detokenizer.h"

#include <algorithm>

#include "common/logging.h"

namespace phishard {
namespace {

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD in UTF-8

bool IsContinuationByte(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

size_t CodePointCount(std::string_view s) {
  return static_cast<size_t>(
      std::count_if(s.begin(), s.end(), [](char c) { return !IsContinuationByte(c); }));
}

// Byte offset just past the first `n` code points of valid UTF-8 `s` (s.size() if fewer).
size_t SkipCodePoints(std::string_view s, size_t n) {
  size_t i = 0;
  for (size_t seen = 0; i < s.size(); ++i) {
    if (!IsContinuationByte(s[i])) {
      if (seen == n) return i;
      ++seen;
    }
  }
  return s.size();
}

}  // namespace

std::string TextDelta(std::string_view prefix_text, std::string_view new_text) {
  if (CodePointCount(new_text) <= CodePointCount(prefix_text) ||
      new_text.ends_with(kReplacementChar)) {
    return "";
  }
  if (new_text.starts_with(prefix_text)) {
    return std::string(new_text.substr(prefix_text.size()));
  }
  // Clean-up changed the shared part: fall back to Python's code-point slicing.
  return std::string(new_text.substr(SkipCodePoints(new_text, CodePointCount(prefix_text))));
}

IncrementalDetokenizer::IncrementalDetokenizer(int prompt_len)
    : prefix_offset_(std::max(prompt_len - 5, 0)), read_offset_(prompt_len) {}

std::string IncrementalDetokenizer::Next(const Tokenizer& tokenizer,
                                         absl::Span<const int32_t> all_ids) {
  PHI_CHECK(static_cast<int>(all_ids.size()) > read_offset_);
  const std::string prefix_text =
      tokenizer.Decode(all_ids.subspan(prefix_offset_, read_offset_ - prefix_offset_),
                       /*skip_special_tokens=*/false);
  const std::string new_text =
      tokenizer.Decode(all_ids.subspan(prefix_offset_), /*skip_special_tokens=*/false);
  std::string text = TextDelta(prefix_text, new_text);
  if (!text.empty()) {
    prefix_offset_ = read_offset_;
    read_offset_ = static_cast<int>(all_ids.size());
  }
  return text;
}

std::string IncrementalDetokenizer::Peek(const Tokenizer& tokenizer,
                                         absl::Span<const int32_t> ids_before,
                                         int32_t candidate) const {
  PHI_CHECK(static_cast<int>(ids_before.size()) >= read_offset_);
  const absl::Span<const int32_t> window = ids_before.subspan(prefix_offset_);
  std::vector<int32_t> with_candidate(window.begin(), window.end());
  with_candidate.push_back(candidate);
  const std::string prefix_text =
      tokenizer.Decode(ids_before.subspan(prefix_offset_, read_offset_ - prefix_offset_),
                       /*skip_special_tokens=*/false);
  const std::string new_text = tokenizer.Decode(with_candidate, /*skip_special_tokens=*/false);
  return TextDelta(prefix_text, new_text);
}

std::string DecodeGeneratedText(const Tokenizer& tokenizer, absl::Span<const int32_t> all_ids,
                                int prompt_len) {
  PHI_CHECK(prompt_len >= 1 && static_cast<size_t>(prompt_len) <= all_ids.size());
  const absl::Span<const int32_t> from_last_prompt = all_ids.subspan(prompt_len - 1);
  const std::string prefix_text =
      tokenizer.Decode(from_last_prompt.subspan(0, 1), /*skip_special_tokens=*/true);
  const std::string full_text = tokenizer.Decode(from_last_prompt, /*skip_special_tokens=*/true);
  if (CodePointCount(full_text) <= CodePointCount(prefix_text)) return "";
  if (full_text.starts_with(prefix_text)) return full_text.substr(prefix_text.size());
  return full_text.substr(SkipCodePoints(full_text, CodePointCount(prefix_text)));
}

std::string DecodeSingleToken(const Tokenizer& tokenizer, int32_t id) {
  const int32_t ids[1] = {id};
  return tokenizer.Decode(ids, /*skip_special_tokens=*/false, /*clean_up=*/false);
}

}  // namespace phishard
