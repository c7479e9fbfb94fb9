#include "protocol/mux.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "protocol/mux_test_util.h"

namespace vbridge {
namespace {

using testing::Event;
using testing::Pair;
using testing::text_slice;
using testing::unix_target;

StreamId open_stream(Pair& p, const std::string& path = "/run/docker.sock") {
  auto id = p.host.open(unix_target(path));
  EXPECT_TRUE(id.ok());
  p.settle();
  return *id;
}

TEST(Mux, HandshakeCompletesBothWays) {
  Pair p;
  p.settle();
  EXPECT_TRUE(p.host.ready());
  EXPECT_TRUE(p.guest.ready());
  EXPECT_EQ(p.host_handler.events, std::vector<Event>{{"ready"}});
}

TEST(Mux, HostOpensOddIdsGuestEven) {
  Pair p;
  p.settle();
  EXPECT_EQ(*p.host.open(unix_target("/a")), 1u);
  EXPECT_EQ(*p.host.open(unix_target("/b")), 3u);
  EXPECT_EQ(*p.guest.open(unix_target("/c")), 2u);
}

TEST(Mux, OpenAcceptExchangeAndCloseBothDirections) {
  Pair p;
  const StreamId id = open_stream(p);
  EXPECT_EQ(p.guest_handler.events[1], (Event{"open", id, "/run/docker.sock"}));
  EXPECT_EQ(p.host_handler.events[1], (Event{"open_ok", id}));
  EXPECT_EQ(p.host.stream_state(id), StreamState::kOpen);

  ASSERT_TRUE(p.host.send(id, text_slice(p.pool, "GET /_ping")));
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id), "GET /_ping");

  // Host half-closes: guest sees FIN, can still answer.
  p.host.shutdown_write(id);
  p.settle();
  EXPECT_EQ(p.host.stream_state(id), StreamState::kHalfClosedLocal);
  EXPECT_EQ(p.guest.stream_state(id), StreamState::kHalfClosedRemote);
  EXPECT_EQ(p.guest_handler.count("fin"), 1u);
  EXPECT_FALSE(p.host.send(id, text_slice(p.pool, "late")));

  ASSERT_TRUE(p.guest.send(id, text_slice(p.pool, "OK")));
  p.guest.shutdown_write(id);
  p.settle();
  EXPECT_EQ(p.host_handler.data_of(id), "OK");
  EXPECT_EQ(p.host_handler.count("closed"), 1u);
  EXPECT_EQ(p.guest_handler.count("closed"), 1u);
  EXPECT_FALSE(p.host.has_stream(id));
  EXPECT_FALSE(p.guest.has_stream(id));
  EXPECT_EQ(p.host.stream_count(), 0u);
}

TEST(Mux, GuestHalfClosesFirst) {
  Pair p;
  const StreamId id = open_stream(p);
  p.guest.shutdown_write(id);
  p.settle();
  EXPECT_EQ(p.guest.stream_state(id), StreamState::kHalfClosedLocal);
  EXPECT_EQ(p.host.stream_state(id), StreamState::kHalfClosedRemote);
  ASSERT_TRUE(p.host.send(id, text_slice(p.pool, "still flowing")));
  p.host.shutdown_write(id);
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id), "still flowing");
  EXPECT_FALSE(p.host.has_stream(id));
}

TEST(Mux, DataAndFinBeforeOpenAnswerArriveInOrder) {
  // `echo hi | docker exec -i` writes and half-closes before the guest has dialled.
  Pair p;
  p.settle();
  p.guest_handler.auto_accept = false;
  const StreamId id = *p.host.open(unix_target("/s"));
  ASSERT_TRUE(p.host.send(id, text_slice(p.pool, "hi\n")));
  p.host.shutdown_write(id);
  p.settle();
  EXPECT_EQ(p.guest.stream_state(id), StreamState::kAccepting);
  EXPECT_EQ(p.guest_handler.data_of(id), "hi\n");
  EXPECT_EQ(p.guest_handler.count("fin"), 1u);
  p.guest.accept(id);
  ASSERT_TRUE(p.guest.send(id, text_slice(p.pool, "hi\n")));
  p.guest.shutdown_write(id);
  p.settle();
  EXPECT_EQ(p.host_handler.data_of(id), "hi\n");
  EXPECT_EQ(p.host_handler.count("closed"), 1u);
}

TEST(Mux, RejectReportsErrnoAndMessage) {
  Pair p;
  p.settle();
  p.guest_handler.auto_accept = false;
  const StreamId id = *p.host.open(unix_target("/nope.sock"));
  p.settle();
  p.guest.reject(id, ENOENT, "guest socket /nope.sock: No such file or directory");
  p.settle();
  EXPECT_EQ(p.host_handler.events.back(),
            (Event{"open_fail", id, "guest socket /nope.sock: No such file or directory"}));
  EXPECT_FALSE(p.host.has_stream(id));
  EXPECT_FALSE(p.guest.has_stream(id));
}

