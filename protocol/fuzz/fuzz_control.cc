// CONTROL payloads through the Mux to on_control, where the handler reads every field.
//
// Input: u8 mode | u8 split | rest
//   mode % 4 == 0  rest is a raw CONTROL payload on stream 0
//   mode % 4 == 1  rest is a raw CONTROL payload on stream 1, which the host opened
//   mode % 4 == 2  rest is a raw CONTROL payload on stream 2, which the guest opened (the open's answer)
//   mode % 4 == 3  rest describes a PORTS, FILE_EVENTS, STATS or GOAWAY message, built with the FlatBuffers
//                  builder and sent by a host Mux
//   split          where the raw frame is cut between two feeds
//
// Invariants: no crash or sanitizer report; the mux refuses what the verifier refuses and messages without
// a body; a verified connection-level message on stream 0 reaches on_control once, with the same content;
// a built message arrives intact.
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "protocol/fuzz/fuzz_util.h"
#include "protocol/mux.h"

namespace vbridge::fuzz {
namespace {

class App final : public MuxHandler {
 public:
  Mux* mux = nullptr;
  std::vector<uint64_t> controls;  // digests of what on_control saw
  size_t goaways = 0;

  void on_ready(const Hello&) override {}
  void on_open(StreamId id, const wire::Target&) override { mux->accept(id); }
  void on_open_result(StreamId, const Error*) override {}
  void on_data(StreamId id, Slice data) override { mux->consume(id, data.size()); }
  void on_fin(StreamId) override {}
  void on_reset(StreamId, const Error&) override {}
  void on_writable(StreamId) override {}
  void on_closed(StreamId) override {}
  void on_control(const wire::Control& message) override { controls.push_back(walk_control(message)); }
  void on_goaway(const std::string&) override { ++goaways; }
  void on_pong(uint64_t) override {}
};

// Everything `from` has to send, as bytes.
std::vector<std::byte> drain(Mux& from) {
  std::vector<std::byte> out;
  iovec iov[64];
  while (size_t n = from.prepare_output(iov)) {
    size_t total = 0;
    for (size_t i = 0; i < n; ++i) {
      const auto* p = static_cast<const std::byte*>(iov[i].iov_base);
      out.insert(out.end(), p, p + iov[i].iov_len);
      total += iov[i].iov_len;
    }
    from.consume_output(total);
  }
  return out;
}

Status feed_all(Mux& to, GuardedFeed& feed, std::span<const std::byte> bytes) {
  for (size_t pos = 0; pos < bytes.size(); pos += GuardedFeed::kMax) {
    const size_t n = std::min(GuardedFeed::kMax, bytes.size() - pos);
    if (Status st = to.feed(feed.slice(bytes.subspan(pos, n))); !st) return st;
  }
  return {};
}

flatbuffers::Offset<flatbuffers::String> string_from(flatbuffers::FlatBufferBuilder& b, ByteReader& in) {
  const auto bytes = in.bytes(in.u8() % 48);
  return b.CreateString(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

std::optional<flatbuffers::Offset<flatbuffers::String>> maybe_string(flatbuffers::FlatBufferBuilder& b,
                                                                     ByteReader& in) {
  if (in.u8() & 1) return std::nullopt;
  return string_from(b, in);
}

// Builds a connection-level control message from the input.
void build(flatbuffers::FlatBufferBuilder& b, ByteReader& in) {
  const auto listeners = [&](size_t n) {
    std::vector<flatbuffers::Offset<wire::Listener>> out;
    for (size_t k = 0; k < n; ++k) {
      const auto proto = static_cast<wire::Proto>(in.u8() % 3);
      const uint8_t f = in.u8() % 3;
      const auto family = f == 0 ? wire::Family::Unspec : f == 1 ? wire::Family::Inet4 : wire::Family::Inet6;
      const auto address = maybe_string(b, in);
      const uint16_t port = in.u16();
      out.push_back(wire::CreateListener(b, proto, family, address.value_or(0), port));
    }
    return out;
  };
  switch (in.u8() % 4) {
    case 0: {
      const auto added = listeners(in.u8() % 32);
      const auto removed = listeners(in.u8() % 32);
      const bool full = in.u8() & 1;
      const auto added_v = b.CreateVector(added);
      const auto removed_v = in.u8() & 1 ? b.CreateVector(removed) : 0;
      b.Finish(wire::CreateControl(b, wire::Message::Ports,
                                   wire::CreatePorts(b, added_v, removed_v, full).Union()));
      return;
    }
    case 1: {
      const auto share = maybe_string(b, in);
      std::vector<flatbuffers::Offset<wire::FileEvent>> events;
      for (size_t k = in.u8() % 32; k > 0; --k) {
        const auto kind = static_cast<wire::FileEventKind>(in.u8() % 5);
        const auto path = maybe_string(b, in);
        const auto old_path = maybe_string(b, in);
        const uint8_t bits = in.u8();
        events.push_back(wire::CreateFileEvent(b, kind, path.value_or(0), old_path.value_or(0), bits & 1,
                                               (bits & 2) != 0));
      }
      const auto events_v = b.CreateVector(events);
      const uint64_t seq = in.u32();
      b.Finish(wire::CreateControl(b, wire::Message::FileEvents,
                                   wire::CreateFileEvents(b, share.value_or(0), events_v, seq).Union()));
      return;
    }
    case 2: {
      std::vector<flatbuffers::Offset<wire::Counter>> counters;
      for (size_t k = in.u8() % 16; k > 0; --k) {
        const auto name = string_from(b, in);
        counters.push_back(wire::CreateCounter(b, name, uint64_t{in.u32()} << 8 | in.u8()));
      }
      const auto v = b.CreateVector(counters);
      b.Finish(wire::CreateControl(b, wire::Message::Stats, wire::CreateStats(b, v).Union()));
      return;
    }
    default: {
      const auto message = maybe_string(b, in);
      b.Finish(wire::CreateControl(b, wire::Message::GoAway,
                                   wire::CreateGoAway(b, in.u32(), message.value_or(0)).Union()));
      return;
    }
  }
}

bool connection_level(wire::Message type) {
  return type == wire::Message::Ports || type == wire::Message::FileEvents || type == wire::Message::Stats ||
         type == wire::Message::GoAway;
}

}  // namespace
}  // namespace vbridge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace vbridge;
  using namespace vbridge::fuzz;
  ByteReader in(data, size);
  const uint8_t mode = in.u8() % 4;
  const uint8_t split = in.u8();

