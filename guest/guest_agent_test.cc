// Runs the real vbridge-guest binary as a process, listening on a unix socket in a temp dir, and plays the
// host over a unix socket with a protocol Mux. Guest-side servers are real unix/TCP sockets served by
// threads in this process. Every wait polls with a deadline; nothing sleeps to synchronise.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "protocol/datagram.h"
#include "protocol/frame.h"
#include "protocol/mux.h"

namespace vbridge {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr auto kDeadline = milliseconds(10000);
// The --token-file contents of every unix-listening agent in this file (HostPeer sends it in its HELLO).
const std::string kToken = "0123456789abcdef0123456789abcdef";

// Writes `text` to `path` with `mode`.
void write_file(const std::string& path, const std::string& text, mode_t mode) {
  std::ofstream(path) << text;
  chmod(path.c_str(), mode);
}

// ---------------------------------------------------------------------------------------------------------
// Helpers: temp dir, byte streams with checksums

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vbridge-guest-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

struct Fnv {
  uint64_t h = 0xcbf29ce484222325ull;
  void add(const std::byte* p, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ uint64_t(p[i])) * 0x100000001b3ull;
  }
};

// A deterministic pseudo-random byte stream (splitmix64), so sender and checker need not store it.
struct Generator {
  uint64_t state;
  uint64_t word = 0;
  int left = 0;
  explicit Generator(uint64_t seed) : state(seed) {}
  void fill(std::byte* out, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if (left == 0) {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        word = z ^ (z >> 31);
        left = 8;
      }
      out[i] = std::byte(word & 0xff);
      word >>= 8;
      --left;
    }
  }
};

bool wait_until(const std::function<bool()>& done, milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (!done()) {
    if (Clock::now() > deadline) return false;
    poll(nullptr, 0, 2);  // a bounded pause between checks of a condition with a deadline
  }
  return true;
}

bool write_all(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------------
// Guest-side servers: a listening socket, one thread per connection running `serve(fd)`.

class Server {
 public:
  using Handler = std::function<void(Server&, int fd)>;

  static std::unique_ptr<Server> unix_socket(const std::string& path, Handler handler) {
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    std::strncpy(sun.sun_path, path.c_str(), sizeof(sun.sun_path) - 1);
    EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)), 0);
    EXPECT_EQ(listen(fd, 512), 0);
    return std::unique_ptr<Server>(new Server(fd, std::move(handler)));
  }

  static std::unique_ptr<Server> tcp_loopback(Handler handler, uint16_t* port) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sin), sizeof(sin)), 0);
    EXPECT_EQ(listen(fd, 512), 0);
    socklen_t len = sizeof(sin);
    getsockname(fd, reinterpret_cast<sockaddr*>(&sin), &len);
    *port = ntohs(sin.sin_port);
    return std::unique_ptr<Server>(new Server(fd, std::move(handler)));
  }

  ~Server() {
    const char stop = 1;
    (void)!write(stop_[1], &stop, 1);
    accept_thread_.join();
    {
      std::lock_guard lock(mu_);
      for (const int fd : live_fds_) shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : conn_threads_) t.join();
    close(listen_fd_);
    close(stop_[0]);
    close(stop_[1]);
  }

  int active() const { return active_.load(); }
  int accepted() const { return accepted_.load(); }
  void record(std::string text) {
    std::lock_guard lock(mu_);
    records_.push_back(std::move(text));
  }
  std::vector<std::string> records() {
    std::lock_guard lock(mu_);
    return records_;
  }

 private:
  Server(int fd, Handler handler) : listen_fd_(fd), handler_(std::move(handler)) {
    EXPECT_EQ(pipe2(stop_, O_CLOEXEC), 0);
    accept_thread_ = std::thread([this] { accept_loop(); });
  }

  void accept_loop() {
    while (true) {
      pollfd p[2] = {{listen_fd_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (poll(p, 2, -1) < 0) continue;
      if (p[1].revents != 0) return;
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      ++accepted_;
      ++active_;
      std::lock_guard lock(mu_);
      live_fds_.insert(fd);
      conn_threads_.emplace_back([this, fd] {
        handler_(*this, fd);
        {
          std::lock_guard inner(mu_);
          live_fds_.erase(fd);
        }
        close(fd);
        --active_;
      });
    }
  }

  int listen_fd_;
  Handler handler_;
  int stop_[2] = {-1, -1};
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<std::thread> conn_threads_;
  std::set<int> live_fds_;
  std::vector<std::string> records_;
  std::atomic<int> active_{0};
  std::atomic<int> accepted_{0};
};

// Echoes until EOF, then half-closes.
void echo(Server&, int fd) {
  std::vector<char> buf(64 * 1024);
  while (true) {
    const ssize_t n = read(fd, buf.data(), buf.size());
    if (n <= 0) break;
    if (!write_all(fd, buf.data(), static_cast<size_t>(n))) return;
  }
  shutdown(fd, SHUT_WR);
}

// Reads until EOF, then answers how much it got: the client's half-close must not stop the reply.
void count_then_reply(Server&, int fd) {
  char buf[4096];
  size_t total = 0;
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) total += static_cast<size_t>(n);
  const std::string reply = "got " + std::to_string(total) + " bytes\n";
  write_all(fd, reply.data(), reply.size());
}

// Speaks first and half-closes, then keeps reading: the client must still be able to send.
void banner_then_listen(Server& server, int fd) {
  write_all(fd, "banner\n", 7);
  shutdown(fd, SHUT_WR);
  std::string got;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) got.append(buf, static_cast<size_t>(n));
  server.record(got);
}

// Hangs up at once without reading.
void hang_up(Server&, int) {}

// ---------------------------------------------------------------------------------------------------------
// The agent process

