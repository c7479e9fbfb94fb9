#include "host/file_watch/coalescer.h"

#include <gtest/gtest.h>

#include <string>

namespace vbridge::file_watch {
namespace {

using namespace std::chrono_literals;
using Kind = wire::FileEventKind;

const Clock::time_point t0 = Clock::time_point(1h);
}  // namespace

void PrintTo(const FileChange& c, std::ostream* os) {
  *os << wire::EnumNameFileEventKind(c.kind) << "(" << c.path
      << (c.old_path.empty() ? "" : " <- " + c.old_path) << (c.is_dir ? ", dir" : "")
      << (c.rescan ? ", rescan" : "") << ")";
}

namespace {

FileChange change(Kind kind, std::string path, std::string old_path = {}, bool is_dir = false) {
  return FileChange{kind, std::move(path), std::move(old_path), is_dir, false};
}
FileChange rescan_of(std::string dir) { return FileChange{Kind::Modify, std::move(dir), {}, true, true}; }

TEST(Coalescer, HoldsEventsUntilTheWindowCloses) {
  Coalescer c(CoalescerOptions{.window = 8ms});
  c.modified("a", t0);
  EXPECT_EQ(c.deadline(), t0 + 8ms);
  EXPECT_TRUE(c.take(t0 + 7ms).empty());
  // Later events do not push the deadline: no event waits longer than one window.
  c.modified("b", t0 + 7ms);
  EXPECT_EQ(c.deadline(), t0 + 8ms);
  EXPECT_EQ(c.take(t0 + 8ms), (std::vector{change(Kind::Modify, "a"), change(Kind::Modify, "b")}));
  EXPECT_FALSE(c.deadline().has_value());
}

TEST(Coalescer, ForceTakesBeforeTheDeadline) {
  Coalescer c;
  c.modified("a", t0);
  EXPECT_EQ(c.take(t0, /*force=*/true).size(), 1u);
}

TEST(Coalescer, RepeatedWritesToOnePathAreOneModify) {
  Coalescer c;
  for (int i = 0; i < 1000; ++i) c.modified("log.txt", t0);
  EXPECT_EQ(c.take(t0 + 1s), std::vector{change(Kind::Modify, "log.txt")});
  EXPECT_EQ(c.counters().merged, 999u);
}

TEST(Coalescer, CreateThenWritesIsOneCreate) {
  Coalescer c;
  c.created("new.js", false, t0);
  c.modified("new.js", t0);
  c.attrib("new.js", false, t0);
  EXPECT_EQ(c.take(t0 + 1s), std::vector{change(Kind::Create, "new.js")});
}

TEST(Coalescer, CreateThenDeleteIsNothing) {
  Coalescer c;
  c.created("tmp", false, t0);
  c.modified("tmp", t0);
  c.deleted("tmp", false, t0);
  EXPECT_TRUE(c.take(t0 + 1s).empty());
  EXPECT_EQ(c.counters().cancelled, 1u);
}

TEST(Coalescer, DeleteThenCreateIsACreateOfTheNewInode) {
  Coalescer c;
  c.deleted("f", false, t0);
  c.created("f", false, t0);
  EXPECT_EQ(c.take(t0 + 1s), std::vector{change(Kind::Create, "f")});
}

TEST(Coalescer, ModifyThenDeleteIsADelete) {
  Coalescer c;
  c.modified("f", t0);
  c.deleted("f", false, t0);
  EXPECT_EQ(c.take(t0 + 1s), std::vector{change(Kind::Delete, "f")});
}

TEST(Coalescer, EditorSaveThroughATempFileIsACreateOfTheTarget) {
  // vim/VS Code style: write "f.tmp", rename it over "f".
  Coalescer c;
  c.created("src/.f.swp", false, t0);
  c.modified("src/.f.swp", t0);
  c.renamed("src/.f.swp", "src/f", false, t0);
  EXPECT_EQ(c.take(t0 + 1s), std::vector{change(Kind::Create, "src/f")});
}

TEST(Coalescer, RenameOfAnOldFileIsOneRename) {
  Coalescer c;
  c.renamed("a/old", "b/new", false, t0);
  EXPECT_EQ(c.take(t0 + 1s), std::vector{change(Kind::Rename, "b/new", "a/old")});
}

TEST(Coalescer, ChainedRenamesKeepTheFirstSource) {
  Coalescer c;
  c.renamed("x", "y", false, t0);
  c.renamed("y", "z", false, t0);
  const auto out = c.take(t0 + 1s);
  ASSERT_FALSE(out.empty());
  // The guest learns that x went away and z appeared; "y" may be reported deleted too (harmless).
  EXPECT_NE(std::find(out.begin(), out.end(), change(Kind::Rename, "z", "x")), out.end());
}

TEST(Coalescer, RenameThenDeleteOfTheTargetReportsBothGone) {
  Coalescer c;
  c.renamed("a", "b", false, t0);
  c.deleted("b", false, t0);
  EXPECT_EQ(c.take(t0 + 1s), (std::vector{change(Kind::Delete, "a"), change(Kind::Delete, "b")}));
}

TEST(Coalescer, DirectoryFlagTravels) {
  Coalescer c;
  c.created("d", true, t0);
  c.created("d/f", false, t0);
  c.deleted("old", true, t0);
  EXPECT_EQ(c.take(t0 + 1s), (std::vector{change(Kind::Create, "d", "", true), change(Kind::Create, "d/f"),
                                          change(Kind::Delete, "old", "", true)}));
}

TEST(Coalescer, CollapsesToDirectoryRescansBeyondMaxPaths) {
  Coalescer c(CoalescerOptions{.max_paths = 4});
  c.modified("a/1", t0);
  c.modified("a/2", t0);
  c.modified("b/1", t0);
  c.modified("b/2", t0);
  c.modified("c/1", t0);  // the fifth path: collapse
  c.modified("a/3", t0);  // later events join the rescans
  EXPECT_LE(c.pending(), 4u);
  EXPECT_EQ(c.take(t0 + 1s), (std::vector{rescan_of("a"), rescan_of("b"), rescan_of("c")}));
  EXPECT_EQ(c.counters().collapses, 1u);
  // The next window starts itemized again.
  c.modified("a/1", t0 + 2s);
  EXPECT_EQ(c.take(t0 + 3s), std::vector{change(Kind::Modify, "a/1")});
}

TEST(Coalescer, CollapsedRescansCarryTheWindowsClockFloor) {
  Coalescer c(CoalescerOptions{.max_paths = 2});
  c.set_clock_floor(5000);
  c.modified("a/1", t0);
  c.set_clock_floor(9000);  // later reads: the floor moves on, but the window began at 5000
  c.modified("a/2", t0);
  c.modified("b/1", t0);
  c.rescan("c", t0, 0);  // an explicit rescan with no floor keeps none
  auto out = c.take(t0 + 1s);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].path, "");  // a, b and c do not fit in two paths: the root, from the earliest floor
  EXPECT_EQ(out[0].since_ns, 0);

