// vbridge-soak: integrity soak, many held connections and connection churn through the bridge.
//
//   vbridge-soak serve [--unix PATH]... [--tcp HOST:PORT]...
//   vbridge-soak soak  --connect ADDR [--connect ADDR]... --seconds T [--streams N] [--slow-readers K]
//                      [--slow-rate BYTES_PER_S] [--max-size BYTES] [--seed S] [--drain-seconds D]
//   vbridge-soak hold  --connect ADDR         (commands on stdin: "open N", "check"; EOF closes all)
//   vbridge-soak churn --connect ADDR --seconds T [--rate PER_S] [--parallel P]
//
// ADDR is unix:/path, tcp:127.0.0.1:PORT or tcp:[::1]:PORT. Every client mode prints one JSON line per
// result on stdout and exits non-zero if anything was lost, corrupted or failed.
//
// Each connection opens with a 24-byte little-endian header: u32 magic | u32 0 | u64 seed | u64 length.
//   "VBSK" verified stream: the client sends `length` bytes of the keyed stream generate(seed); the server
//          checks every byte against its own generate(seed) and echoes what it received; after the
//          client's EOF it sends a trailer u64 received | u64 mismatched bytes and closes. The client checks
//          the echo against generate(seed) too, so corruption in either direction is caught, and loss
//          shows as a short count.
//   "VBEC" plain echo until EOF (seed and length unused).
//
// The server is one epoll loop over nonblocking sockets and stops reading a connection while its echo is
// unsent, so a slow client pushes back through the whole path instead of growing the server.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "bench_io.h"

namespace bench_io {

[[noreturn]] void fail(const std::string& what) { exit_with("vbridge-soak", 2, what); }

}  // namespace bench_io

namespace {

using namespace bench_io;

constexpr uint32_t kMagicSoak = 0x4b534256;  // "VBSK"
constexpr uint32_t kMagicEcho = 0x43454256;  // "VBEC"
constexpr size_t kHeaderSize = 24;
constexpr size_t kTrailerSize = 16;
constexpr size_t kChunk = 64 * 1024;

void put_u32(char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
void put_u64(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
uint32_t get_u32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}
uint64_t get_u64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// The keyed byte stream: word i of stream `seed` is splitmix64(seed + i * golden), so any range can be
// generated on its own (a partial send regenerates rather than buffers) at several GB/s.

uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void generate(uint64_t seed, uint64_t offset, char* out, size_t n) {
  constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;
  uint64_t word_index = offset / 8;
  size_t skip = offset % 8;
  while (n > 0) {
    const uint64_t w = mix(seed + word_index * kGolden);
    char bytes[8];
    std::memcpy(bytes, &w, 8);  // little-endian hosts only, like the rest of the bridge
    const size_t take = std::min(n, 8 - skip);
    std::memcpy(out, bytes + skip, take);
    out += take;
    n -= take;
    skip = 0;
    ++word_index;
  }
}

// Bytes of data[0, n) that differ from generate(seed) at offset.
uint64_t count_mismatches(uint64_t seed, uint64_t offset, const char* data, size_t n) {
  static thread_local std::vector<char> expected;
  expected.resize(n);
  generate(seed, offset, expected.data(), n);
  if (std::memcmp(expected.data(), data, n) == 0) return 0;
  uint64_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += expected[i] != data[i];
  return bad;
}

// ---------------------------------------------------------------------------------------------------------
// Command line

constexpr const char* kUsage =
    "usage: vbridge-soak serve [--unix PATH]... [--tcp HOST:PORT]...\n"
    "       vbridge-soak soak --connect ADDR [--connect ADDR]... --seconds T [--streams N]\n"
    "                         [--slow-readers K] [--slow-rate BYTES_PER_S] [--max-size BYTES] [--seed S]\n"
    "                         [--drain-seconds D]\n"
    "       vbridge-soak hold --connect ADDR   (stdin: \"open N\", \"check\"; EOF closes everything)\n"
    "       vbridge-soak churn --connect ADDR --seconds T [--rate PER_S] [--parallel P]\n"
    "ADDR: unix:/path, tcp:127.0.0.1:PORT, tcp:[::1]:PORT";

Options parse_options(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") {
    std::puts(kUsage);
    std::exit(argc < 2 ? 2 : 0);
  }
  return bench_io::parse_options(
      argc, argv, {},
      {"--unix", "--tcp", "--connect", "--seconds", "--streams", "--slow-readers", "--slow-rate",
       "--max-size", "--seed", "--drain-seconds", "--rate", "--parallel"},
      std::string("\n") + kUsage);
}

// ---------------------------------------------------------------------------------------------------------
// Connection header

void make_header(char* h, uint32_t magic, uint64_t seed, uint64_t length) {
  put_u32(h, magic);
  put_u32(h + 4, 0);
  put_u64(h + 8, seed);
  put_u64(h + 16, length);
}

// ---------------------------------------------------------------------------------------------------------
// Server

struct ServerConn {
  int fd = -1;
  char header[kHeaderSize] = {};
  size_t header_got = 0;
  uint32_t magic = 0;
  uint64_t seed = 0;
  uint64_t length = 0;
  uint64_t received = 0;
  uint64_t mismatched = 0;
  bool peer_done = false;
  bool trailer_queued = false;
  std::vector<char> pending;  // echo (and trailer) not yet written
  size_t pending_off = 0;
  uint32_t interest = 0;
};

class Server {
 public:
  int run(const Options& opt) {
    std::vector<Address> wanted;
    for (const auto& p : opt.all("--unix")) wanted.push_back(parse_address("unix:" + p));
    for (const auto& hp : opt.all("--tcp")) wanted.push_back(parse_address("tcp:" + hp));
    if (wanted.empty()) fail("serve needs --unix PATH and/or --tcp HOST:PORT");
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0) fail(errno_text("epoll_create1"));
    std::string names;
    for (const auto& a : wanted) {
      const int fd = listen_on(a);
      listeners_.push_back(fd);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = kListenerTag | static_cast<uint32_t>(fd);
      if (epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev) != 0) fail(errno_text("epoll_ctl"));
      names += (names.empty() ? "" : ",") + quote(describe(bound_address(fd, a)));
    }
    Json().str("mode", "serve").raw("listening", "[" + names + "]").print();

