// Memory both agents map: the host's read buffers in one half, the guest's in the other. A byte read from a
// socket into a block of one half is written out by the other agent from the same memory, so the transport
// carries a 12-byte DATA_REF instead of the bytes, and each relayed byte is copied twice instead of four
// times. Locally the region is a file both agents map (on tmpfs); under QEMU it is the same file behind an
// ivshmem PCI device, whose BAR the guest agent maps.
//
// Layout: page 0 holds the header (magic, size, a nonce the host draws at every start); the host's half is
// [4096, size/2), the guest's [size/2, size). Each side allocates only in its own half. Sharing is used on a
// connection only when both HELLOs announce it with the same nonce: the proof that both map the same bytes.
//
// Lending: the sender keeps a Slice of what it referenced until the receiver returns the loan (RELEASE),
// which the receiver does when its last Slice of those bytes is dropped, whatever became of the stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "protocol/buffer.h"
#include "protocol/result.h"

namespace vbridge {

inline constexpr size_t kSharedHeaderSize = 4096;
inline constexpr size_t kMinSharedSize = 1024 * 1024;
inline constexpr size_t kDefaultSharedSize = 128 * 1024 * 1024;
inline constexpr size_t kMaxSharedSize = 4ull * 1024 * 1024 * 1024;  // offsets are 32-bit

class SharedMemory final : public BufferOwner {
 public:
  // The host: creates `path` (mode 0600) or reuses it, sizes it to `size` bytes and writes a fresh nonce.
  static Result<std::unique_ptr<SharedMemory>> create(const std::string& path, size_t size);
  // The guest: maps a region the host made: the file itself, or an ivshmem BAR
  // (/sys/bus/pci/devices/.../resource2). A missing file is created at the default size for the host to use.
  static Result<std::unique_ptr<SharedMemory>> attach(const std::string& path);
  // Finds the first ivshmem PCI device's BAR 2 ("" when there is none).
  static std::string find_ivshmem_bar(const std::string& sysfs_root = "/sys/bus/pci/devices");
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  // The nonce the host wrote, read now: a restarted host writes a new one into the same file.
  uint32_t nonce() const;
  size_t size() const { return size_; }
  std::span<std::byte> local_half() const { return local_; }
  std::span<std::byte> peer_half() const { return peer_; }
  const std::string& path() const { return path_; }

  // Cuts the local half into blocks of `block_size` for one BufferPool (once).
  std::vector<std::byte*> carve(size_t block_size);
  // Where `bytes` start in the local half, or -1 when they are not (all) in it.
  int64_t local_offset(const Slice& bytes) const;

  // ---- the receiving side ----
  // Each connection gets its own generation, so a loan returned after its connection ended is dropped.
  uint32_t new_generation() { return ++generation_; }
  // A Slice of bytes [offset, offset + length) of the peer's half, lent as `loan`; checked by the caller.
  Slice borrow(uint32_t generation, uint32_t loan, uint32_t offset, uint32_t length);
  // Moves the loans of `generation` whose bytes are no longer used into `out`.
  void take_returned(uint32_t generation, std::vector<uint32_t>& out);
  bool has_returned() const { return !returned_.empty(); }
  // Called when a loan is returned and none was waiting: the agent then flushes its connection soon.
  std::function<void()> on_returned;
  uint64_t borrowed_now() const { return borrowed_now_; }

 private:
  SharedMemory(std::string path, std::byte* base, size_t size, bool host);
  void release(Buffer* buffer) override;

  std::string path_;
  std::byte* base_;
  size_t size_;
  std::span<std::byte> local_;
  std::span<std::byte> peer_;
  bool carved_ = false;
  uint32_t generation_ = 0;
  std::vector<uint64_t> returned_;      // generation << 32 | loan
  std::vector<Buffer*> spare_headers_;  // for borrowed buffers, so a loan does not allocate
  uint64_t borrowed_now_ = 0;
};

struct Hello;
// One log line on whether a new connection shares memory, and if not, why and what to do.
std::string shared_memory_note(const SharedMemory* local, const Hello& peer, bool active);

}  // namespace vbridge
