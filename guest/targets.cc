#include "guest/targets.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/un.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "protocol/frame.h"

namespace vbridge::guest {
namespace {

constexpr size_t kMaxUnixPath = sizeof(sockaddr_un::sun_path) - 1;

Error refused(int err, std::string message) { return Error{ErrorCode::kRefused, err, std::move(message)}; }

Error config_error(std::string message) { return Error{ErrorCode::kConfig, EINVAL, std::move(message)}; }

SocketAddress unix_address(const std::string& path) {
  SocketAddress a;
  auto* sun = reinterpret_cast<sockaddr_un*>(&a.storage);
  sun->sun_family = AF_UNIX;
  std::memcpy(sun->sun_path, path.data(), path.size());
  a.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  return a;
}

SocketAddress loopback4(uint16_t port) {
  SocketAddress a;
  auto* sin = reinterpret_cast<sockaddr_in*>(&a.storage);
  sin->sin_family = AF_INET;
  sin->sin_port = htons(port);
  sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.length = sizeof(sockaddr_in);
  return a;
}

SocketAddress loopback6(uint16_t port) {
  SocketAddress a;
  auto* sin6 = reinterpret_cast<sockaddr_in6*>(&a.storage);
  sin6->sin6_family = AF_INET6;
  sin6->sin6_port = htons(port);
  sin6->sin6_addr = in6addr_loopback;
  a.length = sizeof(sockaddr_in6);
  return a;
}

bool is_name(const std::string& path) { return !path.empty() && path.front() != '/'; }

// Parses a numeric IPv4 or IPv6 address; `canonical` is its inet_ntop form, as the port watcher reports it.
bool numeric_address(const std::string& host, uint16_t port, SocketAddress& out, std::string& canonical) {
  char text[INET6_ADDRSTRLEN] = {};
  auto* sin = reinterpret_cast<sockaddr_in*>(&out.storage);
  if (inet_pton(AF_INET, host.c_str(), &sin->sin_addr) == 1) {
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    out.length = sizeof(sockaddr_in);
    inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text);
    canonical = text;
    return true;
  }
  auto* sin6 = reinterpret_cast<sockaddr_in6*>(&out.storage);
  if (inet_pton(AF_INET6, host.c_str(), &sin6->sin6_addr) == 1) {
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(port);
    out.length = sizeof(sockaddr_in6);
    inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof text);
    canonical = text;
    return true;
  }
  return false;
}

bool is_loopback(const SocketAddress& a) {
  if (a.family() == AF_INET) {
    return (ntohl(reinterpret_cast<const sockaddr_in*>(&a.storage)->sin_addr.s_addr) >> 24) == 127;
  }
  const in6_addr& v6 = reinterpret_cast<const sockaddr_in6*>(&a.storage)->sin6_addr;
  return IN6_IS_ADDR_LOOPBACK(&v6) || (IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127);
}

}  // namespace

Result<std::pair<std::string, std::string>> parse_forward(std::string_view text) {
  const size_t eq = text.find('=');
  if (eq == std::string_view::npos || eq == 0 || eq + 1 == text.size()) {
    return config_error(fmt::format("--forward \"{}\": expected NAME=/path/to.sock", text));
  }
  return std::pair{std::string(text.substr(0, eq)), std::string(text.substr(eq + 1))};
}

Result<TargetPolicy> TargetPolicy::create(TargetConfig config) {
  const auto check_path = [](const std::string& flag, const std::string& path) -> Status {
    if (path.empty() || path.front() != '/') {
      return config_error(fmt::format("{} \"{}\": the socket path must be absolute", flag, path));
    }
    if (path.size() > kMaxUnixPath) {
      return config_error(
          fmt::format("{} \"{}\": unix socket paths are limited to {} bytes", flag, path, kMaxUnixPath));
    }
    return {};
  };
  if (Status st = check_path("--docker-socket", config.docker_socket); !st) return st.error();
  for (const auto& [name, path] : config.forwards) {
    if (!is_name(name) || name.find('=') != std::string::npos) {
      return config_error(fmt::format("--forward {}={}: a name must not start with '/'", name, path));
    }
    if (name == "docker") {
      return config_error("--forward docker=…: the name \"docker\" is taken; use --docker-socket");
    }
    if (Status st = check_path("--forward " + name, path); !st) return st.error();
  }
  for (const auto& path : config.allow_unix) {
    if (Status st = check_path("--allow-unix", path); !st) return st.error();
  }
  return TargetPolicy(std::move(config));
}

std::string TargetPolicy::describe(const wire::TargetT& target) {
  switch (target.proto) {
    case wire::Proto::Unix:
      return target.path.empty() ? std::string("(empty path)")
                                 : printable_prefix(std::as_bytes(std::span(target.path)), 64);
    case wire::Proto::Tcp:
      return target.host.empty() ? fmt::format("tcp:{}", target.port)
                                 : fmt::format("tcp:{}:{}", target.host, target.port);
    case wire::Proto::Udp:
      return target.host.empty() ? fmt::format("udp:{}", target.port)
                                 : fmt::format("udp:{}:{}", target.host, target.port);
  }
  return "?";
}

