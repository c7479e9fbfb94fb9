#include "host/bulk_reader.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "host/test_loop.h"

namespace vbridge {
namespace {

using testing::Loop;  // the worker's result is an event of the loop

struct SocketPair {
  int fds[2];
  SocketPair() { EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0); }
  ~SocketPair() {
    ::close(fds[0]);
    if (fds[1] >= 0) ::close(fds[1]);
  }
};

TEST(BulkReader, ReadsIntoTheReservedMemoryAndReportsOnTheLoop) {
  Loop l;
  BufferPool pool(64 * 1024, 4);
  BulkReader reader(&l.loop);
  SocketPair sp;
  ASSERT_EQ(::write(sp.fds[1], "bulk bytes", 10), 10);
  Slice into = pool.acquire();
  const std::byte* where = into.data();
  std::string got;
  bool called = false;
  ASSERT_NE(reader.submit(sp.fds[0], std::move(into),
                          [&](Slice bytes, int error) {
                            EXPECT_EQ(error, 0);
                            EXPECT_EQ(bytes.data(), where);  // the reserved memory itself, no copy
                            got.assign(reinterpret_cast<const char*>(bytes.data()), bytes.size());
                            called = true;
                          }),
            0u);
  l.run_until([&] { return called; });
  EXPECT_EQ(got, "bulk bytes");
  reader.close();
  EXPECT_EQ(pool.stats().in_use, 0u);
}

TEST(BulkReader, EndOfStreamIsAnEmptySliceWithoutError) {
  Loop l;
  BufferPool pool(4096, 4);
  BulkReader reader(&l.loop);
  SocketPair sp;
  ::close(sp.fds[1]);
  sp.fds[1] = -1;
  bool eof = false;
  reader.submit(sp.fds[0], pool.acquire(),
                [&](Slice bytes, int error) { eof = bytes.empty() && error == 0; });
  l.run_until([&] { return eof; });
  reader.close();
}

TEST(BulkReader, ForgottenReadKeepsItsMemoryUntilTheWorkerIsDone) {
  Loop l;
  BufferPool pool(4096, 4);
  BulkReader reader(&l.loop);
  SocketPair sp;
  ASSERT_EQ(::write(sp.fds[1], "x", 1), 1);
  bool called = false;
  const uint64_t token = reader.submit(sp.fds[0], pool.acquire(), [&](Slice, int) { called = true; });
  // The caller goes away, and so does its descriptor: the worker reads its own duplicate.
  reader.forget(token);
  ::close(sp.fds[0]);
  sp.fds[0] = ::open("/dev/null", O_RDONLY);
  l.run_until([&] { return reader.reads() == 1; });
  EXPECT_FALSE(called);
  EXPECT_EQ(pool.stats().in_use, 0u);
  reader.close();
}

TEST(BulkReader, NothingIsQueuedAfterClose) {
  Loop l;
  BufferPool pool(4096, 4);
  BulkReader reader(&l.loop);
  reader.close();
  SocketPair sp;
  EXPECT_EQ(reader.submit(sp.fds[0], pool.acquire(), [](Slice, int) {}), 0u);
  EXPECT_EQ(pool.stats().in_use, 0u);
}

}  // namespace
}  // namespace vbridge
