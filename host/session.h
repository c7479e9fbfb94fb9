// One live transport connection to the guest agent: reads transport bytes into pool buffers and feeds the
// Mux, writes the Mux's gather vectors with writev, and routes stream events to their StreamSinks.
#pragma once

#include <uv.h>

#include <functional>
#include <memory>
#include <unordered_map>

#include "host/poller.h"
#include "protocol/buffer.h"
#include "protocol/mux.h"

namespace vbridge {

// The host-side end of one stream (a client socket, a forwarded connection).
class StreamSink {
 public:
  virtual ~StreamSink() = default;
  virtual void on_open_result(const Error* error) = 0;
  virtual void on_data(Slice data) = 0;
  virtual void on_fin() = 0;
  // The stream is gone (peer reset, transport lost). The sink must not touch the stream again.
  virtual void on_reset(const Error& error) = 0;
  virtual void on_writable() = 0;
  // Both directions finished cleanly; the stream is gone.
  virtual void on_closed() = 0;
};

class Session;

class SessionObserver {
 public:
  virtual ~SessionObserver() = default;
  virtual void on_session_ready(const Hello& peer) = 0;
  // The transport failed or the peer broke the protocol; the session must be destroyed (not from within
  // this call's caller stack: the observer defers it).
  virtual void on_session_lost(const Error& error) = 0;
  virtual void on_control(const wire::Control& message) = 0;
  // The guest opened stream `id` towards `target`. Either answer now with mux().reject and return null, or
  // return the sink for the stream's events (the session registers it) and answer with mux().accept.
  virtual StreamSink* on_stream_open(Session& session, StreamId id, const wire::Target& target) = 0;
};

class Session final : public MuxHandler {
 public:
  Session(uv_loop_t* loop, UniqueFd transport, BufferPool& pool, SessionObserver& observer, MuxConfig config);
  ~Session() override;

  // Opens a stream (the OPEN leaves with the next flush()); the sink hears the answer through
  // on_open_result. The sink must outlive the stream or call detach() first.
  Result<StreamId> open(const wire::TargetT& target, StreamSink* sink);
  // Forgets the sink of a stream without telling the peer (the caller resets or has finished it).
  void detach(StreamId id) { sinks_.erase(id); }
  Mux& mux() { return mux_; }
  // Sends pending frames now (called after the application queued data).
  void flush();
  // Fails every stream with `error` and stops all I/O.
  void shutdown(const Error& error);
  bool lost() const { return lost_; }
  void send_ping();
  uint64_t pings_unanswered() const { return pings_sent_ - last_pong_; }

  // MuxHandler
  void on_ready(const Hello& peer) override;
  void on_open(StreamId id, const wire::Target& target) override;
  void on_open_result(StreamId id, const Error* error) override;
  void on_data(StreamId id, Slice data) override;
  void on_fin(StreamId id) override;
  void on_reset(StreamId id, const Error& error) override;
  void on_writable(StreamId id) override;
  void on_closed(StreamId id) override;
  void on_control(const wire::Control& message) override;
  void on_goaway(const std::string& message) override;
  void on_pong(uint64_t token) override;

 private:
  void on_poll(int status, int events);
  // Reads and handles what arrived, then sends what that produced; loses the session on a failed write.
  void read_transport();
  // Reads and feeds the mux, at most a few reads. Never re-entered: frames are handled in order.
  void read_some();
  void write_transport();
  // Loses the session after a failed transport write, once what the peer sent before it closed is read.
  void fail_write();
  void lose(const Error& error);
  StreamSink* sink(StreamId id);

  BufferPool& pool_;
  ReadArena arena_;
  SessionObserver& observer_;
  Mux mux_;
  Poller poller_;
  std::unordered_map<StreamId, StreamSink*> sinks_;
  bool lost_ = false;
  bool in_flush_ = false;
  bool reading_ = false;  // read_some() is on the stack
  int write_error_ = 0;   // a transport write failed (errno); the session is lost once reading is done
  uint64_t pings_sent_ = 0, last_pong_ = 0;
};

}  // namespace vbridge
