#include "protocol/buffer.h"

#include <gtest/gtest.h>

#include <deque>
#include <string>

namespace vbridge {
namespace {

TEST(BufferPool, SliceSharesBytesAndReturnsBufferWhenLastReferenceGoes) {
  BufferPool pool(4096, 4);
  {
    Slice whole = pool.acquire();
    EXPECT_EQ(whole.size(), 4096u);
    whole.data()[10] = std::byte{42};
    Slice part = whole.sub(10, 5);
    EXPECT_EQ(part.data(), whole.data() + 10);
    EXPECT_EQ(part.data()[0], std::byte{42});
    EXPECT_EQ(whole.buffer()->refs(), 2u);
    whole.reset();
    EXPECT_EQ(pool.stats().in_use, 1u);
  }
  EXPECT_EQ(pool.stats().in_use, 0u);
  EXPECT_EQ(pool.stats().live, 1u);  // cached for reuse
  Slice again = pool.acquire();
  EXPECT_EQ(pool.stats().allocated, 1u);
}

TEST(BufferPool, FreesBeyondCacheLimit) {
  BufferPool pool(1024, 1);
  {
    Slice a = pool.acquire();
    Slice b = pool.acquire();
    EXPECT_EQ(pool.stats().live, 2u);
  }
  EXPECT_EQ(pool.stats().live, 1u);
}

TEST(BufferPool, AdvanceDropsPrefixAndReleasesWhenEmpty) {
  BufferPool pool(1024, 1);
  Slice s = pool.acquire().sub(0, 100);
  s.advance(60);
  EXPECT_EQ(s.size(), 40u);
  s.advance(40);
  EXPECT_TRUE(s.empty());
  EXPECT_EQ(s.buffer(), nullptr);
  EXPECT_EQ(pool.stats().in_use, 0u);
}

TEST(ReadArena, SmallReadsShareOneBlock) {
  BufferPool pool(64 * 1024, 4);
  ReadArena arena(pool, 1024);
  auto w1 = arena.writable();
  Slice a = arena.commit(100);
  auto w2 = arena.writable();
  EXPECT_EQ(w2.data(), w1.data() + 100);
  Slice b = arena.commit(100);
  EXPECT_EQ(a.buffer(), b.buffer());
  EXPECT_EQ(pool.stats().allocated, 1u);
}

TEST(ReadArena, MovesToFreshBlockWhenTailIsSmall) {
  BufferPool pool(4096, 4);
  ReadArena arena(pool, 1024);
  (void)arena.writable();
  Slice a = arena.commit(3500);
  (void)arena.writable();
  Slice b = arena.commit(10);
  EXPECT_NE(a.buffer(), b.buffer());
}

TEST(CompactQueue, SmallSlicesLeaveTheirSharedBlock) {
  BufferPool big(1024 * 1024, 0);
  BufferPool small(64 * 1024, 0);
  ReadArena arena(small, 4096);
  // One read block carried frames of several streams; this queue keeps two small pieces of it.
  Slice block = big.acquire();
  for (size_t i = 0; i < block.size(); ++i) block.data()[i] = std::byte(i % 251);
  std::deque<Slice> queue;
  queue.push_back(block.sub(1000, 70000));  // larger than a small block: split when copied
  queue.push_back(block.sub(500000, 300));
  const std::string before = std::string(reinterpret_cast<const char*>(queue[0].data()), 70000) +
                             std::string(reinterpret_cast<const char*>(queue[1].data()), 300);
  block.reset();
  EXPECT_EQ(big.stats().in_use, 1u);
  EXPECT_EQ(compact_queue(queue, 0, arena), 70300u);
  EXPECT_EQ(big.stats().in_use, 0u) << "the shared block is free once its queued bytes moved";
  std::string after;
  for (const Slice& s : queue) after.append(reinterpret_cast<const char*>(s.data()), s.size());
  EXPECT_EQ(after, before);
  EXPECT_EQ(compact_queue(queue, 0, arena), 0u) << "packed slices stay where they are";
}

TEST(CompactQueue, LeavesSlicesAWriteIsUsingAndDenseOnes) {
  BufferPool big(256 * 1024, 0);
  BufferPool small(64 * 1024, 0);
  ReadArena arena(small, 4096);
  std::deque<Slice> queue;
  Slice sparse = big.acquire();
  queue.push_back(sparse.sub(0, 100));            // in a write in flight: skipped
  queue.push_back(big.acquire().sub(0, 200000));  // holds most of its block: not worth a copy
  const std::byte* in_flight = queue[0].data();
  EXPECT_EQ(compact_queue(queue, 1, arena), 0u);
  EXPECT_EQ(queue[0].data(), in_flight);
  EXPECT_EQ(queue.size(), 2u);
}

}  // namespace
}  // namespace vbridge