TEST(Mux, ResetEndsStreamOnBothSidesAndDropsQueuedData) {
  Pair p;
  const StreamId id = open_stream(p);
  ASSERT_TRUE(p.host.send(id, text_slice(p.pool, "never sent")));
  p.host.reset(id, "client went away");
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id), "");
  EXPECT_EQ(p.guest_handler.events.back(), (Event{"reset", id, "peer reset the stream: client went away"}));
  EXPECT_FALSE(p.guest.has_stream(id));
  EXPECT_EQ(p.host.buffered_bytes(), 0u);
}

TEST(Mux, ResetRacingDataIsDroppedQuietly) {
  Pair p;
  const StreamId id = open_stream(p);
  ASSERT_TRUE(p.guest.send(id, text_slice(p.pool, "in flight")));
  p.host.reset(id, "bye");
  testing::pump(p.guest, p.host, p.pool);  // the guest's data crosses the host's RST on the wire
  p.settle();
  EXPECT_EQ(p.host_handler.data_of(id), "");
  EXPECT_EQ(p.host.counters().data_for_closed_stream, 9u);
  EXPECT_FALSE(p.host.failure().has_value());
}

TEST(Mux, WindowExhaustionStopsSenderAndRefillWakesIt) {
  MuxConfig c;
  c.initial_window = 64 * 1024;
  Pair p(c);
  const StreamId id = open_stream(p);
  p.guest_handler.auto_consume = false;
  EXPECT_EQ(p.host.send_capacity(id), 64u * 1024);
  Slice block = p.pool.acquire().sub(0, 64 * 1024);
  ASSERT_TRUE(p.host.send(id, block));
  EXPECT_EQ(p.host.send_capacity(id), 0u);
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id).size(), 64u * 1024);
  EXPECT_EQ(p.host.send_capacity(id), 0u);
  // Bytes beyond the window wait in the sender.
  ASSERT_TRUE(p.host.send(id, text_slice(p.pool, "x")));
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id).size(), 64u * 1024);
  // The receiver consumes: credit returns, the waiting byte goes, the sender hears it may read again.
  p.guest.consume(id, 64 * 1024);
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id).size(), 64u * 1024 + 1);
  EXPECT_GE(p.host_handler.count("writable"), 1u);
  EXPECT_GT(p.host.send_capacity(id), 0u);
}

TEST(Mux, StalledReaderDoesNotStallOtherStreams) {
  MuxConfig c;
  c.initial_window = 64 * 1024;
  Pair p(c);
  const StreamId stalled = open_stream(p, "/stalled");
  const StreamId lively = open_stream(p, "/lively");
  p.guest_handler.auto_consume = false;
  // Fill the stalled stream's window and more.
  for (int i = 0; i < 4; ++i) (void)p.host.send(stalled, p.pool.acquire().sub(0, 32 * 1024));
  p.settle();
  for (int round = 0; round < 100; ++round) {
    ASSERT_TRUE(p.host.send(lively, text_slice(p.pool, "ping")));
    p.settle();
    p.guest.consume(lively, 4);
  }
  EXPECT_EQ(p.guest_handler.data_of(lively).size(), 400u);
  EXPECT_EQ(p.guest_handler.data_of(stalled).size(), 64u * 1024);
}

TEST(Mux, SmallExchangeInterleavesWithOneGibibyteStream) {
  Pair p;
  const StreamId bulk = open_stream(p, "/bulk");
  const StreamId small = open_stream(p, "/small");
  // Count bulk bytes the guest receives between the small send and its arrival, without storing them.
  struct Counter : testing::RecordingHandler {
    StreamId bulk_id = 0;
    uint64_t bulk_bytes = 0;
    uint64_t bulk_bytes_when_small_arrived = 0;
    void on_data(StreamId id, Slice data) override {
      if (id == bulk_id) {
        bulk_bytes += data.size();
        mux->consume(id, data.size());
        return;
      }
      bulk_bytes_when_small_arrived = bulk_bytes;
      RecordingHandler::on_data(id, data);
    }
  } counter;
  // Swap in the counting handler by building a fresh pair around it is heavy; instead route by hand.
  Mux guest(Role::kGuest, counter);
  Mux host(Role::kHost, p.host_handler);
  counter.mux = &guest;
  counter.bulk_id = 1;
  p.host_handler.mux = &host;
  const StreamId b = *host.open(unix_target("/bulk"));
  const StreamId s = *host.open(unix_target("/small"));
  ASSERT_EQ(b, 1u);
  (void)bulk;
  (void)small;
  Slice block = p.pool.acquire();  // 256 KiB, reused by reference for every send
  const uint64_t total = 1ull << 30;
  uint64_t queued = 0;
  uint64_t small_sent_at = 0, small_seen_at = 0;
  int rounds = 0;
  while (counter.bulk_bytes < total) {
    while (queued < total && host.send_capacity(b) >= block.size()) {
      ASSERT_TRUE(host.send(b, block));
      queued += block.size();
    }
    if (++rounds == 20) {
      ASSERT_TRUE(host.send(s, text_slice(p.pool, std::string(64, 'q'))));
      small_sent_at = counter.bulk_bytes;
    }
    testing::pump(host, guest, p.pool);
    testing::pump(guest, host, p.pool);
    if (small_seen_at == 0 && counter.data_of(s).size() == 64)
      small_seen_at = counter.bulk_bytes_when_small_arrived;
  }
  ASSERT_GT(small_seen_at, 0u);
  // The 64 bytes overtook the bulk stream: at most one watermark plus one quantum of bulk went first.
  EXPECT_LE(small_seen_at - small_sent_at, 1024u * 1024);
  EXPECT_EQ(counter.bulk_bytes, total);
}

