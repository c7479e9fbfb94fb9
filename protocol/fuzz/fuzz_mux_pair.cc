// Two Muxes back to back, driven by a script of application and transport operations.
//
// Input: u8 flags | u16 seed | ops...
//   flags: bit 0 window 1 KiB, bit 1 max_frame 1 KiB, bit 2 quantum 1 KiB, bit 3 output_watermark 2 KiB,
//          bit 4 max_buffered 16 KiB, bit 5 max_streams 3, bit 6 applications act and flush from inside
//          callbacks, bit 7 the transport takes at most 2 iovecs at a time.
//   op: u8 code, then arguments (see run_op). The seed drives the applications' choices inside callbacks.
//
// Both sides are correct implementations, so every feed must succeed. Invariants: each stream's bytes
// arrive in order and intact, FIN after the last byte, RST only after the peer reset; what the application
// believes about a stream matches stream_state(); a stream never waits for an on_writable that is owed; after
// a full settle both sides agree on the live streams, everything sent arrived, and nothing stays queued.
#include <map>
#include <set>
#include <string>
#include <vector>

#include "protocol/fuzz/fuzz_util.h"
#include "protocol/mux.h"

namespace vbridge::fuzz {
namespace {

volatile uint64_t g_sink;

constexpr uint64_t kByteBudget = 2 << 20;  // bytes the applications may send per input

// The byte of stream `id` from `side` at `offset`. The per-byte loops carry no coverage instrumentation: it
// would dominate the run time and tell nothing.
__attribute__((no_sanitize("coverage"))) uint8_t pattern(int side, StreamId id, uint64_t offset) {
  return static_cast<uint8_t>(((offset * 0x9E37) >> 7) ^ offset ^ (offset >> 9) ^ (id * 13) ^ (side * 101));
}

__attribute__((no_sanitize("coverage"))) void fill(std::byte* p, size_t n, int side, StreamId id,
                                                   uint64_t offset) {
  for (size_t k = 0; k < n; ++k) p[k] = std::byte{pattern(side, id, offset + k)};
}

__attribute__((no_sanitize("coverage"))) bool matches(const std::byte* p, size_t n, int side, StreamId id,
                                                      uint64_t offset) {
  for (size_t k = 0; k < n; ++k) {
    if (p[k] != std::byte{pattern(side, id, offset + k)}) return false;
  }
  return true;
}

// What one side sent on one stream; outlives the stream so the receiver can check against it.
struct Sent {
  uint64_t bytes = 0;
  bool shut = false;
  bool reset = false;
};

struct Rec {
  bool local = false;
  bool answered = false;  // local: OpenOk arrived; peer: accept() was called
  bool shut = false;
  bool fin_seen = false;
  bool blocked = false;  // the application waits for on_writable
  uint64_t backlog = 0;  // bytes the application still wants to send
  uint64_t received = 0;
  uint64_t unconsumed = 0;
  std::vector<Slice> held;  // received bytes not consumed yet
};

struct World;

class App final : public MuxHandler {
 public:
  App(World& world, int side) : w_(world), side_(side) {}
  Mux* mux = nullptr;
  std::map<StreamId, Rec> recs;
  std::multiset<uint64_t> pings;  // tokens not answered yet
  bool auto_accept = true;
  bool auto_consume = true;
  bool ready = false;
  StreamId last_peer_open = 0;

  void on_ready(const Hello&) override {
    FUZZ_CHECK(!ready);
    ready = true;
  }
  void on_open(StreamId id, const wire::Target& target) override;
  void on_open_result(StreamId id, const Error* error) override;
  void on_data(StreamId id, Slice data) override;
  void on_fin(StreamId id) override;
  void on_reset(StreamId id, const Error& error) override;
  void on_writable(StreamId id) override;
  void on_closed(StreamId id) override;
  void on_control(const wire::Control& message) override { g_sink = g_sink + walk_control(message); }
  void on_goaway(const std::string& message) override { g_sink = g_sink + message.size(); }
  void on_pong(uint64_t token) override {
    auto it = pings.find(token);
    FUZZ_CHECK(it != pings.end());
    pings.erase(it);
  }

