// Typed, non-throwing accessors for the tokenizer.json / tokenizer_config.json readers: a wrong
// type or a missing required key becomes INVALID_ARGUMENT naming the field ("where.key").
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace phishard::bpe_json {

using Json = nlohmann::json;

// Debian's Abseil keeps its own absl::string_view (not std::string_view): StrCat and
// heterogeneous hash-map lookups need this conversion.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

inline std::string TypeName(const Json& j) { return j.type_name(); }

inline std::string Where(std::string_view where, std::string_view key) {
  return where.empty() ? std::string(key) : absl::StrCat(Sv(where), ".", Sv(key));
}

// Member `key` of object `obj`, or nullptr when absent or null.
inline const Json* Find(const Json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(std::string(key));
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

inline absl::StatusOr<bool> Bool(const Json& obj, std::string_view key, bool default_value,
                                 std::string_view where) {
  const Json* v = Find(obj, key);
  if (v == nullptr) return default_value;
  if (!v->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(where, key), ": expected a boolean, got ", TypeName(*v)));
  }
  return v->get<bool>();
}

inline absl::StatusOr<std::string> String(const Json& obj, std::string_view key,
                                          std::string_view where) {
  const Json* v = Find(obj, key);
  if (v == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(Where(where, key), ": missing"));
  }
  if (!v->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(where, key), ": expected a string, got ", TypeName(*v)));
  }
  return v->get<std::string>();
}

// Optional string: "" when absent or null.
inline absl::StatusOr<std::string> StringOr(const Json& obj, std::string_view key,
                                            std::string_view where) {
  if (Find(obj, key) == nullptr) return std::string();
  return String(obj, key, where);
}

}  // namespace phishard::bpe_json
