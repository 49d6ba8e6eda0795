// server/metrics.h and server/metrics_http.h: the exposition text checked by a strict parser
// (tests/server/prom_text_test_util.h), histogram bucket edges, escaping, concurrency, and the
// HTTP endpoint's answers (200/404/405/431) over a real socket.
#include "server/metrics.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "server/metrics_http.h"
#include "tests/server/prom_text_test_util.h"

namespace phishard {
namespace {

using ::phishard::testing::HttpGet;
using ::phishard::testing::HttpRoundTrip;
using ::phishard::testing::ParsePromText;
using ::phishard::testing::PromParse;

TEST(MetricsRegistry, RendersValidTextWithEscapedLabels) {
  MetricsRegistry r;
  r.SetConstLabel("rank", "3");
  r.DeclareCounter("x_requests_total", "Requests.\nSecond line with a \\ backslash");
  r.DeclareGauge("x_temp", "A gauge");
  const std::string tricky = "a\"b\\c\nd";
  r.GetCounter("x_requests_total", {{"path", tricky}}).Inc(2);
  r.GetCounter("x_requests_total", {{"path", "plain"}}).Inc();
  r.GetGauge("x_temp").Set(-1.5);
  const std::string text = r.Render();
  const PromParse p = ParsePromText(text);
  ASSERT_EQ(p.error, "") << text;
  EXPECT_EQ(p.families.at("x_requests_total").type, "counter");
  EXPECT_EQ(p.families.at("x_requests_total").help,
            "Requests.\\nSecond line with a \\\\ backslash");
  EXPECT_EQ(p.Value("x_requests_total", "x_requests_total", {{"path", tricky}, {"rank", "3"}}), 2);
  EXPECT_EQ(p.Value("x_requests_total", "x_requests_total", {{"path", "plain"}}), 1);
  EXPECT_EQ(p.Value("x_temp", "x_temp", {{"rank", "3"}}), -1.5);
  // The escaped form is what is on the wire (no raw newline inside a sample line).
  EXPECT_NE(text.find(R"(path="a\"b\\c\nd")"), std::string::npos) << text;
}

TEST(MetricsRegistry, HistogramBucketsAreCumulativeWithInclusiveUpperBounds) {
  MetricsRegistry r;
  r.DeclareHistogram("x_seconds", "latency", {1, 2, 5});
  Histogram& h = r.GetHistogram("x_seconds", {{"kind", "prefill"}});
  for (double v : {0.5, 1.0, 2.0, 100.0}) h.Observe(v);  // 1.0 falls in le="1" (inclusive)
  r.GetHistogram("x_seconds", {{"kind", "decode"}});     // empty series still renders
  const std::string text = r.Render();
  const PromParse p = ParsePromText(text);
  ASSERT_EQ(p.error, "") << text;
  const std::map<std::string, std::string> pre = {{"kind", "prefill"}};
  auto bucket = [&](const std::string& le) {
    auto l = pre;
    l["le"] = le;
    return p.Value("x_seconds", "x_seconds_bucket", l);
  };
  EXPECT_EQ(bucket("1"), 2);
  EXPECT_EQ(bucket("2"), 3);
  EXPECT_EQ(bucket("5"), 3);
  EXPECT_EQ(bucket("+Inf"), 4);
  EXPECT_EQ(p.Value("x_seconds", "x_seconds_sum", pre), 103.5);
  EXPECT_EQ(p.Value("x_seconds", "x_seconds_count", pre), 4);
  EXPECT_EQ(p.Value("x_seconds", "x_seconds_count", {{"kind", "decode"}}), 0);
}

TEST(MetricsRegistry, ValueFormatting) {
  EXPECT_EQ(FormatMetricValue(3), "3");
  EXPECT_EQ(FormatMetricValue(0.25), "0.25");
  EXPECT_EQ(FormatMetricValue(INFINITY), "+Inf");
  EXPECT_EQ(FormatMetricValue(-INFINITY), "-Inf");
  EXPECT_EQ(FormatMetricValue(NAN), "NaN");
  EXPECT_EQ(FormatMetricValue(0.0025), "0.0025");  // shortest form, as bucket `le` labels read
  EXPECT_EQ(FormatMetricValue(1e20), "1e+20");
  for (double v : {0.1, 1.0 / 3, 2.5e-7, 123456.789}) {
    EXPECT_EQ(std::stod(FormatMetricValue(v)), v);  // round-trips exactly
  }
}

TEST(MetricsRegistry, NameCharsets) {
  EXPECT_TRUE(IsValidMetricName("a:b_c9"));
  EXPECT_FALSE(IsValidMetricName("9a"));
  EXPECT_FALSE(IsValidMetricName("a-b"));
  EXPECT_FALSE(IsValidMetricName(""));
  EXPECT_TRUE(IsValidLabelName("rank"));
  EXPECT_FALSE(IsValidLabelName("__name"));
  EXPECT_FALSE(IsValidLabelName("a:b"));
}

TEST(MetricsRegistry, CountersAreExactUnderConcurrency) {
  MetricsRegistry r;
  r.DeclareCounter("x_total", "c");
  r.DeclareHistogram("x_h", "h", {1});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&r, t] {
      for (int i = 0; i < 20000; ++i) {
        r.GetCounter("x_total", {{"t", std::to_string(t % 2)}}).Inc();
        r.GetHistogram("x_h").Observe(0.5);
        if (i % 1000 == 0) r.Render();  // scrapes while updating
      }
    });
  }
  for (auto& th : threads) th.join();
  const PromParse p = ParsePromText(r.Render());
  ASSERT_EQ(p.error, "");
  EXPECT_EQ(p.Value("x_total", "x_total", {{"t", "0"}}), 40000);
  EXPECT_EQ(p.Value("x_total", "x_total", {{"t", "1"}}), 40000);
  EXPECT_EQ(p.Value("x_h", "x_h_count"), 80000);
  EXPECT_EQ(p.Value("x_h", "x_h_sum"), 40000);
}

