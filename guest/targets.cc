#include "guest/targets.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

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
      return config_error(fmt::format("{} \"{}\": unix socket paths are limited to {} bytes", flag, path,
                                      kMaxUnixPath));
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
    case wire::Proto::Unix: return target.path.empty() ? std::string("(empty path)") : target.path;
    case wire::Proto::Tcp:
      return target.host.empty() ? fmt::format("tcp:{}", target.port) : fmt::format("tcp:{}:{}", target.host, target.port);
    case wire::Proto::Udp:
      return target.host.empty() ? fmt::format("udp:{}", target.port) : fmt::format("udp:{}:{}", target.host, target.port);
  }
  return "?";
}

Result<DialPlan> TargetPolicy::resolve(const wire::TargetT& target) const {
  switch (target.proto) {
    case wire::Proto::Unix: return resolve_unix(target.path);
    case wire::Proto::Tcp:
    case wire::Proto::Udp: return resolve_port(target);
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
    if (path.size() > kMaxUnixPath) return refused(ENAMETOOLONG, fmt::format("guest socket {}: path too long", path));
    resolved = path;
  }
  return DialPlan{"guest socket " + resolved, {unix_address(resolved)}};
}

Result<DialPlan> TargetPolicy::resolve_port(const wire::TargetT& target) const {
  const std::string what = describe(target);
  if (!config_.allow_ports) {
    return refused(EACCES, fmt::format("target {} is not allowed; start vbridge-guest with --allow-ports to allow "
                                       "dialing guest loopback ports",
                                       what));
  }
  if (target.proto == wire::Proto::Udp) {
    return refused(EPROTONOSUPPORT, fmt::format("target {}: UDP forwarding is not supported by this guest agent", what));
  }
  if (target.port == 0) return refused(EINVAL, fmt::format("target {}: port 0", what));
  const std::string& host = target.host;
  const bool any = host.empty() || host == "localhost";
  bool want4 = any ? target.family != wire::Family::Inet6 : host == "127.0.0.1";
  bool want6 = any ? target.family != wire::Family::Inet4 : host == "::1";
  if (!want4 && !want6) {
    return refused(EACCES, fmt::format("target {}: only loopback addresses (127.0.0.1, ::1) may be dialed", what));
  }
  DialPlan plan;
  if (want4) plan.addresses.push_back(loopback4(target.port));
  if (want6) plan.addresses.push_back(loopback6(target.port));
  plan.description = fmt::format("guest port {}:{}", want4 ? "127.0.0.1" : "[::1]", target.port);
  return plan;
}

}  // namespace vbridge::guest
