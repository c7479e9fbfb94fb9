#include "host/file_watch/watcher_linux.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace vbridge::file_watch {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Kind = wire::FileEventKind;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vb-watch-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path_); }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

void write_file(const std::string& path, const std::string& data, bool append = false) {
  std::ofstream out(path, append ? std::ios::app : std::ios::trunc);
  out << data;
}

std::vector<FileChange> decode(const std::vector<Batch>& batches) {
  std::vector<FileChange> out;
  for (const auto& b : batches) {
    const auto* fe = wire::GetControl(b.message.GetBufferPointer())->message_as_FileEvents();
    for (const auto* e : *fe->events()) {
      out.push_back(FileChange{e->kind(), e->path() ? e->path()->str() : "",
                               e->old_path() ? e->old_path()->str() : "", e->is_dir(), e->rescan()});
    }
  }
  return out;
}

// Polls and drains for `quiet` after the last batch (or `limit` in all), returning every change seen.
std::vector<FileChange> collect(Watcher& w, std::chrono::milliseconds quiet = 150ms,
                                std::chrono::milliseconds limit = 3000ms) {
  std::vector<FileChange> out;
  const auto end = Clock::now() + limit;
  auto last = Clock::now();
  while (Clock::now() < end && Clock::now() - last < quiet) {
    struct pollfd p {
      w.fd(), POLLIN, 0
    };
    ::poll(&p, 1, 10);
    auto batch = decode(w.drain());
    if (!batch.empty()) last = Clock::now();
    out.insert(out.end(), batch.begin(), batch.end());
  }
  return out;
}

bool has(const std::vector<FileChange>& v, Kind kind, const std::string& path, const std::string& old = {}) {
  return std::any_of(v.begin(), v.end(), [&](const FileChange& c) {
    return c.kind == kind && c.path == path && (old.empty() || c.old_path == old);
  });
}

std::string dump(const std::vector<FileChange>& v) {
  std::string s;
  for (const auto& c : v) {
    s += std::string(wire::EnumNameFileEventKind(c.kind)) + " " + c.path +
         (c.old_path.empty() ? "" : " <- " + c.old_path) + (c.rescan ? " (rescan)" : "") + "\n";
  }
  return s;
}

std::unique_ptr<InotifyWatcher> watch(const TempDir& dir) {
  auto w = InotifyWatcher::create({Share{"s", dir.path()}});
  EXPECT_TRUE(w.ok()) << (w.ok() ? "" : w.error().message);
  return std::move(*w);
}

TEST(InotifyWatcher, ReportsCreateModifyDeleteRename) {
  TempDir d;
  fs::create_directories(d / "src");
  write_file(d / "src/old", "x");
  write_file(d / "src/gone", "x");
  auto w = watch(d);
  write_file(d / "src/new.js", "hello");
  write_file(d / "src/old", "more", true);
  fs::remove(d / "src/gone");
  fs::rename(d / "src/old", d / "src/renamed");
  const auto v = collect(*w);
  EXPECT_TRUE(has(v, Kind::Create, "src/new.js")) << dump(v);
  EXPECT_TRUE(has(v, Kind::Delete, "src/gone")) << dump(v);
  EXPECT_TRUE(has(v, Kind::Rename, "src/renamed", "src/old")) << dump(v);
  EXPECT_EQ(w->counters().batches, 1u) << "one window, one batch";
}

TEST(InotifyWatcher, EditorSaveIsACreateOfTheTarget) {
  TempDir d;
  write_file(d / "f.py", "old");
  auto w = watch(d);
  write_file(d / ".f.py.swp", "new");
  fs::rename(d / ".f.py.swp", d / "f.py");
  const auto v = collect(*w);
  EXPECT_TRUE(has(v, Kind::Create, "f.py")) << dump(v);
  EXPECT_FALSE(has(v, Kind::Create, ".f.py.swp")) << dump(v);
}

TEST(InotifyWatcher, NewDirectoryContentsAreNotMissed) {
  TempDir d;
  auto w = watch(d);
  // Everything here happens before the watcher reads the directory's IN_CREATE.
  fs::create_directories(d / "pkg/sub/deeper");
  write_file(d / "pkg/a", "a");
  write_file(d / "pkg/sub/deeper/b", "b");
  const auto v = collect(*w);
  EXPECT_TRUE(has(v, Kind::Create, "pkg")) << dump(v);
  EXPECT_TRUE(has(v, Kind::Create, "pkg/a")) << dump(v);
  EXPECT_TRUE(has(v, Kind::Create, "pkg/sub/deeper/b")) << dump(v);
  // And the new directories are watched from now on.
  write_file(d / "pkg/sub/deeper/c", "c");
  const auto later = collect(*w);
  EXPECT_TRUE(has(later, Kind::Create, "pkg/sub/deeper/c")) << dump(later);
}