class AgentProcess {
 public:
  // Listens on unix:<dir>/agent.sock unless `listen` names another transport.
  AgentProcess(const TempDir& dir, const std::vector<std::string>& flags, const std::string& listen = "")
      : socket_path_(dir.file("agent.sock")), log_path_(dir.file("agent.log")) {
    std::vector<std::string> args = {VBRIDGE_GUEST_BINARY, "--listen",
                                     listen.empty() ? "unix:" + socket_path_ : listen, "--log-level",
                                     "debug"};
    // A unix transport needs a token unless the test says otherwise.
    const bool own_token =
        listen.empty() && std::none_of(flags.begin(), flags.end(), [](const std::string& f) {
          return f == "--token-file" || f == "--insecure-no-token";
        });
    if (own_token) {
      write_file(dir.file("token"), kToken + "\n", 0600);
      args.insert(args.end(), {"--token-file", dir.file("token")});
    }
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 2, log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 2, 1);
    const int rc = posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    EXPECT_EQ(rc, 0) << "cannot start " << argv[0];
  }

  ~AgentProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  // A blocking unix socket connected to the agent; waits for the agent to start listening.
  int connect_host() {
    int fd = -1;
    const bool ok = wait_until(
        [&] {
          fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
          sockaddr_un sun{};
          sun.sun_family = AF_UNIX;
          std::strncpy(sun.sun_path, socket_path_.c_str(), sizeof(sun.sun_path) - 1);
          if (connect(fd, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)) == 0) return true;
          close(fd);
          fd = -1;
          return !running();
        },
        milliseconds(5000));
    EXPECT_TRUE(ok && fd >= 0) << "agent did not start listening; log:\n" << log();
    return fd;
  }

  bool running() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      exit_status_ = status;
      return false;
    }
    return true;
  }

  // SIGTERM, then the exit status (or -1 if it did not exit in time).
  int stop(milliseconds timeout = milliseconds(5000)) {
    if (pid_ > 0) kill(pid_, SIGTERM);
    if (!wait_until([&] { return !running(); }, timeout)) return -1;
    return WIFEXITED(exit_status_) ? WEXITSTATUS(exit_status_) : 128 + WTERMSIG(exit_status_);
  }
  pid_t pid() const { return pid_; }

  std::string log() const {
    std::ifstream in(log_path_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  bool wait_log(const std::string& needle, milliseconds timeout = milliseconds(5000)) const {
    return wait_until([&] { return log().find(needle) != std::string::npos; }, timeout);
  }

 private:
  std::string socket_path_;
  std::string log_path_;
  pid_t pid_ = -1;
  int exit_status_ = 0;
};

// ---------------------------------------------------------------------------------------------------------
// The host side: a protocol Mux over a blocking unix socket, pumped with poll().

struct StreamRecord {
  bool open_ok = false, open_fail = false, fin = false, closed = false, reset = false;
  int error_errno = 0;
  std::string message;
  bool keep = true;  // keep received bytes (small streams); bulk streams only hash them
  std::string data;
  uint64_t received = 0;
  Fnv received_hash;
  // Outgoing bulk data, generated as credit allows.
  uint64_t to_send = 0, sent = 0;
  bool fin_after_send = false;
  std::optional<Generator> generator;
  Fnv sent_hash;
};

class HostPeer final : public MuxHandler {
 public:
  explicit HostPeer(int fd, const std::string& token = kToken)
      : fd_(fd), mux_(Role::kHost, *this, config_for(fd, token)) {
    struct stat st {};
    is_socket_ = fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
  }
  // Over a serial port the host resyncs past the guest's restart marker, as vbridge-host --serial-chardev
  // does; over a socket it sends the token.
  static MuxConfig config_for(int fd, const std::string& token) {
    struct stat st {};
    MuxConfig config;
    config.resync = fstat(fd, &st) == 0 && !S_ISSOCK(st.st_mode);
    if (!config.resync) config.hello_token = token;
    return config;
  }
  // The agent is expected to fail the connection (a refused token): feed errors are not test failures.
  bool expect_failure = false;
  ~HostPeer() override {
    if (fd_ >= 0) close(fd_);
  }

  Mux& mux() { return mux_; }
  StreamRecord& stream(StreamId id) { return streams_[id]; }
  bool transport_closed() const { return transport_closed_; }
  const std::optional<std::string>& goaway() const { return goaway_; }

  StreamId open(const wire::TargetT& target) {
    auto id = mux_.open(target);
    EXPECT_TRUE(id.ok());
    streams_[*id];
    return *id;
  }
  StreamId open_unix(const std::string& path) {
    wire::TargetT t;
    t.proto = wire::Proto::Unix;
    t.path = path;
    return open(t);
  }
  StreamId open_tcp(uint16_t port) {
    wire::TargetT t;
    t.proto = wire::Proto::Tcp;
    t.port = port;
    return open(t);
  }
  StreamId open_udp(uint16_t port) {
    wire::TargetT t;
    t.proto = wire::Proto::Udp;
    t.family = wire::Family::Inet4;
    t.host = "127.0.0.1";
    t.port = port;
    return open(t);
  }

  void send_text(StreamId id, const std::string& text) {
    Slice s = pool_.acquire();
    std::memcpy(s.data(), text.data(), text.size());
    ASSERT_TRUE(mux_.send(id, s.sub(0, text.size())));
  }
  void send_bulk(StreamId id, uint64_t bytes, uint64_t seed, bool fin_after) {
    StreamRecord& r = streams_[id];
    r.to_send = bytes;
    r.fin_after_send = fin_after;
    r.generator.emplace(seed);
    r.keep = false;
  }
  // Drops the connection without a goodbye, as a crashed host would.
  void drop() {
    close(fd_);
    fd_ = -1;
  }

  // Moves bytes both ways until done() holds; false when the deadline passes first.
  bool pump_until(const std::function<bool()>& done, milliseconds timeout = kDeadline) {
    const auto deadline = Clock::now() + timeout;
    while (!done()) {
      if (Clock::now() > deadline || fd_ < 0) return false;
      top_up();
      io_once();
    }
    return true;
  }

  // MuxHandler
  void on_ready(const Hello&) override {}
  void on_open(StreamId id, const wire::Target& target) override {
    if (!accept_opens) {
      mux_.reject(id, EPERM, "host test refuses");
      ++refused_opens;
      return;
    }
    mux_.accept(id);
    guest_opened.emplace_back(id, target.path() != nullptr ? target.path()->str() : std::string());
    streams_[id];
  }
  void on_open_result(StreamId id, const Error* error) override {
    StreamRecord& r = streams_[id];
    if (error == nullptr) {
      r.open_ok = true;
      return;
    }
    r.open_fail = true;
    r.error_errno = error->errno_value;
    r.message = error->message;
  }
  void on_data(StreamId id, Slice data) override {
    StreamRecord& r = streams_[id];
    r.received += data.size();
    r.received_hash.add(data.data(), data.size());
    if (r.keep) r.data.append(reinterpret_cast<const char*>(data.data()), data.size());
    mux_.consume(id, data.size());
  }
  void on_fin(StreamId id) override { streams_[id].fin = true; }
  void on_reset(StreamId id, const Error& error) override {
    streams_[id].reset = true;
    streams_[id].message = error.message;
  }
  void on_writable(StreamId) override {}
  void on_closed(StreamId id) override { streams_[id].closed = true; }
  void on_control(const wire::Control& message) override {
    const wire::Ports* ports = message.message_as_Ports();
    if (ports == nullptr) return;
    ++ports_messages;
    if (ports->full()) {
      listeners.clear();
      ++snapshots;
    }
    const auto key = [](const wire::Listener* l) {
      return std::tuple{l->proto(), l->family(), l->address() != nullptr ? l->address()->str() : "",
                        l->port()};
    };
    if (ports->removed() != nullptr) {
      for (const auto* l : *ports->removed()) listeners.erase(key(l));
    }
    if (ports->added() != nullptr) {
      for (const auto* l : *ports->added()) listeners.insert(key(l));
    }
  }
  bool listening(wire::Proto proto, uint16_t port) const {
    return std::any_of(listeners.begin(), listeners.end(),
                       [&](const auto& l) { return std::get<0>(l) == proto && std::get<3>(l) == port; });
  }
  // The same, for one address: other processes of the machine may take the same port number elsewhere
  // once a test's listener is gone.
  bool listening_on(wire::Proto proto, const std::string& address, uint16_t port) const {
    return std::any_of(listeners.begin(), listeners.end(), [&](const auto& l) {
      return std::get<0>(l) == proto && std::get<2>(l) == address && std::get<3>(l) == port;
    });
  }

  // Guest-opened streams: accepted when accept_opens, else refused.
  bool accept_opens = false;
  int refused_opens = 0;
  std::vector<std::pair<StreamId, std::string>> guest_opened;  // id, target path
  // The guest's listeners as PORTS messages told.
  std::set<std::tuple<wire::Proto, wire::Family, std::string, uint16_t>> listeners;
  int ports_messages = 0;
  int snapshots = 0;

  void on_goaway(const std::string& message) override { goaway_ = message; }
  void on_pong(uint64_t) override {}

 private:
  void top_up() {
    for (auto& [id, r] : streams_) {
      if (!r.generator) continue;
      while (r.sent < r.to_send) {
        const size_t capacity = mux_.send_capacity(id);
        if (capacity == 0) break;
        const size_t n = std::min<uint64_t>({capacity, pool_.block_size(), r.to_send - r.sent});
        Slice s = pool_.acquire();
        r.generator->fill(s.data(), n);
        r.sent_hash.add(s.data(), n);
        r.sent += n;
        ASSERT_TRUE(mux_.send(id, s.sub(0, n)));
      }
      if (r.sent == r.to_send && r.fin_after_send) {
        mux_.shutdown_write(id);
        r.fin_after_send = false;
      }
    }
  }

  void io_once() {
    pollfd p{fd_, short(POLLIN | (mux_.has_output() ? POLLOUT : 0)), 0};
    if (poll(&p, 1, 20) <= 0) return;
    if ((p.revents & POLLOUT) != 0) {
      iovec iov[128];
      const size_t n = mux_.prepare_output(iov);
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = n;
      const ssize_t w =
          is_socket_ ? sendmsg(fd_, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) : writev(fd_, iov, int(n));
      if (w > 0) mux_.consume_output(static_cast<size_t>(w));
    }
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      Slice buf = pool_.acquire();
      const ssize_t r =
          is_socket_ ? recv(fd_, buf.data(), buf.size(), MSG_DONTWAIT) : read(fd_, buf.data(), buf.size());
      if (r > 0) {
        Status st = mux_.feed(buf.sub(0, static_cast<size_t>(r)));
        EXPECT_TRUE(st.ok() || expect_failure) << st.error().to_string();
      } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
        transport_closed_ = true;
        close(fd_);
        fd_ = -1;
      }
    }
  }

  int fd_;
  bool is_socket_ = true;  // otherwise a terminal standing in for a serial port
  BufferPool pool_{256 * 1024, 64};
  Mux mux_;
  std::map<StreamId, StreamRecord> streams_;
  bool transport_closed_ = false;
  std::optional<std::string> goaway_;
};

