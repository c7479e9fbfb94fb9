#include "bench_io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>

namespace bench_io {

void exit_with(const char* tool, int code, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", tool, what.c_str());
  std::exit(code);
}

std::string errno_text(const std::string& what) { return what + ": " + std::strerror(errno); }

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

Clock::time_point after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

double micros(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

// ---------------------------------------------------------------------------------------------------------
// Command line

std::vector<std::string> Options::all(const std::string& key) const {
  std::vector<std::string> out;
  auto [lo, hi] = values.equal_range(key);
  for (auto it = lo; it != hi; ++it) out.push_back(it->second);
  return out;
}

std::string Options::text(const std::string& key) const {
  auto it = values.find(key);
  if (it == values.end()) fail("missing " + key);
  return it->second;
}

double Options::number(const std::string& key, std::optional<double> fallback) const {
  auto it = values.find(key);
  if (it == values.end()) {
    if (!fallback) fail("missing " + key);
    return *fallback;
  }
  char* end = nullptr;
  const double v = std::strtod(it->second.c_str(), &end);
  if (end == it->second.c_str() || *end != '\0' || v < 0) fail("bad number for " + key + ": " + it->second);
  return v;
}

Options parse_options(int argc, char** argv, std::initializer_list<std::string_view> flags,
                      std::initializer_list<std::string_view> valued, const std::string& unknown_suffix) {
  Options opt;
  opt.mode = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (std::find(flags.begin(), flags.end(), arg) != flags.end()) {
      opt.values.emplace(std::string(arg), "");
    } else if (std::find(valued.begin(), valued.end(), arg) != valued.end()) {
      if (i + 1 >= argc) fail("missing value for " + std::string(arg));
      opt.values.emplace(std::string(arg), argv[++i]);
    } else {
      fail("unknown option " + std::string(arg) + unknown_suffix);
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

std::string json_array(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? "," : "") + items[i];
  return out + "]";
}

void print_line(const std::string& line) {
  std::fputs((line + "\n").c_str(), stdout);
  std::fflush(stdout);
}

Json& Json::raw(std::string_view key, std::string_view json) {
  if (!body_.empty()) body_ += ',';
  body_ += quote(key) + ':' + std::string(json);
  return *this;
}

Percentiles::Percentiles(std::vector<double> v) : sorted(std::move(v)) {
  std::sort(sorted.begin(), sorted.end());
}

double Percentiles::at(double q) const {
  if (sorted.empty()) return 0;
  auto i = static_cast<size_t>(q * static_cast<double>(sorted.size()));
  return sorted[std::min(i, sorted.size() - 1)];
}

Json& Percentiles::add_to(Json& j, const std::string& unit) const {
  double sum = 0;
  for (double v : sorted) sum += v;
  return j.num("p50_" + unit, at(0.50))
      .num("p90_" + unit, at(0.90))
      .num("p99_" + unit, at(0.99))
      .num("max_" + unit, max())
      .num("mean_" + unit, sorted.empty() ? 0 : sum / static_cast<double>(sorted.size()));
}

Trials run_trials(int parallel, const std::function<bool(int)>& proceed,
                  const std::function<std::string(int, uint64_t)>& attempt) {
  std::mutex mu;
  Trials all;
  std::vector<std::thread> threads;
  for (int p = 0; p < parallel; ++p) {
    threads.emplace_back([&, p] {
      std::vector<double> mine;
      uint64_t my_failures = 0;
      std::string my_first, my_last;
      while (proceed(p)) {
        const auto start = Clock::now();
        std::string error = attempt(p, mine.size() + my_failures);
        if (error.empty()) {
          mine.push_back(micros(Clock::now() - start));
          continue;
        }
        ++my_failures;
        if (my_first.empty()) my_first = error;
        my_last = std::move(error);
      }
      std::lock_guard lock(mu);
      all.latencies_us.insert(all.latencies_us.end(), mine.begin(), mine.end());
      all.failures += my_failures;
      if (all.first_error.empty()) all.first_error = my_first;
      if (!my_last.empty()) all.last_error = my_last;
    });
  }
  for (auto& t : threads) t.join();
  return all;
}

// ---------------------------------------------------------------------------------------------------------
// Addresses and sockets

Address unix_address(const std::string& path) {
  Address a;
  a.text = "unix:" + path;
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof un.sun_path) fail("unix socket path empty or too long: " + path);
  std::memcpy(un.sun_path, path.c_str(), path.size() + 1);
  std::memcpy(&a.storage, &un, sizeof un);
  a.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  return a;
}

Address tcp_address(const std::string& hostport) {
  Address a;
  a.text = "tcp:" + hostport;
  std::string host, port;
  if (!hostport.empty() && hostport.front() == '[') {
    const auto close = hostport.find("]:");
    if (close == std::string::npos) fail("bad address " + a.text);
    host = hostport.substr(1, close - 1);
    port = hostport.substr(close + 2);
  } else {
    const auto colon = hostport.rfind(':');
    if (colon == std::string::npos) fail("bad address (want tcp:HOST:PORT) " + a.text);
    host = hostport.substr(0, colon);
    port = hostport.substr(colon + 1);
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) fail("cannot resolve " + a.text + ": " + gai_strerror(rc));
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
  if (a.family() == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(a.sa());
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    return "tcp:[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  auto* in4 = reinterpret_cast<const sockaddr_in*>(a.sa());
  inet_ntop(AF_INET, &in4->sin_addr, host, sizeof host);
  return "tcp:" + std::string(host) + ":" + std::to_string(ntohs(in4->sin_port));
}

Address bound_address(int fd, const Address& requested) {
  if (!requested.is_tcp) return requested;
  Address a = requested;
  a.length = sizeof a.storage;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a.storage), &a.length);
  return a;
}

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

void set_io_timeout(int fd, double seconds) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

void raise_fd_limit() {
  if (rlimit rl{}; getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

int connect_to(const Address& a, double io_timeout_seconds) {
  const int fd = socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  set_io_timeout(fd, io_timeout_seconds);
  if (connect(fd, a.sa(), a.length) != 0) {
    const int saved = errno;
    close(fd);
    errno = saved;
    return -1;
  }
  if (a.is_tcp) set_nodelay(fd);
  return fd;
}

int listen_on(const Address& a) {
  const int fd = socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) fail(errno_text("socket"));
  if (a.is_tcp) {
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  } else {
    const char* path = reinterpret_cast<const sockaddr_un*>(a.sa())->sun_path;
    struct stat st {};
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path);
  }
  if (bind(fd, a.sa(), a.length) != 0) fail(errno_text("bind " + a.text));
  if (listen(fd, 4096) != 0) fail(errno_text("listen " + a.text));
  return fd;
}

bool write_all(int fd, const char* data, size_t n) {
  while (n > 0) {
    const ssize_t w = send(fd, data, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool read_exact(int fd, char* data, size_t n) {
  while (n > 0) {
    const ssize_t r = read(fd, data, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      if (r == 0) errno = ECONNRESET;
      return false;
    }
    data += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

}  // namespace bench_io
