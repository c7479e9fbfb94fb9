#include "protocol/datagram.h"

#include <fmt/format.h>

#include <cstring>

#include "protocol/frame.h"

namespace vbridge {

void encode_datagram_prefix(std::byte* prefix, uint32_t payload_size) { store_u32(prefix, payload_size); }

Status DatagramAssembler::feed(const Slice& bytes, const std::function<void(Slice)>& on_datagram) {
  size_t pos = 0;
  const size_t n = bytes.size();
  while (pos < n) {
    if (prefix_have_ < kDatagramPrefix) {
      const size_t take = std::min(kDatagramPrefix - prefix_have_, n - pos);
      std::memcpy(prefix_ + prefix_have_, bytes.data() + pos, take);
      prefix_have_ += take;
      pos += take;
      if (prefix_have_ < kDatagramPrefix) break;
      want_ = load_u32(prefix_);
      if (want_ > kMaxDatagram) {
        return Error{ErrorCode::kProtocol, 0,
                     fmt::format("datagram of {} bytes exceeds {}", want_, kMaxDatagram)};
      }
      partial_have_ = 0;
      if (want_ == 0) {
        prefix_have_ = 0;
        on_datagram(Slice());
        continue;
      }
    }
    const size_t avail = n - pos;
    if (partial_have_ == 0 && avail >= want_) {
      on_datagram(bytes.sub(pos, want_));  // whole datagram inside this Slice: no copy
      pos += want_;
      prefix_have_ = 0;
      continue;
    }
    if (partial_have_ == 0) partial_ = pool_.acquire();
    const size_t take = std::min(want_ - partial_have_, avail);
    std::memcpy(partial_.data() + partial_have_, bytes.data() + pos, take);
    partial_have_ += take;
    pos += take;
    if (partial_have_ == want_) {
      on_datagram(partial_.sub(0, want_));
      partial_.reset();
      partial_have_ = 0;
      prefix_have_ = 0;
    }
  }
  return {};
}

}  // namespace vbridge
