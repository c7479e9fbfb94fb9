// Shared pieces of the benchmark and soak traffic tools (vbridge-loadgen, vbridge-soak): command line,
// addresses and blocking socket I/O, JSON result lines and clocks. POSIX and the standard library only.
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace bench_io {

// Prints "<tool>: what" on stderr and exits with the tool's failure code; each tool defines it with
// exit_with.
[[noreturn]] void fail(const std::string& what);
[[noreturn]] void exit_with(const char* tool, int code, const std::string& what);

std::string errno_text(const std::string& what);

// ---------------------------------------------------------------------------------------------------------
// Clocks

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0);
Clock::time_point after(double seconds);
double micros(Clock::duration d);

// ---------------------------------------------------------------------------------------------------------
// Command line: `tool MODE [--flag | --key VALUE]...`

struct Options {
  std::string mode;
  std::multimap<std::string, std::string> values;

  bool has(const std::string& key) const { return values.count(key) != 0; }
  std::vector<std::string> all(const std::string& key) const;
  std::string text(const std::string& key) const;
  double number(const std::string& key, std::optional<double> fallback = std::nullopt) const;
};

// argv[1] is the mode (the caller has checked argc >= 2); `flags` take no value, `valued` one. An unknown
// option fails with "unknown option X" followed by `unknown_suffix`.
Options parse_options(int argc, char** argv, std::initializer_list<std::string_view> flags,
                      std::initializer_list<std::string_view> valued, const std::string& unknown_suffix = "");

// ---------------------------------------------------------------------------------------------------------
// JSON output: one object per line on stdout

std::string fmt_double(double v);  // "%.3f"
std::string quote(std::string_view s);
std::string json_array(const std::vector<std::string>& items);
void print_line(const std::string& line);

class Json {
 public:
  Json& num(std::string_view key, double v) { return raw(key, fmt_double(v)); }
  Json& count(std::string_view key, uint64_t v) { return raw(key, std::to_string(v)); }
  Json& str(std::string_view key, std::string_view v) { return raw(key, quote(v)); }
  Json& raw(std::string_view key, std::string_view json);
  std::string text() const { return "{" + body_ + "}"; }
  void print() const { print_line(text()); }

 private:
  std::string body_;
};

// Latency samples: p50/p90/p99/max/mean under "<stat>_<unit>" keys.
struct Percentiles {
  std::vector<double> sorted;

  explicit Percentiles(std::vector<double> v);
  double at(double q) const;
  double max() const { return sorted.empty() ? 0 : sorted.back(); }
  Json& add_to(Json& j, const std::string& unit) const;
};

// Connection trials: `parallel` threads each call attempt(thread, n) for their n-th attempt (n from 0) for as
// long as proceed(thread) says so. attempt returns "" on success, when the time it took is a sample, or what
// went wrong.
struct Trials {
  std::vector<double> latencies_us;
  uint64_t failures = 0;
  std::string first_error;  // of the threads in the order they finish: the first one's first error
  std::string last_error;   // and the last one's last error
};

Trials run_trials(int parallel, const std::function<bool(int)>& proceed,
                  const std::function<std::string(int, uint64_t)>& attempt);

// ---------------------------------------------------------------------------------------------------------
// Addresses and sockets. ADDR is unix:/path, tcp:127.0.0.1:PORT, tcp:[::1]:PORT or tcp:localhost:PORT.

struct Address {
  sockaddr_storage storage{};
  socklen_t length = 0;
  bool is_tcp = false;
  std::string text;  // as given, with its unix: or tcp: prefix

  const sockaddr* sa() const { return reinterpret_cast<const sockaddr*>(&storage); }
  int family() const { return storage.ss_family; }
};

Address unix_address(const std::string& path);
Address tcp_address(const std::string& hostport);  // "127.0.0.1:80", "[::1]:80", "localhost:80"
Address parse_address(const std::string& text);
// The numeric form: unix:/path, tcp:HOST:PORT or tcp:[HOST]:PORT.
std::string describe(const Address& a);
// `requested` with a TCP port of 0 replaced by the port `fd` is bound to.
Address bound_address(int fd, const Address& requested);

void set_nodelay(int fd);
void set_nonblocking(int fd);
// Bounds every blocking call, so a stalled path ends the run with an error instead of a hang.
void set_io_timeout(int fd, double seconds);
void raise_fd_limit();

// A connected blocking socket whose connect and I/O are bounded by `io_timeout_seconds` (TCP_NODELAY on
// TCP), or -1 with errno set.
int connect_to(const Address& a, double io_timeout_seconds);
// A nonblocking listener (a stale unix socket file is replaced); fails the tool on error.
int listen_on(const Address& a);

bool write_all(int fd, const char* data, size_t n);
// Reads exactly n bytes; false on error or EOF (errno ECONNRESET).
bool read_exact(int fd, char* data, size_t n);

}  // namespace bench_io
