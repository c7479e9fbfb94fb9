// vbridge-loadgen: the traffic source and sink of the end-to-end benchmarks.
//
//   vbridge-loadgen serve [--unix PATH]... [--tcp HOST:PORT]...
//   vbridge-loadgen throughput --connect ADDR --seconds T [--streams N] [--reverse | --reverse-only]
//   vbridge-loadgen rtt --connect ADDR --count N [--size BYTES] [--seconds T] [--background-bulk]
//   vbridge-loadgen connrate --connect ADDR --seconds T [--parallel P]
//
// ADDR is unix:/path, tcp:127.0.0.1:PORT or tcp:[::1]:PORT.
//
// Per connection the client first sends one mode byte:
//   'E' echo      every byte is sent back
//   'S' sink      bytes are counted until EOF, then the count goes back as 8 bytes little-endian
//   'G' generate  bytes are sent until the client goes away
//   'C' connect   the server replies 'k' and closes
//
// `serve` prints one JSON line with the addresses it listens on (a TCP port of 0 is replaced by the bound
// port); each client mode prints one JSON line of results on stdout.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

constexpr size_t kBufSize = 256 * 1024;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

Clock::time_point after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

double micros(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "vbridge-loadgen: %s\n", what.c_str());
  std::exit(1);
}

std::string errno_text(const std::string& what) { return what + ": " + std::strerror(errno); }

// ---------------------------------------------------------------------------------------------------------
// Command line

struct Options {
  std::string mode;
  std::multimap<std::string, std::string> values;

  bool has(const std::string& key) const { return values.count(key) != 0; }

  std::vector<std::string> all(const std::string& key) const {
    std::vector<std::string> out;
    auto [lo, hi] = values.equal_range(key);
    for (auto it = lo; it != hi; ++it) out.push_back(it->second);
    return out;
  }

  std::string text(const std::string& key) const {
    auto it = values.find(key);
    if (it == values.end()) fail("missing " + key);
    return it->second;
  }

  double number(const std::string& key, std::optional<double> fallback = std::nullopt) const {
    auto it = values.find(key);
    if (it == values.end()) {
      if (!fallback) fail("missing " + key);
      return *fallback;
    }
    char* end = nullptr;
    double v = std::strtod(it->second.c_str(), &end);
    if (end == it->second.c_str() || *end != '\0' || v < 0) fail("bad number for " + key + ": " + it->second);
    return v;
  }
};

Options parse_options(int argc, char** argv) {
  static const char* const kFlags[] = {"--reverse", "--reverse-only", "--background-bulk"};
  static const char* const kValued[] = {"--unix",    "--tcp",   "--connect", "--seconds",
                                        "--streams", "--count", "--size",    "--parallel"};
  Options opt;
  if (argc < 2) fail("usage: vbridge-loadgen serve|throughput|rtt|connrate [options]");
  opt.mode = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (std::find(std::begin(kFlags), std::end(kFlags), arg) != std::end(kFlags)) {
      opt.values.emplace(std::string(arg), "");
    } else if (std::find(std::begin(kValued), std::end(kValued), arg) != std::end(kValued)) {
      if (i + 1 >= argc) fail("missing value for " + std::string(arg));
      opt.values.emplace(std::string(arg), argv[++i]);
    } else {
      fail("unknown option " + std::string(arg));
    }
  }
  return opt;
}

// ---------------------------------------------------------------------------------------------------------
// JSON output

std::string fmt_double(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  return buf;
}

std::string quote(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

class Json {
 public:
  Json& num(std::string_view key, double v) { return raw(key, fmt_double(v)); }
  Json& count(std::string_view key, uint64_t v) { return raw(key, std::to_string(v)); }
  Json& str(std::string_view key, std::string_view v) { return raw(key, quote(v)); }
  Json& raw(std::string_view key, std::string_view json) {
    if (!body_.empty()) body_ += ',';
    body_ += quote(key) + ':' + std::string(json);
    return *this;
  }
  std::string text() const { return "{" + body_ + "}"; }

 private:
  std::string body_;
};

std::string json_array(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? "," : "") + items[i];
  return out + "]";
}

void print_line(const std::string& line) {
  std::fputs((line + "\n").c_str(), stdout);
  std::fflush(stdout);
}

// ---------------------------------------------------------------------------------------------------------
// Addresses and sockets

struct Address {
  sockaddr_storage storage{};
  socklen_t length = 0;
  bool is_tcp = false;

