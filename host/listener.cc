#include "host/listener.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "protocol/log.h"

namespace vbridge {
namespace {

Result<UniqueFd> listen_unix(const std::string& path) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof sa.sun_path) {
    return Error{ErrorCode::kConfig, 0, fmt::format("socket path {} is longer than 107 bytes", path)};
  }
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return errno_error("socket(AF_UNIX)");
  // Replace a stale socket left by a crashed agent, but never steal a live one.
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Error{ErrorCode::kConfig, 0,
                   fmt::format("{} exists and is not a socket; remove it or pick another path", path)};
    }
    // Nonblocking: a live listener with a full backlog answers EAGAIN instead of holding us here.
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (::connect(probe.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0 || errno == EAGAIN) {
      return Error{
          ErrorCode::kConfig, EADDRINUSE,
          fmt::format("{} is in use by another running process; stop it or pick another path", path)};
    }
    ::unlink(path.c_str());
  }
  const mode_t old_mask = ::umask(0177);  // the socket is born 0600: no window where others may connect
  const int rc = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  ::umask(old_mask);
  if (rc != 0) return errno_error(fmt::format("bind {}", path));
  if (::listen(fd.get(), 1024) != 0) return errno_error(fmt::format("listen {}", path));
  return fd;
}

Result<UniqueFd> listen_tcp(const std::string& host, uint32_t port) {
  sockaddr_storage ss{};
  socklen_t len = 0;
  int family = AF_INET;
  if (host.find(':') != std::string::npos) {
    auto* sa6 = reinterpret_cast<sockaddr_in6*>(&ss);
    sa6->sin6_family = AF_INET6;
    sa6->sin6_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET6, host.c_str(), &sa6->sin6_addr) != 1) {
      return Error{ErrorCode::kConfig, 0, fmt::format("bad IPv6 address {}", host)};
    }
    family = AF_INET6;
    len = sizeof *sa6;
  } else {
    auto* sa4 = reinterpret_cast<sockaddr_in*>(&ss);
    sa4->sin_family = AF_INET;
    sa4->sin_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host.c_str(), &sa4->sin_addr) != 1) {
      return Error{ErrorCode::kConfig, 0, fmt::format("bad IPv4 address {}", host)};
    }
    len = sizeof *sa4;
  }
  UniqueFd fd(::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return errno_error("socket(TCP)");
  const int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (family == AF_INET6) ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    return errno_error(fmt::format("bind tcp {}:{}", host, port));
  }
  if (::listen(fd.get(), 1024) != 0) return errno_error(fmt::format("listen tcp {}:{}", host, port));
  return fd;
}

}  // namespace

Result<std::unique_ptr<Listener>> Listener::listen(uv_loop_t* loop, const Address& address,
                                                   AcceptFn on_accept) {
  Result<UniqueFd> fd = Error{ErrorCode::kConfig, 0, "unsupported listen address " + address.to_string()};
  if (address.kind == Address::Kind::kUnix) fd = listen_unix(address.path);
  if (address.kind == Address::Kind::kTcp) fd = listen_tcp(address.path, address.port);
  if (!fd) return fd.error();
  return std::unique_ptr<Listener>(new Listener(loop, std::move(*fd), address, std::move(on_accept)));
}

Listener::Listener(uv_loop_t* loop, UniqueFd fd, Address address, AcceptFn on_accept)
    : address_(std::move(address)),
      on_accept_(std::move(on_accept)),
      poller_(loop, std::move(fd), [this](int, int) { accept_all(); }) {
  poller_.want(true, false);
}

Listener::~Listener() {
  if (address_.kind == Address::Kind::kUnix) ::unlink(address_.path.c_str());
}

void Listener::accept_all() {
  for (int i = 0; i < 64; ++i) {
    UniqueFd client(
        retry_eintr([&] { return ::accept4(poller_.fd(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC); }));
    if (!client.valid()) {
      if (errno != EAGAIN) log::warn("accept on {} failed: {}", address_.to_string(), std::strerror(errno));
      return;
    }
    if (address_.kind == Address::Kind::kUnix) {
      ucred cred{};
      socklen_t len = sizeof cred;
      if (::getsockopt(client.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
          (cred.uid != own_uid_ && cred.uid != 0)) {
        ++rejected_peers_;
        log::warn("refused a connection on {} from uid {} (only uid {} may connect)", address_.path, cred.uid,
                  own_uid_);
        continue;
      }
    } else {
      const int one = 1;
      ::setsockopt(client.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    on_accept_(std::move(client));
  }
}

}  // namespace vbridge
