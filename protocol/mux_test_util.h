// Test helpers: a handler that records what the mux reported, and a pair of muxes joined back to back.
#pragma once

#include <string>
#include <vector>

#include "protocol/mux.h"

namespace vbridge::testing {

struct Event {
  std::string
      kind;  // ready, open, open_ok, open_fail, data, fin, reset, writable, closed, control, goaway, pong
  StreamId id = 0;
  std::string text;  // data bytes, target path, error message
  bool operator==(const Event&) const = default;
};

class RecordingHandler : public MuxHandler {
 public:
  Mux* mux = nullptr;
  std::vector<Event> events;
  bool auto_accept = true;
  bool auto_consume = true;
  std::vector<Slice>* keep = nullptr;  // when set, received Slices are kept here instead of dropped
  std::string data_of(StreamId id) const;
  size_t count(const std::string& kind) const;

  void on_ready(const Hello&) override { events.push_back({"ready"}); }
  void on_open(StreamId id, const wire::Target& target) override;
  void on_open_result(StreamId id, const Error* error) override {
    events.push_back({error ? "open_fail" : "open_ok", id, error ? error->message : ""});
  }
  void on_data(StreamId id, Slice data) override;
  void on_fin(StreamId id) override { events.push_back({"fin", id}); }
  void on_reset(StreamId id, const Error& e) override { events.push_back({"reset", id, e.message}); }
  void on_writable(StreamId id) override { events.push_back({"writable", id}); }
  void on_closed(StreamId id) override { events.push_back({"closed", id}); }
  void on_control(const wire::Control& c) override {
    events.push_back({"control", 0, wire::EnumNameMessage(c.message_type())});
  }
  void on_goaway(const std::string& m) override { events.push_back({"goaway", 0, m}); }
  void on_pong(uint64_t token) override { events.push_back({"pong", 0, std::to_string(token)}); }
};

// Copies everything `from` has to send into pool buffers and feeds it to `to`, in chunks of at most
// `chunk` bytes. Returns the bytes moved; stops at the first feed error.
size_t pump(Mux& from, Mux& to, BufferPool& pool, size_t chunk = 1 << 20, Status* status = nullptr);
// Collects everything `from` has to send as one byte string (for re-split and malformed-input tests).
std::string drain(Mux& from);
// Wraps bytes into a Slice.
Slice to_slice(BufferPool& pool, std::string_view bytes);
Slice text_slice(BufferPool& pool, std::string_view text);

struct Pair {
  BufferPool pool{256 * 1024, 64};
  RecordingHandler host_handler, guest_handler;
  Mux host, guest;
  explicit Pair(MuxConfig config = {});
  // Moves bytes both ways until neither side has anything to send.
  void settle(size_t chunk = 1 << 20);
};

wire::TargetT unix_target(const std::string& path);

}  // namespace vbridge::testing
