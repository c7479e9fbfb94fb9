#include "host/port_forwards.h"

#include <fmt/format.h>

#include <cstring>

#include "protocol/log.h"

namespace vbridge {

namespace {
const char* proto_name(wire::Proto p) { return p == wire::Proto::Udp ? "udp" : "tcp"; }

std::string endpoint(const std::string& address, uint16_t port) {
  return address.find(':') != std::string::npos ? fmt::format("[{}]:{}", address, port)
                                                : fmt::format("{}:{}", address, port);
}

bool is_wildcard(const std::string& address) { return address.empty() || address == "0.0.0.0" || address == "::"; }
}  // namespace

PortForwards::PortForwards(uv_loop_t* loop, BufferPool& pool, PortForwardConfig config, AcceptFn accept,
                           UdpForward::SessionFn session)
    : loop_(loop), pool_(pool), config_(std::move(config)), accept_(std::move(accept)), session_(std::move(session)) {}

PortForwards::~PortForwards() = default;

void PortForwards::apply(const wire::Ports& ports) {
  if (!config_.follow_guest) return;
  std::set<GuestPort> removed, added;
  const auto read = [](const wire::Listener* l) {
    return GuestPort{l->proto(), l->family(), l->address() != nullptr ? l->address()->str() : std::string(), l->port()};
  };
  if (ports.added() != nullptr) {
    for (const auto* l : *ports.added()) added.insert(read(l));
  }
  if (ports.removed() != nullptr) {
    for (const auto* l : *ports.removed()) removed.insert(read(l));
  }
  if (ports.full()) {
    // A snapshot: whatever we track that it lacks is gone.
    for (const GuestPort& p : guest_ports_) {
      if (added.count(p) == 0) removed.insert(p);
    }
  }
  for (const GuestPort& p : removed) remove(p);
  for (const GuestPort& p : added) add(p);
}

std::vector<std::string> PortForwards::host_addresses(const GuestPort& port) const {
  if (port.family == wire::Family::Inet6) {
    // A v6 wildcard usually accepts IPv4 too (dual stack): offer both loopbacks.
    if (port.address == "::") return {config_.bind_v6, config_.bind_v4};
    return {config_.bind_v6};
  }
  return {config_.bind_v4};
}

void PortForwards::add(const GuestPort& port) {
  if (!guest_ports_.insert(port).second) return;
  const auto it = config_.remap.find(port.port);
  const uint16_t host_port = it == config_.remap.end() ? port.port : it->second;
  for (const std::string& address : host_addresses(port)) {
    HostBinding& b = bindings_[BindingKey{port.proto, address, host_port}];
    if (b.refs++ > 0) continue;
    b.proto = port.proto;
    b.host_address = address;
    b.host_port = host_port;
    b.target.proto = port.proto;
    b.target.family = port.family;
    b.target.port = port.port;
    // A wildcard listener is reached on the guest's loopback; a specific address is dialled as is.
    b.target.host = is_wildcard(port.address) ? (port.family == wire::Family::Inet6 ? "::1" : "127.0.0.1")
                                               : port.address;
    bind(b);
  }
}

void PortForwards::remove(const GuestPort& port) {
  if (guest_ports_.erase(port) == 0) return;
  const auto it = config_.remap.find(port.port);
  const uint16_t host_port = it == config_.remap.end() ? port.port : it->second;
  for (const std::string& address : host_addresses(port)) {
    const auto b = bindings_.find(BindingKey{port.proto, address, host_port});
    if (b == bindings_.end() || b->second.is_static) continue;
    if (--b->second.refs > 0) continue;
    log::info("guest stopped listening on {} {}; host {} removed", proto_name(port.proto),
              endpoint(port.address, port.port), endpoint(address, host_port));
    bindings_.erase(b);
  }
}

Status PortForwards::add_static(wire::Proto proto, const std::string& host_address, uint16_t host_port,
                                uint16_t guest_port) {
  HostBinding& b = bindings_[BindingKey{proto, host_address, host_port}];
  b.proto = proto;
  b.host_address = host_address;
  b.host_port = host_port;
  b.target.proto = proto;
  b.target.family = host_address.find(':') != std::string::npos ? wire::Family::Inet6 : wire::Family::Inet4;
  b.target.port = guest_port;
  b.target.host = b.target.family == wire::Family::Inet6 ? "::1" : "127.0.0.1";
  b.is_static = true;
  ++b.refs;
  bind(b);
  if (!b.error.empty()) return Error{ErrorCode::kConfig, 0, b.error};
  return {};
}

void PortForwards::bind(HostBinding& b) {
  const std::string where = fmt::format("{} {}", proto_name(b.proto), endpoint(b.host_address, b.host_port));
  Status result;
  if (b.proto == wire::Proto::Tcp) {
    Address address{Address::Kind::kTcp, b.host_address, b.host_port};
    const wire::TargetT target = b.target;
    auto listener = Listener::listen(loop_, address, [this, target, where](UniqueFd client) {
      BridgeOptions options;
      options.target = target;
      options.name = where;
      accept_(std::move(client), std::move(options));
    });
    if (listener) {
      b.tcp = std::move(*listener);
    } else {
      result = listener.error();
    }
  } else {
    auto fd = bind_udp(b.host_address, b.host_port);
    if (fd) {
      b.udp = std::make_unique<UdpForward>(loop_, std::move(*fd), b.target, pool_, session_, config_.udp_idle_timeout);
    } else {
      result = fd.error();
    }
  }
  if (result) {
    b.error.clear();
    log::info("forwarding host {} to guest port {}", where, b.target.port);
    return;
  }
  const int err = result.error().errno_value;
  std::string hint;
  if (err == EACCES) hint = fmt::format("; ports below 1024 need root or a remap (--port-map {}=HOSTPORT)", b.host_port);
  if (err == EADDRINUSE) hint = fmt::format("; another host program uses it (remap with --port-map {}=HOSTPORT)", b.host_port);
  b.error = fmt::format("cannot bind host {}: {}{}", where, std::strerror(err), hint);
  log::warn("guest port {} not forwarded: {}", b.target.port, b.error);
}

void PortForwards::tick() {
  for (auto& [key, b] : bindings_) {
    if (b.udp) b.udp->expire_idle();
  }
}

size_t PortForwards::active() const {
  size_t n = 0;
  for (const auto& [key, b] : bindings_) n += b.error.empty();
  return n;
}

nlohmann::json PortForwards::status() const {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& [key, b] : bindings_) {
    nlohmann::json j{{"proto", proto_name(b.proto)},
                     {"host", endpoint(b.host_address, b.host_port)},
                     {"guest_port", b.target.port},
                     {"static", b.is_static},
                     {"ok", b.error.empty()}};
    if (!b.error.empty()) j["error"] = b.error;
    if (b.udp) {
      const UdpCounters& c = b.udp->counters();
      j["udp"] = {{"flows", b.udp->flow_count()}, {"in", c.datagrams_in}, {"out", c.datagrams_out}, {"dropped", c.dropped}};
    }
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace vbridge