  const sockaddr* sa() const { return reinterpret_cast<const sockaddr*>(&storage); }
  int family() const { return storage.ss_family; }
};

Address unix_address(const std::string& path) {
  Address a;
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof un.sun_path) fail("unix socket path empty or too long: " + path);
  std::memcpy(un.sun_path, path.c_str(), path.size() + 1);
  std::memcpy(&a.storage, &un, sizeof un);
  a.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  return a;
}

// "127.0.0.1:80", "[::1]:80", "localhost:80"
Address tcp_address(const std::string& hostport) {
  std::string host, port;
  if (!hostport.empty() && hostport.front() == '[') {
    auto close = hostport.find(']');
    if (close == std::string::npos || close + 1 >= hostport.size() || hostport[close + 1] != ':')
      fail("bad address " + hostport);
    host = hostport.substr(1, close - 1);
    port = hostport.substr(close + 2);
  } else {
    auto colon = hostport.rfind(':');
    if (colon == std::string::npos) fail("bad address (want HOST:PORT) " + hostport);
    host = hostport.substr(0, colon);
    port = hostport.substr(colon + 1);
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0 || !res) fail("cannot resolve " + hostport + ": " + gai_strerror(rc));
  Address a;
  std::memcpy(&a.storage, res->ai_addr, res->ai_addrlen);
  a.length = res->ai_addrlen;
  a.is_tcp = true;
  freeaddrinfo(res);
  return a;
}

Address parse_address(const std::string& text) {
  if (text.rfind("unix:", 0) == 0) return unix_address(text.substr(5));
  if (text.rfind("tcp:", 0) == 0) return tcp_address(text.substr(4));
  fail("address must start with unix: or tcp: " + text);
}

std::string describe(const Address& a) {
  if (!a.is_tcp) return "unix:" + std::string(reinterpret_cast<const sockaddr_un*>(a.sa())->sun_path);
  char host[INET6_ADDRSTRLEN] = {};
  uint16_t port = 0;
  if (a.family() == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(a.sa());
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
    return "tcp:[" + std::string(host) + "]:" + std::to_string(port);
  }
  auto* in4 = reinterpret_cast<const sockaddr_in*>(a.sa());
  inet_ntop(AF_INET, &in4->sin_addr, host, sizeof host);
  port = ntohs(in4->sin_port);
  return "tcp:" + std::string(host) + ":" + std::to_string(port);
}

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Bounds every blocking call, so a stalled path ends the run with an error instead of a hang.
void set_io_timeout(int fd, double seconds) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

// Returns a connected blocking socket or -1 with errno set.
int connect_to(const Address& a) {
  int fd = socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, a.sa(), a.length) != 0) {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
  }
  if (a.is_tcp) set_nodelay(fd);
  set_io_timeout(fd, 30);
  return fd;
}

int listen_on(const Address& a) {
  int fd = socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) fail(errno_text("socket"));
  if (a.is_tcp) {
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  } else {
    const char* path = reinterpret_cast<const sockaddr_un*>(a.sa())->sun_path;
    struct stat st {};
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path);
  }
  if (bind(fd, a.sa(), a.length) != 0) fail(errno_text("bind " + describe(a)));
  if (listen(fd, 4096) != 0) fail(errno_text("listen " + describe(a)));
  return fd;
}

Address bound_address(int fd, const Address& requested) {
  if (!requested.is_tcp) return requested;
  Address a = requested;
  a.length = sizeof a.storage;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a.storage), &a.length);
  return a;
}

