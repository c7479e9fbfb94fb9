#include "guest/uring_loop.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <vector>

#include "guest/read_buffers.h"

namespace vbridge::guest {
namespace {

TEST(Tag, RoundTripsEveryField) {
  const Tag t{Op::kConnWrite, 0xabcdef, 0xfedcba98};
  EXPECT_EQ(Tag::unpack(t.pack()), t);
  const Tag agent{Op::kAccept, 0, 0};
  EXPECT_EQ(Tag::unpack(agent.pack()), agent);
}

TEST(Tag, OwnerIsMaskedTo24Bits) {
  const Tag t{Op::kDial, 0x1234567, 7};
  EXPECT_EQ(Tag::unpack(t.pack()).owner, 0x234567u);
  EXPECT_EQ(Tag::unpack(t.pack()).op, Op::kDial);
}

class LoopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loop = UringLoop::create(64);
    if (!loop) GTEST_SKIP() << "io_uring unavailable: " << loop.error().message;
    loop_ = std::move(*loop);
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds_), 0);
  }
  void TearDown() override {
    if (fds_[0] >= 0) close(fds_[0]);
    if (fds_[1] >= 0) close(fds_[1]);
  }
  // Submits and collects completions until `want` arrived.
  std::vector<io_uring_cqe> wait(size_t want) {
    std::vector<io_uring_cqe> got;
    while (got.size() < want) {
      EXPECT_TRUE(loop_->submit_and_wait().ok());
      loop_->drain([&](const io_uring_cqe& cqe) { got.push_back(cqe); });
    }
    return got;
  }
  void send_text(const std::string& text) {
    ASSERT_EQ(write(fds_[1], text.data(), text.size()), static_cast<ssize_t>(text.size()));
  }
  static std::string text_of(const Slice& s) {
    return std::string(reinterpret_cast<const char*>(s.data()), s.size());
  }

  BufferPool pool_{4096, 16};
  std::unique_ptr<UringLoop> loop_;
  int fds_[2] = {-1, -1};
};

// The guest agent's loop wakes up for a deadline (a batch of bulk bytes due) even when nothing completes.
TEST_F(LoopTest, WaitWithATimeoutReturnsWhenNothingCompletes) {
  ASSERT_TRUE(loop_->submit_and_wait(std::chrono::milliseconds(2)).ok());
  ASSERT_TRUE(loop_->submit_and_wait(std::chrono::nanoseconds(-5)).ok());  // a deadline already past
  size_t completions = 0;
  loop_->drain([&](const io_uring_cqe&) { ++completions; });
  EXPECT_EQ(completions, 0u);  // nothing of liburing's own reaches the handler
}

TEST_F(LoopTest, CompletionCarriesItsTag) {
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kConnShutdown, 5, 9});
  io_uring_prep_nop(sqe);
  const auto got = wait(1);
  EXPECT_EQ(Tag::unpack(got[0].user_data), (Tag{Op::kConnShutdown, 5, 9}));
}

TEST_F(LoopTest, FullSubmissionQueueIsSubmittedEarly) {
  for (int i = 0; i < 200; ++i) io_uring_prep_nop(loop_->sqe(Tag{Op::kNone, 0, uint32_t(i)}));
  EXPECT_GT(loop_->stats().early_submits, 0u);
  EXPECT_EQ(wait(200).size(), 200u);
}

TEST_F(LoopTest, CancelEndsAPendingRead) {
  Slice hold = pool_.acquire();
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kConnRead, 1, 2});
  io_uring_prep_recv(sqe, fds_[0], hold.data(), 16, 0);
  loop_->cancel(Tag{Op::kConnRead, 1, 2});
  const auto got = wait(2);
  bool cancelled = false;
  for (const auto& cqe : got) {
    if (Tag::unpack(cqe.user_data).op == Op::kConnRead) cancelled = cqe.res == -ECANCELED;
  }
  EXPECT_TRUE(cancelled);
}

TEST_F(LoopTest, RingBuffersAreOwnedByTheSliceAfterCompletion) {
  auto rb = ReadBuffers::ring(*loop_, pool_, 3, 4);
  if (!rb) GTEST_SKIP() << rb.error().message;
  ReadBuffers& buffers = **rb;
  EXPECT_EQ(pool_.stats().in_use, 4u);  // every ring slot holds one pool buffer

  Slice hold;
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kConnRead, 1, 1});
  io_uring_prep_recv(sqe, fds_[0], nullptr, 0, 0);
  buffers.attach(sqe, 5, hold);
  EXPECT_TRUE(hold.empty());  // ring mode pins nothing while waiting
  send_text("hello world");
  const auto got = wait(1);
  Slice data = buffers.complete(got[0], hold);
  EXPECT_EQ(text_of(data), "hello");    // the read length bound holds
  EXPECT_EQ(pool_.stats().in_use, 5u);  // the slot was refilled; the Slice keeps its buffer
  data.reset();
  EXPECT_EQ(pool_.stats().in_use, 4u);
}

TEST_F(LoopTest, MultishotRecvDeliversEachChunkInItsOwnBuffer) {
  auto rb = ReadBuffers::ring(*loop_, pool_, 4, 4);
  if (!rb) GTEST_SKIP() << rb.error().message;
  Slice hold;
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kTransportRead, 1, 0});
  io_uring_prep_recv_multishot(sqe, fds_[0], nullptr, 0, 0);
  (*rb)->attach(sqe, 0, hold);
  std::string seen;
  for (const char* chunk : {"one ", "two ", "three"}) {
    send_text(chunk);
    const auto got = wait(1);
    if (got[0].res == -EINVAL) GTEST_SKIP() << "kernel lacks multishot recv";
    ASSERT_GT(got[0].res, 0);
    EXPECT_TRUE(got[0].flags & IORING_CQE_F_MORE);
    seen += text_of((*rb)->complete(got[0], hold));
  }
  EXPECT_EQ(seen, "one two three");
  shutdown(fds_[1], SHUT_WR);
  const auto end = wait(1);
  EXPECT_EQ(end[0].res, 0);
  EXPECT_FALSE(end[0].flags & IORING_CQE_F_MORE);
  EXPECT_TRUE((*rb)->complete(end[0], hold).empty());
}

TEST_F(LoopTest, PlainBuffersAreHeldUntilCompletion) {
  auto rb = ReadBuffers::plain(pool_);
  Slice hold;
  io_uring_sqe* sqe = loop_->sqe(Tag{Op::kConnRead, 1, 1});
  io_uring_prep_recv(sqe, fds_[0], nullptr, 0, 0);
  rb->attach(sqe, 0, hold);
  EXPECT_FALSE(hold.empty());
  send_text("plain");
  const auto got = wait(1);
  Slice data = rb->complete(got[0], hold);
  EXPECT_TRUE(hold.empty());
  EXPECT_EQ(text_of(data), "plain");
}

}  // namespace
}  // namespace vbridge::guest
