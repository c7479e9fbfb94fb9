#include "host/socket_bridge.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>

#include "protocol/log.h"
#include "protocol/socket_buffers.h"

namespace vbridge {

// One read moves at most this much, so a bulk client's wakeup stays short beside interactive ones.
constexpr size_t kMaxReadPerWakeup = 256 * 1024;
// A read that fills a buffer at least this large marks the stream as a bulk transfer.
constexpr size_t kBulkRead = 64 * 1024;

SocketBridge::SocketBridge(uv_loop_t* loop, UniqueFd client, ReadArena& arena, BridgeOwner& owner,
                           BridgeOptions options)
    : arena_(arena),
      owner_(owner),
      options_(std::move(options)),
      poller_(loop, std::move(client), [this](int status, int events) { on_poll(status, events); }) {}

SocketBridge::~SocketBridge() {
  if (offloaded_read_ != 0) bulk_reader_->forget(offloaded_read_);
  if (session_ != nullptr && stream_live_) session_->detach(id_);
}

void SocketBridge::attach(Session& session) {
  auto id = session.open(options_.target, this);
  if (!id) {
    fail_open(id.error());
    return;
  }
  session_ = &session;
  id_ = *id;
  stream_live_ = true;
  log::at(log::Level::kDebug, id_, "{} connection opened", options_.name);
  // A client that speaks first (an HTTP request to docker.sock) has usually written by the time it is
  // accepted: read at once, so its first bytes leave with the OPEN in one write and the guest can hand them
  // to the server as soon as it has connected, instead of a loop turn later. The read flushes the OPEN.
  read_client();
}

void SocketBridge::fail_open(const Error& error) {
  log::at(log::Level::kWarn, id_, "{}: {}", options_.name, error.to_string());
  stream_live_ = false;
  if (!options_.http_errors) {
    finish();
    return;
  }
  // Tell an HTTP client (the docker CLI) what went wrong instead of a bare disconnect.
  std::string text = error.message;
  if (error.errno_value != 0) text += fmt::format(" ({})", std::strerror(error.errno_value));
  std::string escaped;
  for (char c : text) {
    if (c == '"' || c == '\\') escaped += '\\';
    escaped += c;
  }
  const std::string body = fmt::format("{{\"message\":\"vbridge: {}\"}}\n", escaped);
  const std::string response = fmt::format(
      "HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: "
      "close\r\n\r\n{}",
      body.size(), body);
  std::span<std::byte> space = arena_.writable();
  const size_t n = std::min(space.size(), response.size());
  std::memcpy(space.data(), response.data(), n);
  to_client_.push_back(arena_.commit(n));
  peer_fin_ = true;
  draining_error_ = true;
  update_interest();
}

void SocketBridge::on_open_result(const Error* error) {
  if (error != nullptr) {
    fail_open(*error);
    return;
  }
  log::at(log::Level::kDebug, id_, "{} stream accepted by the guest", options_.name);
}

void SocketBridge::on_data(Slice data) {
  to_client_.push_back(std::move(data));
  write_client();
}

void SocketBridge::on_fin() {
  peer_fin_ = true;
  write_client();
}

void SocketBridge::on_reset(const Error& error) {
  stream_live_ = false;
  if (!client_eof_ || !peer_fin_)
    log::at(log::Level::kInfo, id_, "{} stream ended: {}", options_.name, error.to_string());
  to_client_.clear();
  finish();
}

void SocketBridge::on_writable() { update_interest(); }

void SocketBridge::on_closed() {
  stream_live_ = false;
  write_client();
}

void SocketBridge::on_poll(int status, int events) {
  if (done_) return;
  if (status < 0) {
    abort(fmt::format("client socket poll failed: {}", uv_strerror(status)));
    return;
  }
  if (events & UV_WRITABLE) write_client();
  if (!done_ && (events & UV_READABLE)) read_client();
}

void SocketBridge::read_client() {
  if (draining_error_) {
    // Discard what the client still sends until it closes.
    std::byte sink[4096];
    const ssize_t n = retry_eintr([&] { return ::read(poller_.fd(), sink, sizeof sink); });
    if (n == 0 || (n < 0 && errno != EAGAIN)) {
      client_eof_ = true;
      finish();
    }
    return;
  }
  if (!stream_live_ || client_eof_ || offloaded_read_ != 0) return;
  Mux& mux = session_->mux();
  for (int i = 0; i < 4; ++i) {
    const size_t capacity = mux.send_capacity(id_);
    if (capacity == 0) break;
    if (bulk_ && pipe_ == nullptr && bulk_reader_ != nullptr && clock_->active() && offload_read(capacity))
      break;
    const ReadOutcome r = pipe_ != nullptr ? splice_client(capacity) : copy_client(capacity);
    if (r == ReadOutcome::kFailed) return;
    if (r == ReadOutcome::kEof) {
      client_eof_ = true;
      mux.shutdown_write(id_);
      break;
    }
    if (r == ReadOutcome::kDrained) break;
  }
  if (session_ != nullptr) session_->flush();
  if (!done_) update_interest();
}

// Small exchanges go through memory: one read, and the bytes leave with their frame header in one gather
// write. A read that fills a large buffer marks a bulk transfer, which switches the stream to a pipe.
SocketBridge::ReadOutcome SocketBridge::copy_client(size_t capacity) {
  std::span<std::byte> space = arena_.writable();
  const size_t want = std::min({capacity, space.size(), kMaxReadPerWakeup});
  const ssize_t n = retry_eintr([&] { return ::read(poller_.fd(), space.data(), want); });
  if (n < 0) {
    if (errno == EAGAIN) return ReadOutcome::kDrained;
    abort(fmt::format("client socket read failed: {}", std::strerror(errno)));
    return ReadOutcome::kFailed;
  }
  if (n == 0) return ReadOutcome::kEof;
  bulk_ = bulk_ || (static_cast<size_t>(n) == want && want >= kBulkRead);
  if (!bulk_ && clock_ != nullptr) clock_->note(static_cast<size_t>(n));
  session_->mux().send(id_, arena_.commit(static_cast<size_t>(n)));
  if (pipe_ == nullptr && options_.splice && static_cast<size_t>(n) >= kSpliceAfterRead) {
    if (auto pipe = Pipe::create(kPipeBytes)) {
      pipe_ = std::move(*pipe);
      log::at(log::Level::kDebug, id_, "{}: bulk transfer, moving bytes by splice", options_.name);
    } else {
      options_.splice = false;  // no pipe (out of descriptors): stay with reads
    }
  }
  return static_cast<size_t>(n) < want ? ReadOutcome::kDrained : ReadOutcome::kMore;
}

bool SocketBridge::offload_read(size_t capacity) {
  std::span<std::byte> space = arena_.writable();
  const size_t want = std::min({capacity, space.size(), kMaxReadPerWakeup});
  // The memory is reserved now; what the read does not fill is dropped with it.
  offloaded_read_ = bulk_reader_->submit(poller_.fd(), arena_.commit(want), [this](Slice bytes, int error) {
    on_offloaded_read(std::move(bytes), error);
  });
  return offloaded_read_ != 0;
}

void SocketBridge::on_offloaded_read(Slice bytes, int error) {
  offloaded_read_ = 0;
  if (done_ || draining_error_ || !stream_live_ || client_eof_) return;
  if (error == EAGAIN || error == EINTR) {
    update_interest();
    return;
  }
  if (error != 0) {
    abort(fmt::format("client socket read failed: {}", std::strerror(error)));
    return;
  }
  if (bytes.empty()) {
    client_eof_ = true;
    session_->mux().shutdown_write(id_);
  } else {
    session_->mux().send(id_, std::move(bytes));
  }
  session_->flush();
  if (!done_) update_interest();
}

// Bulk: the client's bytes go into the stream's pipe by reference and from there to the transport.
SocketBridge::ReadOutcome SocketBridge::splice_client(size_t capacity) {
  const size_t want = std::min(capacity, pipe_->room());
  ssize_t n = -1;
  if (want > 0) {
    n = retry_eintr([&] {
      return ::splice(poller_.fd(), nullptr, pipe_->write_fd(), nullptr, want,
                      SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    });
    if (n < 0 && errno != EAGAIN) {
      abort(fmt::format("client socket splice failed: {}", std::strerror(errno)));
      return ReadOutcome::kFailed;
    }
  }
  if (n < 0) {
    // EAGAIN: the socket is empty, or the pipe's slots are full of small pieces. A plain read tells which,
    // and keeps the stream moving in the second case (the mux keeps the order of pipe and memory bytes).
    return copy_client(capacity);
  }
  if (n == 0) return ReadOutcome::kEof;
  pipe_->filled += static_cast<size_t>(n);
  session_->mux().send_piped(id_, pipe_, static_cast<size_t>(n));
  return static_cast<size_t>(n) < want ? ReadOutcome::kDrained : ReadOutcome::kMore;
}

void SocketBridge::write_client() {
  if (done_) return;
  size_t written_total = 0;
  while (!to_client_.empty()) {
    iovec iov[64];
    int count = 0;
    size_t offered = 0;
    for (auto it = to_client_.begin(); it != to_client_.end() && count < 64; ++it, ++count) {
      iov[count] = iovec{it->data(), it->size()};
      offered += it->size();
    }
    const ssize_t n = retry_eintr([&] { return ::writev(poller_.fd(), iov, count); });
    if (n < 0 && errno != EAGAIN) {
      abort(fmt::format("client socket write failed: {}", std::strerror(errno)));
      return;
    }
    if (n < 0 || static_cast<size_t>(n) < offered) {
      // The client's queue is full: a deeper one lets it read more per wakeup (protocol/socket_buffers.h).
      if (!send_buffer_widened_) widen_send_buffer_if_unix(poller_.fd());
      send_buffer_widened_ = true;
      if (n < 0) break;
    }
    size_t left = static_cast<size_t>(n);
    written_total += left;
    while (left > 0) {
      Slice& front = to_client_.front();
      if (front.size() <= left) {
        left -= front.size();
        to_client_.pop_front();
      } else {
        front.advance(left);
        left = 0;
      }
    }
  }
  if (written_total > 0 && !bulk_ && clock_ != nullptr) clock_->note(written_total);
  if (written_total > 0 && stream_live_ && !draining_error_) {
    session_->mux().consume(id_, written_total);
    session_->flush();
  }
  if (to_client_.empty() && peer_fin_ && !client_shut_) {
    client_shut_ = true;
    ::shutdown(poller_.fd(), SHUT_WR);
  }
  if (to_client_.empty() && !stream_live_ && client_shut_ && !draining_error_) {
    finish();
    return;
  }
  update_interest();
}

void SocketBridge::update_interest() {
  if (done_) return;
  const bool want_read = draining_error_ || (stream_live_ && session_ != nullptr && !client_eof_ &&
                                             offloaded_read_ == 0 && session_->mux().send_capacity(id_) > 0);
  poller_.want(want_read, !to_client_.empty());
}

void SocketBridge::abort(const std::string& why) {
  log::at(log::Level::kInfo, id_, "{}: {}", options_.name, why);
  if (stream_live_) {
    stream_live_ = false;
    session_->detach(id_);
    session_->mux().reset(id_, why);
    session_->flush();
  }
  to_client_.clear();
  finish();
}

void SocketBridge::finish() {
  if (done_) return;
  done_ = true;
  if (stream_live_) {
    stream_live_ = false;
    session_->detach(id_);
    session_->mux().reset(id_, "host connection closed");
    session_->flush();
  }
  to_client_.clear();
  if (offloaded_read_ != 0) {
    bulk_reader_->forget(offloaded_read_);
    offloaded_read_ = 0;
  }
  poller_.close([this] { owner_.bridge_done(this); });
}

}  // namespace vbridge
