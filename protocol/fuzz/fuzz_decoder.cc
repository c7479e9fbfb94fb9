// Arbitrary bytes from the transport, in splits the input chooses, fed to a guest-role Mux.
//
// Input: u8 flags | u8 split | u16 seed | wire bytes
//   flags bit 0     prefix the wire bytes with a valid HELLO from a host
//   flags bits 1-4  shrink one limit each: window, max_frame, max_streams, max_buffered
//   flags bit 5     resync mode (skip stale bytes until the peer's HELLO); bit 6: at most 4 KiB of them
//   flags bit 7     with bit 0: the first wire byte says how many of the following bytes go before the HELLO
//   split           0: one feed; 1: one byte per feed; else chunk sizes drawn in [1, 2^(split % 17)]
//   seed            drives the application's choices (accept, reject, consume, reset, shutdown, send)
//
// Invariants: no crash or sanitizer report; the stream table matches what the application was told;
// peer streams <= max_streams; buffered_bytes <= max_buffered; received bytes never exceed the credit given;
// no callback for a stream after it ended; an error, once returned, sticks; in resync mode, stale bytes
// without a HELLO signature in them never keep the HELLO behind them from being found.
#include <algorithm>
#include <array>
#include <map>
#include <optional>
#include <vector>

#include "protocol/fuzz/fuzz_util.h"
#include "protocol/mux.h"

namespace vbridge::fuzz {
namespace {

volatile uint64_t g_sink;

struct AppStream {
  bool local = false;
  bool accepted = false;  // for peer streams: accept() was called
  bool fin = false;
  uint64_t received = 0;
  uint64_t consumed = 0;
};

class App final : public MuxHandler {
 public:
  App(Rng& rng, BufferPool& pool, const MuxConfig& config) : rng_(rng), pool_(pool), config_(config) {}
  Mux* mux = nullptr;
  std::map<StreamId, AppStream> streams;
  std::vector<std::pair<StreamId, Slice>> held;  // data delivered but not consumed yet
  uint64_t bytes_delivered = 0;
  StreamId last_peer_open = 0;
  bool ready = false;

  void on_ready(const Hello& peer) override {
    FUZZ_CHECK(!ready);
    ready = true;
    g_sink = g_sink + peer.max_frame;
  }

  void on_open(StreamId id, const wire::Target& target) override {
    FUZZ_CHECK(ready);
    FUZZ_CHECK((id & 1u) == 1u);  // the peer is a host
    FUZZ_CHECK(id > last_peer_open);
    FUZZ_CHECK(streams.count(id) == 0);
    last_peer_open = id;
    g_sink = g_sink + (target.path() ? target.path()->size() : 0);
    streams[id] = AppStream{};
    const auto r = rng_.below(10);
    if (r < 7) {
      accept(id);
    } else if (r < 8) {
      streams.erase(id);
      mux->reject(id, 111, "refused by the fuzzer");
    }  // else: leave it pending; step() may answer later
  }

  void on_open_result(StreamId id, const Error* error) override {
    auto it = streams.find(id);
    FUZZ_CHECK(it != streams.end() && it->second.local);
    if (error != nullptr) streams.erase(it);
  }

  void on_data(StreamId id, Slice data) override {
    auto it = streams.find(id);
    FUZZ_CHECK(it != streams.end());
    FUZZ_CHECK(!it->second.fin);
    FUZZ_CHECK(!data.empty());
    uint64_t sum = 0;
    for (const std::byte b : data.bytes()) sum += static_cast<uint8_t>(b);  // touch every byte
    g_sink = g_sink + sum;
    it->second.received += data.size();
    bytes_delivered += data.size();
    // The peer may never have more than one window of unconsumed bytes outstanding.
    FUZZ_CHECK(it->second.received <= it->second.consumed + config_.initial_window);
    const size_t n = data.size();
    if (rng_.percent(70)) {
      consume(id, n);
    } else if (held.size() < 64) {
      held.emplace_back(id, std::move(data));
    } else {
      consume(id, n);
    }
    react(id);
  }

  void on_fin(StreamId id) override {
    auto it = streams.find(id);
    FUZZ_CHECK(it != streams.end());
    FUZZ_CHECK(!it->second.fin);
    it->second.fin = true;
    react(id);
  }

