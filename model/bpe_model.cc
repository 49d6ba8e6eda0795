#include "model/bpe_model.h"

#include <algorithm>
#include <atomic>
#include <queue>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/bpe_utf8.h"

namespace phishard {
namespace {

std::array<char32_t, 256> BuildByteToUnicode() {
  std::array<char32_t, 256> table{};
  std::array<bool, 256> printable{};
  for (int b = '!'; b <= '~'; ++b) printable[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = printable[b] ? static_cast<char32_t>(b) : next++;
  return table;
}

// Code points of the table are < 256 + 68.
constexpr size_t kInverseSize = 256 + 68;

std::array<int16_t, kInverseSize> BuildUnicodeToByte() {
  std::array<int16_t, kInverseSize> inverse;
  inverse.fill(-1);
  const auto& table = ByteToUnicode();
  for (int b = 0; b < 256; ++b) inverse[table[b]] = static_cast<int16_t>(b);
  return inverse;
}

constexpr size_t kMaxCachedWordBytes = 256;

}  // namespace

const std::array<char32_t, 256>& ByteToUnicode() {
  static const std::array<char32_t, 256> table = BuildByteToUnicode();
  return table;
}

int UnicodeToByte(char32_t cp) {
  static const std::array<int16_t, kInverseSize> inverse = BuildUnicodeToByte();
  return cp < kInverseSize ? inverse[cp] : -1;
}

std::optional<std::string> ByteLevelToBytes(std::string_view token) {
  std::string bytes;
  bytes.reserve(token.size());
  size_t i = 0;
  while (i < token.size()) {
    char32_t cp;
    int bad;
    const int n = bpe_utf8::DecodeUtf8(token, i, &cp, &bad);
    if (n == 0) return std::nullopt;
    const int b = UnicodeToByte(cp);
    if (b < 0) return std::nullopt;
    bytes.push_back(static_cast<char>(b));
    i += n;
  }
  return bytes;
}

namespace {

// Per-thread word cache: raw word bytes -> ids. It belongs to one model at a time (by instance
// id, never by address, which a later model could reuse); using another model clears it.
struct WordCache {
  uint64_t owner = 0;
  absl::flat_hash_map<std::string, absl::InlinedVector<int32_t, 4>> map;
};

}  // namespace

BpeModel::BpeModel() = default;
BpeModel::~BpeModel() = default;

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::Create(
    const Vocab& vocab, const std::vector<std::pair<std::string, std::string>>& merges,
    const Options& options) {
  auto model = std::unique_ptr<BpeModel>(new BpeModel());
  model->options_ = options;
  static std::atomic<uint64_t> next_instance_id{1};
  model->instance_id_ = next_instance_id.fetch_add(1);
  const auto& table = ByteToUnicode();
  for (int b = 0; b < 256; ++b) {
    std::string symbol;
    bpe_utf8::AppendUtf8(table[b], &symbol);
    auto it = vocab.find(symbol);
    model->byte_to_id_[b] = it == vocab.end() ? -1 : it->second;
  }
  model->merges_.reserve(merges.size());
  std::string joined;
  for (size_t i = 0; i < merges.size(); ++i) {
    const auto& [left, right] = merges[i];
    auto a = vocab.find(left);
    auto b = vocab.find(right);
    joined.assign(left).append(right);
    auto c = vocab.find(joined);
    const std::string_view missing = a == vocab.end()   ? std::string_view(left)
                                     : b == vocab.end() ? std::string_view(right)
                                     : c == vocab.end() ? std::string_view(joined)
                                                        : std::string_view();
    if (a == vocab.end() || b == vocab.end() || c == vocab.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "model.merges[", i, "]: token \"", std::string(missing), "\" is not in model.vocab"));
    }
    // A repeated pair keeps its last rank, as HF's map construction does.
    model->merges_[PairKey(a->second, b->second)] = Merge{static_cast<uint32_t>(i), c->second};
  }
  if (options.ignore_merges) {
    for (const auto& [token, id] : vocab) {
      std::optional<std::string> bytes = ByteLevelToBytes(token);
      if (bytes.has_value()) model->bytes_to_id_.emplace(*std::move(bytes), id);
    }
  }
  return model;
}

uint64_t BpeModel::PackedMerge(int32_t a, int32_t b) const {
  auto it = merges_.find(PairKey(a, b));
  if (it == merges_.end()) return kNoMerge;
  return (static_cast<uint64_t>(it->second.rank) << 32) | static_cast<uint32_t>(it->second.new_id);
}

