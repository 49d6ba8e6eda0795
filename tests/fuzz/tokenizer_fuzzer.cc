// Tokenizer (model/tokenizer.h) with the real Phi-2 tokenizer.json on arbitrary input.
// First byte selects the mode:
//   even: the rest is text. Encode must yield ids in [0, vocab); decoding them with special
//         tokens kept must give back the exact input bytes (byte-level BPE is lossless and Phi-2
//         has no normalizer); every Decode result must be valid UTF-8.
//   odd:  the rest is a list of 32-bit ids, some out of range on purpose. Decode/DecodeBytes
//         must not crash, unknown ids decode to nothing, and Decode is valid UTF-8 with and
//         without skipping specials and clean-up.
// Plus the UTF-8 helpers on the raw bytes: Utf8Lossy is valid UTF-8 and the identity on valid
// input; CleanUpTokenizationSpaces keeps valid UTF-8 valid.
#include <cstdint>
#include <string>
#include <vector>

#include "model/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

namespace phishard {
namespace {

void CheckUtf8Helpers(std::string_view bytes) {
  const std::string lossy = Utf8Lossy(bytes);
  FUZZ_CHECK(IsValidUtf8(lossy)) << "Utf8Lossy produced invalid UTF-8";
  if (IsValidUtf8(bytes)) {
    FUZZ_CHECK(lossy == bytes) << "Utf8Lossy changed valid UTF-8";
    FUZZ_CHECK(IsValidUtf8(CleanUpTokenizationSpaces(bytes))) << "clean-up broke UTF-8";
  }
}

void EncodeMode(const Tokenizer& tok, std::string_view text) {
  const std::vector<int32_t> ids = tok.Encode(text);
  FUZZ_CHECK(text.empty() == ids.empty())
      << "empty/non-empty mismatch for " << text.size() << " input bytes, " << ids.size() << " ids";
  for (int32_t id : ids) {
    FUZZ_CHECK(id >= 0 && id < tok.vocab_size()) << "Encode produced id " << id;
  }
  const std::string back = tok.DecodeBytes(ids, /*skip_special_tokens=*/false);
  FUZZ_CHECK(back == text) << "Encode/DecodeBytes round trip lost bytes (" << text.size() << " in, "
                           << back.size() << " out)";
  FUZZ_CHECK(IsValidUtf8(tok.Decode(ids, false, true)));
  FUZZ_CHECK(IsValidUtf8(tok.Decode(ids, true, true)));
}

void DecodeMode(const Tokenizer& tok, fuzz::ByteReader& in) {
  std::vector<int32_t> ids;
  const int32_t vocab = tok.vocab_size();
  while (in.remaining() >= 2) {
    const uint16_t raw = in.U16();
    // Mostly real ids (incl. the added tokens at the top), sometimes just outside the range or
    // negative: a router could send those in tokenized_inputs.
    int32_t id = raw % (vocab + 64);
    if ((raw & 0xF000) == 0xF000) id = -static_cast<int32_t>(raw & 0xFF) - 1;
    ids.push_back(id);
  }
  for (bool skip : {false, true}) {
    const std::string bytes = tok.DecodeBytes(ids, skip);
    (void)bytes;
    for (bool clean : {false, true}) FUZZ_CHECK(IsValidUtf8(tok.Decode(ids, skip, clean)));
  }
  for (int32_t id : ids) (void)tok.IsSpecial(id);
}

}  // namespace
}  // namespace phishard

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  phishard::fuzz::QuietLogs();
  (void)phishard::fuzz::Phi2Tokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace phishard;
  const Tokenizer& tok = fuzz::Phi2Tokenizer();
  fuzz::ByteReader in(data, size);
  const uint8_t mode = in.U8();
  if (size > 0)
    CheckUtf8Helpers(std::string_view(reinterpret_cast<const char*>(data) + 1, size - 1));
  if (mode % 2 == 0) {
    EncodeMode(tok, in.Rest());
  } else {
    DecodeMode(tok, in);
  }
  return 0;
}