// The parser is what the other tests lean on: it must reject broken text.
TEST(PromParser, RejectsMalformedText) {
  const char* kBad[] = {
      "x 1\n",                                     // no TYPE
      "# TYPE x counter\nx{a=\"1\" 1\n",           // unterminated braces
      "# TYPE x counter\nx{a=\"\\q\"} 1\n",        // unknown escape
      "# TYPE x counter\nx{__a=\"1\"} 1\n",        // reserved label
      "# TYPE x counter\nx{a=\"1\",a=\"2\"} 1\n",  // duplicate label
      "# TYPE x counter\nx -1\n",                  // negative counter
      "# TYPE x gauge\nx one\n",                   // bad value
      "# TYPE x gauge\ny 1\n",                     // outside its block
      "# TYPE 1x gauge\n",                         // bad name
      "# TYPE x gauge\n# TYPE x gauge\n",          // TYPE twice
      "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
      "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\n",     // no +Inf
      "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",  // != count
      "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n",           // no _sum
      "# TYPE h histogram\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\n"
      "h_sum 1\nh_count 1\n",  // le order
      "# TYPE x gauge\nx 1",   // no final newline
  };
  for (const char* text : kBad) EXPECT_NE(ParsePromText(text).error, "") << text;
  EXPECT_EQ(ParsePromText("# HELP x a \\\\ b\n# TYPE x gauge\nx{a=\"\\\"\"} +Inf\n").error, "");
}

TEST(ShardMetrics, EveryFamilyRendersAndHooksCount) {
  MetricsSetRank(5);
  MetricsSetHealth(HealthStateValue::kServing);
  MetricsRecordRpc("Prefill", 0);
  MetricsRecordRpc("Decode", 5);  // NOT_FOUND
  MetricsRecordStep("decode", 0.003, 7);
  MetricsAddPromptTokens(11);
  MetricsAddGeneratedTokens(7);
  MetricsRecordFinished("eos_token");
  MetricsSetKvBlocks(10, 90);
  const std::string text = ShardMetricsRegistry().Render();
  const PromParse p = ParsePromText(text);
  ASSERT_EQ(p.error, "") << text;
  EXPECT_EQ(p.Value("phishard_health_state", "phishard_health_state", {{"rank", "5"}}), 1);
  EXPECT_EQ(p.Value("phishard_rpcs_total", "phishard_rpcs_total", {{"method", "Prefill"}}), 1);
  EXPECT_EQ(p.Value("phishard_rpc_errors_total", "phishard_rpc_errors_total",
                    {{"method", "Decode"}, {"code", "NOT_FOUND"}}),
            1);
  EXPECT_TRUE(std::isnan(
      p.Value("phishard_rpc_errors_total", "phishard_rpc_errors_total", {{"method", "Prefill"}})));
  EXPECT_EQ(p.Value("phishard_step_seconds", "phishard_step_seconds_count", {{"kind", "decode"}}),
            1);
  EXPECT_EQ(p.Value("phishard_batch_size", "phishard_batch_size_bucket",
                    {{"kind", "decode"}, {"le", "8"}}),
            1);
  EXPECT_EQ(p.Value("phishard_batch_size", "phishard_batch_size_bucket",
                    {{"kind", "decode"}, {"le", "4"}}),
            0);
  EXPECT_EQ(p.Value("phishard_prompt_tokens_total", "phishard_prompt_tokens_total"), 11);
  EXPECT_EQ(p.Value("phishard_generated_tokens_total", "phishard_generated_tokens_total"), 7);
  EXPECT_EQ(p.Value("phishard_requests_finished_total", "phishard_requests_finished_total",
                    {{"reason", "eos_token"}}),
            1);
  EXPECT_EQ(p.Value("phishard_kv_blocks", "phishard_kv_blocks", {{"state", "free"}}), 90);
  EXPECT_EQ(GrpcCodeName(14), "UNAVAILABLE");
  EXPECT_EQ(GrpcCodeName(99), "UNKNOWN");
}

