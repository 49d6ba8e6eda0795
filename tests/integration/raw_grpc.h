// Test helper: gRPC calls with raw bytes (grpc::GenericStub), for requests no generated client
// would send (invalid UTF-8, garbage) and for clients that know only what reflection told them.
#pragma once

#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"

namespace phishard {
namespace integration {

inline grpc::ByteBuffer ToByteBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

inline std::string FromByteBuffer(const grpc::ByteBuffer& buf) {
  std::vector<grpc::Slice> slices;
  (void)buf.Dump(&slices);
  std::string out;
  for (const grpc::Slice& s : slices)
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// Unary call of `method` ("/package.Service/Method") with `request` bytes.
inline grpc::Status RawUnary(const std::shared_ptr<grpc::Channel>& channel,
                             const std::string& method, const std::string& request,
                             std::string* response = nullptr, double timeout_s = 60) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  const grpc::ByteBuffer req = ToByteBuffer(request);
  grpc::ByteBuffer resp;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &req, &resp,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  grpc::Status status = done.get_future().get();
  if (status.ok() && response != nullptr) *response = FromByteBuffer(resp);
  return status;
}

// One request, all responses of a bidi-streaming `method` (the reflection service).
inline grpc::Status RawBidiOnce(const std::shared_ptr<grpc::Channel>& channel,
                                const std::string& method, const std::string& request,
                                std::vector<std::string>* responses, double timeout_s = 30) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  auto call = stub.PrepareCall(&ctx, method, &cq);
  void* tag = nullptr;
  bool ok = false;
  auto step = [&](intptr_t want) {
    return cq.Next(&tag, &ok) && reinterpret_cast<intptr_t>(tag) == want && ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  if (!step(1)) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "StartCall failed");
  call->Write(ToByteBuffer(request), reinterpret_cast<void*>(2));
  if (!step(2)) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "Write failed");
  call->WritesDone(reinterpret_cast<void*>(3));
  if (!step(3)) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "WritesDone failed");
  for (;;) {
    grpc::ByteBuffer buf;
    call->Read(&buf, reinterpret_cast<void*>(4));
    if (!cq.Next(&tag, &ok) || !ok) break;  // !ok: the server closed the stream
    responses->push_back(FromByteBuffer(buf));
  }
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return status;
}

// The first response of a server-streaming `method` (grpc.health.v1.Health/Watch), then cancels
// the call the way grpcurl's user does with Ctrl-C.
inline grpc::Status RawServerStreamFirst(const std::shared_ptr<grpc::Channel>& channel,
                                         const std::string& method, const std::string& request,
                                         std::string* first, double timeout_s = 30) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  auto call = stub.PrepareCall(&ctx, method, &cq);
  void* tag = nullptr;
  bool ok = false;
  auto step = [&](intptr_t want) {
    return cq.Next(&tag, &ok) && reinterpret_cast<intptr_t>(tag) == want && ok;
  };
  grpc::Status status = grpc::Status::OK;
  call->StartCall(reinterpret_cast<void*>(1));
  bool alive = step(1);
  if (alive) {
    call->Write(ToByteBuffer(request), reinterpret_cast<void*>(2));
    alive = step(2);
  }
  if (alive) {
    call->WritesDone(reinterpret_cast<void*>(3));
    alive = step(3);
  }
  bool got = false;
  if (alive) {
    grpc::ByteBuffer buf;
    call->Read(&buf, reinterpret_cast<void*>(4));
    got = step(4);
    if (got) *first = FromByteBuffer(buf);
  }
  if (got) ctx.TryCancel();
  call->Finish(&status, reinterpret_cast<void*>(5));
  while (cq.Next(&tag, &ok) && reinterpret_cast<intptr_t>(tag) != 5) {
  }
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (got) return grpc::Status::OK;  // the stream answered; CANCELLED is ours
  return status.ok() ? grpc::Status(grpc::StatusCode::UNKNOWN, "stream ended without a message")
                     : status;
}

}  // namespace integration
}  // namespace phishard
