#include "server/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "common/logging.h"

namespace phishard {
namespace {

std::string RenderLabels(const MetricLabels& labels) {
  std::string out;
  for (const auto& [name, value] : labels) {
    if (!out.empty()) out += ',';
    out += name;
    out += "=\"";
    out += EscapeLabelValue(value);
    out += '"';
  }
  return out;
}

void CheckLabels(const MetricLabels& labels) {
  for (const auto& [name, value] : labels) {
    PHI_CHECK(IsValidLabelName(name) && name != "le") << "bad label name '" << name << "'";
  }
}

// `{a="1",b="2"}` from the const labels, the series' labels and an optional extra one; "" if none.
std::string Braces(const std::string& const_part, const std::string& series_part,
                   const std::string& extra = "") {
  std::string inner = const_part;
  for (const std::string* p : {&series_part, &extra}) {
    if (p->empty()) continue;
    if (!inner.empty()) inner += ',';
    inner += *p;
  }
  return inner.empty() ? "" : "{" + inner + "}";
}

}  // namespace

void Counter::Inc(double v) {
  if (!(v >= 0)) return;  // a counter only goes up; NaN and negatives are dropped
  value_.fetch_add(v, std::memory_order_relaxed);
}

void Gauge::Add(double v) { value_.fetch_add(v, std::memory_order_relaxed); }

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), buckets_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i < bounds_.size(); ++i) {
    PHI_CHECK(std::isfinite(bounds_[i]) && (i == 0 || bounds_[i] > bounds_[i - 1]))
        << "histogram bounds must be finite and strictly increasing";
  }
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double v) {
  // Bucket i counts bounds_[i-1] < v <= bounds_[i] (Prometheus `le` is inclusive).
  const size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::bucket_counts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  for (size_t i = 0; i < out.size(); ++i) out[i] = buckets_[i].load(std::memory_order_relaxed);
  return out;
}

void MetricsRegistry::SetConstLabel(std::string name, std::string value) {
  CheckLabels({{name, value}});
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [n, v] : const_labels_) {
    if (n == name) {
      v = std::move(value);
      return;
    }
  }
  const_labels_.emplace_back(std::move(name), std::move(value));
}

MetricsRegistry::Family& MetricsRegistry::Declare(std::string_view name, std::string_view help,
                                                  Type type) {
  PHI_CHECK(IsValidMetricName(name)) << "bad metric name '" << name << "'";
  for (auto& f : families_) {
    if (f->name == name) {
      PHI_CHECK(f->type == type) << "metric '" << name << "' declared with two types";
      return *f;
    }
  }
  families_.push_back(std::make_unique<Family>());
  Family& f = *families_.back();
  f.name = std::string(name);
  f.help = std::string(help);
  f.type = type;
  return f;
}

void MetricsRegistry::DeclareCounter(std::string_view name, std::string_view help) {
  std::lock_guard<std::mutex> lock(mu_);
  Declare(name, help, Type::kCounter);
}

void MetricsRegistry::DeclareGauge(std::string_view name, std::string_view help) {
  std::lock_guard<std::mutex> lock(mu_);
  Declare(name, help, Type::kGauge);
}

void MetricsRegistry::DeclareHistogram(std::string_view name, std::string_view help,
                                       std::vector<double> upper_bounds) {
  std::lock_guard<std::mutex> lock(mu_);
  Declare(name, help, Type::kHistogram).bounds = std::move(upper_bounds);
}

MetricsRegistry::Family& MetricsRegistry::Find(std::string_view name, Type type) {
  for (auto& f : families_) {
    if (f->name == name) {
      PHI_CHECK(f->type == type) << "metric '" << name << "' used with another type";
      return *f;
    }
  }
  PHI_CHECK(false) << "metric '" << name << "' was never declared";
  return *families_.front();  // unreachable
}

Counter& MetricsRegistry::GetCounter(std::string_view name, const MetricLabels& labels) {
  CheckLabels(labels);
  std::lock_guard<std::mutex> lock(mu_);
  auto& slot = Find(name, Type::kCounter).counters[RenderLabels(labels)];
  if (slot == nullptr) slot = std::make_unique<Counter>();
  return *slot;
}

Gauge& MetricsRegistry::GetGauge(std::string_view name, const MetricLabels& labels) {
  CheckLabels(labels);
  std::lock_guard<std::mutex> lock(mu_);
  auto& slot = Find(name, Type::kGauge).gauges[RenderLabels(labels)];
  if (slot == nullptr) slot = std::make_unique<Gauge>();
  return *slot;
}

Histogram& MetricsRegistry::GetHistogram(std::string_view name, const MetricLabels& labels) {
  CheckLabels(labels);
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = Find(name, Type::kHistogram);
  auto& slot = f.histograms[RenderLabels(labels)];
  if (slot == nullptr) slot = std::make_unique<Histogram>(f.bounds);
  return *slot;
}

