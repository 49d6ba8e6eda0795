// Malformed requests against the real server process: each one gets its documented status and
// message, the shard stays up, and a normal request right after it succeeds. The last check
// fills the whole KV pool, which only works if no failed request leaked a block.
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/client.h"
#include "tests/integration/raw_grpc.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;
using integration::DemoShard;
using integration::RawUnary;
using integration::TempDir;

// The requests here carry no router `blocks`: after Warmup they get the --unrouted-kv-blocks
// tail of the pool only (3200 token slots), beside the router's part that Warmup reports.
constexpr int kPoolBlocks = 200;
constexpr int kRouterBlocks = 10;

// The refusal of a hub adapter: the CPU shard names the missing download; a CUDA shard without
// adapter support refuses every adapter first ("adapter 'org/lora': the cuda backend does not
// apply LoRA adapters"), one with it refuses the download: both name the adapter.
std::string RealAdapterRefusal() {
  return integration::TestOnCuda() ? "adapter 'org/lora'" : "phishard does not download adapters";
}

struct BadCase {
  std::string name;
  std::function<grpc::Status()> call;
  grpc::StatusCode code;
  std::string message_contains;
};

class BadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    shard_ = std::make_unique<DemoShard>(
        dir_,
        std::vector<std::string>{"--max-kv-blocks", std::to_string(kRouterBlocks + kPoolBlocks),
                                 "--unrouted-kv-blocks", std::to_string(kPoolBlocks)},
        std::map<std::string, std::string>{{"WORLD_SIZE", ""}, {"RANK", ""}});
    ASSERT_TRUE(shard_->ready) << shard_->process->Logs();
    channel_ = grpc::CreateChannel("unix:" + shard_->socket, grpc::InsecureChannelCredentials());
    stub_ = pb::LoraxService::NewStub(channel_);
    client_ = ShardClient::Connect("unix:" + shard_->socket, 60);
    absl::StatusOr<pb::WarmupResponse> w = client_->Warmup(RouterWarmupRequest(64, 100, 65));
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_EQ(w->max_supported_total_tokens(), kRouterBlocks * 16u);
  }
  void TearDown() override {
    shard_->process->Signal(SIGTERM);
    EXPECT_EQ(shard_->process->Wait(30), 0) << shard_->process->Logs();
  }

  static pb::Request Good(uint64_t id, uint32_t max_new = 1) {
    return RouterRequest(id, "import os\n", {831, 1723, 199}, 100, max_new);
  }
  static pb::PrefillRequest One(pb::Request r, uint64_t batch_id = 7) {
    pb::PrefillRequest p;
    p.mutable_batch()->set_id(batch_id);
    *p.mutable_batch()->add_requests() = std::move(r);
    p.mutable_batch()->set_size(1);
    return p;
  }
  template <class Req, class Resp>
  grpc::Status Call(grpc::Status (pb::LoraxService::Stub::*method)(grpc::ClientContext*, const Req&,
                                                                   Resp*),
                    const Req& req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    Resp resp;
    return (stub_.get()->*method)(&ctx, req, &resp);
  }
  grpc::Status Prefill(const pb::PrefillRequest& r) {
    return Call(&pb::LoraxService::Stub::Prefill, r);
  }
  grpc::Status PrefillWith(std::function<void(pb::Request*)> edit) {
    pb::Request r = Good(1);
    edit(&r);
    return Prefill(One(r));
  }
  // Prefill bytes with `raw` (12 bytes) spliced in place of a 12-byte placeholder field value.
  std::string SplicedPrefill(std::function<void(pb::Request*)> put_placeholder,
                             const std::string& raw) {
    pb::Request r = Good(1);
    put_placeholder(&r);
    std::string wire = One(r).SerializeAsString();
    const size_t at = wire.find("PLACEHOLDER!");
    EXPECT_NE(at, std::string::npos);
    EXPECT_EQ(raw.size(), 12u);
    wire.replace(at, raw.size(), raw);
    return wire;
  }

  TempDir dir_;
  std::unique_ptr<DemoShard> shard_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::LoraxService::Stub> stub_;
  std::unique_ptr<ShardClient> client_;
};

