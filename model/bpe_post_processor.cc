#include "model/bpe_post_processor.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace phishard {
namespace {

using bpe_json::Json;

// The ids of special token `name` from a TemplateProcessing's "special_tokens" map.
absl::Status SpecialIds(const Json& special_tokens, const std::string& name,
                        const std::string& where, std::vector<int32_t>* out) {
  const Json* entry = bpe_json::Find(special_tokens, name);
  if (entry == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": special token \"", name, "\" is not in special_tokens"));
  }
  const Json* ids = bpe_json::Find(*entry, "ids");
  if (ids == nullptr || !ids->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ".special_tokens[\"", name, "\"].ids: expected a list of ids"));
  }
  for (const Json& id : *ids) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() >= (int64_t{1} << 31)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".special_tokens[\"", name, "\"].ids: bad id ", id.dump()));
    }
    out->push_back(static_cast<int32_t>(id.get<int64_t>()));
  }
  return absl::OkStatus();
}

absl::Status AddTemplate(const Json& post, const std::string& where, PostProcessorIds* out) {
  const Json* single = bpe_json::Find(post, "single");
  if (single == nullptr || !single->is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".single: expected a list"));
  }
  const Json* special_tokens = bpe_json::Find(post, "special_tokens");
  static const Json kEmpty = Json::object();
  if (special_tokens == nullptr) special_tokens = &kEmpty;
  int sequences = 0;
  for (size_t i = 0; i < single->size(); ++i) {
    const Json& piece = (*single)[i];
    const std::string pw = absl::StrCat(where, ".single[", i, "]");
    if (bpe_json::Find(piece, "Sequence") != nullptr) {
      ++sequences;
      continue;
    }
    const Json* special = bpe_json::Find(piece, "SpecialToken");
    if (special == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(pw, ": expected {\"Sequence\": ...} or {\"SpecialToken\": ...}"));
    }
    absl::StatusOr<std::string> name = bpe_json::String(*special, "id", pw + ".SpecialToken");
    if (!name.ok()) return name.status();
    PHI_RETURN_IF_ERROR(
        SpecialIds(*special_tokens, *name, where, sequences == 0 ? &out->prefix : &out->suffix));
  }
  if (sequences != 1) {
    return absl::UnimplementedError(
        absl::StrCat(where, ".single: has ", sequences,
                     " sequence pieces; only templates with exactly one ($A) "
                     "are supported"));
  }
  return absl::OkStatus();
}

absl::Status AddStep(const Json& post, const std::string& where, PostProcessorIds* out) {
  absl::StatusOr<std::string> type = bpe_json::String(post, "type", where);
  if (!type.ok()) return type.status();
  if (*type == "ByteLevel") return absl::OkStatus();  // offsets only
  if (*type == "TemplateProcessing") return AddTemplate(post, where, out);
  if (*type == "Sequence") {
    const Json* steps = bpe_json::Find(post, "processors");
    if (steps == nullptr || !steps->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".processors: expected a list"));
    }
    for (size_t i = 0; i < steps->size(); ++i) {
      PHI_RETURN_IF_ERROR(AddStep((*steps)[i], absl::StrCat(where, ".processors[", i, "]"), out));
    }
    return absl::OkStatus();
  }
  return absl::UnimplementedError(
      absl::StrCat(where, ".type: \"", *type,
                   "\" is not supported (ByteLevel, TemplateProcessing or a Sequence of them)"));
}

}  // namespace

absl::StatusOr<PostProcessorIds> ParsePostProcessor(const Json* post) {
  PostProcessorIds ids;
  if (post == nullptr) return ids;
  if (absl::Status s = AddStep(*post, "post_processor", &ids); !s.ok()) return s;
  return ids;
}

}  // namespace phishard
