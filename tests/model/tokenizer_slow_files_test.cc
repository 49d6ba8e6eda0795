// Tokenizers saved as the slow tokenizer's files only (vocab.json + merges.txt, optionally
// added_tokens.json; no tokenizer.json), converted as transformers' GPT2Converter does
// (model/bpe_slow_files.h). The phi-2 and gpt2 fixtures are written out in that form from their
// tokenizer.json (the model's vocab and merges, phi-2's added_tokens.json and configs as they are)
// and must encode every golden vector as the tokenizer.json does; the small cases pin
// transformers' reading of merges.txt, the ByteLevel options and the errors. Every expected value
// was checked with CodeGenTokenizerFast.from_pretrained on the same slow-only folders
// (transformers 4.46.3, tokenizers 0.20.3: tools/hf_slow_tokenizer_check.py), which converts them
// with GPT2Converter: 0 mismatches on the phi-2 (109) and gpt2 (142) vectors.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "model/bpe_slow_files.h"
#include "model/text_file.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"

namespace phishard {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

const fs::path kTokData = fs::path(PHISHARD_TESTDATA) / "tokenizers";

std::string ReadFile(const fs::path& path) {
  absl::StatusOr<std::string> text = ReadTextFile(path);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.value_or("");
}

void WriteFile(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// A fresh folder under the test's temp dir.
fs::path TempDir(const std::string& name) {
  const fs::path dir = fs::path(testing::TempDir()) / ("slow_files_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// `src`'s tokenizer.json written as vocab.json + merges.txt (with the "#version" header) in a new
// folder, with `copies` of src's other files.
fs::path SlowCopy(const std::string& name, const std::vector<std::string>& copies) {
  const fs::path src = kTokData / name;
  const Json tj = Json::parse(ReadFile(src / "tokenizer.json"));
  const fs::path dir = TempDir(name);
  WriteFile(dir / "vocab.json", tj.at("model").at("vocab").dump());
  std::string merges = "#version: 0.2\n";
  for (const Json& m : tj.at("model").at("merges")) {
    merges += m.is_string() ? m.get<std::string>()
                            : m[0].get<std::string>() + " " + m[1].get<std::string>();
    merges += "\n";
  }
  WriteFile(dir / "merges.txt", merges);
  for (const std::string& f : copies) fs::copy_file(src / f, dir / f);
  return dir;
}

std::unique_ptr<Tokenizer> Load(const fs::path& dir) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromDir(dir);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : nullptr;
}

// Every golden vector of fixture `name` (as tokenizer_test.cc reads them): the converted slow
// files give the vector's ids, and the same ids and decodes as the tokenizer.json.
void ExpectSameAsTokenizerJson(const std::string& name, const Tokenizer& slow) {
  std::unique_ptr<Tokenizer> fast = Load(kTokData / name);
  ASSERT_TRUE(fast);
  EXPECT_EQ(slow.vocab_size(), fast->vocab_size());
  EXPECT_EQ(slow.eos_token_id(), fast->eos_token_id());
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(kTokData / name / "vectors")) {
    if (entry.path().extension() != ".jsonl") continue;
    std::ifstream in(entry.path());
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      const Json v = Json::parse(line);
      std::string text = v.at("text").get<std::string>();
      if (v.value("add_prefix_space", false)) text = " " + text;
      const std::vector<int32_t> want = v.at("ids").get<std::vector<int32_t>>();
      const std::vector<int32_t> got = slow.Encode(text);
      EXPECT_EQ(got, want) << entry.path().filename() << ": " << text;
      EXPECT_EQ(slow.EncodeWithSpecialTokens(text), fast->EncodeWithSpecialTokens(text));
      EXPECT_EQ(slow.Decode(want, false), fast->Decode(want, false));
      EXPECT_EQ(slow.Decode(want, true), fast->Decode(want, true));
      ++checked;
    }
  }
  std::printf("[slow files] %s: %d vectors\n", name.c_str(), checked);
  EXPECT_GT(checked, 100);
}

TEST(TokenizerSlowFiles, Phi2MatchesItsTokenizerJson) {
  const fs::path dir =
      SlowCopy("phi-2", {"added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"});
  std::unique_ptr<Tokenizer> slow = Load(dir);
  ASSERT_TRUE(slow);
  ExpectSameAsTokenizerJson("phi-2", *slow);
  // The whitespace runs of added_tokens.json (50257-50294) are whole tokens; <|endoftext|> is
  // special.
  EXPECT_EQ(slow->Encode("a    b"), (std::vector<int32_t>{64, 50284, 65}));
  EXPECT_TRUE(slow->IsSpecial(50256));
  EXPECT_FALSE(slow->IsSpecial(50284));
}

TEST(TokenizerSlowFiles, Gpt2VocabAndMergesOnly) {
  std::unique_ptr<Tokenizer> slow = Load(SlowCopy("gpt2", {}));
  ASSERT_TRUE(slow);
  ExpectSameAsTokenizerJson("gpt2", *slow);
}

// A small byte-level vocabulary: "a", "b", "ab", "Ġ", "Ġa", "<s>".
constexpr char kVocab[] = R"({"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġa": 4, "<s>": 5})";

absl::StatusOr<std::unique_ptr<Tokenizer>> Small(const std::string& merges,
                                                 const std::string& config = "",
                                                 const std::string& added = "") {
  absl::StatusOr<SlowFilesJson> json = TokenizerJsonFromSlowFiles(kVocab, merges, config, "");
  if (!json.ok()) return json.status();
  return Tokenizer::FromJson(json->tokenizer_json, json->tokenizer_config_json, "", added);
}

TEST(TokenizerSlowFiles, ReadsMergesTxtAsTransformersDoes) {
  // As transformers 5.17 reads merges.txt (tools/hf_slow_tokenizer_check.py on the device, perf-log
  // 2026-11-29 18:53 / 18:55): every line but "#version" headers is a merge, with or without the
  // header and the final newline; \r is ignored. transformers 4.46 dropped line 0 and the text
  // after the last newline instead ({0, 1, 4} without the header, {2, 3, 0} without the final
  // newline).
  for (const char* merges : {"#version: 0.2\na b\r\nĠ a\n", "a b\nĠ a\n", "#version: 0.2\na b\nĠ a",
                             "#version: 0.2\n#version: 0.2\na b\nĠ a\n"}) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> t = Small(merges);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ((*t)->Encode("ab a"), (std::vector<int32_t>{2, 4})) << merges;
  }
  // Blank lines and tabs carry the same merges as transformers 4 read them (5 refuses the file).
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Small("#version: 0.2\na\tb\n\nĠ a\n");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("ab a"), (std::vector<int32_t>{2, 4}));
  // Any other line that is not two tokens is refused, naming it (both versions refuse these).
  for (const char* bad : {"#foo\na b\n", "#version: 0.2\na b c\n"}) {
    t = Small(bad);
    EXPECT_TRUE(absl::IsInvalidArgument(t.status())) << bad;
    EXPECT_NE(t.status().message().find("merges.txt line"), absl::string_view::npos) << bad;
  }
}

