// StoppingCriteria: spec §5.7 order and stop-sequence matching on incremental text.
#include "server/stopping_criteria.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "model/tokenizer.h"

namespace phishard {
namespace {

constexpr int32_t kEos = 50256;

StoppingParams Params(uint32_t max_new, std::vector<std::string> stops = {},
                      bool ignore_eos = false) {
  StoppingParams p;
  p.max_new_tokens = max_new;
  p.stop_sequences = std::move(stops);
  p.ignore_eos_token = ignore_eos;
  return p;
}

TEST(StoppingCriteriaTest, MaxNewTokensGivesLength) {
  StoppingCriteria s(Params(3), {kEos});
  EXPECT_EQ(s.Step(5, "a"), std::nullopt);
  EXPECT_EQ(s.Step(6, "b"), std::nullopt);
  EXPECT_EQ(s.Step(7, "c"), FinishReason::kLength);
  EXPECT_EQ(s.generated_tokens(), 3u);
}

TEST(StoppingCriteriaTest, MaxNewTokensOne) {
  StoppingCriteria s(Params(1), {kEos});
  EXPECT_EQ(s.Step(5, "a"), FinishReason::kLength);
}

TEST(StoppingCriteriaTest, EosGivesEosTokenAndIsCounted) {
  StoppingCriteria s(Params(10), {kEos});
  EXPECT_EQ(s.Step(5, "a"), std::nullopt);
  EXPECT_EQ(s.Step(kEos, "<|endoftext|>"), FinishReason::kEosToken);
  EXPECT_EQ(s.generated_tokens(), 2u);
}

TEST(StoppingCriteriaTest, LengthWinsOverEosOnTheLastToken) {
  StoppingCriteria s(Params(2), {kEos});
  EXPECT_EQ(s.Step(5, "a"), std::nullopt);
  EXPECT_EQ(s.Step(kEos, "<|endoftext|>"), FinishReason::kLength);
}

TEST(StoppingCriteriaTest, IgnoreEosContinuesToLength) {
  StoppingCriteria s(Params(3, {}, /*ignore_eos=*/true), {kEos});
  EXPECT_EQ(s.Step(kEos, "<|endoftext|>"), std::nullopt);
  EXPECT_EQ(s.Step(kEos, "<|endoftext|>"), std::nullopt);
  EXPECT_EQ(s.Step(kEos, "<|endoftext|>"), FinishReason::kLength);
}

TEST(StoppingCriteriaTest, AnyOfSeveralEosIds) {
  StoppingCriteria s(Params(10), {0, 7});
  EXPECT_EQ(s.Step(5, "x"), std::nullopt);
  EXPECT_EQ(s.Step(7, ""), FinishReason::kEosToken);
  StoppingCriteria none(Params(3), {});
  EXPECT_EQ(none.Step(kEos, ""), std::nullopt);
}

// Which ids stop a request (spec §5.7, upstream `getattr(tokenizer, "eos_token_ids",
// tokenizer.eos_token_id)`): a generation_config.json list, else the tokenizer's eos. A chat
// fine-tune whose tokenizer eos is its end-of-turn token (50295 here) while config.json still
// says 50256 must stop on 50295, as LoRAX does.
TEST(StoppingCriteriaTest, EosTokenIdsFollowUpstreamPrecedence) {
  PhiConfig c;
  c.eos_token_ids = {kEos};  // config.json, or a single id in generation_config.json
  EXPECT_EQ(EosTokenIds(c, 50295), (std::vector<int32_t>{50295}));
  EXPECT_EQ(EosTokenIds(c, kEos), (std::vector<int32_t>{kEos}));
  // A tokenizer without an eos token: the config's ids rather than never stopping.
  EXPECT_EQ(EosTokenIds(c, std::nullopt), (std::vector<int32_t>{kEos}));
  c.eos_token_ids.clear();
  EXPECT_TRUE(EosTokenIds(c, std::nullopt).empty());
  // generation_config.json's list wins over the tokenizer.
  c.eos_token_ids = {kEos, 50295};
  c.eos_token_ids_from_generation_list = true;
  EXPECT_EQ(EosTokenIds(c, 7), (std::vector<int32_t>{kEos, 50295}));
}

// A tokenizer whose model.vocab holds "a" (0) and "b" (1) and whose tokenizer_config.json names
// `eos` as its eos token.
std::unique_ptr<Tokenizer> TwoTokenTokenizer(const std::string& eos) {
  const std::string tokenizer_json = R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1},
      "merges": []}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},
      "decoder": {"type": "ByteLevel"}})";
  absl::StatusOr<std::unique_ptr<Tokenizer>> t =
      Tokenizer::FromJson(tokenizer_json, absl::StrCat(R"({"eos_token": ")", eos, R"("})"));
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : nullptr;
}

