// Byte-level BPE model (Hugging Face `tokenizers` BPE semantics): GPT-2's byte-to-unicode
// table, initial symbols = one vocab id per byte, merges applied lowest rank first (leftmost
// among equal ranks) on token ids, per-word cache. Host memory only.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace phishard {

// GPT-2 bytes_to_unicode(): printable Latin-1 bytes ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF)
// map to themselves, the other 68 bytes to U+0100.. in byte order (space -> U+0120 'Ġ').
const std::array<char32_t, 256>& ByteToUnicode();
// Inverse of ByteToUnicode; -1 for code points outside the table.
int UnicodeToByte(char32_t cp);
// The raw bytes of a byte-level token string, or nullopt when a character is outside the table
// (such tokens, e.g. phi-2's runs of spaces, decode to their own UTF-8).
std::optional<std::string> ByteLevelToBytes(std::string_view token);

class BpeModel {
 public:
  struct Options {
    bool ignore_merges = false;     // a word found whole in the vocab skips the merges
    std::optional<int32_t> unk_id;  // for bytes whose symbol is not in the vocab
    bool fuse_unk = false;          // consecutive unknown bytes give one unk
    size_t cache_entries = 32768;   // per thread; a full cache is cleared
  };
  using Vocab = absl::flat_hash_map<std::string, int32_t>;  // byte-level token string -> id

  // `merges` in rank order. Errors name the offending merge ("model.merges[i]").
  static absl::StatusOr<std::unique_ptr<BpeModel>> Create(
      const Vocab& vocab, const std::vector<std::pair<std::string, std::string>>& merges,
      const Options& options);
  ~BpeModel();

  // Appends the ids of one pre-tokenized word (raw bytes). Thread-safe: the word cache is
  // per thread (no locks on the request path), bound to one model at a time.
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;

  // Merges `symbols` (vocab ids) in place, no cache. kAuto: a linear scan per merge for words
  // of up to kLinearMaxSymbols symbols, a heap (O(n log n)) above; both give the same result
  // (tests compare them by forcing one).
  enum class MergeAlgo { kAuto, kLinear, kHeap };
  void MergeSymbols(std::vector<int32_t>* symbols, MergeAlgo algo = MergeAlgo::kAuto) const;
  static constexpr size_t kLinearMaxSymbols = 64;
  // One id per byte of `word` (unk / dropped for bytes without a vocab symbol).
  void InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const;

  int32_t byte_id(uint8_t b) const { return byte_to_id_[b]; }

 private:
  BpeModel();
  struct Merge {
    uint32_t rank;
    int32_t new_id;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  // (rank << 32 | new_id), or kNoMerge: comparing packed values orders by rank.
  uint64_t PackedMerge(int32_t a, int32_t b) const;
  static constexpr uint64_t kNoMerge = ~uint64_t{0};
  void MergeLinear(std::vector<int32_t>* symbols) const;
  void MergeHeap(std::vector<int32_t>* symbols) const;

  Options options_;
  std::array<int32_t, 256> byte_to_id_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  absl::flat_hash_map<std::string, int32_t> bytes_to_id_;  // raw bytes -> id; ignore_merges only
  uint64_t instance_id_ = 0;  // unique per model: keys the per-thread word caches
};

}  // namespace phishard
