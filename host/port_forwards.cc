#include "host/port_forwards.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "protocol/log.h"

namespace vbridge {

namespace {
const char* proto_name(wire::Proto p) { return p == wire::Proto::Udp ? "udp" : "tcp"; }

std::string endpoint(const std::string& address, uint16_t port) {
  return address.find(':') != std::string::npos ? fmt::format("[{}]:{}", address, port)
                                                : fmt::format("{}:{}", address, port);
}

bool is_wildcard(const std::string& address) {
  return address.empty() || address == "0.0.0.0" || address == "::";
}

// How long the ports a snapshot lacks survive, waiting for the snapshot's later parts.
constexpr auto kSnapshotGrace = std::chrono::milliseconds(50);
// How often a host port that could not be bound is tried again.
constexpr auto kBindRetry = std::chrono::seconds(2);
}  // namespace

PortForwards::PortForwards(uv_loop_t* loop, BufferPool& pool, PortForwardConfig config, AcceptFn accept,
                           UdpForward::SessionFn session)
    : loop_(loop),
      pool_(pool),
      config_(std::move(config)),
      accept_(std::move(accept)),
      session_(std::move(session)) {
  // Without IPv6 (or IPv4) on the host, its loopback is left out instead of failing every port there.
  const auto usable = [](const std::string& address) {
    auto fd = bind_udp(address, 0);
    if (!fd && (fd.error().errno_value == EADDRNOTAVAIL || fd.error().errno_value == EAFNOSUPPORT)) {
      log::warn("host has no {} ({}); guest ports are forwarded on the other loopback only", address,
                fd.error().to_string());
      return false;
    }
    return true;
  };
  have_v4_ = usable(config_.bind_v4);
  have_v6_ = usable(config_.bind_v6);
}

PortForwards::~PortForwards() = default;

void PortForwards::apply(const wire::Ports& ports) {
  if (!config_.follow_guest) return;
  std::set<GuestPort> removed, added;
  const auto read = [](const wire::Listener* l) {
    return GuestPort{l->proto(), l->family(), l->address() != nullptr ? l->address()->str() : std::string(),
                     l->port()};
  };
  if (ports.added() != nullptr) {
    for (const auto* l : *ports.added()) added.insert(read(l));
  }
  if (ports.removed() != nullptr) {
    for (const auto* l : *ports.removed()) removed.insert(read(l));
  }
  if (ports.full()) {
    // A snapshot: whatever we track that it lacks is gone, unless a later part of it names it.
    for (const GuestPort& p : guest_ports_) {
      if (added.count(p) == 0) snapshot_missing_.insert(p);
    }
    snapshot_deadline_ = Clock::now() + kSnapshotGrace;
  }
  for (const GuestPort& p : removed) {
    snapshot_missing_.erase(p);
    remove(p);
  }
  for (const GuestPort& p : added) {
    snapshot_missing_.erase(p);
    add(p);
  }
}

std::vector<std::string> PortForwards::host_addresses(const GuestPort&) const {
  // Every guest listener appears on both host loopbacks, so "localhost" works whichever family a client
  // resolves it to first; a host without one of them (IPv6 disabled) gets only the other.
  std::vector<std::string> out;
  if (have_v4_) out.push_back(config_.bind_v4);
  if (have_v6_) out.push_back(config_.bind_v6);
  return out;
}

uint16_t PortForwards::host_port(const GuestPort& port) const {
  const auto it = config_.remap.find(port.port);
  return it == config_.remap.end() ? port.port : it->second;
}

wire::TargetT PortForwards::target_for(const GuestPort& port) const {
  wire::TargetT target;
  target.proto = port.proto;
  target.family = port.family;
  target.port = port.port;
  // A wildcard listener is reached on the guest's loopback; a specific address is dialled as is.
  target.host =
      is_wildcard(port.address) ? (port.family == wire::Family::Inet6 ? "::1" : "127.0.0.1") : port.address;
  return target;
}

void PortForwards::choose_target(HostBinding& b) {
  // Of the guest listeners behind one host socket (0.0.0.0 and :: on one port, say), the one of the host
  // socket's own family is dialled, so [::1]:80 reaches the guest's IPv6 server when there is one.
  const wire::Family family =
      b.host_address.find(':') != std::string::npos ? wire::Family::Inet6 : wire::Family::Inet4;
  const GuestPort* chosen = nullptr;
  for (const GuestPort& p : guest_ports_) {
    if (p.proto != b.proto || host_port(p) != b.host_port) continue;
    if (chosen == nullptr || (p.family == family && chosen->family != family)) chosen = &p;
  }
  if (chosen == nullptr) return;
  b.target = target_for(*chosen);
  if (b.udp) b.udp->retarget(b.target);
}

void PortForwards::add(const GuestPort& port) {
  if (!guest_ports_.insert(port).second) return;
  const uint16_t hport = host_port(port);
  for (const std::string& address : host_addresses(port)) {
    HostBinding& b = bindings_[BindingKey{port.proto, address, hport}];
    if (b.refs++ > 0) {
      if (!b.is_static) choose_target(b);
      continue;
    }
    b.proto = port.proto;
    b.host_address = address;
    b.host_port = hport;
    b.target = target_for(port);
    bind(b);
  }
}

void PortForwards::remove(const GuestPort& port) {
  if (guest_ports_.erase(port) == 0) return;
  const uint16_t hport = host_port(port);
  for (const std::string& address : host_addresses(port)) {
    const auto b = bindings_.find(BindingKey{port.proto, address, hport});
    if (b == bindings_.end() || b->second.is_static) continue;
    if (--b->second.refs > 0) {
      choose_target(b->second);  // another guest listener still stands behind this host socket
      continue;
    }
    log::info("guest stopped listening on {} {}; host {} removed", proto_name(port.proto),
              endpoint(port.address, port.port), endpoint(address, hport));
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

void PortForwards::bind(HostBinding& b, bool retry) {
  const std::string where = fmt::format("{} {}", proto_name(b.proto), endpoint(b.host_address, b.host_port));
  Status result;
  if (b.proto == wire::Proto::Tcp) {
    Address address{Address::Kind::kTcp, b.host_address, b.host_port};
    // The binding owns the listener and map nodes do not move, so the callback may keep a pointer to it; it
    // reads the target when a client arrives, as the target may change (see remove).
    HostBinding* binding = &b;
    auto listener = Listener::listen(loop_, address, [this, binding, where](UniqueFd client) {
      BridgeOptions options;
      options.target = binding->target;
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
      b.udp = std::make_unique<UdpForward>(loop_, std::move(*fd), b.target, pool_, session_,
                                           config_.udp_idle_timeout);
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
  if (err == EACCES)
    hint = fmt::format("; ports below 1024 need root or a remap (--port-map {}=HOSTPORT)", b.host_port);
  if (err == EADDRINUSE)
    hint = fmt::format("; another host program uses it (remap with --port-map {}=HOSTPORT)", b.host_port);
  std::string error = fmt::format("cannot bind host {}: {}{}", where,
                                  err != 0 ? std::strerror(err) : result.error().message.c_str(), hint);
  b.retry_at = Clock::now() + kBindRetry;
  if (retry && error == b.error) return;
  b.error = std::move(error);
  log::warn("guest port {} not forwarded: {}", b.target.port, b.error);
}

void PortForwards::tick() {
  const auto now = Clock::now();
  if (!snapshot_missing_.empty() && now >= snapshot_deadline_) {
    const auto gone = std::move(snapshot_missing_);
    snapshot_missing_.clear();
    for (const GuestPort& p : gone) remove(p);
  }
  for (auto& [key, b] : bindings_) {
    if (b.udp) b.udp->expire_idle();
    if (!b.error.empty() && !b.is_static && now >= b.retry_at) bind(b, true);
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
                     {"guest", endpoint(b.target.host, b.target.port)},
                     {"guest_port", b.target.port},
                     {"static", b.is_static},
                     {"ok", b.error.empty()}};
    if (!b.error.empty()) j["error"] = b.error;
    if (b.udp) {
      const UdpCounters& c = b.udp->counters();
      j["udp"] = {{"flows", b.udp->flow_count()},
                  {"in", c.datagrams_in},
                  {"out", c.datagrams_out},
                  {"dropped", c.dropped},
                  {"refused", c.flows_refused}};
    }
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace vbridge
