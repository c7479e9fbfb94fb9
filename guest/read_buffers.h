// Memory for reads, in one of two modes.
//
// Ring mode (Linux 5.19+): a provided-buffer ring whose slots each hold a pool Buffer. The kernel picks a
// buffer only when data arrives, so an idle socket with a read pending pins no memory. At completion the
// Slice in that slot is handed to the caller (it owns the buffer from then on) and the slot is refilled with
// a fresh pool buffer at once.
//
// Plain mode (fallback, and for comparison): each read takes its own pool buffer up front, kept alive by the
// caller's `hold` Slice until the completion.
//
// Either way the bytes are never copied: the Slice returned by complete() is the memory the kernel wrote.
#pragma once

#include <liburing.h>

#include <memory>
#include <vector>

#include "guest/uring_loop.h"
#include "protocol/buffer.h"
#include "protocol/result.h"

namespace vbridge::guest {

struct ReadBufferStats {
  uint64_t reads = 0;
  uint64_t refills = 0;    // ring slots refilled with a fresh pool buffer
  uint64_t exhausted = 0;  // completions with ENOBUFS: every ring slot was in use
};

class ReadBuffers {
 public:
  // A provided-buffer ring of `entries` (a power of two) pool buffers under buffer group `group`. Fails when
  // the kernel cannot register buffer rings; the caller then falls back to plain().
  static Result<std::unique_ptr<ReadBuffers>> ring(UringLoop& loop, BufferPool& pool, uint16_t group,
                                                   unsigned entries);
  static std::unique_ptr<ReadBuffers> plain(BufferPool& pool);
  ~ReadBuffers();
  ReadBuffers(const ReadBuffers&) = delete;
  ReadBuffers& operator=(const ReadBuffers&) = delete;

  bool uses_ring() const { return br_ != nullptr; }
  size_t block_size() const { return pool_.block_size(); }

  // Points a prepared READ/RECV SQE at memory for at most `max_len` bytes (0: a whole buffer). In plain mode
  // `hold` keeps the pool buffer alive until complete(); in ring mode it stays empty.
  void attach(io_uring_sqe* sqe, size_t max_len, Slice& hold);
  // The bytes a completed read returned, as a Slice owning its buffer; empty when res <= 0 (a ring buffer
  // the kernel picked but did not fill goes straight back to the ring).
  Slice complete(const io_uring_cqe& cqe, Slice& hold);
  const ReadBufferStats& stats() const { return stats_; }

 private:
  ReadBuffers(UringLoop* loop, BufferPool& pool) : loop_(loop), pool_(pool) {}
  void give_to_ring(uint16_t bid);

  UringLoop* loop_;
  BufferPool& pool_;
  io_uring_buf_ring* br_ = nullptr;
  size_t br_bytes_ = 0;
  uint16_t group_ = 0;
  unsigned mask_ = 0;
  std::vector<Slice> slots_;  // slot bid owns the buffer the ring entry `bid` points at
  ReadBufferStats stats_;
};

}  // namespace vbridge::guest
