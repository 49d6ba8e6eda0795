#include "model/lora_adapter.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "model/json_depth.h"
#include "model/safetensors.h"
#include "model/text_file.h"
#include "nlohmann/json.hpp"

namespace phishard {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

constexpr absl::string_view kTensorPrefix = "base_model.model.";
// PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["phi"], used when target_modules is
// null.
const std::vector<std::string> kPhiDefaultTargets = {"q_proj", "v_proj", "fc1", "fc2"};
// What "all-linear" expands to for PhiForCausalLM: every nn.Linear except the output head.
const std::vector<std::string> kPhiAllLinear = {"q_proj", "k_proj", "v_proj",
                                                "dense",  "fc1",    "fc2"};

// Python re.match semantics (anchored at the start only) of `pattern` on `subject`; `group1`
// receives capture group 1 when wanted and set. INVALID_ARGUMENT when the pattern does not compile.
absl::StatusOr<bool> RegexMatch(const std::string& pattern, absl::string_view subject,
                                absl::string_view field, std::string* group1 = nullptr) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  std::unique_ptr<pcre2_code, void (*)(pcre2_code*)> code(
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), 0, &error_code,
                    &error_offset, nullptr),
      pcre2_code_free);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof(message));
    return absl::InvalidArgumentError(absl::StrFormat("%s: regex '%s' does not compile: %s", field,
                                                      pattern, reinterpret_cast<char*>(message)));
  }
  std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> md(
      pcre2_match_data_create_from_pattern(code.get(), nullptr), pcre2_match_data_free);
  const int rc = pcre2_match(code.get(), reinterpret_cast<PCRE2_SPTR>(subject.data()),
                             subject.size(), 0, PCRE2_ANCHORED, md.get(), nullptr);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: regex '%s' failed on '%s' (pcre2 error %d)", field, pattern, subject, rc));
  }
  if (group1 != nullptr) {
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
    group1->clear();
    if (rc > 1 && ov[2] != PCRE2_UNSET) *group1 = std::string(subject.substr(ov[2], ov[3] - ov[2]));
  }
  return true;
}

// Python re.fullmatch.
absl::StatusOr<bool> RegexFullMatch(const std::string& pattern, absl::string_view subject,
                                    absl::string_view field) {
  return RegexMatch(absl::StrCat("(?:", pattern, ")\\z"), subject, field);
}

// PEFT's list rule: the name equals an entry or ends with "." + entry.
bool ListMatches(const std::vector<std::string>& list, absl::string_view name) {
  for (const std::string& e : list) {
    if (name == e || absl::EndsWith(name, absl::StrCat(".", e))) return true;
  }
  return false;
}

absl::string_view TargetName(LoraTarget t) {
  const std::string_view n = LoraTargetName(t);
  return absl::string_view(n.data(), n.size());
}

// ---- adapter_config.json fields ------------------------------------------------------------

absl::Status FieldError(absl::string_view source, absl::string_view field, absl::string_view want,
                        const ojson& got) {
  return absl::InvalidArgumentError(
      absl::StrFormat("%s: field '%s' must be %s, got %s", source, field, want, got.dump()));
}

// A string or a list of strings (null/absent leaves `list` and `str` untouched).
absl::Status ReadStringOrList(const ojson& j, absl::string_view source, const char* field,
                              std::vector<std::string>* list, std::optional<std::string>* str) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (it->is_string()) {
    if (str == nullptr) {
      list->push_back(it->get<std::string>());
    } else {
      *str = it->get<std::string>();
    }
    return absl::OkStatus();
  }
  if (!it->is_array()) return FieldError(source, field, "a string or a list of strings", *it);
  for (const ojson& e : *it) {
    if (!e.is_string()) return FieldError(source, field, "a string or a list of strings", *it);
    list->push_back(e.get<std::string>());
  }
  return absl::OkStatus();
}

bool IsTrue(const ojson& j, const char* field) {
  auto it = j.find(field);
  return it != j.end() && it->is_boolean() && it->get<bool>();
}

bool IsSetNonEmpty(const ojson& j, const char* field) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return false;
  if (it->is_boolean()) return it->get<bool>();
  if (it->is_array() || it->is_object() || it->is_string()) return !it->empty();
  return true;
}

