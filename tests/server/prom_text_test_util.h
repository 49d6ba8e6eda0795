// Test helpers shared by tests/server/metrics_test.cc and tests/integration/metrics_test.cc:
// a strict parser of the Prometheus text exposition format 0.0.4 and a tiny HTTP GET client.
//
// The parser rejects what Prometheus would reject or silently mangle: a sample before its
// family's HELP/TYPE, a TYPE given twice, bad metric/label names, unknown escapes in label
// values, duplicate labels, unparsable values, and histograms whose buckets are not cumulative
// in increasing `le`, lack `+Inf`, or disagree with `_count`, or lack `_sum`.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace phishard::testing {

struct PromSample {
  std::string name;                           // as written (with _bucket/_sum/_count)
  std::map<std::string, std::string> labels;  // unescaped values
  double value = 0;
};

struct PromFamily {
  std::string help;
  std::string type;
  std::vector<PromSample> samples;
};

struct PromParse {
  std::string error;  // "" when the text is valid
  std::map<std::string, PromFamily> families;

  // The one sample of `family` whose name is `name` and whose labels include `labels`; NaN if
  // there is none or more than one.
  double Value(const std::string& family, const std::string& name,
               const std::map<std::string, std::string>& labels = {}) const {
    auto it = families.find(family);
    if (it == families.end()) return NAN;
    double found = NAN;
    int hits = 0;
    for (const PromSample& s : it->second.samples) {
      if (s.name != name) continue;
      bool match = true;
      for (const auto& [k, v] : labels) {
        auto l = s.labels.find(k);
        if (l == s.labels.end() || l->second != v) match = false;
      }
      if (match) {
        found = s.value;
        ++hits;
      }
    }
    return hits == 1 ? found : NAN;
  }
};

