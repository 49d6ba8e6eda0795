#include "model/tokenizer.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/logging.h"
#include "model/bpe_added_vocab.h"
#include "model/bpe_json.h"
#include "model/bpe_model.h"
#include "model/bpe_post_processor.h"
#include "model/bpe_pretokenizer.h"
#include "model/bpe_slow_files.h"
#include "model/bpe_utf8.h"
#include "model/json_depth.h"
#include "model/text_file.h"

namespace phishard {

using bpe_json::Json;

struct Tokenizer::Impl {
  std::unique_ptr<AddedVocab> added;
  PreTokenizer pre_tokenizer;
  std::unique_ptr<BpeModel> bpe;
  BpeModel::Vocab vocab;                                // byte-level token string -> id
  absl::flat_hash_map<std::string, int32_t> added_ids;  // added token content -> id
  std::vector<std::string> id_bytes;                    // [vocab_size] decoded bytes per id
  std::vector<uint8_t> special;                         // [vocab_size] 1 = special token
  int32_t vocab_size = 0;
  std::optional<int32_t> eos_id, bos_id;
  std::optional<EosSource> eos_source;  // set with eos_id
  bool clean_up = false;
  PostProcessorIds post;  // ids add_special_tokens puts around a sequence

  std::optional<int32_t> Lookup(std::string_view token) const {
    if (auto it = added_ids.find(bpe_json::Sv(token)); it != added_ids.end()) return it->second;
    if (auto it = vocab.find(bpe_json::Sv(token)); it != vocab.end()) return it->second;
    return std::nullopt;
  }
};

namespace {

absl::StatusOr<Json> ParseJson(std::string_view text, std::string_view what) {
  if (absl::Status s = CheckJsonNesting(text, what); !s.ok()) return s;
  // nlohmann reports the error position only through its exception; it does not escape here.
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const Json::parse_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(bpe_json::Sv(what), ": not valid JSON: ", e.what()));
  }
}

absl::StatusOr<int32_t> TokenId(const Json& v, std::string_view where) {
  if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(absl::StrCat(
        bpe_json::Sv(where), ": expected a non-negative 32-bit integer id, got ", v.dump()));
  }
  return static_cast<int32_t>(v.get<int64_t>());
}

absl::Status ParseMerges(const Json& merges,
                         std::vector<std::pair<std::string, std::string>>* out) {
  if (!merges.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.merges: expected an array, got ", merges.type_name()));
  }
  out->reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const Json& m = merges[i];
    if (m.is_string()) {  // legacy "a b" form
      const std::string& s = m.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("model.merges[", i, "]: expected \"left right\", got \"", s, "\""));
      }
      out->emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      out->emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "model.merges[", i, "]: expected \"left right\" or [left, right], got ", m.dump()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<AddedToken> ParseAddedToken(const Json& t, std::string_view where, bool need_id) {
  if (!t.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(bpe_json::Sv(where), ": expected an object, got ", t.type_name()));
  }
  AddedToken token;
  if (need_id) {
    const Json* id = bpe_json::Find(t, "id");
    if (id == nullptr)
      return absl::InvalidArgumentError(absl::StrCat(bpe_json::Sv(where), ".id: missing"));
    absl::StatusOr<int32_t> parsed = TokenId(*id, absl::StrCat(bpe_json::Sv(where), ".id"));
    if (!parsed.ok()) return parsed.status();
    token.id = *parsed;
  }
  absl::StatusOr<std::string> content = bpe_json::String(t, "content", where);
  if (!content.ok()) return content.status();
  token.content = *std::move(content);
  struct Flag {
    const char* key;
    bool* value;
    bool default_value;
  };
  // HF AddedToken defaults.
  for (const Flag& f :
       {Flag{"special", &token.special, false}, Flag{"lstrip", &token.lstrip, false},
        Flag{"rstrip", &token.rstrip, false}, Flag{"normalized", &token.normalized, true},
        Flag{"single_word", &token.single_word, false}}) {
    absl::StatusOr<bool> v = bpe_json::Bool(t, f.key, f.default_value, where);
    if (!v.ok()) return v.status();
    *f.value = *v;
  }
  return token;
}

