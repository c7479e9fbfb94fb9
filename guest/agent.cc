#include "guest/agent.h"

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "protocol/datagram.h"
#include "protocol/log.h"

namespace vbridge::guest {
namespace {

constexpr uint16_t kTransportGroup = 0;
constexpr uint16_t kConnGroup = 1;
constexpr auto kSerialRetry = std::chrono::milliseconds(100);    // host away from the serial port
constexpr auto kAcceptRetry = std::chrono::milliseconds(100);    // accept failed (EMFILE and the like)
constexpr auto kHardDeadline = std::chrono::milliseconds(1000);  // cancelled operations must be back by then
constexpr uint32_t kDrainTimer = 0;
constexpr uint32_t kHardTimer = 1;
// A scan happens at least this often even when the socket counts did not move
// (PortWatcher::may_have_changed).
constexpr auto kFullScanEvery = std::chrono::milliseconds(500);
// UDP replies and reassembled datagrams: a block takes a few maximal datagrams or many small ones.
constexpr size_t kDatagramBlock = 256 * 1024;
// Connections on a listening transport that have not finished their handshake yet.
constexpr size_t kMaxPending = 8;

__kernel_timespec to_timespec(std::chrono::milliseconds d) {
  __kernel_timespec ts{};
  ts.tv_sec = d.count() / 1000;
  ts.tv_nsec = (d.count() % 1000) * 1000000;
  return ts;
}

// SIGTERM and SIGINT: the agent reads them from a signalfd and stops.
sigset_t stop_signals() {
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  return mask;
}

}  // namespace

Result<ReverseUnix> parse_reverse_unix(std::string_view text) {
  const size_t eq = text.rfind('=');
  if (eq == std::string_view::npos || eq == 0 || eq + 1 == text.size() || text.front() != '/') {
    return Error{ErrorCode::kConfig, EINVAL,
                 fmt::format("--reverse-unix \"{}\": expected /GUEST/PATH.sock=NAME", text)};
  }
  return ReverseUnix{std::string(text.substr(0, eq)), std::string(text.substr(eq + 1))};
}

Result<std::unique_ptr<Agent>> Agent::create(AgentConfig config) {
  if (!config.token.empty() && config.listen.kind == Address::Kind::kSerial) {
    return Error{ErrorCode::kConfig, EINVAL,
                 "--token-file is for unix, tcp and vsock transports; a virtio-serial port is reachable only "
                 "by its VM's host"};
  }
  config.mux.expect_token = config.token;
  config.mux.shared = config.shared.get();
  auto targets = TargetPolicy::create(config.targets);
  if (!targets) return targets.error();
  auto loop = UringLoop::create();
  if (!loop) return loop.error();
  for (const auto& note : (*loop)->notes()) log::warn("{}", note);
  // Held from before the first socket exists: a stop that arrives while the agent starts waits in the
  // signalfd (setup) and ends it cleanly, with its sockets removed, rather than by the default action.
  const sigset_t mask = stop_signals();
  if (sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) return Error{ErrorCode::kIo, errno, "sigprocmask failed"};
  auto endpoint = TransportEndpoint::open(config.listen, config.serial_paths);
  if (!endpoint) return endpoint.error();
  std::unique_ptr<Agent> agent(
      new Agent(std::move(config), std::move(*targets), std::move(*loop), std::move(*endpoint)));
  if (Status st = agent->setup(); !st) return st.error();
  return agent;
}

Agent::Agent(AgentConfig config, TargetPolicy targets, std::unique_ptr<UringLoop> loop,
             TransportEndpoint endpoint)
    : config_(std::move(config)),
      targets_(std::move(targets)),
      // Free buffers kept for reuse beyond the ones the rings hold; more are returned to the allocator.
      pool_(config_.buffer_size, 64),
      conn_pool_(config_.buffer_size, 64, config_.shared.get()),
      loop_(std::move(loop)),
      endpoint_(std::move(endpoint)),
      datagram_pool_(kDatagramBlock, 8),
      datagram_arena_(datagram_pool_, kMaxDatagram + kDatagramPrefix),
      compact_pool_(64 * 1024, 16),
      compact_arena_(compact_pool_, 4 * 1024) {}

Status Agent::setup() {
  if (config_.buffer_rings) {
    auto transport = ReadBuffers::ring(*loop_, pool_, kTransportGroup, config_.transport_ring_entries);
    auto conn = transport ? ReadBuffers::ring(*loop_, conn_pool_, kConnGroup, config_.conn_ring_entries)
                          : transport.error();
    if (transport && conn) {
      transport_buffers_ = std::move(*transport);
      conn_buffers_ = std::move(*conn);
    } else {
      log::warn("{}; reading into per-read pool buffers", (transport ? conn : transport).error().message);
    }
  }
  if (!transport_buffers_) {
    transport_buffers_ = ReadBuffers::plain(pool_);
    conn_buffers_ = ReadBuffers::plain(conn_pool_);
  }
  env_ = std::make_unique<SessionEnv>(SessionEnv{*loop_, *transport_buffers_, *conn_buffers_, targets_,
                                                 counters_, config_.mux, *this, datagram_pool_,
                                                 datagram_arena_});
  env_->splice = config_.splice;

  if (!config_.shares.empty()) {
    auto injector = file_events::Injector::create(config_.shares);
    if (!injector) return injector.error();
    injector_ = std::make_unique<file_events::Injector>(std::move(*injector));
    config_.mux.features |= kFeatureFileEvents;
    env_->mux_config.features |= kFeatureFileEvents;
    for (const auto& m : config_.shares)
      log::info("replaying host changes of share {} on {}", m.share, m.guest_path);
  }
  if (config_.ports.enabled) {
    // The agent's own TCP transport is not a guest service.
    std::set<uint16_t> own;
    if (endpoint_.address().kind == Address::Kind::kTcp)
      own.insert(static_cast<uint16_t>(endpoint_.address().port));
    watcher_ = std::make_unique<PortWatcher>(std::move(own));
    scan_ports();  // a netlink failure shows at startup, not only at the first host connection
  }
  for (const ReverseUnix& r : config_.reverse_unix) {
    auto endpoint = TransportEndpoint::open(Address{Address::Kind::kUnix, r.guest_path});
    if (!endpoint)
      return Error{ErrorCode::kConfig, endpoint.error().errno_value,
                   fmt::format("--reverse-unix {}={}: {}", r.guest_path, r.name, endpoint.error().message)};
    reverse_.push_back(ReverseListener{r, std::move(*endpoint)});
  }

  const sigset_t mask = stop_signals();
  signal_fd_ = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (signal_fd_ < 0) return Error{ErrorCode::kIo, errno, fmt::format("signalfd: {}", std::strerror(errno))};
  return {};
}

Agent::~Agent() {
  // The kernel lets go of every buffer, iovec and address first; then their owners may go.
  loop_->exit();
  active_.reset();
  pending_.clear();
  retiring_.clear();
  probe_hold_.reset();
  transport_buffers_.reset();
  conn_buffers_.reset();
  if (signal_fd_ >= 0) ::close(signal_fd_);
}

std::string Agent::counters_line() const {
  const auto& ls = loop_->stats();
  return fmt::format(
      "{} loop_iterations={} completions={} early_submits={} transport_reads={} conn_reads={} "
      "read_buffers_exhausted={} pool_buffers={} shared_misses={}",
      counters_.to_string(), ls.iterations, ls.completions, ls.early_submits,
      transport_buffers_->stats().reads, conn_buffers_->stats().reads,
      transport_buffers_->stats().exhausted + conn_buffers_->stats().exhausted, pool_.stats().allocated,
      conn_pool_.stats().shared_misses);
}

int Agent::run() {
  log::info("listening on {} ({}; {})", endpoint_.address().to_string(),
            transport_buffers_->uses_ring() ? "reads into provided-buffer rings"
                                            : "reads into per-read pool buffers",
            fmt::format("{} KiB buffers", config_.buffer_size / 1024));
  if (watcher_) {
    log::info("following guest ports: a NETLINK_SOCK_DIAG scan every {} ms ({} listener(s) now)",
              config_.ports.interval.count(), watcher_->current().size());
  }
  for (const ReverseListener& r : reverse_) {
    log::info("listening on {} for host target \"{}\"", r.config.guest_path, r.config.name);
  }
  int status = 0;
  while (true) {
    arm_waiting_ops();
    if (active_) active_->flush();
    for (auto& s : pending_) s->flush();
    for (auto& s : retiring_) s->flush();
    if (shutdown_step()) break;
    if (Status st = loop_->submit_and_wait(until_next_deadline()); !st) {
      log::error("{}", st.error().message);
      status = 1;
      break;
    }
    loop_->drain([this](const io_uring_cqe& cqe) { dispatch(cqe); });
    collect_sessions();
    compact_slow_readers();
  }
  log::info("counters: {}", counters_line());
  return status;
}

// How long the loop may sleep when nothing completes: until a session's batch of bulk bytes is due.
std::optional<std::chrono::nanoseconds> Agent::until_next_deadline() const {
  std::optional<std::chrono::steady_clock::time_point> earliest;
  const auto consider = [&](const std::unique_ptr<Session>& s) {
    const auto due = s->write_deadline();
    if (due && (!earliest || *due < *earliest)) earliest = due;
  };
  if (active_) consider(active_);
  for (const auto& s : retiring_) consider(s);
  if (!earliest) return std::nullopt;
  return *earliest - std::chrono::steady_clock::now();
}

// A slow guest socket's queued bytes pin the transport read blocks they arrived in, and with them other
// streams' bytes long since written. Once the pool holds more than this (beyond what the read rings keep),
// such bytes move into small blocks, at most every 100 ms, so memory follows what is actually queued.
constexpr size_t kCompactAboveBytes = 32 << 20;
constexpr auto kCompactEvery = std::chrono::milliseconds(100);

void Agent::compact_slow_readers() {
  if (pool_.stats().in_use * pool_.block_size() <= kCompactAboveBytes) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_compaction_ < kCompactEvery) return;
  last_compaction_ = now;
  size_t moved = active_ ? active_->compact_queues(compact_arena_) : 0;
  for (auto& s : retiring_) moved += s->compact_queues(compact_arena_);
  if (moved == 0) return;
  counters_.bytes_compacted += moved;
  log::debug("moved {} queued bytes of slow guest sockets out of shared read blocks ({} blocks in use)",
             moved, pool_.stats().in_use);
}

