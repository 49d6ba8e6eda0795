#include "model/bpe_slow_files.h"

#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "model/bpe_json.h"
#include "model/json_depth.h"

namespace phishard {
namespace {

using bpe_json::Json;
using bpe_json::Sv;

// An optional file's "" (absent) is an empty object; a required one's is an error.
absl::StatusOr<Json> ParseObject(std::string_view text, std::string_view file,
                                 bool optional = true) {
  if (text.empty()) {
    if (optional) return Json::object();
    return absl::InvalidArgumentError(absl::StrCat(Sv(file), ": empty"));
  }
  if (absl::Status s = CheckJsonNesting(text, file); !s.ok()) return s;
  try {
    Json j = Json::parse(text.begin(), text.end());
    if (!j.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Sv(file), ": expected an object, got ", j.type_name()));
    }
    return j;
  } catch (const Json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat(Sv(file), ": not valid JSON: ", e.what()));
  }
}

// A special-token entry's text: a string, or an AddedToken object's "content"; "" otherwise.
std::string TokenText(const Json* v) {
  if (v == nullptr) return "";
  if (v->is_string()) return v->get<std::string>();
  if (const Json* c = bpe_json::Find(*v, "content"); c != nullptr && c->is_string()) {
    return c->get<std::string>();
  }
  return "";
}

// The slow tokenizer classes' default special tokens (CodeGenTokenizer's and GPT2Tokenizer's
// bos / eos / unk), used for the names neither file mentions.
constexpr char kClassDefaultSpecial[] = "<|endoftext|>";

}  // namespace

absl::StatusOr<SlowFilesJson> TokenizerJsonFromSlowFiles(std::string_view vocab_json,
                                                         std::string_view merges_txt,
                                                         std::string_view tokenizer_config_json,
                                                         std::string_view special_tokens_map_json) {
  absl::StatusOr<Json> vocab = ParseObject(vocab_json, "vocab.json", /*optional=*/false);
  if (!vocab.ok()) return vocab.status();
  absl::StatusOr<Json> config = ParseObject(tokenizer_config_json, "tokenizer_config.json");
  if (!config.ok()) return config.status();
  absl::StatusOr<Json> special_map =
      ParseObject(special_tokens_map_json, "special_tokens_map.json");
  if (!special_map.ok()) return special_map.status();

  // merges.txt as transformers 5 reads it (tokenizers' BPE file reader): every line (a last one
  // without a newline too, a trailing \r dropped) but those starting with "#version" is one merge,
  // two tokens separated by a space. transformers 4 took read().split("\n")[1:-1] instead, which
  // differs only for files without the header or the final newline (it drops their first or last
  // merge). Like transformers 4, blank lines and other whitespace between the tokens are taken
  // (transformers 5 refuses such files).
  std::vector<absl::string_view> lines = absl::StrSplit(Sv(merges_txt), '\n');
  if (!lines.empty() && lines.back().empty()) lines.pop_back();  // after the final newline
  Json merges = Json::array();
  for (size_t i = 0; i < lines.size(); ++i) {
    if (absl::StartsWith(lines[i], "#version")) continue;
    std::vector<absl::string_view> parts =
        absl::StrSplit(lines[i], absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (parts.empty()) continue;
    if (parts.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("merges.txt line ", i + 1,
                       ": expected two tokens separated by a space, got \"", lines[i], "\""));
    }
    merges.push_back(absl::StrCat(parts[0], " ", parts[1]));
  }

  absl::StatusOr<bool> prefix =
      bpe_json::Bool(*config, "add_prefix_space", false, "tokenizer_config");
  if (!prefix.ok()) return prefix.status();
  absl::StatusOr<bool> add_bos =
      bpe_json::Bool(*config, "add_bos_token", false, "tokenizer_config");
  if (!add_bos.ok()) return add_bos.status();

  Json doc = Json::object();
  doc["version"] = "1.0";
  doc["normalizer"] = nullptr;
  doc["model"] = {{"type", "BPE"},
                  {"dropout", nullptr},
                  {"unk_token", nullptr},
                  {"continuing_subword_prefix", ""},
                  {"end_of_word_suffix", ""},
                  {"fuse_unk", false},
                  {"byte_fallback", false},
                  {"vocab", *vocab},
                  {"merges", merges}};
  doc["pre_tokenizer"] = {{"type", "ByteLevel"},
                          {"add_prefix_space", *prefix},
                          {"trim_offsets", true},
                          {"use_regex", true}};
  doc["decoder"] = {{"type", "ByteLevel"},
                    {"add_prefix_space", true},
                    {"trim_offsets", true},
                    {"use_regex", true}};
  if (*add_bos) {
    const std::string bos = TokenText(bpe_json::Find(*config, "bos_token"));
    const Json* id = bos.empty() ? nullptr : bpe_json::Find(*vocab, bos);
    if (id == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer_config.json: add_bos_token is true but bos_token \"", bos,
                       "\" is not in vocab.json"));
    }
    doc["post_processor"] = {
        {"type", "TemplateProcessing"},
        {"single", Json::array({{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}},
                                {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
        {"pair", Json::array({{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
        {"special_tokens",
         {{bos, {{"id", bos}, {"ids", Json::array({*id})}, {"tokens", Json::array({bos})}}}}}};
  } else {
    doc["post_processor"] = {{"type", "ByteLevel"},
                             {"add_prefix_space", true},
                             {"trim_offsets", false},
                             {"use_regex", true}};
  }
  doc["added_tokens"] = Json::array();  // added_tokens.json: Tokenizer::FromJson adds those
  // The class defaults as if tokenizer_config.json named them: FromJson then adds them as it
  // adds any named special token (a vocabulary token keeps its id, other text gets a new one).
  Json amended = *config;
  for (const char* key : {"bos_token", "eos_token", "unk_token"}) {
    if (!config->contains(key) && !special_map->contains(key)) amended[key] = kClassDefaultSpecial;
  }
  try {
    return SlowFilesJson{doc.dump(), amended.dump()};
  } catch (const Json::type_error& e) {  // text that is not UTF-8 (merges.txt is read as bytes)
    return absl::InvalidArgumentError(
        absl::StrCat("merges.txt: a merge is not valid UTF-8 (", e.what(), ")"));
  }
}

}  // namespace phishard