constexpr char kConfigFile[] = "tokenizer_config.json";
constexpr char kSpecialMapFile[] = "special_tokens_map.json";

// A special token that tokenizer_config.json or special_tokens_map.json names.
struct NamedToken {
  std::string key;   // "eos_token", "additional_special_tokens", ...
  const char* file;  // kConfigFile or kSpecialMapFile
  AddedToken token;  // content and flags; special; id unset
};

// "text" or {"content": "text", "lstrip": ...}, made an AddedToken with special=True as
// transformers does: a string gets normalized=false, a dict its flags (normalized false if absent).
absl::StatusOr<AddedToken> ParseNamedToken(const Json& v, std::string_view where) {
  AddedToken t;
  if (v.is_string()) {
    t.content = v.get<std::string>();
    t.normalized = false;
  } else if (v.is_object()) {
    absl::StatusOr<AddedToken> parsed = ParseAddedToken(v, where, /*need_id=*/false);
    if (!parsed.ok()) return parsed.status();
    t = *std::move(parsed);
    if (bpe_json::Find(v, "normalized") == nullptr) t.normalized = false;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        bpe_json::Sv(where), ": expected a string or {\"content\": ...}, got ", v.type_name()));
  }
  t.special = true;
  return t;
}

// The special tokens the two files name, in transformers' SPECIAL_TOKENS_ATTRIBUTES order (the
// order in which missing ones get new ids), additional_special_tokens last. Precedence as in
// transformers' PreTrainedTokenizerBase._from_pretrained (tokenization_utils_base.py: its
// `"added_tokens_decoder" in init_kwargs` test and "begin legacy" branch, 4.34 through 5.x):
// special_tokens_map.json is read only when tokenizer_config.json has no "added_tokens_decoder"
// key (files saved before 4.34, or hand-written), and then each key it has replaces
// tokenizer_config.json's (null removes it), except an additional_special_tokens list, which is
// appended to tokenizer_config.json's (4.x; LoRAX pins ^4.45). `config` is {} without a
// tokenizer_config.json; `special_map` is null without a special_tokens_map.json. Sets
// `*eos_null` when the file that decides eos_token says null (transformers: no eos token then).
absl::StatusOr<std::vector<NamedToken>> NamedSpecialTokens(const Json& config,
                                                           const Json* special_map,
                                                           bool* eos_null) {
  const bool use_map = special_map != nullptr && !config.contains("added_tokens_decoder");
  std::vector<NamedToken> out;
  auto add = [&](const Json& v, const char* key, const char* file) -> absl::Status {
    absl::StatusOr<AddedToken> t = ParseNamedToken(v, absl::StrCat(file, ": ", key));
    if (!t.ok()) return t.status();
    if (!t->content.empty()) out.push_back(NamedToken{key, file, *std::move(t)});
    return absl::OkStatus();
  };
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                          "cls_token", "mask_token"}) {
    const bool from_map = use_map && special_map->contains(key);
    const Json& src = from_map ? *special_map : config;
    const Json* v = bpe_json::Find(src, key);
    if (v == nullptr) {
      if (std::string_view(key) == "eos_token") *eos_null = src.contains(key);
      continue;
    }
    if (absl::Status s = add(*v, key, from_map ? kSpecialMapFile : kConfigFile); !s.ok()) return s;
  }
  constexpr char kExtra[] = "additional_special_tokens";
  std::vector<std::pair<const Json*, const char*>> lists = {
      {bpe_json::Find(config, kExtra), kConfigFile}};
  if (use_map && special_map->contains(kExtra)) {
    const Json* map_list = bpe_json::Find(*special_map, kExtra);
    if (map_list == nullptr || !map_list->is_array()) lists.clear();  // replaces, not merges
    lists.emplace_back(map_list, kSpecialMapFile);
  }
  for (const auto& [list, file] : lists) {
    if (list == nullptr) continue;
    if (!list->is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": ", kExtra, ": expected an array, got ", list->type_name()));
    }
    for (const Json& v : *list) {
      if (absl::Status s = add(v, kExtra, file); !s.ok()) return s;
    }
  }
  return out;
}

