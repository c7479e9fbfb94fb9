// A kernel pipe that carries one stream's bytes from a socket to the transport with splice(2), so the agent
// never copies them: a socket's pages go into the pipe by reference and leave it the same way.
//
// Shared ownership: the bridge that fills the pipe and every queued mux frame that will drain it hold a
// reference, so the descriptors stay open until the last frame that names them has been written, even if
// the stream was reset in between. `filled` counts the bytes in the pipe; whoever moves bytes updates it.
#pragma once

#include <memory>

#include "protocol/result.h"

namespace vbridge {

// A read at least this large marks a bulk transfer; its stream then moves bytes through a pipe this big.
inline constexpr size_t kSpliceAfterRead = 64 * 1024;
inline constexpr size_t kPipeBytes = 1024 * 1024;

class Pipe {
 public:
  // A nonblocking, close-on-exec pipe of about `capacity` bytes (the kernel may round it).
  static Result<std::shared_ptr<Pipe>> create(size_t capacity);
  ~Pipe();
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;

  int read_fd() const { return read_fd_; }
  int write_fd() const { return write_fd_; }
  size_t capacity() const { return capacity_; }
  size_t room() const { return capacity_ > filled ? capacity_ - filled : 0; }

  size_t filled = 0;  // bytes spliced in and not yet spliced out

 private:
  Pipe(int read_fd, int write_fd, size_t capacity)
      : read_fd_(read_fd), write_fd_(write_fd), capacity_(capacity) {}

  int read_fd_;
  int write_fd_;
  size_t capacity_;
};

}  // namespace vbridge
