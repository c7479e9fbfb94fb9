// The guest end of the transport: where the agent waits for the host.
//
//   vsock:PORT          AF_VSOCK listener on VMADDR_CID_ANY; only the host (CID 2) is let in
//   serial:NAME|/dev/…  a virtio-serial port, found by name under /sys/class/virtio-ports/*/name when udev
//                       made no /dev/virtio-ports link. Opened once and held for the agent's whole life:
//                       while the host is away read() returns EOF and writes block, and closing the port
//                       would drop data the host already sent.
//   unix:/path          unix listener (tests; a stale socket file is replaced, a live one is an error)
//   tcp:HOST:PORT       TCP listener (tests, remote guests)
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "protocol/address.h"
#include "protocol/result.h"

namespace vbridge::guest {

enum class TransportKind : uint8_t {
  kListener,  // a listening socket: each host connection is accepted, and closed when it ends
  kSerial,    // a port device: one fd for the agent's life; a host "connection" spans data until EOF
};

inline constexpr uint32_t kHostCid = 2;  // VMADDR_CID_HOST

struct SerialPaths {
  std::string sys_class = "/sys/class/virtio-ports";
  std::string dev = "/dev";
};

// Over vsock only the host (CID 2) may connect; anything else is refused with a reason.
Status check_vsock_peer(const sockaddr_storage& peer, socklen_t length);

// Finds a virtio-serial port device: an absolute path is taken as is; a NAME is tried as
// <dev>/virtio-ports/NAME, then looked up under <sys_class>/*/name (giving <dev>/<vportXpY>).
Result<std::string> find_serial_port(std::string_view name, const SerialPaths& paths = {});

class TransportEndpoint {
 public:
  static Result<TransportEndpoint> open(const Address& address, const SerialPaths& paths = {});
  TransportEndpoint(TransportEndpoint&& other) noexcept;
  TransportEndpoint& operator=(TransportEndpoint&&) = delete;
  ~TransportEndpoint();

  TransportKind kind() const { return kind_; }
  int fd() const { return fd_; }
  // The address as bound (a tcp port 0 is replaced by the port the kernel chose).
  const Address& address() const { return address_; }

  // Whether an accepted peer may speak to the agent: over vsock only the host (CID 2) may.
  Status check_peer(const sockaddr_storage& peer, socklen_t length) const;
  // Per-connection socket options for an accepted host connection (TCP_NODELAY on TCP).
  void configure_accepted(int fd) const;
  static std::string describe_peer(const sockaddr_storage& peer, socklen_t length, int fd);

 private:
  TransportEndpoint(TransportKind kind, int fd, Address address)
      : kind_(kind), fd_(fd), address_(std::move(address)) {}

  TransportKind kind_;
  int fd_ = -1;
  Address address_;
  std::string unlink_path_;  // the unix socket file we created, removed on close
};

}  // namespace vbridge::guest