// ---------------------------------------------------------------------------------------------------------
// Fixture: one agent per test, in a fresh temp dir, with guest servers on unix sockets.

struct Mode {
  const char* name;
  std::vector<std::string> flags;
};

class GuestAgent : public ::testing::TestWithParam<Mode> {
 protected:
  void SetUp() override {
    echo_ = Server::unix_socket(dir_.file("echo.sock"), echo);
    count_ = Server::unix_socket(dir_.file("count.sock"), count_then_reply);
    banner_ = Server::unix_socket(dir_.file("banner.sock"), banner_then_listen);
    hangup_ = Server::unix_socket(dir_.file("hangup.sock"), hang_up);
  }

  void start(std::vector<std::string> extra = {}) {
    std::vector<std::string> flags = {"--forward",       "echo=" + dir_.file("echo.sock"),
                                      "--forward",       "count=" + dir_.file("count.sock"),
                                      "--allow-unix",    dir_.file("banner.sock"),
                                      "--allow-unix",    dir_.file("hangup.sock"),
                                      "--allow-unix",    dir_.file("missing.sock"),
                                      "--drain-timeout", "0.5"};
    flags.insert(flags.end(), GetParam().flags.begin(), GetParam().flags.end());
    flags.insert(flags.end(), extra.begin(), extra.end());
    agent_.emplace(dir_, flags);
  }