// An eos the tokenizer had to add with a new id (transformers does the same) is served when the
// id is inside the model's vocabulary; past it the model could never emit it, so loading fails,
// naming the file and the token, instead of serving requests that never stop on EOS.
TEST(StoppingCriteriaTest, CheckedEosTokenIdsRefusesAnEosTheModelCannotEmit) {
  std::unique_ptr<Tokenizer> tok = TwoTokenTokenizer("<|im_end|>");
  ASSERT_NE(tok, nullptr);
  ASSERT_EQ(tok->eos_token_id(), 2);  // one past model.vocab
  PhiConfig c;
  c.eos_token_ids = {0};
  c.vocab_size = 3;
  absl::StatusOr<std::vector<int32_t>> ids = CheckedEosTokenIds(c, *tok);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, (std::vector<int32_t>{2}));
  c.vocab_size = 2;
  ids = CheckedEosTokenIds(c, *tok);
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  for (const char* needle :
       {"tokenizer_config.json", "eos_token \"<|im_end|>\"", "token id 2", "2-token output"}) {
    EXPECT_NE(ids.status().message().find(needle), std::string::npos) << ids.status();
  }
  // generation_config.json's list decides instead: the tokenizer's eos does not matter.
  c.eos_token_ids_from_generation_list = true;
  ids = CheckedEosTokenIds(c, *tok);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, (std::vector<int32_t>{0}));
  // An eos from the vocabulary passes through unchanged.
  tok = TwoTokenTokenizer("b");
  ASSERT_NE(tok, nullptr);
  c.eos_token_ids_from_generation_list = false;
  ids = CheckedEosTokenIds(c, *tok);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, (std::vector<int32_t>{1}));
}

TEST(StoppingCriteriaTest, StopSequenceAcrossTokenBoundaries) {
  StoppingCriteria s(Params(100, {"lo world"}), {kEos});
  EXPECT_EQ(s.Step(1, "Hel"), std::nullopt);
  EXPECT_EQ(s.Step(2, "lo wo"), std::nullopt);
  EXPECT_EQ(s.Step(3, ""), std::nullopt);  // a token whose bytes are held back
  EXPECT_EQ(s.Step(4, "rld"), FinishReason::kStopSequence);
}

TEST(StoppingCriteriaTest, StopSequenceFollowedByOneNewlineMatchesLikeDollarAnchor) {
  StoppingCriteria a(Params(100, {"end"}), {kEos});
  EXPECT_EQ(a.Step(1, "the en"), std::nullopt);
  EXPECT_EQ(a.Step(2, "d\n"), FinishReason::kStopSequence);

  StoppingCriteria b(Params(100, {"end"}), {kEos});
  EXPECT_EQ(b.Step(1, "the end\n\n"), std::nullopt);  // two newlines: `$` does not match
  EXPECT_EQ(b.Step(2, "end "), std::nullopt);         // text after the sequence
}

TEST(StoppingCriteriaTest, DoubleNewlineStopSequence) {
  StoppingCriteria s(Params(100, {"\n\n"}), {kEos});
  EXPECT_EQ(s.Step(1, "def f():\n"), std::nullopt);
  EXPECT_EQ(s.Step(2, "    pass"), std::nullopt);
  EXPECT_EQ(s.Step(3, "\n"), std::nullopt);
  EXPECT_EQ(s.Step(4, "\n"), FinishReason::kStopSequence);
}

TEST(StoppingCriteriaTest, LongOutputStillMatchesAcrossTheTrimmedBuffer) {
  // Many tokens before the stop sequence: the kept tail must still cover a sequence that
  // straddles the point where old text is dropped.
  const std::string stop = "STOP_SEQUENCE";
  StoppingCriteria s(Params(100000, {stop, "zz"}), {kEos});
  for (int i = 0; i < 5000; ++i) {
    ASSERT_EQ(s.Step(1, "abcdefg"), std::nullopt) << i;
  }
  EXPECT_EQ(s.Step(2, "STOP_SE"), std::nullopt);
  EXPECT_EQ(s.Step(3, "QUEN"), std::nullopt);
  EXPECT_EQ(s.Step(4, "CE"), FinishReason::kStopSequence);
}

TEST(StoppingCriteriaTest, MultiByteStopSequence) {
  StoppingCriteria s(Params(100, {"λ😀"}), {kEos});
  EXPECT_EQ(s.Step(1, "xλ"), std::nullopt);
  EXPECT_EQ(s.Step(2, ""), std::nullopt);
  EXPECT_EQ(s.Step(3, "😀"), FinishReason::kStopSequence);
}

TEST(StoppingCriteriaTest, EmptyStopSequenceIsIgnored) {
  StoppingCriteria s(Params(3, {""}), {kEos});
  EXPECT_EQ(s.Step(1, "a"), std::nullopt);
  EXPECT_EQ(s.Step(2, "b"), std::nullopt);
}

TEST(StoppingCriteriaTest, OrderEosBeforeStopSequence) {
  StoppingCriteria s(Params(100, {"<|endoftext|>"}), {kEos});
  EXPECT_EQ(s.Step(kEos, "<|endoftext|>"), FinishReason::kEosToken);
}

}  // namespace
}  // namespace phishard
