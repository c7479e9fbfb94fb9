#include "host/socket_bridge.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>

#include "host/session.h"
#include "host/test_loop.h"
#include "protocol/mux_test_util.h"

namespace vbridge {
namespace {

using testing::Loop;

class ReadyObserver : public SessionObserver {
 public:
  bool ready = false;
  void on_session_ready(const Hello&) override { ready = true; }
  void on_session_lost(const Error& error) override { ADD_FAILURE() << "session lost: " << error.message; }
  void on_control(const wire::Control&) override {}
  StreamSink* on_stream_open(Session&, StreamId, const wire::Target&) override { return nullptr; }
};

class NullOwner : public BridgeOwner {
 public:
  void bridge_done(SocketBridge*) override {}
};

// The test plays the guest: a Mux of its own on the far end of the transport socket.
class FakeGuest {
 public:
  explicit FakeGuest(int fd) : fd_(fd) { handler.mux = &mux; }
  ~FakeGuest() { ::close(fd_); }
  // Writes what the guest mux has to send.
  void send() {
    const std::string bytes = testing::drain(mux);
    ASSERT_EQ(::write(fd_, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  }
  // Feeds the guest mux whatever the host has written so far, without waiting for more.
  void receive() {
    char buf[64 * 1024];
    ssize_t n = 0;
    while ((n = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
      ASSERT_TRUE(mux.feed(testing::to_slice(pool, std::string_view(buf, static_cast<size_t>(n)))).ok());
    }
  }

  BufferPool pool{256 * 1024, 16};
  testing::RecordingHandler handler;
  Mux mux{Role::kGuest, handler};

 private:
  int fd_;
};

// A client that speaks first (the docker CLI's request) has its bytes read as its stream opens: the guest
// receives OPEN and the bytes together, before the host's loop turns again.
TEST(SocketBridge, AClientsFirstBytesLeaveWithItsOpen) {
  Loop l;
  BufferPool pool(256 * 1024, 16);
  int transport[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, transport), 0);
  FakeGuest guest(transport[1]);
  ReadyObserver observer;
  Session session(&l.loop, UniqueFd(transport[0]), pool, observer, MuxConfig{});
  guest.send();
  l.run_until([&] { return observer.ready; });
  guest.receive();

  int client[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, client), 0);
  const std::string request = "GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n";
  ASSERT_EQ(::write(client[1], request.data(), request.size()), static_cast<ssize_t>(request.size()));
  ReadArena arena(pool);
  NullOwner owner;
  BridgeOptions options{testing::unix_target("/run/docker.sock"), "docker", true, false};
  auto bridge = std::make_unique<SocketBridge>(&l.loop, UniqueFd(client[0]), arena, owner, options);
  bridge->attach(session);

  guest.receive();  // no loop turn in between
  ASSERT_EQ(guest.handler.count("open"), 1u);
  StreamId id = 0;
  for (const testing::Event& e : guest.handler.events) {
    if (e.kind == "open") id = e.id;
  }
  EXPECT_EQ(guest.handler.data_of(id), request);
  ::close(client[1]);
}

}  // namespace
}  // namespace vbridge
