// Test helper: a gRPC client that knows nothing but server reflection (like grpcurl). It lists the
// services of a server, fetches the descriptors of a symbol (and what its file imports) into its
// own DescriptorPool, and builds DynamicMessages of those types. No generated header of ours is
// used.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/dynamic_message.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"
#include "tests/integration/raw_grpc.h"

namespace phishard {
namespace integration {

namespace gp = ::google::protobuf;

// The part of grpc/reflection/v1alpha/reflection.proto this client speaks, as a descriptor (the
// Debian packages install no reflection .proto or header).
inline constexpr char kReflectionProto[] = R"pb(
  name: "reflection_client.proto"
  package: "grpc.reflection.v1alpha"
  syntax: "proto3"
  message_type {
    name: "ServerReflectionRequest"
    field { name: "host" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field {
      name: "file_by_filename"
      number: 3
      label: LABEL_OPTIONAL
      type: TYPE_STRING
      oneof_index: 0
    }
    field {
      name: "file_containing_symbol"
      number: 4
      label: LABEL_OPTIONAL
      type: TYPE_STRING
      oneof_index: 0
    }
    field { name: "list_services" number: 7 label: LABEL_OPTIONAL type: TYPE_STRING oneof_index: 0 }
    oneof_decl { name: "message_request" }
  }
  message_type {
    name: "FileDescriptorResponse"
    field { name: "file_descriptor_proto" number: 1 label: LABEL_REPEATED type: TYPE_BYTES }
  }
  message_type {
    name: "ServiceResponse"
    field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  }
  message_type {
    name: "ListServiceResponse"
    field {
      name: "service"
      number: 1
      label: LABEL_REPEATED
      type: TYPE_MESSAGE
      type_name: ".grpc.reflection.v1alpha.ServiceResponse"
    }
  }
  message_type {
    name: "ErrorResponse"
    field { name: "error_code" number: 1 label: LABEL_OPTIONAL type: TYPE_INT32 }
    field { name: "error_message" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
  }
  message_type {
    name: "ServerReflectionResponse"
    field { name: "valid_host" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field {
      name: "file_descriptor_response"
      number: 4
      label: LABEL_OPTIONAL
      type: TYPE_MESSAGE
      type_name: ".grpc.reflection.v1alpha.FileDescriptorResponse"
      oneof_index: 0
    }
    field {
      name: "list_services_response"
      number: 6
      label: LABEL_OPTIONAL
      type: TYPE_MESSAGE
      type_name: ".grpc.reflection.v1alpha.ListServiceResponse"
      oneof_index: 0
    }
    field {
      name: "error_response"
      number: 7
      label: LABEL_OPTIONAL
      type: TYPE_MESSAGE
      type_name: ".grpc.reflection.v1alpha.ErrorResponse"
      oneof_index: 0
    }
    oneof_decl { name: "message_response" }
  }
)pb";

inline constexpr char kReflectionMethod[] =
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

class ReflectionClient {
 public:
  explicit ReflectionClient(std::shared_ptr<grpc::Channel> channel) : channel_(std::move(channel)) {
    gp::FileDescriptorProto file;
    EXPECT_TRUE(gp::TextFormat::ParseFromString(kReflectionProto, &file));
    EXPECT_NE(reflection_pool_.BuildFile(file), nullptr);
  }

  // One reflection exchange: `field` of ServerReflectionRequest set to `value`.
  std::unique_ptr<gp::Message> Ask(const std::string& field, const std::string& value) {
    const gp::Descriptor* req_type =
        reflection_pool_.FindMessageTypeByName("grpc.reflection.v1alpha.ServerReflectionRequest");
    std::unique_ptr<gp::Message> req(reflection_factory_.GetPrototype(req_type)->New());
    req->GetReflection()->SetString(req.get(), req_type->FindFieldByName(field), value);
    std::vector<std::string> responses;
    const grpc::Status st =
        RawBidiOnce(channel_, kReflectionMethod, req->SerializeAsString(), &responses);
    EXPECT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(responses.size(), 1u);
    if (responses.empty()) return nullptr;
    const gp::Descriptor* resp_type =
        reflection_pool_.FindMessageTypeByName("grpc.reflection.v1alpha.ServerReflectionResponse");
    std::unique_ptr<gp::Message> resp(reflection_factory_.GetPrototype(resp_type)->New());
    EXPECT_TRUE(resp->ParseFromString(responses[0]));
    return resp;
  }

  std::vector<std::string> ListServices() {
    std::unique_ptr<gp::Message> resp = Ask("list_services", "*");
    std::vector<std::string> names;
    if (resp == nullptr) return names;
    const gp::Message& list = Sub(*resp, "list_services_response");
    const gp::FieldDescriptor* service = list.GetDescriptor()->FindFieldByName("service");
    for (int i = 0; i < list.GetReflection()->FieldSize(list, service); ++i) {
      const gp::Message& s = list.GetReflection()->GetRepeatedMessage(list, service, i);
      names.push_back(s.GetReflection()->GetString(s, s.GetDescriptor()->FindFieldByName("name")));
    }
    return names;
  }

  // Fetches the file declaring `symbol` (and what it imports) into `pool()`.
  bool LoadSymbol(const std::string& symbol) {
    std::unique_ptr<gp::Message> resp = Ask("file_containing_symbol", symbol);
    if (resp == nullptr) return false;
    const gp::Message& files = Sub(*resp, "file_descriptor_response");
    const gp::FieldDescriptor* f = files.GetDescriptor()->FindFieldByName("file_descriptor_proto");
    std::vector<gp::FileDescriptorProto> protos;
    for (int i = 0; i < files.GetReflection()->FieldSize(files, f); ++i) {
      gp::FileDescriptorProto p;
      EXPECT_TRUE(p.ParseFromString(files.GetReflection()->GetRepeatedString(files, f, i)));
      protos.push_back(p);
    }
    // Dependencies may come in any order: build what can be built until nothing changes.
    bool progress = true;
    while (progress) {
      progress = false;
      for (const gp::FileDescriptorProto& p : protos) {
        if (pool_.FindFileByName(p.name()) != nullptr) continue;
        bool deps_ready = true;
        for (const std::string& d : p.dependency())
          deps_ready &= pool_.FindFileByName(d) != nullptr;
        if (deps_ready && pool_.BuildFile(p) != nullptr) progress = true;
      }
    }
    return pool_.FindServiceByName(symbol) != nullptr ||
           pool_.FindMessageTypeByName(symbol) != nullptr;
  }

  const gp::DescriptorPool& pool() const { return pool_; }
  std::unique_ptr<gp::Message> New(const std::string& type) {
    const gp::Descriptor* d = pool_.FindMessageTypeByName(type);
    EXPECT_NE(d, nullptr) << type;
    return std::unique_ptr<gp::Message>(factory_.GetPrototype(d)->New());
  }

 private:
  static const gp::Message& Sub(const gp::Message& m, const std::string& field) {
    const gp::FieldDescriptor* f = m.GetDescriptor()->FindFieldByName(field);
    EXPECT_TRUE(m.GetReflection()->HasField(m, f)) << "reflection answered without " << field;
    return m.GetReflection()->GetMessage(m, f);
  }

  std::shared_ptr<grpc::Channel> channel_;
  gp::DescriptorPool reflection_pool_;
  gp::DynamicMessageFactory reflection_factory_{&reflection_pool_};
  gp::DescriptorPool pool_;
  gp::DynamicMessageFactory factory_{&pool_};
};

}  // namespace integration
}  // namespace phishard