// ---------------------------------------------------------------------------------------------------------
// Completions

void Agent::dispatch(const io_uring_cqe& cqe) {
  const Tag tag = Tag::unpack(cqe.user_data);
  switch (tag.op) {
    case Op::kAccept: on_accept(cqe.res); return;
    case Op::kSignal: on_signal(cqe.res); return;
    case Op::kSerialProbe: on_serial_probe(cqe); return;
    case Op::kRetryTimer:
      if (tag.slot == 0) {
        retry_pending_ = false;
      } else if (tag.slot <= reverse_.size()) {
        reverse_[tag.slot - 1].retry_pending = false;
      }
      return;
    case Op::kPortTimer:
      port_timer_armed_ = false;
      if (cqe.res == -ETIME && !stopping_ &&
          (watcher_->may_have_changed() || std::chrono::steady_clock::now() - last_scan_ >= kFullScanEvery)) {
        scan_ports();
      }
      return;
    case Op::kReverseAccept: on_reverse_accept(tag.slot, cqe.res); return;
    case Op::kDrainTimer:
      // -ETIME: the timer fired; -ECANCELED: it was replaced.
      if (cqe.res == -ETIME) (tag.slot == kHardTimer ? hard_expired_ : drain_expired_) = true;
      return;
    case Op::kCancel:
      // ENOENT/EALREADY: the target finished first; its own completion reports the outcome.
      return;
    case Op::kTransportRead:
    case Op::kTransportWrite:
    case Op::kDial:
    case Op::kConnRead:
    case Op::kConnWrite:
    case Op::kConnShutdown:
      if (Session* s = session_for(tag.owner)) {
        s->on_completion(tag, cqe);
      } else {
        stray(tag, cqe);
      }
      return;
    case Op::kNone: return;
  }
}