  void open(uint8_t arg);
  void want(StreamId id, uint64_t n);
  void push(StreamId id);
  void shutdown(StreamId id);
  void reset(StreamId id);
  void consume(StreamId id, uint64_t n);
  void answer(StreamId id, bool ok);
  void ping(uint64_t token) {
    pings.insert(token);
    mux->ping(token);
  }
  // Picks a live stream by index, or 0.
  StreamId pick(uint8_t index) const {
    if (recs.empty()) return 0;
    auto it = recs.begin();
    std::advance(it, index % recs.size());
    return it->first;
  }
  void check() const;
  void check_quiet() const;

 private:
  void in_callback(StreamId id);

  World& w_;
  int side_;
};

struct World {
  MuxConfig config;
  Rng rng{0};
  BufferPool pool{256 * 1024, 32};  // the applications' send buffers
  GuardedFeed feed;
  std::map<std::pair<int, StreamId>, Sent> ledger;
  uint64_t budget = kByteBudget;
  bool callbacks_act = false;
  size_t max_iov = 64;
  std::string wire[2];  // bytes side i wrote to the transport that side 1-i has not read yet
  App app[2]{App(*this, 0), App(*this, 1)};
  std::unique_ptr<Mux> mux[2];

  // Moves up to `limit` bytes of side i's output onto the wire.
  size_t flush(int i, size_t limit) {
    iovec iov[64];
    const size_t n = mux[i]->prepare_output(std::span(iov, max_iov));
    size_t copied = 0;
    for (size_t k = 0; k < n && copied < limit; ++k) {
      const size_t take = std::min(iov[k].iov_len, limit - copied);
      wire[i].append(static_cast<const char*>(iov[k].iov_base), take);
      copied += take;
    }
    mux[i]->consume_output(copied);
    return copied;
  }

  // Feeds up to `limit` bytes of the wire from side i to side 1-i, `chunk` bytes per feed, but in no more
  // than about 512 feeds: tiny chunks matter around headers, and would only make bulk transfers slow.
  size_t deliver(int i, size_t limit, size_t chunk) {
    const std::string bytes = wire[i].substr(0, limit);
    wire[i].erase(0, bytes.size());
    chunk = std::clamp<size_t>(std::max(chunk, bytes.size() / 512), 1, GuardedFeed::kMax);
    for (size_t pos = 0; pos < bytes.size(); pos += chunk) {
      const size_t n = std::min(chunk, bytes.size() - pos);
      const auto* p = reinterpret_cast<const std::byte*>(bytes.data() + pos);
      const Status st = mux[1 - i]->feed(feed.slice(std::span(p, n)));
      if (!st) std::fprintf(stderr, "feed failed: %s\n", st.error().to_string().c_str());
      FUZZ_CHECK(st.ok());
    }
    return bytes.size();
  }

  // Moves bytes both ways until neither side has anything to send.
  void settle(size_t chunk) {
    for (int round = 0;; ++round) {
      FUZZ_CHECK(round < 100000);
      size_t moved = 0;
      for (int i = 0; i < 2; ++i) moved += flush(i, SIZE_MAX);
      for (int i = 0; i < 2; ++i) moved += deliver(i, SIZE_MAX, chunk);
      if (moved == 0) break;
    }
    FUZZ_CHECK(!mux[0]->has_output() && !mux[1]->has_output());
  }

