// A client that knows nothing but gRPC server reflection (like grpcurl): it lists the services of
// the real server process, fetches the descriptors of generate.v1.LoraxService and
// grpc.health.v1.Health into its own DescriptorPool, and calls Health and Warmup with
// DynamicMessage over raw bytes. No generated header of ours is included here.
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "google/protobuf/descriptor.h"
#include "google/protobuf/dynamic_message.h"
#include "gtest/gtest.h"
#include "tests/integration/raw_grpc.h"
#include "tests/integration/reflection_client.h"
#include "tests/integration/shard_process.h"

namespace phishard {
namespace {

namespace gp = ::google::protobuf;
using integration::DemoShard;
using integration::RawUnary;
using integration::ReflectionClient;
using integration::TempDir;

// Sets `path` ("a.b.c") in a dynamic message, creating sub-messages on the way.
void SetScalar(gp::Message* m, const std::string& path, double v) {
  const size_t dot = path.find('.');
  const gp::FieldDescriptor* f = m->GetDescriptor()->FindFieldByName(path.substr(0, dot));
  ASSERT_NE(f, nullptr) << path;
  const gp::Reflection* r = m->GetReflection();
  if (dot != std::string::npos) {
    SetScalar(r->MutableMessage(m, f), path.substr(dot + 1), v);
    return;
  }
  switch (f->cpp_type()) {
    case gp::FieldDescriptor::CPPTYPE_FLOAT:
      r->SetFloat(m, f, static_cast<float>(v));
      break;
    case gp::FieldDescriptor::CPPTYPE_UINT32:
      r->SetUInt32(m, f, static_cast<uint32_t>(v));
      break;
    case gp::FieldDescriptor::CPPTYPE_UINT64:
      r->SetUInt64(m, f, static_cast<uint64_t>(v));
      break;
    default:
      FAIL() << "unexpected type of " << path;
  }
}

TEST(ServeReflection, AReflectionOnlyClientCanDiscoverDescribeAndCall) {
  TempDir dir;
  DemoShard shard(dir, {}, {{"WORLD_SIZE", ""}, {"RANK", ""}});
  ASSERT_TRUE(shard.ready) << shard.process->Logs();
  auto channel = grpc::CreateChannel("unix:" + shard.socket, grpc::InsecureChannelCredentials());
  ReflectionClient rc(channel);

  // list
  const std::vector<std::string> services = rc.ListServices();
  const std::set<std::string> got(services.begin(), services.end());
  EXPECT_TRUE(got.count("generate.v1.LoraxService"));
  EXPECT_TRUE(got.count("grpc.health.v1.Health"));
  EXPECT_TRUE(got.count("grpc.reflection.v1alpha.ServerReflection"));

  // describe
  ASSERT_TRUE(rc.LoadSymbol("generate.v1.LoraxService"));
  ASSERT_TRUE(rc.LoadSymbol("grpc.health.v1.Health"));
  const gp::ServiceDescriptor* lorax = rc.pool().FindServiceByName("generate.v1.LoraxService");
  ASSERT_NE(lorax, nullptr);
  std::set<std::string> methods;
  for (int i = 0; i < lorax->method_count(); ++i) methods.insert(lorax->method(i)->name());
  EXPECT_EQ(methods,
            (std::set<std::string>{"Info", "ServiceDiscovery", "ClearCache", "FilterBatch",
                                   "Warmup", "Prefill", "Embed", "Classify", "Decode", "Health",
                                   "DownloadAdapter", "LoadAdapter", "OffloadAdapter"}));
  const gp::Descriptor* info = rc.pool().FindMessageTypeByName("generate.v1.InfoResponse");
  ASSERT_NE(info, nullptr);
  ASSERT_NE(info->FindFieldByName("requires_block_allocator"), nullptr);
  EXPECT_EQ(info->FindFieldByName("requires_block_allocator")->number(), 12);
  EXPECT_TRUE(info->FindFieldByName("window_size")->has_presence());
  EXPECT_TRUE(rc.pool()
                  .FindMessageTypeByName("generate.v1.ClearCacheRequest")
                  ->FindFieldByName("id")
                  ->has_presence());
  const gp::ServiceDescriptor* health = rc.pool().FindServiceByName("grpc.health.v1.Health");
  ASSERT_NE(health, nullptr);
  ASSERT_NE(health->FindMethodByName("Check"), nullptr);
  ASSERT_NE(health->FindMethodByName("Watch"), nullptr);
  EXPECT_TRUE(health->FindMethodByName("Watch")->server_streaming());

  // call grpc.health.v1.Health/Check for both service names
  for (const std::string& name : {std::string(""), std::string("generate.v1.LoraxService")}) {
    std::unique_ptr<gp::Message> req = rc.New("grpc.health.v1.HealthCheckRequest");
    req->GetReflection()->SetString(req.get(), req->GetDescriptor()->FindFieldByName("service"),
                                    name);
    std::string bytes;
    const grpc::Status st =
        RawUnary(channel, "/grpc.health.v1.Health/Check", req->SerializeAsString(), &bytes);
    ASSERT_TRUE(st.ok()) << st.error_message();
    std::unique_ptr<gp::Message> resp = rc.New("grpc.health.v1.HealthCheckResponse");
    ASSERT_TRUE(resp->ParseFromString(bytes));
    const gp::FieldDescriptor* status = resp->GetDescriptor()->FindFieldByName("status");
    EXPECT_EQ(resp->GetReflection()->GetEnum(*resp, status)->name(), "SERVING") << name;
  }
  // and generate.v1.LoraxService/Health
  std::unique_ptr<gp::Message> lh = rc.New("generate.v1.HealthRequest");
  EXPECT_TRUE(RawUnary(channel, "/generate.v1.LoraxService/Health", lh->SerializeAsString()).ok());

  // call Warmup with a message built from the reflected descriptors only
  std::unique_ptr<gp::Message> warm = rc.New("generate.v1.WarmupRequest");
  const gp::Reflection* wr = warm->GetReflection();
  gp::Message* batch =
      wr->MutableMessage(warm.get(), warm->GetDescriptor()->FindFieldByName("batch"));
  gp::Message* request = batch->GetReflection()->AddMessage(
      batch, batch->GetDescriptor()->FindFieldByName("requests"));
  request->GetReflection()->SetString(request, request->GetDescriptor()->FindFieldByName("inputs"),
                                      "_test _test _test _test ");
  SetScalar(request, "truncate", 8);
  SetScalar(request, "parameters.temperature", 1);
  SetScalar(request, "parameters.top_p", 1);
  SetScalar(request, "parameters.typical_p", 1);
  SetScalar(request, "parameters.repetition_penalty", 1);
  SetScalar(request, "stopping_parameters.max_new_tokens", 1);
  SetScalar(batch, "size", 1);
  SetScalar(warm.get(), "max_input_length", 8);
  SetScalar(warm.get(), "max_prefill_tokens", 8);
  SetScalar(warm.get(), "max_new_tokens", 1);
  std::string bytes;
  const grpc::Status st =
      RawUnary(channel, "/generate.v1.LoraxService/Warmup", warm->SerializeAsString(), &bytes);
  ASSERT_TRUE(st.ok()) << st.error_message();
  std::unique_ptr<gp::Message> wresp = rc.New("generate.v1.WarmupResponse");
  ASSERT_TRUE(wresp->ParseFromString(bytes));
  const gp::FieldDescriptor* total =
      wresp->GetDescriptor()->FindFieldByName("max_supported_total_tokens");
  ASSERT_TRUE(wresp->GetReflection()->HasField(*wresp, total)) << "must always be set";
  const uint32_t tokens = wresp->GetReflection()->GetUInt32(*wresp, total);
  EXPECT_GT(tokens, 0u);
  EXPECT_EQ(tokens % 16, 0u);
}

}  // namespace
}  // namespace phishard
