// Whether a small exchange was seen lately: a read or write of a few KiB on a stream that is not a bulk
// transfer. While it is, each agent moves bulk copies off its event loop (host/bulk_reader.h, the guest's
// IOSQE_ASYNC writes), so the loop mostly sleeps and answers the small exchange at once; inline the copies
// cost less, so a bulk transfer alone keeps them there.
#pragma once

#include <chrono>
#include <cstddef>

namespace vbridge {

class InteractiveClock {
 public:
  void note(size_t bytes) {
    if (bytes < kSmall) until_ = std::chrono::steady_clock::now() + kHold;
  }
  bool active() const { return std::chrono::steady_clock::now() < until_; }

 private:
  static constexpr size_t kSmall = 16 * 1024;
  static constexpr auto kHold = std::chrono::milliseconds(100);
  std::chrono::steady_clock::time_point until_{};
};

}  // namespace vbridge
