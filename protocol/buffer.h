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

class BufferPool;

// A fixed-capacity block; its bytes follow this header in the same allocation.
class Buffer {
 public:
  std::byte* data() { return reinterpret_cast<std::byte*>(this + 1); }
  const std::byte* data() const { return reinterpret_cast<const std::byte*>(this + 1); }
  size_t capacity() const { return capacity_; }
  uint32_t refs() const { return refs_; }

  // Recovers the Buffer that owns `data` (a pointer previously returned by data()).
  static Buffer* from_data(std::byte* data) { return reinterpret_cast<Buffer*>(data) - 1; }

  void ref() { ++refs_; }
  void unref() {
    assert(refs_ > 0);
    if (--refs_ == 0) release();
  }

 private:
  friend class BufferPool;
  Buffer(BufferPool* pool, uint32_t capacity) : pool_(pool), capacity_(capacity) {}
  void release();

  BufferPool* pool_;
  uint32_t capacity_;
  uint32_t refs_ = 0;
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
};

class BufferPool {
 public:
  // block_size: bytes per buffer. max_cached: how many free buffers are kept for reuse; more are freed.
  explicit BufferPool(size_t block_size = 256 * 1024, size_t max_cached = 64);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A Slice over a whole fresh buffer, exclusively owned by the caller until it shares it.
  Slice acquire();
  size_t block_size() const { return block_size_; }
  const PoolStats& stats() const { return stats_; }

 private:
  friend class Buffer;
  void release(Buffer* buffer);

  size_t block_size_;
  size_t max_cached_;
  std::vector<Buffer*> free_;
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