absl::Status ReadBool(const ojson& j, absl::string_view source, const char* field, bool* out) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return FieldError(source, field, "true or false", *it);
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status ReadPositiveInt(const ojson& v, absl::string_view source, absl::string_view field,
                             int* out) {
  if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() > (1 << 20)) {
    return FieldError(source, field, "a positive integer", v);
  }
  *out = static_cast<int>(v.get<int64_t>());
  return absl::OkStatus();
}

absl::Status ReadFiniteNumber(const ojson& v, absl::string_view source, absl::string_view field,
                              double* out) {
  if (!v.is_number() || !std::isfinite(v.get<double>())) {
    return FieldError(source, field, "a finite number", v);
  }
  *out = v.get<double>();
  return absl::OkStatus();
}

// Features PEFT can save that change the math and that this shard does not implement.
absl::Status RejectUnsupported(const ojson& j, absl::string_view source) {
  if (IsTrue(j, "use_dora")) {
    return absl::UnimplementedError(
        absl::StrCat("DoRA adapters are not supported (", source, " sets use_dora = true)"));
  }
  if (IsSetNonEmpty(j, "modules_to_save")) {
    return absl::UnimplementedError(absl::StrCat(
        source, ": modules_to_save = ", j.at("modules_to_save").dump(),
        " is not supported (those modules' full weights would replace the base model's; only "
        "low-rank deltas can be applied per request)"));
  }
  auto bias = j.find("bias");
  if (bias != j.end() && !bias->is_null() && !(bias->is_string() && *bias == "none")) {
    return absl::UnimplementedError(absl::StrCat(source, ": bias = ", bias->dump(),
                                                 " is not supported (only \"none\": trained "
                                                 "biases would change the base model)"));
  }
  for (const char* field :
       {"lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
        "alora_invocation_tokens", "use_qalora", "use_bdlora"}) {
    if (IsSetNonEmpty(j, field)) {
      return absl::UnimplementedError(absl::StrCat(source, ": ", field, " = ", j.at(field).dump(),
                                                   " is not supported by this shard"));
    }
  }
  return absl::OkStatus();
}

// ---- tensors --------------------------------------------------------------------------------

struct PairNames {
  std::string a, b;
};

// Maps "base_model.model.<module>.lora_{A,B}.weight" onto (layer, target). Layer is -1 for
// lm_head. Anything else is an error naming the tensor.
absl::Status ParseTensorName(const std::string& name, const std::string& file, int num_layers,
                             std::map<std::pair<int, LoraTarget>, PairNames>* pairs) {
  const auto unknown = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "adapter tensor '%s' in %s %s; expected base_model.model.<module>.lora_A.weight / "
        ".lora_B.weight with <module> one of model.layers.N.self_attn.{q_proj,k_proj,v_proj,dense}"
        ", model.layers.N.mlp.{fc1,fc2}, lm_head",
        name, file, why));
  };
  if (absl::StrContains(name, "lora_magnitude_vector")) {
    return absl::UnimplementedError(absl::StrFormat(
        "DoRA adapters are not supported (tensor '%s' in %s is a DoRA magnitude)", name, file));
  }
  if (absl::StrContains(name, "lora_embedding_")) {
    return absl::UnimplementedError(
        absl::StrFormat("LoRA on embeddings is not supported (tensor '%s' in %s)", name, file));
  }
  if (absl::EndsWith(name, ".lora_B.bias") || absl::EndsWith(name, ".lora_A.bias")) {
    return absl::UnimplementedError(absl::StrFormat(
        "LoRA biases (lora_bias) are not supported (tensor '%s' in %s)", name, file));
  }
  if (!absl::StartsWith(name, kTensorPrefix))
    return unknown("does not start with base_model.model.");
  absl::string_view rest = absl::string_view(name).substr(kTensorPrefix.size());
  bool is_a;
  if (absl::EndsWith(rest, ".lora_A.weight")) {
    is_a = true;
  } else if (absl::EndsWith(rest, ".lora_B.weight")) {
    is_a = false;
  } else {
    return unknown("is not a lora_A.weight / lora_B.weight");
  }
  const absl::string_view module =
      rest.substr(0, rest.size() - absl::string_view(".lora_A.weight").size());
  int layer = -1;
  LoraTarget target = LoraTarget::kLmHead;
  if (module != "lm_head") {
    constexpr absl::string_view kLayers = "model.layers.";
    if (!absl::StartsWith(module, kLayers)) return unknown("names no supported module");
    absl::string_view tail = module.substr(kLayers.size());
    const size_t dot = tail.find('.');
    if (dot == absl::string_view::npos || !absl::SimpleAtoi(tail.substr(0, dot), &layer) ||
        layer < 0) {
      return unknown("names no supported module");
    }
    const absl::string_view leaf = tail.substr(dot + 1);
    bool found = false;
    for (int t = 0; t < kNumLayerLoraTargets; ++t) {
      const LoraTarget lt = static_cast<LoraTarget>(t);
      const absl::string_view group = t < 4 ? "self_attn." : "mlp.";
      if (leaf == absl::StrCat(group, TargetName(lt))) {
        target = lt;
        found = true;
      }
    }
    if (!found) return unknown("names no supported module");
    if (layer >= num_layers) {
      return absl::InvalidArgumentError(
          absl::StrFormat("adapter tensor '%s' in %s is for layer %d but the base model has %d "
                          "layers",
                          name, file, layer, num_layers));
    }
  }
  PairNames& p = (*pairs)[{layer, target}];
  (is_a ? p.a : p.b) = name;
  return absl::OkStatus();
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

