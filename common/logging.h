// Logging and CHECK for every layer above kernels/ (Debian's Abseil 20220623 has no absl/log).
// Lines go to stdout, either plain (`2026-11-28T15:32:05.123Z INFO rank=0 message`) or, with
// SetLogJson(true), in the JSON line format the LoRAX launcher parses:
//   {"text": "...", "record": {"level": {"name": "INFO"}, "time": {...}, "extra": {"rank": 0}}}
// ERROR and CRITICAL lines are also written to stderr (the launcher shows stderr when a shard dies).
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace phishard {

enum class LogLevel { kTrace, kDebug, kInfo, kSuccess, kWarning, kError, kCritical };

void SetLogJson(bool json);
void SetLogLevel(LogLevel min_level);
// Parses TRACE/DEBUG/INFO/SUCCESS/WARNING/WARN/ERROR/CRITICAL (any case); false if unknown.
bool ParseLogLevel(std::string_view name, LogLevel* out);
void SetLogRank(int rank);
void Log(LogLevel level, std::string_view text);

namespace internal {
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line, bool fatal = false);
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  bool fatal_;
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

// CHECK is for programmer errors only (violated invariants), never for user input.
#define PHI_CHECK(cond)                                                                      \
  (cond) ? (void)0                                                                           \
         : ::phishard::internal::Voidify() &                                                 \
               ::phishard::internal::LogMessage(::phishard::LogLevel::kCritical, __FILE__,  \
                                                __LINE__, /*fatal=*/true)                    \
                       .stream()                                                             \
                   << "Check failed: " #cond " "