bool write_all(int fd, const char* data, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, data, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Reads exactly n bytes; false on EOF or error.
bool read_exact(int fd, char* data, size_t n) {
  while (n > 0) {
    ssize_t r = read(fd, data, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    data += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

const std::vector<char>& pattern_buffer() {
  static const std::vector<char> buf = [] {
    std::vector<char> b(kBufSize);
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<char>('a' + i % 26);
    return b;
  }();
  return buf;
}

// ---------------------------------------------------------------------------------------------------------
// Server

void serve_echo(int fd) {
  std::vector<char> buf(kBufSize);
  for (;;) {
    ssize_t r = read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0 || !write_all(fd, buf.data(), static_cast<size_t>(r))) return;
  }
}

void serve_sink(int fd) {
  std::vector<char> buf(kBufSize);
  uint64_t total = 0;
  for (;;) {
    ssize_t r = read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return;
    if (r == 0) break;
    total += static_cast<uint64_t>(r);
  }
  char reply[8];
  for (int i = 0; i < 8; ++i) reply[i] = static_cast<char>((total >> (8 * i)) & 0xff);
  write_all(fd, reply, sizeof reply);
}

void serve_generate(int fd) {
  const auto& buf = pattern_buffer();
  while (write_all(fd, buf.data(), buf.size())) {
  }
}

void serve_stream(int fd, char mode) {
  if (mode == 'E') serve_echo(fd);
  if (mode == 'S') serve_sink(fd);
  if (mode == 'G') serve_generate(fd);
  close(fd);
}

// One epoll thread accepts connections and reads their mode byte; 'C' is answered right there, so the
// connection-rate test measures the path rather than thread creation. Bulk modes get a thread each.
int run_serve(const Options& opt) {
  std::signal(SIGPIPE, SIG_IGN);
  std::vector<Address> wanted;
  for (const auto& p : opt.all("--unix")) wanted.push_back(unix_address(p));
  for (const auto& hp : opt.all("--tcp")) wanted.push_back(tcp_address(hp));
  if (wanted.empty()) fail("serve needs --unix PATH and/or --tcp HOST:PORT");

  int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) fail(errno_text("epoll_create1"));
  // epoll data: fd in the low 32 bits; bit 32 marks a listener, bit 33 a TCP connection.
  constexpr uint64_t kListener = 1ull << 32, kTcp = 1ull << 33;
  auto watch = [ep](int fd, uint64_t tag) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = static_cast<uint32_t>(fd) | tag;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) fail(errno_text("epoll_ctl"));
  };

  std::vector<std::string> names;
  for (const auto& a : wanted) {
    int fd = listen_on(a);
    watch(fd, kListener | (a.is_tcp ? kTcp : 0));
    names.push_back(quote(describe(bound_address(fd, a))));
  }
  print_line(Json().str("mode", "serve").raw("listening", json_array(names)).text());

  epoll_event events[64];
  for (;;) {
    int n = epoll_wait(ep, events, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(errno_text("epoll_wait"));
    }
    for (int i = 0; i < n; ++i) {
      uint64_t tag = events[i].data.u64;
      int fd = static_cast<int>(tag & 0xffffffffu);
      if (tag & kListener) {
        for (;;) {
          int c = accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (c < 0) break;  // EAGAIN, or a connection that died in the backlog
          if (tag & kTcp) set_nodelay(c);
          watch(c, tag & kTcp);
        }
        continue;
      }
      char mode = 0;
      ssize_t r = read(fd, &mode, 1);
      if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
      if (r == 1 && mode == 'C') {
        send(fd, "k", 1, MSG_NOSIGNAL);
        close(fd);
      } else if (r == 1 && (mode == 'E' || mode == 'S' || mode == 'G')) {
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
        std::thread(serve_stream, fd, mode).detach();
      } else {
        close(fd);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Client helpers

struct StreamResult {
  uint64_t bytes = 0;
  double seconds = 0;
  std::string error;

  double mb_per_s() const { return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e6 : 0; }
};

int open_stream(const Address& a, char mode, std::string& error) {
  int fd = connect_to(a);
  if (fd < 0) {
    error = errno_text("connect " + describe(a));
    return -1;
  }
  if (!write_all(fd, &mode, 1)) {
    error = errno_text("send mode byte");
    close(fd);
    return -1;
  }
  return fd;
}

// Writes until `stop` says so or the deadline passes, then half-closes and waits for the server's count,
// so the time includes draining every buffer along the path. `progress` (if given) follows the bytes sent.
StreamResult sink_stream(const Address& a, const std::atomic<bool>& stop, Clock::time_point deadline,
                         std::atomic<uint64_t>* progress = nullptr) {
  StreamResult res;
  int fd = open_stream(a, 'S', res.error);
  if (fd < 0) return res;
  const auto& buf = pattern_buffer();
  auto t0 = Clock::now();
  uint64_t sent = 0;
  while (!stop.load(std::memory_order_relaxed) && Clock::now() < deadline) {
    if (!write_all(fd, buf.data(), buf.size())) {
      res.error = errno_text("sink write");
      close(fd);
      return res;
    }
    sent += buf.size();
    if (progress) progress->store(sent, std::memory_order_relaxed);
  }
  shutdown(fd, SHUT_WR);
  char reply[8];
  if (!read_exact(fd, reply, sizeof reply)) {
    res.error = errno_text("sink reply");
    close(fd);
    return res;
  }
  res.seconds = seconds_since(t0);
  close(fd);
  for (int i = 0; i < 8; ++i)
    res.bytes |= static_cast<uint64_t>(static_cast<unsigned char>(reply[i])) << (8 * i);
  if (res.bytes != sent)
    res.error = "server counted " + std::to_string(res.bytes) + " bytes, client sent " + std::to_string(sent);
  return res;
}

StreamResult generate_stream(const Address& a, Clock::time_point deadline) {
  StreamResult res;
  int fd = open_stream(a, 'G', res.error);
  if (fd < 0) return res;
  std::vector<char> buf(kBufSize);
  auto t0 = Clock::now();
  while (Clock::now() < deadline) {
    ssize_t r = read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      res.error = r == 0 ? "generate stream ended early" : errno_text("generate read");
      break;
    }
    res.bytes += static_cast<uint64_t>(r);
  }
  res.seconds = seconds_since(t0);
  close(fd);
  return res;
}

struct Percentiles {
  std::vector<double> sorted;

  explicit Percentiles(std::vector<double> v) : sorted(std::move(v)) {
    std::sort(sorted.begin(), sorted.end());
  }

  double at(double q) const {
    if (sorted.empty()) return 0;
    auto i = static_cast<size_t>(q * static_cast<double>(sorted.size()));
    return sorted[std::min(i, sorted.size() - 1)];
  }

  Json& add_to(Json& j, const std::string& unit) const {
    double sum = 0;
    for (double v : sorted) sum += v;
    return j.num("p50_" + unit, at(0.50))
        .num("p90_" + unit, at(0.90))
        .num("p99_" + unit, at(0.99))
        .num("max_" + unit, sorted.empty() ? 0 : sorted.back())
        .num("mean_" + unit, sorted.empty() ? 0 : sum / static_cast<double>(sorted.size()));
  }
};

std::string first_error(const std::vector<StreamResult>& results) {
  for (const auto& r : results)
    if (!r.error.empty()) return r.error;
  return "";
}

// Runs `streams` parallel streams of one direction and returns the JSON summary.
std::string throughput_direction(const Address& a, int streams, double seconds, bool reverse,
                                 std::string& error) {
  std::vector<StreamResult> results(static_cast<size_t>(streams));
  std::vector<std::thread> threads;
  std::atomic<bool> never{false};
  auto deadline = after(seconds);
  for (size_t i = 0; i < results.size(); ++i)
    threads.emplace_back(
        [&, i] { results[i] = reverse ? generate_stream(a, deadline) : sink_stream(a, never, deadline); });
  for (auto& t : threads) t.join();

  uint64_t total = 0;
  double longest = 0;
  std::vector<std::string> per_stream;
  for (const auto& r : results) {
    total += r.bytes;
    longest = std::max(longest, r.seconds);
    per_stream.push_back(fmt_double(r.mb_per_s()));
  }
  Json j;
  j.count("bytes", total).num("seconds", longest);
  j.num("MBps", longest > 0 ? static_cast<double>(total) / longest / 1e6 : 0);
  j.raw("per_stream_MBps", json_array(per_stream));
  std::string err = first_error(results);
  if (!err.empty()) {
    j.str("error", err);
    if (error.empty()) error = err;
  }
  return j.text();
}

// ---------------------------------------------------------------------------------------------------------
// Client modes

int run_throughput(const Options& opt) {
  Address a = parse_address(opt.text("--connect"));
  double seconds = opt.number("--seconds");
  int streams = std::max(1, static_cast<int>(opt.number("--streams", 1)));
  std::string error;
  Json j;
  j.str("mode", "throughput").str("connect", describe(a)).count("streams", static_cast<uint64_t>(streams));
  j.num("target_seconds", seconds);
  if (!opt.has("--reverse-only")) j.raw("forward", throughput_direction(a, streams, seconds, false, error));
  if (opt.has("--reverse") || opt.has("--reverse-only")) {
    j.raw("reverse", throughput_direction(a, streams, seconds, true, error));
  }
  if (!error.empty()) j.str("error", error);
  print_line(j.text());
  return error.empty() ? 0 : 1;
}

int run_rtt(const Options& opt) {
  Address a = parse_address(opt.text("--connect"));
  auto count = static_cast<size_t>(opt.number("--count"));
  auto size = std::max<size_t>(1, static_cast<size_t>(opt.number("--size", 64)));
  double max_seconds = opt.number("--seconds", 30);
  bool loaded = opt.has("--background-bulk");
  if (size > kBufSize) fail("--size at most " + std::to_string(kBufSize));

  // Background bulk stream on its own connection, started first; measuring begins once it has pushed
  // 16 MiB (enough to fill the buffers of any path here) or after one second.
  std::atomic<bool> stop_bulk{false};
  std::atomic<uint64_t> bulk_sent{0};
  StreamResult bulk;
  std::thread bulk_thread;
  if (loaded) {
    auto far_future = after(24 * 3600);
    bulk_thread = std::thread([&] { bulk = sink_stream(a, stop_bulk, far_future, &bulk_sent); });
    auto ramp_end = Clock::now() + std::chrono::seconds(1);
    while (bulk_sent.load() < (16u << 20) && Clock::now() < ramp_end)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }

  std::string error;
  std::vector<double> samples;
  samples.reserve(count);
  int fd = open_stream(a, 'E', error);
  if (fd >= 0) {
    std::vector<char> out(pattern_buffer().begin(),
                          pattern_buffer().begin() + static_cast<std::ptrdiff_t>(size));
    std::vector<char> in(size);
    size_t warmup = std::min<size_t>(100, count / 10);
    auto t_end = after(max_seconds);
    for (size_t i = 0; i < warmup + count && Clock::now() < t_end; ++i) {
      auto t0 = Clock::now();
      if (!write_all(fd, out.data(), size) || !read_exact(fd, in.data(), size)) {
        error = errno_text("echo");
        break;
      }
      if (i >= warmup) samples.push_back(micros(Clock::now() - t0));
    }
    close(fd);
  }
  if (loaded) {
    stop_bulk = true;
    bulk_thread.join();
    if (error.empty()) error = bulk.error;
  }

  Json j;
  j.str("mode", "rtt").str("connect", describe(a)).count("size", size).count("samples", samples.size());
  Percentiles(samples).add_to(j, "us");
  if (loaded) j.num("bulk_MBps", bulk.mb_per_s());
  if (!error.empty()) j.str("error", error);
  print_line(j.text());
  return error.empty() ? 0 : 1;
}

int run_connrate(const Options& opt) {
  Address a = parse_address(opt.text("--connect"));
  double seconds = opt.number("--seconds");
  int parallel = std::max(1, static_cast<int>(opt.number("--parallel", 1)));
  auto t0 = Clock::now();
  auto deadline = after(seconds);

  std::mutex mu;
  std::vector<double> latencies;
  uint64_t failures = 0;
  std::string last_error;
  std::vector<std::thread> threads;
  for (int p = 0; p < parallel; ++p) {
    threads.emplace_back([&] {
      std::vector<double> mine;
      uint64_t my_failures = 0;
      std::string my_error;
      while (Clock::now() < deadline) {
        auto start = Clock::now();
        int fd = connect_to(a);
        char reply = 0;
        bool good = fd >= 0 && write_all(fd, "C", 1) && read_exact(fd, &reply, 1) && reply == 'k';
        if (!good)
          my_error = fd < 0 ? errno_text("connect") : reply ? "unexpected reply" : errno_text("connect test");
        if (fd >= 0) close(fd);
        if (good) {
          mine.push_back(micros(Clock::now() - start));
        } else {
          ++my_failures;
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
      }
      std::lock_guard lock(mu);
      latencies.insert(latencies.end(), mine.begin(), mine.end());
      failures += my_failures;
      if (!my_error.empty()) last_error = my_error;
    });
  }
  for (auto& t : threads) t.join();
  double elapsed = seconds_since(t0);

  Json j;
  j.str("mode", "connrate").str("connect", describe(a)).count("parallel", static_cast<uint64_t>(parallel));
  j.count("connections", latencies.size()).count("failures", failures).num("seconds", elapsed);
  j.num("per_second", static_cast<double>(latencies.size()) / elapsed);
  Percentiles(latencies).add_to(j, "us");
  // Occasional failures (a full backlog) are part of the figure; only a path that never answers is an error.
  if (!last_error.empty()) j.str(latencies.empty() ? "error" : "last_failure", last_error);
  print_line(j.text());
  return latencies.empty() ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt = parse_options(argc, argv);
  std::signal(SIGPIPE, SIG_IGN);
  if (opt.mode == "serve") return run_serve(opt);
  if (opt.mode == "throughput") return run_throughput(opt);
  if (opt.mode == "rtt") return run_rtt(opt);
  if (opt.mode == "connrate") return run_connrate(opt);
  fail("unknown mode " + opt.mode + " (serve, throughput, rtt, connrate)");
}