TEST(TokenizerSlowFiles, PrefixSpaceBosTemplateAndAddedTokens) {
  const std::string merges = "#version: 0.2\na b\nĠ a\n";
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Small(merges, R"({"add_prefix_space": true})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("a"), (std::vector<int32_t>{4}));
  t = Small(merges, R"({"add_bos_token": true, "bos_token": "<s>"})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("ab"), (std::vector<int32_t>{2}));
  EXPECT_EQ((*t)->EncodeWithSpecialTokens("ab"), (std::vector<int32_t>{5, 2}));
  // added_tokens.json: a named special token is special, any other added token is not; bos and
  // unk default to "<|endoftext|>", which this vocabulary lacks: a new special token, id 8
  // (transformers: all_special_ids [8, 6]).
  t = Small(merges, R"({"eos_token": "<e>"})", R"({"<e>": 6, "bb": 7})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("abb<e>"), (std::vector<int32_t>{0, 7, 6}));
  EXPECT_TRUE((*t)->IsSpecial(6));
  EXPECT_FALSE((*t)->IsSpecial(7));
  EXPECT_TRUE((*t)->IsSpecial(8));
  EXPECT_EQ((*t)->Encode("<|endoftext|>"), (std::vector<int32_t>{8}));
  EXPECT_EQ((*t)->eos_token_id(), 6);
  // The file's indices are not the ids: tokenizers numbers the entries in index order, a vocab
  // token keeps its id (transformers: <x> 6, <y> 7, "ab" 2, eos <|endoftext|> 8).
  t = Small(merges, "", R"({"<y>": 20, "<x>": 10, "ab": 30})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("<x><y>ab"), (std::vector<int32_t>{6, 7, 2}));
  EXPECT_EQ((*t)->vocab_size(), 9);
  EXPECT_EQ((*t)->eos_token_id(), 8);
  // With an added_tokens_decoder in tokenizer_config.json, added_tokens.json is not read: "bb" is
  // two tokens (transformers: [1, 1]).
  t = Small(merges, R"({"added_tokens_decoder": {}})", R"({"bb": 7})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("bb"), (std::vector<int32_t>{1, 1}));
  // The class default bos / eos / unk makes an added_tokens.json entry with its text special
  // (transformers: added_tokens_decoder[6].special, skipped by decode(skip_special_tokens)).
  t = Small(merges, "", R"({"<|endoftext|>": 6})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("<|endoftext|>"), (std::vector<int32_t>{6}));
  EXPECT_TRUE((*t)->IsSpecial(6));
  EXPECT_EQ((*t)->Decode({6, 0}, true), "a");
  EXPECT_EQ((*t)->eos_token_id(), 6);
}

TEST(TokenizerSlowFiles, BadFilesNameTheFileAndEntry) {
  struct Case {
    std::string vocab, merges, config, want;
  };
  const std::string merges = "#version: 0.2\na b\n";
  const Case cases[] = {
      {"[1]", merges, "", "vocab.json: expected an object"},
      {"{", merges, "", "vocab.json: not valid JSON"},
      {"", merges, "", "vocab.json: empty"},
      {kVocab, "#version: 0.2\na b c\n", "", "merges.txt line 2"},
      {kVocab, merges, R"({"add_bos_token": true, "bos_token": "<bos>"})", "bos_token \"<bos>\""},
      {kVocab, merges, R"({"add_prefix_space": "yes"})", "add_prefix_space"},
      {kVocab, "#version: 0.2\na \xff\n", "", "merges.txt: a merge is not valid UTF-8"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<SlowFilesJson> json =
        TokenizerJsonFromSlowFiles(c.vocab, c.merges, c.config, "");
    ASSERT_FALSE(json.ok()) << c.want;
    EXPECT_EQ(json.status().code(), absl::StatusCode::kInvalidArgument) << json.status();
    EXPECT_NE(json.status().message().find(c.want), std::string::npos) << json.status();
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> bad = Small(merges, "", R"({"x": -1})");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << bad.status();
  EXPECT_NE(bad.status().message().find("added_tokens.json[\"x\"]"), std::string::npos)
      << bad.status();
  // A folder with neither tokenizer.json nor vocab.json + merges.txt.
  const fs::path dir = TempDir("only_vocab");
  WriteFile(dir / "vocab.json", kVocab);
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromDir(dir);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("vocab.json and merges.txt"), std::string::npos)
      << t.status();
}

}  // namespace
}  // namespace phishard
