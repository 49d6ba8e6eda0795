// Hugging Face tokenizer.json byte-level BPE (GPT-2 / Phi family), Hugging Face `tokenizers`
// semantics: added tokens split out first (leftmost-longest on the raw text), then the
// pre-tokenizer regex from the file (PCRE2, Unicode), byte-to-unicode mapping, merges by rank,
// vocab lookup. Decoding maps token strings back to raw bytes (ByteLevel decoder); an added token
// whose characters are outside the byte table contributes its raw UTF-8.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace phishard {

class Tokenizer {
 public:
  // Reads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json
  // (clean_up_tokenization_spaces, special tokens, added_tokens_decoder special flags) and
  // DIR/special_tokens_map.json (special tokens; read only when tokenizer_config.json has no
  // added_tokens_decoder, and then it wins, as in transformers). A named special token that is
  // in neither model.vocab nor the added tokens is added with a new id, as transformers does.
  // DIR/added_tokens.json (transformers' legacy file) is read only when tokenizer_config.json has
  // no added_tokens_decoder: its entries are added as that file's entries tokenizer.json lacks.
  // Without tokenizer.json, the slow tokenizer's vocab.json + merges.txt (+ added_tokens.json)
  // are converted as transformers does (model/bpe_slow_files.h).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromDir(const std::filesystem::path& dir);
  // `tokenizer_config_json`, `special_tokens_map_json` and `added_tokens_json` may be empty (no
  // such file).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      std::string_view tokenizer_json, std::string_view tokenizer_config_json,
      std::string_view special_tokens_map_json = {}, std::string_view added_tokens_json = {});
  ~Tokenizer();

  // encode(text) with no BOS/EOS, no truncation. Never fails: invalid UTF-8 input bytes are
  // encoded byte-wise like any other byte.
  std::vector<int32_t> Encode(std::string_view text) const;
  // transformers' `tokenizer(text)` (add_special_tokens=True): Encode plus the ids the
  // tokenizer.json post_processor adds around it (none for Phi's ByteLevel; e.g. a BOS for a
  // TemplateProcessing). What a prompt the shard tokenizes itself becomes.
  std::vector<int32_t> EncodeWithSpecialTokens(std::string_view text) const;

  // Raw bytes of the concatenated tokens (may be invalid UTF-8 when a multi-byte character is
  // split). Special tokens are dropped when skip_special_tokens. Unknown ids decode to "".
  std::string DecodeBytes(absl::Span<const int32_t> ids, bool skip_special_tokens) const;
  // transformers-style decode: DecodeBytes → lossy UTF-8 (U+FFFD per maximal invalid subpart)
  // → clean_up_tokenization_spaces when the config says so and `clean_up` is true.
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens,
                     bool clean_up = true) const;

  bool IsSpecial(int32_t id) const;            // special added tokens (e.g. <|endoftext|>)
  int32_t vocab_size() const;                  // 1 + largest id known to the tokenizer
  std::optional<int32_t> eos_token_id() const;
  // Where the eos token came from (set exactly when eos_token_id() is), for load-time errors.
  struct EosSource {
    std::string content;    // the token's text
    std::string file;       // "tokenizer_config.json", "special_tokens_map.json", or
                            // "tokenizer.json" for the <|endoftext|> default when neither names one
    bool appended = false;  // not in tokenizer.json's vocab or added tokens: given a new id
  };
  const std::optional<EosSource>& eos_source() const;
  std::optional<int32_t> bos_token_id() const;
  std::optional<int32_t> TokenToId(std::string_view token) const;
  bool clean_up_tokenization_spaces() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Replaces each maximal invalid UTF-8 subpart with U+FFFD (Rust from_utf8_lossy / WHATWG policy).
std::string Utf8Lossy(std::string_view bytes);
// True when `bytes` is valid UTF-8.
bool IsValidUtf8(std::string_view bytes);
// transformers' clean_up_tokenization: " ." → ".", " ?" → "?", " !" → "!", " ," → ",",
// " ' " → "'", " n't" → "n't", " 'm" → "'m", " 's" → "'s", " 've" → "'ve", " 're" → "'re".
std::string CleanUpTokenizationSpaces(std::string_view text);

}  // namespace phishard
