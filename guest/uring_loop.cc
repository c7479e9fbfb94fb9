#include "guest/uring_loop.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iterator>

namespace vbridge::guest {

const char* op_name(Op op) {
  switch (op) {
    case Op::kNone: return "none";
    case Op::kAccept: return "accept";
    case Op::kSignal: return "signal";
    case Op::kSerialProbe: return "serial-probe";
    case Op::kRetryTimer: return "retry-timer";
    case Op::kDrainTimer: return "drain-timer";
    case Op::kPortTimer: return "port-timer";
    case Op::kReverseAccept: return "reverse-accept";
    case Op::kCancel: return "cancel";
    case Op::kTransportRead: return "transport-read";
    case Op::kTransportWrite: return "transport-write";
    case Op::kDial: return "dial";
    case Op::kConnRead: return "conn-read";
    case Op::kConnWrite: return "conn-write";
    case Op::kConnShutdown: return "conn-shutdown";
  }
  return "?";
}

namespace {

// Setup flags worth having, newest first; each is dropped (with a note) when the kernel refuses it.
struct OptionalFlag {
  unsigned flags;
  const char* what;
};
constexpr OptionalFlag kOptionalFlags[] = {
    {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
     "SINGLE_ISSUER|DEFER_TASKRUN (Linux 6.1): completions run on every wakeup instead of once per batch"},
    {IORING_SETUP_COOP_TASKRUN, "COOP_TASKRUN (Linux 5.19): completions may interrupt the loop"},
    {IORING_SETUP_SUBMIT_ALL, "SUBMIT_ALL (Linux 5.18): a failing SQE stops the rest of its batch"},
};

struct RequiredOp {
  int opcode;
  const char* name;
};
constexpr RequiredOp kRequiredOps[] = {
    {IORING_OP_ACCEPT, "ACCEPT"},     {IORING_OP_CONNECT, "CONNECT"},
    {IORING_OP_RECV, "RECV"},         {IORING_OP_READ, "READ"},
    {IORING_OP_SENDMSG, "SENDMSG"},   {IORING_OP_WRITEV, "WRITEV"},
    {IORING_OP_TIMEOUT, "TIMEOUT"},   {IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL"},
    {IORING_OP_SHUTDOWN, "SHUTDOWN"}, {IORING_OP_POLL_ADD, "POLL_ADD"},
};

}  // namespace

Result<std::unique_ptr<UringLoop>> UringLoop::create(unsigned entries) {
  std::unique_ptr<UringLoop> loop(new UringLoop());
  unsigned wanted = 0;
  for (const auto& f : kOptionalFlags) wanted |= f.flags;
  int rc = -EINVAL;
  // Try with all optional flags, then drop them one at a time, oldest kernels last.
  for (size_t dropped = 0; dropped <= std::size(kOptionalFlags); ++dropped) {
    io_uring_params params{};
    params.flags = wanted | IORING_SETUP_CQSIZE;
    params.cq_entries = entries * 4;
    rc = io_uring_queue_init_params(entries, &loop->ring_, &params);
    if (rc == 0) break;
    if (rc != -EINVAL || dropped == std::size(kOptionalFlags)) break;
    wanted &= ~kOptionalFlags[dropped].flags;
    loop->notes_.push_back(fmt::format("io_uring: kernel lacks {}", kOptionalFlags[dropped].what));
  }
  if (rc != 0) {
    return Error{
        ErrorCode::kIo, -rc,
        fmt::format("io_uring_queue_init failed: {} (io_uring disabled by sysctl or seccomp, or kernel "
                    "older than 5.11)",
                    std::strerror(-rc))};
  }
  loop->alive_ = true;
  loop->probe_ = io_uring_get_probe_ring(&loop->ring_);
  for (const auto& op : kRequiredOps) {
    if (!loop->supports(op.opcode)) {
      return Error{
          ErrorCode::kIo, ENOSYS,
          fmt::format("io_uring lacks IORING_OP_{}; the guest agent needs Linux 5.11 or newer", op.name)};
    }
  }
  return loop;
}

UringLoop::~UringLoop() {
  exit();
  if (probe_ != nullptr) io_uring_free_probe(probe_);
}

void UringLoop::exit() {
  if (!alive_) return;
  io_uring_queue_exit(&ring_);
  alive_ = false;
}

bool UringLoop::supports(int opcode) const {
  // Without a probe (kernels before 5.6) nothing can be confirmed; the required ops then fail at use.
  return probe_ == nullptr || io_uring_opcode_supported(probe_, opcode);
}

io_uring_sqe* UringLoop::sqe(Tag tag) {
  io_uring_sqe* s = io_uring_get_sqe(&ring_);
  if (s == nullptr) {
    ++stats_.early_submits;
    io_uring_submit(&ring_);
    s = io_uring_get_sqe(&ring_);
  }
  // After a submit the queue has room again; a null here would mean the ring is broken beyond use.
  if (s == nullptr) std::abort();
  io_uring_prep_nop(s);
  io_uring_sqe_set_data64(s, tag.pack());
  return s;
}

void UringLoop::cancel(Tag target) {
  io_uring_sqe* s = sqe(Tag{Op::kCancel, target.owner, target.slot});
  io_uring_prep_cancel64(s, target.pack(), 0);
}

Status UringLoop::submit_and_wait(std::optional<std::chrono::nanoseconds> timeout) {
  ++stats_.iterations;
  while (true) {
    int rc = 0;
    if (timeout) {
      const auto ns = std::max<int64_t>(0, timeout->count());
      __kernel_timespec ts{ns / 1'000'000'000, ns % 1'000'000'000};
      io_uring_cqe* cqe = nullptr;
      rc = io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
      if (rc == -ETIME) return {};  // the deadline came first: the caller has work due
    } else {
      rc = io_uring_submit_and_wait(&ring_, 1);
    }
    if (rc >= 0) return {};
    if (rc == -EINTR) continue;
    // EBUSY/EAGAIN: the completion queue is full (overflow backlog); reaping completions makes room.
    if (rc == -EBUSY || rc == -EAGAIN) return {};
    return Error{ErrorCode::kIo, -rc, fmt::format("io_uring_submit_and_wait: {}", std::strerror(-rc))};
  }
}

}  // namespace vbridge::guest
