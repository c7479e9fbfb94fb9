#include "protocol/buffer.h"

#include <algorithm>
#include <cassert>
#include <cstdlib>
#include <cstring>
#include <new>

#include "protocol/shared_memory.h"

namespace vbridge {
namespace {
constexpr uint64_t kSharedTag = 1;  // a pool buffer whose block is in shared memory
}  // namespace

Slice& Slice::operator=(const Slice& other) {
  if (this != &other) {
    Slice copy(other);
    *this = std::move(copy);
  }
  return *this;
}

void Slice::advance(size_t n) {
  assert(n <= size_);
  offset_ += static_cast<uint32_t>(n);
  size_ -= static_cast<uint32_t>(n);
  if (size_ == 0) reset();
}

BufferPool::BufferPool(size_t block_size, size_t max_cached, SharedMemory* shared)
    : block_size_(block_size), max_cached_(max_cached), shared_(shared) {
  if (shared_ == nullptr) return;
  // Every block of the local half gets its header now; they are never freed, only reused.
  for (std::byte* block : shared_->carve(block_size_)) {
    free_shared_.push_back(new Buffer(this, block, static_cast<uint32_t>(block_size_), kSharedTag));
  }
}

BufferPool::~BufferPool() {
  // Buffers still referenced at this point are leaked on purpose rather than freed under their owners;
  // every owner is expected to be gone first.
  assert(stats_.in_use == 0);
  for (Buffer* b : free_) {
    b->~Buffer();
    std::free(b);
  }
  for (Buffer* b : free_shared_) delete b;
}

Slice BufferPool::acquire() {
  if (!free_shared_.empty()) {
    Buffer* b = free_shared_.back();
    free_shared_.pop_back();
    ++stats_.in_use;
    ++stats_.shared_in_use;
    return Slice(b, 0, static_cast<uint32_t>(block_size_));
  }
  if (shared_ != nullptr) ++stats_.shared_misses;
  Buffer* b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {
    void* mem = std::malloc(sizeof(Buffer) + block_size_);
    if (mem == nullptr) throw std::bad_alloc();
    b = new (mem)
        Buffer(this, static_cast<std::byte*>(mem) + sizeof(Buffer), static_cast<uint32_t>(block_size_));
    ++stats_.allocated;
    ++stats_.live;
    stats_.bytes_live += block_size_;
  }
  ++stats_.in_use;
  return Slice(b, 0, static_cast<uint32_t>(block_size_));
}

void BufferPool::release(Buffer* buffer) {
  --stats_.in_use;
  if (buffer->tag() == kSharedTag) {
    --stats_.shared_in_use;
    free_shared_.push_back(buffer);
    return;
  }
  if (free_.size() < max_cached_) {
    free_.push_back(buffer);
    return;
  }
  --stats_.live;
  stats_.bytes_live -= block_size_;
  buffer->~Buffer();
  std::free(buffer);
}

std::span<std::byte> ReadArena::writable() {
  if (current_.empty() || current_.size() - used_ < min_tail_) {
    current_ = pool_.acquire();
    used_ = 0;
  }
  return {current_.data() + used_, current_.size() - used_};
}

Slice ReadArena::commit(size_t n) {
  assert(used_ + n <= current_.size());
  Slice out = current_.sub(used_, n);
  used_ += n;
  return out;
}

size_t compact_queue(std::deque<Slice>& queue, size_t skip, ReadArena& arena) {
  bool any = false;
  for (size_t i = skip; i < queue.size() && !any; ++i) {
    any = pins_much_more_than_it_holds(queue[i], arena.block_size());
  }
  if (!any) return 0;
  size_t copied = 0;
  std::deque<Slice> out;
  for (size_t i = 0; i < queue.size(); ++i) {
    Slice& s = queue[i];
    if (i < skip || !pins_much_more_than_it_holds(s, arena.block_size())) {
      out.push_back(std::move(s));
      continue;
    }
    for (size_t done = 0; done < s.size();) {
      std::span<std::byte> space = arena.writable();
      const size_t n = std::min(space.size(), s.size() - done);
      std::memcpy(space.data(), s.data() + done, n);
      out.push_back(arena.commit(n));
      done += n;
    }
    copied += s.size();
  }
  queue.swap(out);
  return copied;
}

}  // namespace vbridge
