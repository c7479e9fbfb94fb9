#include "guest/transport_linux.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/vm_sockets.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "protocol/log.h"

namespace vbridge::guest {
namespace {

Error io_error(int err, std::string what) {
  return Error{ErrorCode::kIo, err, fmt::format("{}: {}", what, std::strerror(err))};
}

// Owns an fd until released, so every early return closes it.
class FdGuard {
 public:
  explicit FdGuard(int fd) : fd_(fd) {}
  ~FdGuard() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

// Whether the process that put the listener at the other end of `connected` into listen() has exited. A
// killed agent's listener outlives it for a few milliseconds: the kernel tears an exited process's io_uring
// down in the background, and an accept still pending there keeps the socket open and accepting.
bool listener_process_gone(int connected) {
  ucred peer{};
  socklen_t len = sizeof peer;
  if (getsockopt(connected, SOL_SOCKET, SO_PEERCRED, &peer, &len) != 0 || peer.pid <= 0) return false;
  if (kill(peer.pid, 0) != 0) return errno == ESRCH;
  // Exited but not yet reaped: a zombie accepts nothing either.
  std::ifstream stat(fmt::format("/proc/{}/stat", peer.pid));
  std::string line;
  if (!std::getline(stat, line)) return false;
  const size_t end = line.rfind(')');
  return end != std::string::npos && end + 2 < line.size() && (line[end + 2] == 'Z' || line[end + 2] == 'X');
}

// A unix socket file left by an earlier run is replaced; one with a live listener is not stolen.
Status clear_stale_unix_socket(const std::string& path) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) return {};
  if (!S_ISSOCK(st.st_mode)) {
    return Error{ErrorCode::kConfig, EEXIST, fmt::format("unix:{} exists and is not a socket", path)};
  }
  FdGuard probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::memcpy(sun.sun_path, path.data(), path.size());
  const bool answered = connect(probe.get(), reinterpret_cast<sockaddr*>(&sun), sizeof(sun)) == 0;
  const int connect_errno = errno;
  const bool orphaned = answered && listener_process_gone(probe.get());
  if ((answered && !orphaned) || (!answered && connect_errno == EAGAIN)) {
    return Error{ErrorCode::kConfig, EADDRINUSE,
                 fmt::format("another process is listening on unix:{}", path)};
  }
  if (orphaned)
    log::info("unix:{}: its listener belongs to a process that has exited; taking the path over", path);
  if (unlink(path.c_str()) != 0 && errno != ENOENT) return io_error(errno, "unlink " + path);
  return {};
}

Result<int> listen_unix(const std::string& path) {
  if (Status st = clear_stale_unix_socket(path); !st) return st.error();
  FdGuard fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return io_error(errno, "socket(AF_UNIX)");
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::memcpy(sun.sun_path, path.data(), path.size());
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&sun), sizeof(sun)) != 0)
    return io_error(errno, "bind unix:" + path);
  if (listen(fd.get(), SOMAXCONN) != 0) return io_error(errno, "listen unix:" + path);
  return fd.release();
}

Result<int> listen_tcp(Address& address) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(address.port);
  if (const int rc = getaddrinfo(address.path.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return Error{ErrorCode::kConfig, EINVAL, fmt::format("{}: {}", address.to_string(), gai_strerror(rc))};
  }
  int last_errno = EADDRNOTAVAIL;
  int result = -1;
  for (addrinfo* ai = found; ai != nullptr && result < 0; ai = ai->ai_next) {
    FdGuard fd(socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) {
      last_errno = errno;
      continue;
    }
    const int one = 1;
    setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd.get(), SOMAXCONN) != 0) {
      last_errno = errno;
      continue;
    }
    sockaddr_storage bound{};
    socklen_t len = sizeof(bound);
    if (getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
      address.port = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                                       : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    }
    result = fd.release();
  }
  freeaddrinfo(found);
  if (result < 0) return io_error(last_errno, "listen " + address.to_string());
  return result;
}

Result<int> listen_vsock(const Address& address) {
  FdGuard fd(socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return io_error(errno, "socket(AF_VSOCK) (is the vsock transport module loaded?)");
  sockaddr_vm svm{};
  svm.svm_family = AF_VSOCK;
  svm.svm_cid = address.cid == 0 ? VMADDR_CID_ANY : address.cid;
  svm.svm_port = address.port;
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&svm), sizeof(svm)) != 0) {
    return io_error(errno, "bind " + address.to_string());
  }
  if (listen(fd.get(), SOMAXCONN) != 0) return io_error(errno, "listen " + address.to_string());
  return fd.release();
}

Result<int> open_serial(const Address& address, const SerialPaths& paths) {
  auto device = find_serial_port(address.path, paths);
  if (!device) return device.error();
  // Nonblocking, so io_uring waits for readiness by polling instead of parking a worker thread in read().
  const int fd = ::open(device->c_str(), O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return io_error(errno, "open " + *device);
  return fd;
}

}  // namespace

