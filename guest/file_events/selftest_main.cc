// vbridge-file-events-selftest: the host watcher and the guest injector end to end, without the agents.
//
//   vbridge-file-events-selftest --share NAME=HOST_DIR=GUEST_DIR [--share ...] [--guest-ns PID]
//                                [--bench-latency N] [--bench-burst M] [--bench-dir REL]
//
// The process forks. The parent is the "host": it watches HOST_DIR (host/file_watch) and sends each
// FILE_EVENTS batch, as the bytes that would travel in a CONTROL frame, over a socketpair. The child is the
// "guest": it enters the mount namespace of PID (where GUEST_DIR is a FUSE mount of HOST_DIR), verifies each
// batch and applies it (guest/file_events). Output is one JSON object per line on stdout:
//   {"event":"ready",...}            once both sides run
//   {"event":"stats","host":{...},"guest":{...}}   on SIGUSR1, and on SIGTERM/SIGINT before exiting
//   {"event":"bench",...}            with --bench-*: latency of host write -> guest inotify event, burst rate
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "guest/file_events/injector.h"
#include "host/file_watch/watcher.h"
#include "protocol/log.h"

namespace {

using namespace vbridge;

constexpr size_t kMaxMessage = 256 * 1024;

// Socket message types (first byte).
constexpr char kBatch = 'B';    // host -> guest: FlatBuffers Control
constexpr char kStats = 'S';    // host -> guest: request; guest -> host: JSON
constexpr char kReady = 'R';    // guest -> host
constexpr char kArrival = 'A';  // guest -> host: "<index> <monotonic ns>"

struct Config {
  std::vector<file_watch::Share> host;
  std::vector<file_events::Mount> guest;
  int guest_ns_pid = 0;
  int bench_latency = 0;
  int bench_burst = 0;
  std::string bench_dir = "bench";
};

int64_t now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

std::string status_field(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field, 0) == 0) {
      std::string v = line.substr(std::strlen(field));
      v.erase(0, v.find_first_not_of(" \t"));
      return v.substr(0, v.find(' '));
    }
  }
  return "0";
}

std::string process_json() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  const long cpu_ms =
      (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000 + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000;
  return fmt::format("\"pid\":{},\"rss_kb\":{},\"hwm_kb\":{},\"cpu_ms\":{}", getpid(), status_field("VmRSS:"),
                     status_field("VmHWM:"), cpu_ms);
}

bool send_msg(int fd, char type, const void* data, size_t len) {
  std::vector<char> buf(1 + len);
  buf[0] = type;
  if (len != 0) std::memcpy(buf.data() + 1, data, len);
  for (;;) {
    const ssize_t n = send(fd, buf.data(), buf.size(), MSG_NOSIGNAL);
    if (n >= 0) return true;
    if (errno != EINTR) return false;
  }
}

bool send_str(int fd, char type, const std::string& s) { return send_msg(fd, type, s.data(), s.size()); }

// ---------------------------------------------------------------------------------------------------------
// Guest side

std::string guest_stats_json(const file_events::Injector& inj) {
  const auto& c = inj.counters();
  return fmt::format(
      "{{{},\"batches\":{},\"events\":{},\"file_touches\":{},\"dir_touches\":{},\"refused\":{},"
      "\"unknown_share\":{},\"gone\":{},\"symlink_leaf\":{},\"special_skipped\":{},\"read_only_opens\":{},"
      "\"xattr_unsupported\":{},\"rescan_unchanged\":{},\"errors\":{},\"openat2\":{}}}",
      process_json(), c.batches, c.events, c.file_touches, c.dir_touches, c.refused, c.unknown_share, c.gone,
      c.symlink_leaf, c.special_skipped, c.read_only_opens, c.xattr_unsupported, c.rescan_unchanged, c.errors,
      inj.uses_openat2() ? "true" : "false");
}