TEST(MetricsAddress, Parses) {
  auto a = ParseMetricsAddress("9400");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 9400);
  a = ParseMetricsAddress("0.0.0.0:0");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "0.0.0.0");
  a = ParseMetricsAddress("[::1]:80");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "::1");
  for (const char* bad : {"", "host:", ":80", "h:99999", "h:x", "::1:80", "[::1]80"}) {
    auto r = ParseMetricsAddress(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(std::string(r.status().message()).find("--metrics-addr"), std::string::npos);
  }
}

TEST(MetricsHttp, ServesMetricsAnd404And405) {
  int renders = 0;
  auto server = MetricsHttpServer::Start("127.0.0.1:0", [&renders] {
    ++renders;
    return std::string("# TYPE x gauge\nx 1\n");
  });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  ASSERT_GT(port, 0);
  std::string status;
  EXPECT_EQ(HttpGet(port, "/metrics", &status), "# TYPE x gauge\nx 1\n");
  EXPECT_EQ(status, "HTTP/1.1 200 OK");
  EXPECT_EQ(HttpGet(port, "/metrics?x=1", &status), "# TYPE x gauge\nx 1\n");
  EXPECT_EQ(HttpGet(port, "/", &status), "");
  EXPECT_EQ(status, "HTTP/1.1 404 Not Found");
  EXPECT_EQ(renders, 2);
  std::string resp = HttpRoundTrip(port, "POST /metrics HTTP/1.1\r\n\r\n");
  EXPECT_EQ(resp.rfind("HTTP/1.1 405", 0), 0u) << resp;
  resp = HttpRoundTrip(port, "garbage\r\n\r\n");
  EXPECT_EQ(resp.rfind("HTTP/1.1 400", 0), 0u) << resp;
  resp = HttpRoundTrip(port, "GET /metrics HTTP/1.1\r\nX: " + std::string(20000, 'a'));
  EXPECT_EQ(resp.rfind("HTTP/1.1 431", 0), 0u) << resp.substr(0, 80);
  resp = HttpRoundTrip(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_EQ(resp.rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_EQ(resp.substr(resp.find("\r\n\r\n") + 4), "");  // HEAD: headers only
  // Still serving after all that.
  EXPECT_EQ(HttpGet(port, "/metrics", &status), "# TYPE x gauge\nx 1\n");
}

// Connects to 127.0.0.1:port and sends `partial` (no end of headers): a slowloris client.
int OpenPartial(int port, const std::string& partial) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  EXPECT_EQ(::send(fd, partial.data(), partial.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(partial.size()));
  return fd;
}

// Silent and trickling connections (a byte every 300 ms, which a per-read timeout would never
// end) hold no scrape up: the server polls them all and drops each 2 s after its accept. Was: one
// connection at a time, 2 s per read, so 20 idle connections delayed a scrape by 36 s.
TEST(MetricsHttp, IdleAndTricklingClientsDoNotDelayAScrape) {
  auto server = MetricsHttpServer::Start("127.0.0.1:0", [] { return std::string("x 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  std::vector<int> idle;
  for (int i = 0; i < 20; ++i) idle.push_back(OpenPartial(port, "GET /met"));
  const int trickle = OpenPartial(port, "G");
  std::atomic<bool> stop{false};
  std::thread trickler([&] {
    for (int i = 0; i < 15 && !stop; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      if (::send(trickle, "E", 1, MSG_NOSIGNAL) != 1) break;  // dropped by the server
    }
  });
  const auto t0 = std::chrono::steady_clock::now();
  std::string status;
  EXPECT_EQ(HttpGet(port, "/metrics", &status), "x 1\n");
  // Generous for a loaded CI machine, far below the 20 x 2 s a serial server would take.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1)) << status;
  // Each stalled connection is closed by the server soon after its 2 s (recv sees EOF or reset).
  for (int fd : idle) {
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    char c;
    EXPECT_LE(::recv(fd, &c, 1, 0), 0);
    ::close(fd);
  }
  stop = true;
  trickler.join();
  timeval tv{5, 0};
  ::setsockopt(trickle, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  char c;
  EXPECT_LE(::recv(trickle, &c, 1, 0), 0);  // dropped at its deadline, not served late
  ::close(trickle);
  EXPECT_EQ(HttpGet(port, "/metrics", &status), "x 1\n");
}

TEST(MetricsHttp, PortInUseIsAnErrorNamingTheFlag) {
  auto first = MetricsHttpServer::Start("127.0.0.1:0", [] { return std::string(); });
  ASSERT_TRUE(first.ok());
  auto second = MetricsHttpServer::Start("127.0.0.1:" + std::to_string((*first)->port()),
                                         [] { return std::string(); });
  ASSERT_FALSE(second.ok());
  EXPECT_NE(std::string(second.status().message()).find("--metrics-addr"), std::string::npos);
}

}  // namespace
}  // namespace phishard
