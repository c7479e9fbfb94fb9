#include "protocol/datagram.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace vbridge {
namespace {

std::string framed(const std::vector<std::string>& datagrams) {
  std::string out;
  for (const auto& d : datagrams) {
    std::byte prefix[4];
    encode_datagram_prefix(prefix, static_cast<uint32_t>(d.size()));
    out.append(reinterpret_cast<const char*>(prefix), 4);
    out += d;
  }
  return out;
}

Slice slice_of(BufferPool& pool, std::string_view s) {
  Slice b = pool.acquire();
  std::memcpy(b.data(), s.data(), s.size());
  return b.sub(0, s.size());
}

TEST(Datagram, BoundariesSurviveEverySplit) {
  BufferPool pool(256 * 1024, 8);
  const std::vector<std::string> in{"a", "", std::string(65000, 'x'), "hello", std::string(1000, 'y')};
  const std::string wire = framed(in);
  for (size_t split : {size_t{0}, size_t{1}, size_t{3}, size_t{4}, size_t{5}, size_t{7}, size_t{30000},
                       wire.size() - 1, wire.size()}) {
    DatagramAssembler a(pool);
    std::vector<std::string> out;
    auto collect = [&](Slice d) { out.emplace_back(reinterpret_cast<const char*>(d.data()), d.size()); };
    ASSERT_TRUE(a.feed(slice_of(pool, std::string_view(wire).substr(0, split)), collect).ok());
    ASSERT_TRUE(a.feed(slice_of(pool, std::string_view(wire).substr(split)), collect).ok());
    EXPECT_EQ(out, in) << "split " << split;
  }
}

TEST(Datagram, WholeDatagramInOneSliceIsNotCopied) {
  BufferPool pool(4096, 4);
  const std::string wire = framed({"zero-copy"});
  Slice s = slice_of(pool, wire);
  DatagramAssembler a(pool);
  const std::byte* seen = nullptr;
  ASSERT_TRUE(a.feed(s, [&](Slice d) { seen = d.data(); }).ok());
  EXPECT_EQ(seen, s.data() + 4);
}

TEST(Datagram, OversizedLengthIsAnError) {
  BufferPool pool(4096, 4);
  std::string wire(4, '\xff');
  DatagramAssembler a(pool);
  auto st = a.feed(slice_of(pool, wire), [](Slice) {});
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message.find("exceeds"), std::string::npos);
}

}  // namespace
}  // namespace vbridge
