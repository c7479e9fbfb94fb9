#include "guest/port_watcher_linux.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace vbridge::guest {
namespace {

// A socket bound to an ephemeral loopback port; listening for TCP.
struct BoundSocket {
  int fd = -1;
  uint16_t port = 0;
  BoundSocket(int family, int type) {
    fd = ::socket(family, type, 0);
    sockaddr_storage ss{};
    socklen_t len;
    if (family == AF_INET6) {
      auto* sa = reinterpret_cast<sockaddr_in6*>(&ss);
      sa->sin6_family = AF_INET6;
      sa->sin6_addr = in6addr_loopback;
      len = sizeof *sa;
    } else {
      auto* sa = reinterpret_cast<sockaddr_in*>(&ss);
      sa->sin_family = AF_INET;
      sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      len = sizeof *sa;
    }
    EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&ss), len), 0);
    if (type == SOCK_STREAM) {
      EXPECT_EQ(::listen(fd, 8), 0);
    }
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
    port = ntohs(family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                    : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  }
  ~BoundSocket() { close(); }
  void close() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

bool contains(const std::vector<PortEntry>& v, wire::Proto proto, wire::Family family, uint16_t port) {
  return std::any_of(v.begin(), v.end(), [&](const PortEntry& e) {
    return e.proto == proto && e.family == family && e.port == port;
  });
}

TEST(PortWatcher, SeesTcpAndUdpListenersOfBothFamiliesAndTheirRemoval) {
  PortWatcher watcher;
  ASSERT_TRUE(watcher.poll().ok());  // snapshot of whatever already listens
  BoundSocket tcp4(AF_INET, SOCK_STREAM), tcp6(AF_INET6, SOCK_STREAM), udp4(AF_INET, SOCK_DGRAM),
      udp6(AF_INET6, SOCK_DGRAM);
  auto diff = watcher.poll();
  ASSERT_TRUE(diff.ok()) << diff.error().to_string();
  EXPECT_FALSE(diff->full);
  EXPECT_TRUE(contains(diff->added, wire::Proto::Tcp, wire::Family::Inet4, tcp4.port));
  EXPECT_TRUE(contains(diff->added, wire::Proto::Tcp, wire::Family::Inet6, tcp6.port));
  EXPECT_TRUE(contains(diff->added, wire::Proto::Udp, wire::Family::Inet4, udp4.port));
  EXPECT_TRUE(contains(diff->added, wire::Proto::Udp, wire::Family::Inet6, udp6.port));
  tcp4.close();
  udp6.close();
  diff = watcher.poll();
  ASSERT_TRUE(diff.ok());
  EXPECT_TRUE(contains(diff->removed, wire::Proto::Tcp, wire::Family::Inet4, tcp4.port));
  EXPECT_TRUE(contains(diff->removed, wire::Proto::Udp, wire::Family::Inet6, udp6.port));
  EXPECT_FALSE(contains(diff->removed, wire::Proto::Tcp, wire::Family::Inet6, tcp6.port));
}

