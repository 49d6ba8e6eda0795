// Special tokens from tokenizer_config.json and special_tokens_map.json, and special tokens that
// are not in the vocabulary. Every expected id below was checked by hand with
// `AutoTokenizer.from_pretrained(dir)` on the same files (tokenizer_class CodeGenTokenizer, as
// Phi's), under transformers 4.46.3 / tokenizers 0.20.3 (LoRAX pins transformers ^4.45) and
// transformers 5.24.0 / tokenizers 0.23.3; where the two differ the test says so.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/bpe_model.h"
#include "model/bpe_utf8.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"

namespace phishard {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

const fs::path kTokData = fs::path(PHISHARD_TESTDATA) / "tokenizers";
constexpr char kConfig[] = "tokenizer_config.json";
constexpr char kMap[] = "special_tokens_map.json";

// 256 byte symbols (byte b has id b), "he" 256, "hey" 257; added tokens <eos> 258 and
// <|endoftext|> 259, so a model.vocab of 258 entries and the first new id 260.
Json FixtureTokenizerJson() {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) {
    std::string s;
    bpe_utf8::AppendUtf8(ByteToUnicode()[b], &s);
    vocab[s] = b;
  }
  vocab["he"] = 256;
  vocab["hey"] = 257;
  Json j;
  j["added_tokens"] = Json::parse(R"([
      {"id": 258, "content": "<eos>", "special": true, "normalized": false},
      {"id": 259, "content": "<|endoftext|>", "special": true, "normalized": false}])");
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = Json::parse(R"({"type": "ByteLevel", "add_prefix_space": false})");
  j["decoder"] = Json::parse(R"({"type": "ByteLevel"})");
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"h e", "he y"}}};
  return j;
}

// A temporary model directory holding tokenizer.json and, when given, the two config files.
class TokenizerDir {
 public:
  TokenizerDir(const std::string& tokenizer_json, std::optional<std::string> config,
               std::optional<std::string> special_map) {
    std::string pattern = (fs::temp_directory_path() / "stok_XXXXXX").string();
    EXPECT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    Write("tokenizer.json", tokenizer_json);
    if (config.has_value()) Write(kConfig, *config);
    if (special_map.has_value()) Write(kMap, *special_map);
  }
  ~TokenizerDir() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  const fs::path& path() const { return dir_; }

 private:
  void Write(const char* name, const std::string& text) {
    std::ofstream(dir_ / name, std::ios::binary) << text;
  }
  fs::path dir_;
};

std::unique_ptr<Tokenizer> Load(std::optional<std::string> config,
                                std::optional<std::string> special_map,
                                const std::string& tokenizer_json = FixtureTokenizerJson().dump()) {
  TokenizerDir dir(tokenizer_json, std::move(config), std::move(special_map));
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromDir(dir.path());
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : nullptr;
}

absl::Status LoadError(std::optional<std::string> config, std::optional<std::string> special_map) {
  TokenizerDir dir(FixtureTokenizerJson().dump(), std::move(config), std::move(special_map));
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromDir(dir.path());
  return t.ok() ? absl::OkStatus() : t.status();
}

void ExpectEos(const Tokenizer& t, int32_t id, const std::string& content, const std::string& file,
               bool appended) {
  EXPECT_EQ(t.eos_token_id(), id);
  ASSERT_TRUE(t.eos_source().has_value());
  EXPECT_EQ(t.eos_source()->content, content);
  EXPECT_EQ(t.eos_source()->file, file);
  EXPECT_EQ(t.eos_source()->appended, appended);
}

// ---------------------------------------------------------------- special_tokens_map.json

TEST(SpecialTokensMap, EosOnlyInTheMapAsStringOrDict) {
  // No tokenizer_config.json at all (transformers picks the class from config.json).
  std::unique_ptr<Tokenizer> t = Load(std::nullopt, R"({"eos_token": "<eos>"})");
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 258, "<eos>", kMap, false);
  EXPECT_EQ(t->vocab_size(), 260);
  // The saved-AddedToken dict form, under a tokenizer_config.json that names no eos.
  t = Load(R"({"tokenizer_class": "CodeGenTokenizer"})",
           R"({"eos_token": {"content": "<eos>", "lstrip": false, "normalized": false,
                             "rstrip": false, "single_word": false, "special": true}})");
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 258, "<eos>", kMap, false);
}

