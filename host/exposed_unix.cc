#include "host/exposed_unix.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <deque>

#include "host/poller.h"
#include "protocol/frame.h"
#include "protocol/log.h"

namespace vbridge {

Result<std::pair<std::string, std::string>> parse_expose_unix(std::string_view text) {
  const size_t eq = text.find('=');
  if (eq == std::string_view::npos || eq == 0 || eq + 1 == text.size() || text[eq + 1] != '/') {
    return Error{ErrorCode::kConfig, EINVAL,
                 fmt::format("--expose-unix \"{}\": expected NAME=/host/path.sock", text)};
  }
  std::string path(text.substr(eq + 1));
  if (path.size() >= sizeof(sockaddr_un::sun_path)) {
    return Error{ErrorCode::kConfig, ENAMETOOLONG,
                 fmt::format("--expose-unix: {} is longer than 107 bytes", path)};
  }
  return std::pair{std::string(text.substr(0, eq)), std::move(path)};
}

// One host socket joined to one guest-opened stream. Per direction:
//   socket → stream: read while the stream has send capacity; EOF becomes our FIN (socket_eof_)
//   stream → socket: Slices queue in to_socket_ and leave with writev; the guest's FIN becomes SHUT_WR
class ExposedUnix::Conn final : public StreamSink {
 public:
  Conn(ExposedUnix& owner, UniqueFd fd, Session& session, StreamId id, std::string name)
      : owner_(owner),
        session_(&session),
        id_(id),
        name_(std::move(name)),
        poller_(owner.loop_, std::move(fd), [this](int status, int events) { on_poll(status, events); }) {
    update_interest();
  }
  ~Conn() override {
    if (stream_live_) session_->detach(id_);
  }

  void on_open_result(const Error*) override {}  // the guest opened this stream; nothing to answer here
  void on_data(Slice data) override {
    to_socket_.push_back(std::move(data));
    write_socket();
  }
  void on_fin() override {
    peer_fin_ = true;
    write_socket();
  }
  void on_reset(const Error& error) override {
    stream_live_ = false;
    if (!socket_eof_ || !peer_fin_)
      log::at(log::Level::kInfo, id_, "{} stream ended: {}", name_, error.to_string());
    to_socket_.clear();
    finish();
  }
  void on_writable() override { update_interest(); }
  void on_closed() override {
    stream_live_ = false;
    write_socket();
  }

 private:
  void on_poll(int status, int events) {
    if (done_) return;
    if (status < 0) {
      abort(fmt::format("host socket poll failed: {}", uv_strerror(status)));
      return;
    }
    if (events & UV_WRITABLE) write_socket();
    if (!done_ && (events & UV_READABLE)) read_socket();
  }

  void read_socket() {
    if (!stream_live_ || socket_eof_) return;
    Mux& mux = session_->mux();
    for (int i = 0; i < 4; ++i) {
      const size_t capacity = mux.send_capacity(id_);
      if (capacity == 0) break;
      const std::span<std::byte> space = owner_.arena_.writable();
      const size_t want = std::min(capacity, space.size());
      const ssize_t n = retry_eintr([&] { return ::read(poller_.fd(), space.data(), want); });
      if (n < 0) {
        if (errno == EAGAIN) break;
        abort(fmt::format("host socket read failed: {}", std::strerror(errno)));
        return;
      }
      if (n == 0) {
        socket_eof_ = true;
        mux.shutdown_write(id_);
        break;
      }
      mux.send(id_, owner_.arena_.commit(static_cast<size_t>(n)));
      if (static_cast<size_t>(n) < want) break;
    }
    session_->flush();
    update_interest();
  }

  void write_socket() {
    if (done_) return;
    size_t written = 0;
    while (!to_socket_.empty()) {
      iovec iov[64];
      int count = 0;
      for (auto it = to_socket_.begin(); it != to_socket_.end() && count < 64; ++it, ++count) {
        iov[count] = iovec{it->data(), it->size()};
      }
      const ssize_t n = retry_eintr([&] { return ::writev(poller_.fd(), iov, count); });
      if (n < 0) {
        if (errno == EAGAIN) break;
        abort(fmt::format("host socket write failed: {}", std::strerror(errno)));
        return;
      }
      written += static_cast<size_t>(n);
      for (size_t left = static_cast<size_t>(n); left > 0;) {
        Slice& front = to_socket_.front();
        if (front.size() <= left) {
          left -= front.size();
          to_socket_.pop_front();
        } else {
          front.advance(left);
          left = 0;
        }
      }
    }
    if (written > 0 && stream_live_) {
      session_->mux().consume(id_, written);
      session_->flush();
    }
    if (to_socket_.empty() && peer_fin_ && !socket_shut_) {
      socket_shut_ = true;
      ::shutdown(poller_.fd(), SHUT_WR);
    }
    if (to_socket_.empty() && !stream_live_ && socket_shut_) {
      finish();
      return;
    }
    update_interest();
  }

