// UDP datagrams carried on a stream: each is a u32 little-endian length, then its bytes, so datagram
// boundaries survive a byte stream that may split or merge them.
#pragma once

#include <cstdint>
#include <functional>

#include "protocol/buffer.h"
#include "protocol/result.h"

namespace vbridge {

inline constexpr size_t kDatagramPrefix = 4;
inline constexpr size_t kMaxDatagram = 65535;

// Writes the length prefix into the 4 bytes before `payload_size` bytes of payload.
void encode_datagram_prefix(std::byte* prefix, uint32_t payload_size);

// Reassembles datagrams from stream bytes. A datagram that lies inside one Slice is handed out as a
// sub-Slice (no copy); one split across Slices is gathered into a pool buffer.
class DatagramAssembler {
 public:
  explicit DatagramAssembler(BufferPool& pool) : pool_(pool) {}
  // Calls on_datagram for each complete datagram; fails on a length above kMaxDatagram.
  Status feed(const Slice& bytes, const std::function<void(Slice)>& on_datagram);

 private:
  BufferPool& pool_;
  std::byte prefix_[kDatagramPrefix]{};
  size_t prefix_have_ = 0;
  size_t want_ = 0;  // payload bytes of the current datagram
  Slice partial_;    // gathered payload of a split datagram
  size_t partial_have_ = 0;
};

}  // namespace vbridge