TEST(InotifyWatcher, DirectoryRenameMovesItsWatches) {
  TempDir d;
  fs::create_directories(d / "a/inner");
  auto w = watch(d);
  fs::rename(d / "a", d / "b");
  auto v = collect(*w);
  EXPECT_TRUE(has(v, Kind::Rename, "b", "a")) << dump(v);
  write_file(d / "b/inner/x", "x");
  v = collect(*w);
  EXPECT_TRUE(has(v, Kind::Create, "b/inner/x")) << dump(v);
}

TEST(InotifyWatcher, DirectoryMovedOutIsADeleteAndForgotten) {
  TempDir d;
  TempDir outside;
  fs::create_directories(d / "a/inner");
  auto w = watch(d);
  const size_t before = w->counters().watches;
  fs::rename(d / "a", outside / "a");
  auto v = collect(*w);
  EXPECT_TRUE(has(v, Kind::Delete, "a")) << dump(v);
  EXPECT_EQ(w->counters().watches, before - 2);
  write_file(outside / "a/inner/x", "x");
  EXPECT_TRUE(collect(*w).empty());
}

TEST(InotifyWatcher, RemovedDirectoryTree) {
  TempDir d;
  fs::create_directories(d / "t/u");
  write_file(d / "t/u/f", "f");
  auto w = watch(d);
  fs::remove_all(d / "t");
  const auto v = collect(*w);
  EXPECT_TRUE(has(v, Kind::Delete, "t")) << dump(v);
}

TEST(InotifyWatcher, InjectorEchoIsSuppressedButRealChmodIsNot) {
  TempDir d;
  fs::create_directories(d / "dir");
  auto w = watch(d);
  write_file(d / "dir/f", "data");
  auto v = collect(*w);
  ASSERT_TRUE(has(v, Kind::Create, "dir/f")) << dump(v);

  // What the guest injector does to the file and its directory, seen through the shared folder.
  for (const std::string& p : {d / "dir/f", d / "dir"}) {
    ASSERT_EQ(::setxattr(p.c_str(), "user.vbridge.touch", "", 0, 0), 0) << p;
    ASSERT_EQ(::removexattr(p.c_str(), "user.vbridge.touch"), 0);
  }
  const int fd = ::open((d / "dir/f").c_str(), O_WRONLY);
  ::close(fd);
  v = collect(*w, 300ms);
  EXPECT_TRUE(v.empty()) << dump(v);
  EXPECT_GE(w->counters().echoes_suppressed, 2u);

  fs::permissions(d / "dir/f", fs::perms::owner_exec, fs::perm_options::add);
  v = collect(*w);
  EXPECT_TRUE(has(v, Kind::Attrib, "dir/f")) << dump(v);
}

TEST(InotifyWatcher, UnexpectedAttribIsForwarded) {
  TempDir d;
  write_file(d / "f", "x");
  auto w = watch(d);
  ASSERT_EQ(::setxattr((d / "f").c_str(), "user.other", "1", 1, 0), 0);
  const auto v = collect(*w);
  EXPECT_TRUE(has(v, Kind::Attrib, "f")) << dump(v);
}

TEST(InotifyWatcher, FdIsIdleWhenNothingHappens) {
  TempDir d;
  auto w = watch(d);
  struct pollfd p {
    w->fd(), POLLIN, 0
  };
  EXPECT_EQ(::poll(&p, 1, 50), 0);
  write_file(d / "f", "x");
  EXPECT_EQ(::poll(&p, 1, 1000), 1);
  (void)w->drain();  // reads the event; the batch is due after the window
  EXPECT_EQ(::poll(&p, 1, 1000), 1) << "the coalescing timer wakes the loop";
  EXPECT_EQ(w->drain().size(), 1u);
  EXPECT_EQ(::poll(&p, 1, 50), 0);
}