std::string_view LoraTargetName(LoraTarget t) {
  switch (t) {
    case LoraTarget::kQProj:
      return "q_proj";
    case LoraTarget::kKProj:
      return "k_proj";
    case LoraTarget::kVProj:
      return "v_proj";
    case LoraTarget::kDense:
      return "dense";
    case LoraTarget::kFc1:
      return "fc1";
    case LoraTarget::kFc2:
      return "fc2";
    case LoraTarget::kLmHead:
      return "lm_head";
  }
  return "unknown";
}

std::string LoraModuleName(LoraTarget t, int layer) {
  if (t == LoraTarget::kLmHead) return "lm_head";
  const bool attn = static_cast<int>(t) < static_cast<int>(LoraTarget::kFc1);
  return absl::StrCat("model.layers.", layer, attn ? ".self_attn." : ".mlp.", TargetName(t));
}

std::pair<int64_t, int64_t> LoraTargetDims(const PhiConfig& c, LoraTarget t) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t q = static_cast<int64_t>(c.num_attention_heads) * c.head_dim;
  const int64_t kv = static_cast<int64_t>(c.num_key_value_heads) * c.head_dim;
  switch (t) {
    case LoraTarget::kQProj:
      return {H, q};
    case LoraTarget::kKProj:
    case LoraTarget::kVProj:
      return {H, kv};
    case LoraTarget::kDense:
      return {q, H};
    case LoraTarget::kFc1:
      return {H, I};
    case LoraTarget::kFc2:
      return {I, H};
    case LoraTarget::kLmHead:
      return {H, c.vocab_size};
  }
  return {0, 0};
}

