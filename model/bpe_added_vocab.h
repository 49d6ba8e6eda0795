// Added tokens of a tokenizer.json (Hugging Face `AddedVocabulary` semantics): they are split
// out of the raw text before pre-tokenization, leftmost-longest, in two passes: first the
// tokens with normalized = false over the whole text, then those with normalized = true over
// each remaining piece (no normalizer is supported, so the second pass sees the raw piece).
// single_word / lstrip / rstrip follow HF: `\w` and `\s` are Unicode.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"

namespace phishard {

// The id tokenizers' AddedVocabulary::add_tokens (tokenizers/src/tokenizer/added_vocabulary.rs)
// gives a text that is neither an added token nor in the model's vocabulary: the vocabulary's size
// or one past the largest added id (-1: none yet), whichever is larger.
inline int64_t NextAddedTokenId(int64_t model_vocab_size, int64_t max_added_id) {
  return (max_added_id >= model_vocab_size || model_vocab_size == 0) ? max_added_id + 1
                                                                     : model_vocab_size;
}

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool single_word = false;
};

class BpeRegex;

class AddedVocab {
 public:
  // Tokens with empty content are ignored (they could never match).
  static absl::StatusOr<std::unique_ptr<AddedVocab>> Create(std::vector<AddedToken> tokens);
  ~AddedVocab();

  // Splits `text` in order into added tokens (fn(piece, id), id >= 0) and the text between
  // them (fn(piece, -1)); pieces are views into `text`, never empty.
  void Split(std::string_view text, absl::FunctionRef<void(std::string_view, int32_t)> fn) const;

  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  AddedVocab();
  // Byte trie over token contents; node 0 is the root.
  struct Trie {
    struct Node {
      std::vector<std::pair<uint8_t, int32_t>> children;  // (byte, node), few per node
      int32_t token = -1;                                 // index into tokens_
    };
    std::vector<Node> nodes;
    std::array<int32_t, 256> root_child;  // fast first-byte dispatch, -1 = none
    void Insert(std::string_view content, int32_t token);
    // Longest token starting at s[i]: returns its length (0: none) and sets *token.
    size_t Longest(std::string_view s, size_t i, int32_t* token) const;
    bool empty() const { return nodes.size() <= 1; }
  };
  void SplitWith(const Trie& trie, std::string_view text,
                 absl::FunctionRef<void(std::string_view, int32_t)> fn) const;
  bool IsWordChar(std::string_view one_char) const;

  std::vector<AddedToken> tokens_;
  Trie raw_trie_;                        // normalized == false
  Trie normalized_trie_;                 // normalized == true
  std::unique_ptr<BpeRegex> word_char_;  // Rust regex's Unicode \w, for single_word
};

}  // namespace phishard