    std::vector<epoll_event> events(256);
    for (;;) {
      const int n = epoll_wait(ep_, events.data(), static_cast<int>(events.size()), -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        fail(errno_text("epoll_wait"));
      }
      for (int i = 0; i < n; ++i) {
        const uint64_t tag = events[i].data.u64;
        if (tag & kListenerTag) {
          accept_all(static_cast<int>(tag & 0xffffffffu));
        } else {
          service(static_cast<int>(tag));
        }
      }
    }
  }

 private:
  static constexpr uint64_t kListenerTag = 1ull << 32;

  void accept_all(int listener) {
    for (;;) {
      const int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;  // EAGAIN, EMFILE (the peer then waits in the backlog) or a connection gone
      if (static_cast<size_t>(fd) >= conns_.size()) conns_.resize(static_cast<size_t>(fd) + 1024);
      conns_[static_cast<size_t>(fd)] = std::make_unique<ServerConn>();
      conns_[static_cast<size_t>(fd)]->fd = fd;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = static_cast<uint32_t>(fd);
      conns_[static_cast<size_t>(fd)]->interest = EPOLLIN;
      if (epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev) != 0) drop(fd);
    }
  }

  void drop(int fd) {
    epoll_ctl(ep_, EPOLL_CTL_DEL, fd, nullptr);
    close(fd);
    conns_[static_cast<size_t>(fd)].reset();
  }

  void want(ServerConn& c, uint32_t interest) {
    if (c.interest == interest) return;
    epoll_event ev{};
    ev.events = interest;
    ev.data.u64 = static_cast<uint32_t>(c.fd);
    epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &ev);
    c.interest = interest;
  }

  // Writes what is pending; false if the connection is gone.
  static bool flush(ServerConn& c) {
    while (c.pending_off < c.pending.size()) {
      const ssize_t w =
          send(c.fd, c.pending.data() + c.pending_off, c.pending.size() - c.pending_off, MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EINTR) continue;
        return errno == EAGAIN;
      }
      c.pending_off += static_cast<size_t>(w);
    }
    c.pending.clear();
    c.pending_off = 0;
    return true;
  }

  void service(int fd) {
    if (static_cast<size_t>(fd) >= conns_.size() || !conns_[static_cast<size_t>(fd)]) return;
    ServerConn& c = *conns_[static_cast<size_t>(fd)];
    if (!flush(c)) return drop(fd);
    // Read only while nothing is waiting to go back: a slow client pushes back through the path.
    for (int rounds = 0; c.pending.empty() && !c.peer_done && rounds < 4; ++rounds) {
      const ssize_t r = read(fd, buf_, sizeof buf_);
      if (r < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        return drop(fd);
      }
      if (r == 0) {
        c.peer_done = true;
        break;
      }
      const char* data = buf_;
      size_t n = static_cast<size_t>(r);
      if (c.header_got < kHeaderSize) {
        const size_t take = std::min(n, kHeaderSize - c.header_got);
        std::memcpy(c.header + c.header_got, data, take);
        c.header_got += take;
        data += take;
        n -= take;
        if (c.header_got == kHeaderSize) {
          c.magic = get_u32(c.header);
          c.seed = get_u64(c.header + 8);
          c.length = get_u64(c.header + 16);
          if (c.magic != kMagicSoak && c.magic != kMagicEcho) return drop(fd);
        }
      }
      if (n == 0) continue;
      if (c.magic == kMagicSoak) {
        const uint64_t in_range = c.received < c.length ? std::min<uint64_t>(n, c.length - c.received) : 0;
        c.mismatched += count_mismatches(c.seed, c.received, data, static_cast<size_t>(in_range));
        c.mismatched += n - in_range;  // bytes past the announced length
      }
      c.received += n;
      c.pending.assign(data, data + n);
      c.pending_off = 0;
      if (!flush(c)) return drop(fd);
    }
    if (c.peer_done && c.pending.empty()) {
      if (c.magic == kMagicSoak && !c.trailer_queued) {
        c.trailer_queued = true;
        c.pending.resize(kTrailerSize);
        put_u64(c.pending.data(), c.received);
        put_u64(c.pending.data() + 8, c.mismatched);
        if (!flush(c)) return drop(fd);
      }
      if (c.pending.empty()) return drop(fd);
    }
    want(c, c.pending.empty() ? EPOLLIN : EPOLLOUT);
  }

  int ep_ = -1;
  std::vector<int> listeners_;
  std::vector<std::unique_ptr<ServerConn>> conns_;
  char buf_[kChunk];
};

