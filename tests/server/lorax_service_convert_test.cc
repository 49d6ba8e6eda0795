// proto <-> plain struct conversion, absl -> gRPC status mapping, and the parse-failure
// explanation (which field holds invalid UTF-8).
#include <cmath>
#include <limits>
#include <string>

#include "gtest/gtest.h"
#include "proto/generate.pb.h"
#include "server/proto_convert.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;

pb::Request FullRequest() {
  pb::Request r;
  r.set_id(77);
  r.set_inputs("def f(x):");
  r.mutable_tokenized_inputs()->add_ids(5);
  r.mutable_tokenized_inputs()->add_ids(4094);
  r.set_truncate(12);
  pb::NextTokenChooserParameters* p = r.mutable_parameters();
  p->set_temperature(0.7f);
  p->set_top_k(40);
  p->set_top_p(0.95f);
  p->set_typical_p(0.5f);
  p->set_do_sample(true);
  p->set_seed(123456789012345ULL);
  p->set_repetition_penalty(1.3f);
  p->set_frequency_penalty(0.25f);
  p->set_presence_penalty(-0.5f);
  p->set_watermark(true);
  p->set_adapter_id("my/adapter");
  p->set_schema("{}");
  p->set_return_k_alternatives(3);
  pb::StoppingCriteriaParameters* s = r.mutable_stopping_parameters();
  s->set_max_new_tokens(9);
  s->add_stop_sequences("\n\n");
  s->add_stop_sequences("END");
  s->set_ignore_eos_token(true);
  r.set_prefill_logprobs(true);
  r.set_adapter_index(3);
  r.add_blocks(7);
  r.add_slots(112);
  r.set_cache_len(2);
  r.set_chunk_len(4);
  return r;
}

TEST(BatchFromProto, CopiesEveryField) {
  pb::Batch b;
  b.set_id(42);
  b.set_size(1);
  b.set_max_tokens(100);
  b.set_max_blocks(8);
  *b.add_requests() = FullRequest();
  absl::StatusOr<BatchInput> in = BatchFromProto(b);
  ASSERT_TRUE(in.ok()) << in.status();
  EXPECT_EQ(in->id, 42u);
  EXPECT_EQ(in->size, 1u);
  EXPECT_EQ(in->max_tokens, 100u);
  EXPECT_EQ(in->max_blocks, 8u);
  ASSERT_EQ(in->requests.size(), 1u);
  const RequestInput& r = in->requests[0];
  EXPECT_EQ(r.id, 77u);
  EXPECT_EQ(r.inputs, "def f(x):");
  EXPECT_EQ(r.token_ids, (std::vector<int32_t>{5, 4094}));
  EXPECT_EQ(r.truncate, 12u);
  EXPECT_FLOAT_EQ(r.parameters.temperature, 0.7f);
  EXPECT_EQ(r.parameters.top_k, 40u);
  EXPECT_FLOAT_EQ(r.parameters.top_p, 0.95f);
  EXPECT_FLOAT_EQ(r.parameters.typical_p, 0.5f);
  EXPECT_TRUE(r.parameters.do_sample);
  EXPECT_EQ(r.parameters.seed, 123456789012345ULL);
  EXPECT_FLOAT_EQ(r.parameters.repetition_penalty, 1.3f);
  EXPECT_FLOAT_EQ(r.parameters.frequency_penalty, 0.25f);
  EXPECT_FLOAT_EQ(r.parameters.presence_penalty, -0.5f);
  EXPECT_TRUE(r.parameters.watermark);
  EXPECT_EQ(r.parameters.adapter_id, "my/adapter");
  ASSERT_TRUE(r.parameters.schema.has_value());
  EXPECT_EQ(*r.parameters.schema, "{}");
  EXPECT_EQ(r.parameters.return_k_alternatives, 3u);
  EXPECT_EQ(r.stopping.max_new_tokens, 9u);
  EXPECT_EQ(r.stopping.stop_sequences, (std::vector<std::string>{"\n\n", "END"}));
  EXPECT_TRUE(r.stopping.ignore_eos_token);
  EXPECT_TRUE(r.prefill_logprobs);
  EXPECT_EQ(r.adapter_index, 3u);
  EXPECT_EQ(r.blocks, (std::vector<uint32_t>{7}));
  EXPECT_EQ(r.slots, (std::vector<int64_t>{112}));
  EXPECT_EQ(r.cache_len, 2u);
  ASSERT_TRUE(r.chunk_len.has_value());
  EXPECT_EQ(*r.chunk_len, 4u);
}

