// vbridge-hostile: plays a misbehaving host against a live guest agent, or (--serve-guest) a misbehaving
// guest against a live host agent.
//
// It connects to the guest agent's transport (unix: or tcp:, with the --token-file token) as a host would,
// completes a proper HELLO, opens one good stream to an echo target the guest's policy allows and checks it
// echoes, then sends one malformed or forbidden input per case. Frames are written by hand, not through the
// Mux, so any byte can be wrong.
//
//   stream-level cases   the agent answers OPEN_FAIL (or ignores what concerns no live stream) and the good
//                        stream keeps echoing on the same connection
//   connection cases     the agent drops that transport connection (and logs one line saying why); the tool
//                        reconnects and checks that a fresh session echoes
//
// As a fake guest it listens for the host agent, connects a client through the host's socket
// (--client-socket) and echoes the stream the host opens for it; the same classes then go the other way.
//
// One line per case: name, what the agent did, PASS or FAIL. Exit status 1 if any case failed, 2 on a usage
// or setup error (the agent cannot be reached, the good stream never echoed).
#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "protocol/address.h"
#include "protocol/control_generated.h"
#include "protocol/frame.h"
#include "protocol/token_file.h"

namespace vbridge::hostile {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr StreamId kGood = 1;  // the echo stream of every session
constexpr auto kWait = milliseconds(5000);
constexpr uint32_t kOurWindow = 4u << 20;

struct Options {
  Address transport;
  // Fake-guest mode: listen here for a live host agent, and reach it as a client through this socket (its
  // docker.sock or a --forward-unix socket), whose streams the fake guest accepts and echoes.
  std::string serve_guest;
  std::string client_socket;
  std::string token;
  std::string echo_target = "echo";
  std::string stall_target;  // a guest socket that accepts and never reads (for DATA beyond the window)
  std::string share;         // a share the guest replays file events for
  int ping_flood = 2000;
};

// Printable ASCII as is, other bytes as \xNN, at most `max` bytes shown.
std::string shown(const std::string& text, size_t max = 100) {
  std::string out;
  for (size_t i = 0; i < text.size() && i < max; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    out += c >= 0x20 && c < 0x7f ? std::string(1, static_cast<char>(c)) : fmt::format("\\x{:02x}", c);
  }
  return text.size() > max ? out + "..." : out;
}

std::string bytes_of(const void* p, size_t n) { return std::string(static_cast<const char*>(p), n); }

std::string frame(FrameType type, StreamId id, const std::string& payload, uint32_t length_override = 0,
                  uint8_t raw_type = 0xff) {
  std::string out(kFrameHeaderSize, '\0');
  encode_header(FrameHeader{length_override != 0 ? length_override : static_cast<uint32_t>(payload.size()),
                            id, type, 0},
                reinterpret_cast<std::byte*>(out.data()));
  if (raw_type != 0xff) out[8] = static_cast<char>(raw_type);
  return out + payload;
}

std::string control(const flatbuffers::FlatBufferBuilder& b) {
  return bytes_of(b.GetBufferPointer(), b.GetSize());
}

std::string open_payload(wire::Proto proto, const std::string& path, uint16_t port = 0) {
  flatbuffers::FlatBufferBuilder b(256);
  wire::TargetT t;
  t.proto = proto;
  t.path = path;
  t.port = port;
  const auto target = wire::Target::Pack(b, &t);
  b.Finish(wire::CreateControl(b, wire::Message::Open, wire::CreateOpen(b, target).Union()));
  return control(b);
}

std::string u32(uint32_t v) {
  std::string out(4, '\0');
  store_u32(reinterpret_cast<std::byte*>(out.data()), v);
  return out;
}

std::string hello(const std::string& token) {
  Hello h;
  h.max_frame = 256 * 1024;
  h.initial_window = kOurWindow;
  h.max_streams = 1024;
  h.features = kFeaturePorts | kFeatureFileEvents | kFeatureUdp;
  h.token = token;
  const auto p = encode_hello(h);
  return frame(FrameType::kHello, 0, bytes_of(p.data(), p.size()));
}

struct StreamLog {
  bool open_ok = false;
  bool opened_by_peer = false;  // an OPEN from the peer (fake-guest mode: a host client's stream)
  bool echo = false;            // fake-guest mode: DATA received is sent back on the stream
  std::optional<std::pair<int, std::string>> open_fail;
  std::optional<std::string> rst;
  bool fin = false;
  std::string data;
  uint64_t unacked = 0;
};

// One transport connection, played as a host.
class Conn {
 public:
  ~Conn() {
    if (fd_ >= 0) ::close(fd_);
  }

  static std::unique_ptr<Conn> adopt(int fd) {
    auto c = std::make_unique<Conn>();
    c->fd_ = fd;
    ::fcntl(fd, F_SETFL, O_NONBLOCK);
    return c;
  }

