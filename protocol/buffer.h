// Pooled, reference-counted byte buffers. Bytes read from a socket land in a Buffer and leave from the same
// memory: every consumer holds a Slice (a counted reference to a byte range), and the Buffer returns to its
// pool when the last Slice goes away. Single-threaded by design: each event loop owns its pool.
#pragma once

#include <cassert>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <vector>

namespace vbridge {

class Buffer;
class SharedMemory;

// Whoever a Buffer goes back to when its last reference is dropped.
class BufferOwner {
 public:
  virtual void release(Buffer* buffer) = 0;

 protected:
  ~BufferOwner() = default;
};

// A fixed-capacity block of bytes: on the heap right after this header, or in shared memory.
class Buffer {
 public:
  Buffer(BufferOwner* owner, std::byte* data, uint32_t capacity, uint64_t tag = 0)
      : owner_(owner), data_(data), capacity_(capacity), tag_(tag) {}

  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  size_t capacity() const { return capacity_; }
  uint32_t refs() const { return refs_; }
  // The owner's own mark (a shared-memory loan: which one it is).
  uint64_t tag() const { return tag_; }

  void ref() { ++refs_; }
  void unref() {
    assert(refs_ > 0);
    if (--refs_ == 0) owner_->release(this);
  }

 private:
  friend class BufferPool;
  BufferOwner* owner_;
  std::byte* data_;
  uint32_t capacity_;
  uint32_t refs_ = 0;
  uint64_t tag_;
};

// A counted reference to bytes [offset, offset+size) of a Buffer. Copying a Slice shares the bytes; it
// never copies them. An empty Slice holds no buffer.
class Slice {
 public:
  Slice() = default;
  Slice(Buffer* buffer, uint32_t offset, uint32_t size) : buffer_(buffer), offset_(offset), size_(size) {
    if (buffer_ != nullptr) buffer_->ref();
  }
  Slice(const Slice& other) : Slice(other.buffer_, other.offset_, other.size_) {}
  Slice(Slice&& other) noexcept : buffer_(other.buffer_), offset_(other.offset_), size_(other.size_) {
    other.buffer_ = nullptr;
    other.offset_ = other.size_ = 0;
  }
  Slice& operator=(const Slice& other);
  Slice& operator=(Slice&& other) noexcept {
    if (this != &other) {
      reset();
      buffer_ = other.buffer_;
      offset_ = other.offset_;
      size_ = other.size_;
      other.buffer_ = nullptr;
      other.offset_ = other.size_ = 0;
    }
    return *this;
  }
  ~Slice() { reset(); }

  std::byte* data() const { return buffer_ == nullptr ? nullptr : buffer_->data() + offset_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::span<const std::byte> bytes() const { return {data(), size_}; }
  Buffer* buffer() const { return buffer_; }

  // A Slice of bytes [offset, offset+size) of this one, sharing the same buffer.
  Slice sub(size_t offset, size_t size) const {
    assert(offset + size <= size_);
    return Slice(buffer_, offset_ + static_cast<uint32_t>(offset), static_cast<uint32_t>(size));
  }
  // Drops the first n bytes of this Slice.
  void advance(size_t n);
  void reset() {
    if (buffer_ != nullptr) buffer_->unref();
    buffer_ = nullptr;
    offset_ = size_ = 0;
  }

 private:
  Buffer* buffer_ = nullptr;
  uint32_t offset_ = 0;
  uint32_t size_ = 0;
};

struct PoolStats {
  uint64_t allocated = 0;  // buffers created over the pool's life
  uint64_t live = 0;       // buffers currently allocated (in use + cached)
  uint64_t in_use = 0;     // buffers with at least one reference
  uint64_t bytes_live = 0;
  uint64_t shared_in_use = 0;  // buffers in use whose bytes lie in shared memory
  uint64_t shared_misses = 0;  // acquisitions that found the shared blocks all taken, and used the heap
};

class BufferPool final : public BufferOwner {
 public:
  // block_size: bytes per buffer. max_cached: how many free buffers are kept for reuse; more are freed.
  // With `shared`, buffers come from this side's half of the shared memory while it has free blocks (the
  // peer reads their bytes in place), and from the heap after that.
  explicit BufferPool(size_t block_size = 256 * 1024, size_t max_cached = 64, SharedMemory* shared = nullptr);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A Slice over a whole fresh buffer, exclusively owned by the caller until it shares it.
  Slice acquire();
  size_t block_size() const { return block_size_; }
  const PoolStats& stats() const { return stats_; }

 private:
  void release(Buffer* buffer) override;

  size_t block_size_;
  size_t max_cached_;
  SharedMemory* shared_;
  std::vector<Buffer*> free_;
  std::vector<Buffer*> free_shared_;  // headers of shared blocks, with their block
  PoolStats stats_;
};

// Hands out the unused tail of a shared buffer for the next read, so a small read does not pin a whole
// block. Used by loops that issue one read at a time (libuv calls alloc then read then the read callback).
class ReadArena {
 public:
  explicit ReadArena(BufferPool& pool, size_t min_tail = 16 * 1024) : pool_(pool), min_tail_(min_tail) {}

  // Writable space for the next read; valid until commit() or the next writable().
  std::span<std::byte> writable();
  // The first n bytes of the last writable() span now hold data: returns them as a Slice.
  Slice commit(size_t n);
  size_t block_size() const { return pool_.block_size(); }

 private:
  BufferPool& pool_;
  size_t min_tail_;
  Slice current_;  // whole buffer; bytes before used_ belong to earlier slices
  size_t used_ = 0;
};

// Bytes that wait (a slow reader's queue) should not keep a whole shared read block alive: a 64 KiB frame
// can pin the 1 MiB block it arrived in, together with whatever else that block held. compact_queue copies
// every Slice that holds less than a quarter of a buffer larger than the arena's blocks into `arena` (small
// blocks, packed), from entry `skip` on (earlier entries may be in a write the kernel still reads). Slices
// already in small blocks stay. Returns the bytes copied.
size_t compact_queue(std::deque<Slice>& queue, size_t skip, ReadArena& arena);
inline bool pins_much_more_than_it_holds(const Slice& s, size_t small_block) {
  return s.buffer() != nullptr && s.buffer()->capacity() > small_block &&
         s.buffer()->capacity() >= 4 * s.size();
}

}  // namespace vbridge