TEST(SpecialTokensMap, VocabTokenNamedThereBecomesSpecial) {
  std::unique_ptr<Tokenizer> t = Load("{}", R"({"eos_token": "hey"})");
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 257, "hey", kMap, false);
  EXPECT_TRUE(t->IsSpecial(257));
  EXPECT_EQ(t->Encode("he hey"), (std::vector<int32_t>{256, ' ', 257}));
  EXPECT_EQ(t->Decode(t->Encode("he hey"), /*skip_special_tokens=*/true), "he ");
}

// transformers reads special_tokens_map.json only for a tokenizer_config.json without an
// added_tokens_decoder (saved before 4.34), and then the map's keys win.
TEST(SpecialTokensMap, WinsOverAConfigWithoutAddedTokensDecoder) {
  std::unique_ptr<Tokenizer> t = Load(R"({"eos_token": "hey"})", R"({"eos_token": "<eos>"})");
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 258, "<eos>", kMap, false);
  EXPECT_FALSE(t->IsSpecial(257));  // "hey" is no special token at all then
  // A null in the map removes the config's token (no eos at all, not even CodeGenTokenizer's
  // default <|endoftext|>); a bos from the config stays.
  t = Load(R"({"eos_token": "<eos>", "bos_token": "hey"})", R"({"eos_token": null})");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->bos_token_id(), 257);
  EXPECT_EQ(t->eos_token_id(), std::nullopt);
  EXPECT_FALSE(t->eos_source().has_value());
  // Likewise a null in tokenizer_config.json; with no eos_token key the default applies.
  t = Load(R"({"eos_token": null})", std::nullopt);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->eos_token_id(), std::nullopt);
  t = Load("{}", std::nullopt);
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 259, "<|endoftext|>", "tokenizer.json", false);
}

TEST(SpecialTokensMap, IgnoredWhenTheConfigHasAddedTokensDecoder) {
  std::unique_ptr<Tokenizer> t =
      Load(R"({"eos_token": "hey", "added_tokens_decoder": {"258": {"content": "<eos>",
                                                                     "special": true}}})",
           R"({"eos_token": "<eos>"})");
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 257, "hey", kConfig, false);
  // Even an empty added_tokens_decoder turns the map off; no file names an eos then, and
  // CodeGenTokenizer's class default <|endoftext|> applies (4.46.3; 5.24.0 agrees on the eos
  // text but, given an empty added_tokens_decoder, also drops tokenizer.json's other added tokens).
  t = Load(R"({"added_tokens_decoder": {}})", R"({"eos_token": "<eos>"})");
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 259, "<|endoftext|>", "tokenizer.json", false);
}

// 4.x merges the map's list into the config's (entries not there yet, after them); 5.24.0 renamed
// the key (extra_special_tokens) and ignores the map's additional_special_tokens.
TEST(SpecialTokensMap, AdditionalSpecialTokensAppendToTheConfigList) {
  std::unique_ptr<Tokenizer> t =
      Load(R"({"additional_special_tokens": ["<a>"]})",
           R"({"additional_special_tokens": ["<b>", {"content": "<a>"}]})");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->TokenToId("<a>"), 260);
  EXPECT_EQ(t->TokenToId("<b>"), 261);
  EXPECT_EQ(t->vocab_size(), 262);
  EXPECT_TRUE(t->IsSpecial(261));
}