TEST(BatchFromProto, PresenceDecidesOptionalFields) {
  pb::Batch b;
  pb::Request* r = b.add_requests();
  r->set_inputs("x");
  r->mutable_parameters()->set_temperature(0.5f);  // present, schema and others unset
  absl::StatusOr<BatchInput> in = BatchFromProto(b);
  ASSERT_TRUE(in.ok()) << in.status();
  EXPECT_FALSE(in->requests[0].parameters.schema.has_value());
  EXPECT_FALSE(in->requests[0].chunk_len.has_value());
  // Present message: proto3 zeros are taken as sent (validation rejects top_p = 0 later).
  EXPECT_FLOAT_EQ(in->requests[0].parameters.top_p, 0.0f);
}

TEST(BatchFromProto, AbsentParameterMessagesMeanNeutralDefaults) {
  pb::Batch b;
  b.add_requests()->set_inputs("x");
  absl::StatusOr<BatchInput> in = BatchFromProto(b);
  ASSERT_TRUE(in.ok()) << in.status();
  const SamplingParams neutral;
  const StoppingParams stop;
  EXPECT_EQ(in->requests[0].parameters.temperature, neutral.temperature);
  EXPECT_EQ(in->requests[0].parameters.top_p, neutral.top_p);
  EXPECT_EQ(in->requests[0].parameters.typical_p, neutral.typical_p);
  EXPECT_EQ(in->requests[0].parameters.repetition_penalty, neutral.repetition_penalty);
  EXPECT_EQ(in->requests[0].stopping.max_new_tokens, stop.max_new_tokens);
}

