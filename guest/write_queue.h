// Bytes on their way to one socket: Slices in arrival order, sent by one gather write at a time. The queue
// owns the Slices until a write covers them, so memory handed to the kernel stays alive until completion.
// Its size is bounded by the sender's credit window, not here.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <deque>
#include <span>

#include "protocol/buffer.h"

namespace vbridge::guest {

class WriteQueue {
 public:
  void push(Slice bytes);
  bool empty() const { return slices_.empty(); }
  size_t bytes() const { return bytes_; }
  size_t slices() const { return slices_.size(); }

  // Fills up to out.size() iovecs from the front of the queue; returns how many. They stay valid until
  // consume() covers them or the queue is destroyed.
  size_t fill(std::span<iovec> out) const;
  // `n` bytes from the front were written (a short write may end inside a Slice).
  void consume(size_t n);
  // Moves queued bytes out of shared read blocks (see compact_queue), leaving the first `skip` Slices (a
  // write in flight reads them); returns how many bytes moved.
  size_t compact(size_t skip, ReadArena& arena) { return compact_queue(slices_, skip, arena); }

 private:
  std::deque<Slice> slices_;
  size_t bytes_ = 0;
};

}  // namespace vbridge::guest