int run_guest(const Config& cfg, int sock) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  signal(SIGINT, SIG_IGN);  // the host side decides when to stop
  signal(SIGTERM, SIG_IGN);
  if (cfg.guest_ns_pid != 0) {
    const std::string ns = fmt::format("/proc/{}/ns/mnt", cfg.guest_ns_pid);
    const int nsfd = open(ns.c_str(), O_RDONLY | O_CLOEXEC);
    if (nsfd < 0 || setns(nsfd, CLONE_NEWNS) != 0) {
      std::fprintf(stderr, "guest: cannot enter %s: %s\n", ns.c_str(), std::strerror(errno));
      return 1;
    }
    close(nsfd);
  }
  auto inj = file_events::Injector::create(cfg.guest);
  if (!inj) {
    std::fprintf(stderr, "guest: %s\n", inj.error().message.c_str());
    return 1;
  }
  // Benchmark probe: a watcher in the guest, on the mount, as an application would have.
  int ino = -1;
  std::unordered_map<std::string, bool> seen;
  if (cfg.bench_latency > 0 || cfg.bench_burst > 0) {
    ino = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    const std::string base = cfg.guest[0].guest_path + "/" + cfg.bench_dir;
    inotify_add_watch(ino, base.c_str(), IN_ATTRIB | IN_CLOSE_WRITE | IN_CREATE | IN_MODIFY);
    for (int k = 0; k < 16; ++k) {
      inotify_add_watch(ino, fmt::format("{}/s{}", base, k).c_str(),
                        IN_ATTRIB | IN_CLOSE_WRITE | IN_CREATE | IN_MODIFY);
    }
  }
  send_str(sock, kReady, "");
  std::vector<char> buf(kMaxMessage);
  std::vector<uint64_t> aligned;  // a batch copied out of buf at an 8-byte-aligned address
  alignas(struct inotify_event) char ibuf[64 * 1024];
  for (;;) {
    struct pollfd p[2] = {{sock, POLLIN, 0}, {ino, POLLIN, 0}};
    if (poll(p, ino >= 0 ? 2 : 1, -1) < 0 && errno != EINTR) break;
    if (ino >= 0 && (p[1].revents & POLLIN)) {
      const int64_t t = now_ns();
      for (ssize_t n; (n = read(ino, ibuf, sizeof ibuf)) > 0;) {
        for (ssize_t off = 0; off < n;) {
          const auto* e = reinterpret_cast<const struct inotify_event*>(ibuf + off);
          off += static_cast<ssize_t>(sizeof(struct inotify_event) + e->len);
          if (e->len == 0 || e->name[0] != 'f') continue;
          if (seen.emplace(e->name, true).second)
            send_str(sock, kArrival, fmt::format("{} {}", e->name + 1, t));
        }
      }
    }
    if (!(p[0].revents & (POLLIN | POLLHUP))) continue;
    const ssize_t n = recv(sock, buf.data(), buf.size(), 0);
    if (n <= 0) break;
    if (buf[0] == kBatch) {
      // The batch follows the one-byte type, at an odd address: read_file_events copies it aligned.
      auto batch = file_events::read_file_events(
          std::as_bytes(std::span(buf.data() + 1, static_cast<size_t>(n - 1))), aligned);
      if (!batch) {
        std::fprintf(stderr, "guest: %s\n", batch.error().message.c_str());
        continue;
      }
      inj->apply(**batch);
    } else if (buf[0] == kStats) {
      send_str(sock, kStats, guest_stats_json(*inj));
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------
// Host side

std::string host_stats_json(const file_watch::Watcher& w) {
  const auto c = w.counters();
  return fmt::format(
      "{{{},\"raw_events\":{},\"batches\":{},\"changes\":{},\"echoes_suppressed\":{},\"overflows\":{},"
      "\"watches\":{},\"watch_errors\":{},\"coalesce_collapses\":{},\"pending_paths\":{},\"window_ms\":{}}}",
      process_json(), c.raw_events, c.batches, c.changes, c.echoes_suppressed, c.overflows, c.watches,
      c.watch_errors, c.coalesce_collapses, c.pending_paths, c.window_ms);
}

struct Host {
  file_watch::Watcher* watcher;
  int sock;
  int sigfd;
  bool stop = false;
  std::map<long, int64_t> arrivals;  // bench file index -> guest arrival time
  std::string guest_stats;

  // Encoded batches the socket did not take yet. While any wait, the watcher is drained with
  // max_batches = 0 (it keeps reading and merging), as an agent does while its transport is backed up.
  std::deque<file_watch::Batch> outbox;
  bool held = false;

  void flush_outbox() {
    while (!outbox.empty()) {
      const auto& m = outbox.front().message;
      std::vector<char> buf(1 + m.GetSize());
      buf[0] = kBatch;
      std::memcpy(buf.data() + 1, m.GetBufferPointer(), m.GetSize());
      const ssize_t n = send(sock, buf.data(), buf.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN) stop = true;
        return;
      }
      outbox.pop_front();
    }
  }
  void pump() {
    auto batches = watcher->drain(outbox.empty() ? 8 : 0);
    held = !outbox.empty();
    for (auto& b : batches) outbox.push_back(std::move(b));
    flush_outbox();
  }

  // One turn of the loop: waits up to timeout_ms for something to do.
  void step(int timeout_ms) {
    struct pollfd p[3] = {{watcher->fd(), POLLIN, 0},
                          {sock, static_cast<short>(POLLIN | (outbox.empty() ? 0 : POLLOUT)), 0},
                          {sigfd, POLLIN, 0}};
    if (poll(p, 3, timeout_ms) < 0) return;
    if (p[1].revents & POLLOUT) {
      flush_outbox();
      if (outbox.empty() && held) pump();  // the transport caught up: take what the watcher held back
    }
    if (p[0].revents & POLLIN) pump();
    if (p[1].revents & POLLIN) read_guest();
    if (p[1].revents & POLLHUP) stop = true;
    if (p[2].revents & POLLIN) {
      struct signalfd_siginfo si {};
      if (read(sigfd, &si, sizeof si) == sizeof si) {
        if (si.ssi_signo == SIGUSR1) {
          print_stats();
        } else {
          stop = true;
        }
      }
    }
  }
  void read_guest() {
    char buf[4096];
    for (;;) {
      const ssize_t n = recv(sock, buf, sizeof buf - 1, MSG_DONTWAIT);
      if (n <= 0) return;
      buf[n] = '\0';
      if (buf[0] == kArrival) {
        long idx = 0;
        long long t = 0;
        if (std::sscanf(buf + 1, "%ld %lld", &idx, &t) == 2) arrivals.emplace(idx, t);
      } else if (buf[0] == kStats) {
        guest_stats.assign(buf + 1, static_cast<size_t>(n - 1));
      }
    }
  }
  void print_stats() {
    guest_stats.clear();
    send_str(sock, kStats, "");
    // The request waits behind the batches already queued to the guest.
    const int64_t deadline = now_ns() + 120'000'000'000;
    while (guest_stats.empty() && now_ns() < deadline) {
      // Keep watching meanwhile: the kernel's queue must not overflow while we wait.
      struct pollfd p[2] = {{sock, static_cast<short>(POLLIN | (outbox.empty() ? 0 : POLLOUT)), 0},
                            {watcher->fd(), POLLIN, 0}};
      poll(p, 2, 100);
      if (p[0].revents & POLLOUT) flush_outbox();
      if ((p[1].revents & POLLIN) || (outbox.empty() && held)) pump();
      read_guest();
    }
    std::printf("{\"event\":\"stats\",\"host\":%s,\"guest\":%s}\n", host_stats_json(*watcher).c_str(),
                guest_stats.empty() ? "null" : guest_stats.c_str());
    std::fflush(stdout);
  }
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

void write_file(const std::string& path, const char* data) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  (void)!write(fd, data, std::strlen(data));
  close(fd);
}

void run_bench(Host& h, const Config& cfg) {
  const std::string base = cfg.host[0].root + "/" + cfg.bench_dir;
  // Let the watcher settle (the bench folders were just created).
  for (int i = 0; i < 20; ++i) h.step(10);

  // Latency: one write at a time, each waited for on the guest side.
  std::vector<double> lat_ms;
  int missed = 0;
  for (int i = 0; i < cfg.bench_latency && !h.stop; ++i) {
    const long idx = 1'000'000 + i;
    write_file(fmt::format("{}/f{}", base, idx), "latency probe\n");
    const int64_t t0 = now_ns();
    while (!h.stop && h.arrivals.count(idx) == 0 && now_ns() - t0 < 2'000'000'000) h.step(5);
    if (h.arrivals.count(idx) != 0) {
      lat_ms.push_back(static_cast<double>(h.arrivals[idx] - t0) / 1e6);
    } else {
      ++missed;
    }
    for (int k = 0; k < 3; ++k) h.step(1);  // a little idle between probes
  }

  // Burst: a separate writer process creates M files in 16 folders as fast as it can (like a checkout);
  // the rate is M over the time from its first write to the guest's last event.
  double burst_s = 0;
  size_t burst_seen = 0;
  if (cfg.bench_burst > 0 && !h.stop) {
    const int64_t t0 = now_ns();
    const pid_t writer = fork();
    if (writer == 0) {
      for (int i = 0; i < cfg.bench_burst; ++i) write_file(fmt::format("{}/s{}/f{}", base, i % 16, i), "x\n");
      _exit(0);
    }
    int64_t last = t0;
    bool writer_done = false;
    while (!h.stop) {
      h.step(20);
      if (!writer_done && waitpid(writer, nullptr, WNOHANG) == writer) writer_done = true;
      size_t n = 0;
      int64_t latest = t0;
      for (auto it = h.arrivals.lower_bound(0); it != h.arrivals.end() && it->first < 1'000'000; ++it) {
        ++n;
        latest = std::max(latest, it->second);
      }
      if (n != burst_seen) {
        burst_seen = n;
        last = latest;
      }
      if (burst_seen >= static_cast<size_t>(cfg.bench_burst)) break;
      if (writer_done && now_ns() - std::max(last, t0) > 3'000'000'000) break;  // nothing new for 3 s
    }
    if (!writer_done) waitpid(writer, nullptr, 0);
    burst_s = static_cast<double>(last - t0) / 1e9;
  }

  double sum = 0;
  for (double v : lat_ms) sum += v;
  std::printf(
      "{\"event\":\"bench\",\"latency_samples\":%zu,\"latency_missed\":%d,\"p50_ms\":%.3f,\"p90_ms\":%.3f,"
      "\"p99_ms\":%.3f,\"max_ms\":%.3f,\"mean_ms\":%.3f,\"burst_files\":%d,\"burst_seen\":%zu,\"burst_s\":%."
      "3f,"
      "\"burst_events_per_s\":%.0f}\n",
      lat_ms.size(), missed, percentile(lat_ms, 0.5), percentile(lat_ms, 0.9), percentile(lat_ms, 0.99),
      lat_ms.empty() ? 0.0 : *std::max_element(lat_ms.begin(), lat_ms.end()),
      lat_ms.empty() ? 0.0 : sum / static_cast<double>(lat_ms.size()), cfg.bench_burst, burst_seen, burst_s,
      burst_s > 0 ? static_cast<double>(burst_seen) / burst_s : 0.0);
  std::fflush(stdout);
}

int usage() {
  std::fprintf(
      stderr,
      "usage: vbridge-file-events-selftest --share NAME=HOST_DIR=GUEST_DIR [--share ...] [--guest-ns PID]\n"
      "       [--bench-latency N] [--bench-burst M] [--bench-dir REL] [--log-level LEVEL]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : std::string(); };
    if (a == "--share") {
      const std::string v = next();
      const size_t e1 = v.find('=');
      const size_t e2 = e1 == std::string::npos ? e1 : v.find('=', e1 + 1);
      if (e2 == std::string::npos) return usage();
      cfg.host.push_back({v.substr(0, e1), v.substr(e1 + 1, e2 - e1 - 1)});
      cfg.guest.push_back({v.substr(0, e1), v.substr(e2 + 1)});
    } else if (a == "--guest-ns") {
      cfg.guest_ns_pid = std::atoi(next().c_str());
    } else if (a == "--bench-latency") {
      cfg.bench_latency = std::atoi(next().c_str());
    } else if (a == "--bench-burst") {
      cfg.bench_burst = std::atoi(next().c_str());
    } else if (a == "--bench-dir") {
      cfg.bench_dir = next();
    } else if (a == "--log-level") {
      log::Level level{};
      if (!log::parse_level(next(), &level)) return usage();
      log::set_level(level);
    } else {
      return usage();
    }
  }
  if (cfg.host.empty()) return usage();
  const bool bench = cfg.bench_latency > 0 || cfg.bench_burst > 0;
  if (bench) {
    const std::string base = cfg.host[0].root + "/" + cfg.bench_dir;
    mkdir(base.c_str(), 0755);
    for (int k = 0; k < 16; ++k) mkdir(fmt::format("{}/s{}", base, k).c_str(), 0755);
  }

  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return 1;
  // A transport that buffers little, so a slow guest pushes back on the host side.
  const int sndbuf = 256 * 1024;
  setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  const pid_t child = fork();
  if (child < 0) return 1;
  if (child == 0) {
    close(sv[0]);
    log::set_component("selftest-guest");
    _exit(run_guest(cfg, sv[1]));
  }
  close(sv[1]);
  log::set_component("selftest-host");

  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGUSR1);
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  const int sigfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);

  auto watcher = file_watch::make_watcher(nullptr, cfg.host);
  if (!watcher) {
    std::fprintf(stderr, "host: %s\n", watcher.error().message.c_str());
    std::printf("{\"event\":\"error\",\"message\":\"%s\"}\n", watcher.error().message.c_str());
    close(sv[0]);
    waitpid(child, nullptr, 0);
    return 1;
  }
  char ready = 0;
  if (recv(sv[0], &ready, 1, 0) != 1 || ready != kReady) {
    std::fprintf(stderr, "host: the guest side did not start\n");
    waitpid(child, nullptr, 0);
    return 1;
  }
  Host h{watcher->get(), sv[0], sigfd};
  std::printf("{\"event\":\"ready\",\"host_pid\":%d,\"guest_pid\":%d,\"watches\":%llu}\n", getpid(), child,
              static_cast<unsigned long long>((*watcher)->counters().watches));
  std::fflush(stdout);

  if (bench) {
    run_bench(h, cfg);
  } else {
    while (!h.stop) h.step(-1);
  }
  h.print_stats();
  close(sv[0]);
  int status = 0;
  waitpid(child, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
