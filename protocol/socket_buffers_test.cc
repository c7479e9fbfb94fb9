#include "protocol/socket_buffers.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

namespace vbridge {
namespace {

int send_buffer_of(int fd) {
  int bytes = 0;
  socklen_t len = sizeof bytes;
  EXPECT_EQ(::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, &len), 0);
  return bytes;
}

TEST(SocketBuffers, UnixSendBufferGrowsBeyondTheDefault) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  const int before = send_buffer_of(fds[0]);
  widen_send_buffer_if_unix(fds[0]);
  const int after = send_buffer_of(fds[0]);
  // The kernel doubles what it is asked for; without CAP_NET_ADMIN it asks for net.core.wmem_max at most,
  // which is never below the default.
  EXPECT_GT(after, before);
  EXPECT_LE(after, 2 * kUnixSendBufferBytes);
  EXPECT_EQ(send_buffer_of(fds[1]), before) << "only the socket asked for changes";
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST(SocketBuffers, TcpSocketsKeepTheKernelsSizing) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  const int before = send_buffer_of(fd);
  widen_send_buffer_if_unix(fd);
  EXPECT_EQ(send_buffer_of(fd), before);
  ::close(fd);
}

}  // namespace
}  // namespace vbridge
