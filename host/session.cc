#include "host/session.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <utility>

#include "protocol/log.h"

namespace vbridge {

constexpr int kTransportBufferBytes = 4 << 20;

Session::Session(uv_loop_t* loop, UniqueFd transport, BufferPool& pool, SessionObserver& observer,
                 MuxConfig config)
    : pool_(pool),
      arena_(pool),
      observer_(observer),
      mux_(Role::kHost, *this, std::move(config)),
      poller_(loop, std::move(transport), [this](int status, int events) { on_poll(status, events); }) {
  poller_.want(true, true);  // our HELLO is queued
  // A deep transport buffer lets each writev and read move more bytes per wakeup.
  const int size = kTransportBufferBytes;
  ::setsockopt(poller_.fd(), SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  ::setsockopt(poller_.fd(), SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
}

Session::~Session() {
  if (!lost_) shutdown(Error{ErrorCode::kGoingAway, 0, "host agent closing the transport"});
}

Result<StreamId> Session::open(const wire::TargetT& target, StreamSink* sink) {
  if (lost_) return Error{ErrorCode::kIo, 0, "transport to the guest is down"};
  auto id = mux_.open(target);
  if (!id) return id;
  sinks_[*id] = sink;
  return id;  // the caller flushes, so the OPEN can leave with the stream's first bytes
}

void Session::on_poll(int status, int events) {
  if (lost_) return;
  if (status < 0) {
    // libuv reports POLLERR (e.g. the peer closed with our bytes unread) as a poll error, but what the peer
    // sent before closing (a HELLO of another version, GOAWAY) is still readable: take it first.
    read_transport();
    if (!lost_) lose(Error{ErrorCode::kIo, -status, "transport poll failed"});
    return;
  }
  if (events & UV_READABLE) read_transport();
  if (!lost_ && (events & UV_WRITABLE)) write_transport();
}

void Session::read_transport() {
  read_some();
  if (lost_) return;
  if (write_error_ != 0) {
    fail_write();
    return;
  }
  flush();
}

void Session::fail_write() {
  // The peer may have said why before it closed (a HELLO of another version, GOAWAY): read that first.
  if (write_error_ == EPIPE || write_error_ == ECONNRESET) read_some();
  if (!lost_) lose(errno_error("transport write failed", write_error_));
}

void Session::read_some() {
  if (reading_) return;
  reading_ = true;
  // A few reads per wakeup, so one busy transport cannot starve the loop's other descriptors.
  for (int i = 0; i < 4 && !lost_; ++i) {
    std::span<std::byte> space = arena_.writable();
    const ssize_t n = retry_eintr([&] { return ::read(poller_.fd(), space.data(), space.size()); });
    if (n < 0) {
      if (errno != EAGAIN) lose(errno_error("transport read failed"));
      break;
    }
    if (n == 0) {
      lose(Error{ErrorCode::kIo, 0, "guest agent closed the transport"});
      break;
    }
    if (Status st = mux_.feed(arena_.commit(static_cast<size_t>(n))); !st) {
      lose(st.error());
      break;
    }
    if (static_cast<size_t>(n) < space.size()) break;
  }
  reading_ = false;
}

void Session::flush() {
  if (lost_ || in_flush_ || write_error_ != 0) return;
  in_flush_ = true;
  write_transport();
  in_flush_ = false;
}

void Session::write_transport() {
  iovec iov[IOV_MAX < 128 ? IOV_MAX : 128];
  for (;;) {
    const size_t count = mux_.prepare_output(iov);
    ssize_t n = 0;
    if (count != 0) {
      n = retry_eintr([&] { return ::writev(poller_.fd(), iov, static_cast<int>(count)); });
    } else if (const auto piped = mux_.piped_output()) {
      n = retry_eintr([&] {
        return ::splice(piped->pipe->read_fd(), nullptr, poller_.fd(), nullptr, piped->size,
                        SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
      });
    } else {
      poller_.want(true, false);
      return;
    }
    if (n < 0) {
      if (errno == EAGAIN) {
        poller_.want(true, true);
        return;
      }
      write_error_ = errno;
      // A handler called from read_some() is flushing: feeding the mux from here would handle frames out of
      // order, so read_transport() fails the write once that read is done.
      if (!reading_) fail_write();
      return;
    }
    if (n == 0) {
      // A piped frame whose bytes are not in its pipe: the accounting is broken; better to start over.
      lose(Error{ErrorCode::kIo, 0, "splice to the transport found the stream's pipe empty"});
      return;
    }
    mux_.consume_output(static_cast<size_t>(n));
  }
}

void Session::lose(const Error& error) {
  if (lost_) return;
  shutdown(error);
  observer_.on_session_lost(error);
}

void Session::shutdown(const Error& error) {
  if (lost_) return;
  lost_ = true;
  poller_.close(nullptr);
  auto sinks = std::move(sinks_);
  sinks_.clear();
  const Error lost{error.code, error.errno_value, "transport to the guest lost: " + error.message};
  for (auto& [id, s] : sinks) s->on_reset(lost);
}

void Session::send_ping() {
  if (lost_) return;
  mux_.ping(++pings_sent_);
  flush();
}

StreamSink* Session::sink(StreamId id) {
  const auto it = sinks_.find(id);
  return it == sinks_.end() ? nullptr : it->second;
}

void Session::on_ready(const Hello& peer) { observer_.on_session_ready(peer); }

void Session::on_open(StreamId id, const wire::Target& target) {
  // Guest-opened streams (clients of a guest --reverse-unix socket) belong to the observer.
  if (StreamSink* s = observer_.on_stream_open(*this, id, target)) sinks_[id] = s;
}

void Session::on_open_result(StreamId id, const Error* error) {
  StreamSink* s = sink(id);
  if (error != nullptr) sinks_.erase(id);
  if (s != nullptr) s->on_open_result(error);
}

void Session::on_data(StreamId id, Slice data) {
  if (StreamSink* s = sink(id)) {
    s->on_data(std::move(data));
  } else {
    mux_.reset(id, "no host endpoint for this stream");
  }
}

void Session::on_fin(StreamId id) {
  if (StreamSink* s = sink(id)) s->on_fin();
}

void Session::on_reset(StreamId id, const Error& error) {
  StreamSink* s = sink(id);
  sinks_.erase(id);
  if (error.code != ErrorCode::kReset) {
    // The guest broke this stream's credit or FIN rules; the mux reset it alone and told the guest why.
    log::at(log::Level::kWarn, id, "the guest broke the stream, reset it: {}", error.to_string());
    if (s != nullptr) s->on_reset(Error{ErrorCode::kReset, 0, "the guest broke the stream"});
    return;
  }
  if (s != nullptr) s->on_reset(error);
}

void Session::on_writable(StreamId id) {
  if (StreamSink* s = sink(id)) s->on_writable();
}

void Session::on_closed(StreamId id) {
  StreamSink* s = sink(id);
  sinks_.erase(id);
  if (s != nullptr) s->on_closed();
}

void Session::on_control(const wire::Control& message) { observer_.on_control(message); }

void Session::on_goaway(const std::string& message) { log::info("guest agent is going away: {}", message); }

void Session::on_pong(uint64_t token) { last_pong_ = token; }

}  // namespace vbridge