  static std::unique_ptr<Conn> dial(const Address& a, std::string* error) {
    auto c = std::make_unique<Conn>();
    if (a.kind == Address::Kind::kUnix) {
      c->fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un sun{};
      sun.sun_family = AF_UNIX;
      std::strncpy(sun.sun_path, a.path.c_str(), sizeof(sun.sun_path) - 1);
      if (::connect(c->fd_, reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0) {
        *error = fmt::format("connect {}: {}", a.to_string(), std::strerror(errno));
        return nullptr;
      }
    } else if (a.kind == Address::Kind::kTcp) {
      addrinfo hints{};
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* found = nullptr;
      if (getaddrinfo(a.path.c_str(), std::to_string(a.port).c_str(), &hints, &found) != 0 ||
          found == nullptr) {
        *error = fmt::format("cannot resolve {}", a.to_string());
        return nullptr;
      }
      c->fd_ = ::socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
      const int rc = ::connect(c->fd_, found->ai_addr, found->ai_addrlen);
      freeaddrinfo(found);
      if (rc != 0) {
        *error = fmt::format("connect {}: {}", a.to_string(), std::strerror(errno));
        return nullptr;
      }
      const int one = 1;
      ::setsockopt(c->fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    } else {
      *error = "vbridge-hostile speaks unix: and tcp: transports only";
      return nullptr;
    }
    ::fcntl(c->fd_, F_SETFL, O_NONBLOCK);
    return c;
  }

  // Queues bytes and writes what the socket takes; the rest goes out while pumping.
  void send(const std::string& bytes) {
    out_ += bytes;
    flush();
  }
  // Closes our write side after what is queued (a truncated frame, then nothing more).
  void close_now() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    closed_ = true;
  }

  bool wait(const std::function<bool()>& done, milliseconds timeout = kWait) {
    const auto deadline = Clock::now() + timeout;
    while (!done()) {
      if (Clock::now() >= deadline) return false;
      pump(20);
    }
    return true;
  }
  // Reads and handles whatever arrives for `ms`.
  void settle(milliseconds ms) {
    const auto until = Clock::now() + ms;
    while (Clock::now() < until && !closed_) pump(10);
  }

  bool closed() const { return closed_; }
  const std::string& close_reason() const { return close_reason_; }
  const std::optional<Hello>& peer() const { return peer_; }
  StreamLog& stream(StreamId id) { return streams_[id]; }
  uint64_t pongs() const { return pongs_; }
  // Streams the peer opened, oldest first.
  const std::vector<StreamId>& opens() const { return opens_; }
  std::string peer_error() const { return peer_error_; }

 private:
  void flush() {
    while (fd_ >= 0 && !out_.empty()) {
      const ssize_t n = ::send(fd_, out_.data(), out_.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        out_.erase(0, static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
      mark_closed(fmt::format("write failed: {}", std::strerror(errno)));
      return;
    }
  }

  void mark_closed(const std::string& why) {
    if (closed_) return;
    closed_ = true;
    close_reason_ = why;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  void pump(int timeout_ms) {
    if (fd_ < 0) return;
    pollfd p{fd_, static_cast<short>(POLLIN | (out_.empty() ? 0 : POLLOUT)), 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return;
    if ((p.revents & POLLOUT) != 0) flush();
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) == 0 || fd_ < 0) return;
    char buf[65536];
    const ssize_t n = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) {
      in_.append(buf, static_cast<size_t>(n));
      parse();
    } else if (n == 0) {
      mark_closed("the agent closed the connection");
    } else if (errno != EAGAIN && errno != EINTR) {
      mark_closed(fmt::format("the agent reset the connection ({})", std::strerror(errno)));
    }
  }

  void parse() {
    while (in_.size() >= kFrameHeaderSize) {
      const auto* p = reinterpret_cast<const std::byte*>(in_.data());
      auto h = decode_header(p);
      if (!h) {
        mark_closed("the agent sent a malformed frame: " + h.error().message);
        return;
      }
      if (in_.size() < kFrameHeaderSize + h->length) return;
      const std::string payload = in_.substr(kFrameHeaderSize, h->length);
      in_.erase(0, kFrameHeaderSize + h->length);
      handle(*h, payload);
    }
  }

  void handle(const FrameHeader& h, const std::string& payload) {
    const auto bytes = std::as_bytes(std::span(payload));
    switch (h.type) {
      case FrameType::kHello: {
        auto got = decode_hello(bytes);
        if (got) peer_ = *got;
        return;
      }
      case FrameType::kData: {
        StreamLog& s = streams_[h.stream_id];
        if (s.echo) send(frame(FrameType::kData, h.stream_id, payload));
        s.data += payload;
        s.unacked += payload.size();
        if (s.unacked >= kOurWindow / 4) {
          send(frame(FrameType::kWindowUpdate, h.stream_id, u32(static_cast<uint32_t>(s.unacked))));
          s.unacked = 0;
        }
        return;
      }
      case FrameType::kDataRef:
      case FrameType::kRelease:
        mark_closed("the agent sent a shared-memory frame though this end announced no shared memory");
        return;
      case FrameType::kControl: {
        flatbuffers::Verifier v(reinterpret_cast<const uint8_t*>(payload.data()), payload.size());
        if (!wire::VerifyControlBuffer(v)) return;
        const auto* c = wire::GetControl(payload.data());
        if (c->message_type() == wire::Message::OpenOk) streams_[h.stream_id].open_ok = true;
        if (c->message_type() == wire::Message::Open) {
          streams_[h.stream_id].opened_by_peer = true;
          opens_.push_back(h.stream_id);
        }
        if (const auto* f = c->message_as_OpenFail()) {
          streams_[h.stream_id].open_fail = {f->errno_value(), f->message() ? f->message()->str() : ""};
        }
        if (const auto* g = c->message_as_GoAway()) peer_error_ = g->message() ? g->message()->str() : "";
        return;
      }
      case FrameType::kFin: streams_[h.stream_id].fin = true; return;
      case FrameType::kRst:
        if (h.stream_id == 0) {
          peer_error_ = payload.size() > 4 ? payload.substr(4) : "";
        } else {
          streams_[h.stream_id].rst = payload.size() > 4 ? payload.substr(4) : "";
        }
        return;
      case FrameType::kPing: send(frame(FrameType::kPong, 0, payload)); return;
      case FrameType::kPong: ++pongs_; return;
      case FrameType::kWindowUpdate: return;
    }
  }

  int fd_ = -1;
  std::string in_, out_;
  bool closed_ = false;
  std::string close_reason_;
  std::string peer_error_;
  std::optional<Hello> peer_;
  std::map<StreamId, StreamLog> streams_;
  std::vector<StreamId> opens_;
  uint64_t pongs_ = 0;
};

// A connection past HELLO with the good stream open and echoing.
class Tester {
 public:
  explicit Tester(Options options) : options_(std::move(options)) {}
  ~Tester() {
    if (listen_fd_ >= 0) ::close(listen_fd_);
    if (client_fd_ >= 0) ::close(client_fd_);
    for (const int fd : victim_fds_) ::close(fd);
  }

  bool fake_guest() const { return !options_.serve_guest.empty(); }
  StreamId good() const { return good_; }

  // Fake-guest mode: listens on --serve-guest for the host agent.
  bool listen(std::string* error) {
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    std::strncpy(sun.sun_path, options_.serve_guest.c_str(), sizeof(sun.sun_path) - 1);
    ::unlink(options_.serve_guest.c_str());
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0 ||
        ::listen(listen_fd_, 4) != 0) {
      *error = fmt::format("listen on {}: {}", options_.serve_guest, std::strerror(errno));
      return false;
    }
    fmt::print("listening on {}\n", options_.serve_guest);
    std::fflush(stdout);
    return true;
  }

  bool fresh_session(std::string* error) {
    return fake_guest() ? fresh_guest_session(error) : fresh_host_session(error);
  }

  // Fake-guest mode: waits for the host agent's next connection, answers its HELLO, connects a client to the
  // host's socket and checks that the stream the host opens for it echoes.
  bool fresh_guest_session(std::string* error) {
    if (client_fd_ >= 0) ::close(client_fd_);
    client_fd_ = -1;
    for (const int fd : victim_fds_) ::close(fd);
    victim_fds_.clear();
    conn_.reset();
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 10000) <= 0) {
      *error = "the host agent did not connect within 10 s";
      return false;
    }
    conn_ = Conn::adopt(::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC));
    Hello h;
    h.max_frame = 256 * 1024;
    h.initial_window = kOurWindow;
    h.max_streams = 1024;
    h.features = kFeaturePorts | kFeatureFileEvents | kFeatureUdp;
    const auto payload = encode_hello(h);
    conn_->send(frame(FrameType::kHello, 0, bytes_of(payload.data(), payload.size())));
    if (!conn_->wait([&] { return conn_->peer().has_value() || conn_->closed(); }) || !conn_->peer()) {
      *error = "no HELLO from the host agent";
      return false;
    }
    next_id_ = 2;
    expected_.clear();
    probes_ = 0;
    const auto good = client_stream(&client_fd_, error);
    if (!good) return false;
    good_ = *good;
    conn_->stream(good_).echo = true;
    if (!echoes()) {
      *error = "the client stream through the host agent does not echo";
      return false;
    }
    return true;
  }

  // Fake-guest mode: connects a client to the host agent's socket (into *fd) and accepts the stream the
  // host opens for it; returns its id.
  std::optional<StreamId> client_stream(int* fd, std::string* error) {
    *fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    std::strncpy(sun.sun_path, options_.client_socket.c_str(), sizeof(sun.sun_path) - 1);
    if (::connect(*fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0) {
      *error = fmt::format("connect {}: {}", options_.client_socket, std::strerror(errno));
      return std::nullopt;
    }
    ::fcntl(*fd, F_SETFL, O_NONBLOCK);
    const size_t before = conn_->opens().size();
    if (!conn_->wait([&] { return conn_->opens().size() > before || conn_->closed(); }) ||
        conn_->opens().size() == before) {
      *error = "the host agent opened no stream for a client of " + options_.client_socket;
      return std::nullopt;
    }
    const StreamId id = conn_->opens().back();
    flatbuffers::FlatBufferBuilder b(32);
    b.Finish(wire::CreateControl(b, wire::Message::OpenOk, wire::CreateOpenOk(b).Union()));
    conn_->send(frame(FrameType::kControl, id, control(b)));
    return id;
  }

  // A stream besides the good one, for a case that breaks a stream's rules: fake-host mode opens one to
  // the echo target, fake-guest mode accepts one for a second client (which never reads). 0 on failure.
  StreamId victim_stream(std::string* bad) {
    if (fake_guest()) {
      int fd = -1;
      const auto id = client_stream(&fd, bad);
      if (fd >= 0) victim_fds_.push_back(fd);
      return id.value_or(0);
    }
    const StreamId id = new_id();
    conn_->send(frame(FrameType::kControl, id, open_payload(wire::Proto::Unix, options_.echo_target)));
    if (!conn_->wait(
            [&] { return conn_->stream(id).open_ok || conn_->stream(id).open_fail || conn_->closed(); }) ||
        !conn_->stream(id).open_ok) {
      *bad = "the echo target did not open a second stream";
      return 0;
    }
    return id;
  }

  // Connects, says HELLO, opens the good stream and checks one echo.
  bool fresh_host_session(std::string* error) {
    conn_ = Conn::dial(options_.transport, error);
    if (!conn_) return false;
    conn_->send(hello(options_.token));
    if (!conn_->wait([&] { return conn_->peer().has_value() || conn_->closed(); }) || !conn_->peer()) {
      *error =
          fmt::format("no HELLO from the agent ({}{})", conn_->closed() ? conn_->close_reason() : "timeout",
                      conn_->peer_error().empty() ? "" : ": " + conn_->peer_error());
      return false;
    }
    next_id_ = kGood + 2;
    good_ = kGood;
    probes_ = 0;
    expected_.clear();
    conn_->send(frame(FrameType::kControl, kGood, open_payload(wire::Proto::Unix, options_.echo_target)));
    if (!conn_->wait([&] { return conn_->stream(kGood).open_ok || conn_->stream(kGood).open_fail; }) ||
        !conn_->stream(kGood).open_ok) {
      *error =
          fmt::format("the echo target \"{}\" did not open{}", options_.echo_target,
                      conn_->stream(kGood).open_fail ? ": " + conn_->stream(kGood).open_fail->second : "");
      return false;
    }
    if (!echoes()) {
      *error = "the good stream does not echo";
      return false;
    }
    return true;
  }

  // Sends a probe on the good stream and waits for it to come back.
  bool echoes() {
    if (conn_->closed()) return false;
    if (fake_guest()) return client_echoes();
    const std::string probe = fmt::format("probe {}\n", ++probes_);
    expected_ += probe;
    conn_->send(frame(FrameType::kData, kGood, probe));
    return conn_->wait([&] {
      return conn_->closed() || conn_->stream(kGood).data.size() >= expected_.size();
    }) && conn_->stream(kGood).data == expected_;
  }

  // Fake-guest mode: a probe written by the client comes back to it through host agent and fake guest.
  bool client_echoes() {
    const std::string probe = fmt::format("probe {}\n", ++probes_);
    if (::send(client_fd_, probe.data(), probe.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(probe.size())) {
      return false;
    }
    std::string got;
    return conn_->wait([&] {
      char buf[4096];
      const ssize_t n = ::recv(client_fd_, buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) got.append(buf, static_cast<size_t>(n));
      return got.size() >= probe.size() || n == 0 || conn_->closed();
    }) && got == probe;
  }

  StreamId new_id() {
    const StreamId id = next_id_;
    next_id_ += 2;
    return id;
  }
  Conn& conn() { return *conn_; }
  const Options& options() const { return options_; }

 private:
  Options options_;
  std::unique_ptr<Conn> conn_;
  int listen_fd_ = -1;
  int client_fd_ = -1;
  std::vector<int> victim_fds_;  // fake-guest mode: clients of victim streams, never read
  StreamId good_ = kGood;
  StreamId next_id_ = 3;
  int probes_ = 0;
  std::string expected_;
};

enum class Expect { kKept, kDropped };

struct Case {
  const char* name;
  Expect expect;
  // Sends the bad input; for kKept cases returns what the agent did ("" when it did something wrong, with
  // `*bad` explaining).
  std::function<std::string(Tester&, std::string* bad)> run;
  bool (*enabled)(const Options&) = nullptr;
};

// Waits for an OPEN_FAIL on `id`.
std::string expect_open_fail(Tester& t, StreamId id, std::string* bad) {
  Conn& c = t.conn();
  c.wait([&] { return c.closed() || c.stream(id).open_fail || c.stream(id).open_ok; });
  if (c.stream(id).open_fail) {
    const std::string& m = c.stream(id).open_fail->second;
    return fmt::format("OPEN_FAIL errno {} \"{}\"", c.stream(id).open_fail->first, shown(m));
  }
  *bad = c.stream(id).open_ok
             ? "the agent accepted the OPEN"
             : (c.closed() ? "the agent dropped the connection instead of refusing the stream"
                           : "no answer to the OPEN");
  return "";
}

// Waits for the agent's RST on stream `id`, whose rules the case broke: that stream alone is reset.
std::string expect_rst(Tester& t, StreamId id, std::string* bad) {
  Conn& c = t.conn();
  c.wait([&] { return c.closed() || c.stream(id).rst.has_value(); });
  if (c.stream(id).rst) return fmt::format("RST \"{}\"", shown(*c.stream(id).rst));
  *bad =
      c.closed() ? "the agent dropped the connection: " + c.close_reason() : "no RST for the broken stream";
  return "";
}

// Sends the peer's whole window and 4 MiB more on stream `id`, whose reader never reads (a stalled socket
// takes a few hundred KiB), until the agent resets the stream.
std::string overrun_window(Tester& t, StreamId id, std::string* bad) {
  const uint32_t window = t.conn().peer()->initial_window;
  const std::string chunk(64 * 1024, 'w');
  for (uint64_t sent = 0;
       sent < uint64_t(window) + (4u << 20) && !t.conn().closed() && !t.conn().stream(id).rst;
       sent += chunk.size()) {
    t.conn().send(frame(FrameType::kData, id, chunk));
    t.conn().settle(milliseconds(1));
  }
  return expect_rst(t, id, bad);
}

// A case that breaks a victim stream's credit or FIN rules with `bytes(id)`; the agent must reset it alone.
std::function<std::string(Tester&, std::string*)> breaks_a_stream(std::string (*bytes)(StreamId)) {
  return [bytes](Tester& t, std::string* bad) {
    const StreamId id = t.victim_stream(bad);
    if (id == 0) return std::string();
    t.conn().send(bytes(id));
    return expect_rst(t, id, bad);
  };
}

// An RST for a stream nobody opened: both agents ignore it.
std::string send_rst_for_unknown_stream(Tester& t, StreamId id) {
  t.conn().send(frame(FrameType::kRst, id, u32(0) + "no such stream"));
  t.conn().settle(milliseconds(100));
  return "ignored it";
}

// A PORTS message whose listener address holds "..", a NUL and a byte that is not UTF-8, as a snapshot
// (listener added) or as a diff (listener removed): both agents ignore it.
std::string send_bad_ports(Tester& t, bool snapshot) {
  flatbuffers::FlatBufferBuilder b(256);
  std::vector<flatbuffers::Offset<wire::Listener>> ls{
      wire::CreateListener(b, wire::Proto::Tcp, wire::Family::Inet4, b.CreateString("../\0\xff", 5), 0)};
  const auto listeners = b.CreateVector(ls);
  const auto ports =
      snapshot ? wire::CreatePorts(b, listeners, {}, true) : wire::CreatePorts(b, {}, listeners, false);
  b.Finish(wire::CreateControl(b, wire::Message::Ports, ports.Union()));
  t.conn().send(frame(FrameType::kControl, 0, control(b)));
  t.conn().settle(milliseconds(100));
  return "ignored it";
}

// Credit and FIN rules broken on a stream besides the good one, in either mode.
std::vector<Case> stream_rule_cases() {
  std::vector<Case> all;
  all.push_back({"window-update-overflow", Expect::kKept, breaks_a_stream([](StreamId id) {
                   return frame(FrameType::kWindowUpdate, id, u32(0x7fffffff)) +
                          frame(FrameType::kWindowUpdate, id, u32(0x7fffffff));
                 })});
  all.push_back({"window-update-zero", Expect::kKept,
                 breaks_a_stream([](StreamId id) { return frame(FrameType::kWindowUpdate, id, u32(0)); })});
  all.push_back({"fin-twice", Expect::kKept, breaks_a_stream([](StreamId id) {
                   return frame(FrameType::kFin, id, "") + frame(FrameType::kFin, id, "");
                 })});
  return all;
}

std::vector<Case> cases() {
  std::vector<Case> all;
  // ---- stream-level: refused or ignored, the connection and the good stream carry on ----
  all.push_back({"open-forbidden-unix", Expect::kKept, [](Tester& t, std::string* bad) {
                   const StreamId id = t.new_id();
                   t.conn().send(
                       frame(FrameType::kControl, id, open_payload(wire::Proto::Unix, "/etc/shadow")));
                   return expect_open_fail(t, id, bad);
                 }});
  all.push_back({"open-forbidden-port", Expect::kKept, [](Tester& t, std::string* bad) {
                   const StreamId id = t.new_id();
                   t.conn().send(frame(FrameType::kControl, id, open_payload(wire::Proto::Tcp, "", 1)));
                   return expect_open_fail(t, id, bad);
                 }});
  all.push_back({"open-overlong-target", Expect::kKept, [](Tester& t, std::string* bad) {
                   const StreamId id = t.new_id();
                   t.conn().send(frame(FrameType::kControl, id,
                                       open_payload(wire::Proto::Unix, "/" + std::string(4000, 'a'))));
                   return expect_open_fail(t, id, bad);
                 }});
  all.push_back({"open-non-utf8-target", Expect::kKept, [](Tester& t, std::string* bad) {
                   const StreamId id = t.new_id();
                   t.conn().send(frame(FrameType::kControl, id,
                                       open_payload(wire::Proto::Unix, "/tmp/\xff\xfe\xc0.sock")));
                   return expect_open_fail(t, id, bad);
                 }});
  all.push_back({"open-nul-in-target", Expect::kKept, [](Tester& t, std::string* bad) {
                   const StreamId id = t.new_id();
                   // The echo target's name with a NUL and more after it: not the same name.
                   t.conn().send(frame(
                       FrameType::kControl, id,
                       open_payload(wire::Proto::Unix, t.options().echo_target + std::string("\0/../x", 6))));
                   return expect_open_fail(t, id, bad);
                 }});
  all.push_back({"open-traversal-target", Expect::kKept, [](Tester& t, std::string* bad) {
                   const StreamId id = t.new_id();
                   t.conn().send(
                       frame(FrameType::kControl, id, open_payload(wire::Proto::Unix, "/tmp/../etc/x.sock")));
                   return expect_open_fail(t, id, bad);
                 }});
  all.push_back({"rst-unknown-stream", Expect::kKept,
                 [](Tester& t, std::string*) { return send_rst_for_unknown_stream(t, 999999); }});
  all.push_back(
      {"ports-from-host", Expect::kKept, [](Tester& t, std::string*) { return send_bad_ports(t, true); }});
  all.push_back({"file-events-bad-paths", Expect::kKept,
                 [](Tester& t, std::string*) {
                   flatbuffers::FlatBufferBuilder b(1024);
                   std::vector<flatbuffers::Offset<wire::FileEvent>> events;
                   for (const std::string& p : {std::string("../escape"), std::string("/etc/passwd"),
                                                std::string("a\0b", 3), std::string("x/../../y")}) {
                     events.push_back(
                         wire::CreateFileEvent(b, wire::FileEventKind::Modify, b.CreateString(p)));
                   }
                   events.push_back(wire::CreateFileEvent(b, wire::FileEventKind::Rename,
                                                          b.CreateString("ok"), b.CreateString("../../old")));
                   b.Finish(wire::CreateControl(
                       b, wire::Message::FileEvents,
                       wire::CreateFileEvents(b, b.CreateString(t.options().share), b.CreateVector(events), 1)
                           .Union()));
                   t.conn().send(frame(FrameType::kControl, 0, control(b)));
                   t.conn().settle(milliseconds(200));
                   return std::string("refused the paths, kept the connection");
                 },
                 [](const Options& o) { return !o.share.empty(); }});
  all.push_back({"ping-flood", Expect::kKept, [](Tester& t, std::string* bad) {
                   const uint64_t before = t.conn().pongs();
                   const int n = t.options().ping_flood;
                   std::string burst;
                   for (int i = 0; i < n; ++i) {
                     std::string token(8, '\0');
                     store_u64(reinterpret_cast<std::byte*>(token.data()), static_cast<uint64_t>(i));
                     burst += frame(FrameType::kPing, 0, token);
                   }
                   t.conn().send(burst);
                   t.conn().wait(
                       [&] { return t.conn().closed() || t.conn().pongs() - before >= uint64_t(n); },
                       milliseconds(20000));
                   const uint64_t got = t.conn().pongs() - before;
                   if (got != uint64_t(n)) {
                     *bad = fmt::format("{} PONGs for {} PINGs", got, n);
                     return std::string();
                   }
                   return fmt::format("answered all {} PINGs", n);
                 }});
  // ---- stream-level, a stream's own credit or FIN rules broken: the agent resets that stream alone ----
  all.push_back({"data-beyond-window", Expect::kKept,
                 [](Tester& t, std::string* bad) {
                   const StreamId id = t.new_id();
                   t.conn().send(frame(FrameType::kControl, id,
                                       open_payload(wire::Proto::Unix, t.options().stall_target)));
                   return overrun_window(t, id, bad);
                 },
                 [](const Options& o) { return !o.stall_target.empty(); }});
  for (Case c : stream_rule_cases()) all.push_back(std::move(c));
  // ---- connection-level: the agent drops this connection, logs why, and takes a new one ----
  all.push_back({"unknown-frame-type", Expect::kDropped, [](Tester& t, std::string*) {
                   t.conn().send(frame(FrameType::kData, kGood, "x", 0, 42));
                   return std::string();
                 }});
  all.push_back({"reserved-header-bytes", Expect::kDropped, [](Tester& t, std::string*) {
                   std::string f = frame(FrameType::kData, kGood, "x");
                   f[11] = 1;
                   t.conn().send(f);
                   return std::string();
                 }});
  all.push_back({"data-over-max-frame", Expect::kDropped, [](Tester& t, std::string*) {
                   // Announces far more than max_frame; the agent must not wait for (or buffer) it.
                   t.conn().send(frame(FrameType::kData, kGood, "", 0x7fffffff));
                   return std::string();
                 }});
  all.push_back({"control-over-max-size", Expect::kDropped, [](Tester& t, std::string*) {
                   t.conn().send(frame(FrameType::kControl, 0, "", 64u << 20));
                   return std::string();
                 }});
  all.push_back({"truncated-header-then-close", Expect::kDropped, [](Tester& t, std::string*) {
                   t.conn().send(frame(FrameType::kData, kGood, "xyz").substr(0, 5));
                   t.conn().settle(milliseconds(50));
                   t.conn().close_now();
                   return std::string("closed by us after 5 header bytes");
                 }});
  all.push_back({"data-on-unknown-stream", Expect::kDropped, [](Tester& t, std::string*) {
                   t.conn().send(frame(FrameType::kData, 1001, "who am I"));
                   return std::string();
                 }});
  all.push_back({"data-ref-without-shared-memory", Expect::kDropped, [](Tester& t, std::string*) {
                   t.conn().send(frame(FrameType::kDataRef, kGood, std::string(kDataRefPayloadSize, '\0')));
                   return std::string();
                 }});
  all.push_back({"control-garbage", Expect::kDropped, [](Tester& t, std::string*) {
                   t.conn().send(frame(FrameType::kControl, 0,
                                       std::string("\x10\x00\x00\x00garbage!\xff\xff\xff\xff", 16)));
                   return std::string();
                 }});
  all.push_back({"open-wrong-parity", Expect::kDropped, [](Tester& t, std::string*) {
                   t.conn().send(frame(FrameType::kControl, 2,
                                       open_payload(wire::Proto::Unix, t.options().echo_target)));
                   return std::string();
                 }});
  all.push_back({"open-duplicate-id", Expect::kDropped, [](Tester& t, std::string*) {
                   t.conn().send(frame(FrameType::kControl, kGood,
                                       open_payload(wire::Proto::Unix, t.options().echo_target)));
                   return std::string();
                 }});
  all.push_back({"open-without-target", Expect::kDropped, [](Tester& t, std::string*) {
                   flatbuffers::FlatBufferBuilder b(64);
                   b.Finish(wire::CreateControl(b, wire::Message::Open, wire::CreateOpen(b).Union()));
                   t.conn().send(frame(FrameType::kControl, t.new_id(), control(b)));
                   return std::string();
                 }});
  all.push_back({"second-hello", Expect::kDropped, [](Tester& t, std::string*) {
                   t.conn().send(hello(t.options().token));
                   return std::string();
                 }});
  return all;
}

// The same classes, sent by a fake guest to a live host agent; the good stream is a client's stream through
// the host's socket.
std::vector<Case> guest_cases() {
  std::vector<Case> all;
  const auto refused_open = [](const std::string& target) {
    return [target](Tester& t, std::string* bad) {
      const StreamId id = t.new_id();
      t.conn().send(frame(FrameType::kControl, id, open_payload(wire::Proto::Unix, target)));
      return expect_open_fail(t, id, bad);
    };
  };
  all.push_back({"open-unexposed-name", Expect::kKept, refused_open("not-exposed")});
  all.push_back({"open-overlong-target", Expect::kKept, refused_open(std::string(4000, 'a'))});
  all.push_back({"open-nul-in-target", Expect::kKept, refused_open(std::string("svc\0/../x", 9))});
  all.push_back({"rst-unknown-stream", Expect::kKept,
                 [](Tester& t, std::string*) { return send_rst_for_unknown_stream(t, 999998); }});
  all.push_back({"ports-bad-contents", Expect::kKept,
                 [](Tester& t, std::string*) { return send_bad_ports(t, false); }});
  all.push_back({"file-events-from-guest", Expect::kKept, [](Tester& t, std::string*) {
                   flatbuffers::FlatBufferBuilder b(256);
                   std::vector<flatbuffers::Offset<wire::FileEvent>> events{
                       wire::CreateFileEvent(b, wire::FileEventKind::Modify, b.CreateString("../escape"))};
                   b.Finish(wire::CreateControl(
                       b, wire::Message::FileEvents,
                       wire::CreateFileEvents(b, b.CreateString("s"), b.CreateVector(events), 1).Union()));
                   t.conn().send(frame(FrameType::kControl, 0, control(b)));
                   t.conn().settle(milliseconds(100));
                   return std::string("ignored it");
                 }});
  for (const Case& c : cases()) {
    const std::string name = c.name;
    if (name == "ping-flood" || name == "unknown-frame-type" || name == "reserved-header-bytes" ||
        name == "control-over-max-size" || name == "truncated-header-then-close" ||
        name == "control-garbage" || name == "second-hello") {
      all.push_back(c);
    }
  }
  const auto on_good = [](std::string (*bytes)(StreamId)) {
    return [bytes](Tester& t, std::string*) {
      t.conn().send(bytes(t.good()));
      return std::string();
    };
  };
  all.push_back({"data-over-max-frame", Expect::kDropped,
                 on_good([](StreamId id) { return frame(FrameType::kData, id, "", 0x7fffffff); })});
  all.push_back({"data-on-unknown-stream", Expect::kDropped,
                 on_good([](StreamId) { return frame(FrameType::kData, 1000, "who am I"); })});
  all.push_back({"data-ref-without-shared-memory", Expect::kDropped, on_good([](StreamId id) {
                   return frame(FrameType::kDataRef, id, std::string(kDataRefPayloadSize, '\0'));
                 })});
  // The victim's client never reads: the host agent stops returning credit once its socket is full.
  all.push_back({"data-beyond-window", Expect::kKept, [](Tester& t, std::string* bad) {
                   const StreamId id = t.victim_stream(bad);
                   if (id == 0) return std::string();
                   return overrun_window(t, id, bad);
                 }});
  for (Case c : stream_rule_cases()) all.push_back(std::move(c));
  all.push_back({"open-wrong-parity", Expect::kDropped, on_good([](StreamId) {
                   return frame(FrameType::kControl, 1001, open_payload(wire::Proto::Unix, "not-exposed"));
                 })});
  all.push_back({"open-duplicate-id", Expect::kDropped, [](Tester& t, std::string*) {
                   const StreamId id = t.new_id();
                   const std::string open =
                       frame(FrameType::kControl, id, open_payload(wire::Proto::Unix, "x"));
                   t.conn().send(open + open);
                   return std::string();
                 }});
  all.push_back({"open-without-target", Expect::kDropped, [](Tester& t, std::string*) {
                   flatbuffers::FlatBufferBuilder b(64);
                   b.Finish(wire::CreateControl(b, wire::Message::Open, wire::CreateOpen(b).Union()));
                   t.conn().send(frame(FrameType::kControl, t.new_id(), control(b)));
                   return std::string();
                 }});
  return all;
}

int run(const Options& options) {
  Tester t(options);
  std::string error;
  if (t.fake_guest() && !t.listen(&error)) {
    fmt::print("setup: {}: FAIL\n", error);
    return 2;
  }
  if (!t.fresh_session(&error)) {
    fmt::print("setup: {}: FAIL\n", error);
    return 2;
  }
  int failed = 0;
  for (const Case& c : t.fake_guest() ? guest_cases() : cases()) {
    if (c.enabled != nullptr && !c.enabled(options)) {
      fmt::print("{:<28} skipped (needs {})\n", c.name,
                 std::string(c.name) == "data-beyond-window" ? "--stall" : "--share");
      continue;
    }
    std::string bad;
    std::string did = c.run(t, &bad);
    bool pass = false;
    if (c.expect == Expect::kKept) {
      if (bad.empty() && t.conn().closed())
        bad = "the agent dropped the connection: " + t.conn().close_reason();
      if (bad.empty() && !t.echoes()) bad = "the good stream stopped echoing";
      pass = bad.empty();
      if (pass) did += "; the good stream still echoes";
    } else {
      const bool dropped = t.conn().wait([&] { return t.conn().closed(); });
      if (!dropped) {
        bad = "the agent kept the connection";
      } else {
        did = did.empty() ? t.conn().close_reason() : did;
        std::string reconnect_error;
        if (!t.fresh_session(&reconnect_error)) {
          bad = "no fresh session after the drop: " + reconnect_error;
        } else {
          did += "; a fresh session echoes";
        }
      }
      pass = bad.empty();
      if (!pass && !t.conn().closed()) {
        // Start the next case from a clean session either way.
        std::string ignored;
        t.fresh_session(&ignored);
      }
    }
    if (!pass) ++failed;
    fmt::print("{:<28} {}: {}\n", c.name, pass ? did : bad, pass ? "PASS" : "FAIL");
    std::fflush(stdout);
    if (!pass && t.conn().closed()) {
      std::string reconnect_error;
      if (!t.fresh_session(&reconnect_error)) {
        fmt::print("setup: cannot start a new session: {}: FAIL\n", reconnect_error);
        return 1;
      }
    }
  }
  fmt::print("{} case(s) failed\n", failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace vbridge::hostile

int main(int argc, char** argv) {
  using namespace vbridge;
  CLI::App app{
      "vbridge-hostile: sends malformed and forbidden frames to a live guest agent as a fake host, one case "
      "at "
      "a time, and checks that each gets a clear answer while the agent keeps serving"};
  std::string transport;
  std::string token_file;
  hostile::Options options;
  app.add_option("-t,--transport", transport, "The guest agent's transport: unix:/path or tcp:HOST:PORT");
  app.add_option("--serve-guest", options.serve_guest,
                 "Play a guest instead: listen on this unix socket path for a live host agent (vbridge-host "
                 "--transport unix:PATH) and send it the malformed frames");
  app.add_option("--client-socket", options.client_socket,
                 "With --serve-guest: the host agent's socket to connect through (its docker.sock or a "
                 "--forward-unix socket); the fake guest accepts and echoes the stream it opens");
  app.add_option("--token-file", token_file, "The guest agent's --token-file");
  app.add_option("--echo", options.echo_target,
                 "A unix target the guest's policy allows that echoes what it reads (a --forward name or an "
                 "--allow-unix path)")
      ->capture_default_str();
  app.add_option("--stall", options.stall_target,
                 "A unix target the guest allows that accepts and never reads (enables data-beyond-window)");
  app.add_option("--share", options.share, "A share the guest agent replays (enables file-events-bad-paths)");
  app.add_option("--ping-flood", options.ping_flood, "PINGs sent at once in ping-flood")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (!options.serve_guest.empty()) {
    if (options.client_socket.empty()) {
      fmt::print(stderr, "--serve-guest needs --client-socket\n");
      return 2;
    }
    return hostile::run(options);
  }
  if (transport.empty()) {
    fmt::print(stderr, "--transport (or --serve-guest) is required\n");
    return 2;
  }
  auto address = parse_address(transport);
  if (!address) {
    fmt::print(stderr, "--transport: {}\n", address.error().message);
    return 2;
  }
  options.transport = *address;
  if (!token_file.empty()) {
    auto token = read_token_file(token_file);
    if (!token) {
      fmt::print(stderr, "{}\n", token.error().message);
      return 2;
    }
    options.token = *token;
  }
  return hostile::run(options);
}
