#include "guest/targets.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/un.h>

namespace vbridge::guest {
namespace {

wire::TargetT unix_target(const std::string& path) {
  wire::TargetT t;
  t.proto = wire::Proto::Unix;
  t.path = path;
  return t;
}

wire::TargetT port_target(uint16_t port, wire::Proto proto = wire::Proto::Tcp,
                          wire::Family family = wire::Family::Unspec, const std::string& host = "") {
  wire::TargetT t;
  t.proto = proto;
  t.family = family;
  t.port = port;
  t.host = host;
  return t;
}

TargetPolicy policy(TargetConfig config = {}) {
  auto p = TargetPolicy::create(std::move(config));
  EXPECT_TRUE(p.ok()) << p.error().message;
  return std::move(*p);
}

std::string unix_path_of(const DialPlan& plan) {
  EXPECT_EQ(plan.addresses.size(), 1u);
  return reinterpret_cast<const sockaddr_un*>(&plan.addresses[0].storage)->sun_path;
}

void expect_refused(const Result<DialPlan>& r, int err, const std::string& needle) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kRefused);
  EXPECT_EQ(r.error().errno_value, err);
  EXPECT_NE(r.error().message.find(needle), std::string::npos) << r.error().message;
}

TEST(Targets, DockerNameReachesTheDefaultSocket) {
  auto plan = policy().resolve(unix_target("docker"));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(unix_path_of(*plan), "/var/run/docker.sock");
  EXPECT_EQ(plan->description, "guest socket /var/run/docker.sock");
}

TEST(Targets, DockerNameFollowsDockerSocketFlag) {
  TargetConfig c;
  c.docker_socket = "/run/user/1000/docker.sock";
  auto plan = policy(c).resolve(unix_target("docker"));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(unix_path_of(*plan), "/run/user/1000/docker.sock");
}

TEST(Targets, NamedForwardResolvesToItsPath) {
  TargetConfig c;
  c.forwards["ssh-agent"] = "/run/ssh-agent.sock";
  auto plan = policy(c).resolve(unix_target("ssh-agent"));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(unix_path_of(*plan), "/run/ssh-agent.sock");
}

TEST(Targets, UnknownNameIsRefusedNamingTheForwardFlag) {
  expect_refused(policy().resolve(unix_target("nope")), EACCES, "--forward nope=");
}

TEST(Targets, AbsolutePathNeedsAllowUnix) {
  expect_refused(policy().resolve(unix_target("/etc/secret.sock")), EACCES, "--allow-unix /etc/secret.sock");
  TargetConfig c;
  c.allow_unix.insert("/etc/secret.sock");
  auto plan = policy(c).resolve(unix_target("/etc/secret.sock"));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(unix_path_of(*plan), "/etc/secret.sock");
}

TEST(Targets, ConfiguredDestinationsMayBeNamedByPath) {
  TargetConfig c;
  c.forwards["x"] = "/run/x.sock";
  const TargetPolicy p = policy(c);
  EXPECT_TRUE(p.resolve(unix_target("/var/run/docker.sock")).ok());
  EXPECT_TRUE(p.resolve(unix_target("/run/x.sock")).ok());
}

// Regression guard: the allow-list compares exact strings, so no spelling of a path widens it.
TEST(Targets, PathTricksDoNotMatchAllowedPaths) {
  TargetConfig c;
  c.allow_unix.insert("/run/ok.sock");
  const TargetPolicy p = policy(c);
  expect_refused(p.resolve(unix_target("/run/../run/ok.sock")), EACCES, "--allow-unix");
  expect_refused(p.resolve(unix_target("/run//ok.sock")), EACCES, "--allow-unix");
  expect_refused(p.resolve(unix_target(std::string("/run/ok.sock\0x", 14))), EACCES,
                 "neither a forward name");
}

// Issue 8: a hostile host's target is refused without being echoed back whole.
TEST(Targets, OverLongAndNonPrintableTargetsAreRefusedAndShownShort) {
  const TargetPolicy p = policy();
  auto r = p.resolve(unix_target("/" + std::string(4000, 'a')));
  expect_refused(r, EACCES, "(4001 bytes) is neither a forward name");
  EXPECT_LT(r.error().message.size(), 200u);
  EXPECT_EQ(TargetPolicy::describe(unix_target("/tmp/\xff\x01")), "/tmp/\\xff\\x01");
}

TEST(Targets, EmptyPathIsInvalid) { expect_refused(policy().resolve(unix_target("")), EINVAL, "no target"); }

TEST(Targets, PortsNeedAllowPorts) {
  expect_refused(policy().resolve(port_target(8080)), EACCES, "--allow-ports");
  expect_refused(policy().resolve(port_target(53, wire::Proto::Udp)), EACCES, "--allow-ports");
}

TEST(Targets, AllowedPortDialsLoopbackOfTheFamily) {
  TargetConfig c;
  c.allow_ports = true;
  const TargetPolicy p = policy(c);

  auto any = p.resolve(port_target(8080));
  ASSERT_TRUE(any.ok());
  ASSERT_EQ(any->addresses.size(), 2u);  // 127.0.0.1 first, then ::1
  EXPECT_EQ(any->addresses[0].family(), AF_INET);
  EXPECT_EQ(any->addresses[1].family(), AF_INET6);
  const auto* sin = reinterpret_cast<const sockaddr_in*>(&any->addresses[0].storage);
  EXPECT_EQ(ntohs(sin->sin_port), 8080);
  EXPECT_EQ(ntohl(sin->sin_addr.s_addr), INADDR_LOOPBACK);

  auto v6 = p.resolve(port_target(8080, wire::Proto::Tcp, wire::Family::Inet6));
  ASSERT_TRUE(v6.ok());
  ASSERT_EQ(v6->addresses.size(), 1u);
  EXPECT_EQ(v6->addresses[0].family(), AF_INET6);

  auto named = p.resolve(port_target(80, wire::Proto::Tcp, wire::Family::Unspec, "127.0.0.1"));
  ASSERT_TRUE(named.ok());
  EXPECT_EQ(named->addresses.size(), 1u);
}

