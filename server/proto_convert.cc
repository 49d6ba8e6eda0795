#include "server/proto_convert.h"

#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/dynamic_message.h"
#include "model/tokenizer.h"

namespace phishard {
namespace {

namespace pb = ::generate::v1;
using ::google::protobuf::Descriptor;
using ::google::protobuf::DescriptorPool;
using ::google::protobuf::DynamicMessageFactory;
using ::google::protobuf::FieldDescriptor;
using ::google::protobuf::FileDescriptor;
using ::google::protobuf::FileDescriptorProto;
using ::google::protobuf::Message;
using ::google::protobuf::Reflection;

SamplingParams SamplingFromProto(const pb::NextTokenChooserParameters& p) {
  SamplingParams s;
  s.temperature = p.temperature();
  s.top_k = p.top_k();
  s.top_p = p.top_p();
  s.typical_p = p.typical_p();
  s.do_sample = p.do_sample();
  s.seed = p.seed();
  s.repetition_penalty = p.repetition_penalty();
  s.frequency_penalty = p.frequency_penalty();
  s.presence_penalty = p.presence_penalty();
  s.watermark = p.watermark();
  s.adapter_id = p.adapter_id();
  if (p.has_schema()) s.schema = p.schema();
  s.return_k_alternatives = p.return_k_alternatives();
  return s;
}

StoppingParams StoppingFromProto(const pb::StoppingCriteriaParameters& p) {
  StoppingParams s;
  s.max_new_tokens = p.max_new_tokens();
  s.stop_sequences.assign(p.stop_sequences().begin(), p.stop_sequences().end());
  s.ignore_eos_token = p.ignore_eos_token();
  return s;
}

// The engine guarantees valid UTF-8 in every emitted string (the router's prost decoder rejects
// the whole response otherwise); this is the last line of defence, and a bug if it ever fires.
std::string SafeText(const std::string& s) {
  if (IsValidUtf8(s)) return s;
  PHI_LOG(WARNING) << "engine emitted invalid UTF-8 (" << s.size()
                   << " bytes); replacing invalid sequences with U+FFFD";
  return Utf8Lossy(s);
}

void AlternativesToProto(const AlternativeTokensOut& in, pb::AlternativeTokens* out) {
  for (int32_t id : in.ids) out->add_ids(static_cast<uint32_t>(id));
  out->mutable_logprobs()->Add(in.logprobs.begin(), in.logprobs.end());
  for (const std::string& t : in.texts) out->add_texts(SafeText(t));
}

// ---- parse-failure diagnosis -------------------------------------------------------------------

// A copy of a generated file's descriptors with every `string` field turned into `bytes` (same
// wire format, no UTF-8 check), in a private pool so it never clashes with the generated one.
class LenientTypes {
 public:
  const Descriptor* Find(const Descriptor* strict) {
    absl::MutexLock lock(&mu_);
    if (!BuildFileLocked(strict->file())) return nullptr;
    return pool_.FindMessageTypeByName(strict->full_name());
  }
  const Message* Prototype(const Descriptor* lenient) {
    absl::MutexLock lock(&mu_);
    return factory_.GetPrototype(lenient);
  }

 private:
  static void StringsToBytes(google::protobuf::DescriptorProto* msg) {
    for (auto& f : *msg->mutable_field()) {
      if (f.type() == google::protobuf::FieldDescriptorProto::TYPE_STRING) {
        f.set_type(google::protobuf::FieldDescriptorProto::TYPE_BYTES);
      }
    }
    for (auto& nested : *msg->mutable_nested_type()) StringsToBytes(&nested);
  }
  bool BuildFileLocked(const FileDescriptor* file) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (pool_.FindFileByName(file->name()) != nullptr) return true;
    for (int i = 0; i < file->dependency_count(); ++i) {
      if (!BuildFileLocked(file->dependency(i))) return false;
    }
    FileDescriptorProto proto;
    file->CopyTo(&proto);
    for (auto& msg : *proto.mutable_message_type()) StringsToBytes(&msg);
    return pool_.BuildFile(proto) != nullptr;
  }

  absl::Mutex mu_;
  DescriptorPool pool_;
  DynamicMessageFactory factory_{&pool_};
};

LenientTypes& Lenient() {
  static LenientTypes* types = new LenientTypes();
  return *types;
}

// Depth-first over `strict`'s fields; returns the path of the first string field whose bytes in
// `msg` (a lenient message) are not UTF-8, or "" when there is none.
std::string FindInvalidUtf8(const Message& msg, const Descriptor* strict, const std::string& path) {
  const Reflection* refl = msg.GetReflection();
  const Descriptor* lenient = msg.GetDescriptor();
  for (int i = 0; i < strict->field_count(); ++i) {
    const FieldDescriptor* sf = strict->field(i);
    const FieldDescriptor* lf = lenient->FindFieldByNumber(sf->number());
    if (lf == nullptr) continue;
    const std::string name = path.empty() ? sf->name() : path + "." + sf->name();
    if (sf->type() == FieldDescriptor::TYPE_STRING) {
      if (lf->is_repeated()) {
        for (int k = 0; k < refl->FieldSize(msg, lf); ++k) {
          if (!IsValidUtf8(refl->GetRepeatedString(msg, lf, k))) {
            return absl::StrFormat("%s[%d]", name, k);
          }
        }
      } else if (!IsValidUtf8(refl->GetString(msg, lf))) {
        return name;
      }
    } else if (sf->type() == FieldDescriptor::TYPE_MESSAGE) {
      if (lf->is_repeated()) {
        for (int k = 0; k < refl->FieldSize(msg, lf); ++k) {
          std::string bad = FindInvalidUtf8(refl->GetRepeatedMessage(msg, lf, k),
                                            sf->message_type(), absl::StrFormat("%s[%d]", name, k));
          if (!bad.empty()) return bad;
        }
      } else if (refl->HasField(msg, lf)) {
        std::string bad = FindInvalidUtf8(refl->GetMessage(msg, lf), sf->message_type(), name);
        if (!bad.empty()) return bad;
      }
    }
  }
  return "";
}

}  // namespace