TEST(Mux, ConnectionWideCapBoundsQueuedBytes) {
  MuxConfig c;
  c.max_buffered = 100 * 1024;
  Pair p(c);
  const StreamId a = open_stream(p, "/a");
  const StreamId b = open_stream(p, "/b");
  ASSERT_TRUE(p.host.send(a, p.pool.acquire().sub(0, 100 * 1024)));
  EXPECT_EQ(p.host.send_capacity(a), 0u);
  EXPECT_EQ(p.host.send_capacity(b), 0u);
  p.settle();
  EXPECT_GT(p.host.send_capacity(b), 0u);
}

// A stream that never sent anything finds send_capacity at 0 because another stream filled the
// connection-wide cap; it used to wait forever for an on_writable that nothing owed it.
TEST(Mux, StreamBlockedByAnotherStreamsBytesIsWokenWhenTheyDrain) {
  MuxConfig c;
  c.max_buffered = 100 * 1024;
  Pair p(c);
  const StreamId a = open_stream(p, "/a");
  const StreamId b = open_stream(p, "/b");
  ASSERT_TRUE(p.host.send(a, p.pool.acquire().sub(0, 100 * 1024)));
  ASSERT_EQ(p.host.send_capacity(b), 0u);  // the application stops reading b's socket here
  p.settle();
  EXPECT_GT(p.host.send_capacity(b), 0u);
  EXPECT_GE(std::count(p.host_handler.events.begin(), p.host_handler.events.end(), Event{"writable", b}), 1);
}

// Two streams under a 1 MiB connection-wide cap, which `a` fills but for a 16 KiB sliver.
struct SliverUnderTheCap {
  static constexpr size_t kCap = 1024 * 1024;
  static constexpr size_t kSliver = 16 * 1024;
  static MuxConfig config() {
    MuxConfig c;
    c.max_buffered = kCap;
    return c;
  }
  Pair p{config()};
  StreamId a = open_stream(p, "/a");
  StreamId b = open_stream(p, "/b");
  SliverUnderTheCap() {
    for (size_t queued = 0; queued < kCap - kSliver;) {
      const size_t n = std::min<size_t>(p.pool.block_size(), kCap - kSliver - queued);
      EXPECT_TRUE(p.host.send(a, p.pool.acquire().sub(0, n)));
      queued += n;
    }
  }
};

// A sliver of room under the connection-wide cap is no room: a stream given 16 KiB there would read 16 KiB
// into a whole read buffer. Streams stopped by the cap read again once a frame's worth is free.
TEST(Mux, CapGivesNoRoomSmallerThanAFrame) {
  SliverUnderTheCap t;
  EXPECT_EQ(t.p.host.buffered_bytes(), t.kCap - t.kSliver);
  EXPECT_EQ(t.p.host.send_capacity(t.b), 0u);
  t.p.settle();
  EXPECT_GE(t.p.host.send_capacity(t.b), MuxConfig{}.max_frame);
  const auto& events = t.p.host_handler.events;
  EXPECT_GE(std::count(events.begin(), events.end(), Event{"writable", t.b}), 1);
}

// A datagram is sent whole or dropped, never waited for: it may use the sliver under the cap that byte
// streams are denied, and nothing more.
TEST(Mux, ADatagramFitsInTheSliverUnderTheCap) {
  SliverUnderTheCap t;
  EXPECT_EQ(t.p.host.send_capacity(t.b), 0u);
  EXPECT_TRUE(t.p.host.fits(t.b, t.kSliver));
  EXPECT_FALSE(t.p.host.fits(t.b, t.kSliver + 1));
}

// Credit returned while the connection-wide cap is full: the stream used to be marked as waiting but left
// out of the list of streams woken when the cap frees up.
TEST(Mux, CreditReturnedWhileCapIsFullStillWakesTheStream) {
  MuxConfig c;
  c.initial_window = 8192;
  c.max_buffered = 8192;
  Pair p(c);
  const StreamId a = open_stream(p, "/a");
  const StreamId b = open_stream(p, "/b");
  p.guest_handler.auto_consume = false;
  ASSERT_TRUE(p.host.send(a, p.pool.acquire().sub(0, 8192)));
  p.settle();
  ASSERT_EQ(p.guest_handler.data_of(a).size(), 8192u);
  ASSERT_TRUE(p.host.send(b, p.pool.acquire().sub(0, 8192)));  // fills the cap again
  p.guest.consume(a, 8192);
  testing::pump(p.guest, p.host, p.pool);  // a's credit returns while b's bytes still fill the cap
  EXPECT_EQ(p.host.send_capacity(a), 0u);
  p.settle();
  EXPECT_GT(p.host.send_capacity(a), 0u);
  EXPECT_GE(std::count(p.host_handler.events.begin(), p.host_handler.events.end(), Event{"writable", a}), 1);
}

