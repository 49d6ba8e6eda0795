// Detokenization (spec §4.4, §5.9, §5.10) with the real Phi-2 tokenizer from testdata.
#include "server/detokenizer.h"

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/tokenizer.h"
#include "server/next_token_chooser.h"

namespace phishard {
namespace {

constexpr char kFffd[] = "\xEF\xBF\xBD";

class Phi2DetokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tok = Tokenizer::FromDir(std::string(PHISHARD_TESTDATA) + "/tokenizers/phi-2");
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok).release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }

  // Feeds `generated` one token at a time after `prompt`; returns the texts.
  static std::vector<std::string> Stream(const std::vector<int32_t>& prompt,
                                         const std::vector<int32_t>& generated) {
    std::vector<int32_t> all = prompt;
    IncrementalDetokenizer detok(static_cast<int>(prompt.size()));
    std::vector<std::string> texts;
    for (int32_t id : generated) {
      all.push_back(id);
      texts.push_back(detok.Next(*tokenizer_, all));
    }
    return texts;
  }

  static Tokenizer* tokenizer_;
};
Tokenizer* Phi2DetokenizerTest::tokenizer_ = nullptr;

TEST(TextDeltaTest, Rules) {
  EXPECT_EQ(TextDelta("Hello", "Hello world"), " world");
  EXPECT_EQ(TextDelta("Hello", "Hello"), "");                        // not longer
  EXPECT_EQ(TextDelta("Hello", std::string("Hello ") + kFffd), "");  // incomplete char
  // Clean-up rewrote the shared prefix ("a ." → "a."): fall back to code-point slicing.
  EXPECT_EQ(TextDelta("a .", "a.xyz"), "yz");
  EXPECT_EQ(TextDelta("λ", "λ😀"), "😀");
  EXPECT_EQ(TextDelta("", "é"), "é");
}

TEST_F(Phi2DetokenizerTest, EmojiSplitAcrossTokensYieldsEmptyThenTheCharacter) {
  const std::vector<int32_t> prompt = tokenizer_->Encode("Say hi:");
  const std::vector<int32_t> emoji = tokenizer_->Encode(" 😀");
  ASSERT_GE(emoji.size(), 2u) << "the test needs an emoji that byte-level BPE splits";
  std::vector<int32_t> generated = emoji;
  const std::vector<int32_t> tail = tokenizer_->Encode(" ok");
  generated.insert(generated.end(), tail.begin(), tail.end());

  const std::vector<std::string> texts = Stream(prompt, generated);
  std::string joined;
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_TRUE(IsValidUtf8(texts[i])) << i;
    if (i + 1 < emoji.size()) {
      EXPECT_EQ(texts[i], "") << "token " << i << " ends mid-character";
    }
    joined += texts[i];
  }
  EXPECT_EQ(texts[emoji.size() - 1], " 😀");
  EXPECT_EQ(joined, " 😀 ok");
  EXPECT_EQ(DecodeGeneratedText(
                *tokenizer_,
                [&] {
                  std::vector<int32_t> all = prompt;
                  all.insert(all.end(), generated.begin(), generated.end());
                  return all;
                }(),
                static_cast<int>(prompt.size())),
            " 😀 ok");
}

TEST_F(Phi2DetokenizerTest, PrefillSingleTokenTextsAreLossyButValid) {
  const std::vector<int32_t> ids = tokenizer_->Encode("naïve 😀 日本");
  bool saw_replacement = false;
  for (int32_t id : ids) {
    const std::string t = DecodeSingleToken(*tokenizer_, id);
    EXPECT_TRUE(IsValidUtf8(t)) << id;
    saw_replacement |= t.find(kFffd) != std::string::npos;
  }
  EXPECT_TRUE(saw_replacement) << "some token of the emoji should be a partial character";
  EXPECT_EQ(DecodeSingleToken(*tokenizer_, 50256), "<|endoftext|>");
}

TEST_F(Phi2DetokenizerTest, StreamConcatenationEqualsGeneratedText) {
  const std::vector<std::string> cases = {
      "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
      "日本語のテキストと emoji 🎉🎉 mixed in.",
      "Numbers 1234567 and symbols <>&%$#@!",
      "    indented\n\n\ttabs and        spaces",
  };
  const std::vector<int32_t> prompt = tokenizer_->Encode("Prompt:");
  for (const std::string& text : cases) {
    const std::vector<int32_t> gen = tokenizer_->Encode(text);
    std::string joined;
    for (const std::string& t : Stream(prompt, gen)) {
      EXPECT_TRUE(IsValidUtf8(t));
      joined += t;
    }
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), gen.begin(), gen.end());
    const std::string final_text =
        DecodeGeneratedText(*tokenizer_, all, static_cast<int>(prompt.size()));
    EXPECT_EQ(joined, final_text) << text;
    EXPECT_EQ(final_text, tokenizer_->Decode(gen, /*skip_special_tokens=*/true)) << text;
  }
}

TEST_F(Phi2DetokenizerTest, EosTextStreamedButSkippedInGeneratedText) {
  const std::vector<int32_t> prompt = tokenizer_->Encode("Hi");
  std::vector<int32_t> gen = tokenizer_->Encode(" there");
  gen.push_back(50256);
  const std::vector<std::string> texts = Stream(prompt, gen);
  EXPECT_EQ(texts.back(), "<|endoftext|>");
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), gen.begin(), gen.end());
  EXPECT_EQ(DecodeGeneratedText(*tokenizer_, all, static_cast<int>(prompt.size())), " there");
}

TEST_F(Phi2DetokenizerTest, RandomIdsAlwaysGiveValidUtf8) {
  PortableRng rng(5);
  const int v = tokenizer_->vocab_size();
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<int32_t> prompt;
    const int p = 1 + static_cast<int>(rng.UniformInt(8));  // includes P < 5 (offset clamp)
    for (int i = 0; i < p; ++i) prompt.push_back(static_cast<int32_t>(rng.UniformInt(v)));
    std::vector<int32_t> gen;
    for (int i = 0; i < 40; ++i) gen.push_back(static_cast<int32_t>(rng.UniformInt(v + 100)));
    std::vector<int32_t> all = prompt;
    IncrementalDetokenizer detok(p);
    for (int32_t id : gen) {
      // Alternatives are decoded in place of the chosen token, before it is appended.
      ASSERT_TRUE(IsValidUtf8(detok.Peek(*tokenizer_, all, (id * 7) % v)));
      all.push_back(id);
      ASSERT_TRUE(IsValidUtf8(detok.Next(*tokenizer_, all)));
      ASSERT_GE(detok.read_offset(), detok.prefix_offset());
    }
    ASSERT_TRUE(IsValidUtf8(DecodeGeneratedText(*tokenizer_, all, p)));
  }
}

TEST_F(Phi2DetokenizerTest, PeekMatchesNextForTheSameToken) {
  const std::vector<int32_t> prompt = tokenizer_->Encode("x = 1\nprint(");
  std::vector<int32_t> all = prompt;
  IncrementalDetokenizer detok(static_cast<int>(prompt.size()));
  for (int32_t id : tokenizer_->Encode("x) # 😀 done")) {
    const std::string peeked = detok.Peek(*tokenizer_, all, id);
    all.push_back(id);
    EXPECT_EQ(peeked, detok.Next(*tokenizer_, all));
  }
}

}  // namespace
}  // namespace phishard