  void update_interest() {
    if (done_) return;
    const bool want_read = stream_live_ && !socket_eof_ && session_->mux().send_capacity(id_) > 0;
    poller_.want(want_read, !to_socket_.empty());
  }

  void abort(const std::string& why) {
    log::at(log::Level::kInfo, id_, "{}: {}", name_, why);
    if (stream_live_) {
      stream_live_ = false;
      session_->detach(id_);
      session_->mux().reset(id_, why);
      session_->flush();
    }
    to_socket_.clear();
    finish();
  }

  void finish() {
    if (done_) return;
    done_ = true;
    if (stream_live_) {
      stream_live_ = false;
      session_->detach(id_);
      session_->mux().reset(id_, "host socket closed");
      session_->flush();
    }
    to_socket_.clear();
    poller_.close([this] { owner_.done(this); });
  }

  ExposedUnix& owner_;
  Session* session_;
  StreamId id_;
  std::string name_;
  Poller poller_;
  std::deque<Slice> to_socket_;  // stream bytes waiting for the host socket
  bool stream_live_ = true;      // the stream exists in the mux
  bool socket_eof_ = false;      // the host socket shut its write side (we sent FIN)
  bool peer_fin_ = false;        // the guest side half-closed
  bool socket_shut_ = false;     // we shut down the host socket's write side
  bool done_ = false;
};

ExposedUnix::ExposedUnix(uv_loop_t* loop, ReadArena& arena, std::map<std::string, std::string> names)
    : loop_(loop), arena_(arena), names_(std::move(names)) {}

// Longest guest-chosen name quoted in logs and refusals.
constexpr size_t kMaxLoggedName = 64;

ExposedUnix::~ExposedUnix() = default;

StreamSink* ExposedUnix::open(Session& session, StreamId id, const wire::Target& target) {
  const std::string requested = target.path() != nullptr ? target.path()->str() : std::string();
  // The name comes from the guest: logged and answered escaped and cut short, never echoed whole.
  std::string name =
      printable_prefix(std::as_bytes(std::span(requested.data(), requested.size())), kMaxLoggedName);
  if (requested.size() > kMaxLoggedName) name += "...";
  const auto refuse = [&](int err, const std::string& message) -> StreamSink* {
    ++refused_;
    log::at(log::Level::kWarn, id, "guest stream to \"{}\" refused: {}", name, message);
    session.mux().reject(id, err, message);
    return nullptr;
  };
  if (target.proto() != wire::Proto::Unix) {
    return refuse(EACCES, "the host agent accepts only unix socket streams from the guest");
  }
  const auto it = names_.find(requested);
  if (it == names_.end()) {
    return refuse(EACCES,
                  fmt::format("host target \"{}\" is not exposed; start vbridge-host with --expose-unix "
                              "{}=/path/to.sock to allow it",
                              name, name));
  }
  const std::string& path = it->second;
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return refuse(errno, fmt::format("socket(AF_UNIX): {}", std::strerror(errno)));
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  // A unix connect completes at once, or fails at once (EAGAIN: the listener's backlog is full).
  if (retry_eintr([&] { return ::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa); }) != 0) {
    return refuse(errno, fmt::format("host socket {}: {}", path, std::strerror(errno)));
  }
  session.mux().accept(id);
  ++opened_;
  log::at(log::Level::kDebug, id, "guest stream to \"{}\" connected to {}", name, path);
  auto conn = std::make_unique<Conn>(*this, std::move(fd), session, id, fmt::format("{} ({})", name, path));
  Conn* raw = conn.get();
  conns_.emplace(raw, std::move(conn));
  return raw;
}

void ExposedUnix::done(Conn* conn) { conns_.erase(conn); }

nlohmann::json ExposedUnix::status() const {
  nlohmann::json names = nlohmann::json::array();
  for (const auto& [name, path] : names_) names.push_back({{"name", name}, {"host", path}});
  return {{"names", names}, {"open", conns_.size()}, {"opened", opened_}, {"refused", refused_}};
}

}  // namespace vbridge