TEST(Mux, GoawayRefusesNewStreamsAndDrainsOld) {
  Pair p;
  const StreamId old_id = open_stream(p);
  p.guest.goaway("guest agent restarting");
  p.settle();
  EXPECT_EQ(p.host_handler.events.back(), (Event{"goaway", 0, "guest agent restarting"}));
  EXPECT_FALSE(p.host.open(unix_target("/x")).ok());
  ASSERT_TRUE(p.host.send(old_id, text_slice(p.pool, "drain")));
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(old_id), "drain");
}

TEST(Mux, PeerOpenAfterLocalGoawayIsRefused) {
  Pair p;
  p.settle();
  p.guest.goaway("bye");
  const StreamId id = *p.host.open(unix_target("/x"));  // crosses the GOAWAY on the wire
  p.settle();
  EXPECT_EQ(p.host_handler.events.back().kind, "open_fail");
  EXPECT_EQ(p.host_handler.events.back().id, id);
}

TEST(Mux, PingIsAnsweredWithPong) {
  Pair p;
  p.settle();
  p.host.ping(42);
  p.settle();
  EXPECT_EQ(p.host_handler.events.back(), (Event{"pong", 0, "42"}));
}

TEST(Mux, ControlMessagesReachTheHandler) {
  Pair p;
  p.settle();
  flatbuffers::FlatBufferBuilder b;
  std::vector<flatbuffers::Offset<wire::Listener>> added{
      wire::CreateListener(b, wire::Proto::Tcp, wire::Family::Inet4, b.CreateString("0.0.0.0"), 8080)};
  b.Finish(wire::CreateControl(b, wire::Message::Ports,
                               wire::CreatePorts(b, b.CreateVector(added), 0, true).Union()));
  p.guest.send_control(b);
  p.settle();
  EXPECT_EQ(p.host_handler.events.back(), (Event{"control", 0, "Ports"}));
}

TEST(Mux, StreamLimitRefusesExtraOpens) {
  MuxConfig c;
  c.max_streams = 2;
  Pair p(c);
  p.settle();
  (void)*p.host.open(unix_target("/1"));
  (void)*p.host.open(unix_target("/2"));
  EXPECT_FALSE(p.host.open(unix_target("/3")).ok());
}

// Any split of the byte stream gives the same events.
TEST(Mux, DecoderGivesSameResultForEverySplit) {
  BufferPool pool(64 * 1024, 16);
  testing::RecordingHandler sender_handler;
  Mux sender(Role::kHost, sender_handler);
  sender_handler.mux = &sender;
  // The sender needs the peer's HELLO before it schedules data.
  testing::RecordingHandler peer_handler;
  Mux peer(Role::kGuest, peer_handler);
  peer_handler.mux = &peer;
  testing::pump(peer, sender, pool);
  const StreamId id = *sender.open(unix_target("/split"));
  (void)sender.send(id, text_slice(pool, "hello world"));
  sender.ping(7);
  sender.shutdown_write(id);
  const std::string wire = testing::drain(sender);
  ASSERT_GT(wire.size(), 60u);

  auto run = [&](size_t split) {
    testing::RecordingHandler h;
    Mux receiver(Role::kGuest, h);
    h.mux = &receiver;
    EXPECT_TRUE(receiver.feed(testing::to_slice(pool, std::string_view(wire).substr(0, split))).ok());
    EXPECT_TRUE(receiver.feed(testing::to_slice(pool, std::string_view(wire).substr(split))).ok());
    // Merge adjacent data events: a split may cut one DATA frame in two pieces.
    std::vector<Event> merged;
    for (const Event& e : h.events) {
      if (e.kind == "data" && !merged.empty() && merged.back().kind == "data" && merged.back().id == e.id) {
        merged.back().text += e.text;
      } else {
        merged.push_back(e);
      }
    }
    return merged;
  };
  const auto whole = run(wire.size());
  EXPECT_EQ(whole.size(), 4u);  // ready, open, data, fin
  for (size_t split = 0; split <= wire.size(); ++split) {
    EXPECT_EQ(run(split), whole) << "split at " << split;
  }
}