TEST(SpecialTokensMap, MalformedFilesNameTheFileAndKey) {
  struct Case {
    std::optional<std::string> config, map;
    std::string needle;
  };
  for (const Case& c : std::vector<Case>{
           {std::nullopt, "[1]", "special_tokens_map.json: expected an object"},
           {std::nullopt, "{", "special_tokens_map.json: not valid JSON"},
           {std::nullopt, R"({"eos_token": 5})", "special_tokens_map.json: eos_token: expected"},
           {std::nullopt, R"({"eos_token": {"lstrip": true}})",
            "special_tokens_map.json: eos_token.content: missing"},
           {"{}", R"({"additional_special_tokens": "<a>"})",
            "special_tokens_map.json: additional_special_tokens: expected an array"},
           {R"({"pad_token": ["<pad>"]})", std::nullopt, "tokenizer_config.json: pad_token"},
       }) {
    const absl::Status s = LoadError(c.config, c.map);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(c.needle), std::string::npos) << s;
  }
}

// ---------------------------------------------------------------- tokens not in the vocabulary

// Before this, such an eos silently fell back to <|endoftext|>. transformers' fast tokenizer adds
// every named special token it does not hold as a new added token (id: the model vocab's size or
// one past the largest added id), so requests stop on that id and prompts split it out.
TEST(SpecialTokensNotInVocab, EosIsAddedWithANewIdAsTransformersDoes) {
  std::unique_ptr<Tokenizer> t = Load(R"({"eos_token": "<|im_end|>"})", std::nullopt);
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 260, "<|im_end|>", kConfig, true);
  EXPECT_EQ(t->vocab_size(), 261);
  EXPECT_TRUE(t->IsSpecial(260));
  EXPECT_EQ(t->Encode("x<|im_end|>hey"), (std::vector<int32_t>{'x', 260, 257}));
  EXPECT_EQ(t->Encode("x <|im_end|>"), (std::vector<int32_t>{'x', ' ', 260}));
  EXPECT_EQ(t->Decode(t->Encode("x<|im_end|>hey"), /*skip_special_tokens=*/true), "xhey");
  EXPECT_EQ(t->Decode({260}, /*skip_special_tokens=*/false), "<|im_end|>");
}

TEST(SpecialTokensNotInVocab, FromTheMapKeepsTheDictFlags) {
  std::unique_ptr<Tokenizer> t =
      Load("{}", R"({"eos_token": {"content": "<|im_end|>", "lstrip": true}})");
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 260, "<|im_end|>", kMap, true);
  EXPECT_EQ(t->Encode("x <|im_end|>"), (std::vector<int32_t>{'x', 260}));  // lstrip ate the space
}

// New ids follow transformers' SPECIAL_TOKENS_ATTRIBUTES order (bos, eos, unk, sep, pad, cls,
// mask, then additional_special_tokens), not the file's key order; a token already added is kept.
TEST(SpecialTokensNotInVocab, SeveralGetIdsInTransformersOrder) {
  std::unique_ptr<Tokenizer> t = Load(R"({"pad_token": "<pad>", "eos_token": "<|im_end|>",
      "bos_token": "<s>", "additional_special_tokens": ["<x>", "<eos>", "<s>"]})",
                                      std::nullopt);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->bos_token_id(), 260);
  ExpectEos(*t, 261, "<|im_end|>", kConfig, true);
  EXPECT_EQ(t->TokenToId("<pad>"), 262);
  EXPECT_EQ(t->TokenToId("<x>"), 263);
  EXPECT_EQ(t->TokenToId("<eos>"), 258);
  EXPECT_EQ(t->vocab_size(), 264);
}

