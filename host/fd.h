// Owned file descriptors and syscall helpers: EINTR is retried, EAGAIN is a state the caller handles.
#pragma once

#include <cerrno>
#include <string>
#include <utility>

#include "protocol/result.h"

namespace vbridge {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(std::exchange(other.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// An Error of kind kIo for the current errno, prefixed with what failed.
Error errno_error(const std::string& what, int err = errno);

template <typename F>
auto retry_eintr(F&& call) {
  for (;;) {
    auto r = call();
    if (r >= 0 || errno != EINTR) return r;
  }
}

}  // namespace vbridge
