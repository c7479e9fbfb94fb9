#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "host/dialer.h"

namespace vbridge {
namespace {

Status wait_for(int fd, short events, int timeout_ms, const std::string& what) {
  pollfd p{fd, events, 0};
  const int rc = retry_eintr([&] { return ::poll(&p, 1, timeout_ms); });
  if (rc < 0) return errno_error(what);
  if (rc == 0) return Error{ErrorCode::kIo, ETIMEDOUT, what};
  return {};
}

Result<UniqueFd> connect_socket(int family, const sockaddr* sa, socklen_t len, int timeout_ms,
                                const std::string& what) {
  UniqueFd fd(::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return errno_error(what);
  if (::connect(fd.get(), sa, len) != 0) {
    if (errno != EINPROGRESS && errno != EAGAIN) return errno_error(what);
    if (Status st = wait_for(fd.get(), POLLOUT, timeout_ms, what); !st) return st.error();
    int err = 0;
    socklen_t elen = sizeof err;
    ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &elen);
    if (err != 0) return errno_error(what, err);
  }
  return fd;
}

Result<UniqueFd> dial_unix(const std::string& path, int timeout_ms) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof sa.sun_path) return Error{ErrorCode::kConfig, 0, "socket path too long: " + path};
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  return connect_socket(AF_UNIX, reinterpret_cast<sockaddr*>(&sa), sizeof sa, timeout_ms, "connect " + path);
}

Result<UniqueFd> dial_tcp(const std::string& host, uint32_t port, int timeout_ms) {
  const std::string what = fmt::format("connect tcp {}:{}", host, port);
  Result<UniqueFd> fd = Error{ErrorCode::kConfig, 0, "bad address " + host};
  if (host.find(':') != std::string::npos) {
    sockaddr_in6 sa{};
    sa.sin6_family = AF_INET6;
    sa.sin6_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET6, host.c_str(), &sa.sin6_addr) != 1) return fd;
    fd = connect_socket(AF_INET6, reinterpret_cast<sockaddr*>(&sa), sizeof sa, timeout_ms, what);
  } else {
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host.c_str(), &sa.sin_addr) != 1) return fd;
    fd = connect_socket(AF_INET, reinterpret_cast<sockaddr*>(&sa), sizeof sa, timeout_ms, what);
  }
  if (fd) {
    const int one = 1;
    ::setsockopt(fd->get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return fd;
}

Result<UniqueFd> dial_vsock(uint32_t cid, uint32_t port, int timeout_ms) {
  sockaddr_vm sa{};
  sa.svm_family = AF_VSOCK;
  sa.svm_cid = cid;
  sa.svm_port = port;
  return connect_socket(AF_VSOCK, reinterpret_cast<sockaddr*>(&sa), sizeof sa, timeout_ms,
                        fmt::format("connect vsock {}:{}", cid, port));
}

// Hybrid vsock: the VMM answers one text line before the byte stream starts. Read it byte by byte so no
// protocol bytes after the newline are consumed.
Result<UniqueFd> dial_hybrid_vsock(const std::string& path, uint32_t port, int timeout_ms) {
  auto fd = dial_unix(path, timeout_ms);
  if (!fd) return fd;
  const std::string request = fmt::format("CONNECT {}\n", port);
  if (retry_eintr([&] { return ::send(fd->get(), request.data(), request.size(), MSG_NOSIGNAL); }) !=
      static_cast<ssize_t>(request.size())) {
    return errno_error("hybrid vsock CONNECT to " + path);
  }
  std::string line;
  while (line.size() < 64) {
    char c;
    const ssize_t n = retry_eintr([&] { return ::read(fd->get(), &c, 1); });
    if (n == 1) {
      if (c == '\n') break;
      line += c;
      continue;
    }
    if (n == 0)
      return Error{ErrorCode::kIo, ECONNRESET, fmt::format("{} closed during CONNECT {}", path, port)};
    if (errno != EAGAIN) return errno_error("hybrid vsock read from " + path);
    if (Status st = wait_for(fd->get(), POLLIN, timeout_ms, "hybrid vsock answer from " + path); !st)
      return st.error();
  }
  if (line.rfind("OK", 0) != 0) {
    return Error{ErrorCode::kIo, ECONNREFUSED,
                 fmt::format("{} answered \"{}\" to CONNECT {}; is the guest agent listening on that port?",
                             path, line, port)};
  }
  return fd;
}

}  // namespace

Result<UniqueFd> dial_transport(const Address& address, int timeout_ms) {
  switch (address.kind) {
    case Address::Kind::kUnix: return dial_unix(address.path, timeout_ms);
    case Address::Kind::kTcp: return dial_tcp(address.path, address.port, timeout_ms);
    case Address::Kind::kVsock: return dial_vsock(address.cid, address.port, timeout_ms);
    case Address::Kind::kHybridVsock: return dial_hybrid_vsock(address.path, address.port, timeout_ms);
    case Address::Kind::kSerial: break;
  }
  return Error{ErrorCode::kConfig, 0,
               "serial: is a guest-side address; on the host, dial the VMM's chardev socket with unix:/path"};
}

}  // namespace vbridge
