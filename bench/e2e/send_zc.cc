// vbridge-sendzc: does io_uring SEND_ZC beat SEND for the guest agent's socket writes on this kernel?
//
//   vbridge-sendzc [--seconds T] [--size BYTES]
//
// For each socket kind the guest agent writes to (a TCP connection on loopback, a unix stream socket) and
// each way of sending (SEND, SEND_ZC), one sender pushes `size`-byte sends through io_uring for T seconds
// while a thread reads the other end. One request is in flight at a time, as with the agent's per-socket
// write queue; SEND_ZC's buffer is reused only after its notification. Prints one JSON line per case:
// MB/s, CPU seconds per GB of the whole process (sender and reader), and how many SEND_ZC sends the kernel
// reported as copied after all. A kind without SEND_ZC says so.
#include <arpa/inet.h>
#include <liburing.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

// liburing 2.3's copy of the kernel header predates usage reports (Linux 6.2); the values are ABI.
#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)
#endif

namespace {

using Clock = std::chrono::steady_clock;

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const auto s = [](const timeval& t) { return double(t.tv_sec) + double(t.tv_usec) / 1e6; };
  return s(ru.ru_utime) + s(ru.ru_stime);
}

// A connected pair: [0] sends, [1] is read by the drain thread.
bool tcp_pair(int fds[2]) {
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listener, 1) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return false;
  }
  fds[0] = ::socket(AF_INET, SOCK_STREAM, 0);
  if (::connect(fds[0], reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return false;
  fds[1] = ::accept(listener, nullptr, nullptr);
  ::close(listener);
  return fds[1] >= 0;
}

bool unix_pair(int fds[2]) { return ::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0; }

struct Outcome {
  std::string error;
  double mbps = 0, cpu_per_gb = 0;
  uint64_t sends = 0, copied = 0;
};

Outcome run(bool (*make_pair)(int[2]), bool zero_copy, double seconds, size_t size) {
  Outcome out;
  int fds[2] = {-1, -1};
  if (!make_pair(fds)) {
    out.error = std::string("socket pair: ") + std::strerror(errno);
    return out;
  }
  std::thread drain([&] {
    std::vector<char> buf(1 << 20);
    while (::read(fds[1], buf.data(), buf.size()) > 0) {
    }
  });
  io_uring ring{};
  io_uring_queue_init(8, &ring, 0);
  std::vector<char> data(size, 'z');
  const double cpu0 = cpu_seconds();
  const auto t0 = Clock::now();
  const auto end = t0 + std::chrono::duration<double>(seconds);
  uint64_t bytes = 0;
  while (Clock::now() < end && out.error.empty()) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (zero_copy) {
      io_uring_prep_send_zc(sqe, fds[0], data.data(), size, MSG_NOSIGNAL, IORING_SEND_ZC_REPORT_USAGE);
    } else {
      io_uring_prep_send(sqe, fds[0], data.data(), size, MSG_NOSIGNAL);
    }
    io_uring_submit(&ring);
    // SEND gives one completion; SEND_ZC gives the result (flagged MORE) and later a notification.
    bool result_seen = false, notified = !zero_copy;
    while (!result_seen || !notified) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe(&ring, &cqe) != 0) {
        out.error = "io_uring_wait_cqe failed";
        break;
      }
      if ((cqe->flags & IORING_CQE_F_NOTIF) != 0) {
        notified = true;
        // The kernel copied the bytes after all (loopback delivers to a local reader).
        if ((cqe->res & IORING_NOTIF_USAGE_ZC_COPIED) != 0) ++out.copied;
      } else {
        result_seen = true;
        if (cqe->res < 0) {
          out.error = std::strerror(-cqe->res);
          notified = true;
        } else {
          bytes += static_cast<uint64_t>(cqe->res);
          ++out.sends;
          if ((cqe->flags & IORING_CQE_F_MORE) == 0) notified = true;
        }
      }
      io_uring_cqe_seen(&ring, cqe);
    }
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  ::shutdown(fds[0], SHUT_WR);
  drain.join();
  const double cpu = cpu_seconds() - cpu0;
  io_uring_queue_exit(&ring);
  ::close(fds[0]);
  ::close(fds[1]);
  if (bytes > 0) {
    out.mbps = double(bytes) / elapsed / 1e6;
    out.cpu_per_gb = cpu / (double(bytes) / 1e9);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 3;
  size_t size = 256 * 1024;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--seconds") {
      seconds = std::atof(argv[i + 1]);
    } else if (flag == "--size") {
      size = static_cast<size_t>(std::atol(argv[i + 1]));
    } else {
      std::fprintf(stderr, "vbridge-sendzc: unknown flag %s (use --seconds T, --size BYTES)\n", flag.c_str());
      return 2;
    }
  }
  struct Kind {
    const char* name;
    bool (*make)(int[2]);
  };
  for (const Kind kind : {Kind{"tcp", tcp_pair}, Kind{"unix", unix_pair}}) {
    for (const bool zc : {false, true}) {
      const Outcome o = run(kind.make, zc, seconds, size);
      if (!o.error.empty()) {
        std::printf("{\"socket\":\"%s\",\"send\":\"%s\",\"size\":%zu,\"error\":\"%s\"}\n", kind.name,
                    zc ? "send_zc" : "send", size, o.error.c_str());
        continue;
      }
      std::printf(
          "{\"socket\":\"%s\",\"send\":\"%s\",\"size\":%zu,\"MBps\":%.0f,\"cpu_s_per_GB\":%.3f,\"sends\":%"
          "llu,"
          "\"copied_notifications\":%llu}\n",
          kind.name, zc ? "send_zc" : "send", size, o.mbps, o.cpu_per_gb,
          static_cast<unsigned long long>(o.sends), static_cast<unsigned long long>(o.copied));
    }
  }
  return 0;
}