inline bool PromIsName(const std::string& s, bool colon_ok) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                    (colon_ok && c == ':') || (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

inline bool PromParseValue(const std::string& s, double* out) {
  if (s == "+Inf") return *out = INFINITY, true;
  if (s == "-Inf") return *out = -INFINITY, true;
  if (s == "NaN") return *out = NAN, true;
  if (s.empty()) return false;
  char* end = nullptr;
  *out = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size();
}

// Parses `name{labels} value` (no timestamps: this shard never writes them).
inline std::string PromParseSample(const std::string& line, PromSample* out) {
  size_t i = 0;
  while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
  out->name = line.substr(0, i);
  if (!PromIsName(out->name, true)) return "bad metric name in: " + line;
  if (i < line.size() && line[i] == '{') {
    ++i;
    while (true) {
      if (i < line.size() && line[i] == '}') {
        ++i;
        break;
      }
      size_t eq = line.find('=', i);
      if (eq == std::string::npos) return "label without '=' in: " + line;
      const std::string lname = line.substr(i, eq - i);
      if (!PromIsName(lname, false) || lname.rfind("__", 0) == 0) {
        return "bad label name '" + lname + "' in: " + line;
      }
      if (eq + 1 >= line.size() || line[eq + 1] != '"') return "unquoted label value: " + line;
      std::string value;
      size_t j = eq + 2;
      for (;; ++j) {
        if (j >= line.size()) return "unterminated label value: " + line;
        if (line[j] == '"') break;
        if (line[j] == '\n') return "raw newline in label value";
        if (line[j] == '\\') {
          if (j + 1 >= line.size()) return "dangling backslash: " + line;
          const char e = line[++j];
          if (e == '\\') {
            value += '\\';
          } else if (e == '"') {
            value += '"';
          } else if (e == 'n') {
            value += '\n';
          } else {
            return std::string("unknown escape \\") + e + " in: " + line;
          }
        } else {
          value += line[j];
        }
      }
      if (!out->labels.emplace(lname, value).second) return "duplicate label " + lname;
      i = j + 1;
      if (i < line.size() && line[i] == ',') {
        ++i;
      } else if (i >= line.size() || line[i] != '}') {
        return "expected ',' or '}' in: " + line;
      }
    }
  }
  if (i >= line.size() || line[i] != ' ') return "no space before the value in: " + line;
  if (!PromParseValue(line.substr(i + 1), &out->value)) return "bad value in: " + line;
  return "";
}

inline std::string PromCheckHistogram(const std::string& family, const PromFamily& f) {
  // Group by the label set without `le`.
  struct Series {
    std::vector<std::pair<double, double>> buckets;  // (le, cumulative count) in text order
    bool has_sum = false, has_count = false;
    double count = 0;
  };
  std::map<std::map<std::string, std::string>, Series> series;
  for (const PromSample& s : f.samples) {
    std::map<std::string, std::string> key = s.labels;
    if (s.name == family + "_bucket") {
      auto le = key.find("le");
      double bound;
      if (le == key.end() || !PromParseValue(le->second, &bound)) return "bucket without le";
      key.erase(le);
      series[key].buckets.emplace_back(bound, s.value);
    } else if (s.name == family + "_sum") {
      series[key].has_sum = true;
    } else if (s.name == family + "_count") {
      series[key].has_count = true;
      series[key].count = s.value;
    } else {
      return "histogram " + family + " has a sample named " + s.name;
    }
  }
  for (const auto& [key, s] : series) {
    if (s.buckets.empty() || !std::isinf(s.buckets.back().first)) {
      return "histogram " + family + ": the last bucket is not le=\"+Inf\"";
    }
    for (size_t i = 1; i < s.buckets.size(); ++i) {
      if (!(s.buckets[i].first > s.buckets[i - 1].first)) return family + ": le not increasing";
      if (s.buckets[i].second < s.buckets[i - 1].second) return family + ": not cumulative";
    }
    if (!s.has_sum || !s.has_count) return family + ": _sum or _count missing";
    if (s.count != s.buckets.back().second) return family + ": +Inf bucket != _count";
  }
  return "";
}

inline PromParse ParsePromText(const std::string& text) {
  PromParse out;
  if (!text.empty() && text.back() != '\n') return out.error = "text does not end in \\n", out;
  std::string current;  // family named by the last TYPE line
  std::set<std::string> helped;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.empty()) continue;
    if (line[0] == '#') {
      const bool help = line.rfind("# HELP ", 0) == 0, type = line.rfind("# TYPE ", 0) == 0;
      if (!help && !type) continue;  // a comment
      const size_t sp = line.find(' ', 7);
      const std::string name = line.substr(7, sp == std::string::npos ? sp : sp - 7);
      if (!PromIsName(name, true)) return out.error = "bad name in: " + line, out;
      const std::string rest = sp == std::string::npos ? "" : line.substr(sp + 1);
      if (help) {
        if (!helped.insert(name).second) return out.error = "HELP twice for " + name, out;
        for (size_t k = 0; k < rest.size(); ++k) {
          if (rest[k] == '\\' &&
              (k + 1 >= rest.size() || (rest[k + 1] != '\\' && rest[k + 1] != 'n'))) {
            return out.error = "bad escape in HELP: " + line, out;
          }
          if (rest[k] == '\\') ++k;
        }
        out.families[name].help = rest;
      } else {
        if (rest != "counter" && rest != "gauge" && rest != "histogram" && rest != "summary" &&
            rest != "untyped") {
          return out.error = "bad TYPE: " + line, out;
        }
        if (!out.families[name].type.empty()) return out.error = "TYPE twice for " + name, out;
        if (!out.families[name].samples.empty()) {
          return out.error = "TYPE after samples for " + name, out;
        }
        out.families[name].type = rest;
        current = name;
      }
      continue;
    }
    PromSample s;
    if (std::string e = PromParseSample(line, &s); !e.empty()) return out.error = e, out;
    if (current.empty()) return out.error = "sample before any TYPE: " + line, out;
    const PromFamily& f = out.families[current];
    const bool hist_part =
        f.type == "histogram" && (s.name == current + "_bucket" || s.name == current + "_sum" ||
                                  s.name == current + "_count");
    if (s.name != current && !hist_part) {
      return out.error = "sample " + s.name + " outside its family block (" + current + ")", out;
    }
    if (f.type == "histogram" && s.name == current) {
      return out.error = "histogram sample without suffix: " + line, out;
    }
    if (f.type == "counter" && !(s.value >= 0)) return out.error = "negative counter: " + line, out;
    out.families[current].samples.push_back(std::move(s));
  }
  for (const auto& [name, f] : out.families) {
    if (f.type.empty()) return out.error = "HELP without TYPE for " + name, out;
    if (f.type == "histogram") {
      if (std::string e = PromCheckHistogram(name, f); !e.empty()) return out.error = e, out;
    }
  }
  return out;
}

// Sends `request` (raw bytes) to 127.0.0.1:port and returns everything the server answered
// until it closed; "" if the connection failed.
inline std::string HttpRoundTrip(int port, const std::string& request) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return "";
  }
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  std::string out;
  char buf[4096];
  while (true) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

// The body of a `GET path` answered with 200; "" (and `*status_line` says why) otherwise.
inline std::string HttpGet(int port, const std::string& path, std::string* status_line) {
  const std::string resp =
      HttpRoundTrip(port, "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n");
  *status_line = resp.substr(0, resp.find("\r\n"));
  const size_t body = resp.find("\r\n\r\n");
  if (status_line->rfind("HTTP/1.1 200", 0) != 0 || body == std::string::npos) return "";
  return resp.substr(body + 4);
}

}  // namespace phishard::testing
