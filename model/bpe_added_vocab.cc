#include "model/bpe_added_vocab.h"

#include <algorithm>
#include <utility>

#include "model/bpe_pretokenizer.h"
#include "model/bpe_utf8.h"

namespace phishard {
namespace {

// Start of the character that ends s (s non-empty): back over at most 3 continuation bytes.
size_t LastCharStart(std::string_view s) {
  size_t i = s.size() - 1;
  for (int k = 0; k < 3 && i > 0 && (static_cast<uint8_t>(s[i]) & 0xC0) == 0x80; ++k) --i;
  return i;
}

// Offset where the run of trailing White_Space of `s` starts (s.size() when none).
size_t TrailingSpaceStart(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    const std::string_view head = s.substr(0, end);
    const size_t at = LastCharStart(head);
    char32_t cp;
    int bad;
    const int n = bpe_utf8::DecodeUtf8(head, at, &cp, &bad);
    if (n == 0 || at + n != end || !bpe_utf8::IsWhiteSpace(cp)) break;
    end = at;
  }
  return end;
}

// Length of the run of leading White_Space of `s`.
size_t LeadingSpaceLength(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    char32_t cp;
    int bad;
    const int n = bpe_utf8::DecodeUtf8(s, i, &cp, &bad);
    if (n == 0 || !bpe_utf8::IsWhiteSpace(cp)) break;
    i += n;
  }
  return i;
}

}  // namespace

void AddedVocab::Trie::Insert(std::string_view content, int32_t token) {
  if (nodes.empty()) {
    nodes.emplace_back();
    root_child.fill(-1);
  }
  int32_t node = 0;
  for (char ch : content) {
    const uint8_t b = static_cast<uint8_t>(ch);
    int32_t child = -1;
    for (const auto& [byte, index] : nodes[node].children) {
      if (byte == b) child = index;
    }
    if (child < 0) {
      child = static_cast<int32_t>(nodes.size());
      nodes[node].children.push_back({b, child});
      if (node == 0) root_child[b] = child;
      nodes.emplace_back();
    }
    node = child;
  }
  // The same content twice: the later entry wins, as a later AddedToken overrides in HF.
  nodes[node].token = token;
}

size_t AddedVocab::Trie::Longest(std::string_view s, size_t i, int32_t* token) const {
  int32_t node = root_child[static_cast<uint8_t>(s[i])];
  size_t best = 0;
  size_t j = i + 1;
  while (node >= 0) {
    if (nodes[node].token >= 0) {
      best = j - i;
      *token = nodes[node].token;
    }
    if (j >= s.size()) break;
    const uint8_t b = static_cast<uint8_t>(s[j]);
    int32_t child = -1;
    for (const auto& [byte, index] : nodes[node].children) {
      if (byte == b) {
        child = index;
        break;
      }
    }
    node = child;
    ++j;
  }
  return best;
}

AddedVocab::AddedVocab() = default;
AddedVocab::~AddedVocab() = default;

absl::StatusOr<std::unique_ptr<AddedVocab>> AddedVocab::Create(std::vector<AddedToken> tokens) {
  auto vocab = std::unique_ptr<AddedVocab>(new AddedVocab());
  vocab->tokens_ = std::move(tokens);
  vocab->raw_trie_.Insert("", -1);  // creates the root
  vocab->normalized_trie_.Insert("", -1);
  bool any_single_word = false;
  for (size_t k = 0; k < vocab->tokens_.size(); ++k) {
    const AddedToken& t = vocab->tokens_[k];
    if (t.content.empty()) continue;
    (t.normalized ? vocab->normalized_trie_ : vocab->raw_trie_)
        .Insert(t.content, static_cast<int32_t>(k));
    any_single_word |= t.single_word;
  }
  if (any_single_word) {
    // Rust regex's Unicode \w: Alphabetic, Mark, Decimal_Number, Connector_Punctuation,
    // Join_Control.
    auto re = BpeRegex::Compile(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])",
                                "added_tokens single_word");
    if (!re.ok()) return re.status();
    vocab->word_char_ = *std::move(re);
  }
  return vocab;
}

bool AddedVocab::IsWordChar(std::string_view one_char) const {
  bool found = false;
  word_char_->FindAll(one_char, [&](size_t, size_t) { found = true; });
  return found;
}

void AddedVocab::SplitWith(const Trie& trie, std::string_view s,
                           absl::FunctionRef<void(std::string_view, int32_t)> fn) const {
  if (trie.empty()) {
    if (!s.empty()) fn(s, -1);
    return;
  }
  size_t start_offset = 0;
  size_t i = 0;
  while (i < s.size()) {
    if (trie.root_child[static_cast<uint8_t>(s[i])] < 0) {
      ++i;
      continue;
    }
    int32_t k = -1;
    const size_t len = trie.Longest(s, i, &k);
    if (len == 0) {
      ++i;
      continue;
    }
    const AddedToken& t = tokens_[k];
    size_t start = i, stop = i + len;
    i = stop;  // matches never overlap: the scan resumes after this one even if discarded
    if (t.single_word) {
      const bool space_before =
          start == 0 || !IsWordChar(s.substr(LastCharStart(s.substr(0, start)),
                                             start - LastCharStart(s.substr(0, start))));
      const bool space_after =
          stop == s.size() || !IsWordChar(s.substr(stop, bpe_utf8::NextCharLen(s, stop)));
      if (!space_before || !space_after) continue;
    }
    if (t.lstrip) start = std::max(TrailingSpaceStart(s.substr(0, start)), start_offset);
    if (t.rstrip) {
      // HF resumes its scan inside the stripped spaces and can emit overlapping pieces; this
      // resumes after them, so each byte lands in exactly one piece.
      stop += LeadingSpaceLength(s.substr(stop));
      i = stop;
    }
    if (start_offset < start) fn(s.substr(start_offset, start - start_offset), -1);
    fn(s.substr(start, stop - start), t.id);
    start_offset = stop;
  }
  if (start_offset < s.size()) fn(s.substr(start_offset), -1);
}

void AddedVocab::Split(std::string_view text,
                       absl::FunctionRef<void(std::string_view, int32_t)> fn) const {
  SplitWith(raw_trie_, text, [&](std::string_view piece, int32_t id) {
    if (id >= 0) {
      fn(piece, id);
    } else {
      SplitWith(normalized_trie_, piece, fn);
    }
  });
}

}  // namespace phishard
