// vbridge-reference-relay: the plainest relay there is, as a yardstick for what any relay can do on this
// machine (bench/e2e/ceiling.py).
//
//   vbridge-reference-relay copy   --listen ADDR --connect ADDR
//   vbridge-reference-relay splice --listen ADDR --connect ADDR
//
// Each accepted connection gets a connection to --connect and one thread per direction that blocks in
// read/write (copy: a 256 KiB buffer, the same size vbridge reads with) or moves the bytes through a 1 MiB
// pipe with splice(2) (splice: the kernel hands page references on and userspace never sees the bytes).
// EOF one way becomes shutdown(SHUT_WR) the other way. No protocol, no multiplexing, no event loop: a
// blocked thread sleeps until its socket is ready and nothing else is ever in its way.

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <string>
#include <thread>
#include <vector>

#include "bench_io.h"

namespace bench_io {

[[noreturn]] void fail(const std::string& what) { exit_with("vbridge-reference-relay", 1, what); }

}  // namespace bench_io

namespace {

using namespace bench_io;

constexpr size_t kCopyBuffer = 256 * 1024;
constexpr int kPipeBytes = 1 << 20;
constexpr double kNoTimeout = 0;  // set_io_timeout(0): block for as long as it takes

void copy_until_eof(int from, int to) {
  std::vector<char> buf(kCopyBuffer);
  for (;;) {
    const ssize_t r = read(from, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0 || !write_all(to, buf.data(), static_cast<size_t>(r))) break;
  }
}

// Moves exactly n bytes out of the pipe into `to`; false if `to` fails.
bool drain_pipe(int pipe_read, int to, size_t n) {
  while (n > 0) {
    const ssize_t out = splice(pipe_read, nullptr, to, nullptr, n, SPLICE_F_MOVE);
    if (out < 0 && errno == EINTR) continue;
    if (out <= 0) return false;
    n -= static_cast<size_t>(out);
  }
  return true;
}

void splice_until_eof(int from, int to) {
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) return copy_until_eof(from, to);
  fcntl(pipe_fds[1], F_SETPIPE_SZ, kPipeBytes);  // best effort: the default 64 KiB pipe works, only slower
  for (;;) {
    const ssize_t in = splice(from, nullptr, pipe_fds[1], nullptr, kPipeBytes, SPLICE_F_MOVE);
    if (in < 0 && errno == EINTR) continue;
    if (in <= 0 || !drain_pipe(pipe_fds[0], to, static_cast<size_t>(in))) break;
  }
  close(pipe_fds[0]);
  close(pipe_fds[1]);
}

void relay_connection(int client, const Address& upstream, bool use_splice) {
  const int server = connect_to(upstream, kNoTimeout);
  if (server < 0) {
    close(client);
    return;
  }
  auto one_way = [use_splice](int from, int to) {
    if (use_splice) {
      splice_until_eof(from, to);
    } else {
      copy_until_eof(from, to);
    }
    shutdown(to, SHUT_WR);
  };
  std::thread back(one_way, server, client);
  one_way(client, server);
  back.join();
  close(server);
  close(client);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) fail("usage: vbridge-reference-relay copy|splice --listen ADDR --connect ADDR");
  const Options opt = parse_options(argc, argv, {}, {"--listen", "--connect"});
  if (opt.mode != "copy" && opt.mode != "splice") fail("mode must be copy or splice, not " + opt.mode);
  const bool use_splice = opt.mode == "splice";
  const Address upstream = parse_address(opt.text("--connect"));
  const int listener = listen_on(parse_address(opt.text("--listen")));
  std::signal(SIGPIPE, SIG_IGN);
  raise_fd_limit();
  for (;;) {
    pollfd p{listener, POLLIN, 0};
    if (poll(&p, 1, -1) < 0 && errno != EINTR) fail(errno_text("poll"));
    const int client = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    if (upstream.is_tcp) set_nodelay(client);
    std::thread(relay_connection, client, upstream, use_splice).detach();
  }
}
