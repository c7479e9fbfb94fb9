#include "guest/port_watcher_linux.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace vbridge::guest {
namespace {

constexpr uint32_t kTcpListen = 10;      // TCP_LISTEN in the kernel's state numbering
constexpr uint32_t kUdpUnconnected = 7;  // TCP_CLOSE: a UDP socket that is bound but not connected

Status dump(int fd, uint8_t family, uint8_t protocol, uint32_t states, std::set<PortEntry>& out) {
  struct {
    nlmsghdr header;
    inet_diag_req_v2 request;
  } req{};
  req.header.nlmsg_len = sizeof req;
  req.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  req.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  req.request.sdiag_family = family;
  req.request.sdiag_protocol = protocol;
  req.request.idiag_states = 1u << states;
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(fd, &req, sizeof req, 0, reinterpret_cast<sockaddr*>(&kernel), sizeof kernel) < 0) {
    return Error{ErrorCode::kIo, errno, "sock_diag request"};
  }
  alignas(nlmsghdr) char buf[32768];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error{ErrorCode::kIo, errno, "sock_diag reply"};
    }
    auto* h = reinterpret_cast<nlmsghdr*>(buf);
    int left = static_cast<int>(n);
    for (; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
      if (h->nlmsg_type == NLMSG_DONE) return {};
      if (h->nlmsg_type == NLMSG_ERROR) {
        const auto* e = static_cast<const nlmsgerr*>(NLMSG_DATA(h));
        // No UDP diag module for this family (or no IPv6): nothing of that kind to report.
        if (e->error == -ENOENT || e->error == -EOPNOTSUPP) return {};
        return Error{ErrorCode::kIo, -e->error, "sock_diag dump"};
      }
      const auto* msg = static_cast<const inet_diag_msg*>(NLMSG_DATA(h));
      PortEntry entry;
      entry.proto = protocol == IPPROTO_TCP ? wire::Proto::Tcp : wire::Proto::Udp;
      entry.family = family == AF_INET6 ? wire::Family::Inet6 : wire::Family::Inet4;
      entry.port = ntohs(msg->id.idiag_sport);
      char text[INET6_ADDRSTRLEN] = {};
      inet_ntop(family, msg->id.idiag_src, text, sizeof text);
      entry.address = text;
      if (entry.port != 0) out.insert(std::move(entry));
    }
  }
}

}  // namespace

NetlinkSocket::NetlinkSocket() : fd_(::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG)) {}

NetlinkSocket::~NetlinkSocket() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::set<PortEntry>> scan_listeners(const NetlinkSocket& nl) {
  if (nl.fd() < 0) return Error{ErrorCode::kIo, errno, "socket(NETLINK_SOCK_DIAG)"};
  std::set<PortEntry> out;
  for (const uint8_t family : {AF_INET, AF_INET6}) {
    if (Status st = dump(nl.fd(), family, IPPROTO_TCP, kTcpListen, out); !st) return st.error();
    if (Status st = dump(nl.fd(), family, IPPROTO_UDP, kUdpUnconnected, out); !st) return st.error();
  }
  return out;
}

SocketCounts::SocketCounts()
    : v4_(::open("/proc/net/sockstat", O_RDONLY | O_CLOEXEC)),
      v6_(::open("/proc/net/sockstat6", O_RDONLY | O_CLOEXEC)) {}

SocketCounts::~SocketCounts() {
  if (v4_ >= 0) ::close(v4_);
  if (v6_ >= 0) ::close(v6_);
}

std::optional<SocketCounts::Counts> SocketCounts::read() const {
  // Lines look like "TCP: inuse 3 orphan 0 tw 0 alloc 5 mem 1" and "UDP6: inuse 1".
  const auto inuse = [](int fd, const char* tcp, const char* udp, uint64_t& tcp_out, uint64_t& udp_out) {
    char text[1024];
    const ssize_t n = fd < 0 ? -1 : ::pread(fd, text, sizeof text - 1, 0);
    if (n <= 0) return false;
    text[n] = '\0';
    const auto find = [&](const char* label, uint64_t& out) {
      const char* at = std::strstr(text, label);
      if (at != nullptr) out = std::strtoull(at + std::strlen(label), nullptr, 10);
    };
    find(tcp, tcp_out);
    find(udp, udp_out);
    return true;
  };
  Counts c{};
  if (!inuse(v4_, "\nTCP: inuse ", "\nUDP: inuse ", c[0], c[1])) return std::nullopt;
  inuse(v6_, "TCP6: inuse ", "\nUDP6: inuse ", c[2], c[3]);
  return c;
}

bool PortWatcher::may_have_changed() const {
  if (need_full_ || !scanned_counts_) return true;
  const auto now = counts_.read();
  return !now || *now != *scanned_counts_;
}

Result<PortDiff> PortWatcher::poll() {
  // Counted before the dumps: a socket that changes between the two moves the counts past these, so the
  // next check scans again.
  scanned_counts_ = counts_.read();
  auto scanned = scan_listeners(netlink_);
  if (!scanned) {
    scanned_counts_.reset();  // the next check scans again
    return scanned.error();
  }
  ++scans_;
  std::set<PortEntry> now;
  for (const PortEntry& e : *scanned) {
    if (excluded_.count(e.port) == 0) now.insert(e);
  }
  PortDiff diff;
  if (need_full_) {
    diff.full = true;
    diff.added.assign(now.begin(), now.end());
    need_full_ = false;
  } else {
    std::set_difference(now.begin(), now.end(), current_.begin(), current_.end(),
                        std::back_inserter(diff.added));
    std::set_difference(current_.begin(), current_.end(), now.begin(), now.end(),
                        std::back_inserter(diff.removed));
  }
  current_ = std::move(now);
  return diff;
}

void build_ports_message(const PortDiff& diff, flatbuffers::FlatBufferBuilder& out) {
  const auto listeners = [&](const std::vector<PortEntry>& entries) {
    std::vector<flatbuffers::Offset<wire::Listener>> v;
    v.reserve(entries.size());
    for (const PortEntry& e : entries) {
      v.push_back(wire::CreateListener(out, e.proto, e.family, out.CreateString(e.address), e.port));
    }
    return out.CreateVector(v);
  };
  const auto added = listeners(diff.added);
  const auto removed = listeners(diff.removed);
  out.Finish(wire::CreateControl(out, wire::Message::Ports,
                                 wire::CreatePorts(out, added, removed, diff.full).Union()));
}

std::vector<PortDiff> split_diff(const PortDiff& diff, size_t max_listeners) {
  max_listeners = std::max<size_t>(max_listeners, 1);
  std::vector<PortDiff> parts;
  if (diff.added.size() + diff.removed.size() <= max_listeners) {
    parts.push_back(diff);
    return parts;
  }
  PortDiff part;
  part.full = diff.full;
  const auto take = [&](const std::vector<PortEntry>& from, std::vector<PortEntry> PortDiff::*into) {
    for (const PortEntry& e : from) {
      if (part.added.size() + part.removed.size() == max_listeners) {
        parts.push_back(std::move(part));
        part = PortDiff{};
      }
      (part.*into).push_back(e);
    }
  };
  take(diff.removed, &PortDiff::removed);
  take(diff.added, &PortDiff::added);
  if (!part.added.empty() || !part.removed.empty()) parts.push_back(std::move(part));
  return parts;
}

}  // namespace vbridge::guest
