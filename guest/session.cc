#include "guest/session.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "protocol/datagram.h"
#include "protocol/socket_buffers.h"

namespace vbridge::guest {

std::string GuestCounters::to_string() const {
  return fmt::format(
      "host_connections={} host_failures={} peers_refused={} accept_errors={} serial_errors={} "
      "streams_opened={} open_denied={} dial_failed={} stream_errors={} resets_from_host={} "
      "streams_dropped={} "
      "bytes_from_guest={} bytes_to_guest={} transport_bytes_in={} transport_bytes_out={} "
      "transport_writes={} "
      "frames_in={} frames_out={} datagrams_to_guest={} datagrams_from_guest={} datagrams_dropped={} "
      "port_scans={} port_scan_errors={} ports_messages={} reverse_opened={} reverse_refused={} "
      "bytes_compacted={} spliced_from_guest={} batched_writes={}",
      host_connections, host_failures, peers_refused, accept_errors, serial_errors, streams_opened,
      open_denied, dial_failed, stream_errors, resets_from_host, streams_dropped, bytes_from_guest,
      bytes_to_guest, transport_bytes_in, transport_bytes_out, transport_writes, frames_in, frames_out,
      datagrams_to_guest, datagrams_from_guest, datagrams_dropped, port_scans, port_scan_errors,
      ports_messages, reverse_opened, reverse_refused, bytes_compacted, spliced_from_guest, batched_writes);
}

// A guest socket serving one stream. Per-direction progress sits in flags beside the phase:
//   guest → host: reading (a RECV in flight), read_eof (the guest shut its write side; our FIN is queued)
//   host → guest: out (DATA waiting), writing (a SENDMSG in flight), fin_from_host → shutting → shut_wr
// A datagram conn (UDP flow) uses `reading` for its readiness poll; host datagrams are sent at once, so
// `out` stays empty, and a FIN either way ends the flow.
namespace {
using Clock = std::chrono::steady_clock;
constexpr size_t kBulkIo = 64 * 1024;
// While several guest sockets take bulk transfers at once, each is written in batches of this much,
// gathered for at most kWriteBatchDelay: its reader then wakes once per batch, not once per piece the host
// read (about 200 KB, what the client's socket buffer held), which reached each reader spread out among the
// other streams' pieces. A lone transfer's reader falls behind and reads several pieces per wakeup anyway,
// and holding its pieces only idled it (bench/RESULTS.md, "Bulk writes in batches").
constexpr size_t kWriteBatchBytes = 512 * 1024;
constexpr auto kWriteBatchDelay = std::chrono::milliseconds(1);
constexpr auto kBulkRecent = std::chrono::milliseconds(10);
}  // namespace

struct Session::Conn {
  enum class Phase : uint8_t {
    kDialing,  // CONNECT in flight; host data waits in `out`
    kOpen,     // connected; both directions run until each has finished
    kClosing,  // detached from its stream; the socket closes once nothing is in flight
  };

  Phase phase = Phase::kDialing;
  bool datagram = false;  // a UDP flow
  std::unique_ptr<DatagramAssembler> assembler;
  uint32_t slot = 0;
  StreamId id = 0;
  bool in_mux = true;  // the mux still has the stream (false after close, reset or refusal)
  int fd = -1;
  DialPlan plan;
  size_t next_address = 0;
  uint32_t inflight = 0;
  bool dirty = false;

  bool dialing = false;
  bool reading = false;
  bool read_eof = false;
  Slice read_hold;  // plain mode: the buffer of the read in flight
  // A bulk transfer from the guest socket moves by splice through this pipe (see on_conn_pollin); the read
  // in flight is then a readiness poll.
  std::shared_ptr<Pipe> pipe;
  bool read_polls = false;

  bool bulk = false;  // has carried a bulk transfer: its small pieces do not count as interactive
  Clock::time_point bulk_piece_at{};  // when the host's last piece came, if it was bulk-sized; else zero
  Clock::time_point held_since{};     // gathering a batch since then (hold_write); zero when not
  bool slow_reader = false;           // the last write took less than it was given: the socket is full
  bool send_buffer_widened = false;   // widen_send_buffer_if_unix was called for this socket

