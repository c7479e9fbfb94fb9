#include "host/file_watch/echo_filter.h"

#include <gtest/gtest.h>

namespace vbridge::file_watch {
namespace {

using namespace std::chrono_literals;

const Clock::time_point t0 = Clock::time_point(1h);

Signature sig(uint32_t mode = 0100644, int64_t mtime = 1000, int64_t ctime = 1000) {
  Signature s;
  s.mode = mode;
  s.uid = 1000;
  s.gid = 1000;
  s.nlink = 1;
  s.size = 10;
  s.mtime_ns = mtime;
  s.ctime_ns = ctime;
  return s;
}

TEST(EchoFilter, UnexpectedAttribIsNotAnEcho) {
  EchoFilter f;
  EXPECT_FALSE(f.is_echo("a", sig(), t0));
}

TEST(EchoFilter, CtimeOnlyChangeOfAnExpectedPathIsAnEcho) {
  EchoFilter f;
  f.expect("a", sig(0100644, 1000, 1000), t0);
  // The guest's xattr set/remove moves ctime only, and arrives twice.
  EXPECT_TRUE(f.is_echo("a", sig(0100644, 1000, 2000), t0 + 5ms));
  EXPECT_TRUE(f.is_echo("a", sig(0100644, 1000, 2001), t0 + 6ms));
  EXPECT_EQ(f.counters().suppressed, 2u);
}

TEST(EchoFilter, RealChmodOrTouchOfAnExpectedPathGoesThrough) {
  EchoFilter f;
  f.expect("a", sig(0100644, 1000, 1000), t0);
  EXPECT_FALSE(f.is_echo("a", sig(0100755, 1000, 2000), t0 + 5ms));  // chmod +x
  EXPECT_FALSE(f.is_echo("a", sig(0100644, 3000, 3000), t0 + 5ms));  // touch
}

TEST(EchoFilter, DirectoryEchoIgnoresTimesThatEntriesMove) {
  EchoFilter f;
  f.expect("d", sig(040755, 1000, 1000), t0);
  // Files were created in d meanwhile (mtime, ctime, size moved), then the guest's touch arrived.
  Signature now = sig(040755, 5000, 5000);
  now.size = 4096 * 2;
  EXPECT_TRUE(f.is_echo("d", now, t0 + 5ms));
  EXPECT_FALSE(f.is_echo("d", sig(040700, 5000, 6000), t0 + 5ms));  // chmod of the directory
}

TEST(EchoFilter, ExpectationsExpire) {
  EchoFilter f(EchoFilterOptions{.ttl = 100ms});
  f.expect("a", sig(), t0);
  EXPECT_FALSE(f.is_echo("a", sig(0100644, 1000, 2000), t0 + 101ms));
  EXPECT_EQ(f.size(), 0u);
}

TEST(EchoFilter, WidensToTheDirectoryPastMaxPaths) {
  EchoFilter f(EchoFilterOptions{.max_paths = 2});
  f.expect("d/a", sig(), t0);
  f.expect("d/b", sig(), t0);
  f.expect("d/c", sig(), t0);  // no room: "anything under d, metadata only"
  EXPECT_EQ(f.counters().widened, 1u);
  EXPECT_TRUE(f.is_echo("d/c", sig(0100644, 1000, 2000), t0));
  EXPECT_FALSE(f.is_echo("d/c", sig(0100644, 2000, 2000), t0));  // a touch is never an echo
  EXPECT_FALSE(f.is_echo("e/c", sig(0100644, 1000, 2000), t0));
}

TEST(EchoFilter, TreeCoversTheDirectoryAndItsEntriesOnly) {
  EchoFilter f;
  f.expect_tree("d", t0);
  EXPECT_TRUE(f.is_echo("d", sig(040755, 1000, 2000), t0));
  EXPECT_TRUE(f.is_echo("d/x", sig(0100644, 1000, 2000), t0));
  EXPECT_FALSE(f.is_echo("d/x/y", sig(0100644, 1000, 2000), t0));
}

TEST(EchoFilter, WidensToTheWholeSharePastMaxTrees) {
  EchoFilter f(EchoFilterOptions{.max_paths = 1, .max_trees = 1});
  f.expect_tree("a", t0);
  f.expect_tree("b", t0);
  EXPECT_EQ(f.counters().root_widened, 1u);
  EXPECT_TRUE(f.is_echo("z/y/x", sig(0100644, 1000, 2000), t0));
  EXPECT_LE(f.size(), 2u);
}

TEST(EchoFilter, BoundedUnderAStorm) {
  EchoFilter f(EchoFilterOptions{.max_paths = 1000, .max_trees = 100});
  for (int i = 0; i < 100000; ++i)
    f.expect("d" + std::to_string(i % 5000) + "/f" + std::to_string(i), sig(), t0);
  EXPECT_LE(f.size(), 1100u);
  // Every path expected is still covered.
  EXPECT_TRUE(f.is_echo("d4999/f99999", sig(0100644, 1000, 2000), t0));
}

}  // namespace
}  // namespace vbridge::file_watch
