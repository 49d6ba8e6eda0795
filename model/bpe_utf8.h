// UTF-8 helpers shared by the tokenizer pieces (host memory, raw bytes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace phishard::bpe_utf8 {

// Decodes the sequence starting at s[i] (i < s.size()). Returns its length (1..4) and sets
// *cp; or returns 0 when s[i..] starts with an ill-formed sequence and sets *invalid_len to the
// length of its maximal subpart (>= 1), the unit that gets one U+FFFD in from_utf8_lossy.
// Ranges per Unicode Table 3-7: no overlongs (C0, C1, E0 80..9F, F0 80..8F), no surrogates
// (ED A0..BF), nothing above U+10FFFF (F4 90.., F5..FF).
inline int DecodeUtf8(std::string_view s, size_t i, char32_t* cp, int* invalid_len) {
  const uint8_t b0 = static_cast<uint8_t>(s[i]);
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  int need;
  uint8_t lo = 0x80, hi = 0xBF;
  char32_t value;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
    value = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    value = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    value = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    *invalid_len = 1;
    return 0;
  }
  for (int j = 1; j <= need; ++j) {
    if (i + j >= s.size()) {
      *invalid_len = j;
      return 0;
    }
    const uint8_t b = static_cast<uint8_t>(s[i + j]);
    const uint8_t l = j == 1 ? lo : 0x80, h = j == 1 ? hi : 0xBF;
    if (b < l || b > h) {
      *invalid_len = j;
      return 0;
    }
    value = (value << 6) | (b & 0x3F);
  }
  *cp = value;
  return need + 1;
}

// Bytes to skip to reach the next character boundary from s[i]: the sequence length, or 1 for
// an ill-formed byte (each stray byte is its own unit for regex iteration).
inline size_t NextCharLen(std::string_view s, size_t i) {
  char32_t cp;
  int bad;
  const int n = DecodeUtf8(s, i, &cp, &bad);
  return n > 0 ? static_cast<size_t>(n) : 1;
}

inline void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Unicode White_Space (Rust char::is_whitespace, Oniguruma's Unicode \s).
inline bool IsWhiteSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

}  // namespace phishard::bpe_utf8