Session* Agent::session_for(uint32_t owner) {
  if (active_ && active_->owner() == owner) return active_.get();
  for (auto& s : pending_) {
    if (s->owner() == owner) return s.get();
  }
  for (auto& s : retiring_) {
    if (s->owner() == owner) return s.get();
  }
  return nullptr;
}

// A completion for a session that is gone cannot happen (sessions wait for their operations), but if it
// did, a ring buffer it carries must still go back to its ring.
void Agent::stray(const Tag& tag, const io_uring_cqe& cqe) {
  log::debug("completion {} for unknown session {} (res {})", op_name(tag.op), tag.owner, cqe.res);
  Slice none;
  if (tag.op == Op::kTransportRead) (void)transport_buffers_->complete(cqe, none);
  if (tag.op == Op::kConnRead) (void)conn_buffers_->complete(cqe, none);
}

void Agent::on_accept(int res) {
  accepting_ = false;
  if (res < 0) {
    if (res == -ECANCELED || res == -EINTR || res == -ECONNABORTED) return;
    ++counters_.accept_errors;
    log::warn("accept on {}: {}", endpoint_.address().to_string(), std::strerror(-res));
    arm_retry(kAcceptRetry);
    return;
  }
  const int fd = res;
  const std::string peer = TransportEndpoint::describe_peer(peer_addr_, peer_len_, fd);
  if (stopping_) {
    ::close(fd);
    return;
  }
  if (Status st = endpoint_.check_peer(peer_addr_, peer_len_); !st) {
    ++counters_.peers_refused;
    log::warn("refusing {}: {}", peer, st.error().message);
    ::close(fd);
    return;
  }
  endpoint_.configure_accepted(fd);
  start_session(fd, peer, {});
}

