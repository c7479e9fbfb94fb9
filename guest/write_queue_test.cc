#include "guest/write_queue.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>

namespace vbridge::guest {
namespace {

Slice bytes(BufferPool& pool, const std::string& text) {
  Slice s = pool.acquire();
  std::memcpy(s.data(), text.data(), text.size());
  return s.sub(0, text.size());
}

std::string gathered(const WriteQueue& q) {
  iovec iov[16];
  const size_t n = q.fill(iov);
  std::string out;
  for (size_t i = 0; i < n; ++i) out.append(static_cast<const char*>(iov[i].iov_base), iov[i].iov_len);
  return out;
}

TEST(WriteQueue, GathersInOrderAndConsumesShortWrites) {
  BufferPool pool(64, 8);
  WriteQueue q;
  q.push(bytes(pool, "hello "));
  q.push(bytes(pool, "wide "));
  q.push(bytes(pool, "world"));
  q.push(Slice());  // empty slices are not queued
  EXPECT_EQ(q.slices(), 3u);
  EXPECT_EQ(q.bytes(), 16u);
  EXPECT_EQ(gathered(q), "hello wide world");
  q.consume(8);  // a short write ending inside the second slice
  EXPECT_EQ(gathered(q), "de world");
  EXPECT_EQ(q.bytes(), 8u);
  q.consume(8);
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(pool.stats().in_use, 0u);  // every buffer went back once written
}

TEST(WriteQueue, FillStopsAtTheIovecLimit) {
  BufferPool pool(64, 8);
  WriteQueue q;
  for (int i = 0; i < 5; ++i) q.push(bytes(pool, "x"));
  iovec iov[3];
  EXPECT_EQ(q.fill(iov), 3u);
}

}  // namespace
}  // namespace vbridge::guest
