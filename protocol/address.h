// Transport and forward addresses as users write them on the command line and in config files.
//
//   unix:/path            a unix stream socket
//   tcp:HOST:PORT         TCP; HOST may be [v6]
//   vsock:CID:PORT        AF_VSOCK (host dials CID:PORT; a guest listens on vsock::PORT or vsock:PORT)
//   hvsock:/path:PORT     hybrid vsock (Firecracker, cloud-hypervisor): dial the unix socket, then
//                         "CONNECT PORT\n" and expect "OK …\n"
//   serial:NAME|/dev/…    a virtio-serial port inside the guest (by port name or device path)
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "protocol/result.h"

namespace vbridge {

struct Address {
  enum class Kind : uint8_t { kUnix, kTcp, kVsock, kHybridVsock, kSerial };
  Kind kind = Kind::kUnix;
  std::string path;   // unix, hvsock: socket path; serial: port name or device path; tcp: host
  uint32_t port = 0;  // tcp, vsock, hvsock
  uint32_t cid = 0;   // vsock (0 when a guest listens on any)

  std::string to_string() const;
};

Result<Address> parse_address(std::string_view text);

}  // namespace vbridge
