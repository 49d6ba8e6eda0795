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

// A special-token entry of tokenizer_config.json: "text", {"content": "text", ...} or null.
absl::StatusOr<std::string> SpecialTokenString(const Json& config, std::string_view key) {
  const Json* v = bpe_json::Find(config, key);
  if (v == nullptr) return std::string();
  if (v->is_string()) return v->get<std::string>();
  if (v->is_object()) return bpe_json::String(*v, "content", key);
  return absl::InvalidArgumentError(absl::StrCat(
      bpe_json::Sv(key), ": expected a string or {\"content\": ...}, got ", v->type_name()));
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
    std::string_view tokenizer_json, std::string_view tokenizer_config_json) {
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
  Json config = Json::object();
  if (!tokenizer_config_json.empty()) {
    absl::StatusOr<Json> parsed = ParseJson(tokenizer_config_json, "tokenizer_config.json");
    if (!parsed.ok()) return parsed.status();
    if (!parsed->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer_config.json: expected an object, got ", parsed->type_name()));
    }
    config = *std::move(parsed);
  }
  absl::StatusOr<bool> clean_up =
      bpe_json::Bool(config, "clean_up_tokenization_spaces", false, "tokenizer_config");
  if (!clean_up.ok()) return clean_up.status();
  impl->clean_up = *clean_up;
  // transformers adds added_tokens_decoder entries missing from tokenizer.json; for tokens in
  // both, a token is special when either file says so.
  if (const Json* decoder = bpe_json::Find(config, "added_tokens_decoder"); decoder != nullptr) {
    if (!decoder->is_object()) {
      return absl::InvalidArgumentError("tokenizer_config.added_tokens_decoder: not an object");
    }
    for (const auto& [key, entry] : decoder->items()) {
      const std::string where =
          absl::StrCat("tokenizer_config.added_tokens_decoder[\"", key, "\"]");
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
        added.push_back(*std::move(t));
      }
    }
  }
  // Special tokens named in the config (bos, eos, ...) that are plain vocab tokens become
  // special added tokens, as transformers registers them (normalized = false).
  std::vector<std::string> special_strings;
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                          "cls_token", "mask_token"}) {
    absl::StatusOr<std::string> s = SpecialTokenString(config, key);
    if (!s.ok()) return s.status();
    if (!s->empty()) special_strings.push_back(*s);
  }
  if (const Json* extra = bpe_json::Find(config, "additional_special_tokens"); extra != nullptr) {
    if (!extra->is_array()) {
      return absl::InvalidArgumentError("additional_special_tokens: expected an array");
    }
    for (size_t i = 0; i < extra->size(); ++i) {
      absl::StatusOr<std::string> s =
          (*extra)[i].is_string()
              ? absl::StatusOr<std::string>((*extra)[i].get<std::string>())
              : bpe_json::String((*extra)[i], "content",
                                 absl::StrCat("additional_special_tokens[", i, "]"));
      if (!s.ok()) return s.status();
      special_strings.push_back(*s);
    }
  }
  for (const std::string& s : special_strings) {
    const bool is_added = std::any_of(added.begin(), added.end(),
                                      [&](const AddedToken& a) { return a.content == s; });
    if (is_added) continue;
    auto it = impl->vocab.find(s);
    if (it == impl->vocab.end()) {
      PHI_LOG(WARNING) << "tokenizer_config: special token \"" << s
                       << "\" is in neither model.vocab nor added_tokens; ignored";
      continue;
    }
    AddedToken t;
    t.id = it->second;
    t.content = s;
    t.special = true;
    t.normalized = false;
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

  // --- eos / bos ---
  for (auto [key, slot] :
       {std::pair{"eos_token", &impl->eos_id}, std::pair{"bos_token", &impl->bos_id}}) {
    absl::StatusOr<std::string> s = SpecialTokenString(config, key);
    if (!s.ok()) return s.status();
    if (!s->empty()) *slot = impl->Lookup(*s);
  }
  if (!impl->eos_id.has_value()) {
    if (auto it = impl->added_ids.find("<|endoftext|>"); it != impl->added_ids.end()) {
      impl->eos_id = it->second;
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
  std::string tokenizer_json, config_json;
  const std::filesystem::path tokenizer_path = dir / "tokenizer.json";
  if (absl::Status s = read(tokenizer_path, &tokenizer_json); !s.ok()) return s;
  const std::filesystem::path config_path = dir / "tokenizer_config.json";
  std::error_code ec;
  if (std::filesystem::exists(config_path, ec)) {
    if (absl::Status s = read(config_path, &config_json); !s.ok()) return s;
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = FromJson(tokenizer_json, config_json);
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
