#include "model/phi_config.h"

#include <climits>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "model/json_depth.h"
#include "model/text_file.h"
#include "nlohmann/json.hpp"

namespace phishard {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// Typed access to one JSON object; every error names the file and the (dotted) field. A field
// that is absent or JSON null counts as "not given" (HF writes e.g. `"rope_scaling": null`).
class Fields {
 public:
  Fields(const json& obj, std::string source, std::string prefix = "")
      : obj_(obj), source_(std::move(source)), prefix_(std::move(prefix)) {}

  const json* Find(const std::string& key) const {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  bool Has(const std::string& key) const { return Find(key) != nullptr; }
  std::string Name(const std::string& key) const { return prefix_ + key; }

  absl::Status Error(const std::string& key, std::string_view problem) const {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field '%s' %s", source_, Name(key), problem));
  }
  absl::Status WrongType(const std::string& key, std::string_view expected) const {
    return Error(key, absl::StrFormat("must be %s, got %s", expected, Find(key)->dump()));
  }

  // Positive int; required.
  absl::Status RequiredInt(const std::string& key, int* out) const {
    if (!Has(key)) return Error(key, "is missing (required)");
    return OptionalInt(key, out);
  }
  // Positive int; `out` keeps its default when not given.
  absl::Status OptionalInt(const std::string& key, int* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number_integer() || v->get<int64_t>() <= 0 || v->get<int64_t>() > INT_MAX ||
        (v->is_number_unsigned() && v->get<uint64_t>() > INT_MAX)) {
      return WrongType(key, "a positive integer");
    }
    *out = static_cast<int>(v->get<int64_t>());
    return absl::OkStatus();
  }
  // Finite number > 0 (int or float in JSON).
  absl::Status OptionalPositive(const std::string& key, double* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number() || !(v->get<double>() > 0) || !std::isfinite(v->get<double>())) {
      return WrongType(key, "a positive number");
    }
    *out = v->get<double>();
    return absl::OkStatus();
  }
  absl::Status OptionalBool(const std::string& key, bool* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_boolean()) return WrongType(key, "true or false");
    *out = v->get<bool>();
    return absl::OkStatus();
  }
  absl::Status OptionalString(const std::string& key, std::string* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_string()) return WrongType(key, "a string");
    *out = v->get<std::string>();
    return absl::OkStatus();
  }
  // Token id list: an int or a list of ints (each >= 0). Sets *given when the field is present.
  absl::Status OptionalTokenIds(const std::string& key, std::vector<int>* out, bool* given) const {
    const json* v = Find(key);
    *given = v != nullptr;
    if (v == nullptr) return absl::OkStatus();
    auto one = [](const json& x, int* id) {
      if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT_MAX ||
          (x.is_number_unsigned() && x.get<uint64_t>() > INT_MAX)) {
        return false;
      }
      *id = static_cast<int>(x.get<int64_t>());
      return true;
    };
    std::vector<int> ids;
    int id;
    if (v->is_array()) {
      for (const json& x : *v) {
        if (!one(x, &id)) return WrongType(key, "a token id or a list of token ids");
        ids.push_back(id);
      }
    } else if (one(*v, &id)) {
      ids.push_back(id);
    } else {
      return WrongType(key, "a token id or a list of token ids");
    }
    *out = std::move(ids);
    return absl::OkStatus();
  }

 private:
  const json& obj_;
  std::string source_;
  std::string prefix_;
};

// A RoPE scaling description (4.x `rope_scaling`, 5.x `rope_parameters`): Phi-1/1.5/2 never
// scale; "default" (or none) and "linear" (positions divided by `factor`, as transformers'
// inv_freq /= factor; `*linear_factor` receives it) are accepted, everything else (dynamic,
// yarn, longrope, llama3, ...) is UNIMPLEMENTED rather than silently computing the wrong
// positions.
absl::Status CheckRopeType(const Fields& f, const std::string& source, double* linear_factor) {
  std::string type;
  const std::string key = f.Has("rope_type") ? "rope_type" : "type";
  PHI_RETURN_IF_ERROR(f.OptionalString(key, &type));
  if (type.empty() || type == "default" || type == "none") return absl::OkStatus();
  if (type == "linear") {
    if (!f.Has("factor")) return f.Error("factor", "is missing (required for linear RoPE scaling)");
    PHI_RETURN_IF_ERROR(f.OptionalPositive("factor", linear_factor));
    return absl::OkStatus();
  }
  return absl::UnimplementedError(absl::StrFormat(
      "%s: field '%s' = \"%s\" (RoPE scaling) is not supported (default and linear are)", source,
      f.Name(key), type));
}

absl::StatusOr<json> ParseJsonObject(std::string_view text, const std::string& source) {
  if (absl::Status s = CheckJsonNesting(text, source); !s.ok()) return s;
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": top level is ", j.type_name(), ", expected a JSON object"));
  }
  return j;
}

}  // namespace

