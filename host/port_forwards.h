// Host ports that follow what the guest listens on. PORTS diffs from the guest agent add and remove
// forwards; each guest listener is bound on both host loopbacks (127.0.0.1 and ::1, configurable), remapped
// where configured, and dialled in the guest at its own address (its family's loopback for a wildcard). A
// port the host cannot bind is kept in the table with the reason, logged once, shown in status, and bound
// later if it becomes free.
//
// A snapshot (`full`) replaces what the host knew. A large one arrives in parts of which only the first is
// marked full, so the ports a snapshot lacks are removed after a short grace in which a following part may
// still name them; removals in diffs take effect at once.
#pragma once

#include <uv.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <tuple>

#include "host/listener.h"
#include "host/socket_bridge.h"
#include "host/udp_forward.h"

namespace vbridge {

struct PortForwardConfig {
  bool follow_guest = true;  // forward whatever the guest listens on
  std::string bind_v4 = "127.0.0.1";
  std::string bind_v6 = "::1";
  std::map<uint16_t, uint16_t> remap;  // guest port -> host port
  std::chrono::milliseconds udp_idle_timeout{60000};
};

// A guest listener as the host tracks it.
struct GuestPort {
  wire::Proto proto;
  wire::Family family;
  std::string address;
  uint16_t port;
  auto key() const { return std::tie(proto, family, address, port); }
  bool operator<(const GuestPort& o) const { return key() < o.key(); }
};

class PortForwards {
 public:
  using AcceptFn = std::function<void(UniqueFd client, BridgeOptions options)>;
  PortForwards(uv_loop_t* loop, BufferPool& pool, PortForwardConfig config, AcceptFn accept,
               UdpForward::SessionFn session);
  ~PortForwards();

  // Applies a PORTS message (a diff, or a full snapshot when `full`).
  void apply(const wire::Ports& ports);
  // Time passes (called every ~100 ms): expires UDP flows, ends a snapshot's grace, retries failed binds.
  // Adds a forward from configuration (host port -> guest port); never removed by PORTS.
  Status add_static(wire::Proto proto, const std::string& host_address, uint16_t host_port,
                    uint16_t guest_port);
  void tick();
  nlohmann::json status() const;
  size_t active() const;

 private:
  using Clock = std::chrono::steady_clock;

  // One host socket: (proto, host address, host port). Several guest listeners may share it.
  struct HostBinding {
    wire::Proto proto;
    std::string host_address;
    uint16_t host_port;
    wire::TargetT target;
    std::unique_ptr<Listener> tcp;
    std::unique_ptr<UdpForward> udp;
    std::string error;
    Clock::time_point retry_at{};  // when a failed bind is tried again
    int refs = 0;
    bool is_static = false;
  };
  using BindingKey = std::tuple<wire::Proto, std::string, uint16_t>;

  void add(const GuestPort& port);
  void remove(const GuestPort& port);
  std::vector<std::string> host_addresses(const GuestPort& port) const;
  uint16_t host_port(const GuestPort& port) const;
  wire::TargetT target_for(const GuestPort& port) const;
  void choose_target(HostBinding& binding);
  // Binds the host socket; on failure records the reason (logged unless `retry` and unchanged).
  void bind(HostBinding& binding, bool retry = false);

  uv_loop_t* loop_;
  BufferPool& pool_;
  PortForwardConfig config_;
  AcceptFn accept_;
  UdpForward::SessionFn session_;
  std::set<GuestPort> guest_ports_;
  std::map<BindingKey, HostBinding> bindings_;
  bool have_v4_ = true;  // the host has this loopback (see host_addresses)
  bool have_v6_ = true;
  std::set<GuestPort> snapshot_missing_;  // tracked ports the last snapshot lacked, removed after the grace
  Clock::time_point snapshot_deadline_{};
};

}  // namespace vbridge