std::string MetricsRegistry::Render() const {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string cl = RenderLabels(const_labels_);
  std::string out;
  for (const auto& f : families_) {
    static constexpr const char* kTypeNames[] = {"counter", "gauge", "histogram"};
    out += "# HELP " + f->name + " " + EscapeHelp(f->help) + "\n";
    out += "# TYPE " + f->name + " " + kTypeNames[static_cast<int>(f->type)] + "\n";
    for (const auto& [labels, c] : f->counters) {
      out += f->name + Braces(cl, labels) + " " + FormatMetricValue(c->value()) + "\n";
    }
    for (const auto& [labels, g] : f->gauges) {
      out += f->name + Braces(cl, labels) + " " + FormatMetricValue(g->value()) + "\n";
    }
    for (const auto& [labels, h] : f->histograms) {
      // Read the buckets once; count is their total so that +Inf == _count even while another
      // thread observes (the sum may then lag by that one observation).
      const std::vector<uint64_t> counts = h->bucket_counts();
      uint64_t cumulative = 0;
      for (size_t i = 0; i < counts.size(); ++i) {
        cumulative += counts[i];
        const std::string le =
            i < h->upper_bounds().size() ? FormatMetricValue(h->upper_bounds()[i]) : "+Inf";
        out += f->name + "_bucket" + Braces(cl, labels, "le=\"" + le + "\"") + " " +
               std::to_string(cumulative) + "\n";
      }
      out += f->name + "_sum" + Braces(cl, labels) + " " + FormatMetricValue(h->sum()) + "\n";
      out += f->name + "_count" + Braces(cl, labels) + " " + std::to_string(cumulative) + "\n";
    }
  }
  return out;
}