// ---------------------------------------------------------------------------------------------------------
// soak: N concurrent verified streams of random sizes, some read slowly, for a duration

struct SoakStream {
  int fd = -1;
  size_t slot = 0;
  bool slow = false;
  uint64_t seed = 0;
  uint64_t length = 0;
  char header[kHeaderSize] = {};
  uint64_t sent = 0;      // header + payload bytes written
  uint64_t received = 0;  // echo + trailer bytes read
  char trailer[kTrailerSize] = {};
  bool send_done = false;
  double budget = 0;  // slow readers: bytes they may read now
  uint32_t interest = 0;
  Clock::time_point last_progress;
};

struct SoakTotals {
  uint64_t started = 0;
  uint64_t completed = 0;
  uint64_t slow_completed = 0;
  uint64_t bytes_sent = 0;      // payload bytes sent
  uint64_t bytes_verified = 0;  // echoed payload bytes checked
  uint64_t mismatched = 0;      // corrupted, missing or extra bytes, either direction
  uint64_t errors = 0;          // streams that ended early (reset, EOF before the trailer, stall)
  std::string first_error;
};

class Soak {
 public:
  explicit Soak(const Options& opt)
      : seconds_(opt.number("--seconds")),
        drain_seconds_(opt.number("--drain-seconds", 60)),
        streams_(std::max<size_t>(1, static_cast<size_t>(opt.number("--streams", 64)))),
        slow_(static_cast<size_t>(opt.number("--slow-readers", 0))),
        slow_rate_(opt.number("--slow-rate", 1 << 20)),
        max_size_(static_cast<uint64_t>(opt.number("--max-size", 64 << 20))),
        rng_(static_cast<uint64_t>(opt.number("--seed", static_cast<double>(std::random_device{}())))) {
    for (const auto& a : opt.all("--connect")) addresses_.push_back(parse_address(a));
    if (addresses_.empty()) fail("soak needs --connect ADDR");
    if (slow_ > streams_) fail("--slow-readers must not exceed --streams");
  }

