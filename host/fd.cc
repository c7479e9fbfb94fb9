#include "host/fd.h"

#include <unistd.h>

namespace vbridge {

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Error errno_error(const std::string& what, int err) { return Error{ErrorCode::kIo, err, what}; }

}  // namespace vbridge
