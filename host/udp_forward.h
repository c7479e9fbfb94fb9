// One forwarded UDP port on the host. Each client address gets its own stream (a "flow"), so replies reach
// the client that asked; datagram boundaries travel as length-prefixed records (protocol/datagram.h).
// Flows end after an idle timeout. Memory is bounded: a datagram that does not fit the stream's window is
// dropped and counted, as a congested network would.
#pragma once

#include <netinet/in.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "host/poller.h"
#include "host/session.h"
#include "protocol/datagram.h"

namespace vbridge {

struct UdpCounters {
  uint64_t datagrams_in = 0, datagrams_out = 0, dropped = 0, flows_opened = 0, flows_expired = 0,
           flows_refused = 0;
};

class UdpForward {
 public:
  using SessionFn = std::function<Session*()>;
  UdpForward(uv_loop_t* loop, UniqueFd socket, wire::TargetT target, BufferPool& pool, SessionFn session,
             std::chrono::milliseconds idle_timeout);
  ~UdpForward();
  // Ends flows idle for longer than the timeout; call periodically.
  void expire_idle();
  // New flows go to `target` (flows already open keep theirs).
  void retarget(wire::TargetT target) { target_ = std::move(target); }
  size_t flow_count() const { return flows_.size(); }
  const UdpCounters& counters() const { return counters_; }

 private:
  class Flow;
  void on_readable();
  void reply(const sockaddr_storage& to, socklen_t len, const Slice& datagram);
  void drop_flow(const std::string& key);

  Poller poller_;
  wire::TargetT target_;
  BufferPool& pool_;
  ReadArena arena_;
  SessionFn session_;
  std::chrono::milliseconds idle_timeout_;
  std::unordered_map<std::string, std::unique_ptr<Flow>> flows_;
  std::vector<std::unique_ptr<Flow>> graveyard_;  // ended flows, freed outside their callbacks
  UdpCounters counters_;
  std::string last_refusal_;  // logged once per distinct reason, not once per flow
};

// Binds a UDP socket on host:port (nonblocking).
Result<UniqueFd> bind_udp(const std::string& host, uint16_t port);

}  // namespace vbridge