  int run() {
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0) fail(errno_text("epoll_create1"));
    slots_.resize(streams_);
    const auto t0 = Clock::now();
    const auto stop_starting = after(seconds_);
    const auto hard_stop = after(seconds_ + drain_seconds_);
    auto last_report = t0;
    auto last_tick = t0;
    for (size_t i = 0; i < streams_; ++i) start(i);
    std::vector<epoll_event> events(256);
    while (true) {
      const auto now = Clock::now();
      const bool starting = now < stop_starting;
      if (!starting && live_ == 0) break;
      if (now >= hard_stop) {
        for (auto& s : slots_)
          if (s) end(*s, "still open " + std::to_string(drain_seconds_) + " s after the end of the run");
        break;
      }
      // Slow readers get their budget in 10 ms ticks; after the end of the run they read freely.
      const double tick = std::chrono::duration<double>(now - last_tick).count();
      if (tick >= 0.01) {
        last_tick = now;
        for (auto& s : slots_) {
          if (!s || !s->slow) continue;
          s->budget = starting ? std::min(s->budget + tick * slow_rate_, slow_rate_ * 0.05) : 1e18;
          update_interest(*s);
        }
        for (auto& s : slots_)
          if (s && now - s->last_progress > std::chrono::seconds(30))
            end(*s, "no progress for 30 s (sent " + std::to_string(s->sent) + ", received " +
                        std::to_string(s->received) + " of " + std::to_string(s->length) + ")");
      }
      if (now - last_report >= std::chrono::seconds(10)) {
        last_report = now;
        std::fprintf(
            stderr,
            "vbridge-soak: %.0f s: %llu streams done, %llu MB verified, %llu mismatched, %llu errors\n",
            seconds_since(t0), static_cast<unsigned long long>(totals_.completed),
            static_cast<unsigned long long>(totals_.bytes_verified / 1000000),
            static_cast<unsigned long long>(totals_.mismatched),
            static_cast<unsigned long long>(totals_.errors));
      }
      const int n = epoll_wait(ep_, events.data(), static_cast<int>(events.size()), 10);
      if (n < 0 && errno != EINTR) fail(errno_text("epoll_wait"));
      for (int i = 0; i < n; ++i) {
        const size_t slot = events[i].data.u64;
        if (!slots_[slot]) continue;
        SoakStream& s = *slots_[slot];
        if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(s);
        if (s.fd >= 0 && (events[i].events & EPOLLOUT)) on_writable(s);
        if (slots_[slot] && slots_[slot]->fd < 0) {
          slots_[slot].reset();
          --live_;
          if (Clock::now() < stop_starting) start(slot);
        }
      }
      // Streams ended outside an event (stalls, start failures) are replaced here.
      for (size_t i = 0; i < slots_.size(); ++i) {
        if (slots_[i] && slots_[i]->fd < 0) {
          slots_[i].reset();
          --live_;
          if (Clock::now() < stop_starting) start(i);
        }
      }
    }
    const double elapsed = seconds_since(t0);
    Json j;
    j.str("mode", "soak").count("streams", streams_).count("slow_readers", slow_).num("seconds", elapsed);
    j.count("streams_started", totals_.started).count("streams_completed", totals_.completed);
    j.count("slow_streams_completed", totals_.slow_completed);
    j.count("bytes_sent", totals_.bytes_sent).count("bytes_verified", totals_.bytes_verified);
    j.num("MBps_each_way", static_cast<double>(totals_.bytes_verified) / elapsed / 1e6);
    j.count("mismatched_bytes", totals_.mismatched).count("errors", totals_.errors);
    if (!totals_.first_error.empty()) j.str("first_error", totals_.first_error);
    j.print();
    return totals_.mismatched == 0 && totals_.errors == 0 && totals_.completed > 0 ? 0 : 1;
  }

 private:
  uint64_t random_size(bool slow) {
    if (slow) return std::uniform_int_distribution<uint64_t>(8 << 20, 24 << 20)(rng_);
    if (std::uniform_int_distribution<int>(0, 15)(rng_) == 0) return 0;
    const double bits =
        std::uniform_real_distribution<double>(0, std::log2(static_cast<double>(max_size_)))(rng_);
    return static_cast<uint64_t>(std::exp2(bits));
  }

  void start(size_t slot) {
    auto s = std::make_unique<SoakStream>();
    s->slot = slot;
    s->slow = slot < slow_;
    s->seed = rng_();
    s->length = random_size(s->slow);
    s->last_progress = Clock::now();
    make_header(s->header, kMagicSoak, s->seed, s->length);
    const Address& a = addresses_[next_address_++ % addresses_.size()];
    ++totals_.started;
    ++live_;
    s->fd = socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    SoakStream& ref = *s;
    slots_[slot] = std::move(s);
    if (ref.fd < 0) return end(ref, errno_text("socket"));
    // A blocking connect: the bridge accepts at once, and the loop stays simple.
    set_io_timeout(ref.fd, 10);
    if (connect(ref.fd, a.sa(), a.length) != 0) return end(ref, errno_text("connect " + a.text));
    set_nonblocking(ref.fd);
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT;
    ev.data.u64 = slot;
    ref.interest = ev.events;
    if (epoll_ctl(ep_, EPOLL_CTL_ADD, ref.fd, &ev) != 0) return end(ref, errno_text("epoll_ctl"));
  }

  // Ends a stream; an empty reason means it completed and was checked.
  void end(SoakStream& s, const std::string& reason) {
    if (!reason.empty()) {
      ++totals_.errors;
      if (totals_.first_error.empty()) totals_.first_error = reason;
    }
    if (s.fd >= 0) {
      if (s.interest != 0) epoll_ctl(ep_, EPOLL_CTL_DEL, s.fd, nullptr);
      close(s.fd);
    }
    s.fd = -1;
  }

  // A paused stream leaves the epoll set altogether: EPOLLHUP would be reported even with no interest.
  void update_interest(SoakStream& s) {
    if (s.fd < 0) return;
    uint32_t interest = 0;
    if (!s.slow || s.budget >= 1) interest |= EPOLLIN;
    if (!s.send_done) interest |= EPOLLOUT;
    if (interest == s.interest) return;
    epoll_event ev{};
    ev.events = interest;
    ev.data.u64 = s.slot;
    const int op = interest == 0 ? EPOLL_CTL_DEL : s.interest == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    if (epoll_ctl(ep_, op, s.fd, &ev) != 0) return end(s, errno_text("epoll_ctl"));
    s.interest = interest;
  }

  void on_writable(SoakStream& s) {
    const uint64_t total = kHeaderSize + s.length;
    for (int rounds = 0; rounds < 4 && s.sent < total; ++rounds) {
      size_t n = 0;
      if (s.sent < kHeaderSize) {
        n = kHeaderSize - static_cast<size_t>(s.sent);
        std::memcpy(buf_, s.header + s.sent, n);
      }
      const uint64_t payload_off = s.sent + n - kHeaderSize;
      const size_t payload_n =
          static_cast<size_t>(std::min<uint64_t>(sizeof buf_ - n, s.length - payload_off));
      generate(s.seed, payload_off, buf_ + n, payload_n);
      n += payload_n;
      const ssize_t w = send(s.fd, buf_, n, MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        return end(s, errno_text("send"));
      }
      const uint64_t before_payload = s.sent < kHeaderSize ? kHeaderSize - s.sent : 0;
      if (static_cast<uint64_t>(w) > before_payload)
        totals_.bytes_sent += static_cast<uint64_t>(w) - before_payload;
      s.sent += static_cast<uint64_t>(w);
      s.last_progress = Clock::now();
    }
    if (s.sent == total && !s.send_done) {
      s.send_done = true;
      shutdown(s.fd, SHUT_WR);
    }
    update_interest(s);
  }

  void on_readable(SoakStream& s) {
    const uint64_t total = s.length + kTrailerSize;
    for (int rounds = 0; rounds < 4; ++rounds) {
      size_t want = sizeof buf_;
      if (s.slow) {
        if (s.budget < 1) break;
        want = std::min<size_t>(want, static_cast<size_t>(std::min(s.budget, 1e9)));
      }
      const ssize_t r = read(s.fd, buf_, want);
      if (r < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        return end(s, errno_text("read"));
      }
      if (r == 0) {
        if (s.received < total)
          return end(s,
                     "EOF after " + std::to_string(s.received) + " of " + std::to_string(total) + " bytes");
        return finish(s);
      }
      size_t n = static_cast<size_t>(r);
      if (s.slow) s.budget -= static_cast<double>(n);
      s.last_progress = Clock::now();
      const char* data = buf_;
      if (s.received < s.length) {
        const size_t echo = static_cast<size_t>(std::min<uint64_t>(n, s.length - s.received));
        const uint64_t bad = count_mismatches(s.seed, s.received, data, echo);
        if (bad != 0 && totals_.mismatched == 0)
          totals_.first_error = "echo differs at offset " + std::to_string(s.received) + " of a stream";
        totals_.mismatched += bad;
        totals_.bytes_verified += echo;
        s.received += echo;
        data += echo;
        n -= echo;
      }
      if (n > 0) {
        if (s.received + n > total) return end(s, "more bytes than sent plus the trailer");
        std::memcpy(s.trailer + (s.received - s.length), data, n);
        s.received += n;
      }
    }
    update_interest(s);
  }

  void finish(SoakStream& s) {
    const uint64_t server_received = get_u64(s.trailer);
    const uint64_t server_mismatched = get_u64(s.trailer + 8);
    if (server_received != s.length || server_mismatched != 0) {
      totals_.mismatched += server_mismatched + (server_received > s.length ? server_received - s.length
                                                                            : s.length - server_received);
      if (totals_.first_error.empty())
        totals_.first_error = "server received " + std::to_string(server_received) + " of " +
                              std::to_string(s.length) + " bytes, " + std::to_string(server_mismatched) +
                              " differing";
    }
    ++totals_.completed;
    if (s.slow) ++totals_.slow_completed;
    end(s, "");
  }

  double seconds_;
  double drain_seconds_;
  size_t streams_;
  size_t slow_;
  double slow_rate_;
  uint64_t max_size_;
  std::mt19937_64 rng_;
  std::vector<Address> addresses_;
  size_t next_address_ = 0;
  int ep_ = -1;
  std::vector<std::unique_ptr<SoakStream>> slots_;
  size_t live_ = 0;
  SoakTotals totals_;
  char buf_[kChunk];
};