absl::StatusOr<LoraAdapterConfig> ParseLoraAdapterConfig(std::string_view json_text,
                                                         std::string_view source_std) {
  const absl::string_view source(source_std.data(), source_std.size());
  if (absl::Status s = CheckJsonNesting(json_text, source_std); !s.ok()) return s;
  ojson j;
  try {
    j = ojson::parse(json_text);
  } catch (const ojson::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, " is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, " must hold a JSON object"));
  }
  auto peft_type = j.find("peft_type");
  if (peft_type == j.end() || !peft_type->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field 'peft_type' is missing (a PEFT adapter config has it)"));
  }
  if (*peft_type != "LORA") {
    return absl::UnimplementedError(absl::StrCat(source, ": peft_type = ", peft_type->dump(),
                                                 " is not supported (only \"LORA\")"));
  }
  PHI_RETURN_IF_ERROR(RejectUnsupported(j, source));

  LoraAdapterConfig c;
  if (auto it = j.find("r"); it != j.end() && !it->is_null()) {
    PHI_RETURN_IF_ERROR(ReadPositiveInt(*it, source, "r", &c.r));
  }
  if (auto it = j.find("lora_alpha"); it != j.end() && !it->is_null()) {
    PHI_RETURN_IF_ERROR(ReadFiniteNumber(*it, source, "lora_alpha", &c.lora_alpha));
  }
  PHI_RETURN_IF_ERROR(ReadBool(j, source, "use_rslora", &c.use_rslora));
  PHI_RETURN_IF_ERROR(ReadBool(j, source, "fan_in_fan_out", &c.fan_in_fan_out));

  PHI_RETURN_IF_ERROR(
      ReadStringOrList(j, source, "target_modules", &c.target_list, &c.target_regex));
  if (c.target_regex == "all-linear") {
    c.target_regex.reset();
    c.target_list = kPhiAllLinear;
  } else if (!c.target_regex && c.target_list.empty()) {
    auto it = j.find("target_modules");
    if (it != j.end() && it->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": target_modules is an empty list"));
    }
    c.target_list = kPhiDefaultTargets;
  }
  PHI_RETURN_IF_ERROR(
      ReadStringOrList(j, source, "exclude_modules", &c.exclude_list, &c.exclude_regex));

  if (auto it = j.find("rank_pattern"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return FieldError(source, "rank_pattern", "an object {regex: r}", *it);
    for (const auto& [key, value] : it->items()) {
      int r = 0;
      PHI_RETURN_IF_ERROR(ReadPositiveInt(value, source, absl::StrCat("rank_pattern.", key), &r));
      c.rank_pattern.emplace_back(key, r);
    }
  }
  if (auto it = j.find("alpha_pattern"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) {
      return FieldError(source, "alpha_pattern", "an object {regex: alpha}", *it);
    }
    for (const auto& [key, value] : it->items()) {
      double alpha = 0.0;
      PHI_RETURN_IF_ERROR(
          ReadFiniteNumber(value, source, absl::StrCat("alpha_pattern.", key), &alpha));
      c.alpha_pattern.emplace_back(key, alpha);
    }
  }
  if (auto it = j.find("layers_to_transform"); it != j.end() && !it->is_null()) {
    std::vector<int> layers;
    const auto bad = [&] {
      return FieldError(source, "layers_to_transform", "a layer index or a list of them", *it);
    };
    if (it->is_number_integer()) {
      layers.push_back(it->get<int>());
    } else if (it->is_array()) {
      for (const ojson& e : *it) {
        if (!e.is_number_integer()) return bad();
        layers.push_back(e.get<int>());
      }
    } else {
      return bad();
    }
    c.layers_to_transform = std::move(layers);
  }
  PHI_RETURN_IF_ERROR(ReadStringOrList(j, source, "layers_pattern", &c.layers_pattern, nullptr));
  if (auto it = j.find("base_model_name_or_path"); it != j.end() && it->is_string()) {
    c.base_model_name_or_path = it->get<std::string>();
  }
  return c;
}

absl::StatusOr<LoraModuleSpec> ResolveLoraModule(const LoraAdapterConfig& c,
                                                 std::string_view name_std) {
  const absl::string_view name(name_std.data(), name_std.size());
  LoraModuleSpec spec;
  // exclude_modules wins over target_modules.
  if (c.exclude_regex) {
    absl::StatusOr<bool> m = RegexFullMatch(*c.exclude_regex, name, "exclude_modules");
    if (!m.ok()) return m.status();
    if (*m) return spec;
  } else if (ListMatches(c.exclude_list, name)) {
    return spec;
  }
  if (c.target_regex) {
    absl::StatusOr<bool> m = RegexFullMatch(*c.target_regex, name, "target_modules");
    if (!m.ok()) return m.status();
    spec.targeted = *m;
  } else {
    spec.targeted = ListMatches(c.target_list, name);
  }
  if (spec.targeted && c.layers_to_transform) {
    // The layer index comes from the first layers_pattern that matches ".*\.{pattern}\.(\d+)\."
    // (any "<name>.<digits>." with no pattern); a module with no layer index is not targeted.
    std::vector<std::string> patterns = c.layers_pattern;
    if (patterns.empty()) patterns.push_back("[^.]*");
    std::string index;
    bool found = false;
    for (const std::string& p : patterns) {
      absl::StatusOr<bool> m =
          RegexMatch(absl::StrCat(".*\\.", p, "\\.(\\d+)\\."), name, "layers_pattern", &index);
      if (!m.ok()) return m.status();
      if (*m) {
        found = true;
        break;
      }
    }
    int layer = -1;
    spec.targeted = found && absl::SimpleAtoi(index, &layer) &&
                    std::find(c.layers_to_transform->begin(), c.layers_to_transform->end(),
                              layer) != c.layers_to_transform->end();
  }
  if (!spec.targeted) return spec;
  spec.r = c.r;
  spec.alpha = c.lora_alpha;
  for (const auto& [key, r] : c.rank_pattern) {
    absl::StatusOr<bool> m = RegexMatch(absl::StrCat("(.*\\.)?(", key, ")$"), name, "rank_pattern");
    if (!m.ok()) return m.status();
    if (*m) {
      spec.r = r;
      break;
    }
  }
  for (const auto& [key, alpha] : c.alpha_pattern) {
    absl::StatusOr<bool> m =
        RegexMatch(absl::StrCat("(.*\\.)?(", key, ")$"), name, "alpha_pattern");
    if (!m.ok()) return m.status();
    if (*m) {
      spec.alpha = alpha;
      break;
    }
  }
  return spec;
}

