#include "protocol/shared_memory.h"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "protocol/frame.h"

namespace vbridge {
namespace {

constexpr char kMagic[8] = {'V', 'B', 'S', 'H', 'M', 'E', 'M', '1'};

// Page 0 of the region. Written by the host only.
struct Header {
  char magic[8];
  uint64_t size;
  uint32_t nonce;
  uint32_t reserved;
};

Error region_error(const std::string& path, const std::string& what, int err) {
  return Error{ErrorCode::kConfig, err,
               fmt::format("shared memory {}: {}{}{}", path, what, err != 0 ? ": " : "",
                           err != 0 ? std::strerror(err) : "")};
}

Result<std::byte*> map_fd(int fd, size_t size, const std::string& path) {
  void* mem = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mem == MAP_FAILED) return region_error(path, "mmap failed", errno);
  return static_cast<std::byte*>(mem);
}

}  // namespace

SharedMemory::SharedMemory(std::string path, std::byte* base, size_t size, bool host)
    : path_(std::move(path)), base_(base), size_(size) {
  const std::span<std::byte> host_half(base_ + kSharedHeaderSize, size_ / 2 - kSharedHeaderSize);
  const std::span<std::byte> guest_half(base_ + size_ / 2, size_ - size_ / 2);
  local_ = host ? host_half : guest_half;
  peer_ = host ? guest_half : host_half;
}

Result<std::unique_ptr<SharedMemory>> SharedMemory::create(const std::string& path, size_t size) {
  if (size < kMinSharedSize || size > kMaxSharedSize) {
    return region_error(path,
                        fmt::format("size {} is outside {} to {} bytes; pass another --shm-size", size,
                                    kMinSharedSize, kMaxSharedSize),
                        0);
  }
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0)
    return region_error(path, "cannot create it (check the directory exists and is writable)", errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) {
    const int err = errno;
    ::close(fd);
    return region_error(path, "is not a regular file of this user; remove it", err);
  }
  ::fchmod(fd, 0600);
  if (static_cast<size_t>(st.st_size) != size && ::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    ::close(fd);
    return region_error(path, "cannot size it", err);
  }
  auto base = map_fd(fd, size, path);
  ::close(fd);
  if (!base) return base.error();
  auto* header = reinterpret_cast<Header*>(*base);
  uint32_t nonce = 0;
  while (nonce == 0) {
    if (::getrandom(&nonce, sizeof nonce, 0) != sizeof nonce) return region_error(path, "getrandom", errno);
  }
  header->size = size;
  header->nonce = nonce;
  std::memcpy(header->magic, kMagic, sizeof kMagic);
  return std::unique_ptr<SharedMemory>(new SharedMemory(path, *base, size, /*host=*/true));
}

Result<std::unique_ptr<SharedMemory>> SharedMemory::attach(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) {
    // Started before the host agent (locally): make the file at the default size; the host writes the
    // header when it starts, and sharing begins with the first connection after that.
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd >= 0 && ::ftruncate(fd, static_cast<off_t>(kDefaultSharedSize)) != 0) {
      const int err = errno;
      ::close(fd);
      return region_error(path, "cannot size it", err);
    }
    if (fd < 0 && errno == EEXIST) fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  }
  if (fd < 0) return region_error(path, "cannot open it (check the path; the host agent creates it)", errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return region_error(path, "stat failed", err);
  }
  const auto size = static_cast<size_t>(st.st_size);
  if (size < kMinSharedSize || size > kMaxSharedSize) {
    ::close(fd);
    return region_error(
        path, fmt::format("is {} bytes; expected {} to {}", size, kMinSharedSize, kMaxSharedSize), 0);
  }
  auto base = map_fd(fd, size, path);
  ::close(fd);
  if (!base) return base.error();
  return std::unique_ptr<SharedMemory>(new SharedMemory(path, *base, size, /*host=*/false));
}