  std::unique_ptr<HostPeer> connect() { return std::make_unique<HostPeer>(agent_->connect_host()); }

  // Opens the echo forward, sends `text` and FIN, and checks it comes back with FIN and the stream closes.
  void expect_echo(HostPeer& host, const std::string& text) {
    const StreamId id = host.open_unix("echo");
    host.send_text(id, text);
    host.mux().shutdown_write(id);
    ASSERT_TRUE(host.pump_until([&] { return host.stream(id).closed; })) << agent_->log();
    EXPECT_EQ(host.stream(id).data, text);
  }

  // Stops the agent and checks it exits 0 and prints its counters.
  void expect_clean_exit() {
    ASSERT_EQ(agent_->stop(), 0) << agent_->log();
    EXPECT_NE(agent_->log().find("counters:"), std::string::npos);
  }

  void TearDown() override {
    // VBRIDGE_SHOW_LOGS=1 prints the agent's log of passing tests too.
    if (agent_ && (HasFailure() || std::getenv("VBRIDGE_SHOW_LOGS") != nullptr)) {
      agent_->stop();
      std::printf("---- agent log ----\n%s", agent_->log().c_str());
    }
    agent_.reset();  // closes every guest socket it held, so the server threads finish
    echo_.reset();
    count_.reset();
    banner_.reset();
    hangup_.reset();
  }

  TempDir dir_;
  std::unique_ptr<Server> echo_, count_, banner_, hangup_;
  std::optional<AgentProcess> agent_;
};

TEST_P(GuestAgent, SmallExchange) {
  start();
  auto host = connect();
  expect_echo(*host, "hello through the guest agent");
  expect_clean_exit();
}

TEST_P(GuestAgent, SixtyFourMebibytesBothWaysWithChecksum) {
  start();
  auto host = connect();
  constexpr uint64_t kBytes = 64ull << 20;
  const StreamId id = host->open_unix("echo");
  host->send_bulk(id, kBytes, 42, /*fin_after=*/true);
  const auto t0 = Clock::now();
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).closed; }, milliseconds(60000)))
      << agent_->log();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const StreamRecord& r = host->stream(id);
  EXPECT_EQ(r.sent, kBytes);
  EXPECT_EQ(r.received, kBytes);
  EXPECT_EQ(r.received_hash.h, r.sent_hash.h);
  EXPECT_FALSE(r.reset) << r.message;
  std::printf("64 MiB echoed through the agent in %.3f s (%.0f MiB/s each way)\n", seconds, 64 / seconds);
  expect_clean_exit();
  EXPECT_NE(agent_->log().find("bytes_to_guest=67108864"), std::string::npos);
  EXPECT_NE(agent_->log().find("bytes_from_guest=67108864"), std::string::npos);
}

// While two guest sockets take bulk transfers, their bytes wait to be written in batches
// (kWriteBatchBytes); transfers that stop short of a batch, without a FIN, must still reach the sockets once
// the batch's time is up.
TEST_P(GuestAgent, BulkBytesThatStopShortOfABatchStillArrive) {
  start();
  auto host = connect();
  const StreamId a = host->open_unix("echo");
  const StreamId b = host->open_unix("echo");
  uint64_t expected = 0;
  // The first pieces make both connections bulk ones; later pieces that arrive whole are held.
  for (int round = 0; round < 20; ++round) {
    expected += 64 * 1024;  // one whole DATA frame each: bulk-sized pieces
    host->send_bulk(a, expected, 7, /*fin_after=*/false);
    host->send_bulk(b, expected, 8, /*fin_after=*/false);
    ASSERT_TRUE(host->pump_until([&] {
      return host->stream(a).received == expected && host->stream(b).received == expected;
    })) << "round "
        << round << ": " << host->stream(a).received << " and " << host->stream(b).received << " of "
        << expected << " bytes back\n"
        << agent_->log();
  }
  for (const StreamId id : {a, b}) {
    const StreamRecord& r = host->stream(id);
    EXPECT_EQ(r.received_hash.h, r.sent_hash.h);
    host->mux().shutdown_write(id);
  }
  ASSERT_TRUE(host->pump_until([&] { return host->stream(a).closed && host->stream(b).closed; }))
      << agent_->log();
  expect_clean_exit();
  const std::string log = agent_->log();
  const size_t at = log.find("batched_writes=");
  ASSERT_NE(at, std::string::npos);
  EXPECT_GT(std::stoull(log.substr(at + std::strlen("batched_writes="))), 0u) << "no write was ever held";
}

TEST_P(GuestAgent, HostHalfClosesAndGuestStillReplies) {
  start();
  auto host = connect();
  const StreamId id = host->open_unix("count");
  host->send_text(id, "hello world");
  host->mux().shutdown_write(id);
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).closed; })) << agent_->log();
  EXPECT_EQ(host->stream(id).data, "got 11 bytes\n");
  EXPECT_TRUE(host->stream(id).fin);
}

TEST_P(GuestAgent, GuestHalfClosesAndHostStillSends) {
  start();
  auto host = connect();
  const StreamId id = host->open_unix(dir_.file("banner.sock"));
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).fin; })) << agent_->log();
  EXPECT_EQ(host->stream(id).data, "banner\n");
  EXPECT_FALSE(host->stream(id).closed);
  host->send_text(id, "sent after the guest's FIN");
  host->mux().shutdown_write(id);
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).closed; })) << agent_->log();
  ASSERT_TRUE(wait_until([&] { return !banner_->records().empty(); }, kDeadline));
  EXPECT_EQ(banner_->records().front(), "sent after the guest's FIN");
}

