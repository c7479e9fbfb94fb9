#include "host/agent.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <string>

#include "host/test_loop.h"
#include "protocol/mux_test_util.h"

namespace vbridge {
namespace {

using testing::Loop;

// A unix socket for the agent to dial, in a folder of its own; the test accepts on it as the guest would.
class GuestEnd {
 public:
  GuestEnd() : fd_(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    char folder[] = "/tmp/vbridge-agent-test-XXXXXX";
    folder_ = ::mkdtemp(folder);
    path_ = folder_ + "/transport.sock";
    client_path_ = folder_ + "/client.sock";
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    path_.copy(addr.sun_path, sizeof addr.sun_path - 1);
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(::listen(fd_, 1), 0);
  }
  ~GuestEnd() {
    ::close(fd_);
    ::unlink(path_.c_str());
    ::unlink(client_path_.c_str());
    ::rmdir(folder_.c_str());
  }
  GuestEnd(const GuestEnd&) = delete;
  GuestEnd& operator=(const GuestEnd&) = delete;

  const std::string& path() const { return path_; }
  // Where a host socket forwarded to the guest may go; removed with the folder.
  const std::string& client_path() const { return client_path_; }
  // Takes the agent's connection and closes it: the guest vanished.
  void accept_and_vanish() const {
    const int conn = ::accept(fd_, nullptr, nullptr);
    ASSERT_GE(conn, 0);
    ::close(conn);
  }
  // Takes the agent's connection, completes the guest's half of the handshake (its HELLO) and closes it.
  void accept_hello_and_vanish() const {
    const int conn = ::accept(fd_, nullptr, nullptr);
    ASSERT_GE(conn, 0);
    vbridge::testing::RecordingHandler handler;
    Mux mux(Role::kGuest, handler);
    handler.mux = &mux;
    const std::string hello = vbridge::testing::drain(mux);
    ASSERT_EQ(::write(conn, hello.data(), hello.size()), static_cast<ssize_t>(hello.size()));
    ::close(conn);
  }

 private:
  std::string folder_;
  std::string path_;
  std::string client_path_;
  int fd_ = -1;
};

int connect_unix(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof addr.sun_path - 1);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << path;
  return fd;
}

class AgentTest : public ::testing::Test {
 protected:
  AgentTest() {
    std::signal(SIGPIPE, SIG_IGN);  // as the agent's main does
    config.transport = Address{Address::Kind::kUnix, guest.path()};
    config.ports.follow_guest = false;
  }
  GuestEnd guest;
  Loop loop;
  AgentConfig config;
};

// The guest vanished and the agent is told to stop before it noticed: its GOAWAY finds the transport gone,
// and losing the session then must not pull it out from under the rest of the stop.
TEST_F(AgentTest, StopsCleanlyWhenItsGoawayFindsTheGuestGone) {
  Agent agent(&loop.loop, config);
  ASSERT_TRUE(agent.start().ok());
  guest.accept_and_vanish();
  agent.stop();
  uv_run(&loop.loop, UV_RUN_DEFAULT);  // returns once the agent closed every handle
  EXPECT_NE(agent.status_json().find("\"reconnects\":1"), std::string::npos) << agent.status_json();
}

// Clients wait for the guest; it says HELLO and vanishes. The first waiting client's OPEN then finds the
// transport gone while the HELLO is still being taken in: the session is lost once that read is done (not
// from inside it), and every waiting client hears that its connection ended.
TEST_F(AgentTest, ClientsWaitingForAGuestThatSaysHelloAndVanishesAreClosed) {
  config.unix_forwards.push_back({guest.client_path(), "/run/guest.sock", false});
  Agent agent(&loop.loop, config);
  ASSERT_TRUE(agent.start().ok());
  const int first = connect_unix(guest.client_path());
  const int second = connect_unix(guest.client_path());
  loop.run_until([&] { return agent.status_json().find("\"clients_waiting\":2") != std::string::npos; });
  guest.accept_hello_and_vanish();
  loop.run_until([&] { return agent.status_json().find("\"reconnects\":1") != std::string::npos; });
  char byte = 0;
  for (const int client : {first, second}) {
    EXPECT_EQ(::read(client, &byte, 1), 0) << "a waiting client was not closed";
    ::close(client);
  }
  agent.stop();
  uv_run(&loop.loop, UV_RUN_DEFAULT);
}

}  // namespace
}  // namespace vbridge
