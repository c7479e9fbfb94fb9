#include "protocol/address.h"

#include <gtest/gtest.h>

namespace vbridge {
namespace {

TEST(Address, ParsesEveryKind) {
  auto u = parse_address("unix:/run/x.sock");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->kind, Address::Kind::kUnix);
  EXPECT_EQ(u->path, "/run/x.sock");
  auto t = parse_address("tcp:[::1]:8080");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->path, "::1");
  EXPECT_EQ(t->port, 8080u);
  EXPECT_EQ(t->to_string(), "tcp:[::1]:8080");
  auto v = parse_address("vsock:3:1024");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->cid, 3u);
  EXPECT_EQ(v->port, 1024u);
  auto listen = parse_address("vsock:1024");
  ASSERT_TRUE(listen.ok());
  EXPECT_EQ(listen->port, 1024u);
  auto h = parse_address("hvsock:/tmp/v.sock:1024");
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->path, "/tmp/v.sock");
  EXPECT_EQ(h->port, 1024u);
  auto s = parse_address("serial:vbridge.0");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->kind, Address::Kind::kSerial);
}

TEST(Address, BadInputNamesTheAddressAndTheForms) {
  for (const char* bad : {"", "/tmp/x", "tcp:host", "tcp:h:99999", "ftp:x:1", "vsock:x:1", "unix:"}) {
    auto r = parse_address(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.error().message.find("expected unix:/path"), std::string::npos);
  }
}

}  // namespace
}  // namespace vbridge
