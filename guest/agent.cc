#include "guest/agent.h"

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "protocol/log.h"

namespace vbridge::guest {
namespace {

constexpr uint16_t kTransportGroup = 0;
constexpr uint16_t kConnGroup = 1;
constexpr auto kSerialRetry = std::chrono::milliseconds(100);   // host away from the serial port
constexpr auto kAcceptRetry = std::chrono::milliseconds(100);   // accept failed (EMFILE and the like)
constexpr auto kHardDeadline = std::chrono::milliseconds(1000); // cancelled operations must be back by then
constexpr uint32_t kDrainTimer = 0;
constexpr uint32_t kHardTimer = 1;

__kernel_timespec to_timespec(std::chrono::milliseconds d) {
  __kernel_timespec ts{};
  ts.tv_sec = d.count() / 1000;
  ts.tv_nsec = (d.count() % 1000) * 1000000;
  return ts;
}

}  // namespace

Result<std::unique_ptr<Agent>> Agent::create(AgentConfig config) {
  auto targets = TargetPolicy::create(config.targets);
  if (!targets) return targets.error();
  auto loop = UringLoop::create();
  if (!loop) return loop.error();
  for (const auto& note : (*loop)->notes()) log::warn("{}", note);
  auto endpoint = TransportEndpoint::open(config.listen, config.serial_paths);
  if (!endpoint) return endpoint.error();
  std::unique_ptr<Agent> agent(
      new Agent(std::move(config), std::move(*targets), std::move(*loop), std::move(*endpoint)));
  if (Status st = agent->setup(); !st) return st.error();
  return agent;
}

Agent::Agent(AgentConfig config, TargetPolicy targets, std::unique_ptr<UringLoop> loop, TransportEndpoint endpoint)
    : config_(std::move(config)),
      targets_(std::move(targets)),
      // Free buffers kept for reuse beyond the ones the rings hold; more are returned to the allocator.
      pool_(config_.buffer_size, 64),
      loop_(std::move(loop)),
      endpoint_(std::move(endpoint)) {}

Status Agent::setup() {
  if (config_.buffer_rings) {
    auto transport = ReadBuffers::ring(*loop_, pool_, kTransportGroup, config_.transport_ring_entries);
    auto conn = transport ? ReadBuffers::ring(*loop_, pool_, kConnGroup, config_.conn_ring_entries) : transport.error();
    if (transport && conn) {
      transport_buffers_ = std::move(*transport);
      conn_buffers_ = std::move(*conn);
    } else {
      log::warn("{}; reading into per-read pool buffers", (transport ? conn : transport).error().message);
    }
  }
  if (!transport_buffers_) {
    transport_buffers_ = ReadBuffers::plain(pool_);
    conn_buffers_ = ReadBuffers::plain(pool_);
  }
  env_ = std::make_unique<SessionEnv>(
      SessionEnv{*loop_, *transport_buffers_, *conn_buffers_, targets_, counters_, config_.mux});

  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  if (sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) return Error{ErrorCode::kIo, errno, "sigprocmask failed"};
  signal_fd_ = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (signal_fd_ < 0) return Error{ErrorCode::kIo, errno, fmt::format("signalfd: {}", std::strerror(errno))};
  return {};
}

Agent::~Agent() {
  // The kernel lets go of every buffer, iovec and address first; then their owners may go.
  loop_->exit();
  active_.reset();
  retiring_.clear();
  probe_hold_.reset();
  transport_buffers_.reset();
  conn_buffers_.reset();
  if (signal_fd_ >= 0) ::close(signal_fd_);
}

std::string Agent::counters_line() const {
  const auto& ls = loop_->stats();
  return fmt::format("{} loop_iterations={} completions={} early_submits={} transport_reads={} conn_reads={} "
                     "read_buffers_exhausted={} pool_buffers={}",
                     counters_.to_string(), ls.iterations, ls.completions, ls.early_submits,
                     transport_buffers_->stats().reads, conn_buffers_->stats().reads,
                     transport_buffers_->stats().exhausted + conn_buffers_->stats().exhausted,
                     pool_.stats().allocated);
}

int Agent::run() {
  log::info("listening on {} ({}; {})", endpoint_.address().to_string(),
            transport_buffers_->uses_ring() ? "reads into provided-buffer rings" : "reads into per-read pool buffers",
            fmt::format("{} KiB buffers", config_.buffer_size / 1024));
  int status = 0;
  while (true) {
    arm_waiting_ops();
    if (active_) active_->flush();
    for (auto& s : retiring_) s->flush();
    if (shutdown_step()) break;
    if (Status st = loop_->submit_and_wait(); !st) {
      log::error("{}", st.error().message);
      status = 1;
      break;
    }
    loop_->drain([this](const io_uring_cqe& cqe) { dispatch(cqe); });
    collect_sessions();
  }
  log::info("counters: {}", counters_line());
  return status;
}

// ---------------------------------------------------------------------------------------------------------
// Completions

void Agent::dispatch(const io_uring_cqe& cqe) {
  const Tag tag = Tag::unpack(cqe.user_data);
  switch (tag.op) {
    case Op::kAccept: on_accept(cqe.res); return;
    case Op::kSignal: on_signal(cqe.res); return;
    case Op::kSerialProbe: on_serial_probe(cqe); return;
    case Op::kRetryTimer: retry_pending_ = false; return;
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
    log::info("no host on {} yet; checking every {} ms", endpoint_.address().to_string(), kSerialRetry.count());
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
  log::info("{}: sending GOAWAY and draining streams for up to {} ms", strsignal(static_cast<int>(siginfo_.ssi_signo)),
            config_.drain_timeout.count());
  begin_drain();
}

// ---------------------------------------------------------------------------------------------------------
// Operations the agent keeps armed

void Agent::arm_waiting_ops() {
  if (!signal_armed_) arm_signal();
  if (stopping_ || retry_pending_) return;
  if (endpoint_.kind() == TransportKind::kListener) {
    if (!accepting_) arm_accept();
    return;
  }
  // Serial: the port belongs to one session at a time; probe only when the last one has fully let go.
  if (!probing_ && !active_ && retiring_.empty()) arm_serial_probe();
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
// Sessions

uint32_t Agent::next_owner() {
  // Generations wrap after 16M connections; 0 is the agent's own.
  last_owner_ = (last_owner_ % Tag::kOwnerMask) + 1;
  return last_owner_;
}

void Agent::start_session(int fd, std::string peer, Slice first) {
  if (active_) retire_active("a new host connection replaces this one", log::Level::kWarn);
  ++counters_.host_connections;
  log::info("host connected: {}", peer);
  const TransportKind kind = endpoint_.kind();
  active_ = std::make_unique<Session>(*env_, next_owner(), fd, kind, std::move(peer));
  active_->start(std::move(first));
}

void Agent::retire_active(const std::string& why, log::Level level) {
  active_->close(why, level);
  retiring_.push_back(std::move(active_));
}

void Agent::collect_sessions() {
  // A session closes itself when its host goes away or breaks the protocol.
  if (active_ && active_->closing()) retiring_.push_back(std::move(active_));
  std::erase_if(retiring_, [this](const std::unique_ptr<Session>& s) {
    if (!s->finished()) return false;
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
  if (active_) active_->goaway("guest agent is shutting down");
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
  if (retiring_.empty() && !probing_ && !accepting_) return true;
  if (hard_expired_) {
    log::warn("exiting with {} host connection(s) still cancelling operations", retiring_.size());
    return true;
  }
  return false;
}

}  // namespace vbridge::guest
