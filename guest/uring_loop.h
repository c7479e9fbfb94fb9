// The guest agent's event loop: one io_uring, driven from one thread.
//
// Every submission carries a Tag in its user_data (as liburing's examples/proxy.c does), so a completion is
// routed by one switch over Op without a lookup table. SQEs are only queued while an iteration runs; the
// batch goes to the kernel in one io_uring_submit_and_wait at the end of the iteration.
#pragma once

#include <liburing.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "protocol/result.h"

namespace vbridge::guest {

enum class Op : uint8_t {
  kNone = 0,
  kAccept,          // agent: accept on the transport listener
  kSignal,          // agent: read from the signalfd
  kSerialProbe,     // agent: read on the serial port while no host is attached
  kRetryTimer,      // agent: pause before re-arming accept or the serial probe
  kDrainTimer,      // agent: deadline for streams to drain after SIGTERM
  kPortTimer,       // agent: the next port scan is due
  kReverseAccept,   // agent: accept on a --reverse-unix socket (slot: its index)
  kCancel,          // anyone: an ASYNC_CANCEL, whose own result does not matter
  kTransportRead,   // session: read from the host connection
  kTransportWrite,  // session: gather write to the host connection
  kDial,            // session: connect of a guest socket
  kConnRead,        // session: read from a guest socket (a UDP flow: poll for readability)
  kConnWrite,       // session: gather write to a guest socket
  kConnShutdown,    // session: shutdown(SHUT_WR) of a guest socket
};
const char* op_name(Op op);

// user_data layout: op (8 bits) | owner (24 bits: the session generation, 0 for the agent) | slot (32 bits: a
// guest connection's slot in its session).
struct Tag {
  Op op = Op::kNone;
  uint32_t owner = 0;
  uint32_t slot = 0;

  uint64_t pack() const { return uint64_t(op) << 56 | uint64_t(owner & kOwnerMask) << 32 | slot; }
  static Tag unpack(uint64_t v) {
    return Tag{static_cast<Op>(v >> 56), static_cast<uint32_t>(v >> 32) & kOwnerMask,
               static_cast<uint32_t>(v)};
  }
  bool operator==(const Tag&) const = default;

  static constexpr uint32_t kOwnerMask = (1u << 24) - 1;
};

struct LoopStats {
  uint64_t iterations = 0;
  uint64_t completions = 0;
  uint64_t early_submits = 0;  // the submission queue filled up inside one iteration
};

class UringLoop {
 public:
  // A ring with `entries` submission slots and four times as many completion slots. Setup flags the kernel
  // lacks are dropped one by one, each with a one-line note (see notes()).
  static Result<std::unique_ptr<UringLoop>> create(unsigned entries = 1024);
  ~UringLoop();
  UringLoop(const UringLoop&) = delete;
  UringLoop& operator=(const UringLoop&) = delete;

  // The ring, for buffer registration. Null after exit().
  io_uring* ring() { return alive_ ? &ring_ : nullptr; }
  bool alive() const { return alive_; }

  // A cleared SQE whose user_data is `tag`. Never null: when the submission queue is full, the SQEs queued
  // so far are submitted first (counted in stats().early_submits).
  io_uring_sqe* sqe(Tag tag);
  // Queues an ASYNC_CANCEL for the operation tagged `target`; its own completion comes back as Op::kCancel.
  void cancel(Tag target);
  // Submits the batch and waits for at least one completion, or until `timeout` passes when one is given.
  Status submit_and_wait(std::optional<std::chrono::nanoseconds> timeout = std::nullopt);
  // Calls handler(cqe) for every completion ready now. Completions are copied out of the ring first, so the
  // handler may queue new SQEs freely.
  template <typename Handler>
  size_t drain(Handler&& handler) {
    size_t total = 0;
    while (true) {
      const unsigned n = io_uring_peek_batch_cqe(&ring_, batch_ptrs_.data(), unsigned(batch_ptrs_.size()));
      if (n == 0) break;
      for (unsigned i = 0; i < n; ++i) batch_[i] = *batch_ptrs_[i];
      io_uring_cq_advance(&ring_, n);
      for (unsigned i = 0; i < n; ++i) {
        // A kernel without IORING_FEAT_EXT_ARG gets submit_and_wait's timeout as an SQE of liburing's own.
        if (batch_[i].user_data != LIBURING_UDATA_TIMEOUT) handler(batch_[i]);
      }
      total += n;
    }
    stats_.completions += total;
    return total;
  }
  // Tears the ring down: the kernel cancels every pending operation and lets go of all memory it was
  // given. Whoever owns that memory may free it afterwards. Idempotent.
  void exit();

  bool supports(int opcode) const;
  const std::vector<std::string>& notes() const { return notes_; }
  const LoopStats& stats() const { return stats_; }

 private:
  UringLoop() = default;

  io_uring ring_{};
  bool alive_ = false;
  io_uring_probe* probe_ = nullptr;
  std::vector<std::string> notes_;
  std::vector<io_uring_cqe*> batch_ptrs_ = std::vector<io_uring_cqe*>(256);
  std::vector<io_uring_cqe> batch_ = std::vector<io_uring_cqe>(256);
  LoopStats stats_;
};

}  // namespace vbridge::guest