Result<std::string> find_serial_port(std::string_view name, const SerialPaths& paths) {
  namespace fs = std::filesystem;
  if (name.empty()) return Error{ErrorCode::kConfig, EINVAL, "serial: empty port name"};
  if (name.front() == '/') return std::string(name);
  std::error_code ec;
  const fs::path link = fs::path(paths.dev) / "virtio-ports" / std::string(name);
  if (fs::exists(link, ec)) return link.string();
  // No udev: each port directory holds a `name` file with the name given on the QEMU command line.
  for (const auto& entry : fs::directory_iterator(paths.sys_class, ec)) {
    std::ifstream in(entry.path() / "name");
    std::string port_name;
    if (in && std::getline(in, port_name) && port_name == name) {
      return (fs::path(paths.dev) / entry.path().filename()).string();
    }
  }
  return Error{ErrorCode::kConfig, ENOENT,
               fmt::format("serial:{}: no virtio-serial port with that name ({} and {}/*/name have none)",
                           name, link.string(), paths.sys_class)};
}

Result<TransportEndpoint> TransportEndpoint::open(const Address& address, const SerialPaths& paths) {
  Address bound = address;
  Result<int> fd = Error{ErrorCode::kConfig, EINVAL, ""};
  TransportKind kind = TransportKind::kListener;
  switch (address.kind) {
    case Address::Kind::kUnix: fd = listen_unix(address.path); break;
    case Address::Kind::kTcp: fd = listen_tcp(bound); break;
    case Address::Kind::kVsock: fd = listen_vsock(address); break;
    case Address::Kind::kSerial:
      kind = TransportKind::kSerial;
      fd = open_serial(address, paths);
      break;
    case Address::Kind::kHybridVsock:
      return Error{
          ErrorCode::kConfig, EINVAL,
          fmt::format("{}: hybrid vsock is dialed by the host; inside the guest listen on vsock:PORT",
                      address.to_string())};
  }
  if (!fd) return fd.error();
  TransportEndpoint endpoint(kind, *fd, bound);
  if (address.kind == Address::Kind::kUnix) endpoint.unlink_path_ = address.path;
  return endpoint;
}

TransportEndpoint::TransportEndpoint(TransportEndpoint&& other) noexcept
    : kind_(other.kind_),
      fd_(std::exchange(other.fd_, -1)),
      address_(std::move(other.address_)),
      unlink_path_(std::move(other.unlink_path_)) {
  other.unlink_path_.clear();
}

TransportEndpoint::~TransportEndpoint() {
  if (fd_ >= 0) ::close(fd_);
  if (!unlink_path_.empty()) unlink(unlink_path_.c_str());
}

Status check_vsock_peer(const sockaddr_storage& peer, socklen_t length) {
  if (peer.ss_family != AF_VSOCK || length < sizeof(sockaddr_vm)) {
    return Error{ErrorCode::kRefused, EACCES, "vsock peer without a vsock address"};
  }
  const auto* svm = reinterpret_cast<const sockaddr_vm*>(&peer);
  if (svm->svm_cid != kHostCid) {
    return Error{ErrorCode::kRefused, EACCES,
                 fmt::format("vsock peer CID {} is not the host (CID {})", svm->svm_cid, kHostCid)};
  }
  return {};
}

Status TransportEndpoint::check_peer(const sockaddr_storage& peer, socklen_t length) const {
  if (address_.kind != Address::Kind::kVsock) return {};
  return check_vsock_peer(peer, length);
}

void TransportEndpoint::configure_accepted(int fd) const {
  if (address_.kind == Address::Kind::kTcp) {
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
}

std::string TransportEndpoint::describe_peer(const sockaddr_storage& peer, socklen_t length, int fd) {
  char text[INET6_ADDRSTRLEN] = {};
  switch (peer.ss_family) {
    case AF_INET: {
      const auto* sin = reinterpret_cast<const sockaddr_in*>(&peer);
      inet_ntop(AF_INET, &sin->sin_addr, text, sizeof(text));
      return fmt::format("{}:{}", text, ntohs(sin->sin_port));
    }
    case AF_INET6: {
      const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(&peer);
      inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof(text));
      return fmt::format("[{}]:{}", text, ntohs(sin6->sin6_port));
    }
    case AF_VSOCK: {
      const auto* svm = reinterpret_cast<const sockaddr_vm*>(&peer);
      return fmt::format("vsock cid {} port {}", svm->svm_cid, svm->svm_port);
    }
    case AF_UNIX: {
      ucred cred{};
      socklen_t len = sizeof(cred);
      if (fd >= 0 && getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
        return fmt::format("unix peer pid {} uid {}", cred.pid, cred.uid);
      }
      return "unix peer";
    }
    default: break;
  }
  (void)length;
  return "peer";
}

}  // namespace vbridge::guest