void Agent::on_serial_probe(const io_uring_cqe& cqe) {
  probing_ = false;
  Slice bytes = transport_buffers_->complete(cqe, probe_hold_);
  if (stopping_) return;
  if (cqe.res > 0) {
    last_probe_error_ = 0;
    probe_saw_eof_ = false;
    start_session(endpoint_.fd(), endpoint_.address().to_string(), std::move(bytes));
    return;
  }
  // EOF: no host on the other end of the port. Look again shortly.
  const bool failed = cqe.res < 0 && cqe.res != -EAGAIN && cqe.res != -EINTR && cqe.res != -ENOBUFS;
  if (failed) {
    ++counters_.serial_errors;
    // The port is polled every 100 ms; say so once per kind of failure, not ten times a second.
    if (cqe.res != last_probe_error_) {
      log::warn("read {}: {}; retrying every {} ms", endpoint_.address().to_string(), std::strerror(-cqe.res),
                kSerialRetry.count());
    }
  }
  if (cqe.res == 0 && !probe_saw_eof_) {
    log::info("no host on {} yet; checking every {} ms", endpoint_.address().to_string(),
              kSerialRetry.count());
  }
  probe_saw_eof_ = cqe.res == 0;
  last_probe_error_ = failed ? cqe.res : 0;
  arm_retry(kSerialRetry);
}

void Agent::on_signal(int res) {
  signal_armed_ = false;
  if (res != static_cast<int>(sizeof(siginfo_))) return;
  if (stopping_) {
    log::info("second signal {}: closing now", strsignal(static_cast<int>(siginfo_.ssi_signo)));
    drain_expired_ = hard_expired_ = true;
    return;
  }
  log::info("{}: sending GOAWAY and draining streams for up to {} ms",
            strsignal(static_cast<int>(siginfo_.ssi_signo)), config_.drain_timeout.count());
  begin_drain();
}

// ---------------------------------------------------------------------------------------------------------
// Operations the agent keeps armed

void Agent::arm_waiting_ops() {
  if (!signal_armed_) arm_signal();
  if (stopping_) return;
  // Scans matter only to a host: none while it is away (it gets a snapshot when it comes back).
  if (watcher_ && !port_timer_armed_ && active_ && active_->host_ready()) arm_port_timer();
  for (uint32_t i = 0; i < reverse_.size(); ++i) {
    if (!reverse_[i].accepting && !reverse_[i].retry_pending) arm_reverse_accept(i);
  }
  if (retry_pending_) return;
  if (endpoint_.kind() == TransportKind::kListener) {
    if (!accepting_) arm_accept();
    return;
  }
  // Serial: the port belongs to one session at a time; probe only when the last one has fully let go.
  if (!probing_ && !active_ && retiring_.empty()) {
    if (!serial_carry_.empty()) {
      start_session(endpoint_.fd(), endpoint_.address().to_string(), std::move(serial_carry_));
      return;
    }
    arm_serial_probe();
  }
}

void Agent::arm_accept() {
  peer_len_ = sizeof(peer_addr_);
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kAccept, 0, 0});
  io_uring_prep_accept(sqe, endpoint_.fd(), reinterpret_cast<sockaddr*>(&peer_addr_), &peer_len_,
                       SOCK_CLOEXEC | SOCK_NONBLOCK);
  accepting_ = true;
}

void Agent::arm_serial_probe() {
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kSerialProbe, 0, 0});
  io_uring_prep_read(sqe, endpoint_.fd(), nullptr, 0, static_cast<uint64_t>(-1));
  transport_buffers_->attach(sqe, 0, probe_hold_);
  probing_ = true;
}

void Agent::arm_retry(std::chrono::milliseconds delay) {
  retry_ts_ = to_timespec(delay);
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kRetryTimer, 0, 0});
  io_uring_prep_timeout(sqe, &retry_ts_, 0, 0);
  retry_pending_ = true;
}