TEST_F(BadInput, EveryMalformedRequestGetsItsStatusAndTheShardKeepsServing) {
  using C = grpc::StatusCode;
  const float nan = std::nanf("");
  const float inf = std::numeric_limits<float>::infinity();
  const std::string bad_utf8(
      "ab\xC3\x28"
      "cdefghij",
      12);  // 0xC3 followed by a non-continuation

  std::vector<BadCase> cases = {
      {"decode unknown batch",
       [&] {
         pb::DecodeRequest d;
         d.add_batches()->set_id(42);
         return Call(&pb::LoraxService::Stub::Decode, d);
       },
       C::NOT_FOUND, "Batch ID 42 not found in cache."},
      {"decode no batches",
       [&] { return Call(&pb::LoraxService::Stub::Decode, pb::DecodeRequest()); },
       C::INVALID_ARGUMENT, "Must provide at least one batch"},
      {"filter unknown batch",
       [&] {
         pb::FilterBatchRequest f;
         f.set_batch_id(43);
         f.add_request_ids(1);
         return Call(&pb::LoraxService::Stub::FilterBatch, f);
       },
       C::NOT_FOUND, "Batch ID 43 not found in cache."},
      {"prefill without batch", [&] { return Prefill(pb::PrefillRequest()); }, C::INVALID_ARGUMENT,
       "batch is required"},
      {"warmup without batch",
       [&] { return Call(&pb::LoraxService::Stub::Warmup, pb::WarmupRequest()); },
       C::INVALID_ARGUMENT, "batch is required"},
      {"prefill with no requests",
       [&] {
         pb::PrefillRequest p;
         p.mutable_batch()->set_id(9);
         return Prefill(p);
       },
       C::INVALID_ARGUMENT, "batch.requests is empty"},
      {"duplicate request ids",
       [&] {
         pb::PrefillRequest p = One(Good(5));
         *p.mutable_batch()->add_requests() = Good(5);
         return Prefill(p);
       },
       C::INVALID_ARGUMENT, "appears twice"},
      {"token id >= vocab",
       [&] {
         return PrefillWith(
             [](pb::Request* r) { r->mutable_tokenized_inputs()->set_ids(1, 4095); });
       },
       C::INVALID_ARGUMENT, "tokenized_inputs.ids[1]"},
      {"token id above int32",
       [&] {
         return PrefillWith(
             [](pb::Request* r) { r->mutable_tokenized_inputs()->set_ids(2, 3000000000u); });
       },
       C::INVALID_ARGUMENT, "tokenized_inputs.ids[2]"},
      {"temperature NaN",
       [&] {
         return PrefillWith([&](pb::Request* r) { r->mutable_parameters()->set_temperature(nan); });
       },
       C::INVALID_ARGUMENT, "parameters.temperature"},
      {"temperature negative",
       [&] {
         return PrefillWith([](pb::Request* r) { r->mutable_parameters()->set_temperature(-1); });
       },
       C::INVALID_ARGUMENT, "parameters.temperature"},
      {"top_p zero",
       [&] { return PrefillWith([](pb::Request* r) { r->mutable_parameters()->set_top_p(0); }); },
       C::INVALID_ARGUMENT, "parameters.top_p"},
      {"top_p above one",
       [&] {
         return PrefillWith([](pb::Request* r) { r->mutable_parameters()->set_top_p(1.5f); });
       },
       C::INVALID_ARGUMENT, "parameters.top_p"},
      {"typical_p above one",
       [&] {
         return PrefillWith([](pb::Request* r) { r->mutable_parameters()->set_typical_p(2); });
       },
       C::INVALID_ARGUMENT, "parameters.typical_p"},
      {"repetition_penalty zero",
       [&] {
         return PrefillWith(
             [](pb::Request* r) { r->mutable_parameters()->set_repetition_penalty(0); });
       },
       C::INVALID_ARGUMENT, "parameters.repetition_penalty"},
      {"frequency_penalty infinite",
       [&] {
         return PrefillWith(
             [&](pb::Request* r) { r->mutable_parameters()->set_frequency_penalty(inf); });
       },
       C::INVALID_ARGUMENT, "parameters.frequency_penalty"},
      {"presence_penalty NaN",
       [&] {
         return PrefillWith(
             [&](pb::Request* r) { r->mutable_parameters()->set_presence_penalty(nan); });
       },
       C::INVALID_ARGUMENT, "parameters.presence_penalty"},
      {"schema (unsupported)",
       [&] {
         return PrefillWith([](pb::Request* r) { r->mutable_parameters()->set_schema("{}"); });
       },
       C::INVALID_ARGUMENT, "parameters.schema"},
      {"max_new_tokens zero",
       [&] {
         return PrefillWith(
             [](pb::Request* r) { r->mutable_stopping_parameters()->set_max_new_tokens(0); });
       },
       C::INVALID_ARGUMENT, "stopping_parameters.max_new_tokens"},
      {"prompt + max_new_tokens beyond max positions",
       [&] {
         return PrefillWith(
             [](pb::Request* r) { r->mutable_stopping_parameters()->set_max_new_tokens(5000); });
       },
       C::INVALID_ARGUMENT, "max_position_embeddings"},
      {"cache_len (prefix caching)",
       [&] { return PrefillWith([](pb::Request* r) { r->set_cache_len(2); }); },
       C::INVALID_ARGUMENT, "cache_len"},
      {"chunk_len shorter than the prompt",
       [&] { return PrefillWith([](pb::Request* r) { r->set_chunk_len(1); }); },
       C::INVALID_ARGUMENT, "chunk_len"},
      {"empty prompt",
       [&] {
         return PrefillWith([](pb::Request* r) {
           r->clear_tokenized_inputs();
           r->set_inputs("");
         });
       },
       C::INVALID_ARGUMENT, "inputs"},
      {"invalid UTF-8 in inputs",
       [&] {
         return RawUnary(
             channel_, "/generate.v1.LoraxService/Prefill",
             SplicedPrefill([](pb::Request* r) { r->set_inputs("PLACEHOLDER!"); }, bad_utf8));
       },
       C::INVALID_ARGUMENT, "batch.requests[0].inputs is not valid UTF-8"},
      {"invalid UTF-8 in a stop sequence",
       [&] {
         return RawUnary(channel_, "/generate.v1.LoraxService/Prefill",
                         SplicedPrefill(
                             [](pb::Request* r) {
                               r->mutable_stopping_parameters()->add_stop_sequences("PLACEHOLDER!");
                             },
                             bad_utf8));
       },
       C::INVALID_ARGUMENT, "stopping_parameters.stop_sequences[0] is not valid UTF-8"},
      {"garbage bytes",
       [&] {
         return RawUnary(channel_, "/generate.v1.LoraxService/Prefill",
                         std::string("\x0a\xff\xff\xff\xff\x0f\x01\x02", 8));
       },
       C::INVALID_ARGUMENT, "not a valid generate.v1.PrefillRequest"},
      {"garbage Health request",
       [&] {
         return RawUnary(channel_, "/generate.v1.LoraxService/Health", std::string("\xff", 1));
       },
       C::INVALID_ARGUMENT, "HealthRequest"},
      {"unknown method", [&] { return RawUnary(channel_, "/generate.v1.LoraxService/Nope", ""); },
       C::UNIMPLEMENTED, ""},
      {"Embed", [&] { return Call(&pb::LoraxService::Stub::Embed, pb::EmbedRequest()); },
       C::INTERNAL, "Model does not support embeddings"},
      {"Classify", [&] { return Call(&pb::LoraxService::Stub::Classify, pb::ClassifyRequest()); },
       C::INTERNAL, "Model does not support classification"},
      {"download a real adapter",
       [&] {
         pb::DownloadAdapterRequest d;
         d.mutable_adapter_parameters()->add_adapter_ids("org/lora");
         return Call(&pb::LoraxService::Stub::DownloadAdapter, d);
       },
       C::FAILED_PRECONDITION, RealAdapterRefusal()},
      {"load a real adapter",
       [&] {
         pb::LoadAdapterRequest l;
         l.mutable_adapter_parameters()->add_adapter_ids("org/lora");
         l.set_adapter_index(3);
         return Call(&pb::LoraxService::Stub::LoadAdapter, l);
       },
       C::FAILED_PRECONDITION, RealAdapterRefusal()},
      {"adapter request without ids",
       [&] { return Call(&pb::LoraxService::Stub::DownloadAdapter, pb::DownloadAdapterRequest()); },
       C::INVALID_ARGUMENT, "adapter_parameters.adapter_ids is empty"},
      {"more KV than the pool holds",
       [&] {
         pb::PrefillRequest p;
         p.mutable_batch()->set_id(11);
         for (int i = 0; i < 5; ++i) {  // 5 x 800 tokens > 3200 slots
           std::vector<uint32_t> ids(700, 300 + i);
           *p.mutable_batch()->add_requests() = RouterRequest(100 + i, "x", ids, 1000, 101);
         }
         return Prefill(p);
       },
       C::RESOURCE_EXHAUSTED, "KV cache exhausted"},
      // Against the live batch 21: each failure must leave it exactly as it was.
      {"filter to no request",
       [&] {
         pb::FilterBatchRequest f;
         f.set_batch_id(21);
         return Call(&pb::LoraxService::Stub::FilterBatch, f);
       },
       C::INVALID_ARGUMENT, "Batch must have at least one request"},
      {"filter to a request not in the batch",
       [&] {
         pb::FilterBatchRequest f;
         f.set_batch_id(21);
         f.add_request_ids(999);
         return Call(&pb::LoraxService::Stub::FilterBatch, f);
       },
       C::NOT_FOUND, "999"},
      {"filter listing a request twice",
       [&] {
         pb::FilterBatchRequest f;
         f.set_batch_id(21);
         f.add_request_ids(500);
         f.add_request_ids(500);
         return Call(&pb::LoraxService::Stub::FilterBatch, f);
       },
       C::INVALID_ARGUMENT, "listed twice"},
      {"decode the same batch twice",
       [&] {
         pb::DecodeRequest d;
         d.add_batches()->set_id(21);
         d.add_batches()->set_id(21);
         return Call(&pb::LoraxService::Stub::Decode, d);
       },
       C::INVALID_ARGUMENT, "more than once"},
      {"decode a live and an unknown batch",
       [&] {
         pb::DecodeRequest d;
         d.add_batches()->set_id(21);
         d.add_batches()->set_id(44);
         return Call(&pb::LoraxService::Stub::Decode, d);
       },
       C::NOT_FOUND, "Batch ID 44 not found in cache."},
      {"prefill reusing a cached batch id", [&] { return Prefill(One(Good(501, 1), 21)); },
       C::INVALID_ARGUMENT, "already in the cache"},
  };
  ASSERT_GE(cases.size(), 30u);

  // A running batch (id 21, request 500) that stays cached through every case below.
  absl::StatusOr<pb::PrefillResponse> live = client_->Prefill(One(Good(500, 50), 21));
  ASSERT_TRUE(live.ok()) << live.status();
  ASSERT_TRUE(live->has_batch());

  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.name);
    const grpc::Status st = c.call();
    EXPECT_EQ(st.error_code(), c.code) << st.error_message();
    EXPECT_NE(st.error_message().find(c.message_contains), std::string::npos) << st.error_message();
    // The shard is still up and serves a normal request.
    pb::PrefillResponse ok;
    grpc::ClientContext ctx;
    const grpc::Status good = stub_->Prefill(&ctx, One(Good(99, 1)), &ok);
    ASSERT_TRUE(good.ok()) << good.error_message() << shard_->process->Logs();
    ASSERT_EQ(ok.generations_size(), 1);
    EXPECT_FALSE(ok.has_batch());
    ASSERT_TRUE(shard_->process->running()) << shard_->process->Logs();
  }

  // Batch 21 survived every failure intact: it still decodes, with all its requests.
  pb::DecodeRequest d21;
  d21.add_batches()->set_id(21);
  absl::StatusOr<pb::DecodeResponse> after = client_->Decode(d21);
  ASSERT_TRUE(after.ok()) << after.status();
  ASSERT_EQ(after->generations_size(), 1);
  EXPECT_EQ(after->generations(0).request_id(), 500u);
  EXPECT_EQ(after->batch().request_ids_size(), 1);
  ASSERT_TRUE(client_->ClearCache(uint64_t{21}).ok());

  // Things that must NOT be errors (the router would abort on them).
  EXPECT_TRUE(client_->ClearCache(uint64_t{4242}).ok());
  pb::DownloadAdapterRequest base;
  base.mutable_adapter_parameters()->add_adapter_ids("__base_model__");
  pb::DownloadAdapterResponse dl;
  grpc::ClientContext dctx;
  ASSERT_TRUE(stub_->DownloadAdapter(&dctx, base, &dl).ok());
  EXPECT_FALSE(dl.downloaded());
  EXPECT_EQ(dl.memory_fraction(), 0.0f);
  pb::OffloadAdapterRequest off;
  off.mutable_adapter_parameters()->add_adapter_ids("org/lora");
  off.set_adapter_index(3);
  pb::OffloadAdapterResponse offr;
  grpc::ClientContext octx;
  ASSERT_TRUE(stub_->OffloadAdapter(&octx, off, &offr).ok());
  EXPECT_FALSE(offr.offloaded());

  // No failed request leaked KV blocks: exactly the whole tail can still be taken at once
  // (4 requests x (700 prompt + 101 new - 1) tokens = 4 x 50 blocks = 200).
  pb::PrefillRequest full;
  full.mutable_batch()->set_id(12);
  for (int i = 0; i < 4; ++i) {
    *full.mutable_batch()->add_requests() =
        RouterRequest(200 + i, "x", std::vector<uint32_t>(700, 400 + i), 1000, 101);
  }
  absl::StatusOr<pb::PrefillResponse> r = client_->Prefill(full);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->batch().max_tokens(), kPoolBlocks * 16u);
  pb::PrefillRequest one_more = One(Good(300, 2), 13);
  EXPECT_EQ(client_->Prefill(one_more).status().code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace phishard
