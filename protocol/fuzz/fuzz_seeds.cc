// Writes the seed corpora of the protocol fuzz targets: real traffic from a Mux pair for fuzz_decoder,
// short operation scripts for fuzz_mux_pair, and encoded control messages for fuzz_control.
// Usage: fuzz_seeds OUTDIR   (creates OUTDIR/<target>/<name>)
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "protocol/mux.h"
#include "protocol/mux_test_util.h"

namespace vbridge {
namespace {

namespace fs = std::filesystem;
using testing::Pair;

fs::path g_out;

void write(const std::string& target, const std::string& name, const std::string& bytes) {
  const fs::path dir = g_out / target;
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string str(const flatbuffers::FlatBufferBuilder& b) {
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

std::string u16(uint16_t v) { return std::string{static_cast<char>(v & 0xff), static_cast<char>(v >> 8)}; }

// ---- fuzz_decoder: u8 flags | u8 split | u16 seed | wire ----

std::string decoder_input(uint8_t flags, uint8_t split, uint16_t seed, const std::string& wire) {
  return std::string{static_cast<char>(flags), static_cast<char>(split)} + u16(seed) + wire;
}

// Everything a host sends after its HELLO (the decoder's flag 0x01 prepends a HELLO of its own), while a
// guest answers. The script moves host bytes with `to_guest`, so they are recorded too.
struct Traffic {
  Pair p;
  std::string captured;
  explicit Traffic(MuxConfig config = {}) : p(config) {
    (void)testing::drain(p.host);
    to_host();
  }
  void to_guest() {
    const std::string bytes = testing::drain(p.host);
    captured += bytes;
    for (size_t pos = 0; pos < bytes.size(); pos += p.pool.block_size()) {
      (void)p.guest.feed(testing::to_slice(p.pool, std::string_view(bytes).substr(pos, p.pool.block_size())));
    }
  }
  void to_host() { testing::pump(p.guest, p.host, p.pool); }
};

std::string host_traffic(const std::function<void(Traffic&)>& script, MuxConfig config = {}) {
  Traffic t(config);
  script(t);
  t.to_guest();
  return t.captured;
}

flatbuffers::FlatBufferBuilder ports_message() {
  flatbuffers::FlatBufferBuilder b;
  std::vector<flatbuffers::Offset<wire::Listener>> added{
      wire::CreateListener(b, wire::Proto::Tcp, wire::Family::Inet4, b.CreateString("0.0.0.0"), 8080),
      wire::CreateListener(b, wire::Proto::Udp, wire::Family::Inet6, b.CreateString("::1"), 53)};
  std::vector<flatbuffers::Offset<wire::Listener>> removed{
      wire::CreateListener(b, wire::Proto::Tcp, wire::Family::Inet4, b.CreateString("127.0.0.1"), 3000)};
  b.Finish(wire::CreateControl(
      b, wire::Message::Ports,
      wire::CreatePorts(b, b.CreateVector(added), b.CreateVector(removed), false).Union()));
  return b;
}

flatbuffers::FlatBufferBuilder file_events_message() {
  flatbuffers::FlatBufferBuilder b;
  std::vector<flatbuffers::Offset<wire::FileEvent>> events{
      wire::CreateFileEvent(b, wire::FileEventKind::Create, b.CreateString("src/main.cc"), 0, false),
      wire::CreateFileEvent(b, wire::FileEventKind::Rename, b.CreateString("b"), b.CreateString("a"), true),
      wire::CreateFileEvent(b, wire::FileEventKind::Delete, b.CreateString("tmp"), 0, true),
      wire::CreateFileEvent(b, wire::FileEventKind::Modify, b.CreateString(""), 0, true, true)};
  b.Finish(wire::CreateControl(
      b, wire::Message::FileEvents,
      wire::CreateFileEvents(b, b.CreateString("home"), b.CreateVector(events), 3).Union()));
  return b;
}

flatbuffers::FlatBufferBuilder stats_message() {
  flatbuffers::FlatBufferBuilder b;
  std::vector<flatbuffers::Offset<wire::Counter>> counters{
      wire::CreateCounter(b, b.CreateString("frames_in"), 42)};
  b.Finish(
      wire::CreateControl(b, wire::Message::Stats, wire::CreateStats(b, b.CreateVector(counters)).Union()));
  return b;
}

flatbuffers::FlatBufferBuilder goaway_message() {
  flatbuffers::FlatBufferBuilder b;
  b.Finish(
      wire::CreateControl(b, wire::Message::GoAway, wire::CreateGoAway(b, 7, b.CreateString("bye")).Union()));
  return b;
}

void decoder_seeds() {
  const std::string simple = host_traffic([](Traffic& t) {
    Pair& p = t.p;
    const StreamId id = *p.host.open(testing::unix_target("/run/docker.sock"));
    (void)p.host.send(id, testing::text_slice(p.pool, "GET /_ping HTTP/1.1\r\n\r\n"));
    p.host.ping(7);
    p.host.shutdown_write(id);
  });
  write("fuzz_decoder", "simple", decoder_input(0x01, 0, 1, simple));
  write("fuzz_decoder", "simple_bytewise", decoder_input(0x01, 1, 2, simple));
  // Resync: the tail of an old session's DATA frame, then the HELLO, then traffic.
  const std::string stale = std::string("\x40\x00\x00\x00\x03\x00\x00\x00\x01\x00\x00\x00", 12) + "old bytes";
  write("fuzz_decoder", "resync",
        decoder_input(0x01 | 0x20 | 0x80, 3, 11, static_cast<char>(stale.size()) + stale + simple));
  write("fuzz_decoder", "resync_limit",
        decoder_input(0x01 | 0x20 | 0x40 | 0x80, 1, 12, static_cast<char>(stale.size()) + stale + simple));

  Pair whole;
  const StreamId id = *whole.host.open(testing::unix_target("/s"));
  (void)whole.host.send(id, testing::text_slice(whole.pool, "hello"));
  testing::pump(whole.guest, whole.host, whole.pool);
  write("fuzz_decoder", "with_hello", decoder_input(0x00, 9, 3, testing::drain(whole.host)));

  const std::string bulk = host_traffic([](Traffic& t) {
    Pair& p = t.p;
    for (int k = 0; k < 3; ++k) {
      const StreamId s = *p.host.open(testing::unix_target("/bulk"));
      (void)p.host.send(s,
                        testing::to_slice(p.pool, std::string(3000 + k * 1000, static_cast<char>('a' + k))));
      if (k == 1) p.host.reset(s, "client went away");
    }
  });
  write("fuzz_decoder", "bulk_split", decoder_input(0x01, 7, 4, bulk));
  write("fuzz_decoder", "bulk_small_limits", decoder_input(0x01 | 0x02 | 0x04, 5, 5, bulk));
  write("fuzz_decoder", "bulk_two_streams", decoder_input(0x01 | 0x08 | 0x10, 12, 6, bulk));

  const std::string control = host_traffic([](Traffic& t) {
    Pair& p = t.p;
    p.host.send_control(ports_message());
    p.host.send_control(file_events_message());
    p.host.send_control(stats_message());
    p.host.goaway("host agent restarting");
  });
  write("fuzz_decoder", "control", decoder_input(0x01, 0, 7, control));

  // Credit returns and FIN/RST in both directions: the guest sends, the host consumes and answers.
  MuxConfig small;
  small.initial_window = 4096;
  const std::string credit = host_traffic(
      [](Traffic& t) {
        Pair& p = t.p;
        const StreamId s = *p.host.open(testing::unix_target("/echo"));
        t.to_guest();
        (void)p.guest.send(s, testing::to_slice(p.pool, std::string(4096, 'e')));
        t.to_host();
        (void)p.host.send(s, testing::to_slice(p.pool, std::string(100, 'h')));
        p.host.shutdown_write(s);
        const StreamId r = *p.host.open(testing::unix_target("/gone"));
        p.host.reset(r, "");
        t.to_guest();
        t.to_host();
        p.host.ping(99);
      },
      small);
  write("fuzz_decoder", "credit", decoder_input(0x01 | 0x02, 3, 8, credit));

  write("fuzz_decoder", "http", decoder_input(0x00, 0, 9, "GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n"));
  write("fuzz_decoder", "empty_after_hello", decoder_input(0x01, 0, 10, ""));
}

// ---- fuzz_mux_pair: u8 flags | u16 seed | ops ----

enum Op : uint8_t {
  kOpen,
  kSend,
  kShutdown,
  kReset,
  kConsume,
  kPing,
  kGoaway,
  kPump,
  kSettle,
  kAnswer,
  kToggle,
  kControl
};
enum Size : uint8_t { k1, k7, k64, k100, k512, k1500, k4K, k16K, k64K, k100K, k256K, k300K, k1M };

std::string ops(std::initializer_list<int> bytes) {
  std::string out;
  for (const int b : bytes) out += static_cast<char>(b);
  return out;
}

void pair_seeds() {
  const auto a = [](int side, int arg) { return side | (arg << 1); };
  // Open, exchange, close both ways.
  write("fuzz_mux_pair", "echo",
        ops({0x00, 1, 0}) + ops({kOpen,     a(0, 5), kSettle,     0,       255,     kSend, a(0, k64),
                                 0,         kSend,   a(1, k1500), 0,       kSettle, 0,     64,
                                 kShutdown, a(0, 0), kShutdown,   a(1, 0), kSettle, 0,     255}));
  // Bulk with small windows and frames, partial writes, a stalled reader.
  write("fuzz_mux_pair", "bulk_small_window",
        ops({0x01 | 0x02 | 0x04 | 0x08, 2, 0}) +
            ops({kOpen,   a(0, 1),     kOpen,   a(0, 2), kToggle, a(1, 2), kSend, a(0, k1M), 0,
                 kSend,   a(0, k300K), 1,       kPump,   a(0, 3), 0x10,    0x00,  7,         kPump,
                 a(1, 0), 0xff,        0x00,    3,       kSettle, 0,       200,   kConsume,  a(1, 0),
                 k16K,    kToggle,     a(1, 2), kSettle, 1,       255}));
  // Resets and shutdowns from inside callbacks, with transport writes from callbacks.
  write("fuzz_mux_pair", "callbacks_act",
        ops({0x40 | 0x01, 3, 0}) +
            ops({kOpen, a(0, 0), kOpen,  a(1, 0), kSend, a(0, k100K), 0, kSend,   a(1, k64K), 0,  kSettle,
                 0,     16,      kReset, a(0, 0), kSend, a(1, k4K),   1, kSettle, 0,          255}));
  // The connection-wide cap shared by two streams.
  write("fuzz_mux_pair", "max_buffered",
        ops({0x10 | 0x01, 4, 0}) +
            ops({kOpen, a(0, 0), kOpen,      a(0, 1), kSettle, 0, 255, kToggle,  a(1, 2), kSend, a(0, k64K),
                 0,     kSend,   a(0, k64K), 1,       kSettle, 0, 255, kConsume, a(1, 0), k64K,  kSettle,
                 0,     255,     kToggle,    a(1, 2), kSettle, 0, 255}));
  // Deferred answers, refusals, goaway, ping, control, few iovecs.
  write("fuzz_mux_pair", "answers",
        ops({0x80 | 0x20, 5, 0}) + ops({kToggle,
                                        a(1, 1),
                                        kOpen,
                                        a(0, 0),
                                        kOpen,
                                        a(0, 0),
                                        kOpen,
                                        a(0, 0),
                                        kOpen,
                                        a(0, 0),
                                        kSend,
                                        a(0, k512),
                                        0,
                                        kShutdown,
                                        a(0, 0),
                                        kSettle,
                                        0,
                                        255,
                                        kAnswer,
                                        a(1, 0),
                                        0,
                                        kAnswer,
                                        a(1, 1),
                                        1,
                                        kPing,
                                        0,
                                        9,
                                        kControl,
                                        a(1, 1 | 2 << 1),
                                        kControl,
                                        a(0, 2 << 1),
                                        kGoaway,
                                        1,
                                        kOpen,
                                        a(0, 0),
                                        kSettle,
                                        0,
                                        3}));
  // Data and FIN before the handshake finished.
  write("fuzz_mux_pair", "before_hello",
        ops({0x00, 6, 0}) +
            ops({kOpen, a(0, 0), kSend, a(0, k4K), 0,    kShutdown, a(0, 0), kPump,   a(0, 0), 0x20,
                 0,     1,       kPump, a(1, 0),   0xff, 0xff,      255,     kSettle, 0,       255}));
}

// ---- fuzz_control: u8 mode | u8 split | rest ----

void control_seeds() {
  const auto raw = [](uint8_t mode, uint8_t split, const std::string& payload) {
    return std::string{static_cast<char>(mode), static_cast<char>(split)} + payload;
  };
  write("fuzz_control", "ports", raw(0, 12, str(ports_message())));
  write("fuzz_control", "file_events", raw(0, 40, str(file_events_message())));
  write("fuzz_control", "stats", raw(0, 5, str(stats_message())));
  write("fuzz_control", "goaway", raw(0, 0, str(goaway_message())));
  {
    flatbuffers::FlatBufferBuilder b;
    wire::TargetT t = testing::unix_target("/x");
    b.Finish(
        wire::CreateControl(b, wire::Message::Open, wire::CreateOpen(b, wire::Target::Pack(b, &t)).Union()));
    write("fuzz_control", "open_on_stream_1", raw(1, 20, str(b)));
  }
  {
    flatbuffers::FlatBufferBuilder b;
    b.Finish(wire::CreateControl(b, wire::Message::OpenOk, wire::CreateOpenOk(b).Union()));
    write("fuzz_control", "open_ok", raw(2, 12, str(b)));
  }
  {
    flatbuffers::FlatBufferBuilder b;
    b.Finish(
        wire::CreateControl(b, wire::Message::OpenFail,
                            wire::CreateOpenFail(b, 2, b.CreateString("No such file or directory")).Union()));
    write("fuzz_control", "open_fail", raw(2, 30, str(b)));
  }
  // Built messages: kind, then the fields build() reads.
  write("fuzz_control", "build_ports",
        raw(3, 0,
            ops({0, 2, 1, 1, 0, 9}) + "127.0.0.1" + ops({0x50, 0x1f, 0, 2, 1, 3}) + "::1" +
                ops({53, 0, 1, 1, 0, 1, 1})));
  write("fuzz_control", "build_file_events",
        raw(3, 0, ops({1, 0, 4}) + "home" + ops({2, 3, 0, 5}) + "a/b/c" + ops({0, 3}) + "a/b" + ops({1})));
  write("fuzz_control", "build_stats", raw(3, 0, ops({2, 1, 9}) + "bytes_out" + ops({1, 2, 3, 4, 5})));
  write("fuzz_control", "build_goaway", raw(3, 0, ops({3, 0, 3}) + "bye" + ops({1, 0, 0, 0})));
}

}  // namespace
}  // namespace vbridge

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
    return 2;
  }
  vbridge::g_out = argv[1];
  vbridge::decoder_seeds();
  vbridge::pair_seeds();
  vbridge::control_seeds();
  return 0;
}
