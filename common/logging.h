// Logging and CHECK for every layer above kernels/ (Debian's Abseil 20220623 has no absl/log).
// Lines go to stdout, either plain (`2026-11-28T15:32:05.123Z INFO rank=0 message`) or, with
// SetLogJson(true), in the JSON line format the LoRAX launcher parses:
//   {"text": "...", "record": {"level": {"name": "INFO"}, "time": {...}, "extra": {"rank": 0}}}
// Every line carries the rank. Lines about requests or batches carry their ids as structured
// fields (PHI_LOG_WITH): JSON `extra` keys (`"request_id": 7`, `"batch_ids": [1, 2]`), and in plain
// form ` request_id=7 batch_ids=1,2` after `rank=R`.
// ERROR and CRITICAL lines are also written to stderr (the launcher shows stderr when a shard
// dies).
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace phishard {

enum class LogLevel { kTrace, kDebug, kInfo, kSuccess, kWarning, kError, kCritical };

void SetLogJson(bool json);
void SetLogLevel(LogLevel min_level);
// Parses TRACE/DEBUG/INFO/SUCCESS/WARNING/WARN/ERROR/CRITICAL (any case); false if unknown.
bool ParseLogLevel(std::string_view name, LogLevel* out);
// The rank on every line; kNoLogRank: none (the `phishard launch` process, which is no rank).
inline constexpr int kNoLogRank = -1;
void SetLogRank(int rank);

// Structured fields of one log line, in the order added: a number, or a list of numbers.
class LogFields {
 public:
  struct Field {
    std::string key;
    std::vector<uint64_t> values;
    bool list = false;
  };
  LogFields& Add(std::string key, uint64_t value) {
    fields_.push_back({std::move(key), {value}, false});
    return *this;
  }
  LogFields& AddList(std::string key, std::vector<uint64_t> values) {
    fields_.push_back({std::move(key), std::move(values), true});
    return *this;
  }
  bool empty() const { return fields_.empty(); }
  const std::vector<Field>& fields() const { return fields_; }

 private:
  std::vector<Field> fields_;
};

void Log(LogLevel level, std::string_view text);
void Log(LogLevel level, std::string_view text, const LogFields& fields);

namespace internal {
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line, bool fatal = false);
  LogMessage(LogLevel level, const char* file, int line, LogFields fields);
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  bool fatal_;
  LogFields fields_;
  std::ostringstream stream_;
};
// PHI_LOG(INFO) spells levels as the launcher does; these map those spellings to LogLevel.
inline constexpr LogLevel kLogTRACE = LogLevel::kTrace;
inline constexpr LogLevel kLogDEBUG = LogLevel::kDebug;
inline constexpr LogLevel kLogINFO = LogLevel::kInfo;
inline constexpr LogLevel kLogSUCCESS = LogLevel::kSuccess;
inline constexpr LogLevel kLogWARNING = LogLevel::kWarning;
inline constexpr LogLevel kLogERROR = LogLevel::kError;
inline constexpr LogLevel kLogCRITICAL = LogLevel::kCritical;
struct Voidify {
  void operator&(std::ostream&) {}
};
}  // namespace internal

}  // namespace phishard

#define PHI_LOG(level) \
  ::phishard::internal::LogMessage(::phishard::internal::kLog##level, __FILE__, __LINE__).stream()

// PHI_LOG_WITH(INFO, LogFields().Add("request_id", id)) << "...": a line with structured fields.
#define PHI_LOG_WITH(level, fields)                                                       \
  ::phishard::internal::LogMessage(::phishard::internal::kLog##level, __FILE__, __LINE__, \
                                   (fields))                                              \
      .stream()

// CHECK is for programmer errors only (violated invariants), never for user input.
#define PHI_CHECK(cond)                                                                      \
  (cond) ? (void)0                                                                           \
         : ::phishard::internal::Voidify() &                                                 \
               ::phishard::internal::LogMessage(::phishard::LogLevel::kCritical, __FILE__,  \
                                                __LINE__, /*fatal=*/true)                    \
                       .stream()                                                             \
                   << "Check failed: " #cond " "