// ---------------------------------------------------------------------------------------------------------
// hold: many concurrent echo connections, opened and checked on command

constexpr size_t kPingSize = 16;

class Hold {
 public:
  explicit Hold(const Options& opt) : address_(parse_address(opt.text("--connect"))) {}

  int run() {
    raise_fd_limit();
    std::string line;
    bool all_ok = true;
    while (std::getline(std::cin, line)) {
      if (line.rfind("open ", 0) == 0) {
        all_ok &= open_up_to(static_cast<size_t>(std::strtoull(line.c_str() + 5, nullptr, 10)));
      } else if (line == "check") {
        all_ok &= check();
      } else if (!line.empty()) {
        Json().str("error", "unknown command: " + line).print();
        all_ok = false;
      }
    }
    for (int fd : fds_) close(fd);
    return all_ok ? 0 : 1;
  }

 private:
  void ping_bytes(size_t index, uint64_t round, char* out) {
    put_u64(out, index);
    put_u64(out + 8, round);
  }

  bool open_up_to(size_t target) {
    const auto t0 = Clock::now();
    uint64_t failed = 0;
    std::string first_error;
    while (fds_.size() < target) {
      char msg[kHeaderSize + kPingSize];
      char reply[kPingSize];
      make_header(msg, kMagicEcho, 0, 0);
      ping_bytes(fds_.size(), 0, msg + kHeaderSize);
      const int fd = connect_to(address_, 10);
      if (fd >= 0 && write_all(fd, msg, sizeof msg) && read_exact(fd, reply, sizeof reply) &&
          std::memcmp(reply, msg + kHeaderSize, kPingSize) == 0) {
        fds_.push_back(fd);
        continue;
      }
      if (first_error.empty()) first_error = errno_text("connection " + std::to_string(fds_.size()));
      if (fd >= 0) close(fd);
      if (++failed > 100) break;
    }
    Json j;
    j.str("mode", "hold")
        .count("held", fds_.size())
        .count("failed", failed)
        .num("seconds", seconds_since(t0));
    if (!first_error.empty()) j.str("first_error", first_error);
    j.print();
    return failed == 0;
  }