  Coalescer d(CoalescerOptions{.max_paths = 2});
  d.set_clock_floor(5000);
  d.modified("a/1", t0);
  d.modified("a/2", t0);
  d.modified("a/3", t0);
  out = d.take(t0 + 1s);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].path, "a");
  EXPECT_EQ(out[0].since_ns, 5000);
  // The next window starts from the floor of its own first event.
  d.set_clock_floor(7000);
  d.rescan("z", t0 + 2s, 7000);
  EXPECT_EQ(d.take(t0 + 3s)[0].since_ns, 7000);
}

TEST(Coalescer, CollapsesToTheRootWhenDirectoriesAlsoOverflow) {
  Coalescer c(CoalescerOptions{.max_paths = 3});
  for (int i = 0; i < 10; ++i) c.created("d" + std::to_string(i) + "/f", false, t0);
  EXPECT_EQ(c.pending(), 1u);
  EXPECT_EQ(c.take(t0 + 1s), std::vector{rescan_of("")});
  EXPECT_GE(c.counters().root_collapses, 1u);
}

TEST(Coalescer, MemoryStaysBoundedUnderAStorm) {
  // 100,000 changes over 10,000 directories: pending entries never exceed max_paths.
  Coalescer c(CoalescerOptions{.max_paths = 256});
  size_t peak = 0;
  size_t out = 0;
  Clock::time_point now = t0;
  for (int i = 0; i < 100000; ++i) {
    now += 20us;
    const std::string path = "dir" + std::to_string(i % 10000) + "/file" + std::to_string(i);
    c.created(path, false, now);
    peak = std::max(peak, c.pending());
    out += c.take(now).size();
  }
  out += c.take(now, true).size();
  EXPECT_LE(peak, 256u);
  EXPECT_GT(out, 0u);
  EXPECT_LT(out, 100000u);  // merged, not itemized
}