std::string EscapeLabelValue(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string EscapeHelp(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string FormatMetricValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.0f", v);
    return buf;
  }
  // The shortest of %.15g..%.17g that reads back exactly: 0.0025, not 0.0025000000000000001.
  char buf[32];
  for (int precision = 15; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

bool IsValidMetricName(std::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool IsValidLabelName(std::string_view name) {
  if (name.empty() || name.substr(0, 2) == "__") return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

// ---- the shard's metrics ----------------------------------------------------------------------

namespace {

constexpr char kStepSeconds[] = "phishard_step_seconds";
constexpr char kBatchSize[] = "phishard_batch_size";
constexpr char kPromptTokens[] = "phishard_prompt_tokens_total";
constexpr char kGeneratedTokens[] = "phishard_generated_tokens_total";
constexpr char kFinished[] = "phishard_requests_finished_total";
constexpr char kRpcs[] = "phishard_rpcs_total";
constexpr char kRpcErrors[] = "phishard_rpc_errors_total";
constexpr char kKvBlocks[] = "phishard_kv_blocks";
constexpr char kHealth[] = "phishard_health_state";
constexpr char kLoadProgress[] = "phishard_load_progress_ratio";

MetricsRegistry* MakeShardRegistry() {
  auto* r = new MetricsRegistry();  // process lifetime: hooks may run during static destruction
  r->SetConstLabel("rank", "0");
  r->DeclareGauge(kHealth,
                  "Shard state: 0 loading (no gRPC socket yet), 1 serving, 2 not serving "
                  "(device lost or shutting down)");
  r->DeclareGauge(kLoadProgress, "Fraction of the model weights loaded (0..1)");
  // Seconds: from a ~1 ms decode step of a tiny model to a 30 s prefill of a long prompt.
  r->DeclareHistogram(kStepSeconds, "Wall time of one successful Prefill or Decode step",
                      {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30});
  r->DeclareHistogram(kBatchSize, "Requests in one Prefill or Decode step",
                      {1, 2, 4, 8, 16, 32, 64, 128, 256, 512});
  r->DeclareCounter(kPromptTokens, "Prompt tokens prefilled (after truncation)");
  r->DeclareCounter(kGeneratedTokens, "Tokens generated by Prefill and Decode steps");
  r->DeclareCounter(kFinished, "Requests finished, by finish reason");
  r->DeclareCounter(kRpcs, "LoraxService RPCs answered, by method");
  r->DeclareCounter(kRpcErrors, "LoraxService RPCs answered with an error, by method and code");
  r->DeclareGauge(kKvBlocks, "KV cache blocks by state (used, free); 0 before Warmup");
  r->GetGauge(kHealth).Set(0);
  r->GetGauge(kLoadProgress).Set(0);
  r->GetGauge(kKvBlocks, {{"state", "used"}});
  r->GetGauge(kKvBlocks, {{"state", "free"}});
  r->GetCounter(kPromptTokens);
  r->GetCounter(kGeneratedTokens);
  for (const char* kind : {"prefill", "decode"}) {
    r->GetHistogram(kStepSeconds, {{"kind", kind}});
    r->GetHistogram(kBatchSize, {{"kind", kind}});
  }
  return r;
}

}  // namespace

MetricsRegistry& ShardMetricsRegistry() {
  static MetricsRegistry* registry = MakeShardRegistry();
  return *registry;
}

void MetricsSetRank(int rank) {
  ShardMetricsRegistry().SetConstLabel("rank", std::to_string(rank));
}

void MetricsSetHealth(HealthStateValue state) {
  static Gauge& g = ShardMetricsRegistry().GetGauge(kHealth);
  g.Set(static_cast<int>(state));
}

void MetricsRecordRpc(std::string_view method, int code) {
  MetricsRegistry& r = ShardMetricsRegistry();
  r.GetCounter(kRpcs, {{"method", std::string(method)}}).Inc();
  if (code != 0) {
    r.GetCounter(kRpcErrors,
                 {{"method", std::string(method)}, {"code", std::string(GrpcCodeName(code))}})
        .Inc();
  }
}

void MetricsRecordStep(std::string_view kind, double seconds, int batch_size) {
  MetricsRegistry& r = ShardMetricsRegistry();
  r.GetHistogram(kStepSeconds, {{"kind", std::string(kind)}}).Observe(seconds);
  r.GetHistogram(kBatchSize, {{"kind", std::string(kind)}}).Observe(batch_size);
}

void MetricsAddPromptTokens(int64_t n) {
  static Counter& c = ShardMetricsRegistry().GetCounter(kPromptTokens);
  c.Inc(static_cast<double>(n));
}

void MetricsAddGeneratedTokens(int64_t n) {
  static Counter& c = ShardMetricsRegistry().GetCounter(kGeneratedTokens);
  c.Inc(static_cast<double>(n));
}

void MetricsRecordFinished(std::string_view reason) {
  ShardMetricsRegistry().GetCounter(kFinished, {{"reason", std::string(reason)}}).Inc();
}

void MetricsSetKvBlocks(int64_t used, int64_t free) {
  static Gauge& u = ShardMetricsRegistry().GetGauge(kKvBlocks, {{"state", "used"}});
  static Gauge& f = ShardMetricsRegistry().GetGauge(kKvBlocks, {{"state", "free"}});
  u.Set(static_cast<double>(used));
  f.Set(static_cast<double>(free));
}

void MetricsSetAdaptersLoaded(int n) {
  static Gauge& g = []() -> Gauge& {
    MetricsRegistry& r = ShardMetricsRegistry();
    r.DeclareGauge("phishard_adapters_loaded",
                   "LoRA adapters resident in the registry (static and preloaded included)");
    return r.GetGauge("phishard_adapters_loaded");
  }();
  g.Set(n);
}

void MetricsSetLoadProgress(double fraction) {
  static Gauge& g = ShardMetricsRegistry().GetGauge(kLoadProgress);
  g.Set(std::clamp(fraction, 0.0, 1.0));
}

void MetricsRecordPrefill(double seconds, const BatchInput& batch, const StepResult& step) {
  int64_t prompt = 0;
  for (const RequestInput& r : batch.requests) {
    const int64_t n = static_cast<int64_t>(r.token_ids.size());
    prompt += r.truncate > 0 ? std::min<int64_t>(n, r.truncate) : n;
  }
  MetricsAddPromptTokens(prompt);
  MetricsRecordStepResult("prefill", seconds, static_cast<int>(batch.requests.size()), step);
}

void MetricsRecordStepResult(std::string_view kind, double seconds, int batch_size,
                             const StepResult& step) {
  MetricsRecordStep(kind, seconds, batch_size);
  int64_t tokens = 0;
  for (const GenerationOut& g : step.generations) {
    tokens += static_cast<int64_t>(g.next_tokens.ids.size());
    if (!g.generated_text.has_value()) continue;
    switch (g.generated_text->finish_reason) {
      case FinishReason::kLength:
        MetricsRecordFinished("length");
        break;
      case FinishReason::kEosToken:
        MetricsRecordFinished("eos_token");
        break;
      case FinishReason::kStopSequence:
        MetricsRecordFinished("stop_sequence");
        break;
    }
  }
  MetricsAddGeneratedTokens(tokens);
}

std::string_view GrpcCodeName(int code) {
  static constexpr std::string_view kNames[] = {"OK",
                                                "CANCELLED",
                                                "UNKNOWN",
                                                "INVALID_ARGUMENT",
                                                "DEADLINE_EXCEEDED",
                                                "NOT_FOUND",
                                                "ALREADY_EXISTS",
                                                "PERMISSION_DENIED",
                                                "RESOURCE_EXHAUSTED",
                                                "FAILED_PRECONDITION",
                                                "ABORTED",
                                                "OUT_OF_RANGE",
                                                "UNIMPLEMENTED",
                                                "INTERNAL",
                                                "UNAVAILABLE",
                                                "DATA_LOSS",
                                                "UNAUTHENTICATED"};
  if (code < 0 || code >= static_cast<int>(std::size(kNames))) return "UNKNOWN";
  return kNames[code];
}

}  // namespace phishard