  void on_reset(StreamId id, const Error& error) override {
    FUZZ_CHECK(streams.erase(id) == 1);
    g_sink = g_sink + error.message.size();
    drop_held(id);
  }

  void on_writable(StreamId id) override {
    FUZZ_CHECK(streams.count(id) == 1);
    maybe_send(id);
  }

  void on_closed(StreamId id) override {
    auto it = streams.find(id);
    FUZZ_CHECK(it != streams.end());
    FUZZ_CHECK(it->second.fin);
    streams.erase(it);
    drop_held(id);
  }

  void on_control(const wire::Control& message) override { g_sink = g_sink + walk_control(message); }
  void on_goaway(const std::string& message) override { g_sink = g_sink + message.size(); }
  void on_pong(uint64_t token) override { g_sink = g_sink + token; }

  // Between feeds: answer pending opens, consume held data, open streams of our own, act on a stream.
  void step() {
    if (!held.empty() && rng_.percent(50)) {
      const size_t k = rng_.below(held.size());
      auto [id, slice] = std::move(held[k]);
      held.erase(held.begin() + static_cast<ptrdiff_t>(k));
      consume(id, slice.size());
    }
    if (streams.empty()) {
      if (ready && rng_.percent(10)) open();
      return;
    }
    auto it = streams.begin();
    std::advance(it, static_cast<ptrdiff_t>(rng_.below(streams.size())));
    const StreamId id = it->first;
    if (!it->second.local && !it->second.accepted && rng_.percent(50)) {
      accept(id);
      return;
    }
    react(id);
    if (ready && rng_.percent(5)) open();
    if (rng_.percent(3)) mux->ping(rng_.next());
    if (rng_.percent(1)) mux->goaway("fuzz");
  }

  void check() const {
    FUZZ_CHECK(mux->stream_count() == streams.size());
    size_t peer = 0;
    for (const auto& [id, s] : streams) {
      FUZZ_CHECK(mux->has_stream(id));
      const auto state = mux->stream_state(id);
      FUZZ_CHECK(state.has_value() && *state != StreamState::kClosed);
      if (!s.local && !s.accepted) FUZZ_CHECK(*state == StreamState::kAccepting);
      if (s.fin)
        FUZZ_CHECK(*state == StreamState::kHalfClosedRemote || *state == StreamState::kAccepting ||
                   *state == StreamState::kOpening);
      peer += !s.local;
    }
    FUZZ_CHECK(peer <= config_.max_streams);
    FUZZ_CHECK(mux->buffered_bytes() <= config_.max_buffered);
    FUZZ_CHECK(mux->counters().bytes_in == bytes_delivered);
  }

  void release_all() { held.clear(); }

 private:
  void accept(StreamId id) {
    streams[id].accepted = true;
    mux->accept(id);
  }

  void consume(StreamId id, size_t n) {
    auto it = streams.find(id);
    if (it == streams.end()) return;  // ended while the bytes were held
    it->second.consumed += n;
    mux->consume(id, n);
  }

  void drop_held(StreamId id) {
    std::erase_if(held, [id](const auto& h) { return h.first == id; });
  }

  void open() {
    wire::TargetT t;
    t.proto = wire::Proto::Tcp;
    t.port = static_cast<uint16_t>(rng_.below(65536));
    auto id = mux->open(t);
    if (!id) return;
    FUZZ_CHECK((*id & 1u) == 0u);
    FUZZ_CHECK(streams.count(*id) == 0);
    streams[*id] = AppStream{.local = true, .accepted = true};
  }

  // Something an application might do on a stream it just heard from. The stream may end inside the call.
  void react(StreamId id) {
    const auto r = rng_.below(100);
    if (r < 4) {
      streams.erase(id);
      drop_held(id);
      mux->reset(id, "reset by the fuzzer");
    } else if (r < 10) {
      mux->shutdown_write(id);
    } else if (r < 40) {
      maybe_send(id);
    }
  }

  void maybe_send(StreamId id) {
    const size_t cap = mux->send_capacity(id);
    if (cap == 0) return;
    const size_t n = std::min<size_t>({cap, 1 + rng_.below(8192), pool_.block_size()});
    Slice s = pool_.acquire().sub(0, n);
    std::memset(s.data(), 'g', n);
    FUZZ_CHECK(mux->send(id, std::move(s)));
  }

