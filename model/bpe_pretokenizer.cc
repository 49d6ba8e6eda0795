#include "model/bpe_pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <atomic>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "model/bpe_json.h"
#include "model/bpe_utf8.h"

namespace phishard {
namespace {

using bpe_json::Json;

// White_Space as a class body: 09..0D, 85, and \p{Z} (= Zs + Zl + Zp, which holds 20, A0,
// 1680, 2000..200A, 2028, 2029, 202F, 205F, 3000).
constexpr std::string_view kWhiteSpaceBody = R"(\t-\r\x{85}\p{Z})";

// Per-thread PCRE2 state: match data (one ovector pair: only the whole match is read) and a JIT
// stack larger than the 32 KiB default so long whitespace runs never hit the stack limit.
struct ThreadPcre2 {
  pcre2_match_data* match_data = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  ThreadPcre2() {
    match_data = pcre2_match_data_create(1, nullptr);
    jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  }
  ~ThreadPcre2() {
    pcre2_match_data_free(match_data);
    pcre2_jit_stack_free(jit_stack);
  }
};

ThreadPcre2& ThreadState() {
  thread_local ThreadPcre2 state;
  return state;
}

pcre2_jit_stack* JitStackCallback(void*) { return ThreadState().jit_stack; }

absl::StatusOr<SplitBehavior> ParseBehavior(const std::string& name, std::string_view where) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  return absl::InvalidArgumentError(absl::StrCat(bpe_json::Sv(where), ".behavior: unknown value \"",
                                                 name,
                                                 "\" (Removed, Isolated, MergedWithPrevious, "
                                                 "MergedWithNext, Contiguous)"));
}

}  // namespace

std::string RewriteWhitespaceClasses(std::string_view p) {
  std::string out;
  out.reserve(p.size() + 64);
  bool in_class = false;
  size_t i = 0;
  while (i < p.size()) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char d = p[i + 1];
      if (d == 'Q') {  // \Q...\E: literal text, copied untouched
        const size_t end = p.find("\\E", i + 2);
        const size_t stop = end == std::string_view::npos ? p.size() : end + 2;
        out.append(p.substr(i, stop - i));
        i = stop;
        continue;
      }
      if (d == 's') {
        if (in_class) {
          out.append(kWhiteSpaceBody);
        } else {
          absl::StrAppend(&out, "[", bpe_json::Sv(kWhiteSpaceBody), "]");
        }
        i += 2;
        continue;
      }
      if (d == 'S' && !in_class) {
        absl::StrAppend(&out, "[^", bpe_json::Sv(kWhiteSpaceBody), "]");
        i += 2;
        continue;
      }
      out.push_back(c);
      out.push_back(d);
      i += 2;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      ++i;
      if (i < p.size() && p[i] == '^') out.push_back(p[i++]);
      if (i < p.size() && p[i] == ']') out.push_back(p[i++]);  // leading ']' is literal
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // [:alpha:]
      const size_t end = p.find(":]", i + 2);
      if (end != std::string_view::npos) {
        out.append(p.substr(i, end + 2 - i));
        i = end + 2;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
    ++i;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<BpeRegex>> BpeRegex::Compile(std::string_view pattern,
                                                            std::string_view what) {
  const std::string rewritten = RewriteWhitespaceClasses(pattern);
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rewritten.data()), rewritten.size(),
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error_code,
                                   &error_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof(message));
    return absl::InvalidArgumentError(
        absl::StrCat(bpe_json::Sv(what), ": bad regex \"", bpe_json::Sv(pattern),
                     "\": ", reinterpret_cast<char*>(message), " (at offset ", error_offset, ")"));
  }
  auto regex = std::unique_ptr<BpeRegex>(new BpeRegex());
  regex->code_ = code;
  // JIT is an optimisation only: without it pcre2_match interprets the same pattern.
  if (pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0) {
    pcre2_match_context* context = pcre2_match_context_create(nullptr);
    pcre2_jit_stack_assign(context, &JitStackCallback, nullptr);
    regex->context_ = context;
  } else {
    PHI_LOG(DEBUG) << what << ": PCRE2 JIT unavailable, using the interpreter";
  }
  return regex;
}

BpeRegex::~BpeRegex() {
  pcre2_match_context_free(static_cast<pcre2_match_context*>(context_));
  pcre2_code_free(static_cast<pcre2_code*>(code_));
}

void BpeRegex::FindAll(std::string_view text, absl::FunctionRef<void(size_t, size_t)> fn) const {
  auto* code = static_cast<pcre2_code*>(code_);
  auto* context = static_cast<pcre2_match_context*>(context_);
  pcre2_match_data* md = ThreadState().match_data;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  bool have_last = false;
  size_t last_end = 0;
  while (pos <= text.size()) {
    const int rc = pcre2_match(code, subject, text.size(), pos, 0, md, context);
    if (rc == PCRE2_ERROR_NOMATCH) return;
    if (rc < 0) {
      // Resource limits only (match/depth/JIT stack): the rest of the text stays unmatched.
      static std::atomic<bool> logged{false};
      if (!logged.exchange(true)) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        PHI_LOG(WARNING) << "tokenizer regex: " << reinterpret_cast<char*>(message)
                         << "; rest of a " << text.size() << "-byte piece left unsplit";
      }
      return;
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t start = ov[0], end = ov[1];
    if (start == end && have_last && last_end == end) {
      if (pos >= text.size()) return;
      pos += bpe_utf8::NextCharLen(text, pos);
      continue;
    }
    fn(start, end);
    pos = end;
    have_last = true;
    last_end = end;
  }
}

