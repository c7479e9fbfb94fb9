#include "guest/read_buffers.h"

#include <fmt/format.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>

namespace vbridge::guest {

Result<std::unique_ptr<ReadBuffers>> ReadBuffers::ring(UringLoop& loop, BufferPool& pool, uint16_t group,
                                                       unsigned entries) {
  if (entries == 0 || (entries & (entries - 1)) != 0 || entries > 32768) {
    return Error{ErrorCode::kConfig, EINVAL,
                 fmt::format("buffer ring size {} is not a power of two", entries)};
  }
  std::unique_ptr<ReadBuffers> rb(new ReadBuffers(&loop, pool));
  // The ring itself must be page-aligned memory shared with the kernel.
  rb->br_bytes_ = entries * sizeof(io_uring_buf);
  void* mem = mmap(nullptr, rb->br_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return Error{ErrorCode::kIo, errno, "mmap of the buffer ring failed"};
  rb->br_ = static_cast<io_uring_buf_ring*>(mem);
  io_uring_buf_reg reg{};
  reg.ring_addr = reinterpret_cast<uintptr_t>(mem);
  reg.ring_entries = entries;
  reg.bgid = group;
  const int rc = io_uring_register_buf_ring(loop.ring(), &reg, 0);
  if (rc != 0) {
    munmap(mem, rb->br_bytes_);
    rb->br_ = nullptr;
    return Error{
        ErrorCode::kIo, -rc,
        fmt::format("io_uring provided-buffer rings unavailable ({}; needs Linux 5.19)", std::strerror(-rc))};
  }
  rb->group_ = group;
  rb->mask_ = entries - 1;
  io_uring_buf_ring_init(rb->br_);
  rb->slots_.resize(entries);
  for (unsigned bid = 0; bid < entries; ++bid) rb->give_to_ring(static_cast<uint16_t>(bid));
  return rb;
}

std::unique_ptr<ReadBuffers> ReadBuffers::plain(BufferPool& pool) {
  return std::unique_ptr<ReadBuffers>(new ReadBuffers(nullptr, pool));
}

ReadBuffers::~ReadBuffers() {
  if (br_ == nullptr) return;
  // While the ring lives the kernel may still write into the slots: unregister first. After
  // UringLoop::exit() the kernel has already let go of everything.
  if (loop_->alive()) io_uring_unregister_buf_ring(loop_->ring(), group_);
  munmap(br_, br_bytes_);
  slots_.clear();
}

void ReadBuffers::give_to_ring(uint16_t bid) {
  if (slots_[bid].empty()) {
    slots_[bid] = pool_.acquire();
    ++stats_.refills;
  }
  io_uring_buf_ring_add(br_, slots_[bid].data(), static_cast<unsigned>(slots_[bid].size()), bid,
                        static_cast<int>(mask_), 0);
  io_uring_buf_ring_advance(br_, 1);
}

void ReadBuffers::attach(io_uring_sqe* sqe, size_t max_len, Slice& hold) {
  const size_t len = max_len == 0 ? pool_.block_size() : std::min(max_len, pool_.block_size());
  ++stats_.reads;
  if (br_ != nullptr) {
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = group_;
    sqe->addr = 0;
    // A multishot RECV must carry len 0 (each completion then fills up to one whole buffer).
    sqe->len = max_len == 0 ? 0 : static_cast<uint32_t>(len);
    return;
  }
  hold = pool_.acquire();
  sqe->addr = reinterpret_cast<uintptr_t>(hold.data());
  sqe->len = static_cast<uint32_t>(len);
}

Slice ReadBuffers::complete(const io_uring_cqe& cqe, Slice& hold) {
  if (cqe.res == -ENOBUFS) ++stats_.exhausted;
  if (br_ == nullptr || (cqe.flags & IORING_CQE_F_BUFFER) == 0) {
    Slice taken = std::move(hold);
    if (cqe.res <= 0) return {};
    return taken.sub(0, static_cast<size_t>(cqe.res));
  }
  const auto bid = static_cast<uint16_t>(cqe.flags >> IORING_CQE_BUFFER_SHIFT);
  if (cqe.res <= 0) {
    give_to_ring(bid);  // the same buffer goes back unused
    return {};
  }
  Slice taken = std::move(slots_[bid]);
  give_to_ring(bid);
  return taken.sub(0, static_cast<size_t>(cqe.res));
}

}  // namespace vbridge::guest