// Parses an optional JSON object file; `text` empty means absent (null result).
absl::StatusOr<std::optional<Json>> ParseOptionalObject(std::string_view text,
                                                        std::string_view file) {
  if (text.empty()) return std::optional<Json>();
  absl::StatusOr<Json> parsed = ParseJson(text, file);
  if (!parsed.ok()) return parsed.status();
  if (!parsed->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(bpe_json::Sv(file), ": expected an object, got ", parsed->type_name()));
  }
  return std::optional<Json>(*std::move(parsed));
}

absl::Status CheckModel(const Json& model) {
  if (const Json* type = bpe_json::Find(model, "type"); type != nullptr) {
    if (!type->is_string() || type->get<std::string>() != "BPE") {
      return absl::UnimplementedError(
          absl::StrCat("model.type: only BPE is supported, got ", type->dump()));
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    absl::StatusOr<std::string> v = bpe_json::StringOr(model, key, "model");
    if (!v.ok()) return v.status();
    if (!v->empty()) {
      return absl::UnimplementedError(
          absl::StrCat("model.", key, ": not supported by byte-level BPE, got \"", *v, "\""));
    }
  }
  absl::StatusOr<bool> byte_fallback = bpe_json::Bool(model, "byte_fallback", false, "model");
  if (!byte_fallback.ok()) return byte_fallback.status();
  if (*byte_fallback) {
    return absl::UnimplementedError("model.byte_fallback: true is not supported (byte-level BPE)");
  }
  if (const Json* dropout = bpe_json::Find(model, "dropout");
      dropout != nullptr && !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    return absl::UnimplementedError(
        absl::StrCat("model.dropout: BPE dropout is not supported, got ", dropout->dump()));
  }
  return absl::OkStatus();
}

absl::Status CheckDecoder(const Json& root) {
  const Json* decoder = bpe_json::Find(root, "decoder");
  if (decoder == nullptr) {
    return absl::UnimplementedError("decoder: missing; only ByteLevel is supported");
  }
  absl::StatusOr<std::string> type = bpe_json::String(*decoder, "type", "decoder");
  if (!type.ok()) return type.status();
  if (*type != "ByteLevel") {
    return absl::UnimplementedError(
        absl::StrCat("decoder.type: only ByteLevel is supported, got \"", *type, "\""));
  }
  return absl::OkStatus();
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    std::string_view tokenizer_json, std::string_view tokenizer_config_json,
    std::string_view special_tokens_map_json, std::string_view added_tokens_json) {
  absl::StatusOr<Json> root = ParseJson(tokenizer_json, "tokenizer.json");
  if (!root.ok()) return root.status();
  if (!root->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json: expected an object, got ", root->type_name()));
  }
  auto impl = std::make_unique<Impl>();

  // --- model: vocab, merges ---
  const Json* model = bpe_json::Find(*root, "model");
  if (model == nullptr || !model->is_object()) {
    return absl::InvalidArgumentError("model: missing or not an object");
  }
  if (absl::Status s = CheckModel(*model); !s.ok()) return s;
  const Json* vocab = bpe_json::Find(*model, "vocab");
  if (vocab == nullptr || !vocab->is_object()) {
    return absl::InvalidArgumentError("model.vocab: missing or not an object");
  }
  impl->vocab.reserve(vocab->size());
  int32_t max_id = -1;
  for (const auto& [token, id_json] : vocab->items()) {
    absl::StatusOr<int32_t> id = TokenId(id_json, absl::StrCat("model.vocab[\"", token, "\"]"));
    if (!id.ok()) return id.status();
    impl->vocab[token] = *id;
    max_id = std::max(max_id, *id);
  }
  const Json* merges_json = bpe_json::Find(*model, "merges");
  if (merges_json == nullptr) return absl::InvalidArgumentError("model.merges: missing");
  std::vector<std::pair<std::string, std::string>> merges;
  if (absl::Status s = ParseMerges(*merges_json, &merges); !s.ok()) return s;
  BpeModel::Options options;
  absl::StatusOr<bool> ignore_merges = bpe_json::Bool(*model, "ignore_merges", false, "model");
  if (!ignore_merges.ok()) return ignore_merges.status();
  options.ignore_merges = *ignore_merges;
  absl::StatusOr<bool> fuse_unk = bpe_json::Bool(*model, "fuse_unk", false, "model");
  if (!fuse_unk.ok()) return fuse_unk.status();
  options.fuse_unk = *fuse_unk;
  absl::StatusOr<std::string> unk = bpe_json::StringOr(*model, "unk_token", "model");
  if (!unk.ok()) return unk.status();
  if (!unk->empty()) {
    auto it = impl->vocab.find(*unk);
    if (it == impl->vocab.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.unk_token: \"", *unk, "\" is not in model.vocab"));
    }
    options.unk_id = it->second;
  }
  absl::StatusOr<std::unique_ptr<BpeModel>> bpe = BpeModel::Create(impl->vocab, merges, options);
  if (!bpe.ok()) return bpe.status();
  impl->bpe = *std::move(bpe);

  // --- normalizer, pre_tokenizer, decoder ---
  if (const Json* normalizer = bpe_json::Find(*root, "normalizer"); normalizer != nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("normalizer: not supported (byte-level BPE expects null), got ",
                     normalizer->dump().substr(0, 200)));
  }
  const Json* pre_json = bpe_json::Find(*root, "pre_tokenizer");
  absl::StatusOr<PreTokenizer> pre = PreTokenizer::FromJson(pre_json ? *pre_json : Json());
  if (!pre.ok()) return pre.status();
  if (!pre->has_byte_level()) {
    return absl::UnimplementedError(
        "pre_tokenizer: no ByteLevel step; only byte-level BPE tokenizers are supported");
  }
  impl->pre_tokenizer = *std::move(pre);
  if (absl::Status s = CheckDecoder(*root); !s.ok()) return s;
  absl::StatusOr<PostProcessorIds> post =
      ParsePostProcessor(bpe_json::Find(*root, "post_processor"));
  if (!post.ok()) return post.status();
  impl->post = *std::move(post);

  // --- added tokens (tokenizer.json, then tokenizer_config.json) ---
  std::vector<AddedToken> added;
  if (const Json* list = bpe_json::Find(*root, "added_tokens"); list != nullptr) {
    if (!list->is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat("added_tokens: expected an array, got ", list->type_name()));
    }
    for (size_t i = 0; i < list->size(); ++i) {
      absl::StatusOr<AddedToken> t =
          ParseAddedToken((*list)[i], absl::StrCat("added_tokens[", i, "]"), true);
      if (!t.ok()) return t.status();
      added.push_back(*std::move(t));
    }
  }
  absl::StatusOr<std::optional<Json>> parsed_config =
      ParseOptionalObject(tokenizer_config_json, kConfigFile);
  if (!parsed_config.ok()) return parsed_config.status();
  const Json config = parsed_config->value_or(Json::object());
  absl::StatusOr<std::optional<Json>> special_map =
      ParseOptionalObject(special_tokens_map_json, kSpecialMapFile);
  if (!special_map.ok()) return special_map.status();
  absl::StatusOr<bool> clean_up =
      bpe_json::Bool(config, "clean_up_tokenization_spaces", false, "tokenizer_config");
  if (!clean_up.ok()) return clean_up.status();
  impl->clean_up = *clean_up;
  bool eos_null = false;
  absl::StatusOr<std::vector<NamedToken>> named =
      NamedSpecialTokens(config, special_map->has_value() ? &**special_map : nullptr, &eos_null);
  if (!named.ok()) return named.status();
  auto next_added_id = [&]() -> int64_t {
    int64_t max_added = -1;
    for (const AddedToken& a : added) max_added = std::max<int64_t>(max_added, a.id);
    return NextAddedTokenId(static_cast<int64_t>(impl->vocab.size()), max_added);
  };
  // For tokens in both tokenizer.json and added_tokens_decoder, a token is special when either
  // file says so. Entries tokenizer.json lacks are what transformers (4.46,
  // PreTrainedTokenizerFast.__init__ `tokens_to_add`) passes to add_tokens in key order, which
  // numbers them itself, not by the file's key: an added token's text keeps its id, a model.vocab
  // token takes its vocab id (and becomes an added token), other text the next free id; special
  // as the entry says or when a named special token (eos_token, ...) has its text
  // (tests/model/tokenizer_special_tokens_test.cc, checked against transformers 4.46.3).
  // Without added_tokens_decoder, added_tokens.json's {content: index} entries (the legacy file)
  // go the same way, as entries that are not special unless a named special token has their
  // text (transformers 4.46.3 and 5.17 alike, perf-log 2026-11-29 18:57).
  const Json* decoder = bpe_json::Find(config, "added_tokens_decoder");
  std::string decoder_file = "tokenizer_config.added_tokens_decoder";
  Json legacy;
  if (decoder == nullptr && !added_tokens_json.empty()) {
    absl::StatusOr<Json> file = ParseJson(added_tokens_json, "added_tokens.json");
    if (!file.ok()) return file.status();
    if (!file->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat("added_tokens.json: expected an object, got ", file->type_name()));
    }
    legacy = Json::object();
    for (const auto& [content, index] : file->items()) {
      if (!index.is_number_integer() || index.get<int64_t>() < 0 ||
          index.get<int64_t>() >= (int64_t{1} << 31)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "added_tokens.json[\"", content, "\"]: expected a token id, got ", index.dump()));
      }
      legacy[std::to_string(index.get<int64_t>())] = {{"content", content}, {"special", false}};
    }
    decoder = &legacy;
    decoder_file = "added_tokens.json";
  }
  if (decoder != nullptr) {
    if (!decoder->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(decoder_file, ": not an object"));
    }
    std::vector<AddedToken> missing;  // entries tokenizer.json lacks, by their file key for now
    for (const auto& [key, entry] : decoder->items()) {
      const std::string where = absl::StrCat(decoder_file, "[\"", key, "\"]");
      int32_t id;
      if (!absl::SimpleAtoi(key, &id) || id < 0) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": key is not a token id"));
      }
      absl::StatusOr<AddedToken> t = ParseAddedToken(entry, where, false);
      if (!t.ok()) return t.status();
      t->id = id;
      auto same =
          std::find_if(added.begin(), added.end(), [&](const AddedToken& a) { return a.id == id; });
      if (same != added.end()) {
        same->special = same->special || t->special;
      } else {
        missing.push_back(*std::move(t));
      }
    }
    std::sort(missing.begin(), missing.end(),
              [](const AddedToken& a, const AddedToken& b) { return a.id < b.id; });
    for (AddedToken& t : missing) {
      auto same = std::find_if(added.begin(), added.end(),
                               [&](const AddedToken& a) { return a.content == t.content; });
      if (same != added.end()) {  // (transformers keeps such a token special: OR, as above)
        same->special = same->special || t.special;
        continue;
      }
      // transformers adds these as special when a named special token has their text.
      t.special = t.special || std::any_of(named->begin(), named->end(), [&](const NamedToken& n) {
                    return n.token.content == t.content;
                  });
      const int32_t key = t.id;
      if (auto it = impl->vocab.find(t.content); it != impl->vocab.end()) {
        t.id = it->second;
      } else {
        const int64_t id = next_added_id();
        if (id >= (int64_t{1} << 31) - 1) {
          return absl::InvalidArgumentError(
              absl::StrCat(decoder_file, ": \"", t.content, "\" would get id ", id, ", too large"));
        }
        t.id = static_cast<int32_t>(id);
      }
      if (t.id != key) {
        PHI_LOG(WARNING) << decoder_file << "[\"" << key << "\"] \"" << t.content
                         << "\" is not among the tokenizer's tokens; added as token id " << t.id
                         << ", as transformers numbers it";
      }
      added.push_back(std::move(t));
    }
  }
  // Named special tokens the tokenizer does not hold as added tokens yet are added, as
  // transformers' PreTrainedTokenizerFast.__init__ (tokenization_utils_fast.py, `tokens_to_add`)
  // does through `tokenizers`' AddedVocabulary::add_tokens (tokenizers/src/tokenizer/
  // added_vocabulary.rs): a model.vocab token keeps its id; any other text gets a new id, the
  // model vocabulary's size or one past the largest added id, whichever is larger. Checked by
  // hand against transformers 4.46.3 and 5.24.0 (tests/model/tokenizer_special_tokens_test.cc).
  absl::flat_hash_map<std::string, bool> appended;  // content -> got a new id
  for (const NamedToken& n : *named) {
    const bool is_added = std::any_of(added.begin(), added.end(), [&](const AddedToken& a) {
      return a.content == n.token.content;
    });
    if (is_added) continue;
    AddedToken t = n.token;
    if (auto it = impl->vocab.find(t.content); it != impl->vocab.end()) {
      t.id = it->second;
      appended[t.content] = false;
    } else {
      const int64_t id = next_added_id();
      if (id >= (int64_t{1} << 31) - 1) {
        return absl::InvalidArgumentError(absl::StrCat(n.file, ": ", n.key, ": \"", t.content,
                                                       "\" would get id ", id, ", too large"));
      }
      t.id = static_cast<int32_t>(id);
      appended[t.content] = true;
      PHI_LOG(WARNING)
          << n.file << ": " << n.key << " \"" << t.content
          << "\" is in neither model.vocab nor the added tokens; added as new token id " << t.id
          << ", as transformers does";
    }
    added.push_back(std::move(t));
  }
  for (const AddedToken& t : added) {
    impl->added_ids[t.content] = t.id;
    max_id = std::max(max_id, t.id);
  }

  // --- decode tables ---
  impl->vocab_size = max_id + 1;
  impl->id_bytes.assign(impl->vocab_size, std::string());
  impl->special.assign(impl->vocab_size, 0);
  auto decoded = [](const std::string& token) {
    std::optional<std::string> bytes = ByteLevelToBytes(token);
    return bytes.has_value() ? *std::move(bytes) : token;
  };
  for (const auto& [token, id] : impl->vocab) impl->id_bytes[id] = decoded(token);
  for (const AddedToken& t : added) {
    impl->id_bytes[t.id] = decoded(t.content);
    impl->special[t.id] = impl->special[t.id] || t.special;
  }
  absl::StatusOr<std::unique_ptr<AddedVocab>> added_vocab = AddedVocab::Create(std::move(added));
  if (!added_vocab.ok()) return added_vocab.status();
  impl->added = *std::move(added_vocab);

  // --- eos / bos: every named token is an added token by now ---
  for (const NamedToken& n : *named) {
    if (n.key != "eos_token" && n.key != "bos_token") continue;
    const std::optional<int32_t> id = impl->Lookup(n.token.content);
    PHI_CHECK(id.has_value()) << n.token.content;
    if (n.key == "bos_token") {
      impl->bos_id = id;
      continue;
    }
    impl->eos_id = id;
    auto it = appended.find(n.token.content);
    impl->eos_source = EosSource{n.token.content, n.file, it != appended.end() && it->second};
  }
  // No file names an eos: the class default of transformers' CodeGen / GPT-2 tokenizers, unless
  // the deciding file says "eos_token": null.
  if (!impl->eos_id.has_value() && !eos_null) {
    if (auto it = impl->added_ids.find("<|endoftext|>"); it != impl->added_ids.end()) {
      impl->eos_id = it->second;
      impl->eos_source = EosSource{"<|endoftext|>", "tokenizer.json", false};
    }
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromDir(const std::filesystem::path& dir) {
  auto read = [](const std::filesystem::path& path, std::string* out) -> absl::Status {
    absl::StatusOr<std::string> text = ReadTextFile(path);
    if (!text.ok()) return text.status();
    *out = *std::move(text);
    return absl::OkStatus();
  };
  auto exists = [&](const char* name) {
    std::error_code ec;
    return std::filesystem::exists(dir / name, ec);
  };
  std::string tokenizer_json, config_json, special_map_json, added_json;
  for (auto [name, text] :
       {std::pair{kConfigFile, &config_json}, std::pair{kSpecialMapFile, &special_map_json}}) {
    if (exists(name)) {
      if (absl::Status s = read(dir / name, text); !s.ok()) return s;
    }
  }
  if (exists("added_tokens.json")) {
    if (absl::Status s = read(dir / "added_tokens.json", &added_json); !s.ok()) return s;
  }
  if (!exists("tokenizer.json") && exists("vocab.json") && exists("merges.txt")) {
    // Only the slow tokenizer's files: the tokenizer.json transformers converts them to
    // (model/bpe_slow_files.h).
    std::string vocab, merges;
    if (absl::Status s = read(dir / "vocab.json", &vocab); !s.ok()) return s;
    if (absl::Status s = read(dir / "merges.txt", &merges); !s.ok()) return s;
    absl::StatusOr<SlowFilesJson> converted =
        TokenizerJsonFromSlowFiles(vocab, merges, config_json, special_map_json);
    if (!converted.ok()) {
      return absl::Status(converted.status().code(),
                          absl::StrCat(dir.string(), ": ", converted.status().message()));
    }
    tokenizer_json = std::move(converted->tokenizer_json);
    config_json = std::move(converted->tokenizer_config_json);
  } else if (absl::Status s = read(dir / "tokenizer.json", &tokenizer_json); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(s.message(),
                                               " (a tokenizer needs tokenizer.json, or the slow "
                                               "tokenizer's vocab.json and merges.txt)"));
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      FromJson(tokenizer_json, config_json, special_map_json, added_json);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat(dir.string(), ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 8);
  thread_local PreTokenizer::Scratch scratch;
  thread_local std::vector<std::string_view> words;
  const Impl& impl = *impl_;
  impl.added->Split(text, [&](std::string_view piece, int32_t id) {
    if (id >= 0) {
      ids.push_back(id);
      return;
    }
    words.clear();
    impl.pre_tokenizer.Split(piece, &scratch, &words);
    for (std::string_view word : words) impl.bpe->EncodeWord(word, &ids);
  });
  return ids;
}

std::vector<int32_t> Tokenizer::EncodeWithSpecialTokens(std::string_view text) const {
  std::vector<int32_t> ids = impl_->post.prefix;
  const std::vector<int32_t> body = Encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  ids.insert(ids.end(), impl_->post.suffix.begin(), impl_->post.suffix.end());
  return ids;
}

std::string Tokenizer::DecodeBytes(absl::Span<const int32_t> ids, bool skip_special_tokens) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= impl_->vocab_size) continue;
    if (skip_special_tokens && impl_->special[id]) continue;
    out.append(impl_->id_bytes[id]);
  }
  return out;
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special_tokens,
                              bool clean_up) const {
  std::string text = Utf8Lossy(DecodeBytes(ids, skip_special_tokens));
  if (clean_up && impl_->clean_up) text = CleanUpTokenizationSpaces(text);
  return text;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < impl_->vocab_size && impl_->special[id] != 0;
}
int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }
std::optional<int32_t> Tokenizer::eos_token_id() const { return impl_->eos_id; }
std::optional<int32_t> Tokenizer::bos_token_id() const { return impl_->bos_id; }
const std::optional<Tokenizer::EosSource>& Tokenizer::eos_source() const {
  return impl_->eos_source;
}
std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  return impl_->Lookup(token);
}
bool Tokenizer::clean_up_tokenization_spaces() const { return impl_->clean_up; }