// A virtio-serial port outlives both agents: a restarted peer first reads the old session's stale frames.
TEST(Mux, ResyncSkipsStaleBytesUntilThePeersHelloAtEverySplit) {
  BufferPool pool(64 * 1024, 16);
  testing::RecordingHandler sender_handler;
  Mux sender(Role::kHost, sender_handler);
  const std::string hello = testing::drain(sender);
  const std::string stale = std::string("\x05\x00\x00\x00\x07\x00\x00\x00\x01\x00\x00\x00tail!", 17) +
                            std::string(100, '\0') + hello.substr(0, 10);  // even a torn HELLO
  const std::string wire = stale + hello;
  for (size_t split = 0; split <= wire.size(); ++split) {
    testing::RecordingHandler h;
    MuxConfig config;
    config.resync = true;
    Mux receiver(Role::kGuest, h, config);
    h.mux = &receiver;
    ASSERT_TRUE(receiver.feed(testing::to_slice(pool, std::string_view(wire).substr(0, split))).ok());
    ASSERT_TRUE(receiver.feed(testing::to_slice(pool, std::string_view(wire).substr(split))).ok()) << split;
    EXPECT_TRUE(receiver.ready()) << "split at " << split;
    EXPECT_GT(receiver.counters().resync_skipped, 0u);
  }
}

// A guest agent restarted behind a virtio-serial port: its restart marker ends the host's old session, the
// host reconnects, and the new pair finds each other through the old session's stale bytes.
TEST(Mux, SerialAcceptorRestartEndsTheOldSessionAndPairsWithTheNext) {
  BufferPool pool(256 * 1024, 16);
  MuxConfig host_config;
  host_config.resync = true;
  Pair old_pair(host_config);
  old_pair.settle();
  ASSERT_TRUE(old_pair.host.ready());
  old_pair.host.ping(1);
  const std::string stale_from_host = testing::drain(old_pair.host);  // in the pipe when the guest restarts

  MuxConfig guest_config;
  guest_config.resync = true;
  guest_config.serial_acceptor = true;
  testing::RecordingHandler guest_handler;
  Mux guest(Role::kGuest, guest_handler, guest_config);
  guest_handler.mux = &guest;
  // The new guest says nothing but its marker; the old host session fails on it.
  Status st;
  testing::pump(guest, old_pair.host, pool, 1 << 20, &st);
  EXPECT_FALSE(st.ok());
  EXPECT_FALSE(guest.ready());

  // The host reconnects: the guest first reads the old session's stale bytes, then the new HELLO.
  testing::RecordingHandler host_handler;
  Mux host(Role::kHost, host_handler, host_config);
  host_handler.mux = &host;
  ASSERT_TRUE(guest.feed(testing::to_slice(pool, stale_from_host)).ok());
  testing::pump(host, guest, pool);
  EXPECT_TRUE(guest.ready());
  testing::pump(guest, host, pool);
  EXPECT_TRUE(host.ready());
  const StreamId id = *host.open(unix_target("/after-restart"));
  testing::pump(host, guest, pool);
  EXPECT_EQ(guest_handler.events.back(), (Event{"open", id, "/after-restart"}));
}

TEST(Mux, ResyncGivesUpAfterTheLimit) {
  BufferPool pool(64 * 1024, 16);
  testing::RecordingHandler h;
  MuxConfig config;
  config.resync = true;
  config.max_resync_skip = 1000;
  Mux receiver(Role::kGuest, h, config);
  auto st = receiver.feed(testing::to_slice(pool, std::string(2000, 'x')));
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message.find("no vbridge HELLO"), std::string::npos);
}

// ---- malformed input: each class is a connection error with a reason, never a crash ----

struct Malformed {
  const char* name;
  std::string bytes;  // after a valid HELLO unless `raw`
  const char* expect;
  bool raw = false;
};

std::string header(uint32_t length, uint32_t id, uint8_t type, uint16_t reserved = 0) {
  std::string h(12, '\0');
  store_u32(reinterpret_cast<std::byte*>(h.data()), length);
  store_u32(reinterpret_cast<std::byte*>(h.data() + 4), id);
  h[8] = static_cast<char>(type);
  h[10] = static_cast<char>(reserved & 0xff);
  h[11] = static_cast<char>(reserved >> 8);
  return h;
}

std::string hello_bytes(uint16_t version = kProtocolVersion) {
  Hello hello{version, 0, 256 * 1024, 1 << 20, 100};
  const auto p = encode_hello(hello);
  return header(kHelloPayloadSize, 0, 0) + std::string(reinterpret_cast<const char*>(p.data()), p.size());
}

