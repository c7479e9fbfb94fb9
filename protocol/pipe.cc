#include "protocol/pipe.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace vbridge {

Result<std::shared_ptr<Pipe>> Pipe::create(size_t capacity) {
  int fds[2];
  if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) {
    const int err = errno;
    return Error{ErrorCode::kIo, err, fmt::format("pipe2 for a splice path: {}", std::strerror(err))};
  }
  // Without room for a useful batch the pipe is no better than a read buffer; a smaller size than asked
  // (pipe-max-size for unprivileged users) is still fine.
  int size = ::fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(capacity));
  if (size < 0) size = ::fcntl(fds[1], F_GETPIPE_SZ);
  if (size <= 0) size = 64 * 1024;
  return std::shared_ptr<Pipe>(new Pipe(fds[0], fds[1], static_cast<size_t>(size)));
}

Pipe::~Pipe() {
  ::close(read_fd_);
  ::close(write_fd_);
}

}  // namespace vbridge