std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    char32_t cp;
    int invalid_len = 0;
    const int n = bpe_utf8::DecodeUtf8(bytes, i, &cp, &invalid_len);
    if (n > 0) {
      out.append(bytes.substr(i, n));
      i += n;
    } else {
      out.append("\xEF\xBF\xBD");  // U+FFFD for one maximal ill-formed subpart
      i += invalid_len;
    }
  }
  return out;
}

bool IsValidUtf8(std::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size()) {
    if (static_cast<uint8_t>(bytes[i]) < 0x80) {
      ++i;
      continue;
    }
    char32_t cp;
    int invalid_len;
    const int n = bpe_utf8::DecodeUtf8(bytes, i, &cp, &invalid_len);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string CleanUpTokenizationSpaces(std::string_view text) {
  std::string out(text);
  if (out.find(' ') == std::string::npos) return out;
  // Sequential passes like transformers' chained str.replace: a later pattern can match text
  // that an earlier replacement produced ("a  ' s" -> "a 's" -> "a's"); one simultaneous pass
  // would stop at "a 's".
  static constexpr std::pair<absl::string_view, absl::string_view> kReplacements[] = {
      {" .", "."},     {" ?", "?"},   {" !", "!"},   {" ,", ","},     {" ' ", "'"},
      {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (const auto& [from, to] : kReplacements) {
    if (out.find(std::string_view(from.data(), from.size())) != std::string::npos)
      out = absl::StrReplaceAll(out, {{from, to}});
  }
  return out;
}

}  // namespace phishard