void Agent::arm_port_timer() {
  port_ts_ = to_timespec(config_.ports.interval);
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kPortTimer, 0, 0});
  io_uring_prep_timeout(sqe, &port_ts_, 0, 0);
  port_timer_armed_ = true;
}

void Agent::arm_reverse_accept(uint32_t index) {
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kReverseAccept, 0, index});
  io_uring_prep_accept(sqe, reverse_[index].endpoint.fd(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  reverse_[index].accepting = true;
}

void Agent::arm_signal() {
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kSignal, 0, 0});
  io_uring_prep_read(sqe, signal_fd_, &siginfo_, sizeof(siginfo_), 0);
  signal_armed_ = true;
}

void Agent::arm_timer(uint32_t which, std::chrono::milliseconds delay) {
  timer_ts_[which] = to_timespec(delay);
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kDrainTimer, 0, which});
  io_uring_prep_timeout(sqe, &timer_ts_[which], 0, 0);
}

// ---------------------------------------------------------------------------------------------------------
// Ports and reverse unix sockets

void Agent::scan_ports() {
  last_scan_ = std::chrono::steady_clock::now();
  ++counters_.port_scans;
  auto diff = watcher_->poll();
  if (!diff) {
    ++counters_.port_scan_errors;
    if (diff.error().errno_value != last_scan_error_) {
      log::warn("port scan failed: {}; retrying every {} ms", diff.error().to_string(),
                config_.ports.interval.count());
    }
    last_scan_error_ = diff.error().errno_value;
    return;
  }
  if (last_scan_error_ != 0) log::info("port scans work again");
  last_scan_error_ = 0;
  if (!diff->empty() && active_ && active_->host_ready())
    active_->send_ports(*diff, config_.ports.max_per_message);
}

void Agent::on_host_ready(Session& session) {
  // A listener connection becomes the active one only now that its HELLO (and token) checked out.
  const auto it = std::find_if(pending_.begin(), pending_.end(),
                               [&](const std::unique_ptr<Session>& s) { return s.get() == &session; });
  if (it != pending_.end()) {
    std::unique_ptr<Session> promoted = std::move(*it);
    pending_.erase(it);
    if (active_) retire_active("a new host connection replaces this one", log::Level::kWarn);
    active_ = std::move(promoted);
  }
  if (!watcher_) return;
  // The snapshot replaces whatever the host knew; a scan that fails now leaves the next one a snapshot.
  watcher_->reset();
  last_scan_ = std::chrono::steady_clock::now();
  ++counters_.port_scans;
  auto snapshot = watcher_->poll();
  if (!snapshot) {
    ++counters_.port_scan_errors;
    log::warn("port scan failed: {}", snapshot.error().to_string());
    return;
  }
  session.send_ports(*snapshot, config_.ports.max_per_message);
}

void Agent::on_file_events(const wire::FileEvents& batch) {
  if (!injector_) {
    log::debug("file events for share {} ignored: no --share configured",
               batch.share() ? batch.share()->str() : "");
    return;
  }
  // Synchronous: each event costs a few metadata syscalls on the mount, and batches are bounded by the host.
  injector_->apply(batch);
}

const std::set<PortEntry>* Agent::guest_listeners(bool rescan) {
  if (!watcher_) return nullptr;
  if (rescan) scan_ports();
  return &watcher_->current();
}

void Agent::on_reverse_accept(uint32_t index, int res) {
  ReverseListener& r = reverse_.at(index);
  r.accepting = false;
  if (res < 0) {
    if (res == -ECANCELED || res == -EINTR || res == -ECONNABORTED) return;
    ++counters_.accept_errors;
    log::warn("accept on {}: {}", r.config.guest_path, std::strerror(-res));
    r.retry_ts = to_timespec(kAcceptRetry);
    io_uring_sqe* sqe = loop_->sqe(Tag{Op::kRetryTimer, 0, index + 1});
    io_uring_prep_timeout(sqe, &r.retry_ts, 0, 0);
    r.retry_pending = true;
    return;
  }
  if (stopping_ || !active_ || !active_->host_ready()) {
    ++counters_.reverse_refused;
    log::warn("client of {} turned away: no host connected", r.config.guest_path);
    ::close(res);
    return;
  }
  active_->open_reverse(res, r.config.name, r.config.guest_path);
}

// ---------------------------------------------------------------------------------------------------------
// Sessions

