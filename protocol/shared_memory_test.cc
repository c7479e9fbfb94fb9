#include "protocol/shared_memory.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "protocol/mux.h"
#include "protocol/mux_test_util.h"

namespace vbridge {
namespace {

using testing::pump;
using testing::RecordingHandler;
using testing::unix_target;

constexpr size_t kRegion = 4 * 1024 * 1024;

std::string region_path(const std::string& name) {
  return fmt::format("/dev/shm/vbridge-test-{}-{}", ::getpid(), name);
}

// Two muxes, each with its own mapping of one region: the two agents, in one process.
struct SharedPair {
  explicit SharedPair(const std::string& name, const std::string& guest_name = "",
                      uint32_t min_lent_bytes = 1)
      : host_path(region_path(name)), guest_path(guest_name.empty() ? host_path : region_path(guest_name)) {
    host_region = std::move(SharedMemory::create(host_path, kRegion).value());
    if (guest_path != host_path) (void)SharedMemory::create(guest_path, kRegion);
    guest_region = std::move(SharedMemory::attach(guest_path).value());
    MuxConfig host_config, guest_config;
    host_config.shared = host_region.get();
    guest_config.shared = guest_region.get();
    // These tests follow loans of a few bytes; the default lends only larger pieces.
    host_config.min_lent_bytes = guest_config.min_lent_bytes = min_lent_bytes;
    host = std::make_unique<Mux>(Role::kHost, host_handler, host_config);
    guest = std::make_unique<Mux>(Role::kGuest, guest_handler, guest_config);
    host_handler.mux = host.get();
    guest_handler.mux = guest.get();
    host_pool = std::make_unique<BufferPool>(64 * 1024, 8, host_region.get());
  }
  ~SharedPair() {
    ::unlink(host_path.c_str());
    ::unlink(guest_path.c_str());
  }
  void settle() {
    for (int i = 0; i < 100; ++i) {
      const size_t moved = pump(*host, *guest, wire_pool) + pump(*guest, *host, wire_pool);
      if (moved == 0) return;
    }
  }
  StreamId open() {
    auto id = host->open(unix_target("/run/docker.sock"));
    EXPECT_TRUE(id.ok());
    settle();
    return *id;
  }
  Slice shared_bytes(const std::string& text) {
    Slice s = host_pool->acquire();
    std::memcpy(s.data(), text.data(), text.size());
    return s.sub(0, text.size());
  }

  std::string host_path, guest_path;
  std::unique_ptr<SharedMemory> host_region, guest_region;
  BufferPool wire_pool{256 * 1024, 8};
  std::unique_ptr<BufferPool> host_pool;
  RecordingHandler host_handler, guest_handler;
  std::unique_ptr<Mux> host, guest;
};

TEST(SharedMemory, BothMappingsSeeTheSameBytesInDisjointHalves) {
  const std::string path = region_path("halves");
  auto host = SharedMemory::create(path, kRegion);
  ASSERT_TRUE(host.ok()) << host.error().message;
  auto guest = SharedMemory::attach(path);
  ASSERT_TRUE(guest.ok()) << guest.error().message;
  EXPECT_NE((*host)->nonce(), 0u);
  EXPECT_EQ((*host)->nonce(), (*guest)->nonce());
  EXPECT_EQ((*host)->local_half().size(), (*guest)->peer_half().size());
  std::memcpy((*host)->local_half().data() + 100, "hello", 5);
  EXPECT_EQ(std::memcmp((*guest)->peer_half().data() + 100, "hello", 5), 0);
  EXPECT_GE((*host)->peer_half().data() - (*host)->local_half().data(),
            static_cast<ptrdiff_t>((*host)->local_half().size()));
  // A restarted host draws a new nonce into the same file; the guest's mapping reads it.
  const uint32_t old = (*guest)->nonce();
  auto again = SharedMemory::create(path, kRegion);
  ASSERT_TRUE(again.ok());
  EXPECT_NE((*guest)->nonce(), old);
  ::unlink(path.c_str());
}

TEST(SharedMemory, BadPathsAndSizesNameTheFile) {
  auto missing = SharedMemory::attach("/nonexistent/vbridge.shm");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message.find("/nonexistent/vbridge.shm"), std::string::npos);
  auto tiny = SharedMemory::create(region_path("tiny"), 4096);
  ASSERT_FALSE(tiny.ok());
  EXPECT_NE(tiny.error().message.find("--shm-size"), std::string::npos);
}

TEST(SharedMemory, PoolTakesSharedBlocksThenFallsBackToTheHeap) {
  const std::string path = region_path("pool");
  auto region = std::move(SharedMemory::create(path, kRegion).value());
  BufferPool pool(1024 * 1024, 4, region.get());
  std::vector<Slice> held;
  for (int i = 0; i < 3; ++i) held.push_back(pool.acquire());  // 2 MiB - 4 KiB half: one block fits
  EXPECT_EQ(pool.stats().shared_in_use, 1u);
  EXPECT_EQ(pool.stats().shared_misses, 2u);
  EXPECT_GE(region->local_offset(held[0]), 0);
  EXPECT_EQ(region->local_offset(held[1]), -1);
  held.clear();
  EXPECT_EQ(pool.stats().in_use, 0u);
  EXPECT_GE(region->local_offset(pool.acquire()), 0);  // the shared block is reused first
  ::unlink(path.c_str());
}

TEST(SharedMemory, MuxSendsSharedBytesByReferenceAndGetsTheLoanBack) {
  SharedPair p("ref");
  const StreamId id = p.open();
  ASSERT_TRUE(p.host->shared_active());
  ASSERT_TRUE(p.guest->shared_active());
  ASSERT_TRUE(p.host->send(id, p.shared_bytes("by reference")));
  ASSERT_TRUE(p.host->send(id, testing::text_slice(p.wire_pool, " and inline")));
  ASSERT_TRUE(p.host->send(id, p.shared_bytes(" in order")));
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id), "by reference and inline in order");
  EXPECT_EQ(p.host->counters().bytes_out_by_ref, 21u);
  EXPECT_EQ(p.guest->counters().bytes_in_by_ref, 21u);
  // The guest dropped its Slices after recording them: both loans came back, the blocks are free again.
  EXPECT_EQ(p.host->loans_outstanding(), 0u);
  EXPECT_EQ(p.host_pool->stats().shared_in_use, 0u);
}

