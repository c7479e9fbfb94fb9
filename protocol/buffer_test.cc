#include "protocol/buffer.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace vbridge