TEST_P(GuestAgent, TwoHundredConcurrentStreams) {
  start();
  auto host = connect();
  constexpr int kStreams = 200;
  std::vector<std::pair<StreamId, std::string>> sent;
  for (int i = 0; i < kStreams; ++i) {
    const StreamId id = host->open_unix("echo");
    std::string text = "stream " + std::to_string(i) + " ";
    text.resize(1000 + 37 * i, char('a' + i % 26));
    host->send_text(id, text);
    host->mux().shutdown_write(id);
    sent.emplace_back(id, std::move(text));
  }
  ASSERT_TRUE(host->pump_until([&] {
    for (const auto& [id, text] : sent) {
      if (!host->stream(id).closed) return false;
    }
    return true;
  })) << agent_->log();
  for (const auto& [id, text] : sent) EXPECT_EQ(host->stream(id).data, text) << "stream " << id;
  EXPECT_EQ(host->mux().stream_count(), 0u);
  EXPECT_TRUE(wait_until([&] { return echo_->active() == 0; }, kDeadline));
}

TEST_P(GuestAgent, MissingSocketFailsWithEnoentNamingThePath) {
  start();
  auto host = connect();
  const StreamId id = host->open_unix(dir_.file("missing.sock"));
  host->send_text(id, "data sent before the answer is dropped with the stream");
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).open_fail; })) << agent_->log();
  EXPECT_EQ(host->stream(id).error_errno, ENOENT);
  EXPECT_EQ(host->stream(id).message,
            "guest socket " + dir_.file("missing.sock") + ": No such file or directory");
  expect_echo(*host, "still serving");
}

TEST_P(GuestAgent, DisallowedTargetsFailWithEaccesNamingTheFlag) {
  uint16_t closed_port = 0;
  {
    // A port that was just free: nothing listens there now, so following ports does not allow it.
    auto temp = Server::tcp_loopback(hang_up, &closed_port);
  }
  start();
  auto host = connect();
  const StreamId path = host->open_unix("/etc/not-allowed.sock");
  const StreamId name = host->open_unix("unknown-name");
  const StreamId port = host->open_tcp(closed_port);
  ASSERT_TRUE(host->pump_until([&] {
    return host->stream(path).open_fail && host->stream(name).open_fail && host->stream(port).open_fail;
  })) << agent_->log();
  EXPECT_EQ(host->stream(path).error_errno, EACCES);
  EXPECT_NE(host->stream(path).message.find("--allow-unix /etc/not-allowed.sock"), std::string::npos)
      << host->stream(path).message;
  EXPECT_EQ(host->stream(name).error_errno, EACCES);
  EXPECT_NE(host->stream(name).message.find("--forward unknown-name="), std::string::npos);
  EXPECT_EQ(host->stream(port).error_errno, EACCES);
  EXPECT_NE(host->stream(port).message.find("--allow-ports"), std::string::npos);
}

TEST_P(GuestAgent, LoopbackTcpPortWithAllowPorts) {
  uint16_t port = 0;
  auto tcp_echo = Server::tcp_loopback(echo, &port);
  uint16_t closed_port = 0;
  {
    // A port that was just free: nothing listens there now.
    auto temp = Server::tcp_loopback(hang_up, &closed_port);
  }
  start({"--allow-ports"});
  auto host = connect();
  const StreamId id = host->open_tcp(port);
  host->send_text(id, "over tcp");
  host->mux().shutdown_write(id);
  const StreamId refused = host->open_tcp(closed_port);
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).closed && host->stream(refused).open_fail; }))
      << agent_->log();
  EXPECT_EQ(host->stream(id).data, "over tcp");
  EXPECT_EQ(host->stream(refused).error_errno, ECONNREFUSED);
  EXPECT_NE(host->stream(refused).message.find("guest port"), std::string::npos);
  agent_.reset();
}

// A UDP socket on 127.0.0.1 that sends every datagram back to its sender, until destroyed.
class UdpEcho {
 public:
  UdpEcho() {
    fd_ = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&sin), sizeof(sin)), 0);
    socklen_t len = sizeof(sin);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&sin), &len);
    port_ = ntohs(sin.sin_port);
    EXPECT_EQ(pipe2(stop_, O_CLOEXEC), 0);
    thread_ = std::thread([this] {
      std::vector<char> buf(70000);
      while (true) {
        pollfd p[2] = {{fd_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
        if (poll(p, 2, -1) < 0) continue;
        if (p[1].revents != 0) return;
        sockaddr_storage from{};
        socklen_t from_len = sizeof(from);
        const ssize_t n =
            recvfrom(fd_, buf.data(), buf.size(), 0, reinterpret_cast<sockaddr*>(&from), &from_len);
        if (n >= 0)
          sendto(fd_, buf.data(), static_cast<size_t>(n), 0, reinterpret_cast<sockaddr*>(&from), from_len);
      }
    });
  }
  ~UdpEcho() {
    (void)!write(stop_[1], "x", 1);
    thread_.join();
    close(fd_);
    close(stop_[0]);
    close(stop_[1]);
  }
  uint16_t port() const { return port_; }

 private:
  int fd_ = -1;
  uint16_t port_ = 0;
  int stop_[2] = {-1, -1};
  std::thread thread_;
};

std::string datagram_record(const std::string& payload) {
  std::string out(kDatagramPrefix, '\0');
  encode_datagram_prefix(reinterpret_cast<std::byte*>(out.data()), static_cast<uint32_t>(payload.size()));
  return out + payload;
}

TEST_P(GuestAgent, PortsSnapshotAfterHandshakeThenDiffsAndListenedPortsNeedNoFlag) {
  start();
  auto host = connect();
  ASSERT_TRUE(host->pump_until([&] { return host->snapshots == 1; })) << agent_->log();
  uint16_t port = 0;
  auto server = Server::tcp_loopback(echo, &port);
  ASSERT_TRUE(host->pump_until([&] { return host->listening_on(wire::Proto::Tcp, "127.0.0.1", port); },
                               milliseconds(5000)))
      << agent_->log();
  // Following ports: a port the guest listens on may be dialled without --allow-ports.
  const StreamId id = host->open_tcp(port);
  host->send_text(id, "followed");
  host->mux().shutdown_write(id);
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).closed; })) << agent_->log();
  EXPECT_EQ(host->stream(id).data, "followed");
  server.reset();
  ASSERT_TRUE(host->pump_until([&] { return !host->listening_on(wire::Proto::Tcp, "127.0.0.1", port); },
                               milliseconds(5000)))
      << agent_->log();
  EXPECT_EQ(host->snapshots, 1);
}

