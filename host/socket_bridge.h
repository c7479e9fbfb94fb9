// Joins one host socket (a docker CLI connection, a forwarded client) to one mux stream. Bytes read from
// the socket go to the stream as pool Slices; Slices received on the stream are written to the socket from
// the memory they arrived in. Half-close is carried both ways; an error ends this bridge only.
#pragma once

#include <deque>
#include <string>

#include "host/bulk_reader.h"
#include "host/poller.h"
#include "host/session.h"
#include "protocol/pipe.h"

namespace vbridge {

class SocketBridge;

class BridgeOwner {
 public:
  virtual ~BridgeOwner() = default;
  // The bridge finished and closed its socket; the owner destroys it outside the current call stack.
  virtual void bridge_done(SocketBridge* bridge) = 0;
};

struct BridgeOptions {
  wire::TargetT target;
  std::string name;          // for logs and errors, e.g. "docker"
  bool http_errors = false;  // answer a failed open with an HTTP error the client can show
  bool splice = true;        // move bulk transfers by splice(2) instead of through memory
};

class SocketBridge final : public StreamSink {
 public:
  SocketBridge(uv_loop_t* loop, UniqueFd client, ReadArena& arena, BridgeOwner& owner, BridgeOptions options);
  ~SocketBridge() override;

  // Opens the stream on `session`. Until then the client waits (the kernel buffers its first bytes).
  void attach(Session& session);
  // The stream could not be opened (no transport within the deadline, or the guest refused).
  void fail_open(const Error& error);
  bool attached() const { return session_ != nullptr; }
  // Moves bytes waiting for the client out of shared read blocks (see compact_queue); returns how many.
  size_t compact(ReadArena& arena) { return compact_queue(to_client_, 0, arena); }
  StreamId stream_id() const { return id_; }
  // Bulk reads may go to `reader` while `clock` says a small exchange is active (see BulkReader).
  void offload_to(BulkReader* reader, InteractiveClock* clock) {
    bulk_reader_ = reader;
    clock_ = clock;
  }

  // StreamSink
  void on_open_result(const Error* error) override;
  void on_data(Slice data) override;
  void on_fin() override;
  void on_reset(const Error& error) override;
  void on_writable() override;
  void on_closed() override;

 private:
  void on_poll(int status, int events);
  enum class ReadOutcome { kMore, kDrained, kEof, kFailed };
  void read_client();
  ReadOutcome copy_client(size_t capacity);
  ReadOutcome splice_client(size_t capacity);
  // Hands the next read to the BulkReader; false if it cannot take it (the read then happens here).
  bool offload_read(size_t capacity);
  void on_offloaded_read(Slice bytes, int error);
  void write_client();
  void update_interest();
  void abort(const std::string& why);
  void finish();

  ReadArena& arena_;
  BridgeOwner& owner_;
  BridgeOptions options_;
  Poller poller_;
  Session* session_ = nullptr;
  StreamId id_ = 0;
  std::shared_ptr<Pipe> pipe_;   // set once the stream carries a bulk transfer (see copy_client)
  std::deque<Slice> to_client_;  // stream bytes waiting for the client socket
  bool stream_live_ = false;     // the stream exists in the mux
  bool client_eof_ = false;      // the client half-closed (we sent FIN)
  bool peer_fin_ = false;        // the guest side half-closed
  bool client_shut_ = false;     // we shut down the client socket's write side
  bool draining_error_ = false;  // an error answer is being written; discard client input
  bool done_ = false;

  BulkReader* bulk_reader_ = nullptr;
  InteractiveClock* clock_ = nullptr;
  bool send_buffer_widened_ = false;  // widen_send_buffer_if_unix was called for the client socket
  bool bulk_ = false;                 // a read filled its buffer: this stream carries a bulk transfer
  uint64_t offloaded_read_ = 0;       // the BulkReader's token while a read is there
};

}  // namespace vbridge
