// Plain POSIX TCP for the rendezvous and the control channel between tensor-parallel ranks (private
// to parallel/): a listener, a connector that retries until a deadline, and length-prefixed frames.
// Every socket is non-blocking and every wait is a poll(2) bounded by a deadline, so nothing here
// can block forever. Wire format of a frame: [u8 type][3 zero bytes][u32 big-endian
// length][payload].
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace phishard {

// Frames carry rendezvous handshakes and small control messages, never tensors.
inline constexpr size_t kMaxFramePayload = size_t{64} << 20;

struct Frame {
  uint8_t type = 0;
  std::string payload;
};

// One connected stream socket. Sending and receiving may run on two different threads; Shutdown()
// may be called from any thread and wakes both.
class TcpConnection {
 public:
  explicit TcpConnection(int fd);  // takes ownership; fd must be connected and non-blocking
  ~TcpConnection();
  TcpConnection(const TcpConnection&) = delete;
  TcpConnection& operator=(const TcpConnection&) = delete;

  // Writes the whole frame before `deadline`. A frame cut off by the deadline desynchronises the
  // stream, so any failure here marks the connection broken for good.
  absl::Status SendFrame(uint8_t type, std::string_view payload, absl::Time deadline);

  // Waits until one complete frame is buffered. DEADLINE_EXCEEDED when `deadline` passes first;
  // bytes already read stay buffered, so a timeout never loses or splits a frame.
  // UNAVAILABLE when the peer closed the connection, INTERNAL on garbage.
  absl::Status WaitFrame(absl::Time deadline);
  bool HasFrame() const;
  Frame PopFrame();  // requires HasFrame()
  absl::StatusOr<Frame> RecvFrame(absl::Time deadline);

  // Reads whatever is available without blocking (for callers that poll fd() themselves).
  absl::Status ReadAvailable();

  // Shuts the socket down in both directions: blocked calls return, later calls fail.
  void Shutdown();

  int fd() const { return fd_; }
  // Numeric address of this end of the connection (e.g. "127.0.0.1"); empty if unknown.
  std::string LocalHost() const;

 private:
  absl::Status CheckHeader() const;

  const int fd_;
  std::string rx_;            // received bytes not yet popped as frames
  absl::Status send_status_;  // first fatal send error
  absl::Status recv_status_;  // first fatal receive error
};

class TcpListener {
 public:
  // Binds `host:port` (the first address of `host` that binds) and listens. port 0 picks a free
  // one.
  static absl::StatusOr<std::unique_ptr<TcpListener>> Listen(const std::string& host, int port);
  ~TcpListener();
  TcpListener(const TcpListener&) = delete;
  TcpListener& operator=(const TcpListener&) = delete;

  // Accepts one pending connection without blocking; nullptr when none is pending.
  absl::StatusOr<std::unique_ptr<TcpConnection>> AcceptPending();
  int fd() const { return fd_; }
  int port() const { return port_; }

 private:
  TcpListener(int fd, int port) : fd_(fd), port_(port) {}
  const int fd_;
  const int port_;
};

// Connects to `host:port`, trying every address of `host` and retrying (refused, unreachable, host
// not resolvable yet) until `deadline`. DEADLINE_EXCEEDED names the last error seen.
absl::StatusOr<std::unique_ptr<TcpConnection>> ConnectWithRetry(const std::string& host, int port,
                                                                absl::Time deadline);

// Milliseconds left until `deadline`, for poll(2): at least 0 and at most `cap`, so that long waits
// wake up now and then to re-check their state.
int PollMillis(absl::Time deadline, absl::Duration cap = absl::Seconds(1));

// Payload encoding for frames: big-endian u32 and length-prefixed strings.
void WireAppendU32(std::string* out, uint32_t v);
void WireAppendString(std::string* out, std::string_view s);
class WireReader {
 public:
  explicit WireReader(std::string_view data) : data_(data) {}
  bool ReadU32(uint32_t* v);
  bool ReadString(std::string* s);
  bool done() const { return data_.empty(); }

 private:
  std::string_view data_;
};

}  // namespace phishard