TEST(Targets, NonLoopbackHostsAreRefused) {
  TargetConfig c;
  c.allow_ports = true;
  expect_refused(policy(c).resolve(port_target(80, wire::Proto::Tcp, wire::Family::Inet4, "10.0.0.1")),
                 EACCES, "only loopback");
}

TEST(Targets, UdpPortDialsADatagramSocket) {
  TargetConfig c;
  c.allow_ports = true;
  auto plan = policy(c).resolve(port_target(53, wire::Proto::Udp, wire::Family::Inet4));
  ASSERT_TRUE(plan.ok()) << plan.error().message;
  EXPECT_EQ(plan->socket_type, SOCK_DGRAM);
  ASSERT_EQ(plan->addresses.size(), 1u);
  EXPECT_EQ(plan->addresses[0].family(), AF_INET);
  EXPECT_EQ(plan->description, "guest udp port 127.0.0.1:53");
}

TEST(Targets, PortsTheWatcherReportsAreAllowedWithoutAllowPorts) {
  const TargetPolicy p = policy();
  const std::set<PortEntry> listeners = {{wire::Proto::Tcp, wire::Family::Inet4, "127.0.0.1", 8080},
                                         {wire::Proto::Udp, wire::Family::Inet6, "::", 5353}};
  auto tcp = p.resolve(port_target(8080, wire::Proto::Tcp, wire::Family::Inet4, "127.0.0.1"), &listeners);
  ASSERT_TRUE(tcp.ok()) << tcp.error().message;
  EXPECT_EQ(tcp->socket_type, SOCK_STREAM);
  auto udp = p.resolve(port_target(5353, wire::Proto::Udp, wire::Family::Inet6, "::1"), &listeners);
  ASSERT_TRUE(udp.ok()) << udp.error().message;
  EXPECT_EQ(udp->addresses[0].family(), AF_INET6);
  // Another port, or the same port of the other protocol: nothing listens there.
  expect_refused(p.resolve(port_target(8081), &listeners), EACCES, "no guest tcp listener on port 8081");
  expect_refused(p.resolve(port_target(8080, wire::Proto::Udp), &listeners), EACCES, "--allow-ports");
}

TEST(Targets, ListenerAddressesMayBeDialedOtherAddressesNot) {
  const TargetPolicy p = policy();
  const std::set<PortEntry> listeners = {{wire::Proto::Tcp, wire::Family::Inet4, "10.1.2.3", 80},
                                         {wire::Proto::Tcp, wire::Family::Inet6, "fd00::5", 80}};
  auto v4 = p.resolve(port_target(80, wire::Proto::Tcp, wire::Family::Inet4, "10.1.2.3"), &listeners);
  ASSERT_TRUE(v4.ok()) << v4.error().message;
  EXPECT_EQ(v4->description, "guest port 10.1.2.3:80");
  auto v6 = p.resolve(port_target(80, wire::Proto::Tcp, wire::Family::Inet6, "fd00:0::5"), &listeners);
  ASSERT_TRUE(v6.ok()) << v6.error().message;
  EXPECT_EQ(v6->description, "guest port [fd00::5]:80");
  expect_refused(p.resolve(port_target(80, wire::Proto::Tcp, wire::Family::Inet4, "10.1.2.4"), &listeners),
                 EACCES, "only loopback");
  expect_refused(p.resolve(port_target(80, wire::Proto::Tcp, wire::Family::Inet4, "example.com"), &listeners),
                 EINVAL, "numeric");
  // Any address of 127/8 is loopback.
  EXPECT_TRUE(
      p.resolve(port_target(80, wire::Proto::Tcp, wire::Family::Inet4, "127.0.0.2"), &listeners).ok());
}

TEST(Targets, PortZeroIsInvalid) {
  TargetConfig c;
  c.allow_ports = true;
  expect_refused(policy(c).resolve(port_target(0)), EINVAL, "port 0");
}

TEST(Targets, BadConfigurationIsRejectedUpFront) {
  TargetConfig relative;
  relative.allow_unix.insert("run/x.sock");
  EXPECT_FALSE(TargetPolicy::create(relative).ok());
  TargetConfig docker_name;
  docker_name.forwards["docker"] = "/run/other.sock";
  EXPECT_FALSE(TargetPolicy::create(docker_name).ok());
  TargetConfig too_long;
  too_long.docker_socket = "/" + std::string(200, 'x');
  EXPECT_FALSE(TargetPolicy::create(too_long).ok());
}

TEST(Targets, ParseForward) {
  auto ok = parse_forward("agent=/run/agent.sock");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->first, "agent");
  EXPECT_EQ(ok->second, "/run/agent.sock");
  EXPECT_FALSE(parse_forward("agent").ok());
  EXPECT_FALSE(parse_forward("=/x").ok());
  EXPECT_FALSE(parse_forward("x=").ok());
}

TEST(Targets, Describe) {
  EXPECT_EQ(TargetPolicy::describe(unix_target("docker")), "docker");
  EXPECT_EQ(TargetPolicy::describe(port_target(80)), "tcp:80");
  EXPECT_EQ(TargetPolicy::describe(port_target(53, wire::Proto::Udp, wire::Family::Unspec, "::1")),
            "udp:::1:53");
}

}  // namespace
}  // namespace vbridge::guest
