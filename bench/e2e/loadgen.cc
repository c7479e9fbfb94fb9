// vbridge-loadgen: the traffic source and sink of the end-to-end benchmarks.
//
//   vbridge-loadgen serve [--unix PATH]... [--tcp HOST:PORT]...
//   vbridge-loadgen throughput --connect ADDR --seconds T [--streams N] [--reverse | --reverse-only]
//   vbridge-loadgen rtt --connect ADDR --count N [--size BYTES] [--seconds T] [--background-bulk]
//                       [--bulk-connect ADDR]
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

#include "bench_io.h"

namespace bench_io {

[[noreturn]] void fail(const std::string& what) { exit_with("vbridge-loadgen", 1, what); }

}  // namespace bench_io

namespace {

using namespace bench_io;

constexpr size_t kBufSize = 256 * 1024;

Options parse_options(int argc, char** argv) {
  if (argc < 2) fail("usage: vbridge-loadgen serve|throughput|rtt|connrate [options]");
  return bench_io::parse_options(argc, argv, {"--reverse", "--reverse-only", "--background-bulk"},
                                 {"--unix", "--tcp", "--connect", "--bulk-connect", "--seconds", "--streams",
                                  "--count", "--size", "--parallel"});
}

// ---------------------------------------------------------------------------------------------------------
// Patterned data

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
  int fd = connect_to(a, 30);
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
  // The background stream may take another way (--bulk-connect): beside a bulk stream that does not cross
  // the path, a round trip meets only the competition for the CPU, not the path's own queues.
  Address bulk_address = opt.has("--bulk-connect") ? parse_address(opt.text("--bulk-connect")) : a;
  if (size > kBufSize) fail("--size at most " + std::to_string(kBufSize));

  // Background bulk stream on its own connection, started first; measuring begins once it has pushed
  // 16 MiB (enough to fill the buffers of any path here) or after one second.
  std::atomic<bool> stop_bulk{false};
  std::atomic<uint64_t> bulk_sent{0};
  StreamResult bulk;
  std::thread bulk_thread;
  if (loaded) {
    auto far_future = after(24 * 3600);
    bulk_thread = std::thread([&] { bulk = sink_stream(bulk_address, stop_bulk, far_future, &bulk_sent); });
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

  const Trials trials = run_trials(
      parallel, [&](int) { return Clock::now() < deadline; },
      [&](int, uint64_t) -> std::string {
        int fd = connect_to(a, 30);
        char reply = 0;
        bool good = fd >= 0 && write_all(fd, "C", 1) && read_exact(fd, &reply, 1) && reply == 'k';
        std::string error;
        if (!good)
          error = fd < 0 ? errno_text("connect") : reply ? "unexpected reply" : errno_text("connect test");
        if (fd >= 0) close(fd);
        if (!good) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        return error;
      });
  const std::vector<double>& latencies = trials.latencies_us;
  const uint64_t failures = trials.failures;
  const std::string& last_error = trials.last_error;
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