  // Every held connection echoes a fresh 16-byte message: sent on all first, then read back from all.
  bool check() {
    ++round_;
    const auto t0 = Clock::now();
    uint64_t echoed = 0, failed = 0;
    std::string first_error;
    std::vector<bool> sent(fds_.size());
    for (size_t i = 0; i < fds_.size(); ++i) {
      char msg[kPingSize];
      ping_bytes(i, round_, msg);
      sent[i] = write_all(fds_[i], msg, sizeof msg);
    }
    for (size_t i = 0; i < fds_.size(); ++i) {
      char msg[kPingSize], reply[kPingSize];
      ping_bytes(i, round_, msg);
      if (sent[i] && read_exact(fds_[i], reply, sizeof reply) && std::memcmp(reply, msg, sizeof msg) == 0) {
        ++echoed;
      } else {
        ++failed;
        if (first_error.empty()) first_error = errno_text("held connection " + std::to_string(i));
      }
    }
    Json j;
    j.str("mode", "check").count("held", fds_.size()).count("echoed", echoed).count("failed", failed);
    j.num("seconds", seconds_since(t0));
    if (!first_error.empty()) j.str("first_error", first_error);
    j.print();
    return failed == 0;
  }

  Address address_;
  std::vector<int> fds_;
  uint64_t round_ = 0;
};

