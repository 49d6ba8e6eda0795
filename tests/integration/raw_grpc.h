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

// A streaming call of `method` on its own completion queue, with a deadline. Step waits for the
// event of an operation's tag (1 start, 2 write, 3 writes done, 4 read, 5 finish). Members are
// declared stub, queue, context, call, so the call goes first and the queue last.
struct RawStream {
  RawStream(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
            double timeout_s)
      : stub(channel) {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    call = stub.PrepareCall(&ctx, method, &cq);
  }
  static void* Tag(intptr_t t) { return reinterpret_cast<void*>(t); }
  bool Next() {
    void* t = nullptr;
    const bool got = cq.Next(&t, &ok);
    tag = reinterpret_cast<intptr_t>(t);
    return got;
  }
  // The next event is `want`'s, and it succeeded.
  bool Step(intptr_t want) { return Next() && tag == want && ok; }
  // Starts the call, sends `request` and the end of the client's stream.
  bool Send(const std::string& request) {
    call->StartCall(Tag(1));
    if (!Step(1)) return false;
    call->Write(ToByteBuffer(request), Tag(2));
    if (!Step(2)) return false;
    call->WritesDone(Tag(3));
    return Step(3);
  }
  // Finish (after everything else), then drains and shuts the queue down.
  grpc::Status Finish() {
    grpc::Status status;
    call->Finish(&status, Tag(5));
    while (Next() && tag != 5) {
    }
    cq.Shutdown();
    while (Next()) {
    }
    return status;
  }

  grpc::GenericStub stub;
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call;
  intptr_t tag = 0;
  bool ok = false;
};

// One request, all responses of a bidi-streaming `method` (the reflection service).
inline grpc::Status RawBidiOnce(const std::shared_ptr<grpc::Channel>& channel,
                                const std::string& method, const std::string& request,
                                std::vector<std::string>* responses, double timeout_s = 30) {
  RawStream s(channel, method, timeout_s);
  if (!s.Send(request)) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "sending the request failed");
  }
  for (;;) {
    grpc::ByteBuffer buf;
    s.call->Read(&buf, RawStream::Tag(4));
    if (!s.Step(4)) break;  // the server closed the stream
    responses->push_back(FromByteBuffer(buf));
  }
  return s.Finish();
}

// The first response of a server-streaming `method` (grpc.health.v1.Health/Watch), then cancels
// the call the way grpcurl's user does with Ctrl-C.
inline grpc::Status RawServerStreamFirst(const std::shared_ptr<grpc::Channel>& channel,
                                         const std::string& method, const std::string& request,
                                         std::string* first, double timeout_s = 30) {
  RawStream s(channel, method, timeout_s);
  bool got = false;
  if (s.Send(request)) {
    grpc::ByteBuffer buf;
    s.call->Read(&buf, RawStream::Tag(4));
    got = s.Step(4);
    if (got) *first = FromByteBuffer(buf);
  }
  if (got) s.ctx.TryCancel();
  const grpc::Status status = s.Finish();
  if (got) return grpc::Status::OK;  // the stream answered; CANCELLED is ours
  return status.ok() ? grpc::Status(grpc::StatusCode::UNKNOWN, "stream ended without a message")
                     : status;
}

}  // namespace integration
}  // namespace phishard