  WriteQueue out;
  bool writing = false;
  bool fin_from_host = false;
  bool shutting = false;
  bool shut_wr = false;
  std::array<iovec, 16> iov{};  // one gather write covers this many queued Slices
  msghdr msg{};
};

// A virtio-serial port outlives both agents: a session there may first read a previous session's bytes, and
// the host may still be inside an old session when this one starts (see MuxConfig::serial_acceptor).
MuxConfig Session::mux_config_for(MuxConfig config, TransportKind kind) {
  if (kind == TransportKind::kSerial) {
    config.resync = true;
    config.serial_acceptor = true;
  }
  return config;
}

Session::Session(SessionEnv& env, uint32_t owner, int fd, TransportKind kind, std::string peer)
    : env_(env),
      owner_(owner),
      fd_(fd),
      kind_(kind),
      peer_(std::move(peer)),
      mux_(Role::kGuest, *this, mux_config_for(env.mux_config, kind)) {}

Session::~Session() {
  for (auto& c : conns_) {
    if (c && c->fd >= 0) ::close(c->fd);
  }
  if (kind_ == TransportKind::kListener && fd_ >= 0) ::close(fd_);
}

void Session::start(Slice first) {
  if (!first.empty()) {
    env_.counters.transport_bytes_in += first.size();
    feed(first);
  }
}

bool Session::drained() {
  return mux_.stream_count() == 0 && conns_.size() == free_slots_.size() && !writing_ && !mux_.has_output();
}

size_t Session::compact_queues(ReadArena& arena) {
  size_t moved = 0;
  for (auto& c : conns_) {
    if (!c || c->out.empty()) continue;
    // A SENDMSG in flight may still read the first iovecs it was given.
    moved += c->out.compact(c->writing ? c->iov.size() : 0, arena);
  }
  return moved;
}

void Session::goaway(const std::string& message) {
  if (!closing_) mux_.goaway(message);
}

void Session::close(const std::string& why, log::Level level) {
  if (closing_) return;
  closing_ = true;
  size_t cut = 0;
  for (auto& c : conns_) {
    if (!c || c->phase == Conn::Phase::kClosing) continue;
    ++cut;
    kill(*c);
  }
  env_.counters.streams_dropped += cut;
  if (cut > 0) {
    log::at(level, 0, "{}: {}; closing {} guest socket(s)", peer_, why, cut);
  } else {
    log::at(level, 0, "{}: {}", peer_, why);
  }
  if (reading_) env_.loop.cancel(Tag{Op::kTransportRead, owner_, 0});
  if (writing_) env_.loop.cancel(Tag{Op::kTransportWrite, owner_, 0});
  // The host sees the end at once, though the fd itself is closed only when nothing is in flight.
  if (kind_ == TransportKind::kListener) ::shutdown(fd_, SHUT_RDWR);
}

void Session::on_completion(const Tag& tag, const io_uring_cqe& cqe) {
  switch (tag.op) {
    case Op::kTransportRead: on_transport_read(cqe); return;
    case Op::kTransportWrite: on_transport_write(cqe.res); return;
    case Op::kDial:
    case Op::kConnRead:
    case Op::kConnWrite:
    case Op::kConnShutdown: break;
    default: return;
  }
  // A slot is freed only once nothing is in flight on it, so the conn is still there.
  Conn& c = *conns_.at(tag.slot);
  --c.inflight;
  --inflight_;
  switch (tag.op) {
    case Op::kDial: on_dial(c, cqe.res); break;
    case Op::kConnRead:
      if (c.datagram) {
        on_datagrams_readable(c, cqe.res);
      } else if (c.read_polls) {
        on_conn_pollin(c, cqe.res);
      } else {
        on_conn_read(c, cqe);
      }
      break;
    case Op::kConnWrite: on_conn_write(c, cqe.res); break;
    case Op::kConnShutdown: on_conn_shutdown(c, cqe.res); break;
    default: break;
  }
  mark(c);
}

void Session::flush() {
  if (!held_.empty()) release_due_holds();
  if (!closing_) {
    if (!reading_) arm_transport_read();
    // Moving output may wake starved streams (on_writable), so conns are synced after it.
    arm_transport_write();
  }
  while (!dirty_.empty()) {
    dirty_work_.swap(dirty_);
    for (const uint32_t slot : dirty_work_) {
      Conn* c = conns_[slot].get();
      if (c == nullptr) continue;
      c->dirty = false;
      sync(*c);
    }
    dirty_work_.clear();
  }
  // Splices in sync() may have queued bytes.
  if (!closing_) arm_transport_write();
}

// ---------------------------------------------------------------------------------------------------------
// Transport

io_uring_sqe* Session::transport_sqe(Op op) {
  ++inflight_;
  return env_.loop.sqe(Tag{op, owner_, 0});
}

void Session::arm_transport_read() {
  io_uring_sqe* sqe = transport_sqe(Op::kTransportRead);
  multishot_armed_ = false;
  if (kind_ == TransportKind::kSerial) {
    io_uring_prep_read(sqe, fd_, nullptr, 0, static_cast<uint64_t>(-1));
  } else if (env_.multishot && env_.transport_buffers.uses_ring()) {
    // One SQE keeps delivering completions until the buffer ring runs dry or the connection ends.
    io_uring_prep_recv_multishot(sqe, fd_, nullptr, 0, 0);
    multishot_armed_ = true;
  } else {
    io_uring_prep_recv(sqe, fd_, nullptr, 0, 0);
  }
  env_.transport_buffers.attach(sqe, 0, read_hold_);
  reading_ = true;
}

void Session::arm_transport_write() {
  if (writing_ || !mux_.has_output()) return;
  if (kind_ != TransportKind::kSerial) {
    write_transport_now();
    return;
  }
  const size_t n = mux_.prepare_output(iov_);
  if (n == 0) return;  // a serial session never pipes (see on_conn_read)
  io_uring_sqe* sqe = transport_sqe(Op::kTransportWrite);
  io_uring_prep_writev(sqe, fd_, iov_.data(), static_cast<unsigned>(n), static_cast<uint64_t>(-1));
  writing_ = true;
  ++env_.counters.transport_writes;
}

// Socket transports are written at once, nonblocking, rather than through the ring: a piped payload must
// follow its frame header, and a round trip through the ring per frame costs more than the write itself.
// Only a full socket waits, for POLLOUT in the ring.
void Session::write_transport_now() {
  for (;;) {
    const size_t count = mux_.prepare_output(iov_);
    ssize_t n = 0;
    if (count != 0) {
      msg_ = msghdr{};
      msg_.msg_iov = iov_.data();
      msg_.msg_iovlen = count;
      n = ::sendmsg(fd_, &msg_, MSG_DONTWAIT | MSG_NOSIGNAL);
    } else if (const auto piped = mux_.piped_output()) {
      n = ::splice(piped->pipe->read_fd(), nullptr, fd_, nullptr, piped->size,
                   SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    } else {
      return;
    }
    if (n > 0) {
      env_.counters.transport_bytes_out += static_cast<uint64_t>(n);
      ++env_.counters.transport_writes;
      mux_.consume_output(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      io_uring_sqe* sqe = transport_sqe(Op::kTransportWrite);
      io_uring_prep_poll_add(sqe, fd_, POLLOUT);
      writing_ = true;
      transport_polling_ = true;
      return;
    }
    ++env_.counters.host_failures;
    close(n == 0 ? std::string("host connection failed: a stream's pipe ran dry (internal accounting)")
                 : fmt::format("host connection failed: write: {}", std::strerror(errno)),
          log::Level::kWarn);
    return;
  }
}

void Session::on_transport_read(const io_uring_cqe& cqe) {
  if ((cqe.flags & IORING_CQE_F_MORE) == 0) {
    reading_ = false;
    --inflight_;
  }
  Slice bytes = env_.transport_buffers.complete(cqe, read_hold_);
  if (closing_) return;
  if (cqe.res > 0) {
    env_.counters.transport_bytes_in += bytes.size();
    feed(bytes);
    return;
  }
  if (cqe.res == 0) {
    close(kind_ == TransportKind::kSerial ? "host went away (serial port EOF)" : "host closed the connection",
          log::Level::kInfo);
    return;
  }
  switch (-cqe.res) {
    case ENOBUFS:  // every ring buffer was in use; flush() re-arms once completions returned some
    case EINTR:
    case EAGAIN: return;
    case EINVAL:
      if (multishot_armed_) {
        env_.multishot = false;
        log::warn("io_uring: kernel refuses multishot RECV (needs Linux 6.0); re-arming single reads");
        return;
      }
      break;
    default: break;
  }
  ++env_.counters.host_failures;
  close(fmt::format("host connection failed: read: {}", std::strerror(-cqe.res)), log::Level::kWarn);
}

void Session::on_transport_write(int res) {
  writing_ = false;
  --inflight_;
  if (closing_) return;
  if (transport_polling_) {
    transport_polling_ = false;
    if (res >= 0 || res == -EINTR) return;  // writable (or worth another try): flush() splices on
    ++env_.counters.host_failures;
    close(fmt::format("host connection failed: poll: {}", std::strerror(-res)), log::Level::kWarn);
    return;
  }
  if (res > 0) {
    env_.counters.transport_bytes_out += static_cast<uint64_t>(res);
    mux_.consume_output(static_cast<size_t>(res));
    return;
  }
  if (res == 0 || res == -EAGAIN || res == -EINTR) return;
  ++env_.counters.host_failures;
  close(fmt::format("host connection failed: write: {}", std::strerror(-res)), log::Level::kWarn);
}

void Session::feed(const Slice& bytes) {
  listeners_rescanned_ = false;
  if (Status st = mux_.feed(bytes); !st) {
    if (st.error().code == ErrorCode::kAuth) {
      // Nothing else was sent on this connection yet (our HELLO answers only a good one): the refusal goes
      // out in one small nonblocking write, so the host can name the problem.
      const auto refusal = encode_refusal(st.error().message);
      (void)!::send(fd_, refusal.data(), refusal.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      ++env_.counters.peers_refused;
      log::warn("transport peer {} refused: {}; it must send the token of this agent's --token-file", peer_,
                st.error().message);
      close("refused", log::Level::kDebug);
      return;
    }
    // On a serial port the failing bytes may hold a reconnected host's HELLO: the next session starts from
    // them.
    if (kind_ == TransportKind::kSerial) leftover_ = bytes;
    ++env_.counters.host_failures;
    close("host connection failed: " + st.error().to_string(), log::Level::kError);
  }
}

// ---------------------------------------------------------------------------------------------------------
// MuxHandler

void Session::on_ready(const Hello& peer) {
  log::info("{}: host ready (protocol {}, max frame {}, window {}, max streams {})", peer_, peer.version,
            peer.max_frame, peer.initial_window, peer.max_streams);
  if (const std::string note = shared_memory_note(env_.mux_config.shared, peer, mux_.shared_active());
      !note.empty()) {
    log::info("{}: {}", peer_, note);
  }
  env_.hooks.on_host_ready(*this);
}

void Session::send_ports(const PortDiff& diff, size_t max_listeners) {
  if (!host_ready()) return;
  for (const PortDiff& part : split_diff(diff, max_listeners)) {
    flatbuffers::FlatBufferBuilder b(1024);
    build_ports_message(part, b);
    mux_.send_control(b);
    ++env_.counters.ports_messages;
    log::debug("{}: PORTS{} +{} -{}", peer_, part.full ? " snapshot" : "", part.added.size(),
               part.removed.size());
  }
}

void Session::on_open(StreamId id, const wire::Target& target) {
  wire::TargetT requested;
  target.UnPackTo(&requested);
  auto plan = env_.targets.resolve(requested, env_.hooks.guest_listeners(false));
  if (!plan && requested.proto != wire::Proto::Unix && !listeners_rescanned_) {
    // The listener may be newer than the last scan, however recent: a server binds its port just before it
    // tells its client to connect (iperf3's UDP test does). So a miss looks again before refusing; once
    // per transport read, which also serves every later OPEN of that read.
    listeners_rescanned_ = true;
    if (const auto* fresh = env_.hooks.guest_listeners(true)) plan = env_.targets.resolve(requested, fresh);
  }
  if (!plan) {
    ++env_.counters.open_denied;
    log::at(log::Level::kWarn, id, "open {} refused: {}", TargetPolicy::describe(requested),
            plan.error().message);
    mux_.reject(id, plan.error().errno_value, plan.error().message);
    return;
  }
  log::at(log::Level::kDebug, id, "open {} → {}", TargetPolicy::describe(requested), plan->description);
  Conn& c = new_conn(id, std::move(*plan));
  if (c.plan.socket_type == SOCK_DGRAM) {
    dial_datagram(c);
  } else {
    dial(c);
  }
}

void Session::open_reverse(int fd, const std::string& name, const std::string& guest_path) {
  wire::TargetT target;
  target.proto = wire::Proto::Unix;
  target.path = name;
  auto id =
      host_ready() ? mux_.open(target) : Result<StreamId>(Error{ErrorCode::kIo, 0, "host not connected"});
  if (!id) {
    ++env_.counters.reverse_refused;
    log::warn("{}: client of {} turned away: {}", peer_, guest_path, id.error().to_string());
    ::close(fd);
    return;
  }
  ++env_.counters.reverse_opened;
  Conn& c = new_conn(*id, DialPlan{fmt::format("client of {} (host target \"{}\")", guest_path, name), {}});
  c.fd = fd;
  // The guest's bytes may go out before the host answers; the host's wait for its open to succeed.
  c.phase = Conn::Phase::kOpen;
  log::at(log::Level::kDebug, c.id, "opened {}", c.plan.description);
  mark(c);
}

void Session::on_open_result(StreamId id, const Error* error) {
  Conn* c = conn_for(id);
  if (c == nullptr) return;
  if (error == nullptr) {
    log::at(log::Level::kDebug, id, "host accepted {}", c->plan.description);
    return;
  }
  ++env_.counters.reverse_refused;
  log::at(log::Level::kWarn, id, "host refused {}: {}", c->plan.description, error->to_string());
  c->in_mux = false;  // the mux has dropped the refused stream
  by_stream_.erase(id);
  kill(*c);
}

void Session::on_data(StreamId id, Slice data) {
  Conn* c = conn_for(id);
  if (c == nullptr) {
    mux_.reset(id, "guest agent has no socket for this stream");
    return;
  }
  if (c->datagram) {
    send_datagrams(*c, data);
    return;
  }
  note_piece(*c, data.size());
  c->out.push(std::move(data));
  mark(*c);
}

void Session::on_fin(StreamId id) {
  if (Conn* c = conn_for(id)) {
    c->fin_from_host = true;
    if (c->datagram) {
      // A flow has no half-close: the host is done with it, so it ends both ways.
      mux_.shutdown_write(id);
      kill(*c);
      return;
    }
    mark(*c);
  }
}

void Session::on_reset(StreamId id, const Error& error) {
  if (error.code == ErrorCode::kReset) {
    ++env_.counters.resets_from_host;
    log::at(log::Level::kDebug, id, "reset by host: {}", error.message);
  } else {
    // The host broke this stream's credit or FIN rules; the mux reset it alone and told the host why.
    ++env_.counters.stream_errors;
    log::at(log::Level::kWarn, id, "the host broke the stream, reset it: {}", error.to_string());
  }
  if (Conn* c = conn_for(id)) {
    c->in_mux = false;
    by_stream_.erase(id);
    kill(*c);
  }
}

void Session::on_writable(StreamId id) {
  if (Conn* c = conn_for(id)) mark(*c);
}

void Session::on_closed(StreamId id) {
  log::at(log::Level::kDebug, id, "closed");
  if (Conn* c = conn_for(id)) {
    c->in_mux = false;
    by_stream_.erase(id);
    mark(*c);
  }
}

void Session::on_control(const wire::Control& message) {
  if (message.message_type() == wire::Message::FileEvents) {
    env_.hooks.on_file_events(*message.message_as_FileEvents());
    return;
  }
  log::debug("{}: ignoring control message {}", peer_, wire::EnumNameMessage(message.message_type()));
}

void Session::on_goaway(const std::string& message) {
  log::info("{}: host is going away: {}", peer_, message);
}

// ---------------------------------------------------------------------------------------------------------
// Guest sockets

Session::Conn* Session::conn_for(StreamId id) {
  const auto it = by_stream_.find(id);
  return it == by_stream_.end() ? nullptr : conns_[it->second].get();
}

Session::Conn& Session::new_conn(StreamId id, DialPlan plan) {
  uint32_t slot = 0;
  if (!free_slots_.empty()) {
    slot = free_slots_.back();
    free_slots_.pop_back();
  } else {
    slot = static_cast<uint32_t>(conns_.size());
    conns_.emplace_back();
  }
  conns_[slot] = std::make_unique<Conn>();
  Conn& c = *conns_[slot];
  c.slot = slot;
  c.id = id;
  c.plan = std::move(plan);
  by_stream_[id] = slot;
  return c;
}

io_uring_sqe* Session::conn_sqe(Conn& c, Op op) {
  ++c.inflight;
  ++inflight_;
  return env_.loop.sqe(Tag{op, owner_, c.slot});
}

void Session::dial(Conn& c) {
  const SocketAddress& address = c.plan.addresses[c.next_address++];
  c.fd = socket(address.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c.fd < 0) {
    dial_failed(c, errno);
    return;
  }
  if (address.family() != AF_UNIX) {
    // A relay must not hold back a small write for the ACK of the one before (Nagle): a message the
    // transport delivered in two pieces would otherwise wait for the server's delayed ACK.
    const int one = 1;
    ::setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  io_uring_sqe* sqe = conn_sqe(c, Op::kDial);
  io_uring_prep_connect(sqe, c.fd, address.get(), address.length);
  c.dialing = true;
}

// UDP connect() only sets the default destination, so it completes at once; no CONNECT operation needed.
void Session::dial_datagram(Conn& c) {
  c.datagram = true;
  c.assembler = std::make_unique<DatagramAssembler>(env_.datagram_pool);
  int err = EADDRNOTAVAIL;
  for (const SocketAddress& address : c.plan.addresses) {
    c.fd = socket(address.family(), SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c.fd >= 0 && ::connect(c.fd, address.get(), address.length) == 0) {
      c.phase = Conn::Phase::kOpen;
      ++env_.counters.streams_opened;
      log::at(log::Level::kDebug, c.id, "UDP flow to {}", c.plan.description);
      mux_.accept(c.id);
      mark(c);
      return;
    }
    err = errno;
    if (c.fd >= 0) ::close(c.fd);
    c.fd = -1;
  }
  dial_failed(c, err);
}

void Session::on_dial(Conn& c, int res) {
  c.dialing = false;
  if (c.phase == Conn::Phase::kClosing) return;
  if (res == 0) {
    c.phase = Conn::Phase::kOpen;
    ++env_.counters.streams_opened;
    log::at(log::Level::kDebug, c.id, "connected to {}", c.plan.description);
    mux_.accept(c.id);
    return;
  }
  const int err = -res;
  const bool try_next =
      err == ECONNREFUSED || err == EADDRNOTAVAIL || err == ENETUNREACH || err == EAFNOSUPPORT;
  if (try_next && c.next_address < c.plan.addresses.size()) {
    ::close(c.fd);
    c.fd = -1;
    dial(c);
    return;
  }
  dial_failed(c, err);
}

void Session::dial_failed(Conn& c, int err) {
  ++env_.counters.dial_failed;
  const std::string message = fmt::format("{}: {}", c.plan.description, std::strerror(err));
  log::at(log::Level::kWarn, c.id, "open failed: {}", message);
  if (c.in_mux) {
    c.in_mux = false;
    by_stream_.erase(c.id);
    mux_.reject(c.id, err, message);
  }
  kill(c);
}

void Session::on_conn_read(Conn& c, const io_uring_cqe& cqe) {
  c.reading = false;
  Slice bytes = env_.conn_buffers.complete(cqe, c.read_hold);
  if (c.phase == Conn::Phase::kClosing) return;
  if (cqe.res > 0) {
    env_.counters.bytes_from_guest += bytes.size();
    const size_t n = bytes.size();
    c.bulk = c.bulk || n >= env_.conn_buffers.block_size();
    if (!c.bulk) interactive_.note(n);
    if (!mux_.send(c.id, std::move(bytes))) {
      fail_conn(c, "stream no longer accepts data");
      return;
    }
    // A read this large marks a bulk transfer: from now on its bytes move through a pipe.
    if (n >= kSpliceAfterRead && env_.splice && kind_ != TransportKind::kSerial && c.pipe == nullptr) {
      if (auto pipe = Pipe::create(kPipeBytes)) {
        c.pipe = std::move(*pipe);
        log::at(log::Level::kDebug, c.id, "bulk transfer from {}, moving bytes by splice",
                c.plan.description);
      }
    }
    return;
  }
  if (cqe.res == 0) {
    log::at(log::Level::kDebug, c.id, "guest socket shut its write side");
    c.read_eof = true;
    mux_.shutdown_write(c.id);
    return;
  }
  const int err = -cqe.res;
  if (err == ENOBUFS || err == EAGAIN || err == EINTR) return;  // sync() re-arms the read
  fail_conn(c, fmt::format("{}: read: {}", c.plan.description, std::strerror(err)));
}

// The guest socket of a bulk transfer is readable: its bytes go into the stream's pipe by reference.
void Session::on_conn_pollin(Conn& c, int res) {
  c.reading = false;
  c.read_polls = false;
  if (c.phase == Conn::Phase::kClosing || res == -EINTR) return;
  if (res < 0) {
    fail_conn(c, fmt::format("{}: poll: {}", c.plan.description, std::strerror(-res)));
    return;
  }
  for (int i = 0; i < 4; ++i) {
    const size_t want = std::min(mux_.send_capacity(c.id), c.pipe->room());
    if (want == 0) return;
    const ssize_t n =
        ::splice(c.fd, nullptr, c.pipe->write_fd(), nullptr, want, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    if (n == 0) {
      log::at(log::Level::kDebug, c.id, "guest socket shut its write side");
      c.read_eof = true;
      mux_.shutdown_write(c.id);
      return;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      // Readable, yet nothing moved: the pipe's slots are full of small pieces. Plain reads take over (the
      // mux keeps pipe and memory bytes in order); a large read brings a fresh pipe.
      if (errno == EAGAIN) {
        if (i == 0) c.pipe.reset();
        return;
      }
      fail_conn(c, fmt::format("{}: splice: {}", c.plan.description, std::strerror(errno)));
      return;
    }
    env_.counters.bytes_from_guest += static_cast<uint64_t>(n);
    env_.counters.spliced_from_guest += static_cast<uint64_t>(n);
    c.pipe->filled += static_cast<size_t>(n);
    if (!mux_.send_piped(c.id, c.pipe, static_cast<size_t>(n))) {
      fail_conn(c, "stream no longer accepts data");
      return;
    }
    if (static_cast<size_t>(n) < want) return;
  }
}

// Host → guest: each datagram of the records is one send(). The credit goes back at once: nothing is kept.
void Session::send_datagrams(Conn& c, const Slice& records) {
  const Status st = c.assembler->feed(records, [&](Slice datagram) {
    const ssize_t n = ::send(c.fd, datagram.data(), datagram.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) {
      // EAGAIN/ENOBUFS: the socket's send buffer is full; ECONNREFUSED: an earlier datagram found no
      // listener (ICMP). UDP promises no delivery, so the datagram is dropped, counted, and the flow stays.
      ++env_.counters.datagrams_dropped;
      return;
    }
    ++env_.counters.datagrams_to_guest;
    env_.counters.bytes_to_guest += static_cast<uint64_t>(n);
  });
  mux_.consume(c.id, records.size());
  if (!st) fail_conn(c, fmt::format("{}: {}", c.plan.description, st.error().message));
}

// Guest → host: drains the socket (up to a batch per wakeup). Each datagram lands 4 bytes into the arena's
// tail so that its length prefix goes in front without a copy.
void Session::on_datagrams_readable(Conn& c, int res) {
  c.reading = false;
  if (c.phase == Conn::Phase::kClosing || res == -EINTR) return;  // closing; or sync() re-arms the poll
  if (res < 0) {
    fail_conn(c, fmt::format("{}: poll: {}", c.plan.description, std::strerror(-res)));
    return;
  }
  for (int i = 0; i < 64; ++i) {
    const std::span<std::byte> space = env_.datagram_arena.writable();
    const ssize_t n = ::recv(c.fd, space.data() + kDatagramPrefix, kMaxDatagram, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      // ECONNREFUSED and the like: an ICMP error for an earlier datagram. The flow stays, as UDP does.
      if (errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH) continue;
      fail_conn(c, fmt::format("{}: recv: {}", c.plan.description, std::strerror(errno)));
      return;
    }
    encode_datagram_prefix(space.data(), static_cast<uint32_t>(n));
    Slice framed = env_.datagram_arena.commit(kDatagramPrefix + static_cast<size_t>(n));
    if (!mux_.fits(c.id, framed.size())) {
      ++env_.counters.datagrams_dropped;
      continue;
    }
    mux_.send(c.id, std::move(framed));
    ++env_.counters.datagrams_from_guest;
    env_.counters.bytes_from_guest += static_cast<uint64_t>(n);
  }
}

void Session::on_conn_write(Conn& c, int res) {
  c.writing = false;
  if (c.phase == Conn::Phase::kClosing) return;
  if (res > 0) {
    const auto n = static_cast<size_t>(res);
    if (!c.bulk) interactive_.note(c.out.bytes());
    c.slow_reader = n < c.out.bytes();
    if (c.slow_reader && !c.send_buffer_widened) {
      widen_send_buffer_if_unix(c.fd);
      c.send_buffer_widened = true;
    }
    c.out.consume(n);
    env_.counters.bytes_to_guest += n;
    mux_.consume(c.id, n);  // the host may send as much again
    return;
  }
  if (res == 0 || res == -EAGAIN || res == -EINTR) return;
  fail_conn(c, fmt::format("{}: write: {}", c.plan.description, std::strerror(-res)));
}

void Session::on_conn_shutdown(Conn& c, int res) {
  c.shutting = false;
  c.shut_wr = true;
  // ENOTCONN: the guest side is already gone; there is nobody left to tell.
  if (res < 0 && res != -ENOTCONN) log::at(log::Level::kDebug, c.id, "shutdown: {}", std::strerror(-res));
}

void Session::mark(Conn& c) {
  if (c.dirty) return;
  c.dirty = true;
  dirty_.push_back(c.slot);
}

void Session::sync(Conn& c) {
  switch (c.phase) {
    case Conn::Phase::kDialing: return;
    case Conn::Phase::kOpen:
      if (c.datagram) {
        if (!c.in_mux) {
          kill(c);
        } else if (!c.reading) {
          arm_datagram_poll(c);
        }
        return;
      }
      if (!c.reading && !c.read_eof) {
        if (const size_t capacity = mux_.send_capacity(c.id); capacity > 0) arm_conn_read(c, capacity);
      }
      if (!c.writing && !c.out.empty() && !hold_write(c)) arm_conn_write(c);
      // FIN follows the last byte the host sent.
      if (c.fin_from_host && !c.shut_wr && !c.shutting && !c.writing && c.out.empty()) arm_conn_shutdown(c);
      if (!c.in_mux && c.read_eof && c.shut_wr && c.inflight == 0) release(c);
      return;
    case Conn::Phase::kClosing:
      if (c.inflight == 0) release(c);
      return;
  }
}

void Session::arm_conn_read(Conn& c, size_t capacity) {
  // With its pipe full the stream reads into memory meanwhile; the mux keeps the order.
  if (c.pipe != nullptr && c.pipe->room() > 0) {
    io_uring_sqe* sqe = conn_sqe(c, Op::kConnRead);
    io_uring_prep_poll_add(sqe, c.fd, POLLIN);
    c.reading = true;
    c.read_polls = true;
    return;
  }
  const size_t len = std::min(capacity, env_.conn_buffers.block_size());
  io_uring_sqe* sqe = conn_sqe(c, Op::kConnRead);
  io_uring_prep_recv(sqe, c.fd, nullptr, 0, 0);
  env_.conn_buffers.attach(sqe, len, c.read_hold);
  c.reading = true;
}

void Session::arm_datagram_poll(Conn& c) {
  io_uring_sqe* sqe = conn_sqe(c, Op::kConnRead);
  io_uring_prep_poll_add(sqe, c.fd, POLLIN);
  c.reading = true;
}

void Session::arm_conn_write(Conn& c) {
  const size_t n = c.out.fill(c.iov);
  c.msg = msghdr{};
  c.msg.msg_iov = c.iov.data();
  c.msg.msg_iovlen = n;
  io_uring_sqe* sqe = conn_sqe(c, Op::kConnWrite);
  io_uring_prep_sendmsg(sqe, c.fd, &c.msg, MSG_NOSIGNAL);
  if (c.out.bytes() >= kBulkIo) {
    c.bulk = true;
    // Not for a socket whose reader lags: a worker would sit in that send until the reader caught up,
    // holding every queued slice (and the read blocks they pin) as in flight.
    if (interactive_.active() && !c.slow_reader) sqe->flags |= IOSQE_ASYNC;
  }
  c.writing = true;
}

// Whether `c`'s queued bytes wait for more of their bulk transfer (see kWriteBatchBytes). Never a lone
// transfer, a connection's first write, a small piece (a request, a transfer's tail), a full batch or bytes
// before a FIN.
bool Session::hold_write(Conn& c) {
  if (!c.bulk || c.bulk_piece_at == Clock::time_point{} || c.fin_from_host ||
      c.out.bytes() >= kWriteBatchBytes) {
    c.held_since = {};
    return false;
  }
  const Clock::time_point now = Clock::now();
  if (c.held_since == Clock::time_point{}) {
    if (bulk_receivers(now) < 2) return false;
    c.held_since = now;
    ++env_.counters.batched_writes;
    if (std::find(held_.begin(), held_.end(), c.slot) == held_.end()) held_.push_back(c.slot);
    const Clock::time_point due = now + kWriteBatchDelay;
    if (!hold_deadline_ || due < *hold_deadline_) hold_deadline_ = due;
    return true;
  }
  if (now - c.held_since < kWriteBatchDelay) return true;
  // Nothing more came in time: the transfer paused, and its socket no longer counts as receiving one.
  c.held_since = {};
  c.bulk_piece_at = {};
  return false;
}

void Session::note_piece(Conn& c, size_t size) {
  if (size < kBulkIo) {
    c.bulk_piece_at = {};
    return;
  }
  c.bulk_piece_at = Clock::now();
  if (std::find(bulk_receivers_.begin(), bulk_receivers_.end(), c.slot) == bulk_receivers_.end())
    bulk_receivers_.push_back(c.slot);
}

// How many guest sockets are receiving bulk transfers: a bulk-sized piece came within kBulkRecent.
size_t Session::bulk_receivers(Clock::time_point now) {
  std::erase_if(bulk_receivers_, [&](uint32_t slot) {
    const Conn* c = conns_[slot].get();
    return c == nullptr || c->bulk_piece_at == Clock::time_point{} || now - c->bulk_piece_at >= kBulkRecent;
  });
  return bulk_receivers_.size();
}

// Marks the conns whose batch waited its time (sync then writes them) and finds the next deadline.
void Session::release_due_holds() {
  const Clock::time_point now = Clock::now();
  hold_deadline_.reset();
  size_t kept = 0;
  for (const uint32_t slot : held_) {
    Conn* c = conns_[slot].get();
    if (c == nullptr || c->held_since == Clock::time_point{}) continue;
    const Clock::time_point due = c->held_since + kWriteBatchDelay;
    if (due <= now) {
      mark(*c);
      continue;
    }
    held_[kept++] = slot;
    if (!hold_deadline_ || due < *hold_deadline_) hold_deadline_ = due;
  }
  held_.resize(kept);
}

void Session::arm_conn_shutdown(Conn& c) {
  io_uring_sqe* sqe = conn_sqe(c, Op::kConnShutdown);
  io_uring_prep_shutdown(sqe, c.fd, SHUT_WR);
  c.shutting = true;
}

void Session::fail_conn(Conn& c, const std::string& message) {
  ++env_.counters.stream_errors;
  log::at(log::Level::kWarn, c.id, "{}", message);
  if (c.in_mux) {
    c.in_mux = false;
    by_stream_.erase(c.id);
    mux_.reset(c.id, message);
  }
  kill(c);
}

void Session::kill(Conn& c) {
  if (c.phase == Conn::Phase::kClosing) return;
  c.phase = Conn::Phase::kClosing;
  if (c.in_mux) {
    c.in_mux = false;
    by_stream_.erase(c.id);
  }
  // The socket closes only after these complete: until then the kernel may still use the conn's buffers.
  const auto cancel = [&](bool pending, Op op) {
    if (pending) env_.loop.cancel(Tag{op, owner_, c.slot});
  };
  cancel(c.dialing, Op::kDial);
  cancel(c.reading, Op::kConnRead);
  cancel(c.writing, Op::kConnWrite);
  cancel(c.shutting, Op::kConnShutdown);
  mark(c);
}

void Session::release(Conn& c) {
  if (c.in_mux) by_stream_.erase(c.id);
  if (c.fd >= 0) ::close(c.fd);
  const uint32_t slot = c.slot;
  conns_[slot].reset();
  free_slots_.push_back(slot);
}

}  // namespace vbridge::guest