TEST(PortWatcher, ConnectedSocketsAreNotListeners) {
  BoundSocket server(AF_INET, SOCK_STREAM);
  PortWatcher watcher;
  ASSERT_TRUE(watcher.poll().ok());
  int client = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sa.sin_port = htons(server.port);
  ASSERT_EQ(::connect(client, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  sockaddr_in local{};
  socklen_t local_len = sizeof local;
  ASSERT_EQ(::getsockname(client, reinterpret_cast<sockaddr*>(&local), &local_len), 0);
  auto diff = watcher.poll();
  ASSERT_TRUE(diff.ok());
  // The namespace is shared with whatever else runs (tests in parallel): only these sockets are checked.
  EXPECT_FALSE(contains(diff->added, wire::Proto::Tcp, wire::Family::Inet4, ntohs(local.sin_port)));
  EXPECT_FALSE(contains(diff->added, wire::Proto::Tcp, wire::Family::Inet4, server.port));
  EXPECT_FALSE(contains(diff->removed, wire::Proto::Tcp, wire::Family::Inet4, server.port));
  ::close(client);
}

TEST(PortWatcher, ResetGivesAFullSnapshotAndExcludedPortsStayHidden) {
  BoundSocket mine(AF_INET, SOCK_STREAM);
  BoundSocket other(AF_INET, SOCK_STREAM);
  PortWatcher watcher({mine.port});
  auto first = watcher.poll();
  ASSERT_TRUE(first.ok());
  EXPECT_TRUE(first->full);
  EXPECT_TRUE(contains(first->added, wire::Proto::Tcp, wire::Family::Inet4, other.port));
  EXPECT_FALSE(contains(first->added, wire::Proto::Tcp, wire::Family::Inet4, mine.port));
  // A plain diff after it; what the snapshot reported is not repeated (other processes' sockets may move).
  const auto second = watcher.poll();
  ASSERT_TRUE(second.ok());
  EXPECT_FALSE(second->full);
  EXPECT_FALSE(contains(second->added, wire::Proto::Tcp, wire::Family::Inet4, other.port));
  EXPECT_FALSE(contains(second->removed, wire::Proto::Tcp, wire::Family::Inet4, other.port));
  watcher.reset();
  EXPECT_TRUE(watcher.poll()->full);
}

// The count check runs in a network namespace of its own, where no other process opens sockets meanwhile.
TEST(PortWatcher, ScansOnlyWhenSocketCountsMoved) {
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (unshare(CLONE_NEWNET) != 0) _exit(77);
    // Loopback comes up with its addresses only once set up.
    const int s = ::socket(AF_INET, SOCK_DGRAM, 0);
    ifreq ifr{};
    std::strcpy(ifr.ifr_name, "lo");
    ioctl(s, SIOCGIFFLAGS, &ifr);
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0) _exit(77);
    ::close(s);
    PortWatcher watcher;
    int code = 0;
    if (!watcher.may_have_changed()) code |= 1;  // before the first scan: a snapshot is due
    if (!watcher.poll().ok()) code |= 2;
    if (watcher.may_have_changed()) code |= 4;  // nothing moved since
    BoundSocket udp(AF_INET, SOCK_DGRAM);
    if (!watcher.may_have_changed()) code |= 8;  // a bound UDP socket moves the counts
    if (!watcher.poll().ok() || watcher.may_have_changed()) code |= 16;
    BoundSocket tcp(AF_INET6, SOCK_STREAM);
    if (!watcher.may_have_changed()) code |= 32;  // so does a TCP listener
    watcher.reset();
    (void)watcher.poll();
    tcp.close();
    if (!watcher.may_have_changed()) code |= 64;  // and its going away
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 77) GTEST_SKIP() << "cannot create a network namespace (needs CAP_SYS_ADMIN)";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "failed checks, as bits: " << WEXITSTATUS(status);
}

TEST(PortWatcher, BuildsAPortsMessage) {
  PortDiff diff;
  diff.added.push_back({wire::Proto::Udp, wire::Family::Inet6, "::", 53});
  flatbuffers::FlatBufferBuilder b;
  build_ports_message(diff, b);
  const auto* c = wire::GetControl(b.GetBufferPointer());
  ASSERT_EQ(c->message_type(), wire::Message::Ports);
  ASSERT_EQ(c->message_as_Ports()->added()->size(), 1u);
  EXPECT_EQ(c->message_as_Ports()->added()->Get(0)->port(), 53);
}

TEST(PortWatcher, SplitsBigDiffsRemovalsFirstAndMarksOnlyTheFirstSnapshotPartFull) {
  PortDiff snapshot;
  snapshot.full = true;
  for (uint16_t p = 1; p <= 5; ++p)
    snapshot.added.push_back({wire::Proto::Tcp, wire::Family::Inet4, "0.0.0.0", p});
  const auto parts = split_diff(snapshot, 2);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_TRUE(parts[0].full);
  EXPECT_FALSE(parts[1].full);
  EXPECT_FALSE(parts[2].full);
  EXPECT_EQ(parts[0].added.size(), 2u);
  EXPECT_EQ(parts[2].added.size(), 1u);
  EXPECT_EQ(parts[2].added[0].port, 5);

  PortDiff diff;
  diff.removed.push_back({wire::Proto::Udp, wire::Family::Inet6, "::", 53});
  diff.added.push_back({wire::Proto::Tcp, wire::Family::Inet4, "0.0.0.0", 80});
  diff.added.push_back({wire::Proto::Tcp, wire::Family::Inet4, "0.0.0.0", 81});
  const auto two = split_diff(diff, 2);
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[0].removed.size(), 1u);
  EXPECT_EQ(two[0].added.size(), 1u);
  EXPECT_EQ(two[1].added.size(), 1u);

  PortDiff empty_snapshot;
  empty_snapshot.full = true;
  ASSERT_EQ(split_diff(empty_snapshot, 2000).size(), 1u);
  EXPECT_TRUE(split_diff(empty_snapshot, 2000)[0].full);
}

TEST(PortWatcher, TwoThousandListenersFitFarBelowTheControlLimit) {
  PortDiff diff;
  for (uint16_t p = 0; p < 2000; ++p) {
    diff.added.push_back(
        {wire::Proto::Tcp, wire::Family::Inet6, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff0", p});
  }
  flatbuffers::FlatBufferBuilder b;
  build_ports_message(diff, b);
  EXPECT_LT(b.GetSize(), 256u * 1024);
}

}  // namespace
}  // namespace vbridge::guest