TEST_P(GuestAgent, NoPortsSendsNoPortsMessages) {
  start({"--no-ports"});
  auto host = connect();
  expect_echo(*host, "no ports");
  EXPECT_EQ(host->ports_messages, 0);
}

TEST_P(GuestAgent, UdpFlowKeepsDatagramBoundariesAndOrder) {
  UdpEcho udp;  // bound just now: the agent finds it with a scan of its own when the OPEN arrives
  start();
  auto host = connect();
  const StreamId id = host->open_udp(udp.port());
  std::string sent;
  for (const size_t size : {size_t{1}, size_t{0}, size_t{1400}, size_t{9000}, size_t{65000}}) {
    sent += datagram_record(std::string(size, static_cast<char>('a' + size % 26)));
  }
  // Records split at arbitrary points on the way: the guest reassembles them.
  host->send_text(id, sent.substr(0, 3));
  host->send_text(id, sent.substr(3, 20000));
  host->send_text(id, sent.substr(20003));
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).data.size() == sent.size(); })) << agent_->log();
  EXPECT_TRUE(host->stream(id).data == sent);
  EXPECT_TRUE(host->stream(id).open_ok);
  // The host ends a flow with RST; the guest closes its socket.
  host->mux().reset(id, "UDP flow idle");
  ASSERT_TRUE(host->pump_until([&] { return agent_->log().find("reset by host") != std::string::npos; }));
}

// A server that binds its port just before its client's OPEN arrives (iperf3's UDP test tells its client to
// start only after binding) is found even when a scan ran a moment earlier: each miss looks again.
TEST_P(GuestAgent, ListenerBoundRightAfterAScanIsFoundByItsOpen) {
  start({"--port-poll-ms", "60000"});  // no periodic scan comes between: only the OPENs' own
  auto host = connect();
  uint16_t unused = 0;
  {
    UdpEcho temp;  // a port that was just free: nothing listens there now
    unused = temp.port();
  }
  const StreamId missed = host->open_udp(unused);  // refused after a scan of its own
  ASSERT_TRUE(host->pump_until([&] { return host->stream(missed).open_fail; })) << agent_->log();
  UdpEcho udp;  // bound within a millisecond or so of that scan
  const StreamId id = host->open_udp(udp.port());
  const std::string record = datagram_record("found");
  host->send_text(id, record);
  ASSERT_TRUE(host->pump_until([&] {
    return host->stream(id).data.size() == record.size() || host->stream(id).open_fail;
  })) << agent_->log();
  EXPECT_TRUE(host->stream(id).open_ok) << host->stream(id).message;
  EXPECT_EQ(host->stream(id).data, record);
}

TEST_P(GuestAgent, ReverseUnixClientGetsAGuestOpenedStreamWithHalfCloseBothWays) {
  const std::string path = dir_.file("reverse.sock");
  start({"--reverse-unix", path + "=host-app"});
  auto host = connect();
  host->accept_opens = true;
  ASSERT_TRUE(host->pump_until([&] { return host->snapshots == 1; })) << agent_->log();
  const int client = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::strncpy(sun.sun_path, path.c_str(), sizeof(sun.sun_path) - 1);
  ASSERT_EQ(::connect(client, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)), 0);
  ASSERT_TRUE(write_all(client, "from the guest", 14));
  shutdown(client, SHUT_WR);
  ASSERT_TRUE(host->pump_until([&] {
    return !host->guest_opened.empty() && host->stream(host->guest_opened[0].first).fin;
  })) << agent_->log();
  const StreamId id = host->guest_opened[0].first;
  EXPECT_EQ(id % 2, 0u);  // guest-opened ids are even
  EXPECT_EQ(host->guest_opened[0].second, "host-app");
  EXPECT_EQ(host->stream(id).data, "from the guest");
  // The guest client half-closed; the host still answers, then closes its side too.
  host->send_text(id, "from the host");
  host->mux().shutdown_write(id);
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).closed; })) << agent_->log();
  std::string got;
  char buf[256];
  ssize_t n;
  while ((n = read(client, buf, sizeof(buf))) > 0) got.append(buf, static_cast<size_t>(n));
  EXPECT_EQ(got, "from the host");
  close(client);

  // A host that refuses the name: the client sees its connection end.
  host->accept_opens = false;
  const int refused = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_EQ(::connect(refused, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)), 0);
  ASSERT_TRUE(host->pump_until([&] { return host->refused_opens == 1; })) << agent_->log();
  bool ended = false;
  ASSERT_TRUE(host->pump_until([&] {
    const ssize_t r = recv(refused, buf, sizeof(buf), MSG_DONTWAIT);
    ended = r == 0 || (r < 0 && errno != EAGAIN);
    return ended;
  }));
  close(refused);
}

std::string hello_frame(uint16_t version) {
  Hello hello;
  hello.version = version;
  hello.max_frame = 256 * 1024;
  hello.initial_window = 1 << 20;
  hello.max_streams = 100;
  std::string out(kFrameHeaderSize, '\0');
  encode_header(FrameHeader{kHelloPayloadSize, 0, FrameType::kHello, 0},
                reinterpret_cast<std::byte*>(out.data()));
  const auto payload = encode_hello(hello);
  out.append(reinterpret_cast<const char*>(payload.data()), payload.size());
  return out;
}

// Sends raw bytes as a host would and waits for the agent to hang up.
void send_raw_and_expect_hangup(int fd, const std::string& bytes) {
  ASSERT_TRUE(write_all(fd, bytes.data(), bytes.size()));
  char buf[4096];
  bool closed = wait_until(
      [&] {
        const ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        return n == 0 || (n < 0 && errno != EAGAIN);
      },
      kDeadline);
  EXPECT_TRUE(closed);
  close(fd);
}

