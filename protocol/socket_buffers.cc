#include "protocol/socket_buffers.h"

#include <sys/socket.h>

namespace vbridge {

void widen_unix_send_buffer(int fd) {
  const int bytes = kUnixSendBufferBytes;
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) == 0) return;
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

}  // namespace vbridge
