// Incremental detokenizer (server/detokenizer.h) with the real Phi-2 tokenizer, driven the way
// BatchEngine drives it: a prompt of P ids, then one chosen id at a time. Ids span the model's
// logits width (Phi-2: 51,200, above the tokenizer's 50,295), so never-decodable ids appear as
// they can in real sampling.
// Properties: every emitted text (Next, Peek, DecodeGeneratedText, DecodeSingleToken, TextDelta
// of valid inputs) is valid UTF-8 — one invalid byte makes the router reject a whole response
// (spec §2.1); and Peek(history, c) equals what Next returns once c is appended (alternative
// texts are decoded exactly like the chosen token's).
#include <cstdint>
#include <string>
#include <vector>

#include "server/detokenizer.h"
#include "tests/fuzz/fuzz_util.h"

namespace {
constexpr int32_t kPhi2LogitsWidth = 51200;
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  phishard::fuzz::QuietLogs();
  (void)phishard::fuzz::Phi2Tokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace phishard;
  const Tokenizer& tok = fuzz::Phi2Tokenizer();
  fuzz::ByteReader in(data, size);

  // Mode 1: TextDelta on two arbitrary strings made valid (its inputs are always decoded text).
  if ((in.U8() & 0x80) != 0) {
    const size_t split = in.U16();
    const std::string a = Utf8Lossy(in.Bytes(split % (in.remaining() + 1)));
    const std::string b = Utf8Lossy(in.Rest());
    FUZZ_CHECK(IsValidUtf8(TextDelta(a, b)));
    FUZZ_CHECK(IsValidUtf8(TextDelta(b, a)));
    FUZZ_CHECK(IsValidUtf8(TextDelta(a, a + b)));
    return 0;
  }

  // Mode 0: a request's history.
  const int prompt_len = 1 + in.U8() % 12;
  std::vector<int32_t> ids;
  while (in.remaining() >= 2 && static_cast<int>(ids.size()) < 512) {
    ids.push_back(static_cast<int32_t>(in.U16()) % kPhi2LogitsWidth);
    // High ids land on the added whitespace tokens and <|endoftext|> more often.
    if ((ids.back() & 7) == 7) ids.back() = 50256 + ids.back() % 40;
  }
  if (static_cast<int>(ids.size()) <= prompt_len) return 0;

  for (int k = 0; k < prompt_len; ++k) FUZZ_CHECK(IsValidUtf8(DecodeSingleToken(tok, ids[k])));
  IncrementalDetokenizer detok(prompt_len);
  std::vector<int32_t> history(ids.begin(), ids.begin() + prompt_len);
  for (size_t k = prompt_len; k < ids.size(); ++k) {
    const std::string peeked = detok.Peek(tok, history, ids[k]);
    history.push_back(ids[k]);
    const std::string text = detok.Next(tok, history);
    FUZZ_CHECK(IsValidUtf8(text)) << "Next emitted invalid UTF-8 at token " << k;
    FUZZ_CHECK(peeked == text) << "Peek and Next disagree at token " << k;
    FUZZ_CHECK(detok.prefix_offset() <= detok.read_offset() &&
               detok.read_offset() <= static_cast<int>(history.size()));
  }
  FUZZ_CHECK(IsValidUtf8(DecodeGeneratedText(tok, history, prompt_len)));
  return 0;
}
