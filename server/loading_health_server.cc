#include "server/loading_health_server.h"

#include <chrono>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "grpcpp/grpcpp.h"
#include "proto/health.grpc.pb.h"
#include "server/shard_server.h"

namespace phishard {
namespace {

namespace hv1 = ::grpc::health::v1;

}  // namespace

class LoadingHealthServer::Service final : public hv1::Health::CallbackService {
 public:
  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* ctx,
                                  const hv1::HealthCheckRequest* req,
                                  hv1::HealthCheckResponse* resp) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    if (!IsHealthCheckedService(req->service())) {
      reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                   absl::StrCat("unknown service '", req->service(), "'")));
      return reactor;
    }
    resp->set_status(hv1::HealthCheckResponse::NOT_SERVING);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  // One message, then the end of the stream.
  class WatchReactor final : public grpc::ServerWriteReactor<hv1::HealthCheckResponse> {
   public:
    explicit WatchReactor(bool known) {
      response_.set_status(known ? hv1::HealthCheckResponse::NOT_SERVING
                                 : hv1::HealthCheckResponse::SERVICE_UNKNOWN);
      StartWrite(&response_);
    }
    void OnWriteDone(bool /*ok*/) override {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the shard is loading its model; watch again once it serves"));
    }
    void OnDone() override { delete this; }

   private:
    hv1::HealthCheckResponse response_;
  };

  grpc::ServerWriteReactor<hv1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* /*ctx*/, const hv1::HealthCheckRequest* req) override {
    return new WatchReactor(IsHealthCheckedService(req->service()));
  }
};

LoadingHealthServer::LoadingHealthServer() = default;

LoadingHealthServer::~LoadingHealthServer() {
  if (server_ != nullptr) {
    // Nothing here blocks for long: Check answers at once and Watch ends after one message.
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    server_->Wait();
  }
}

absl::StatusOr<std::unique_ptr<LoadingHealthServer>> LoadingHealthServer::Start(
    const std::string& listen_tcp) {
  absl::StatusOr<std::string> addr = NormalizeTcpAddress(listen_tcp);
  if (!addr.ok()) return addr.status();
  // Port 0 means "any free port": the real server would get another one, so nobody could ask
  // this one.
  if (absl::EndsWith(*addr, ":0")) return std::unique_ptr<LoadingHealthServer>();
  std::unique_ptr<LoadingHealthServer> s(new LoadingHealthServer());
  s->service_ = std::make_unique<Service>();
  grpc::ServerBuilder builder;
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);  // as the real server: no sharing
  builder.AddListeningPort(*addr, grpc::InsecureServerCredentials(), &s->port_);
  builder.RegisterService(s->service_.get());
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    if (s->server_ != nullptr) s->server_->Shutdown();
    return absl::UnavailableError(absl::StrFormat("--listen-tcp: could not bind %s", *addr));
  }
  PHI_LOG(INFO) << "grpc.health.v1 answers NOT_SERVING on " << *addr << " while the model loads";
  return s;
}

}  // namespace phishard
