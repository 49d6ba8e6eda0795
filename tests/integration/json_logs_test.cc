// `--json-output` logs of real processes (the LoRAX launcher's line format, common/logging.h):
// every line is one JSON object carrying the rank in record.extra; lines about a request carry its
// request_id and batch_id (Prefill admission, finish, FilterBatch removal), error lines carry the
// ids their RPC named, ClearCache lines the dropped batch. Startup progress (weights, Warmup) is
// there too. Under `phishard launch --num-shard 2` each rank's lines carry that rank.
#include <signal.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/client.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;
using integration::BinaryPath;
using integration::DemoModel;
using integration::DemoShard;
using integration::ShardProcess;
using integration::TempDir;
using Json = nlohmann::json;

const std::map<std::string, std::string> kCleanEnv = integration::CleanEnv();

// Every stdout line as JSON; a line that is not a JSON object fails the test.
std::vector<Json> JsonLines(const std::string& out) {
  std::vector<Json> lines;
  size_t b = 0;
  while (b < out.size()) {
    size_t e = out.find('\n', b);
    if (e == std::string::npos) e = out.size();
    const std::string line = out.substr(b, e - b);
    b = e + 1;
    if (line.empty()) continue;
    Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    const bool ok = j.is_object() && j.contains("text") && j["text"].is_string() &&
                    j.value("record", Json::object()).value("extra", Json()).is_object() &&
                    j["record"].value("level", Json::object()).contains("name");
    EXPECT_TRUE(ok) << "not a launcher JSON line: " << line;
    if (ok) lines.push_back(std::move(j));
  }
  return lines;
}

// record.extra of a line JsonLines() accepted; a missing key reads as null.
Json Extra(const Json& line) { return line["record"]["extra"]; }
Json Get(const Json& line, const std::string& key) { return Extra(line).value(key, Json()); }
bool Has(const Json& line, const std::string& text) {
  return line["text"].get<std::string>().find(text) != std::string::npos;
}
// Lines whose text contains `text` and whose extra[key] == value.
std::vector<Json> Find(const std::vector<Json>& lines, const std::string& text,
                       const std::string& key, uint64_t value) {
  std::vector<Json> found;
  for (const Json& l : lines) {
    if (Has(l, text) && Get(l, key) == value) found.push_back(l);
  }
  return found;
}

TEST(JsonLogs, EveryLineHasTheRankAndRequestLinesHaveTheirIds) {
  TempDir dir;
  DemoShard shard(dir, {"--json-output"}, kCleanEnv);
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  absl::StatusOr<std::unique_ptr<RouterSession>> session =
      RouterSession::Connect(UdsTarget(shard.uds), /*timeout_s=*/120);
  ASSERT_TRUE(session.ok()) << session.status();
  ASSERT_TRUE((*session)->ClearCache(std::nullopt).ok());
  ASSERT_TRUE((*session)->Warmup(RouterWarmupRequest(64, 128, 96)).ok());

  // Three requests stopping after 2, 5 and 3 tokens: FilterBatch drops 11, then 13; 12 ends the
  // batch (ClearCache by the router loop).
  pb::Batch batch;
  batch.set_id(42);
  const std::vector<uint64_t> ids = {11, 12, 13};
  const std::vector<uint32_t> max_new = {2, 5, 3};
  for (size_t i = 0; i < ids.size(); ++i) {
    pb::Request r = RouterRequest(ids[i], "def fibonacci(n):", {}, 64, max_new[i]);
    r.mutable_stopping_parameters()->set_ignore_eos_token(true);
    *batch.add_requests() = r;
  }
  batch.set_size(3);
  absl::StatusOr<std::vector<RequestOutcome>> outcome = RunBatchToCompletion(**session, batch);
  ASSERT_TRUE(outcome.ok()) << outcome.status();

  // Errors: an unknown batch in Decode, a bad parameter in Prefill.
  pb::DecodeRequest decode;
  decode.add_batches()->set_id(999);
  EXPECT_EQ((*session)->Decode(decode).status().code(), absl::StatusCode::kNotFound);
  pb::PrefillRequest bad;
  bad.mutable_batch()->set_id(43);
  *bad.mutable_batch()->add_requests() = RouterRequest(77, "x", {}, 64, 4);
  bad.mutable_batch()->mutable_requests(0)->mutable_parameters()->set_top_p(0);
  bad.mutable_batch()->set_size(1);
  EXPECT_EQ((*session)->Prefill(bad).status().code(), absl::StatusCode::kInvalidArgument);
  // A batch the router drops while it still has requests (a cancelled stream).
  pb::Batch drop;
  drop.set_id(44);
  *drop.add_requests() = RouterRequest(21, "import os", {}, 64, 8);
  *drop.add_requests() = RouterRequest(22, "import sys", {}, 64, 8);
  drop.set_size(2);
  pb::PrefillRequest prefill;
  *prefill.mutable_batch() = drop;
  ASSERT_TRUE((*session)->Prefill(prefill).ok());
  ASSERT_TRUE((*session)->ClearCache(44).ok());

  shard.process->Signal(SIGTERM);
  EXPECT_EQ(shard.process->Wait(), 0) << shard.process->Logs();
  const std::vector<Json> lines = JsonLines(shard.process->out());
  ASSERT_FALSE(HasFailure()) << shard.process->out();

  for (const Json& l : lines) {
    ASSERT_EQ(Get(l, "rank"), 0) << l.dump();
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(ids[i]));
    const std::vector<Json> admitted = Find(lines, "request admitted", "request_id", ids[i]);
    ASSERT_EQ(admitted.size(), 1u) << shard.process->out();
    EXPECT_EQ(Get(admitted[0], "batch_id"), 42);
    const std::vector<Json> finished =
        Find(lines, "request finished: length", "request_id", ids[i]);
    ASSERT_EQ(finished.size(), 1u) << shard.process->out();
    EXPECT_EQ(Get(finished[0], "batch_id"), 42);
    EXPECT_TRUE(Has(finished[0], std::to_string(max_new[i]) + " generated tokens"))
        << finished[0].dump();
  }
  // The finished requests left the batch through FilterBatch; the last one with the batch.
  for (uint64_t id : {uint64_t{11}, uint64_t{13}}) {
    const std::vector<Json> removed = Find(lines, "FilterBatch: request removed", "request_id", id);
    ASSERT_EQ(removed.size(), 1u) << id << "\n" << shard.process->out();
    EXPECT_EQ(Get(removed[0], "batch_id"), 42);
  }
  EXPECT_TRUE(Find(lines, "FilterBatch: request removed", "request_id", 12).empty());
  const std::vector<Json> cleared = Find(lines, "ClearCache: batch dropped", "batch_id", 44);
  ASSERT_EQ(cleared.size(), 1u) << shard.process->out();
  EXPECT_EQ(Get(cleared[0], "request_ids"), Json::array({21, 22}));

  // Error lines name what their RPC named.
  bool decode_error = false, prefill_error = false;
  for (const Json& l : lines) {
    const std::string level = l["record"]["level"]["name"].get<std::string>();
    if (Has(l, "Decode rejected") && Get(l, "batch_ids") == Json::array({999})) {
      decode_error = level == "WARNING";
    }
    if (Has(l, "Prefill rejected") && Get(l, "batch_id") == 43 &&
        Get(l, "request_ids") == Json::array({77})) {
      prefill_error = level == "WARNING";
    }
  }
  EXPECT_TRUE(decode_error) << shard.process->out();
  EXPECT_TRUE(prefill_error) << shard.process->out();

  // Startup progress: weights (the CPU backend logs layer i/N), model ready, Warmup begin/end.
  std::vector<std::string> order = {"Loading ",          "Weights loaded:", "Model ready on",
                                    "Server started at", "Warmup started:", "Warmup finished in"};
  size_t next = 0;
  for (const Json& l : lines) {
    if (next < order.size() && Has(l, order[next])) ++next;
  }
  EXPECT_EQ(next, order.size()) << "missing or out of order: "
                                << order[std::min(next, order.size() - 1)] << "\n"
                                << shard.process->out();
}