TEST_P(GuestAgent, WrongProtocolVersionIsLoggedAndAgentKeepsServing) {
  start();
  send_raw_and_expect_hangup(agent_->connect_host(), hello_frame(kProtocolVersion + 8));
  EXPECT_TRUE(agent_->wait_log("protocol version " + std::to_string(kProtocolVersion + 8)));
  EXPECT_NE(agent_->log().find("this agent speaks version " + std::to_string(kProtocolVersion)),
            std::string::npos)
      << agent_->log();
  auto host = connect();
  expect_echo(*host, "after a version mismatch");
}

TEST_P(GuestAgent, GarbagePeerIsLoggedAndAgentKeepsServing) {
  start();
  send_raw_and_expect_hangup(agent_->connect_host(), "GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n");
  EXPECT_TRUE(agent_->wait_log("not a vbridge agent")) << agent_->log();
  EXPECT_NE(agent_->log().find("GET /_ping"), std::string::npos);
  auto host = connect();
  expect_echo(*host, "after garbage");
}

TEST_P(GuestAgent, HostDropMidStreamThenNewHostWorksWithinOneSecond) {
  start();
  auto first = connect();
  const StreamId bulk = first->open_unix("echo");
  first->send_bulk(bulk, 1ull << 30, 7, /*fin_after=*/false);
  ASSERT_TRUE(first->pump_until([&] { return first->stream(bulk).received > (4u << 20); })) << agent_->log();
  first->drop();
  const auto dropped_at = Clock::now();

  auto second = connect();
  const StreamId id = second->open_unix("echo");
  second->send_text(id, "after the drop");
  second->mux().shutdown_write(id);
  ASSERT_TRUE(second->pump_until([&] { return second->stream(id).closed; }, milliseconds(1000)))
      << agent_->log();
  EXPECT_EQ(second->stream(id).data, "after the drop");
  EXPECT_LT(Clock::now() - dropped_at, milliseconds(1000));
  // The guest socket of the dropped stream was closed: only the new stream's echo ran since.
  EXPECT_TRUE(wait_until([&] { return echo_->active() == 0; }, kDeadline));
  // The agent notices the drop by EOF, a reset read or a failed write, whichever comes first.
  EXPECT_TRUE(wait_until(
      [&] {
        const std::string log = agent_->log();
        return log.find("host closed the connection") != std::string::npos ||
               log.find("host connection failed: ") != std::string::npos;
      },
      kDeadline))
      << agent_->log();
  expect_clean_exit();
}

TEST_P(GuestAgent, NewHostConnectionReplacesTheOldOne) {
  start();
  auto first = connect();
  ASSERT_TRUE(first->pump_until([&] { return first->mux().ready(); }));
  auto second = connect();
  // The newer connection replaces the older one once its HELLO (with the token) is in, not before.
  ASSERT_TRUE(second->pump_until([&] { return second->mux().ready(); })) << agent_->log();
  ASSERT_TRUE(first->pump_until([&] { return first->transport_closed(); })) << agent_->log();
  expect_echo(*second, "the newer host wins");
}

// Issue 8: a local process without the token must not take the bridge over. The refused connection is
// logged once and closed; the active host connection is not touched.
TEST_P(GuestAgent, WrongOrMissingTokenIsRefusedAndTheActiveHostKeepsServing) {
  start();
  auto first = connect();
  const StreamId kept = first->open_unix("echo");
  first->send_text(kept, "before ");
  ASSERT_TRUE(first->pump_until([&] { return first->stream(kept).data == "before "; })) << agent_->log();

  // Connected but silent: waits for its HELLO and replaces nothing.
  const int silent = agent_->connect_host();
  for (const std::string& token : {std::string("fedcba9876543210fedcba9876543210"), std::string()}) {
    HostPeer intruder(agent_->connect_host(), token);
    intruder.expect_failure = true;
    ASSERT_TRUE(intruder.pump_until([&] { return intruder.transport_closed(); })) << agent_->log();
    ASSERT_TRUE(intruder.mux().failure().has_value());
    EXPECT_EQ(intruder.mux().failure()->code, ErrorCode::kAuth) << intruder.mux().failure()->to_string();
    EXPECT_NE(intruder.mux().failure()->message.find("bad token"), std::string::npos);
    EXPECT_FALSE(intruder.mux().ready());
  }
  ASSERT_TRUE(agent_->wait_log("(the peer sent none)")) << agent_->log();
  const std::string log = agent_->log();
  EXPECT_NE(log.find("transport peer unix peer pid "), std::string::npos) << log;
  EXPECT_NE(log.find(" refused: bad token; it must send the token"), std::string::npos) << log;
  EXPECT_EQ(log.find("replaces this one"), std::string::npos) << log;

  first->send_text(kept, "and after");
  first->mux().shutdown_write(kept);
  ASSERT_TRUE(first->pump_until([&] { return first->stream(kept).closed; })) << agent_->log();
  EXPECT_EQ(first->stream(kept).data, "before and after");
  EXPECT_FALSE(first->transport_closed());
  close(silent);
  expect_clean_exit();
}

// Connections that never send their HELLO are bounded: the ninth pushes the oldest out, and the active host
// connection is not among them.
TEST_P(GuestAgent, SilentConnectionsAreBoundedAndDoNotDisturbTheActiveHost) {
  start();
  auto host = connect();
  ASSERT_TRUE(host->pump_until([&] { return host->mux().ready(); })) << agent_->log();
  std::vector<int> silent;
  for (int i = 0; i < 9; ++i) silent.push_back(agent_->connect_host());
  char byte = 0;
  const bool oldest_closed =
      wait_until([&] { return recv(silent[0], &byte, 1, MSG_DONTWAIT) == 0; }, kDeadline);
  EXPECT_TRUE(oldest_closed) << agent_->log();
  EXPECT_TRUE(agent_->wait_log("newer connections are waiting for their HELLO")) << agent_->log();
  EXPECT_EQ(recv(silent[8], &byte, 1, MSG_DONTWAIT), -1);  // the newest still waits
  expect_echo(*host, "the active host is untouched");
  for (const int fd : silent) close(fd);
}