TEST(SharedMemory, SmallPiecesAreCopiedSoTheyNeedNoRelease) {
  SharedPair p("small", "", MuxConfig{}.min_lent_bytes);
  const StreamId id = p.open();
  ASSERT_TRUE(p.host->shared_active());
  ASSERT_TRUE(p.host->send(id, p.shared_bytes("a small request")));
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id), "a small request");
  EXPECT_EQ(p.host->counters().bytes_out_by_ref, 0u);
  const uint64_t frames_from_guest = p.guest->counters().frames_out;

  const std::string large(MuxConfig{}.min_lent_bytes, 'x');
  ASSERT_TRUE(p.host->send(id, p.shared_bytes(large)));
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id), "a small request" + large);
  EXPECT_EQ(p.host->counters().bytes_out_by_ref, large.size());
  EXPECT_EQ(p.host->loans_outstanding(), 0u);
  EXPECT_GT(p.guest->counters().frames_out, frames_from_guest)
      << "the large piece's loan came back in a RELEASE";
}

TEST(SharedMemory, LoanHeldPastTheStreamsEndIsStillReturned) {
  SharedPair p("reset");
  std::vector<Slice> kept;
  p.guest_handler.keep = &kept;
  const StreamId id = p.open();
  ASSERT_TRUE(p.host->send(id, p.shared_bytes("held")));
  p.settle();
  ASSERT_EQ(kept.size(), 1u);
  EXPECT_EQ(p.host->loans_outstanding(), 1u);
  p.host->reset(id, "gone");
  p.settle();
  EXPECT_EQ(p.guest_handler.count("reset"), 1u);
  EXPECT_EQ(p.host->loans_outstanding(), 1u);  // the guest may still be writing those bytes out
  kept.clear();
  p.settle();
  EXPECT_EQ(p.host->loans_outstanding(), 0u);
}

TEST(SharedMemory, DifferentRegionsMeanInlineData) {
  SharedPair p("host-side", "other-side");
  const StreamId id = p.open();
  EXPECT_FALSE(p.host->shared_active());
  ASSERT_TRUE(p.host->send(id, p.shared_bytes("copied")));
  p.settle();
  EXPECT_EQ(p.guest_handler.data_of(id), "copied");
  EXPECT_EQ(p.host->counters().bytes_out_by_ref, 0u);
}

std::string frame(FrameType type, StreamId id, const std::vector<uint32_t>& words) {
  std::string out(kFrameHeaderSize + 4 * words.size(), '\0');
  encode_header(FrameHeader{static_cast<uint32_t>(4 * words.size()), id, type, 0},
                reinterpret_cast<std::byte*>(out.data()));
  for (size_t i = 0; i < words.size(); ++i) {
    store_u32(reinterpret_cast<std::byte*>(out.data()) + kFrameHeaderSize + 4 * i, words[i]);
  }
  return out;
}

TEST(SharedMemory, ReferenceOutsideThePeersHalfFailsTheConnection) {
  SharedPair p("range");
  const StreamId id = p.open();
  const auto half = static_cast<uint32_t>(p.guest_region->peer_half().size());
  const Status st =
      p.guest->feed(testing::to_slice(p.wire_pool, frame(FrameType::kDataRef, id, {0, half - 4, 8})));
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("outside the peer's"), std::string::npos) << st.error().message;
}

TEST(SharedMemory, ReferenceWithoutAgreementFailsAndUnknownReleaseIsIgnored) {
  SharedPair p("agree", "disagree");
  const StreamId id = p.open();
  const Status st = p.guest->feed(testing::to_slice(p.wire_pool, frame(FrameType::kDataRef, id, {0, 0, 8})));
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("no shared memory was agreed"), std::string::npos);

  SharedPair q("release");
  q.open();
  ASSERT_TRUE(q.host->feed(testing::to_slice(q.wire_pool, frame(FrameType::kRelease, 0, {7, 99}))));
  EXPECT_EQ(q.host->counters().unknown_releases, 2u);
}

TEST(SharedMemory, LoansOfAnEarlierConnectionAreNotReturnedOnALaterOne) {
  const std::string path = region_path("generation");
  auto host = std::move(SharedMemory::create(path, kRegion).value());
  auto guest = std::move(SharedMemory::attach(path).value());
  const uint32_t old_generation = guest->new_generation();
  const uint32_t current = guest->new_generation();
  { Slice stale = guest->borrow(old_generation, 5, 0, 16); }
  { Slice live = guest->borrow(current, 6, 16, 16); }
  std::vector<uint32_t> loans;
  guest->take_returned(current, loans);
  EXPECT_EQ(loans, std::vector<uint32_t>{6});
  EXPECT_EQ(guest->borrowed_now(), 0u);
  ::unlink(path.c_str());
}

}  // namespace
}  // namespace vbridge