  Rng& rng_;
  BufferPool& pool_;
  const MuxConfig& config_;
};

// The bytes a host sends first.
std::vector<std::byte> host_hello() {
  Hello hello;
  hello.max_frame = 256 * 1024;
  hello.initial_window = 64 * 1024;
  hello.max_streams = 64;
  const auto payload = encode_hello(hello);
  std::vector<std::byte> out(kFrameHeaderSize);
  encode_header(FrameHeader{kHelloPayloadSize, 0, FrameType::kHello, 0}, out.data());
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

// Whether `bytes` hold the start of a HELLO: its fixed header and magic, which resync mode looks for.
bool contains_signature(std::span<const std::byte> bytes) {
  std::array<std::byte, kFrameHeaderSize + 4> sig{};
  encode_header(FrameHeader{kHelloPayloadSize, 0, FrameType::kHello, 0}, sig.data());
  store_u32(sig.data() + kFrameHeaderSize, kHelloMagic);
  return std::search(bytes.begin(), bytes.end(), sig.begin(), sig.end()) != bytes.end();
}

// Takes what the mux has to send, sometimes only part of it, and throws it away.
void drain(Mux& mux, Rng& rng) {
  iovec iov[16];
  const size_t n = mux.prepare_output(std::span(iov, 1 + rng.below(16)));
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) total += iov[i].iov_len;
  if (total == 0) return;
  mux.consume_output(rng.percent(70) ? total : rng.below(total + 1));
}

}  // namespace
}  // namespace vbridge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace vbridge;
  using namespace vbridge::fuzz;
  ByteReader in(data, size);
  const uint8_t flags = in.u8();
  const uint8_t split = in.u8();
  Rng rng(in.u16());

  MuxConfig config;
  config.max_frame = 64 * 1024;
  config.initial_window = 256 * 1024;
  config.max_streams = 64;
  if (flags & 2) config.initial_window = 1024;
  if (flags & 4) config.max_frame = 1024;
  if (flags & 8) config.max_streams = 2;
  if (flags & 16) config.max_buffered = 8 * 1024;
  config.resync = (flags & 32) != 0;
  if (flags & 64) config.max_resync_skip = 4096;

  // [stale bytes] [HELLO] rest
  std::span<const std::byte> stale;
  if ((flags & 1) && (flags & 128)) stale = in.bytes(in.u8());
  std::vector<std::byte> wire(stale.begin(), stale.end());
  if (flags & 1) {
    const auto hello = host_hello();
    wire.insert(wire.end(), hello.begin(), hello.end());
  }
  const auto rest = in.rest();
  wire.insert(wire.end(), rest.begin(), rest.end());
  const size_t hello_end = (flags & 1) ? stale.size() + kFrameHeaderSize + kHelloPayloadSize : 0;

  BufferPool pool(64 * 1024, 8);  // outlives the mux and the application's Slices
  GuardedFeed feed;
  App app(rng, pool, config);
  Mux mux(Role::kGuest, app, config);
  app.mux = &mux;

  size_t pos = 0;
  bool failed = false;
  while (pos < wire.size() && !failed) {
    size_t chunk = wire.size() - pos;
    if (split == 1) {
      chunk = 1;
    } else if (split > 1) {
      chunk = 1 + rng.below(size_t{1} << (split % 17));
    }
    chunk = std::min({chunk, wire.size() - pos, GuardedFeed::kMax});
    const Status st = mux.feed(feed.slice(std::span(wire).subspan(pos, chunk)));
    pos += chunk;
    if (config.resync && hello_end > 0 && pos >= hello_end && !contains_signature(stale)) {
      // Skipped in whole chunks, so a chunk may carry up to a signature's worth of HELLO into the count.
      if (stale.size() + 2 * kFrameHeaderSize + 4 <= config.max_resync_skip) FUZZ_CHECK(app.ready);
    }
    if (!st) {
      failed = true;
      FUZZ_CHECK(mux.failure().has_value());
      const std::byte more[1] = {std::byte{0}};
      FUZZ_CHECK(!mux.feed(feed.slice(more)).ok());  // it stays failed
      break;
    }
    FUZZ_CHECK(!mux.failure().has_value());
    app.check();
    app.step();
    app.check();
    drain(mux, rng);
  }
  while (mux.has_output()) drain(mux, rng);
  app.check();
  app.release_all();
  return 0;
}