LoraAdapter::LoraAdapter(std::string name, int num_layers)
    : name_(std::move(name)), layers_(std::max(0, num_layers)) {}

const LoraModule& LoraAdapter::module(int layer, LoraTarget t) const {
  if (t == LoraTarget::kLmHead) return lm_head_;
  PHI_CHECK(layer >= 0 && layer < num_layers()) << "layer " << layer << " of " << num_layers();
  return layers_[layer][static_cast<int>(t)];
}

bool LoraAdapter::has_target(LoraTarget t) const {
  if (t == LoraTarget::kLmHead) return lm_head_.present();
  for (const auto& layer : layers_) {
    if (layer[static_cast<int>(t)].present()) return true;
  }
  return false;
}

int LoraAdapter::max_rank() const {
  int r = lm_head_.rank;
  for (const auto& layer : layers_) {
    for (const LoraModule& m : layer) r = std::max(r, m.rank);
  }
  return r;
}

int64_t LoraAdapter::num_params() const {
  int64_t n = lm_head_.num_params();
  for (const auto& layer : layers_) {
    for (const LoraModule& m : layer) n += m.num_params();
  }
  return n;
}

std::string LoraAdapter::Describe() const {
  std::vector<std::string> targets;
  int min_rank = 0;
  float min_scale = 0.0f, max_scale = 0.0f;
  bool first = true;
  for (LoraTarget t : kAllLoraTargets) {
    if (!has_target(t)) continue;
    targets.emplace_back(TargetName(t));
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : num_layers()); ++l) {
      const LoraModule& m = module(l, t);
      if (!m.present()) continue;
      min_rank = first ? m.rank : std::min(min_rank, m.rank);
      min_scale = first ? m.scale : std::min(min_scale, m.scale);
      max_scale = first ? m.scale : std::max(max_scale, m.scale);
      first = false;
    }
  }
  if (targets.empty()) return absl::StrCat("'", name_, "': no modules");
  const std::string ranks =
      min_rank == max_rank() ? absl::StrCat(min_rank) : absl::StrCat(min_rank, "..", max_rank());
  const std::string scales = min_scale == max_scale
                                 ? absl::StrFormat("%g", min_scale)
                                 : absl::StrFormat("%g..%g", min_scale, max_scale);
  return absl::StrFormat("'%s': %s (r %s, scale %s, %d parameters)", name_,
                         absl::StrJoin(targets, ","), ranks, scales, num_params());
}

absl::Status LoraAdapter::SetModule(const PhiConfig& base, int layer, LoraTarget t, LoraModule m) {
  const std::string where = LoraModuleName(t, layer);
  if (t != LoraTarget::kLmHead && (layer < 0 || layer >= num_layers())) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: layer %d is outside [0, %d)", where, layer, num_layers()));
  }
  if (m.rank < 0 || !std::isfinite(m.scale)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: rank %d / scale %g is invalid", where, m.rank, m.scale));
  }
  const auto [in, out] = LoraTargetDims(base, t);
  if (static_cast<int64_t>(m.a.size()) != static_cast<int64_t>(m.rank) * in ||
      static_cast<int64_t>(m.b.size()) != static_cast<int64_t>(m.rank) * out) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: rank %d needs A of %d x %d and B of %d x %d values, got %d and %d",
                        where, m.rank, m.rank, in, out, m.rank, m.a.size(), m.b.size()));
  }
  if (m.rank == 0) m = LoraModule{};
  (t == LoraTarget::kLmHead ? lm_head_ : layers_[layer][static_cast<int>(t)]) = std::move(m);
  return absl::OkStatus();
}