TEST(BatchFromProto, TokenIdAboveInt32IsInvalidArgumentNamingTheEntry) {
  pb::Batch b;
  b.add_requests()->mutable_tokenized_inputs()->add_ids(1);
  pb::Request* r = b.add_requests();
  r->mutable_tokenized_inputs()->add_ids(3);
  r->mutable_tokenized_inputs()->add_ids(3000000000u);
  absl::StatusOr<BatchInput> in = BatchFromProto(b);
  ASSERT_FALSE(in.ok());
  EXPECT_EQ(in.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(in.status().message().find("requests[1].tokenized_inputs.ids[1] = 3000000000"),
            std::string::npos)
      << in.status();
}

TEST(GenerationToProto, MapsEveryFieldAndPresence) {
  GenerationOut g;
  g.request_id = std::numeric_limits<uint64_t>::max();  // the health probe id
  TokensOut prefill;
  prefill.ids = {10, 11};
  prefill.logprobs = {std::nanf(""), -1.5f};
  prefill.texts = {"a", "b"};
  g.prefill_tokens = prefill;
  g.prefill_tokens_length = 2;
  g.next_tokens.ids = {12};
  g.next_tokens.logprobs = {-0.25f};
  g.next_tokens.texts = {"c"};
  g.next_tokens.is_special = {true};
  AlternativeTokensOut alt;
  alt.ids = {12, 13};
  alt.logprobs = {-0.25f, -2.0f};
  alt.texts = {"c", "d"};
  g.next_tokens.alternative_tokens = {alt};
  GeneratedTextOut done;
  done.text = "abc";
  done.generated_tokens = 1;
  done.finish_reason = FinishReason::kStopSequence;
  done.seed = 99;
  g.generated_text = done;

  pb::Generation out;
  GenerationToProto(g, &out);
  EXPECT_EQ(out.request_id(), std::numeric_limits<uint64_t>::max());
  ASSERT_TRUE(out.has_prefill_tokens());
  EXPECT_EQ(out.prefill_tokens().ids_size(), 2);
  EXPECT_TRUE(std::isnan(out.prefill_tokens().logprobs(0)));
  EXPECT_EQ(out.prefill_tokens().texts(1), "b");
  EXPECT_EQ(out.prefill_tokens_length(), 2u);
  EXPECT_EQ(out.next_tokens().ids(0), 12u);
  EXPECT_FLOAT_EQ(out.next_tokens().logprobs(0), -0.25f);
  EXPECT_EQ(out.next_tokens().texts(0), "c");
  EXPECT_TRUE(out.next_tokens().is_special(0));
  ASSERT_EQ(out.next_tokens().alternative_tokens_size(), 1);
  EXPECT_EQ(out.next_tokens().alternative_tokens(0).ids(1), 13u);
  EXPECT_EQ(out.next_tokens().alternative_tokens(0).texts(1), "d");
  ASSERT_TRUE(out.has_generated_text());
  EXPECT_EQ(out.generated_text().text(), "abc");
  EXPECT_EQ(out.generated_text().generated_tokens(), 1u);
  EXPECT_EQ(out.generated_text().finish_reason(), pb::FINISH_REASON_STOP_SEQUENCE);
  ASSERT_TRUE(out.generated_text().has_seed());
  EXPECT_EQ(out.generated_text().seed(), 99u);
}

TEST(GenerationToProto, UnsetOptionalsStayUnset) {
  GenerationOut g;
  g.request_id = 5;
  g.next_tokens.ids = {1};
  g.next_tokens.logprobs = {-1.0f};
  g.next_tokens.texts = {""};
  g.next_tokens.is_special = {false};
  pb::Generation out;
  GenerationToProto(g, &out);
  EXPECT_FALSE(out.has_prefill_tokens());
  EXPECT_FALSE(out.has_generated_text());
  EXPECT_EQ(out.next_tokens().alternative_tokens_size(), 0);

  GeneratedTextOut greedy;  // greedy request: no seed
  greedy.finish_reason = FinishReason::kEosToken;
  g.generated_text = greedy;
  out.Clear();
  GenerationToProto(g, &out);
  EXPECT_EQ(out.generated_text().finish_reason(), pb::FINISH_REASON_EOS_TOKEN);
  EXPECT_FALSE(out.generated_text().has_seed());
}

TEST(GenerationToProto, InvalidUtf8IsReplacedNotSent) {
  GenerationOut g;
  g.next_tokens.ids = {1};
  g.next_tokens.logprobs = {-1.0f};
  g.next_tokens.texts = {std::string("ok\xF0\x9F", 4)};  // truncated 4-byte sequence
  g.next_tokens.is_special = {false};
  GeneratedTextOut done;
  done.text = std::string("\xC3", 1);
  g.generated_text = done;
  pb::Generation out;
  GenerationToProto(g, &out);
  EXPECT_EQ(out.next_tokens().texts(0), "ok\xEF\xBF\xBD");  // one U+FFFD for the subpart
  EXPECT_EQ(out.generated_text().text(), "\xEF\xBF\xBD");
}

TEST(StepResultToProto, BatchPresentOnlyWhenTheStepLeftOne) {
  StepResult step;
  step.generations.resize(2);
  step.generations[0].request_id = 1;
  step.generations[1].request_id = 2;
  pb::DecodeResponse no_batch;
  StepResultToProto(step, &no_batch);
  EXPECT_EQ(no_batch.generations_size(), 2);
  EXPECT_FALSE(no_batch.has_batch());

  CachedBatchOut cb;
  cb.id = 0;  // batch id 0 is real: presence, not value
  cb.request_ids = {1, 2};
  cb.size = 2;
  cb.max_tokens = 64;
  cb.current_tokens = 2;
  step.batch = cb;
  pb::PrefillResponse with_batch;
  StepResultToProto(step, &with_batch);
  ASSERT_TRUE(with_batch.has_batch());
  EXPECT_EQ(with_batch.batch().id(), 0u);
  EXPECT_EQ(with_batch.batch().request_ids_size(), 2);
  EXPECT_EQ(with_batch.batch().size(), 2u);
  EXPECT_EQ(with_batch.batch().max_tokens(), 64u);
  EXPECT_EQ(with_batch.batch().current_tokens(), 2u);
}

TEST(ToGrpcStatus, EveryCodeMapsToTheSameNumber) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  for (int code = 1; code <= 16; ++code) {
    const absl::Status s(static_cast<absl::StatusCode>(code), "msg " + std::to_string(code));
    const grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), code);
    EXPECT_EQ(g.error_message(), "msg " + std::to_string(code));
  }
  EXPECT_EQ(ToGrpcStatus(absl::NotFoundError("Batch ID 42 not found in cache.")).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

// C++ protobuf refuses to parse a proto3 string holding invalid UTF-8; the explanation must name
// the field. The bytes are built by hand: serializing such a message is itself an error.
std::string PrefillBytesWithRawInputs(int bad_request, const std::string& raw_inputs,
                                      bool bad_in_stop_sequence) {
  pb::PrefillRequest req;
  pb::Batch* b = req.mutable_batch();
  for (int i = 0; i < 3; ++i) {
    pb::Request* r = b->add_requests();
    r->set_id(i);
    r->set_inputs(i == bad_request && !bad_in_stop_sequence ? "PLACEHOLDER!" : "fine");
    r->mutable_stopping_parameters()->add_stop_sequences("ok");
    r->mutable_stopping_parameters()->add_stop_sequences(
        i == bad_request && bad_in_stop_sequence ? "PLACEHOLDER!" : "stop");
  }
  std::string wire = req.SerializeAsString();
  // Same length as the placeholder, so every enclosing length prefix stays valid.
  EXPECT_EQ(raw_inputs.size(), std::string("PLACEHOLDER!").size());
  const size_t at = wire.find("PLACEHOLDER!");
  EXPECT_NE(at, std::string::npos);
  wire.replace(at, raw_inputs.size(), raw_inputs);
  return wire;
}

TEST(ExplainParseFailure, NamesTheFieldWithInvalidUtf8) {
  const std::string bad(
      "abc\xFF\xFE"
      "defghij",
      12);
  const std::string wire = PrefillBytesWithRawInputs(1, bad, false);
  pb::PrefillRequest parsed;
  ASSERT_FALSE(parsed.ParseFromString(wire)) << "protobuf accepted invalid UTF-8";
  const absl::Status st = ExplainParseFailure(pb::PrefillRequest::descriptor(), wire);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "batch.requests[1].inputs is not valid UTF-8");
}

TEST(ExplainParseFailure, NamesRepeatedStringEntries) {
  const std::string bad(
      "\xC0\x80"
      "0123456789",
      12);  // overlong NUL
  const std::string wire = PrefillBytesWithRawInputs(2, bad, true);
  const absl::Status st = ExplainParseFailure(pb::PrefillRequest::descriptor(), wire);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(),
            "batch.requests[2].stopping_parameters.stop_sequences[1] is not valid UTF-8");
}

TEST(ExplainParseFailure, GarbageIsAMalformedMessage) {
  const std::string garbage("\x0a\xff\xff\xff\xff\x0f", 6);  // length prefix far past the end
  const absl::Status st = ExplainParseFailure(pb::PrefillRequest::descriptor(), garbage);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("not a valid generate.v1.PrefillRequest message"), std::string::npos)
      << st;
}

}  // namespace
}  // namespace phishard
