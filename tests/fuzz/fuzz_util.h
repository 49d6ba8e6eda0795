// Shared helpers of the fuzz targets: a byte reader that never fails (missing bytes read as 0),
// the tokenizers they use (loaded once per process), and FUZZ_CHECK for the properties a target
// asserts beyond "no crash" (it aborts, which libFuzzer and the replay driver report).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include "common/logging.h"
#include "model/tokenizer.h"

#define FUZZ_CHECK(cond) PHI_CHECK(cond) << "fuzz property violated: "

namespace phishard {
namespace fuzz {

class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t remaining() const { return size_ - pos_; }
  bool empty() const { return pos_ >= size_; }
  uint8_t U8() { return pos_ < size_ ? data_[pos_++] : 0; }
  uint16_t U16() { return static_cast<uint16_t>(U8() | (U8() << 8)); }
  uint32_t U32() { return static_cast<uint32_t>(U16()) | (static_cast<uint32_t>(U16()) << 16); }
  // Up to `n` bytes (fewer at the end of the input).
  std::string_view Bytes(size_t n) {
    n = std::min(n, remaining());
    std::string_view out(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return out;
  }
  std::string_view Rest() { return Bytes(remaining()); }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Loads DIR's tokenizer or aborts naming the directory (a broken checkout, not a finding).
inline std::unique_ptr<Tokenizer> LoadTokenizerOrDie(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromDir(dir);
  PHI_CHECK(t.ok()) << "fuzz setup: cannot load the tokenizer in " << dir << ": " << t.status();
  return *std::move(t);
}

// The real Phi-2 tokenizer (50,295 ids incl. added tokens): what the Phi shard serves.
inline const Tokenizer& Phi2Tokenizer() {
  static const Tokenizer* t =
      LoadTokenizerOrDie(std::string(PHISHARD_TESTDATA) + "/tokenizers/phi-2").release();
  return *t;
}

// Quiet logs: targets hit error paths on purpose millions of times.
inline void QuietLogs() { SetLogLevel(LogLevel::kCritical); }

}  // namespace fuzz
}  // namespace phishard