absl::StatusOr<LoraAdapter> LoraAdapter::LoadDir(const fs::path& dir, const PhiConfig& base) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("adapter directory '", dir.string(),
                                            "' does not exist or is not a directory"));
  }
  const fs::path config_path = dir / "adapter_config.json";
  if (!fs::is_regular_file(config_path, ec)) {
    const fs::path medusa = dir / "config.json";
    if (fs::is_regular_file(medusa, ec)) {
      absl::StatusOr<std::string> text = ReadTextFile(medusa);
      if (text.ok() && absl::StrContains(*text, "medusa_num_heads")) {
        return absl::UnimplementedError(
            absl::StrCat("'", dir.string(),
                         "' is a Medusa adapter (config.json has medusa_num_heads); Medusa "
                         "speculative heads are not supported"));
      }
    }
    return absl::NotFoundError(absl::StrCat("No valid adapter config file found: tried ",
                                            config_path.string(), " and ", medusa.string()));
  }
  absl::StatusOr<std::string> text = ReadTextFile(config_path);
  if (!text.ok()) return text.status();
  absl::StatusOr<LoraAdapterConfig> config = ParseLoraAdapterConfig(*text, config_path.string());
  if (!config.ok()) return config.status();

  std::vector<fs::path> files;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".safetensors" && fs::is_regular_file(e.path(), ec)) {
      files.push_back(e.path());
    }
  }
  std::sort(files.begin(), files.end());
  // As peft: adapter_model.safetensors, else the PyTorch checkpoint older peft versions wrote
  // (model/torch_checkpoint.h: a restricted reader, no pickle code runs).
  if (files.empty() && fs::is_regular_file(dir / "adapter_model.bin", ec)) {
    files.push_back(dir / "adapter_model.bin");
  }
  if (files.empty()) {
    return absl::NotFoundError(absl::StrCat("adapter directory '", dir.string(),
                                            "' has no *.safetensors file (nor adapter_model.bin)"));
  }
  absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::OpenFiles(files);
  if (!store.ok()) return store.status();

  const int L = base.num_hidden_layers;
  std::map<std::pair<int, LoraTarget>, PairNames> pairs;
  for (const std::string& name : (*store)->Names()) {
    absl::StatusOr<const TensorView*> view = (*store)->Get(name);
    if (!view.ok()) return view.status();
    PHI_RETURN_IF_ERROR(ParseTensorName(name, (*view)->file, L, &pairs));
  }

  if (config->fan_in_fan_out) {
    PHI_LOG(WARNING) << config_path.string()
                     << ": fan_in_fan_out = true is ignored (Phi's projections are nn.Linear; "
                        "PEFT resets it to false for them too)";
  }
  if (!config->target_regex) {
    for (const std::string& t : config->target_list) {
      if (t == "embed_tokens" || absl::EndsWith(t, ".embed_tokens")) {
        return absl::UnimplementedError(absl::StrCat(config_path.string(), ": target_modules has '",
                                                     t, "': LoRA on embeddings is not supported"));
      }
    }
  }

  LoraAdapter adapter(
      dir.filename().empty() ? dir.parent_path().filename().string() : dir.filename().string(), L);
  std::vector<bool> entry_used(config->target_list.size(), false);
  int adapted = 0;
  for (LoraTarget t : kAllLoraTargets) {
    for (int l = 0; l < (t == LoraTarget::kLmHead ? 1 : L); ++l) {
      const int key_layer = t == LoraTarget::kLmHead ? -1 : l;
      const std::string module = LoraModuleName(t, l);
      absl::StatusOr<LoraModuleSpec> spec = ResolveLoraModule(*config, module);
      if (!spec.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(config_path.string(), ": ", spec.status().message()));
      }
      for (size_t i = 0; i < config->target_list.size(); ++i) {
        if (ListMatches({config->target_list[i]}, module)) entry_used[i] = true;
      }
      auto it = pairs.find({key_layer, t});
      if (it == pairs.end()) {
        if (spec->targeted) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "adapter '%s': adapter_config.json targets %s but no lora_A/lora_B tensors for it "
              "are in %s",
              dir.string(), module,
              absl::StrJoin(files, ", ", [](std::string* out, const fs::path& p) {
                out->append(p.filename().string());
              })));
        }
        continue;
      }
      const PairNames& names = it->second;
      if (!spec->targeted) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "adapter '%s': tensor '%s' adapts %s, which adapter_config.json does not target "
            "(target_modules / exclude_modules / layers_to_transform)",
            dir.string(), names.a.empty() ? names.b : names.a, module));
      }
      if (names.a.empty() || names.b.empty()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "adapter '%s': module %s has %s but not its %s (LoRA weights come in pairs)",
            dir.string(), module, names.a.empty() ? names.b : names.a,
            names.a.empty() ? "lora_A.weight" : "lora_B.weight"));
      }
      const TensorView* a = *(*store)->Get(names.a);
      const TensorView* b = *(*store)->Get(names.b);
      if (a->shape.size() != 2 || b->shape.size() != 2) {
        return absl::InvalidArgumentError(
            absl::StrFormat("adapter '%s': %s is %s and %s is %s; both must be 2-D", dir.string(),
                            names.a, ShapeString(a->shape), names.b, ShapeString(b->shape)));
      }
      if (a->shape[0] != b->shape[1]) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "adapter '%s': rank mismatch in %s: lora_A is %s (r = %d) but lora_B is %s (r = %d)",
            dir.string(), module, ShapeString(a->shape), a->shape[0], ShapeString(b->shape),
            b->shape[1]));
      }
      if (a->shape[0] != spec->r) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "adapter '%s': %s has rank %d (lora_A %s) but adapter_config.json gives r = %d for "
            "%s%s",
            dir.string(), module, a->shape[0], ShapeString(a->shape), spec->r, module,
            config->rank_pattern.empty() ? "" : " (after rank_pattern)"));
      }
      const auto [in, out] = LoraTargetDims(base, t);
      const int64_t r = spec->r;
      if (a->shape[1] != in || b->shape[0] != out) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "adapter '%s': shape mismatch with the base model: %s is %s and %s is %s, but %s "
            "(in_features %d, out_features %d) needs [%d, %d] and [%d, %d]",
            dir.string(), names.a, ShapeString(a->shape), names.b, ShapeString(b->shape), module,
            in, out, r, in, out, r));
      }
      LoraModule m;
      m.rank = spec->r;
      m.scale = static_cast<float>(config->use_rslora ? spec->alpha / std::sqrt(double(spec->r))
                                                      : spec->alpha / spec->r);
      if (!std::isfinite(m.scale)) {  // (the deltas are scaled in float32, as PEFT's)
        return absl::InvalidArgumentError(absl::StrFormat(
            "adapter '%s': lora_alpha %g over r %d gives %s a scale outside float32's range",
            dir.string(), spec->alpha, spec->r, module));
      }
      PHI_RETURN_IF_ERROR((*store)->ReadF32(names.a, {r, in}, &m.a));
      PHI_RETURN_IF_ERROR((*store)->ReadF32(names.b, {out, r}, &m.b));
      for (const auto& [what, values] : {std::pair{&names.a, &m.a}, {&names.b, &m.b}}) {
        if (!std::all_of(values->begin(), values->end(),
                         [](float v) { return std::isfinite(v); })) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "adapter '%s': tensor '%s' holds a NaN or infinite value", dir.string(), *what));
        }
      }
      PHI_RETURN_IF_ERROR(adapter.SetModule(base, l, t, std::move(m)));
      ++adapted;
      pairs.erase(it);
    }
  }
  if (adapted == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "adapter '%s' adapts no module of the model (its files hold no LoRA tensors)",
        dir.string()));
  }
  // Every tensor was either consumed above or rejected by ParseTensorName; anything left would be
  // a programmer error in the loops above.
  PHI_CHECK(pairs.empty()) << pairs.size() << " LoRA pairs neither applied nor rejected";
  for (size_t i = 0; i < entry_used.size(); ++i) {
    if (!entry_used[i]) {
      PHI_LOG(WARNING) << config_path.string() << ": target_modules entry '"
                       << config->target_list[i] << "' names no module of PhiForCausalLM";
    }
  }
  PHI_LOG(INFO) << "LoRA adapter " << adapter.Describe() << " from " << dir.string();
  return adapter;
}

}  // namespace phishard
