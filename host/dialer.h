// Connects to the guest agent's transport: unix, TCP, AF_VSOCK, or hybrid vsock (a VMM's unix socket that
// takes "CONNECT <port>\n" and answers "OK <port>\n").
#pragma once

#include "host/fd.h"
#include "protocol/address.h"

namespace vbridge {

// Dials `address`, waiting at most `timeout_ms`. The returned descriptor is nonblocking.
Result<UniqueFd> dial_transport(const Address& address, int timeout_ms);

}  // namespace vbridge
