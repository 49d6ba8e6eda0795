// `phishard client info|health|warmup|generate`: drives a running shard like the LoRAX router.
#include <chrono>
#include <iostream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/util/json_util.h"
#include "nlohmann/json.hpp"
#include "server/batch_types.h"
#include "server/cli.h"
#include "server/client.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;

// The batch id of a generate sent without the router's startup (see RunClient's generate).
constexpr uint64_t kClientBatchId = (uint64_t{1} << 63) + 0x5c11e47;

// A shard (any rank) refusing a Prefill because nobody has warmed it up.
bool IsNotWarmedUp(const absl::Status& s) {
  return absl::IsFailedPrecondition(s) && absl::StrContains(s.message(), kNotWarmedUpMessage);
}

int Fail(const std::string& what, const absl::Status& s) {
  std::cerr << "phishard client " << what << ": " << s << std::endl;
  return 1;
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions opts;
  opts.always_print_primitive_fields = true;
  opts.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
  return out;
}

// The router's startup (spec §3.1): ClearCache(None) -> Info -> Warmup; returns the token budget.
absl::StatusOr<uint32_t> RouterStartup(RouterSession& session, const ClientOptions& o,
                                       bool verbose) {
  if (absl::Status s = session.ClearCache(std::nullopt); !s.ok()) return s;
  absl::StatusOr<pb::InfoResponse> info = session.Info();
  if (!info.ok()) return info.status();
  const uint32_t prefill = o.max_prefill_tokens ? o.max_prefill_tokens : o.max_input_length + 50;
  const uint32_t total = o.max_total_tokens ? o.max_total_tokens : o.max_input_length + 1;
  if (total <= o.max_input_length) {
    return absl::InvalidArgumentError("--max-total-tokens must exceed --max-input-length");
  }
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::optional<uint32_t>> warm =
      session.Warmup(RouterWarmupRequest(o.max_input_length, prefill, total));
  if (!warm.ok()) return warm.status();
  if (!warm->has_value()) {
    return absl::InternalError("Warmup left max_supported_total_tokens unset");
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // The router's own argument checks after warmup (spec §3.1 step 5).
  if (prefill > **warm || total > **warm) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "shard supports %d total tokens, below the router's max_batch_prefill_tokens %d or "
        "max_total_tokens %d",
        **warm, prefill, total));
  }
  if (verbose) {
    std::cerr << absl::StrFormat("warmup: %.2f s, max_supported_total_tokens = %d (%s on %s)\n", s,
                                 **warm, info->dtype(), info->device_type());
  }
  return **warm;
}

}  // namespace

int RunClient(const ClientOptions& o) {
  const std::string target = o.addr.empty() ? UdsTarget(o.uds_path) : o.addr;
  absl::StatusOr<std::unique_ptr<RouterSession>> session =
      RouterSession::Connect(target, o.timeout_s);
  if (!session.ok()) return Fail(o.command, session.status());
  RouterSession& rs = **session;

  if (o.command == "info") {
    absl::StatusOr<pb::InfoResponse> info = rs.Info();
    if (!info.ok()) return Fail("info", info.status());
    std::cout << ToJson(*info) << std::endl;
    return 0;
  }
  if (o.command == "health") {
    if (absl::Status s = rs.Health(); !s.ok()) return Fail("health", s);
    std::cout << (o.json ? "{\"status\": \"SERVING\"}" : "SERVING") << std::endl;
    return 0;
  }
  if (o.command == "warmup") {
    absl::StatusOr<uint32_t> tokens = RouterStartup(rs, o, /*verbose=*/!o.json);
    if (!tokens.ok()) return Fail("warmup", tokens.status());
    std::cout << "{\"max_supported_total_tokens\": " << *tokens << "}" << std::endl;
    return 0;
  }

  // generate
  if (o.prompt.empty()) return Fail("generate", absl::InvalidArgumentError("--prompt is required"));
  if (o.startup == 1) {
    absl::StatusOr<uint32_t> tokens = RouterStartup(rs, o, /*verbose=*/!o.json);
    if (!tokens.ok()) return Fail("generate (startup)", tokens.status());
  }
  pb::Batch batch;
  // After our own startup the shard holds no batch and batch 0 is what the router would send
  // first; on a shard warmed up before (perhaps one a router drives), an id far above the
  // router's counter, which starts at 0 (u64::MAX is its health probe's).
  batch.set_id(o.startup == 1 ? 0 : kClientBatchId);
  *batch.add_requests() =
      RouterRequest(/*id=*/0, o.prompt, /*ids=*/{}, o.max_input_length, o.max_new_tokens);
  batch.set_size(1);
  const auto t0 = std::chrono::steady_clock::now();
  double first_token_s = 0;
  GenerationCallback stream = [&](const pb::Generation& g) {
    if (first_token_s == 0) {
      first_token_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    if (o.json) return;
    for (int k = 0; k < g.next_tokens().texts_size(); ++k) {
      if (!g.next_tokens().is_special(k)) std::cout << g.next_tokens().texts(k);
    }
    std::cout.flush();
  };
  absl::StatusOr<std::vector<RequestOutcome>> out = RunBatchToCompletion(rs, batch, stream);
  if (!out.ok() && o.startup == -1 && IsNotWarmedUp(out.status())) {
    // A shard nobody has warmed up yet (no router): the startup, then the same request.
    absl::StatusOr<uint32_t> tokens = RouterStartup(rs, o, /*verbose=*/!o.json);
    if (!tokens.ok()) return Fail("generate (startup)", tokens.status());
    batch.set_id(0);
    out = RunBatchToCompletion(rs, batch, stream);
  }
  if (!out.ok()) return Fail("generate", out.status());
  const double total_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const RequestOutcome& r = out->front();
  const pb::GeneratedText& gt = *r.generated_text;
  if (o.json) {
    nlohmann::json j;
    j["ids"] = r.ids;
    j["text"] = gt.text();
    j["logprobs"] = r.logprobs;
    j["finish_reason"] = pb::FinishReason_Name(gt.finish_reason());
    j["prompt_tokens"] = r.prefill_tokens_length;
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << std::endl;
  }
  std::cerr << absl::StrFormat(
      "%d prompt tokens, %d generated (%s): first token %.1f ms, %.1f tokens/s after it\n",
      r.prefill_tokens_length, gt.generated_tokens(), pb::FinishReason_Name(gt.finish_reason()),
      first_token_s * 1e3,
      r.ids.size() > 1 ? (r.ids.size() - 1) / std::max(total_s - first_token_s, 1e-9) : 0.0);
  return 0;
}

}  // namespace phishard
