// common/logging: structured fields (PHI_LOG_WITH) in the plain and the launcher's JSON form; the
// rank is on every line. Compared with hand-written expected lines (the timestamp aside).
#include <string>

#include "common/logging.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace phishard {
namespace {

std::string LogOnce(bool json, int rank = 3) {
  SetLogJson(json);
  SetLogRank(rank);
  ::testing::internal::CaptureStdout();
  PHI_LOG_WITH(INFO,
               LogFields().Add("batch_id", 42).AddList("request_ids", {7, 18446744073709551615ull}))
      << "hello";
  PHI_LOG(INFO) << "plain";
  std::string out = ::testing::internal::GetCapturedStdout();
  SetLogJson(false);
  SetLogRank(0);
  return out;
}

TEST(LogFields, PlainLinesPutTheFieldsAfterTheRank) {
  const std::string out = LogOnce(false);
  const size_t nl = out.find('\n');
  ASSERT_NE(nl, std::string::npos) << out;
  const std::string first = out.substr(0, nl), second = out.substr(nl + 1);
  // "2026-11-28T15:32:05.123Z INFO rank=3 batch_id=42 request_ids=7,18446744073709551615 hello"
  EXPECT_EQ(first.substr(first.find(' ')),
            " INFO rank=3 batch_id=42 request_ids=7,18446744073709551615 hello");
  EXPECT_EQ(second.substr(second.find(' ')), " INFO rank=3 plain\n");
}

TEST(LogFields, JsonLinesPutTheFieldsInRecordExtra) {
  const std::string out = LogOnce(true);
  const size_t nl = out.find('\n');
  ASSERT_NE(nl, std::string::npos) << out;
  const nlohmann::json a = nlohmann::json::parse(out.substr(0, nl));
  const nlohmann::json b = nlohmann::json::parse(out.substr(nl + 1));
  EXPECT_EQ(a["text"], "hello");
  EXPECT_EQ(a["record"]["level"]["name"], "INFO");
  EXPECT_EQ(a["record"]["extra"], nlohmann::json::parse(
                                      R"({"rank": 3, "batch_id": 42,
                                          "request_ids": [7, 18446744073709551615]})"));
  EXPECT_EQ(b["text"], "plain");
  EXPECT_EQ(b["record"]["extra"], nlohmann::json::parse(R"({"rank": 3})"));
}

// The launcher is no rank: its lines carry none (they said rank=0 before).
TEST(LogFields, LinesWithoutARankOmitIt) {
  const std::string plain = LogOnce(false, kNoLogRank);
  const size_t nl = plain.find('\n');
  ASSERT_NE(nl, std::string::npos) << plain;
  EXPECT_EQ(plain.substr(plain.find(' '), nl - plain.find(' ')),
            " INFO batch_id=42 request_ids=7,18446744073709551615 hello");
  const std::string json = LogOnce(true, kNoLogRank);
  const nlohmann::json a = nlohmann::json::parse(json.substr(0, json.find('\n')));
  EXPECT_EQ(a["record"]["extra"],
            nlohmann::json::parse(R"({"batch_id": 42, "request_ids": [7, 18446744073709551615]})"));
}

}  // namespace
}  // namespace phishard