std::string SharedMemory::find_ivshmem_bar(const std::string& sysfs_root) {
  DIR* dir = ::opendir(sysfs_root.c_str());
  if (dir == nullptr) return {};
  std::string found;
  const auto read_id = [](const std::string& file) {
    std::ifstream in(file);
    std::string value;
    in >> value;
    return value;
  };
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    const std::string device = sysfs_root + "/" + entry->d_name;
    // Red Hat's vendor id with the inter-VM shared memory device id.
    if (read_id(device + "/vendor") == "0x1af4" && read_id(device + "/device") == "0x1110") {
      found = device + "/resource2";
      break;
    }
  }
  ::closedir(dir);
  return found;
}

SharedMemory::~SharedMemory() {
  for (Buffer* b : spare_headers_) delete b;
  ::munmap(base_, size_);
}

uint32_t SharedMemory::nonce() const {
  const auto* header = reinterpret_cast<const volatile Header*>(base_);
  if (std::memcmp(const_cast<const char*>(header->magic), kMagic, sizeof kMagic) != 0) return 0;
  if (header->size != size_) return 0;  // a region the host has since resized: not the same layout
  return header->nonce;
}

std::vector<std::byte*> SharedMemory::carve(size_t block_size) {
  std::vector<std::byte*> blocks;
  if (carved_ || block_size == 0) return blocks;
  carved_ = true;
  for (size_t at = 0; at + block_size <= local_.size(); at += block_size)
    blocks.push_back(local_.data() + at);
  return blocks;
}

int64_t SharedMemory::local_offset(const Slice& bytes) const {
  const std::byte* p = bytes.data();
  if (p < local_.data() || p + bytes.size() > local_.data() + local_.size()) return -1;
  return p - local_.data();
}

Slice SharedMemory::borrow(uint32_t generation, uint32_t loan, uint32_t offset, uint32_t length) {
  const uint64_t tag = uint64_t{generation} << 32 | loan;
  Buffer* b;
  if (spare_headers_.empty()) {
    b = new Buffer(this, peer_.data() + offset, length, tag);
  } else {
    b = spare_headers_.back();
    spare_headers_.pop_back();
    *b = Buffer(this, peer_.data() + offset, length, tag);
  }
  borrowed_now_ += length;
  return Slice(b, 0, length);
}

void SharedMemory::release(Buffer* buffer) {
  borrowed_now_ -= buffer->capacity();
  const bool was_empty = returned_.empty();
  returned_.push_back(buffer->tag());
  spare_headers_.push_back(buffer);
  if (was_empty && on_returned) on_returned();
}

void SharedMemory::take_returned(uint32_t generation, std::vector<uint32_t>& out) {
  for (const uint64_t tag : returned_) {
    if (tag >> 32 == generation) out.push_back(static_cast<uint32_t>(tag));
  }
  returned_.clear();
}

std::string shared_memory_note(const SharedMemory* local, const Hello& peer, bool active) {
  if (active) {
    return fmt::format("stream bytes travel by reference through shared memory {} ({} MiB)", local->path(),
                       local->size() >> 20);
  }
  if (local == nullptr) {
    return peer.shared_region != 0 ? "the peer agent maps shared memory but this one has none (--shm-file): "
                                     "stream bytes are copied through the transport"
                                   : "";
  }
  if (local->nonce() == 0) {
    return fmt::format(
        "shared memory {} is unused: no host agent has set it up (give vbridge-host the same "
        "--shm-file); stream bytes are copied through the transport",
        local->path());
  }
  if (peer.shared_region == 0) {
    return fmt::format(
        "shared memory {} is unused: the peer agent announced none (check its --shm-file and its log); "
        "stream bytes are copied through the transport",
        local->path());
  }
  return fmt::format(
      "shared memory {} is unused: the peer mapped another region (its nonce {:08x}, ours "
      "{:08x}); give both agents the same file, or restart the guest agent after the host's",
      local->path(), peer.shared_region, local->nonce());
}

}  // namespace vbridge