uint32_t Agent::next_owner() {
  // Generations wrap after 16M connections; 0 is the agent's own.
  last_owner_ = (last_owner_ % Tag::kOwnerMask) + 1;
  return last_owner_;
}

void Agent::start_session(int fd, std::string peer, Slice first) {
  ++counters_.host_connections;
  const TransportKind kind = endpoint_.kind();
  // A listener connection is news only once its HELLO checked out (Session::on_ready says so).
  const log::Level level = kind == TransportKind::kSerial ? log::Level::kInfo : log::Level::kDebug;
  log::at(level, 0, "host connected: {}", peer);
  auto session = std::make_unique<Session>(*env_, next_owner(), fd, kind, std::move(peer));
  if (kind == TransportKind::kSerial) {
    // The port is served by one session at a time; this one starts only once the previous one let go.
    active_ = std::move(session);
    active_->start(std::move(first));
    return;
  }
  // A listener connection waits for its HELLO before it may replace the active one (on_host_ready).
  if (pending_.size() >= kMaxPending) {
    pending_.front()->close(
        fmt::format("{} newer connections are waiting for their HELLO; dropping this one", kMaxPending),
        log::Level::kWarn);
    retiring_.push_back(std::move(pending_.front()));
    pending_.erase(pending_.begin());
  }
  pending_.push_back(std::move(session));
  pending_.back()->start(std::move(first));
}

void Agent::retire_active(const std::string& why, log::Level level) {
  active_->close(why, level);
  retiring_.push_back(std::move(active_));
}

void Agent::collect_sessions() {
  // A session closes itself when its host goes away or breaks the protocol.
  if (active_ && active_->closing()) retiring_.push_back(std::move(active_));
  for (auto& s : pending_) {
    if (s->closing()) retiring_.push_back(std::move(s));
  }
  std::erase(pending_, nullptr);
  std::erase_if(retiring_, [this](const std::unique_ptr<Session>& s) {
    if (!s->finished()) return false;
    if (Slice rest = s->take_leftover(); !rest.empty()) serial_carry_ = std::move(rest);
    counters_.frames_in += s->mux().counters().frames_in;
    counters_.frames_out += s->mux().counters().frames_out;
    return true;
  });
}

// ---------------------------------------------------------------------------------------------------------
// Shutdown: GOAWAY, drain until idle or the deadline, close, wait for cancelled operations, exit.

void Agent::begin_drain() {
  stopping_ = true;
  if (accepting_) loop_->cancel(Tag{Op::kAccept, 0, 0});
  if (probing_) loop_->cancel(Tag{Op::kSerialProbe, 0, 0});
  if (retry_pending_) loop_->cancel(Tag{Op::kRetryTimer, 0, 0});
  if (port_timer_armed_) loop_->cancel(Tag{Op::kPortTimer, 0, 0});
  for (uint32_t i = 0; i < reverse_.size(); ++i) {
    if (reverse_[i].accepting) loop_->cancel(Tag{Op::kReverseAccept, 0, i});
    if (reverse_[i].retry_pending) loop_->cancel(Tag{Op::kRetryTimer, 0, i + 1});
  }
  if (active_) active_->goaway("guest agent is shutting down");
  for (auto& s : pending_) {
    s->close("guest agent is shutting down", log::Level::kInfo);
    retiring_.push_back(std::move(s));
  }
  pending_.clear();
  arm_timer(kDrainTimer, config_.drain_timeout);
}

bool Agent::shutdown_step() {
  if (!stopping_) return false;
  if (!closing_all_) {
    const bool idle = !active_ || active_->drained();
    if (!idle && !drain_expired_) return false;
    closing_all_ = true;
    if (active_) {
      retire_active(idle ? "guest agent is shutting down" : "guest agent is shutting down; drain timed out",
                    log::Level::kInfo);
    }
    if (!drain_expired_) loop_->cancel(Tag{Op::kDrainTimer, 0, kDrainTimer});
    arm_timer(kHardTimer, kHardDeadline);
  }
  const bool reverse_busy =
      std::any_of(reverse_.begin(), reverse_.end(), [](const ReverseListener& r) { return r.accepting; });
  if (retiring_.empty() && !probing_ && !accepting_ && !port_timer_armed_ && !reverse_busy) return true;
  if (hard_expired_) {
    log::warn("exiting with {} host connection(s) still cancelling operations", retiring_.size());
    return true;
  }
  return false;
}

}  // namespace vbridge::guest