// A Phi-2 chat fine-tune that points eos at a token its tokenizer.json lacks: id 50295, one past
// Phi-2's largest added token (inside its 51200-row embedding, so it can be served).
// A file of the shipped Phi-2 tokenizer fixture.
std::string Phi2File(const std::string& name) {
  std::ifstream in(kTokData / "phi-2" / name, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(SpecialTokensNotInVocab, Phi2ChatEos) {
  const std::string phi2 = Phi2File("tokenizer.json");
  Json config = Json::parse(Phi2File(kConfig));
  config["eos_token"] = "<|im_end|>";  // Phi-2's real config, added_tokens_decoder included
  std::unique_ptr<Tokenizer> t = Load(config.dump(), std::nullopt, phi2);
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 50295, "<|im_end|>", kConfig, true);
  EXPECT_EQ(t->Encode("hi<|im_end|>"), (std::vector<int32_t>{5303, 50295}));
  EXPECT_EQ(t->bos_token_id(), 50256);
  // The same through an old-style config (no added_tokens_decoder) and the map's dict form.
  config.erase("added_tokens_decoder");
  config["eos_token"] = "<|endoftext|>";
  t = Load(config.dump(), R"({"eos_token": {"content": "<|im_end|>", "lstrip": false,
                                            "normalized": false, "rstrip": false}})",
           phi2);
  ASSERT_NE(t, nullptr);
  ExpectEos(*t, 50295, "<|im_end|>", kMap, true);
  EXPECT_EQ(t->Encode("hi <|im_end|>"), (std::vector<int32_t>{5303, 220, 50295}));
}

// added_tokens_decoder entries that tokenizer.json lacks are numbered as transformers 4.46.3
// numbers them (checked by hand on Phi-2's files with these entries): not by their keys but in
// key order by tokenizers' add_tokens — new text gets the next free id (50295, 50296), a
// model.vocab token its vocab id (and becomes a special added token), an added token's text its
// id (still special).
TEST(AddedTokensDecoder, EntriesTokenizerJsonLacksAreNumberedAsTransformersDoes) {
  const std::string phi2 = Phi2File("tokenizer.json");
  Json config = Json::parse(Phi2File(kConfig));
  const Json flags = Json::parse(
      R"({"lstrip": false, "normalized": false, "rstrip": false, "single_word": false,
          "special": true})");
  auto entry = [&](const std::string& content, bool special) {
    Json e = flags;
    e["content"] = content;
    e["special"] = special;
    return e;
  };
  config["added_tokens_decoder"]["50400"] = entry("<new1>", true);
  config["added_tokens_decoder"]["50300"] = entry("<new0>", true);
  config["added_tokens_decoder"]["50500"] = entry("Hello", true);
  config["added_tokens_decoder"]["50600"] = entry("<|endoftext|>", false);
  std::unique_ptr<Tokenizer> t = Load(config.dump(), std::nullopt, phi2);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->Encode("<new0>"), (std::vector<int32_t>{50295}));
  EXPECT_EQ(t->Encode("<new1>"), (std::vector<int32_t>{50296}));
  EXPECT_EQ(t->Encode("Hello"), (std::vector<int32_t>{15496}));
  EXPECT_EQ(t->Encode("<|endoftext|>"), (std::vector<int32_t>{50256}));
  EXPECT_EQ(t->vocab_size(), 50297);
  EXPECT_EQ(t->Decode({50256, 15496}, true), "");  // transformers: '' (both special)
  EXPECT_EQ(t->Decode({50295, 64}, true), "a");
  ExpectEos(*t, 50256, "<|endoftext|>", kConfig, false);
  // Such an entry marked not special but named as the eos: special (transformers: 50295, special,
  // skipped by decode(skip_special_tokens)).
  config = Json::parse(Phi2File(kConfig));
  config["added_tokens_decoder"]["50300"] = entry("<x>", false);
  config["eos_token"] = "<x>";
  t = Load(config.dump(), std::nullopt, phi2);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->Encode("<x>"), (std::vector<int32_t>{50295}));
  EXPECT_TRUE(t->IsSpecial(50295));
  EXPECT_EQ(t->Decode({50295, 64}, true), "a");
  ExpectEos(*t, 50295, "<x>", kConfig, false);
}