TEST_P(GuestAgent, UnixTransportWithoutTokenFileIsAConfigurationError) {
  for (const auto& [flags, needle] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{}, "lets any process that reaches it use the bridge: pass --token-file PATH"},
           {{"--token-file", dir_.file("open-token")},
            "may be read by group or others (mode 0644); run chmod 600"},
           {{"--token-file", dir_.file("short-token")}, "holds 5 bytes; a token is 16 to 256 bytes"},
           {{"--token-file", dir_.file("absent")}, "No such file or directory"}}) {
    write_file(dir_.file("open-token"), kToken, 0644);
    write_file(dir_.file("short-token"), "short", 0600);
    AgentProcess agent(dir_, flags, "unix:" + dir_.file("plain.sock"));
    ASSERT_TRUE(wait_until([&] { return !agent.running(); }, kDeadline));
    EXPECT_EQ(agent.stop(), 2);
    EXPECT_NE(agent.log().find(needle), std::string::npos) << agent.log();
  }
}

TEST_P(GuestAgent, InsecureNoTokenAcceptsAHostWithoutOne) {
  start({"--insecure-no-token"});
  HostPeer host(agent_->connect_host(), "");
  expect_echo(host, "no token needed");
}

TEST_P(GuestAgent, GuestSocketErrorResetsOnlyThatStream) {
  start();
  auto host = connect();
  const StreamId doomed = host->open_unix(dir_.file("hangup.sock"));
  host->send_bulk(doomed, 64ull << 20, 3, /*fin_after=*/false);
  ASSERT_TRUE(host->pump_until([&] { return host->stream(doomed).reset; })) << agent_->log();
  EXPECT_NE(host->stream(doomed).message.find("guest socket " + dir_.file("hangup.sock")), std::string::npos)
      << host->stream(doomed).message;
  expect_echo(*host, "other streams carry on");
  EXPECT_TRUE(agent_->wait_log("[stream " + std::to_string(doomed) + "]")) << agent_->log();
}

TEST_P(GuestAgent, SigtermSendsGoawayDrainsAndExitsZero) {
  start();
  auto host = connect();
  const StreamId id = host->open_unix("echo");
  host->send_text(id, "open while draining");
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).data.size() == 19; })) << agent_->log();
  kill(agent_->pid(), SIGTERM);
  ASSERT_TRUE(host->pump_until([&] { return host->goaway().has_value(); })) << agent_->log();
  EXPECT_EQ(*host->goaway(), "guest agent is shutting down");
  // The stream may still finish while the agent drains.
  host->mux().shutdown_write(id);
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).closed; })) << agent_->log();
  ASSERT_TRUE(host->pump_until([&] { return host->transport_closed(); })) << agent_->log();
  ASSERT_TRUE(wait_until([&] { return !agent_->running(); }, kDeadline));
  EXPECT_EQ(agent_->stop(), 0);
  EXPECT_NE(agent_->log().find("counters:"), std::string::npos);
}

TEST_P(GuestAgent, DrainTimeoutClosesStreamsThatStayOpen) {
  start();
  auto host = connect();
  const StreamId id = host->open_unix("echo");
  ASSERT_TRUE(host->pump_until([&] { return host->stream(id).open_ok; })) << agent_->log();
  const auto t0 = Clock::now();
  kill(agent_->pid(), SIGTERM);
  ASSERT_TRUE(host->pump_until([&] { return host->transport_closed(); })) << agent_->log();
  EXPECT_GE(Clock::now() - t0, milliseconds(400));  // --drain-timeout 0.5
  ASSERT_TRUE(wait_until([&] { return !agent_->running(); }, kDeadline));
  EXPECT_EQ(agent_->stop(), 0);
  EXPECT_TRUE(wait_until([&] { return echo_->active() == 0; }, kDeadline));
}

// A pseudo-terminal in raw mode stands in for a virtio-serial port: the agent opens the terminal side once
// and holds it; the test plays the host on the other side. With VMIN=0 a read with no data returns 0, as a
// virtio-serial read does while no host is attached, so the agent's wait-and-re-read path runs first.
TEST_P(GuestAgent, ServesAHostOverASerialPort) {
  const int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
  ASSERT_GE(master, 0);
  ASSERT_EQ(grantpt(master), 0);
  ASSERT_EQ(unlockpt(master), 0);
  const std::string port = ptsname(master);
  termios tio{};
  ASSERT_EQ(tcgetattr(master, &tio), 0);
  cfmakeraw(&tio);
  tio.c_cc[VMIN] = 0;  // host away: reads return 0
  tio.c_cc[VTIME] = 0;
  ASSERT_EQ(tcsetattr(master, TCSANOW, &tio), 0);

  std::vector<std::string> flags = {"--forward", "echo=" + dir_.file("echo.sock"), "--drain-timeout", "0.2"};
  flags.insert(flags.end(), GetParam().flags.begin(), GetParam().flags.end());
  agent_.emplace(dir_, flags, "serial:" + port);
  // The agent finds the port without a host first, and keeps looking.
  ASSERT_TRUE(agent_->wait_log("no host on serial:" + port)) << agent_->log();
  tio.c_cc[VMIN] = 1;  // host present: reads wait for data
  ASSERT_EQ(tcsetattr(master, TCSANOW, &tio), 0);

  HostPeer host(master);
  expect_echo(host, "over the serial port");
  ASSERT_TRUE(agent_->wait_log("host connected: serial:" + port)) << agent_->log();
  const StreamId id = host.open_unix("echo");
  ASSERT_TRUE(host.pump_until([&] { return host.stream(id).open_ok; })) << agent_->log();
  kill(agent_->pid(), SIGTERM);
  ASSERT_TRUE(host.pump_until([&] { return host.goaway().has_value(); })) << agent_->log();
  ASSERT_TRUE(wait_until([&] { return !agent_->running(); }, kDeadline));
  EXPECT_EQ(agent_->stop(), 0) << agent_->log();
}

INSTANTIATE_TEST_SUITE_P(ReadModes, GuestAgent,
                         ::testing::Values(Mode{"BufferRing", {}},
                                           Mode{"PlainBuffers", {"--no-buffer-ring"}}),
                         [](const ::testing::TestParamInfo<Mode>& p) { return std::string(p.param.name); });

}  // namespace
}  // namespace vbridge