Result<DialPlan> TargetPolicy::resolve(const wire::TargetT& target,
                                       const std::set<PortEntry>* listeners) const {
  switch (target.proto) {
    case wire::Proto::Unix: return resolve_unix(target.path);
    case wire::Proto::Tcp:
    case wire::Proto::Udp: return resolve_port(target, listeners);
  }
  return refused(EPROTONOSUPPORT, fmt::format("target {}: unknown protocol {}", describe(target),
                                              static_cast<int>(target.proto)));
}

bool TargetPolicy::is_configured_path(const std::string& path) const {
  if (path == config_.docker_socket || config_.allow_unix.count(path) != 0) return true;
  for (const auto& [name, forward_path] : config_.forwards) {
    if (forward_path == path) return true;
  }
  return false;
}

Result<DialPlan> TargetPolicy::resolve_unix(const std::string& path) const {
  if (path.empty()) return refused(EINVAL, "OPEN names no target path");
  // Nothing configured is longer than a socket path or holds a NUL, and a hostile host's bytes are not
  // echoed back or logged whole.
  if (path.size() > kMaxUnixPath || path.find('\0') != std::string::npos) {
    return refused(EACCES, fmt::format("target \"{}\" ({} bytes) is neither a forward name nor a socket path "
                                       "the guest agent allows",
                                       printable_prefix(std::as_bytes(std::span(path)), 64), path.size()));
  }
  std::string resolved;
  if (is_name(path)) {
    if (path == "docker") {
      resolved = config_.docker_socket;
    } else if (const auto it = config_.forwards.find(path); it != config_.forwards.end()) {
      resolved = it->second;
    } else {
      return refused(EACCES, fmt::format("target \"{}\" is not a forward the guest agent knows; start "
                                         "vbridge-guest with --forward {}=/path/to.sock to define it",
                                         path, path));
    }
  } else {
    // Exact string match only: "/a/../b" is not "/b", so no path trick widens the allow-list.
    if (!is_configured_path(path)) {
      return refused(EACCES, fmt::format("target \"{}\" is not allowed; start vbridge-guest with "
                                         "--allow-unix {} to allow it",
                                         path, path));
    }
    if (path.size() > kMaxUnixPath)
      return refused(ENAMETOOLONG, fmt::format("guest socket {}: path too long", path));
    resolved = path;
  }
  return DialPlan{"guest socket " + resolved, {unix_address(resolved)}};
}

Result<DialPlan> TargetPolicy::resolve_port(const wire::TargetT& target,
                                            const std::set<PortEntry>* listeners) const {
  const std::string what = describe(target);
  if (target.port == 0) return refused(EINVAL, fmt::format("target {}: port 0", what));
  const bool udp = target.proto == wire::Proto::Udp;
  std::vector<const PortEntry*> listening;  // guest listeners of this protocol and port
  if (listeners != nullptr) {
    for (const PortEntry& e : *listeners) {
      if (e.proto == target.proto && e.port == target.port) listening.push_back(&e);
    }
  }
  if (!config_.allow_ports && listening.empty()) {
    if (listeners == nullptr) {
      return refused(EACCES,
                     fmt::format("target {} is not allowed; start vbridge-guest with --allow-ports to allow "
                                 "dialing guest loopback ports",
                                 what));
    }
    return refused(EACCES, fmt::format("target {} is not allowed: no guest {} listener on port {} (start "
                                       "vbridge-guest with --allow-ports to allow dialing any loopback port)",
                                       what, udp ? "udp" : "tcp", target.port));
  }
  DialPlan plan;
  plan.socket_type = udp ? SOCK_DGRAM : SOCK_STREAM;
  const char* kind = udp ? "guest udp port" : "guest port";
  const std::string& host = target.host;
  if (host.empty() || host == "localhost") {
    const bool want4 = target.family != wire::Family::Inet6;
    const bool want6 = target.family != wire::Family::Inet4;
    if (want4) plan.addresses.push_back(loopback4(target.port));
    if (want6) plan.addresses.push_back(loopback6(target.port));
    plan.description = fmt::format("{} {}:{}", kind, want4 ? "127.0.0.1" : "[::1]", target.port);
    return plan;
  }
  SocketAddress address;
  std::string canonical;
  if (!numeric_address(host, target.port, address, canonical)) {
    return refused(EINVAL,
                   fmt::format("target {}: \"{}\" is not a numeric IPv4 or IPv6 address", what, host));
  }
  const bool listened = std::any_of(listening.begin(), listening.end(),
                                    [&](const PortEntry* e) { return e->address == canonical; });
  if (!is_loopback(address) && !listened) {
    return refused(EACCES,
                   fmt::format("target {}: only loopback addresses (127.0.0.1, ::1) and the addresses of "
                               "guest listeners may be dialed",
                               what));
  }
  plan.addresses.push_back(address);
  plan.description = address.family() == AF_INET6 ? fmt::format("{} [{}]:{}", kind, canonical, target.port)
                                                  : fmt::format("{} {}:{}", kind, canonical, target.port);
  return plan;
}

}  // namespace vbridge::guest