// added_tokens.json next to tokenizer.json (transformers' legacy file): read only when
// tokenizer_config.json has no added_tokens_decoder, its entries then added as that file's entries
// tokenizer.json lacks, not special. Checked with AutoTokenizer / CodeGenTokenizer(Fast) on Phi-2's
// files under transformers 4.46.3 and 5.17 (same ids; perf-log 2026-11-29 18:57), and through
// FromDir, which reads the file.
TEST(AddedTokensJson, NextToTokenizerJsonOnlyWithoutAddedTokensDecoder) {
  const std::string phi2 = Phi2File("tokenizer.json");
  const std::string map = Phi2File(kMap);
  Json config = Json::parse(Phi2File(kConfig));
  const std::vector<int32_t> as_text = {27, 3605, 29};  // "<new>" as BPE pieces
  // The config has added_tokens_decoder (Phi-2's real one): the file is not read.
  absl::StatusOr<std::unique_ptr<Tokenizer>> t =
      Tokenizer::FromJson(phi2, config.dump(), map, R"({"<new>": 50295})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("<new>"), as_text);
  EXPECT_EQ((*t)->vocab_size(), 50295);
  config.erase("added_tokens_decoder");
  // A new token, at its index or with a gap: the next free id, not special.
  for (const char* added : {R"({"<new>": 50295})", R"({"<new>": 50400})"}) {
    t = Tokenizer::FromJson(phi2, config.dump(), map, added);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ((*t)->Encode("Hello<new>"), (std::vector<int32_t>{15496, 50295})) << added;
    EXPECT_EQ((*t)->vocab_size(), 50296) << added;
    EXPECT_FALSE((*t)->IsSpecial(50295)) << added;
    EXPECT_EQ((*t)->Decode({50295, 64}, true), "<new>a") << added;
  }
  // Entries tokenizer.json already holds: nothing changes.
  t = Tokenizer::FromJson(phi2, config.dump(), map,
                          R"({"<|endoftext|>": 50256, "                ": 50283})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("<new>"), as_text);
  EXPECT_EQ((*t)->vocab_size(), 50295);
  EXPECT_TRUE((*t)->IsSpecial(50256));
  // A malformed file names itself and the entry.
  t = Tokenizer::FromJson(phi2, config.dump(), map, R"({"<new>": "x"})");
  EXPECT_TRUE(absl::IsInvalidArgument(t.status()));
  EXPECT_NE(t.status().message().find("added_tokens.json[\"<new>\"]"), absl::string_view::npos)
      << t.status();
  // FromDir reads it.
  const fs::path dir = fs::path(::testing::TempDir()) / "added_tokens_json_next_to_tokenizer_json";
  fs::create_directories(dir);
  for (const auto& [name, text] : {std::pair<std::string, std::string>{"tokenizer.json", phi2},
                                   {kConfig, config.dump()},
                                   {kMap, map},
                                   {"added_tokens.json", R"({"<new>": 50295})"}}) {
    std::ofstream(dir / name, std::ios::binary) << text;
  }
  t = Tokenizer::FromDir(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("<new>"), (std::vector<int32_t>{50295}));
}

// ---------------------------------------------------------------- shipped fixtures

TEST(SpecialTokensShippedFixtures, Unchanged) {
  // Phi-2 ships a special_tokens_map.json too; its tokenizer_config.json has an
  // added_tokens_decoder, so transformers (and we) ignore the map.
  absl::StatusOr<std::unique_ptr<Tokenizer>> phi2 = Tokenizer::FromDir(kTokData / "phi-2");
  ASSERT_TRUE(phi2.ok()) << phi2.status();
  ExpectEos(**phi2, 50256, "<|endoftext|>", kConfig, false);
  EXPECT_EQ((*phi2)->vocab_size(), 50295);
  absl::StatusOr<std::unique_ptr<Tokenizer>> gpt2 = Tokenizer::FromDir(kTokData / "gpt2");
  ASSERT_TRUE(gpt2.ok()) << gpt2.status();
  ExpectEos(**gpt2, 50256, "<|endoftext|>", "tokenizer.json", false);
  absl::StatusOr<std::unique_ptr<Tokenizer>> tiny =
      Tokenizer::FromDir(fs::path(PHISHARD_MODELS) / "tiny-phi-code");
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  ASSERT_TRUE((*tiny)->eos_source().has_value());
  EXPECT_EQ((*tiny)->eos_source()->file, kConfig);
  EXPECT_FALSE((*tiny)->eos_source()->appended);
}

}  // namespace
}  // namespace phishard