  void check() const {
    app[0].check();
    app[1].check();
  }
};

void App::open(uint8_t arg) {
  wire::TargetT t;
  t.proto = wire::Proto::Unix;
  t.path = std::string(arg % 64, 'p');
  auto id = mux->open(t);
  if (!id) return;
  FUZZ_CHECK((*id & 1u) == (side_ == 0 ? 1u : 0u));
  FUZZ_CHECK(recs.count(*id) == 0);
  recs[*id].local = true;
}

void App::on_open(StreamId id, const wire::Target& target) {
  FUZZ_CHECK((id & 1u) == (side_ == 0 ? 0u : 1u));
  FUZZ_CHECK(id > last_peer_open);
  FUZZ_CHECK(recs.count(id) == 0);
  last_peer_open = id;
  g_sink = g_sink + (target.path() ? target.path()->size() : 0);
  recs[id];
  if (auto_accept) answer(id, true);
  in_callback(id);
}

void App::on_open_result(StreamId id, const Error* error) {
  auto it = recs.find(id);
  FUZZ_CHECK(it != recs.end() && it->second.local && !it->second.answered);
  if (error != nullptr) {
    recs.erase(it);
    return;
  }
  it->second.answered = true;
  in_callback(id);
}

void App::on_data(StreamId id, Slice data) {
  auto it = recs.find(id);
  FUZZ_CHECK(it != recs.end());
  Rec& r = it->second;
  FUZZ_CHECK(!r.fin_seen);
  FUZZ_CHECK(!data.empty());
  FUZZ_CHECK(matches(data.data(), data.size(), 1 - side_, id, r.received));
  r.received += data.size();
  FUZZ_CHECK(r.received <= w_.ledger[{1 - side_, id}].bytes);
  if (auto_consume) {
    mux->consume(id, data.size());
  } else {
    r.unconsumed += data.size();
    if (r.held.size() < 16) r.held.push_back(std::move(data));
  }
  in_callback(id);
}

void App::on_fin(StreamId id) {
  auto it = recs.find(id);
  FUZZ_CHECK(it != recs.end());
  FUZZ_CHECK(!it->second.fin_seen);
  const Sent& peer = w_.ledger[{1 - side_, id}];
  FUZZ_CHECK(peer.shut);
  FUZZ_CHECK(it->second.received == peer.bytes);  // FIN follows the last byte
  it->second.fin_seen = true;
  in_callback(id);
}

void App::on_reset(StreamId id, const Error& error) {
  FUZZ_CHECK(recs.erase(id) == 1);
  FUZZ_CHECK(w_.ledger[{1 - side_, id}].reset);
  g_sink = g_sink + error.message.size();
}

void App::on_writable(StreamId id) {
  auto it = recs.find(id);
  FUZZ_CHECK(it != recs.end());
  FUZZ_CHECK(!it->second.shut);
  it->second.blocked = false;
  push(id);
  in_callback(id);
}

void App::on_closed(StreamId id) {
  auto it = recs.find(id);
  FUZZ_CHECK(it != recs.end());
  FUZZ_CHECK(it->second.fin_seen && it->second.shut);
  FUZZ_CHECK(it->second.received == w_.ledger[{1 - side_, id}].bytes);
  recs.erase(it);
}

// What an application might do while the mux is calling it: end the stream, or write to the transport.
void App::in_callback(StreamId id) {
  if (!w_.callbacks_act) return;
  const auto r = w_.rng.below(100);
  if (r < 4) {
    if (recs.count(id)) reset(id);
  } else if (r < 8) {
    if (recs.count(id)) shutdown(id);
  }
  if (w_.rng.percent(40)) w_.flush(side_, 1 + w_.rng.below(64 * 1024));
}

void App::want(StreamId id, uint64_t n) {
  auto it = recs.find(id);
  if (it == recs.end() || it->second.shut) return;
  n = std::min(n, w_.budget);
  w_.budget -= n;
  it->second.backlog += n;
  push(id);
}

// Gives the mux as much of the backlog as send_capacity allows; waits for on_writable if some is left.
// send() may call on_writable, which pushes again from inside: every round looks the stream up afresh.
void App::push(StreamId id) {
  while (true) {
    auto it = recs.find(id);
    if (it == recs.end()) return;
    Rec& r = it->second;
    if (r.shut || r.backlog == 0) {
      r.blocked = false;
      return;
    }
    const size_t cap = mux->send_capacity(id);
    if (cap == 0) {
      r.blocked = true;
      return;
    }
    // Sometimes a sub-range of a buffer, to exercise Slices that do not start at offset 0.
    const size_t offset = w_.rng.percent(30) ? w_.rng.below(4096) : 0;
    const size_t take = std::min<uint64_t>({r.backlog, cap, w_.pool.block_size() - offset});
    Sent& sent = w_.ledger[{side_, id}];
    Slice s = w_.pool.acquire().sub(offset, take);
    fill(s.data(), take, side_, id, sent.bytes);
    sent.bytes += take;
    r.backlog -= take;
    FUZZ_CHECK(mux->send(id, std::move(s)));
  }
}

void App::shutdown(StreamId id) {
  auto it = recs.find(id);
  if (it == recs.end() || it->second.shut) return;
  it->second.shut = true;
  it->second.backlog = 0;
  it->second.blocked = false;
  w_.ledger[{side_, id}].shut = true;
  mux->shutdown_write(id);  // may end the stream and call on_closed
}

void App::reset(StreamId id) {
  if (recs.erase(id) == 0) return;
  w_.ledger[{side_, id}].reset = true;
  mux->reset(id, "reset by the fuzzer");
}

void App::consume(StreamId id, uint64_t n) {
  auto it = recs.find(id);
  if (it == recs.end()) return;
  n = std::min(n, it->second.unconsumed);
  if (n == 0) return;
  it->second.unconsumed -= n;
  if (it->second.unconsumed == 0) it->second.held.clear();
  mux->consume(id, n);
}

void App::answer(StreamId id, bool ok) {
  auto it = recs.find(id);
  if (it == recs.end() || it->second.local || it->second.answered) return;
  if (ok) {
    it->second.answered = true;
    mux->accept(id);
    push(id);
  } else {
    recs.erase(it);
    mux->reject(id, 111, "refused by the fuzzer");
  }
}

void App::check() const {
  FUZZ_CHECK(mux->stream_count() == recs.size());
  FUZZ_CHECK(mux->buffered_bytes() <= w_.config.max_buffered);
  for (const auto& [id, r] : recs) {
    const auto state = mux->stream_state(id);
    FUZZ_CHECK(state.has_value());
    switch (*state) {
      case StreamState::kOpening: FUZZ_CHECK(r.local && !r.answered); break;
      case StreamState::kAccepting: FUZZ_CHECK(!r.local && !r.answered); break;
      case StreamState::kOpen: FUZZ_CHECK(r.answered && !r.fin_seen); break;
      case StreamState::kHalfClosedLocal: FUZZ_CHECK(r.answered && r.shut && !r.fin_seen); break;
      case StreamState::kHalfClosedRemote: FUZZ_CHECK(r.answered && r.fin_seen); break;
      case StreamState::kClosed:
        FUZZ_CHECK(false);  // a closed stream is gone from the table as far as the application can tell
    }
    if (r.shut) FUZZ_CHECK(mux->send_capacity(id) == 0);
    if (!r.local && !r.answered) FUZZ_CHECK(mux->send_capacity(id) == 0);
  }
}

// After a settle: nothing the application waits for is owed to it.
void App::check_quiet() const {
  check();
  for (const auto& [id, r] : recs) {
    if (r.blocked) FUZZ_CHECK(mux->send_capacity(id) == 0);  // else on_writable was owed and never came
  }
}

size_t size_class(uint8_t arg) {
  static constexpr size_t kSizes[] = {1,     7,     64,     100,    512,    1500,   4096,
                                      16384, 65536, 100000, 262144, 300000, 1 << 20};
  return kSizes[arg % std::size(kSizes)];
}

void run_op(World& w, ByteReader& in) {
  const uint8_t op = in.u8();
  const uint8_t a = in.u8();
  const int side = a & 1;
  App& app = w.app[side];
  switch (op % 12) {
    case 0: app.open(a >> 1); break;
    case 1: {
      const StreamId id = app.pick(in.u8());
      app.want(id, size_class(a >> 1));
      break;
    }
    case 2: app.shutdown(app.pick(a >> 1)); break;
    case 3: app.reset(app.pick(a >> 1)); break;
    case 4: {
      const StreamId id = app.pick(a >> 1);
      app.consume(id, size_class(in.u8()));
      break;
    }
    case 5: app.ping(in.u8()); break;
    case 6: w.mux[side]->goaway("fuzz goaway"); break;
    case 7: {
      // A partial transport write and a partial read, in chunks the input picks.
      const size_t limit = 1 + (size_t{in.u16()} << (a >> 5));
      w.flush(side, limit);
      w.deliver(side, limit, 1 + (in.u8() << ((a >> 1) & 15)));
      break;
    }
    case 8:
      w.settle(1 + (size_t{in.u8()} << ((a >> 1) & 15)));
      w.app[0].check_quiet();
      w.app[1].check_quiet();
      break;
    case 9: app.answer(app.pick(in.u8()), (a & 2) == 0); break;
    case 10:
      if (a & 2) app.auto_accept = !app.auto_accept;
      if (a & 4) app.auto_consume = !app.auto_consume;
      break;
    case 11: {
      flatbuffers::FlatBufferBuilder b;
      if (a & 2) {
        std::vector<flatbuffers::Offset<wire::Listener>> added;
        for (int k = 0; k < (a >> 2); ++k) {
          added.push_back(wire::CreateListener(b, wire::Proto::Tcp, wire::Family::Inet4,
                                               b.CreateString("127.0.0.1"), static_cast<uint16_t>(8000 + k)));
        }
        b.Finish(wire::CreateControl(b, wire::Message::Ports,
                                     wire::CreatePorts(b, b.CreateVector(added), 0, (a & 4) != 0).Union()));
      } else {
        std::vector<flatbuffers::Offset<wire::FileEvent>> events;
        for (int k = 0; k < (a >> 2); ++k) {
          events.push_back(
              wire::CreateFileEvent(b, wire::FileEventKind::Modify, b.CreateString("dir/file"), 0, false));
        }
        b.Finish(wire::CreateControl(
            b, wire::Message::FileEvents,
            wire::CreateFileEvents(b, b.CreateString("share"), b.CreateVector(events)).Union()));
      }
      w.mux[side]->send_control(b);
      break;
    }
  }
}

}  // namespace
}  // namespace vbridge::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace vbridge;
  using namespace vbridge::fuzz;
  ByteReader in(data, size);
  const uint8_t flags = in.u8();
  auto w = std::make_unique<World>();
  w->rng = Rng(in.u16());
  MuxConfig& c = w->config;
  if (flags & 1) c.initial_window = 1024;
  if (flags & 2) c.max_frame = 1024;
  if (flags & 4) c.quantum = 1024;
  if (flags & 8) c.output_watermark = 2048;
  if (flags & 16) c.max_buffered = 16 * 1024;
  if (flags & 32) c.max_streams = 3;
  w->callbacks_act = (flags & 64) != 0;
  if (flags & 128) w->max_iov = 2;
  w->mux[0] = std::make_unique<Mux>(Role::kHost, w->app[0], c);
  w->mux[1] = std::make_unique<Mux>(Role::kGuest, w->app[1], c);
  w->app[0].mux = w->mux[0].get();
  w->app[1].mux = w->mux[1].get();

  while (!in.empty()) {
    run_op(*w, in);
    w->check();
  }

  // Let everything finish: answer every open, consume everything, settle.
  for (App& app : w->app) {
    app.auto_accept = true;
    app.auto_consume = true;
    std::vector<StreamId> ids;
    for (const auto& [id, r] : app.recs) ids.push_back(id);
    for (const StreamId id : ids) {
      app.answer(id, true);
      app.consume(id, UINT64_MAX);
    }
  }
  w->settle(64 * 1024);
  w->app[0].check_quiet();
  w->app[1].check_quiet();
  for (int i = 0; i < 2; ++i) {
    const App& app = w->app[i];
    const App& peer = w->app[1 - i];
    FUZZ_CHECK(app.pings.empty());
    FUZZ_CHECK(w->mux[i]->buffered_bytes() == 0);
    FUZZ_CHECK(app.recs.size() == peer.recs.size());
    for (const auto& [id, r] : app.recs) {
      FUZZ_CHECK(peer.recs.count(id) == 1);
      FUZZ_CHECK(r.received == w->ledger[{1 - i, id}].bytes);
      FUZZ_CHECK(!(r.shut && peer.recs.at(id).shut));  // both FINs went: the stream must be gone
      FUZZ_CHECK(r.backlog == 0 || !r.blocked || w->mux[i]->send_capacity(id) == 0);
    }
  }
  // Muxes go first: they hold Slices of the pool.
  w->mux[0].reset();
  w->mux[1].reset();
  return 0;
}
