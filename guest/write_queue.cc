#include "guest/write_queue.h"

#include <algorithm>
#include <cassert>

namespace vbridge::guest {

void WriteQueue::push(Slice bytes) {
  if (bytes.empty()) return;
  bytes_ += bytes.size();
  slices_.push_back(std::move(bytes));
}

size_t WriteQueue::fill(std::span<iovec> out) const {
  const size_t n = std::min(out.size(), slices_.size());
  for (size_t i = 0; i < n; ++i) out[i] = iovec{slices_[i].data(), slices_[i].size()};
  return n;
}

void WriteQueue::consume(size_t n) {
  assert(n <= bytes_);
  bytes_ -= n;
  while (n > 0) {
    Slice& front = slices_.front();
    if (n < front.size()) {
      front.advance(n);
      return;
    }
    n -= front.size();
    slices_.pop_front();
  }
}

}  // namespace vbridge::guest