absl::StatusOr<PhiConfig> ParsePhiConfig(std::string_view json_text, std::string_view source_sv) {
  const std::string source(source_sv);
  absl::StatusOr<json> parsed = ParseJsonObject(json_text, source);
  if (!parsed.ok()) return parsed.status();
  const Fields f(*parsed, source);
  PhiConfig c;

  if (!f.Has("model_type")) return f.Error("model_type", "is missing (expected \"phi\")");
  PHI_RETURN_IF_ERROR(f.OptionalString("model_type", &c.model_type));
  if (c.model_type != "phi") {
    return f.Error("model_type",
                   absl::StrFormat("is \"%s\"; only \"phi\" (PhiForCausalLM, HF weight names) is "
                                   "supported",
                                   c.model_type));
  }

  PHI_RETURN_IF_ERROR(f.RequiredInt("hidden_size", &c.hidden_size));
  PHI_RETURN_IF_ERROR(f.RequiredInt("num_attention_heads", &c.num_attention_heads));
  PHI_RETURN_IF_ERROR(f.RequiredInt("num_hidden_layers", &c.num_hidden_layers));
  PHI_RETURN_IF_ERROR(f.RequiredInt("intermediate_size", &c.intermediate_size));
  PHI_RETURN_IF_ERROR(f.RequiredInt("vocab_size", &c.vocab_size));
  c.num_key_value_heads = c.num_attention_heads;
  // `n_head_kv` is the pre-HF (phi-msft) spelling, still honoured upstream.
  PHI_RETURN_IF_ERROR(f.OptionalInt(
      f.Has("num_key_value_heads") ? "num_key_value_heads" : "n_head_kv", &c.num_key_value_heads));
  PHI_RETURN_IF_ERROR(
      f.OptionalInt(f.Has("max_position_embeddings") ? "max_position_embeddings" : "n_positions",
                    &c.max_position_embeddings));

  double eps = c.layer_norm_eps;
  PHI_RETURN_IF_ERROR(f.OptionalPositive("layer_norm_eps", &eps));
  // The LayerNorms add eps in float32 (as torch's kernels do): a value that rounds to 0 there
  // (1e-85) would divide a constant row by zero, one past FLT_MAX would be inf.
  c.layer_norm_eps = static_cast<float>(eps);
  if (!(c.layer_norm_eps > 0) || !std::isfinite(c.layer_norm_eps)) {
    return f.WrongType("layer_norm_eps", "a positive number within float32's range");
  }

  // RoPE: 4.x top level, then 5.x rope_parameters (which must agree when both are written, as
  // transformers 5 does for partial_rotary_factor).
  PHI_RETURN_IF_ERROR(f.OptionalPositive("partial_rotary_factor", &c.partial_rotary_factor));
  PHI_RETURN_IF_ERROR(f.OptionalPositive("rope_theta", &c.rope_theta));
  if (const json* rs = f.Find("rope_scaling")) {
    if (!rs->is_object()) return f.WrongType("rope_scaling", "an object or null");
    PHI_RETURN_IF_ERROR(
        CheckRopeType(Fields(*rs, source, "rope_scaling."), source, &c.rope_linear_factor));
  }
  if (const json* rp = f.Find("rope_parameters")) {
    if (!rp->is_object()) return f.WrongType("rope_parameters", "an object or null");
    const Fields r(*rp, source, "rope_parameters.");
    // (rope_parameters wins over rope_scaling, as in transformers 5.x.)
    c.rope_linear_factor = 1.0;
    PHI_RETURN_IF_ERROR(CheckRopeType(r, source, &c.rope_linear_factor));
    for (auto [key, top] :
         {std::pair<std::string, double*>{"partial_rotary_factor", &c.partial_rotary_factor},
          {"rope_theta", &c.rope_theta}}) {
      if (!r.Has(key)) continue;
      double v = 0;
      PHI_RETURN_IF_ERROR(r.OptionalPositive(key, &v));
      // transformers 5.x reads RoPE settings from rope_parameters only, and its PhiConfig also
      // writes a stale top-level default (partial_rotary_factor 0.5) next to it: follow HF.
      if (f.Has(key) && v != *top) {
        PHI_LOG(WARNING) << source << ": rope_parameters." << key << " = " << v
                         << " disagrees with top-level " << key << " = " << *top
                         << "; using rope_parameters (transformers 5.x semantics)";
      }
      *top = v;
    }
  }
  if (c.partial_rotary_factor > 1.0) {
    return f.Error("partial_rotary_factor",
                   absl::StrFormat("= %g must be in (0, 1]", c.partial_rotary_factor));
  }

  c.hidden_act_name = "gelu_new";
  PHI_RETURN_IF_ERROR(f.OptionalString("hidden_act", &c.hidden_act_name));
  // transformers' ACT2FN names of the two GELUs: the tanh form (gelu_accurate is the same
  // formula with its constant precomputed) and the exact erf form (gelu_python spells it out).
  if (c.hidden_act_name == "gelu_new" || c.hidden_act_name == "gelu_pytorch_tanh" ||
      c.hidden_act_name == "gelu_fast" || c.hidden_act_name == "gelu_accurate") {
    c.hidden_act = Activation::kGeluTanh;
  } else if (c.hidden_act_name == "gelu" || c.hidden_act_name == "gelu_python") {
    c.hidden_act = Activation::kGeluErf;
  } else {
    return f.Error("hidden_act",
                   absl::StrFormat("= \"%s\" is not supported (gelu_new, gelu_pytorch_tanh, "
                                   "gelu_fast, gelu_accurate, gelu, gelu_python)",
                                   c.hidden_act_name));
  }

  PHI_RETURN_IF_ERROR(f.OptionalBool("tie_word_embeddings", &c.tie_word_embeddings));
  PHI_RETURN_IF_ERROR(f.OptionalBool("qk_layernorm", &c.qk_layernorm));
  if (f.Has("quantization_config")) {
    return absl::UnimplementedError(absl::StrCat(
        source, ": field 'quantization_config' is set; quantized checkpoints are not supported"));
  }

  // transformers 5 writes `dtype`, 4.x `torch_dtype`; some writers prefix "torch.".
  const std::string dtype_key = f.Has("torch_dtype") ? "torch_dtype" : "dtype";
  PHI_RETURN_IF_ERROR(f.OptionalString(dtype_key, &c.torch_dtype));
  if (c.torch_dtype.rfind("torch.", 0) == 0) c.torch_dtype = c.torch_dtype.substr(6);
  if (!c.torch_dtype.empty() && c.torch_dtype != "float16" && c.torch_dtype != "bfloat16" &&
      c.torch_dtype != "float32") {
    return f.Error(dtype_key, absl::StrFormat("= \"%s\"; expected float16, bfloat16 or float32",
                                              c.torch_dtype));
  }

  bool given = false;
  PHI_RETURN_IF_ERROR(f.OptionalTokenIds("eos_token_id", &c.eos_token_ids, &given));
  std::vector<int> bos;
  PHI_RETURN_IF_ERROR(f.OptionalTokenIds("bos_token_id", &bos, &given));
  if (bos.size() > 1) return f.Error("bos_token_id", "must be a single token id");
  if (!bos.empty()) c.bos_token_id = bos[0];

  // Derived shapes.
  if (c.hidden_size % c.num_attention_heads != 0) {
    return f.Error("hidden_size", absl::StrFormat("= %d is not divisible by num_attention_heads "
                                                  "= %d",
                                                  c.hidden_size, c.num_attention_heads));
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return f.Error("num_key_value_heads",
                   absl::StrFormat("= %d does not divide num_attention_heads = %d",
                                   c.num_key_value_heads, c.num_attention_heads));
  }
  // Python's int(): truncation of the same double product, so 0.4 * 80 = 32.000000000000004
  // gives 32 here exactly as in transformers.
  c.rotary_dim = static_cast<int>(c.partial_rotary_factor * c.head_dim);
  if (c.rotary_dim < 2 || c.rotary_dim % 2 != 0 || c.rotary_dim > c.head_dim) {
    return f.Error("partial_rotary_factor",
                   absl::StrFormat("= %g gives rotary_dim %d for head_dim %d; it must be even, "
                                   ">= 2 and <= head_dim",
                                   c.partial_rotary_factor, c.rotary_dim, c.head_dim));
  }
  return c;
}