TEST(JsonLogs, EachRankOfALaunchLogsItsOwnRank) {
  TempDir dir;
  const std::string uds = dir / "s";
  ShardProcess launch(BinaryPath(),
                      {"launch", "--num-shard", "2", "--uds-path", uds, DemoModel(), "--device",
                       "cpu", "--json-output"},
                      dir.path(), kCleanEnv);
  ASSERT_TRUE(launch.WaitForSocket(uds + "-0", 120) && launch.WaitForSocket(uds + "-1", 120))
      << launch.Logs();
  absl::StatusOr<std::unique_ptr<RouterSession>> session =
      RouterSession::Connect(UdsTarget(uds), /*timeout_s=*/120);
  ASSERT_TRUE(session.ok()) << session.status();
  ASSERT_TRUE((*session)->Warmup(RouterWarmupRequest(64, 128, 96)).ok());
  pb::Batch batch;
  batch.set_id(3);
  *batch.add_requests() = RouterRequest(4, "def f(x):", {}, 64, 2);  // owned by rank 0
  *batch.add_requests() = RouterRequest(5, "import os", {}, 64, 3);  // owned by rank 1
  batch.set_size(2);
  ASSERT_TRUE(RunBatchToCompletion(**session, batch).ok());
  launch.Signal(SIGTERM);
  EXPECT_EQ(launch.Wait(), 0) << launch.Logs();

  const std::vector<Json> lines = JsonLines(launch.out());
  ASSERT_FALSE(HasFailure());
  std::set<int> ranks;
  int launcher_lines = 0;
  for (const Json& l : lines) {
    if (l["text"].get<std::string>().rfind("launch: ", 0) == 0) {
      // The launcher's own lines: it is no rank, so they carry none.
      EXPECT_TRUE(Get(l, "rank").is_null()) << l.dump();
      ++launcher_lines;
      continue;
    }
    ASSERT_TRUE(Get(l, "rank").is_number_integer()) << l.dump();
    ranks.insert(Get(l, "rank").get<int>());
    if (Has(l, "Joining the tensor-parallel group as rank 1")) {
      EXPECT_EQ(Get(l, "rank"), 1);
    }
  }
  EXPECT_EQ(ranks, (std::set<int>{0, 1}));
  EXPECT_GT(launcher_lines, 0) << launch.out();  // "launch: starting 2 shard(s) ..." at least
  // Both ranks admit both requests (every rank runs the whole batch); each request finishes on
  // the rank that owns it (id % 2).
  for (uint64_t id : {uint64_t{4}, uint64_t{5}}) {
    std::set<int> admitted_on;
    for (const Json& l : Find(lines, "request admitted", "request_id", id))
      admitted_on.insert(Get(l, "rank").get<int>());
    EXPECT_EQ(admitted_on, (std::set<int>{0, 1})) << id;
    const std::vector<Json> finished = Find(lines, "request finished", "request_id", id);
    ASSERT_EQ(finished.size(), 1u) << id << "\n" << launch.out();
    EXPECT_EQ(Get(finished[0], "rank"), static_cast<int>(id % 2));
  }
}

}  // namespace
}  // namespace phishard
