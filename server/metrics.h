// A tiny Prometheus text-format (exposition format 0.0.4) registry: counters, gauges and
// histograms with fixed buckets, each a family of series told apart by label values.
//
// Thread safety: updating a series is lock-free (atomics); looking a series up by its label
// values, creating it, and rendering take the registry mutex for map walks only, never across an
// engine step. Series are never removed, so a Counter*/Gauge*/Histogram* stays valid for the
// registry's lifetime and hot paths may cache it.
//
// Metric and label names are compile-time constants of this codebase: a bad one is a programmer
// error (PHI_CHECK), not a runtime error.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "server/batch_types.h"

namespace phishard {

using MetricLabels = std::vector<std::pair<std::string, std::string>>;  // (name, value), in order

class Counter {
 public:
  void Inc(double v = 1.0);  // v >= 0 (a counter never goes down)
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double v);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);  // strictly increasing, finite
  void Observe(double v);
  const std::vector<double>& upper_bounds() const { return bounds_; }
  // Per-bucket (non-cumulative) counts; the last entry is the +Inf bucket.
  std::vector<uint64_t> bucket_counts() const;
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }
  double sum() const { return sum_.load(std::memory_order_relaxed); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds_.size() + 1
  std::atomic<uint64_t> count_{0};
  std::atomic<double> sum_{0.0};
};

class MetricsRegistry {
 public:
  MetricsRegistry() = default;
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  // Labels added to every series at render time (e.g. rank="0"); replaces earlier values.
  void SetConstLabel(std::string name, std::string value);

  // Declares a family (idempotent for the same name and type; another type is a PHI_CHECK).
  // Families render in declaration order.
  void DeclareCounter(std::string_view name, std::string_view help);
  void DeclareGauge(std::string_view name, std::string_view help);
  void DeclareHistogram(std::string_view name, std::string_view help,
                        std::vector<double> upper_bounds);

  // The series of a declared family with these label values (created at zero on first use).
  Counter& GetCounter(std::string_view name, const MetricLabels& labels = {});
  Gauge& GetGauge(std::string_view name, const MetricLabels& labels = {});
  Histogram& GetHistogram(std::string_view name, const MetricLabels& labels = {});

  // The whole registry in the Prometheus text exposition format, version 0.0.4.
  std::string Render() const;

 private:
  enum class Type { kCounter, kGauge, kHistogram };
  struct Family {
    std::string name;
    std::string help;
    Type type;
    std::vector<double> bounds;  // histograms
    // Keyed by the rendered label set so series print in a stable order.
    std::map<std::string, std::unique_ptr<Counter>> counters;
    std::map<std::string, std::unique_ptr<Gauge>> gauges;
    std::map<std::string, std::unique_ptr<Histogram>> histograms;
  };
  Family& Declare(std::string_view name, std::string_view help, Type type);
  Family& Find(std::string_view name, Type type);

  mutable std::mutex mu_;
  MetricLabels const_labels_;
  std::vector<std::unique_ptr<Family>> families_;
};

// Escapes a label value (\ " and newline) and a HELP text (\ and newline) per the format.
std::string EscapeLabelValue(std::string_view v);
std::string EscapeHelp(std::string_view v);
// Go-style float formatting Prometheus expects: integers without exponent, +Inf, -Inf, NaN.
std::string FormatMetricValue(double v);
bool IsValidMetricName(std::string_view name);  // [a-zA-Z_:][a-zA-Z0-9_:]*
bool IsValidLabelName(std::string_view name);   // [a-zA-Z_][a-zA-Z0-9_]*, not "__" reserved

// ---- the shard's metrics (docs/observability.md) ----------------------------------------------

// phishard_health_state values.
enum class HealthStateValue { kLoading = 0, kServing = 1, kNotServing = 2 };

// The process-wide registry with every phishard_* family declared.
MetricsRegistry& ShardMetricsRegistry();

// Hooks, all cheap and callable from any thread.
void MetricsSetRank(int rank);
void MetricsSetHealth(HealthStateValue state);
// One finished RPC (every method, OK included): phishard_rpcs_total and, if not OK,
// phishard_rpc_errors_total{code=<gRPC code name>}. `code` is the absl/gRPC numeric code.
void MetricsRecordRpc(std::string_view method, int code);
// One successful Prefill ("prefill") or Decode ("decode") step of `batch_size` requests.
void MetricsRecordStep(std::string_view kind, double seconds, int batch_size);
void MetricsAddPromptTokens(int64_t n);
void MetricsAddGeneratedTokens(int64_t n);
// reason: "length" | "eos_token" | "stop_sequence".
void MetricsRecordFinished(std::string_view reason);
void MetricsSetKvBlocks(int64_t used, int64_t free);
void MetricsSetLoadProgress(double fraction);  // phishard_load_progress_ratio, 0..1
// phishard_adapters_loaded; the family exists only once a shard with adapters calls this.
void MetricsSetAdaptersLoaded(int n);
// A successful Prefill: its prompt tokens (the router's token ids, capped at `truncate`; requests
// sent as text only are not counted), then as MetricsRecordStepResult.
void MetricsRecordPrefill(double seconds, const BatchInput& batch, const StepResult& step);
// A successful step of `batch_size` requests: latency, batch size, the tokens this rank emitted
// (under tensor parallelism only the requests it owns) and the requests that finished.
void MetricsRecordStepResult(std::string_view kind, double seconds, int batch_size,
                             const StepResult& step);

// gRPC status code names as gRPC spells them (OK, INVALID_ARGUMENT, ...); "UNKNOWN" if out of
// range.
std::string_view GrpcCodeName(int code);

}  // namespace phishard