TEST(Coalescer, WindowWidensUnderLoadAndNarrowsWhenQuiet) {
  Coalescer c(CoalescerOptions{.window = 8ms, .max_window = 64ms, .max_paths = 100000, .busy_changes = 10});
  Clock::time_point now = t0;
  for (int round = 0; round < 5; ++round) {
    for (int i = 0; i < 20; ++i) c.modified("f" + std::to_string(i), now);
    now += 1s;
    (void)c.take(now);
  }
  EXPECT_EQ(c.current_window(), 64ms);
  for (int round = 0; round < 5; ++round) {
    c.modified("f", now);
    now += 1s;
    (void)c.take(now);
  }
  EXPECT_EQ(c.current_window(), 8ms);
}

TEST(Coalescer, RescanOfTheRoot) {
  Coalescer c;
  c.modified("a", t0);
  c.rescan("", t0);
  const auto out = c.take(t0 + 1s);
  EXPECT_NE(std::find(out.begin(), out.end(), rescan_of("")), out.end());
}

TEST(EncodeBatches, SplitsByCountAndBytesAndNumbersThem) {
  std::vector<FileChange> changes;
  for (int i = 0; i < 2500; ++i) changes.push_back(change(Kind::Modify, "some/dir/file" + std::to_string(i)));
  changes.push_back(change(Kind::Rename, "to", "from"));
  uint64_t seq = 41;
  const auto batches =
      encode_batches("home", changes, &seq, BatchLimits{.max_events = 1000, .max_bytes = 32 * 1024});
  ASSERT_GE(batches.size(), 3u);
  EXPECT_EQ(seq, 41 + batches.size());
  size_t total = 0;
  uint64_t expect_seq = 42;
  for (const auto& b : batches) {
    flatbuffers::Verifier v(b.GetBufferPointer(), b.GetSize());
    ASSERT_TRUE(wire::VerifyControlBuffer(v));
    EXPECT_LE(b.GetSize(), 32u * 1024 + 1024);
    const auto* fe = wire::GetControl(b.GetBufferPointer())->message_as_FileEvents();
    ASSERT_NE(fe, nullptr);
    EXPECT_EQ(fe->share()->str(), "home");
    EXPECT_EQ(fe->seq(), expect_seq++);
    EXPECT_LE(fe->events()->size(), 1000u);
    total += fe->events()->size();
  }
  EXPECT_EQ(total, changes.size());
  const auto* last = wire::GetControl(batches.back().GetBufferPointer())->message_as_FileEvents();
  const auto* rename = last->events()->Get(last->events()->size() - 1);
  EXPECT_EQ(rename->kind(), Kind::Rename);
  EXPECT_EQ(rename->path()->str(), "to");
  EXPECT_EQ(rename->old_path()->str(), "from");
}

TEST(EncodeBatches, RescanFlagRoundTrips) {
  uint64_t seq = 0;
  const auto batches = encode_batches("s", {rescan_of("")}, &seq);
  ASSERT_EQ(batches.size(), 1u);
  const auto* e = wire::GetControl(batches[0].GetBufferPointer())->message_as_FileEvents()->events()->Get(0);
  EXPECT_TRUE(e->rescan());
  EXPECT_EQ(e->changed_since_ns(), 0);
  EXPECT_TRUE(e->is_dir());
  EXPECT_EQ(e->path()->str(), "");
}

TEST(ParentOf, Paths) {
  EXPECT_EQ(parent_of("a/b/c"), "a/b");
  EXPECT_EQ(parent_of("a"), "");
  EXPECT_EQ(parent_of(""), "");
}

}  // namespace
}  // namespace vbridge::file_watch