absl::StatusOr<BatchInput> BatchFromProto(const pb::Batch& pb) {
  BatchInput batch;
  batch.id = pb.id();
  batch.size = pb.size();
  batch.max_tokens = pb.max_tokens();
  batch.max_blocks = pb.max_blocks();
  batch.requests.reserve(pb.requests_size());
  for (int i = 0; i < pb.requests_size(); ++i) {
    const pb::Request& r = pb.requests(i);
    RequestInput req;
    req.id = r.id();
    req.inputs = r.inputs();
    const auto& ids = r.tokenized_inputs().ids();
    req.token_ids.reserve(ids.size());
    for (int k = 0; k < ids.size(); ++k) {
      if (ids[k] > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "requests[%d].tokenized_inputs.ids[%d] = %u out of range", i, k, ids[k]));
      }
      req.token_ids.push_back(static_cast<int32_t>(ids[k]));
    }
    req.truncate = r.truncate();
    if (r.has_parameters()) req.parameters = SamplingFromProto(r.parameters());
    if (r.has_stopping_parameters()) req.stopping = StoppingFromProto(r.stopping_parameters());
    req.prefill_logprobs = r.prefill_logprobs();
    req.adapter_index = r.adapter_index();
    req.blocks.assign(r.blocks().begin(), r.blocks().end());
    req.slots.assign(r.slots().begin(), r.slots().end());
    req.cache_len = r.cache_len();
    if (r.has_chunk_len()) req.chunk_len = r.chunk_len();
    batch.requests.push_back(std::move(req));
  }
  return batch;
}

void TokensToProto(const TokensOut& in, pb::NextTokens* out) {
  for (int32_t id : in.ids) out->add_ids(static_cast<uint32_t>(id));
  out->mutable_logprobs()->Add(in.logprobs.begin(), in.logprobs.end());
  for (const std::string& t : in.texts) out->add_texts(SafeText(t));
  for (bool s : in.is_special) out->add_is_special(s);
  for (const AlternativeTokensOut& a : in.alternative_tokens) {
    AlternativesToProto(a, out->add_alternative_tokens());
  }
}

void PrefillTokensToProto(const TokensOut& in, pb::PrefillTokens* out) {
  for (int32_t id : in.ids) out->add_ids(static_cast<uint32_t>(id));
  out->mutable_logprobs()->Add(in.logprobs.begin(), in.logprobs.end());
  for (const std::string& t : in.texts) out->add_texts(SafeText(t));
}

void GenerationToProto(const GenerationOut& in, pb::Generation* out) {
  out->set_request_id(in.request_id);
  if (in.prefill_tokens.has_value()) {
    PrefillTokensToProto(*in.prefill_tokens, out->mutable_prefill_tokens());
  }
  out->set_prefill_tokens_length(in.prefill_tokens_length);
  TokensToProto(in.next_tokens, out->mutable_next_tokens());
  if (in.generated_text.has_value()) {
    const GeneratedTextOut& g = *in.generated_text;
    pb::GeneratedText* gt = out->mutable_generated_text();
    gt->set_text(SafeText(g.text));
    gt->set_generated_tokens(g.generated_tokens);
    switch (g.finish_reason) {
      case FinishReason::kLength:
        gt->set_finish_reason(pb::FINISH_REASON_LENGTH);
        break;
      case FinishReason::kEosToken:
        gt->set_finish_reason(pb::FINISH_REASON_EOS_TOKEN);
        break;
      case FinishReason::kStopSequence:
        gt->set_finish_reason(pb::FINISH_REASON_STOP_SEQUENCE);
        break;
    }
    if (g.seed.has_value()) gt->set_seed(*g.seed);
  }
}

void CachedBatchToProto(const CachedBatchOut& in, pb::CachedBatch* out) {
  out->set_id(in.id);
  out->mutable_request_ids()->Add(in.request_ids.begin(), in.request_ids.end());
  out->set_size(in.size);
  out->set_max_tokens(in.max_tokens);
  out->set_current_tokens(in.current_tokens);
}

pb::CachedBatch CachedBatchToProto(const CachedBatchOut& in) {
  pb::CachedBatch out;
  CachedBatchToProto(in, &out);
  return out;
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const int code = static_cast<int>(status.code());
  // absl has no code outside 1..16 today; anything new degrades to UNKNOWN rather than a
  // mistranslated value.
  const grpc::StatusCode grpc_code =
      (code >= 1 && code <= 16) ? static_cast<grpc::StatusCode>(code) : grpc::StatusCode::UNKNOWN;
  return grpc::Status(grpc_code, std::string(status.message()));
}

absl::Status ExplainParseFailure(const Descriptor* type, std::string_view bytes) {
  const Descriptor* lenient = Lenient().Find(type);
  if (lenient != nullptr) {
    std::unique_ptr<Message> msg(Lenient().Prototype(lenient)->New());
    if (msg->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
      const std::string bad = FindInvalidUtf8(*msg, type, "");
      if (!bad.empty()) {
        return absl::InvalidArgumentError(absl::StrFormat("%s is not valid UTF-8", bad));
      }
    }
  }
  return absl::InvalidArgumentError(absl::StrFormat("request is not a valid %s message (%d bytes)",
                                                    type->full_name(), bytes.size()));
}

}  // namespace phishard