// One pre-tokenizer step. ByteLevel: optional prefix space per split, then (use_regex) an
// Isolated split with the GPT-2 pattern. Split: regex or literal, behavior, invert.
struct PreTokenizer::Step {
  bool byte_level = false;
  bool add_prefix_space = false;
  std::unique_ptr<BpeRegex> regex;  // null: Split with a literal, or ByteLevel without regex
  std::string literal;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

PreTokenizer::PreTokenizer() = default;
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;
PreTokenizer::~PreTokenizer() = default;

namespace {

absl::Status AddSteps(const Json& config, std::string where,
                      std::vector<PreTokenizer::Step>* steps);

}  // namespace

absl::StatusOr<PreTokenizer> PreTokenizer::FromJson(const Json& config) {
  PreTokenizer pre;
  if (config.is_null()) return pre;
  absl::Status status = AddSteps(config, "pre_tokenizer", &pre.steps_);
  if (!status.ok()) return status;
  return pre;
}

namespace {

absl::Status AddSteps(const Json& config, std::string where,
                      std::vector<PreTokenizer::Step>* steps) {
  if (!config.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": expected an object, got ", config.type_name()));
  }
  absl::StatusOr<std::string> type = bpe_json::String(config, "type", where);
  if (!type.ok()) return type.status();
  if (*type == "Sequence") {
    const Json* list = bpe_json::Find(config, "pretokenizers");
    if (list == nullptr || !list->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".pretokenizers: expected an array"));
    }
    for (size_t i = 0; i < list->size(); ++i) {
      absl::Status s = AddSteps((*list)[i], absl::StrCat(where, ".pretokenizers[", i, "]"), steps);
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }
  PreTokenizer::Step step;
  if (*type == "ByteLevel") {
    step.byte_level = true;
    // HF's ByteLevel defaults: add_prefix_space = true, use_regex = true.
    absl::StatusOr<bool> prefix = bpe_json::Bool(config, "add_prefix_space", true, where);
    if (!prefix.ok()) return prefix.status();
    absl::StatusOr<bool> use_regex = bpe_json::Bool(config, "use_regex", true, where);
    if (!use_regex.ok()) return use_regex.status();
    step.add_prefix_space = *prefix;
    if (*use_regex) {
      auto regex = BpeRegex::Compile(kGpt2SplitPattern, where);
      if (!regex.ok()) return regex.status();
      step.regex = *std::move(regex);
    }
  } else if (*type == "Split") {
    const Json* pattern = bpe_json::Find(config, "pattern");
    const std::string pwhere = absl::StrCat(where, ".pattern");
    if (pattern == nullptr || !pattern->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(pwhere, ": expected {\"Regex\": ...} or {\"String\": ...}"));
    }
    if (bpe_json::Find(*pattern, "Regex") != nullptr) {
      absl::StatusOr<std::string> re = bpe_json::String(*pattern, "Regex", pwhere);
      if (!re.ok()) return re.status();
      auto regex = BpeRegex::Compile(*re, absl::StrCat(pwhere, ".Regex"));
      if (!regex.ok()) return regex.status();
      step.regex = *std::move(regex);
    } else if (bpe_json::Find(*pattern, "String") != nullptr) {
      absl::StatusOr<std::string> lit = bpe_json::String(*pattern, "String", pwhere);
      if (!lit.ok()) return lit.status();
      if (lit->empty()) {
        return absl::InvalidArgumentError(absl::StrCat(pwhere, ".String: must not be empty"));
      }
      step.literal = *std::move(lit);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(pwhere, ": expected {\"Regex\": ...} or {\"String\": ...}"));
    }
    absl::StatusOr<std::string> behavior = bpe_json::String(config, "behavior", where);
    if (!behavior.ok()) return behavior.status();
    absl::StatusOr<SplitBehavior> b = ParseBehavior(*behavior, where);
    if (!b.ok()) return b.status();
    step.behavior = *b;
    absl::StatusOr<bool> invert = bpe_json::Bool(config, "invert", false, where);
    if (!invert.ok()) return invert.status();
    step.invert = *invert;
  } else {
    return absl::UnimplementedError(
        absl::StrCat(where, ".type: unsupported pre-tokenizer \"", *type,
                     "\" (byte-level BPE supports ByteLevel, Split and Sequence of those)"));
  }
  steps->push_back(std::move(step));
  return absl::OkStatus();
}

