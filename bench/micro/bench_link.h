// Two Muxes joined back to back for benchmarks, with one stream open between them. Unlike the test pump,
// the receiver's transport buffer is a single pool buffer reused for every feed, so a benchmark pays for
// the protocol core and, where it copies at all, for one memcpy per byte (what a socket read would cost).
#pragma once

#include <cstdint>

#include "protocol/mux.h"

namespace vbridge::bench {

// Accepts every stream and consumes every byte at once, keeping nothing.
class SinkHandler final : public MuxHandler {
 public:
  Mux* mux = nullptr;
  uint64_t bytes = 0;
  uint64_t frames = 0;

  void on_ready(const Hello&) override {}
  void on_open(StreamId id, const wire::Target&) override { mux->accept(id); }
  void on_open_result(StreamId, const Error*) override {}
  void on_data(StreamId id, Slice data) override {
    bytes += data.size();
    ++frames;
    mux->consume(id, data.size());
  }
  void on_fin(StreamId) override {}
  void on_reset(StreamId, const Error&) override {}
  void on_writable(StreamId) override {}
  void on_closed(StreamId) override {}
  void on_control(const wire::Control&) override {}
  void on_goaway(const std::string&) override {}
  void on_pong(uint64_t) override {}
};

struct Link {
  BufferPool pool;     // the applications' buffers
  BufferPool rx_pool;  // holds the receiver's transport buffer
  Slice rx;            // the receiver's transport buffer, reused for every feed
  Slice back;          // the sender's transport buffer, for what flows back (credit, answers)
  SinkHandler sender_handler, receiver_handler;
  Mux sender, receiver;
  StreamId stream = 0;

  // rx_size: bytes the receiver's transport buffer holds (at least one whole frame for the bulk cases).
  explicit Link(MuxConfig config = {}, size_t rx_size = 256 * 1024);
  ~Link();
  // Opens another stream from sender to receiver and settles the exchange.
  StreamId open();
  // One transport write and read: copies what one prepare_output() of `from` offers through the peer's
  // transport buffer into `to`. Returns the bytes moved.
  size_t move_once(Mux& from, Mux& to);
  // move_once() until `from` has nothing left.
  void move(Mux& from, Mux& to) {
    while (move_once(from, to) > 0) {
    }
  }
  void settle();
};

}  // namespace vbridge::bench
