// Finds the guest's listening TCP sockets and bound, unconnected UDP sockets (IPv4 and IPv6) with
// NETLINK_SOCK_DIAG dumps, filtered by socket state in the kernel, and turns successive scans into PORTS
// diffs.
//
// Cost. A dump walks the kernel's whole listening-socket or UDP hash table, however few sockets it holds
// (16384 buckets each on a 24 GiB machine), and after a quiet 20 ms those tables are out of the CPU caches:
// one scan of four dumps then costs ~150 us, ~0.8% of a core at 50 scans a second. So the watcher first
// reads the namespace's counts of hashed TCP and UDP sockets (/proc/net/sockstat{,6} "inuse", ~5 us), which
// move whenever a socket starts or stops listening or being bound, and scans only when they moved since the
// last scan. A listener that appears in the same interval as another socket goes away leaves the counts
// unchanged; the caller's periodic full scan (PortWatcher::poll without the check) bounds that delay.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "protocol/control_generated.h"
#include "protocol/result.h"

namespace vbridge::guest {

struct PortEntry {
  wire::Proto proto;
  wire::Family family;
  std::string address;  // numeric, e.g. "0.0.0.0", "::", "127.0.0.1"
  uint16_t port;
  auto key() const { return std::tie(proto, family, address, port); }
  bool operator<(const PortEntry& o) const { return key() < o.key(); }
  bool operator==(const PortEntry& o) const { return key() == o.key(); }
};

struct PortDiff {
  std::vector<PortEntry> added, removed;
  bool full = false;  // a snapshot: `added` is everything, `removed` is empty
  bool empty() const { return !full && added.empty() && removed.empty(); }
};

// A NETLINK_SOCK_DIAG socket, kept open across scans.
class NetlinkSocket {
 public:
  NetlinkSocket();
  ~NetlinkSocket();
  NetlinkSocket(const NetlinkSocket&) = delete;
  NetlinkSocket& operator=(const NetlinkSocket&) = delete;
  int fd() const { return fd_; }

 private:
  int fd_;
};

// One dump of every listening TCP and bound unconnected UDP socket in this network namespace.
Result<std::set<PortEntry>> scan_listeners(const NetlinkSocket& netlink);

// The counts of hashed TCP, UDP, TCP6 and UDP6 sockets of this network namespace, from /proc/net/sockstat
// and sockstat6 (kept open: one pread each).
class SocketCounts {
 public:
  using Counts = std::array<uint64_t, 4>;
  SocketCounts();
  ~SocketCounts();
  SocketCounts(const SocketCounts&) = delete;
  SocketCounts& operator=(const SocketCounts&) = delete;
  // Empty when /proc/net/sockstat cannot be read (no procfs); sockstat6 may be missing (no IPv6).
  std::optional<Counts> read() const;

 private:
  int v4_ = -1;
  int v6_ = -1;
};

class PortWatcher {
 public:
  // `excluded_ports`: the agent's own listeners (e.g. its TCP transport), never announced.
  explicit PortWatcher(std::set<uint16_t> excluded_ports = {}) : excluded_(std::move(excluded_ports)) {}
  // Scans and returns what changed since the previous scan (a full snapshot after reset()).
  Result<PortDiff> poll();
  // False when a scan now would certainly find what the last one found: the socket counts have not moved
  // (see the cost note above). True when they moved, cannot be read, or a snapshot is due.
  bool may_have_changed() const;
  // The next poll returns a full snapshot (after a host reconnects).
  void reset() { need_full_ = true; }
  const std::set<PortEntry>& current() const { return current_; }
  uint64_t scans() const { return scans_; }

 private:
  NetlinkSocket netlink_;
  SocketCounts counts_;
  std::optional<SocketCounts::Counts> scanned_counts_;  // read just before the last scan
  std::set<uint16_t> excluded_;
  std::set<PortEntry> current_;
  bool need_full_ = true;
  uint64_t scans_ = 0;
};

// The PORTS control message for a diff.
void build_ports_message(const PortDiff& diff, flatbuffers::FlatBufferBuilder& out);

// Splits a diff into parts of at most `max_listeners` listeners each (removals first), so one PORTS message
// stays far below the peer's control-message limit (a listener costs at most ~80 bytes encoded). Only the
// first part of a snapshot is marked `full`; the later parts add to it, and the host keeps what they name
// (host/port_forwards.h). A diff that fits is returned as is, an empty snapshot as one part.
std::vector<PortDiff> split_diff(const PortDiff& diff, size_t max_listeners);

}  // namespace vbridge::guest