void BpeModel::InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const {
  symbols->clear();
  bool last_unk = false;
  for (char ch : word) {
    const int32_t id = byte_to_id_[static_cast<uint8_t>(ch)];
    if (id >= 0) {
      symbols->push_back(id);
      last_unk = false;
    } else if (options_.unk_id.has_value()) {
      // HF: an unknown symbol becomes unk (fused with a preceding unk when fuse_unk); without
      // an unk token it is dropped.
      if (!(options_.fuse_unk && last_unk)) symbols->push_back(*options_.unk_id);
      last_unk = true;
    }
  }
}

void BpeModel::MergeLinear(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& s = *symbols;
  // packed[i] is the merge of (s[i], s[i + 1]); the first minimum is the lowest rank, leftmost.
  thread_local std::vector<uint64_t> packed;
  packed.clear();
  for (size_t i = 0; i + 1 < s.size(); ++i) packed.push_back(PackedMerge(s[i], s[i + 1]));
  while (!packed.empty()) {
    size_t best = 0;
    for (size_t i = 1; i < packed.size(); ++i) {
      if (packed[i] < packed[best]) best = i;
    }
    if (packed[best] == kNoMerge) break;
    s[best] = static_cast<int32_t>(packed[best] & 0xFFFFFFFFu);
    s.erase(s.begin() + best + 1);
    packed.erase(packed.begin() + best);
    if (best > 0) packed[best - 1] = PackedMerge(s[best - 1], s[best]);
    if (best < packed.size()) packed[best] = PackedMerge(s[best], s[best + 1]);
  }
}

void BpeModel::MergeHeap(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& s = *symbols;
  const int n = static_cast<int>(s.size());
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  // Entry: (packed merge, left position); smallest first = lowest rank, then leftmost.
  using Entry = std::pair<uint64_t, int>;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (int i = 0; i + 1 < n; ++i) {
    const uint64_t m = PackedMerge(s[i], s[i + 1]);
    if (m != kNoMerge) heap.push({m, i});
  }
  std::vector<bool> alive(n, true);
  while (!heap.empty()) {
    const auto [m, pos] = heap.top();
    heap.pop();
    // Stale entries: the left symbol was absorbed, or either side changed since the push.
    if (!alive[pos] || next[pos] < 0) continue;
    const int right = next[pos];
    if (PackedMerge(s[pos], s[right]) != m) continue;
    s[pos] = static_cast<int32_t>(m & 0xFFFFFFFFu);
    alive[right] = false;
    next[pos] = next[right];
    if (next[pos] >= 0) prev[next[pos]] = pos;
    if (prev[pos] >= 0) {
      const uint64_t left_merge = PackedMerge(s[prev[pos]], s[pos]);
      if (left_merge != kNoMerge) heap.push({left_merge, prev[pos]});
    }
    if (next[pos] >= 0) {
      const uint64_t right_merge = PackedMerge(s[pos], s[next[pos]]);
      if (right_merge != kNoMerge) heap.push({right_merge, pos});
    }
  }
  int w = 0;
  for (int i = 0; i < n; ++i) {
    if (alive[i]) s[w++] = s[i];
  }
  s.resize(w);
}

void BpeModel::MergeSymbols(std::vector<int32_t>* symbols, MergeAlgo algo) const {
  if (symbols->size() < 2) return;
  if (algo == MergeAlgo::kHeap ||
      (algo == MergeAlgo::kAuto && symbols->size() > kLinearMaxSymbols)) {
    MergeHeap(symbols);
  } else {
    MergeLinear(symbols);
  }
}

void BpeModel::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (word.size() == 1) {
    const int32_t id = byte_to_id_[static_cast<uint8_t>(word[0])];
    if (id >= 0) {
      out->push_back(id);
    } else if (options_.unk_id.has_value()) {
      out->push_back(*options_.unk_id);
    }
    return;
  }
  if (options_.ignore_merges) {
    auto it = bytes_to_id_.find(absl::string_view(word.data(), word.size()));
    if (it != bytes_to_id_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  const absl::string_view key(word.data(), word.size());
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  thread_local WordCache cache;
  if (cacheable) {
    if (cache.owner != instance_id_) {
      cache.map.clear();
      cache.owner = instance_id_;
    }
    auto it = cache.map.find(key);
    if (it != cache.map.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  thread_local std::vector<int32_t> symbols;
  InitialSymbols(word, &symbols);
  MergeSymbols(&symbols);
  out->insert(out->end(), symbols.begin(), symbols.end());
  if (cacheable) {
    if (cache.map.size() >= options_.cache_entries) cache.map.clear();
    cache.map.try_emplace(key, symbols.begin(), symbols.end());
  }
}

}  // namespace phishard