TEST(InotifyWatcher, HoldsBatchesWhileTheConsumerIsBackedUp) {
  TempDir d;
  auto w = watch(d);
  struct pollfd p {
    w->fd(), POLLIN, 0
  };
  write_file(d / "a", "x");
  ASSERT_EQ(::poll(&p, 1, 1000), 1);
  EXPECT_TRUE(w->drain(0).empty());
  write_file(d / "b", "x");
  ASSERT_EQ(::poll(&p, 1, 1000), 1);  // new events still wake the loop...
  EXPECT_TRUE(w->drain(0).empty());
  ::usleep(50000);
  EXPECT_EQ(::poll(&p, 1, 50), 0) << "...but a due window does not while the consumer is backed up";
  const auto v = decode(w->drain());
  EXPECT_TRUE(has(v, Kind::Create, "a")) << dump(v);
  EXPECT_TRUE(has(v, Kind::Create, "b")) << dump(v);
}

TEST(InotifyWatcher, HandsOutAtMostMaxBatches) {
  TempDir d;
  WatcherOptions o;
  o.batch.max_events = 2;
  auto w = InotifyWatcher::create({Share{"s", d.path()}}, o);
  ASSERT_TRUE(w.ok());
  for (int i = 0; i < 5; ++i) write_file(d / ("f" + std::to_string(i)), "x");
  ::usleep(50000);
  struct pollfd p {
    (*w)->fd(), POLLIN, 0
  };
  size_t batches = 0;
  for (int i = 0; i < 20 && batches < 3; ++i) {
    ::poll(&p, 1, 100);
    const auto got = (*w)->drain(1);
    EXPECT_LE(got.size(), 1u);
    batches += got.size();
  }
  EXPECT_EQ(batches, 3u);  // 5 creates, 2 per batch, one batch per drain
}

TEST(InotifyWatcher, RescanAllQueuesARootRescan) {
  TempDir d;
  auto w = watch(d);
  w->rescan_all();
  const auto v = collect(*w);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_TRUE(v[0].rescan);
  EXPECT_EQ(v[0].path, "");
}

TEST(InotifyWatcher, RejectsBadShares) {
  EXPECT_FALSE(InotifyWatcher::create({Share{"s", "/nonexistent/vbridge"}}).ok());
  TempDir d;
  EXPECT_FALSE(InotifyWatcher::create({Share{"s", d.path()}, Share{"s", d.path()}}).ok());
}

TEST(InotifyWatcher, WatchLimitErrorNamesTheLimitAndHowToRaiseIt) {
  const std::string msg = InotifyWatcher::watch_limit_message("/some/dir");
  EXPECT_NE(msg.find("/some/dir"), std::string::npos);
  EXPECT_NE(msg.find("/proc/sys/fs/inotify/max_user_watches"), std::string::npos);
  EXPECT_NE(msg.find("sysctl -w fs.inotify.max_user_watches="), std::string::npos);
}

// Hits the real limit: in a new user namespace the per-namespace inotify watch limit can be lowered
// without touching the machine's own setting.
TEST(InotifyWatcher, WatchLimitIsAClearErrorAtStart) {
  TempDir d;
  for (int i = 0; i < 8; ++i) fs::create_directories(d / ("d" + std::to_string(i)));
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(pipefd[0]);
    auto say = [&](const std::string& s) {
      (void)!::write(pipefd[1], s.data(), s.size());
      ::_exit(0);
    };
    if (::unshare(CLONE_NEWUSER) != 0) say("SKIP unshare(CLONE_NEWUSER) failed");
    std::ofstream lim("/proc/sys/user/max_inotify_watches");
    if (!(lim << 4 << std::flush)) say("SKIP cannot lower /proc/sys/user/max_inotify_watches");
    lim.close();
    auto w = InotifyWatcher::create({Share{"s", d.path()}});
    say(w.ok() ? std::string("OK") : "ERR " + w.error().message);
  }
  ::close(pipefd[1]);
  std::string got;
  char buf[4096];
  for (ssize_t n; (n = ::read(pipefd[0], buf, sizeof buf)) > 0;) got.append(buf, static_cast<size_t>(n));
  ::close(pipefd[0]);
  ::waitpid(pid, nullptr, 0);
  if (got.rfind("SKIP", 0) == 0) GTEST_SKIP() << got;
  ASSERT_EQ(got.rfind("ERR ", 0), 0u) << got;
  EXPECT_NE(got.find("max_user_watches"), std::string::npos) << got;
  EXPECT_NE(got.find("sysctl"), std::string::npos) << got;
}

}  // namespace
}  // namespace vbridge::file_watch