absl::StatusOr<PhiConfig> LoadPhiConfig(const fs::path& model_dir) {
  const fs::path config_path = model_dir / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config_path, ec)) {
    return absl::NotFoundError(absl::StrCat("no config.json in '", model_dir.string(), "'"));
  }
  absl::StatusOr<std::string> text = ReadTextFile(config_path);
  if (!text.ok()) return text.status();
  absl::StatusOr<PhiConfig> config = ParsePhiConfig(*text, config_path.string());
  if (!config.ok()) return config.status();

  // generation_config.json's eos_token_id is what HF generate() stops on; it wins when given.
  const fs::path gen_path = model_dir / "generation_config.json";
  if (fs::exists(gen_path, ec)) {
    absl::StatusOr<std::string> gen_text = ReadTextFile(gen_path);
    if (!gen_text.ok()) return gen_text.status();
    absl::StatusOr<json> gen = ParseJsonObject(*gen_text, gen_path.string());
    if (!gen.ok()) return gen.status();
    std::vector<int> eos;
    bool given = false;
    PHI_RETURN_IF_ERROR(
        Fields(*gen, gen_path.string()).OptionalTokenIds("eos_token_id", &eos, &given));
    if (given) {
      config->eos_token_ids = std::move(eos);
      config->eos_token_ids_from_generation_list = (*gen)["eos_token_id"].is_array();
    }
  }
  return config;
}

}  // namespace phishard