  GuardedFeed feed;  // outlives the muxes
  App host_app, guest_app;
  Mux host(Role::kHost, host_app);
  Mux guest(Role::kGuest, guest_app);
  host_app.mux = &host;
  guest_app.mux = &guest;
  // Handshake both ways.
  FUZZ_CHECK(feed_all(guest, feed, drain(host)).ok());
  FUZZ_CHECK(feed_all(host, feed, drain(guest)).ok());

  if (mode == 3) {
    flatbuffers::FlatBufferBuilder b;
    build(b, in);
    const uint64_t expect = walk_control(*wire::GetControl(b.GetBufferPointer()));
    const bool goaway = wire::GetControl(b.GetBufferPointer())->message_type() == wire::Message::GoAway;
    host.send_control(b);
    FUZZ_CHECK(feed_all(guest, feed, drain(host)).ok());
    if (goaway) {
      FUZZ_CHECK(guest_app.goaways == 1 && guest_app.controls.empty());
    } else {
      FUZZ_CHECK(guest_app.controls.size() == 1 && guest_app.controls[0] == expect);
    }
    return 0;
  }

  StreamId id = 0;
  if (mode == 1) {
    wire::TargetT t;
    t.proto = wire::Proto::Unix;
    t.path = "/run/fuzz.sock";
    id = *host.open(t);
    FUZZ_CHECK(feed_all(guest, feed, drain(host)).ok());
  } else if (mode == 2) {
    wire::TargetT t;
    t.proto = wire::Proto::Tcp;
    t.port = 80;
    id = *guest.open(t);
    (void)drain(guest);
  }

  // The raw frame, in an exact-size allocation for the verifier run below.
  const auto payload = in.rest();
  std::vector<std::byte> frame(kFrameHeaderSize + payload.size());
  encode_header(FrameHeader{static_cast<uint32_t>(payload.size()), id, FrameType::kControl, 0}, frame.data());
  if (!payload.empty()) std::memcpy(frame.data() + kFrameHeaderSize, payload.data(), payload.size());
  const size_t cut = std::min<size_t>(split, frame.size());
  Status st = guest.feed(feed.slice(std::span(frame).first(cut)));
  if (st) st = feed_all(guest, feed, std::span(frame).subspan(cut));

  // The verifier decides what the mux accepts; check the mux agreed.
  std::unique_ptr<uint8_t[]> copy(new uint8_t[payload.size() + 1]);
  if (!payload.empty()) std::memcpy(copy.get(), payload.data(), payload.size());
  flatbuffers::Verifier verifier(copy.get(), payload.size(), 16, 200000);
  const bool valid = wire::VerifyControlBuffer(verifier);
  if (!valid) {
    FUZZ_CHECK(!st.ok());
    return 0;
  }
  const wire::Control* control = wire::GetControl(copy.get());
  const wire::Message type = control->message_type();
  if (control->message() == nullptr) {
    FUZZ_CHECK(!st.ok());  // a union type without its table is refused
    return 0;
  }
  if (id == 0 && connection_level(type)) {
    FUZZ_CHECK(st.ok());
    if (type == wire::Message::GoAway) {
      FUZZ_CHECK(guest_app.goaways == 1 && guest_app.controls.empty());
    } else {
      FUZZ_CHECK(guest_app.controls.size() == 1 && guest_app.controls[0] == walk_control(*control));
    }
  } else if (id == 0 || connection_level(type)) {
    FUZZ_CHECK(!st.ok());  // a stream message on stream 0, or a connection message on a stream
  }
  return 0;
}
