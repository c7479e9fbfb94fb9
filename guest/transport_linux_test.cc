#include "guest/transport_linux.h"

#include <gtest/gtest.h>
#include <linux/vm_sockets.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

namespace vbridge::guest {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vbridge-transport-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void write_file(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << text;
}

TEST(SerialPort, AbsolutePathIsTakenAsIs) {
  auto found = find_serial_port("/dev/hvc1");
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(*found, "/dev/hvc1");
}

TEST(SerialPort, UdevLinkWins) {
  TempDir dir;
  write_file(dir.path() / "dev/virtio-ports/vbridge", "");
  const SerialPaths paths{(dir.path() / "sys").string(), (dir.path() / "dev").string()};
  auto found = find_serial_port("vbridge", paths);
  ASSERT_TRUE(found.ok()) << found.error().message;
  EXPECT_EQ(*found, (dir.path() / "dev/virtio-ports/vbridge").string());
}

TEST(SerialPort, FoundByNameInSysfsWithoutUdev) {
  TempDir dir;
  write_file(dir.path() / "sys/vport0p1/name", "org.qemu.guest_agent.0\n");
  write_file(dir.path() / "sys/vport1p1/name", "vbridge\n");
  const SerialPaths paths{(dir.path() / "sys").string(), (dir.path() / "dev").string()};
  auto found = find_serial_port("vbridge", paths);
  ASSERT_TRUE(found.ok()) << found.error().message;
  EXPECT_EQ(*found, (dir.path() / "dev/vport1p1").string());
}

TEST(SerialPort, MissingNameIsAClearError) {
  TempDir dir;
  write_file(dir.path() / "sys/vport0p1/name", "other\n");
  const SerialPaths paths{(dir.path() / "sys").string(), (dir.path() / "dev").string()};
  auto found = find_serial_port("vbridge", paths);
  ASSERT_FALSE(found.ok());
  EXPECT_NE(found.error().message.find("no virtio-serial port"), std::string::npos);
}

TEST(UnixListener, ReplacesAStaleSocketFile) {
  TempDir dir;
  const std::string path = (dir.path() / "agent.sock").string();
  {
    auto first = TransportEndpoint::open(*parse_address("unix:" + path));
    ASSERT_TRUE(first.ok()) << first.error().message;
  }
  // A socket file nobody listens on, as a crashed agent leaves behind.
  const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::strcpy(sun.sun_path, path.c_str());
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)), 0);
  close(fd);
  auto second = TransportEndpoint::open(*parse_address("unix:" + path));
  ASSERT_TRUE(second.ok()) << second.error().message;
  EXPECT_EQ(second->kind(), TransportKind::kListener);
}

TEST(UnixListener, RefusesToStealALiveListener) {
  TempDir dir;
  const std::string path = (dir.path() / "agent.sock").string();
  auto first = TransportEndpoint::open(*parse_address("unix:" + path));
  ASSERT_TRUE(first.ok());
  auto second = TransportEndpoint::open(*parse_address("unix:" + path));
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.error().message.find("another process is listening"), std::string::npos);
}

// A killed agent's listener outlives the process for a few milliseconds (the kernel tears its io_uring down
// in the background, and a pending accept holds the socket): an agent restarted at once takes the path over.
TEST(UnixListener, ReplacesAListenerWhoseProcessHasExited) {
  TempDir dir;
  const std::string path = (dir.path() / "agent.sock").string();
  // This process keeps the socket open; the child that put it into listen() (whose pid the socket carries,
  // as the agent's does) exits and is reaped.
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::strcpy(sun.sun_path, path.c_str());
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof(sun)), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) _exit(listen(fd, 8) == 0 ? 0 : 1);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  auto endpoint = TransportEndpoint::open(*parse_address("unix:" + path));
  ASSERT_TRUE(endpoint.ok()) << endpoint.error().message;
  EXPECT_EQ(endpoint->kind(), TransportKind::kListener);
  close(fd);
}

TEST(UnixListener, RemovesItsSocketFileOnClose) {
  TempDir dir;
  const std::string path = (dir.path() / "agent.sock").string();
  { auto ep = TransportEndpoint::open(*parse_address("unix:" + path)); }
  EXPECT_FALSE(fs::exists(path));
}

TEST(UnixListener, RefusesToReplaceARegularFile) {
  TempDir dir;
  const std::string path = (dir.path() / "agent.sock").string();
  write_file(path, "data");
  EXPECT_FALSE(TransportEndpoint::open(*parse_address("unix:" + path)).ok());
  EXPECT_TRUE(fs::exists(path));
}

TEST(TcpListener, PortZeroReportsTheChosenPort) {
  auto ep = TransportEndpoint::open(*parse_address("tcp:127.0.0.1:0"));
  ASSERT_TRUE(ep.ok()) << ep.error().message;
  EXPECT_NE(ep->address().port, 0u);
}

TEST(Vsock, OnlyTheHostCidIsAccepted) {
  sockaddr_storage ss{};
  auto* svm = reinterpret_cast<sockaddr_vm*>(&ss);
  svm->svm_family = AF_VSOCK;
  svm->svm_cid = 2;
  EXPECT_TRUE(check_vsock_peer(ss, sizeof(sockaddr_vm)).ok());
  svm->svm_cid = 3;  // another guest
  auto refused = check_vsock_peer(ss, sizeof(sockaddr_vm));
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message.find("CID 3"), std::string::npos);
  ss.ss_family = AF_UNIX;
  EXPECT_FALSE(check_vsock_peer(ss, sizeof(sockaddr_vm)).ok());
}

TEST(Transport, HybridVsockIsNotAGuestTransport) {
  auto ep = TransportEndpoint::open(*parse_address("hvsock:/tmp/x.sock:1024"));
  ASSERT_FALSE(ep.ok());
  EXPECT_NE(ep.error().message.find("vsock:PORT"), std::string::npos);
}

}  // namespace
}  // namespace vbridge::guest
