// Piped payload (Mux::send_piped): bytes that wait in a kernel pipe and leave by splice, mixed with bytes in
// memory. The transport here is a socketpair, so the splice is the real one.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "protocol/mux_test_util.h"

namespace vbridge::testing {
namespace {

StreamId open_stream(Pair& p) {
  auto id = p.host.open(unix_target("/run/app.sock"));
  EXPECT_TRUE(id.ok());
  p.settle();
  return *id;
}

// Puts `bytes` into the pipe as a producer would and tells the mux.
void pipe_in(Mux& mux, StreamId id, const std::shared_ptr<Pipe>& pipe, const std::string& bytes) {
  ASSERT_EQ(::write(pipe->write_fd(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  pipe->filled += bytes.size();
  ASSERT_TRUE(mux.send_piped(id, pipe, bytes.size()));
}

// Writes what `from` has for the transport into one end of a socketpair (gather writes and real splices,
// at most `splice_step` bytes per splice) and feeds what arrives at the other end to `to`.
void pump_spliced(Mux& from, Mux& to, BufferPool& pool, size_t splice_step = SIZE_MAX) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
  iovec iov[64];
  auto drain_into_peer = [&] {
    for (;;) {
      Slice buf = pool.acquire();
      const ssize_t n = ::read(sv[1], buf.data(), pool.block_size());
      if (n <= 0) return;
      ASSERT_TRUE(to.feed(buf.sub(0, static_cast<size_t>(n))).ok());
    }
  };
  for (;;) {
    const size_t count = from.prepare_output(iov);
    ssize_t n;
    if (count != 0) {
      n = ::writev(sv[0], iov, static_cast<int>(count));
    } else if (const auto piped = from.piped_output()) {
      n = ::splice(piped->pipe->read_fd(), nullptr, sv[0], nullptr, std::min(piped->size, splice_step), 0);
    } else {
      break;
    }
    ASSERT_GT(n, 0);
    from.consume_output(static_cast<size_t>(n));
    drain_into_peer();
  }
  drain_into_peer();
  ::close(sv[0]);
  ::close(sv[1]);
}

TEST(MuxPipe, PipedAndMemoryBytesArriveInOrder) {
  Pair p;
  const StreamId id = open_stream(p);
  auto pipe = Pipe::create(kPipeBytes);
  ASSERT_TRUE(pipe.ok());
  std::string expected;
  ASSERT_TRUE(p.host.send(id, text_slice(p.pool, "head;")));
  expected += "head;";
  const std::string bulk(200 * 1024, 'b');  // more than one quantum: cut into several frames
  pipe_in(p.host, id, *pipe, bulk);
  expected += bulk;
  ASSERT_TRUE(p.host.send(id, text_slice(p.pool, ";middle;")));
  expected += ";middle;";
  pipe_in(p.host, id, *pipe, "tail");
  expected += "tail";
  pump_spliced(p.host, p.guest, p.pool);
  EXPECT_EQ(p.guest_handler.data_of(id), expected);
  EXPECT_EQ((*pipe)->filled, 0u);
  EXPECT_FALSE(p.host.piped_output().has_value());
}

TEST(MuxPipe, PartialSplicesResumeWhereTheyStopped) {
  Pair p;
  const StreamId id = open_stream(p);
  auto pipe = Pipe::create(kPipeBytes);
  ASSERT_TRUE(pipe.ok());
  std::string bulk(100 * 1024, '\0');
  for (size_t i = 0; i < bulk.size(); ++i) bulk[i] = static_cast<char>('a' + i % 26);
  pipe_in(p.host, id, *pipe, bulk);
  pump_spliced(p.host, p.guest, p.pool, 1000);  // odd-sized pieces of every frame
  EXPECT_EQ(p.guest_handler.data_of(id), bulk);
}

TEST(MuxPipe, ReadersOfTheStreamAndOthersInterleave) {
  Pair p;
  const StreamId bulk_id = open_stream(p);
  const StreamId small_id = open_stream(p);
  auto pipe = Pipe::create(kPipeBytes);
  ASSERT_TRUE(pipe.ok());
  pipe_in(p.host, bulk_id, *pipe, std::string(512 * 1024, 'x'));
  ASSERT_TRUE(p.host.send(small_id, text_slice(p.pool, "ping")));
  pump_spliced(p.host, p.guest, p.pool);
  EXPECT_EQ(p.guest_handler.data_of(small_id), "ping");
  EXPECT_EQ(p.guest_handler.data_of(bulk_id).size(), 512u * 1024);
  // Round-robin: the small stream's bytes arrived before the bulk stream's last.
  size_t small_at = 0, last_bulk_at = 0;
  for (size_t i = 0; i < p.guest_handler.events.size(); ++i) {
    const Event& e = p.guest_handler.events[i];
    if (e.kind == "data" && e.id == small_id) small_at = i;
    if (e.kind == "data" && e.id == bulk_id) last_bulk_at = i;
  }
  EXPECT_LT(small_at, last_bulk_at);
}

TEST(MuxPipe, QueuedPipedFrameKeepsItsPipeAfterAReset) {
  Pair p;
  const StreamId id = open_stream(p);
  auto created = Pipe::create(kPipeBytes);
  ASSERT_TRUE(created.ok());
  std::shared_ptr<Pipe> pipe = std::move(*created);
  pipe_in(p.host, id, pipe, "framed before the reset");
  iovec iov[8];
  (void)p.host.prepare_output(iov);  // the frame is cut and queued for the transport
  p.host.reset(id, "client went away");
  std::weak_ptr<Pipe> watch = pipe;
  pipe.reset();  // the bridge that owned it is gone
  EXPECT_FALSE(watch.expired()) << "the queued frame still needs the pipe";
  pump_spliced(p.host, p.guest, p.pool);
  EXPECT_TRUE(watch.expired()) << "released once its frame was written";
  EXPECT_EQ(p.guest_handler.data_of(id), "framed before the reset");
  EXPECT_EQ(p.guest_handler.count("reset"), 1u);
}

TEST(MuxPipe, ClosedStreamRefusesPipedBytes) {
  Pair p;
  const StreamId id = open_stream(p);
  auto pipe = Pipe::create(64 * 1024);
  ASSERT_TRUE(pipe.ok());
  p.host.shutdown_write(id);
  EXPECT_FALSE(p.host.send_piped(id, *pipe, 10));
}

}  // namespace
}  // namespace vbridge::testing
