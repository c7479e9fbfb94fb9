// Which OPEN targets the guest agent dials. The host asks for a target; the guest's own command line decides
// whether that target may be reached, so a compromised or confused host cannot reach arbitrary guest sockets.
//
//   path "docker"         → the configured Docker socket (--docker-socket, default /var/run/docker.sock)
//   path NAME             → a named forward (--forward NAME=/path)
//   path /absolute        → only when listed with --allow-unix, or the destination of a name above
//   tcp/udp PORT          → a port the port watcher reports a guest listener on (that is what following
//                           ports means), or any port with --allow-ports (static forwards of ports nothing
//                           listens on yet). The address dialled is Target.host when it is loopback or the
//                           address of such a listener, else the loopback of the family (empty host).
//   anything else         → refused with EACCES and a message naming the flag that would allow it
#pragma once

#include <sys/socket.h>

#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "guest/port_watcher_linux.h"
#include "protocol/control_generated.h"
#include "protocol/result.h"

namespace vbridge::guest {

inline constexpr const char* kDefaultDockerSocket = "/var/run/docker.sock";

struct TargetConfig {
  std::string docker_socket = kDefaultDockerSocket;
  std::map<std::string, std::string> forwards;  // name → absolute unix socket path
  std::set<std::string> allow_unix;
  bool allow_ports = false;  // any loopback port, whether or not a guest listener is known there
};

// Parses "NAME=/path" as given to --forward.
Result<std::pair<std::string, std::string>> parse_forward(std::string_view text);

struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;
  int family() const { return storage.ss_family; }
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

// Where to connect for one OPEN: candidate addresses, tried in order.
struct DialPlan {
  std::string description;  // "guest socket /var/run/docker.sock", "guest port 127.0.0.1:8080"
  std::vector<SocketAddress> addresses;
  int socket_type = SOCK_STREAM;  // SOCK_DGRAM for a UDP flow
};

class TargetPolicy {
 public:
  // Fails on a configuration that could never work (relative paths, names that look like paths).
  static Result<TargetPolicy> create(TargetConfig config);

  // The dial plan for a target, or an Error (code kRefused) whose errno_value and message go back to the
  // host in OPEN_FAIL. `listeners` are the guest's listening sockets as the port watcher last saw them
  // (null when ports are not watched); a TCP/UDP target must name one of their ports unless allow_ports.
  Result<DialPlan> resolve(const wire::TargetT& target, const std::set<PortEntry>* listeners = nullptr) const;
  // A short rendering of a requested target for logs: "docker", "/run/x.sock", "tcp:8080".
  static std::string describe(const wire::TargetT& target);

  const TargetConfig& config() const { return config_; }

 private:
  explicit TargetPolicy(TargetConfig config) : config_(std::move(config)) {}
  Result<DialPlan> resolve_unix(const std::string& path) const;
  Result<DialPlan> resolve_port(const wire::TargetT& target, const std::set<PortEntry>* listeners) const;
  bool is_configured_path(const std::string& path) const;

  TargetConfig config_;
};

}  // namespace vbridge::guest