// ---------------------------------------------------------------------------------------------------------
// churn: new connections at a target rate, each echoing a small message

int run_churn(const Options& opt) {
  const Address a = parse_address(opt.text("--connect"));
  const double seconds = opt.number("--seconds");
  const double rate = opt.number("--rate", 1000);
  const int parallel = std::max(1, static_cast<int>(opt.number("--parallel", 8)));
  const auto t0 = Clock::now();
  const auto deadline = after(seconds);
  const auto interval =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / rate));
  std::atomic<int64_t> next_ticket{0};

  const Trials trials = run_trials(
      parallel,
      [&](int) {
        const auto due = t0 + interval * next_ticket.fetch_add(1);
        if (due >= deadline) return false;
        std::this_thread::sleep_until(due);
        return true;
      },
      [&](int p, uint64_t n) -> std::string {
        char msg[kHeaderSize + 32];
        char reply[32];
        make_header(msg, kMagicEcho, 0, 0);
        generate(static_cast<uint64_t>(p), n * 32, msg + kHeaderSize, 32);
        const int fd = connect_to(a, 10);
        const bool good = fd >= 0 && write_all(fd, msg, sizeof msg) && read_exact(fd, reply, sizeof reply) &&
                          std::memcmp(reply, msg + kHeaderSize, sizeof reply) == 0;
        std::string error = good ? "" : errno_text(fd < 0 ? "connect " + a.text : "echo");
        if (fd >= 0) close(fd);
        return error;
      });
  const uint64_t failures = trials.failures;
  const std::string& first_error = trials.first_error;
  const double elapsed = seconds_since(t0);
  const Percentiles lat(trials.latencies_us);
  Json j;
  j.str("mode", "churn").num("target_per_second", rate).count("parallel", static_cast<uint64_t>(parallel));
  j.count("connections", lat.sorted.size()).count("failures", failures).num("seconds", elapsed);
  j.num("per_second", static_cast<double>(lat.sorted.size()) / elapsed);
  j.num("p50_us", lat.at(0.5)).num("p99_us", lat.at(0.99)).num("max_us", lat.max());
  if (!first_error.empty()) j.str("first_error", first_error);
  j.print();
  return failures == 0 && !lat.sorted.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  std::signal(SIGPIPE, SIG_IGN);
  if (opt.mode == "serve") {
    raise_fd_limit();
    return Server().run(opt);
  }
  if (opt.mode == "soak") return Soak(opt).run();
  if (opt.mode == "hold") return Hold(opt).run();
  if (opt.mode == "churn") return run_churn(opt);
  fail("unknown mode " + opt.mode + "\n" + kUsage);
}