std::string open_frame(StreamId id) {
  flatbuffers::FlatBufferBuilder b;
  wire::TargetT t = unix_target("/x");
  const auto target = wire::Target::Pack(b, &t);
  b.Finish(wire::CreateControl(b, wire::Message::Open, wire::CreateOpen(b, target).Union()));
  return header(b.GetSize(), id, 2) +
         std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

// A handler that ends a stream and flushes the transport from inside a callback: the flush reaps the
// stream, which the mux must not touch again afterwards.
struct ResetAndFlushHandler : testing::RecordingHandler {
  std::string on = "fin";  // the callback that resets
  void act(StreamId id) {
    mux->reset(id, "handler gave up");
    (void)testing::drain(*mux);
  }
  void on_fin(StreamId id) override {
    RecordingHandler::on_fin(id);
    if (on == "fin") act(id);
  }
  void on_writable(StreamId id) override {
    RecordingHandler::on_writable(id);
    if (on == "writable") act(id);
  }
};

TEST(Mux, StreamResetAndReapedInsideOnFinIsNotTouchedAgain) {
  BufferPool pool;
  testing::RecordingHandler host_handler;
  ResetAndFlushHandler guest_handler;
  Mux host(Role::kHost, host_handler);
  Mux guest(Role::kGuest, guest_handler);
  host_handler.mux = &host;
  guest_handler.mux = &guest;
  const StreamId id = *host.open(unix_target("/s"));
  host.shutdown_write(id);
  testing::pump(host, guest, pool);
  testing::pump(guest, host, pool);
  testing::pump(host, guest, pool);
  EXPECT_EQ(guest_handler.count("fin"), 1u);
  EXPECT_FALSE(guest.has_stream(id));
  EXPECT_FALSE(guest.failure().has_value());
}

TEST(Mux, StreamResetAndReapedInsideOnWritableIsNotTouchedAgain) {
  MuxConfig c;
  c.initial_window = 4096;
  BufferPool pool;
  ResetAndFlushHandler host_handler;
  host_handler.on = "writable";
  testing::RecordingHandler guest_handler;
  Mux host(Role::kHost, host_handler, c);
  Mux guest(Role::kGuest, guest_handler, c);
  host_handler.mux = &host;
  guest_handler.mux = &guest;
  testing::pump(guest, host, pool);
  const StreamId id = *host.open(unix_target("/s"));
  ASSERT_TRUE(host.send(id, pool.acquire().sub(0, 4096)));
  EXPECT_EQ(host.send_capacity(id), 0u);
  // The guest consumes; its WINDOW_UPDATE makes the host writable, and the handler resets from on_writable.
  testing::pump(host, guest, pool);
  testing::pump(guest, host, pool);
  EXPECT_EQ(host_handler.count("writable"), 1u);
  EXPECT_FALSE(host.has_stream(id));
  EXPECT_FALSE(host.failure().has_value());
}

// The FlatBuffers verifier accepts a union type whose table is absent; such a message used to be
// dereferenced as if the table were there.
TEST(Mux, ControlMessageWithoutBodyIsAConnectionErrorNotACrash) {
  for (const auto type :
       {wire::Message::Open, wire::Message::OpenFail, wire::Message::GoAway, wire::Message::Ports}) {
    BufferPool pool;
    testing::RecordingHandler h;
    Mux guest(Role::kGuest, h);
    h.mux = &guest;
    flatbuffers::FlatBufferBuilder b;
    wire::ControlBuilder control(b);
    control.add_message_type(type);
    b.Finish(control.Finish());
    StreamId id = 0;
    if (type == wire::Message::Open) id = 1;
    if (type == wire::Message::OpenFail) id = *guest.open(unix_target("/s"));  // an answer to our own open
    const std::string frame = header(b.GetSize(), id, 2) +
                              std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
    const Status st = guest.feed(testing::to_slice(pool, hello_bytes() + frame));
    ASSERT_FALSE(st.ok()) << wire::EnumNameMessage(type);
    EXPECT_NE(st.error().message.find("no body"), std::string::npos) << st.error().message;
    EXPECT_EQ(h.count("control"), 0u);
  }
}

// A handler that reads a FILE_EVENTS batch through and records where its 8-byte field sits.
struct FileEventsHandler : testing::RecordingHandler {
  std::vector<std::string> paths;
  uint64_t seq = 0;
  uintptr_t seq_address = 0;
  void on_control(const wire::Control& c) override {
    testing::RecordingHandler::on_control(c);
    const auto* fe = c.message_as_FileEvents();
    if (fe == nullptr) return;
    seq = fe->seq();
    seq_address = reinterpret_cast<uintptr_t>(
        reinterpret_cast<const flatbuffers::Table*>(fe)->GetAddressOf(wire::FileEvents::VT_SEQ));
    for (const auto* e : *fe->events()) paths.push_back(e->path()->str());
  }
};

// FlatBuffers reads a FILE_EVENTS batch's 8-byte `seq` in place, so the batch must reach the handler at an
// 8-byte-aligned address even when the transport delivered the frame at an odd one, in any number of pieces
// (UBSan reported "member call on misaligned address" in the verifier when a batch was read at an offset).
TEST(Mux, ControlPayloadAtAnOddAddressReachesTheHandlerAligned) {
  flatbuffers::FlatBufferBuilder b;
  std::vector<flatbuffers::Offset<wire::FileEvent>> events;
  for (const char* path : {"src/a.c", "src/b.c", "README"}) {
    events.push_back(wire::CreateFileEvent(b, wire::FileEventKind::Modify, b.CreateString(path)));
  }
  b.Finish(wire::CreateControl(
      b, wire::Message::FileEvents,
      wire::CreateFileEvents(b, b.CreateString("home"), b.CreateVector(events), 0x0102030405060708).Union()));
  // A leading byte puts the CONTROL payload (after HELLO and the frame header: 56 bytes) at an odd offset.
  const std::string input = "x" + hello_bytes() + header(b.GetSize(), 0, 2) +
                            std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
  ASSERT_EQ((1 + hello_bytes().size() + 12) % 2, 1u);
  BufferPool pool(64 * 1024, 4);
  for (size_t split = 1; split <= input.size(); ++split) {
    FileEventsHandler h;
    Mux guest(Role::kGuest, h);
    h.mux = &guest;
    Slice whole = testing::to_slice(pool, input);
    ASSERT_TRUE(guest.feed(whole.sub(1, split - 1)).ok()) << split;
    ASSERT_TRUE(guest.feed(whole.sub(split, input.size() - split)).ok()) << split;
    ASSERT_EQ(h.count("control"), 1u) << split;
    EXPECT_EQ(h.paths, (std::vector<std::string>{"src/a.c", "src/b.c", "README"})) << split;
    EXPECT_EQ(h.seq, 0x0102030405060708u) << split;
    EXPECT_EQ(h.seq_address % alignof(uint64_t), 0u) << split;
  }
}

class MalformedInput : public ::testing::TestWithParam<Malformed> {};

TEST_P(MalformedInput, IsAConnectionErrorWithAReason) {
  const Malformed& m = GetParam();
  BufferPool pool(1 << 20, 4);
  testing::RecordingHandler h;
  MuxConfig config;
  config.initial_window = 256 * 1024;
  Mux guest(Role::kGuest, h, config);
  h.mux = &guest;
  h.auto_consume = false;  // no credit returns: the flow-control case must overrun the window
  const std::string input = m.raw ? m.bytes : hello_bytes() + m.bytes;
  Status st;
  for (size_t off = 0; off < input.size() && st.ok(); off += 1 << 20) {
    st = guest.feed(testing::to_slice(pool, std::string_view(input).substr(off, 1 << 20)));
  }
  ASSERT_FALSE(st.ok()) << m.name;
  EXPECT_NE(st.error().to_string().find(m.expect), std::string::npos) << st.error().to_string();
  // Once failed, it stays failed.
  EXPECT_FALSE(guest.feed(testing::to_slice(pool, "x")).ok());
}

// A well-formed frame that breaks one stream's credit or FIN rules: that stream is reset, the peer hears
// why in an RST, and the connection and its other streams go on.
struct StreamViolation {
  const char* name;
  std::string bytes;  // on stream 1, after HELLO and the OPENs of streams 1 and 3
  const char* expect;
};

std::string u32_bytes(uint32_t v) {
  std::string b(4, '\0');
  store_u32(reinterpret_cast<std::byte*>(b.data()), v);
  return b;
}

class StreamViolationInput : public ::testing::TestWithParam<StreamViolation> {};

TEST_P(StreamViolationInput, ResetsThatStreamAloneAndTellsThePeerWhy) {
  const StreamViolation& v = GetParam();
  BufferPool pool(1 << 20, 4);
  testing::RecordingHandler h;
  MuxConfig config;
  config.initial_window = 256 * 1024;
  Mux guest(Role::kGuest, h, config);
  h.mux = &guest;
  h.auto_consume = false;  // no credit returns: the flow-control case must overrun the window
  const std::string input = hello_bytes() + open_frame(1) + open_frame(3) + v.bytes + header(4, 3, 1) +
                            "good" + header(5, 1, 1) + "late!";
  for (size_t off = 0; off < input.size(); off += 1 << 20) {
    const Status st = guest.feed(testing::to_slice(pool, std::string_view(input).substr(off, 1 << 20)));
    ASSERT_TRUE(st.ok()) << v.name << ": " << st.error().to_string();
  }
  ASSERT_EQ(h.count("reset"), 1u) << v.name;
  const auto reset =
      std::find_if(h.events.begin(), h.events.end(), [](auto& e) { return e.kind == "reset"; });
  EXPECT_EQ(reset->id, 1u);
  EXPECT_NE(reset->text.find(v.expect), std::string::npos) << reset->text;
  EXPECT_EQ(guest.counters().stream_errors, 1u);
  // The other stream still carries bytes; the broken one's later bytes are dropped.
  EXPECT_EQ(h.data_of(3), "good");
  EXPECT_EQ(h.data_of(1).find("late!"), std::string::npos);
  EXPECT_FALSE(guest.failure().has_value());
  // The peer is told which stream and why.
  const std::string out = testing::drain(guest);
  const std::string rst = header(0, 1, 5).substr(4, 5);  // stream 1, type RST
  const size_t at = out.find(rst);
  ASSERT_NE(at, std::string::npos);
  EXPECT_NE(out.find(v.expect, at), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(
    Classes, StreamViolationInput,
    ::testing::Values(
        StreamViolation{
            "flow_control",
            header(200000, 1, 1) + std::string(200000, 'a') + header(200000, 1, 1) + std::string(200000, 'a'),
            "bytes of credit"},
        StreamViolation{"data_after_fin", header(0, 1, 4) + header(1, 1, 1) + "x", "data after FIN"},
        StreamViolation{"double_fin", header(0, 1, 4) + header(0, 1, 4), "second FIN"},
        StreamViolation{"window_update_zero", header(4, 1, 3) + u32_bytes(0), "WINDOW_UPDATE of 0 bytes"},
        StreamViolation{"window_update_overflow",
                        header(4, 1, 3) + u32_bytes(0x7fffffff) + header(4, 1, 3) + u32_bytes(0x7fffffff),
                        "credit overflow"}),
    [](const ::testing::TestParamInfo<StreamViolation>& param) { return std::string(param.param.name); });

// Token handshake (unix and TCP transports): the guest answers only a HELLO with its token.
TEST(MuxToken, MatchingTokenCompletesTheHandshake) {
  BufferPool pool{256 * 1024, 64};
  testing::RecordingHandler host_handler, guest_handler;
  MuxConfig host_config, guest_config;
  host_config.hello_token = "0123456789abcdef";
  guest_config.expect_token = "0123456789abcdef";
  Mux host(Role::kHost, host_handler, host_config), guest(Role::kGuest, guest_handler, guest_config);
  EXPECT_FALSE(guest.has_output());  // nothing before the host's HELLO
  testing::pump(host, guest, pool);
  testing::pump(guest, host, pool);
  EXPECT_TRUE(host.ready());
  EXPECT_TRUE(guest.ready());
  EXPECT_TRUE(guest.peer()->token.empty());  // not kept once checked
}

TEST(MuxToken, WrongOrMissingTokenFailsWithKAuthAndTheRefusalNamesIt) {
  for (const std::string token : {"fedcba9876543210", ""}) {
    BufferPool pool{256 * 1024, 64};
    testing::RecordingHandler host_handler, guest_handler;
    MuxConfig host_config, guest_config;
    host_config.hello_token = token;
    guest_config.expect_token = "0123456789abcdef";
    Mux host(Role::kHost, host_handler, host_config), guest(Role::kGuest, guest_handler, guest_config);
    Status st;
    testing::pump(host, guest, pool, 1 << 20, &st);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().code, ErrorCode::kAuth);
    EXPECT_FALSE(guest.ready());
    EXPECT_FALSE(guest.has_output());  // no HELLO for a bad token
    // The caller answers with encode_refusal; the host names it.
    const auto refusal = encode_refusal(st.error().message);
    const Status host_st = host.feed(testing::to_slice(
        pool, std::string_view(reinterpret_cast<const char*>(refusal.data()), refusal.size())));
    ASSERT_FALSE(host_st.ok());
    EXPECT_EQ(host_st.error().code, ErrorCode::kAuth);
    EXPECT_NE(host_st.error().message.find("peer refused the handshake: bad token"), std::string::npos)
        << host_st.error().message;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Classes, MalformedInput,
    ::testing::Values(
        Malformed{"http", "GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n", "not a vbridge agent", true},
        Malformed{"version", hello_bytes(9), "version 9", true},
        Malformed{"data_before_hello", header(1, 1, 1) + "x", "not a vbridge agent", true},
        Malformed{"second_hello", hello_bytes(), "HELLO was already received"},
        Malformed{"unknown_type", header(0, 1, 42), "unknown frame type 42"},
        Malformed{"reserved", header(0, 1, 4, 7), "reserved header bytes"},
        Malformed{"oversized_data", header(512 * 1024, 1, 1), "max frame size"},
        Malformed{"oversized_control", header(64 << 20, 1, 2), "control message limit"},
        Malformed{"data_never_opened", header(3, 99, 1) + "abc", "never opened"},
        Malformed{"data_on_stream_0", header(3, 0, 1) + "abc", "needs a stream"},
        Malformed{"garbage_control", header(8, 1, 2) + std::string(8, '\xff'), "malformed CONTROL"},
        Malformed{"open_with_guest_id", open_frame(2), "invalid stream id"},
        Malformed{"open_reused_id", open_frame(1) + open_frame(1), "invalid stream id"},
        Malformed{"window_update_size", open_frame(1) + header(2, 1, 3) + "ab", "4-byte increment"},
        Malformed{"ping_size", header(3, 0, 6) + "abc", "8-byte token"},
        Malformed{"rst_short", open_frame(1) + header(2, 1, 5) + "ab", "malformed RST"},
        Malformed{"goaway_on_stream",
                  open_frame(1) +
                      [] {
                        flatbuffers::FlatBufferBuilder b;
                        b.Finish(
                            wire::CreateControl(b, wire::Message::GoAway, wire::CreateGoAway(b, 0u).Union()));
                        return header(b.GetSize(), 1, 2) +
                               std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
                      }(),
                  "connection-level"}),
    [](const ::testing::TestParamInfo<Malformed>& param) { return std::string(param.param.name); });

}  // namespace
}  // namespace vbridge