// Splits `s` by the step's matches into `out`, HF `NormalizedString::split` semantics.
void ApplySplit(const PreTokenizer::Step& step, std::string_view s,
                std::vector<PreTokenizer::Segment>* segs, std::vector<std::string_view>* out) {
  size_t prev = 0;
  if (step.behavior == SplitBehavior::kIsolated && !step.invert && step.regex != nullptr) {
    // The common case (ByteLevel's regex): every gap and every match is a word, in order.
    step.regex->FindAll(s, [&](size_t start, size_t end) {
      if (prev != start) out->push_back(s.substr(prev, start - prev));
      if (end > start) out->push_back(s.substr(start, end - start));
      prev = end;
    });
    if (prev != s.size()) out->push_back(s.substr(prev));
    return;
  }
  segs->clear();
  auto on_match = [&](size_t start, size_t end) {
    if (prev != start) segs->push_back({prev, start, false});
    segs->push_back({start, end, true});
    prev = end;
  };
  if (step.regex != nullptr) {
    step.regex->FindAll(s, on_match);
  } else {
    for (size_t at = s.find(step.literal); at != std::string_view::npos;
         at = s.find(step.literal, at + step.literal.size())) {
      on_match(at, at + step.literal.size());
    }
  }
  if (prev != s.size()) segs->push_back({prev, s.size(), false});
  if (step.invert) {
    for (auto& seg : *segs) seg.is_match = !seg.is_match;
  }

  auto emit = [&](size_t start, size_t end) {
    if (end > start) out->push_back(s.substr(start, end - start));
  };
  switch (step.behavior) {
    case SplitBehavior::kIsolated:
      for (const auto& seg : *segs) emit(seg.start, seg.end);
      return;
    case SplitBehavior::kRemoved:
      for (const auto& seg : *segs) {
        if (!seg.is_match) emit(seg.start, seg.end);
      }
      return;
    case SplitBehavior::kMergedWithPrevious:
    case SplitBehavior::kContiguous: {
      // Folds into a list of spans: a match extends the previous span (MergedWithPrevious,
      // unless the previous piece was a match too); Contiguous joins runs of equal kind.
      const bool contiguous = step.behavior == SplitBehavior::kContiguous;
      std::vector<std::pair<size_t, size_t>> spans;
      bool previous_match = false;
      for (const auto& seg : *segs) {
        const bool join =
            contiguous ? seg.is_match == previous_match : seg.is_match && !previous_match;
        if (join && !spans.empty()) {
          spans.back().second = seg.end;
        } else {
          spans.push_back({seg.start, seg.end});
        }
        previous_match = seg.is_match;
      }
      for (const auto& [a, b] : spans) emit(a, b);
      return;
    }
    case SplitBehavior::kMergedWithNext: {
      std::vector<std::pair<size_t, size_t>> spans;  // built right to left
      bool previous_match = false;
      for (auto it = segs->rbegin(); it != segs->rend(); ++it) {
        if (it->is_match && !previous_match && !spans.empty()) {
          spans.back().first = it->start;
        } else {
          spans.push_back({it->start, it->end});
        }
        previous_match = it->is_match;
      }
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) emit(it->first, it->second);
      return;
    }
  }
}

}  // namespace

bool PreTokenizer::has_byte_level() const {
  return std::any_of(steps_.begin(), steps_.end(), [](const Step& s) { return s.byte_level; });
}

void PreTokenizer::Split(std::string_view piece, Scratch* scratch,
                         std::vector<std::string_view>* out) const {
  if (piece.empty()) return;
  if (steps_.empty()) {
    out->push_back(piece);
    return;
  }
  scratch->buffers.clear();
  std::vector<std::string_view>* cur = &scratch->a;
  std::vector<std::string_view>* next = &scratch->b;
  cur->clear();
  cur->push_back(piece);
  for (size_t k = 0; k < steps_.size(); ++k) {
    const Step& step = steps_[k];
    if (step.add_prefix_space) {
      // HF ByteLevel: prepend " " to every split that does not already start with one. The new
      // strings live in one buffer reserved up front so the views into it stay valid.
      size_t total = 0;
      for (std::string_view s : *cur) total += s.size() + 1;
      auto buffer = std::make_unique<std::string>();
      buffer->reserve(total);
      for (std::string_view& s : *cur) {
        if (s.front() == ' ') continue;
        const size_t at = buffer->size();
        buffer->push_back(' ');
        buffer->append(s);
        s = std::string_view(buffer->data() + at, s.size() + 1);
      }
      scratch->buffers.push_back(std::move(buffer));
    }
    if (step.regex == nullptr && step.literal.empty()) continue;  // ByteLevel without regex
    std::vector<std::string_view>* dst = k + 1 == steps_.size() ? out : next;
    if (dst == next) next->clear();
    for (std::string_view s : *cur) ApplySplit(step, s, &scratch->segments, dst);
    if (dst == out) return;
    std::swap(cur, next);
  }
  out->insert(out->end(), cur->begin(), cur->end());
}

}  // namespace phishard
