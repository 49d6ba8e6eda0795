#include "common/logging.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <mutex>
#include <string>
#include <utility>

#include "nlohmann/json.hpp"

namespace phishard {
namespace {

std::atomic<bool> g_json{false};
std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<int> g_rank{0};
std::mutex g_mu;

const char* LevelName(LogLevel l) {
  switch (l) {
    case LogLevel::kTrace: return "TRACE";
    case LogLevel::kDebug: return "DEBUG";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kSuccess: return "SUCCESS";
    case LogLevel::kWarning: return "WARNING";
    case LogLevel::kError: return "ERROR";
    case LogLevel::kCritical: return "CRITICAL";
  }
  return "INFO";
}

}  // namespace

void SetLogJson(bool json) { g_json = json; }
void SetLogLevel(LogLevel min_level) { g_min_level = static_cast<int>(min_level); }
void SetLogRank(int rank) { g_rank = rank; }

bool ParseLogLevel(std::string_view name, LogLevel* out) {
  std::string n(name);
  for (char& c : n) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::pair<const char*, LogLevel> kNames[] = {
      {"TRACE", LogLevel::kTrace},     {"DEBUG", LogLevel::kDebug},
      {"INFO", LogLevel::kInfo},       {"SUCCESS", LogLevel::kSuccess},
      {"WARNING", LogLevel::kWarning}, {"WARN", LogLevel::kWarning},
      {"ERROR", LogLevel::kError},     {"CRITICAL", LogLevel::kCritical}};
  for (const auto& [s, l] : kNames) {
    if (n == s) {
      *out = l;
      return true;
    }
  }
  return false;
}

void Log(LogLevel level, std::string_view text) { Log(level, text, LogFields()); }

void Log(LogLevel level, std::string_view text, const LogFields& fields) {
  if (static_cast<int>(level) < g_min_level.load()) return;
  auto now = std::chrono::system_clock::now();
  double ts = std::chrono::duration<double>(now.time_since_epoch()).count();
  std::time_t secs = std::chrono::system_clock::to_time_t(now);
  int millis = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char when[64];
  std::snprintf(when, sizeof(when), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, millis);
  std::string line;
  if (g_json) {
    nlohmann::json j;
    // Invalid UTF-8 in a log message must not throw: replace it.
    j["text"] = std::string(text);
    j["record"]["level"]["name"] = LevelName(level);
    j["record"]["time"]["repr"] = when;
    j["record"]["time"]["timestamp"] = ts;
    j["record"]["extra"] = nlohmann::json::object();
    if (const int rank = g_rank.load(); rank != kNoLogRank) j["record"]["extra"]["rank"] = rank;
    for (const LogFields::Field& f : fields.fields()) {
      if (f.list) {
        j["record"]["extra"][f.key] = f.values;
      } else {
        j["record"]["extra"][f.key] = f.values.empty() ? 0 : f.values[0];
      }
    }
    line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } else {
    line = std::string(when) + " " + LevelName(level);
    if (const int rank = g_rank.load(); rank != kNoLogRank) {
      line.append(" rank=").append(std::to_string(rank));
    }
    for (const LogFields::Field& f : fields.fields()) {
      line.append(" ").append(f.key).append("=");
      for (size_t i = 0; i < f.values.size(); ++i) {
        if (i > 0) line.append(",");
        line.append(std::to_string(f.values[i]));
      }
    }
    line.append(" ").append(text);
  }
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(stdout, "%s\n", line.c_str());
  std::fflush(stdout);
  if (level >= LogLevel::kError) {
    std::fprintf(stderr, "%s %s\n", LevelName(level), std::string(text).c_str());
    std::fflush(stderr);
  }
}

namespace internal {

LogMessage::LogMessage(LogLevel level, const char* file, int line, bool fatal)
    : level_(level), fatal_(fatal) {
  if (fatal_ || level_ >= LogLevel::kError) {
    const char* base = file;
    for (const char* p = file; *p; ++p)
      if (*p == '/') base = p + 1;
    stream_ << base << ":" << line << ": ";
  }
}

LogMessage::LogMessage(LogLevel level, const char* file, int line, LogFields fields)
    : LogMessage(level, file, line, /*fatal=*/false) {
  fields_ = std::move(fields);
}

LogMessage::~LogMessage() {
  Log(level_, stream_.str(), fields_);
  if (fatal_) std::abort();
}

}  // namespace internal
}  // namespace phishard
