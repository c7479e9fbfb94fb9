#include "guest/file_events/injector.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sched.h>
#include <sys/inotify.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <span>
#include <sstream>
#include <string>

namespace vbridge::file_events {
namespace {

namespace fs = std::filesystem;
using Kind = wire::FileEventKind;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vb-inject-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path_); }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

void write_file(const std::string& path, const std::string& data) { std::ofstream(path) << data; }

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct Ev {
  Kind kind;
  std::string path;
  std::string old_path;
  bool rescan = false;
};

// A FileEvents batch as the host would send it; valid until the builder goes away.
class BatchBuilder {
 public:
  const wire::FileEvents& build(const std::string& share, const std::vector<Ev>& evs) {
    std::vector<flatbuffers::Offset<wire::FileEvent>> offs;
    for (const auto& e : evs) {
      offs.push_back(wire::CreateFileEvent(b_, e.kind, b_.CreateString(e.path),
                                           e.old_path.empty() ? 0 : b_.CreateString(e.old_path), false,
                                           e.rescan));
    }
    const auto fe = wire::CreateFileEvents(b_, b_.CreateString(share), b_.CreateVector(offs), 1);
    b_.Finish(wire::CreateControl(b_, wire::Message::FileEvents, fe.Union()));
    return *wire::GetControl(b_.GetBufferPointer())->message_as_FileEvents();
  }

 private:
  flatbuffers::FlatBufferBuilder b_;
};

// Records inotify events on a set of directories as "dir-relative-name:EVENT" strings.
class Recorder {
 public:
  Recorder() : fd_(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC)) {}
  ~Recorder() { ::close(fd_); }
  void watch(const std::string& dir, const std::string& label) {
    const int wd = ::inotify_add_watch(fd_, dir.c_str(), IN_ALL_EVENTS);
    ASSERT_GE(wd, 0) << dir;
    labels_[wd] = label;
  }
  std::vector<std::string> take() {
    std::vector<std::string> out;
    alignas(struct inotify_event) char buf[65536];
    for (ssize_t n; (n = ::read(fd_, buf, sizeof buf)) > 0;) {
      for (ssize_t off = 0; off < n;) {
        const auto* e = reinterpret_cast<const struct inotify_event*>(buf + off);
        std::string name = labels_[e->wd] + (e->len ? "/" + std::string(e->name) : "") + ":";
        if (e->mask & IN_ATTRIB) out.push_back(name + "ATTRIB");
        if (e->mask & IN_CLOSE_WRITE) out.push_back(name + "CLOSE_WRITE");
        if (e->mask & IN_OPEN) out.push_back(name + "OPEN");
        if (e->mask & IN_MODIFY) out.push_back(name + "MODIFY");
        if (e->mask & (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO))
          out.push_back(name + "NAMESPACE");
        off += static_cast<ssize_t>(sizeof(struct inotify_event) + e->len);
      }
    }
    return out;
  }

 private:
  int fd_;
  std::map<int, std::string> labels_;
};

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}
std::string dump(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += x + " ";
  return s;
}

struct StatSnapshot {
  off_t size;
  timespec mtime;
  timespec ctime;
  mode_t mode;
  static StatSnapshot of(const std::string& p) {
    struct stat st {};
    EXPECT_EQ(::lstat(p.c_str(), &st), 0) << p;
    return {st.st_size, st.st_mtim, st.st_ctim, st.st_mode};
  }
};
bool same_time(timespec a, timespec b) { return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec; }

class InjectorTest : public ::testing::TestWithParam<bool> {
 protected:
  Injector make(const std::string& share = "home") {
    auto inj = Injector::create({Mount{share, root.path()}}, InjectorOptions{.force_walk = GetParam()});
    EXPECT_TRUE(inj.ok());
    return std::move(*inj);
  }
  TempDir root;
  TempDir outside;
  BatchBuilder bb;
};

TEST_P(InjectorTest, CreateRaisesAttribAndCloseWriteOnTheFileAndAttribOnItsDirectory) {
  fs::create_directories(root / "src");
  write_file(root / "src/new.js", "hello");
  Recorder r;
  r.watch(root.path(), "");
  r.watch(root / "src", "src");
  Injector inj = make();
  inj.apply(bb.build("home", {{Kind::Create, "src/new.js"}}));
  const auto ev = r.take();
  EXPECT_TRUE(contains(ev, "src/new.js:ATTRIB")) << dump(ev);
  EXPECT_TRUE(contains(ev, "src/new.js:CLOSE_WRITE")) << dump(ev);
  EXPECT_TRUE(contains(ev, "/src:ATTRIB")) << dump(ev);  // the parent's watch names the directory
  EXPECT_TRUE(contains(ev, "src:ATTRIB")) << dump(ev);   // and the directory's own watch sees it
  EXPECT_FALSE(contains(ev, "src/new.js:MODIFY")) << dump(ev);
  EXPECT_EQ(inj.counters().file_touches, 1u);
  EXPECT_EQ(inj.counters().dir_touches, 1u);
  EXPECT_EQ(inj.uses_openat2(), !GetParam());
}

TEST_P(InjectorTest, NeverChangesContentsSizeModeOrMtimeAndLeavesNoXattr) {
  write_file(root / "f", "exact bytes");
  ::chmod((root / "f").c_str(), 0640);
  const timespec old_times[2] = {{1000, 0}, {2000, 123}};
  ASSERT_EQ(::utimensat(AT_FDCWD, (root / "f").c_str(), old_times, 0), 0);
  const auto before = StatSnapshot::of(root / "f");
  Injector inj = make();
  for (Kind k : {Kind::Create, Kind::Modify, Kind::Attrib}) inj.apply(bb.build("home", {{k, "f"}}));
  inj.apply(bb.build("home", {{Kind::Modify, "", "", true}}));
  const auto after = StatSnapshot::of(root / "f");
  EXPECT_EQ(read_file(root / "f"), "exact bytes");
  EXPECT_EQ(after.size, before.size);
  EXPECT_EQ(after.mode, before.mode);
  EXPECT_TRUE(same_time(after.mtime, before.mtime));
  char list[256];
  EXPECT_EQ(::listxattr((root / "f").c_str(), list, sizeof list), 0);
  EXPECT_EQ(::listxattr(root.path().c_str(), list, sizeof list), 0);
}

TEST_P(InjectorTest, DeleteTouchesTheDirectoryOnly) {
  fs::create_directories(root / "d");
  Recorder r;
  r.watch(root / "d", "d");
  Injector inj = make();
  inj.apply(bb.build("home", {{Kind::Delete, "d/gone.txt"}}));
  const auto ev = r.take();
  EXPECT_TRUE(contains(ev, "d:ATTRIB")) << dump(ev);
  EXPECT_EQ(inj.counters().gone, 0u);
  EXPECT_EQ(inj.counters().file_touches, 0u);
}

TEST_P(InjectorTest, RenameTouchesBothDirectoriesAndTheTarget) {
  fs::create_directories(root / "a");
  fs::create_directories(root / "b");
  write_file(root / "b/new", "x");
  Recorder r;
  r.watch(root / "a", "a");
  r.watch(root / "b", "b");
  Injector inj = make();
  inj.apply(bb.build("home", {{Kind::Rename, "b/new", "a/old"}}));
  const auto ev = r.take();
  EXPECT_TRUE(contains(ev, "a:ATTRIB")) << dump(ev);
  EXPECT_TRUE(contains(ev, "b:ATTRIB")) << dump(ev);
  EXPECT_TRUE(contains(ev, "b/new:ATTRIB")) << dump(ev);
}

TEST_P(InjectorTest, ManyEventsInOneDirectoryTouchItOnce) {
  fs::create_directories(root / "d");
  std::vector<Ev> evs;
  for (int i = 0; i < 50; ++i) {
    write_file(root / ("d/f" + std::to_string(i)), "x");
    evs.push_back({Kind::Create, "d/f" + std::to_string(i)});
  }
  Injector inj = make();
  inj.apply(bb.build("home", evs));
  EXPECT_EQ(inj.counters().dir_touches, 1u);
  EXPECT_EQ(inj.counters().file_touches, 50u);
}

TEST_P(InjectorTest, AppliesInSlicesWithinABudget) {
  std::vector<Ev> evs;
  for (int i = 0; i < 64; ++i) {
    write_file(root / ("f" + std::to_string(i)), "x");
    evs.push_back({Kind::Modify, "f" + std::to_string(i)});
  }
  Injector inj = make();
  const auto& batch = bb.build("home", evs);
  size_t next = 0;
  int slices = 0;
  while (!inj.apply_for(batch, &next, std::chrono::microseconds(0))) ++slices;
  EXPECT_EQ(next, 64u);
  EXPECT_GE(slices, 7);  // a zero budget still makes progress, eight events at a time
  EXPECT_EQ(inj.counters().file_touches, 64u);
  EXPECT_EQ(inj.counters().batches, 1u);
}

TEST_P(InjectorTest, RescanTouchesTheDirectoryAndItsEntries) {
  fs::create_directories(root / "d/sub");
  write_file(root / "d/a", "a");
  write_file(root / "d/b", "b");
  Recorder r;
  r.watch(root / "d", "d");
  Injector inj = make();
  inj.apply(bb.build("home", {{Kind::Modify, "d", "", true}}));
  const auto ev = r.take();
  EXPECT_TRUE(contains(ev, "d:ATTRIB")) << dump(ev);
  EXPECT_TRUE(contains(ev, "d/a:ATTRIB")) << dump(ev);
  EXPECT_TRUE(contains(ev, "d/b:ATTRIB")) << dump(ev);
  EXPECT_TRUE(contains(ev, "d/sub:ATTRIB")) << dump(ev);
}

TEST_P(InjectorTest, RescanWithATimeTouchesOnlyWhatChangedSince) {
  fs::create_directories(root / "d");
  write_file(root / "d/old", "o");
  ::usleep(20000);
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  const int64_t since = int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
  ::usleep(20000);
  write_file(root / "d/new", "n");
  Recorder r;
  r.watch(root / "d", "d");
  Injector inj = make();
  BatchBuilder b;
  flatbuffers::FlatBufferBuilder fb;
  const auto ev = wire::CreateFileEvent(fb, Kind::Modify, fb.CreateString("d"), 0, true, true, since);
  const auto fe = wire::CreateFileEvents(fb, fb.CreateString("home"), fb.CreateVector(std::vector{ev}), 1);
  fb.Finish(wire::CreateControl(fb, wire::Message::FileEvents, fe.Union()));
  inj.apply(*wire::GetControl(fb.GetBufferPointer())->message_as_FileEvents());
  const auto seen = r.take();
  EXPECT_TRUE(contains(seen, "d/new:ATTRIB")) << dump(seen);
  EXPECT_FALSE(contains(seen, "d/old:ATTRIB")) << dump(seen);
  EXPECT_TRUE(contains(seen, "d:ATTRIB")) << dump(seen);
  EXPECT_EQ(inj.counters().rescan_unchanged, 1u);
}

TEST_P(InjectorTest, GoneAndUnknownShareAreCountedNotFatal) {
  Injector inj = make();
  inj.apply(bb.build("home", {{Kind::Modify, "no/such/file"}}));
  EXPECT_EQ(inj.counters().gone, 1u);
  inj.apply(bb.build("other", {{Kind::Modify, "x"}, {Kind::Modify, "y"}}));
  EXPECT_EQ(inj.counters().unknown_share, 2u);
  EXPECT_EQ(inj.counters().refused, 2u);
}

TEST_P(InjectorTest, RefusesDotDotAbsoluteAndOddPaths) {
  write_file(outside / "secret", "s");
  const auto before = StatSnapshot::of(outside / "secret");
  const std::string rel_out = "../" + fs::path(outside.path()).filename().string() + "/secret";
  Recorder r;
  r.watch(outside.path(), "out");
  Injector inj = make();
  const std::vector<Ev> evil = {
      {Kind::Modify, rel_out},
      {Kind::Create, "a/../../x"},
      {Kind::Modify, outside / "secret"},
      {Kind::Modify, "a//b"},
      {Kind::Modify, "./a"},
      {Kind::Modify, "a/"},
      {Kind::Rename, "ok", rel_out},
      {Kind::Delete, std::string("a\0b", 3)},
  };
  inj.apply(bb.build("home", evil));
  EXPECT_EQ(inj.counters().refused, evil.size());
  EXPECT_EQ(inj.counters().file_touches + inj.counters().dir_touches, 0u);
  EXPECT_TRUE(r.take().empty());
  EXPECT_TRUE(same_time(StatSnapshot::of(outside / "secret").ctime, before.ctime));
}

TEST_P(InjectorTest, RefusesAPathThroughASymlink) {
  write_file(outside / "secret", "s");
  fs::create_directory_symlink(outside.path(), root / "link");
  Recorder r;
  r.watch(outside.path(), "out");
  Injector inj = make();
  inj.apply(bb.build("home", {{Kind::Modify, "link/secret"}, {Kind::Create, "link/secret"}}));
  EXPECT_EQ(inj.counters().refused, 2u);
  EXPECT_TRUE(r.take().empty()) << "nothing outside the share was touched";
}

TEST_P(InjectorTest, DoesNotFollowASymlinkAtTheEnd) {
  write_file(outside / "target", "t");
  fs::create_symlink(outside / "target", root / "ln");
  Recorder r;
  r.watch(outside.path(), "out");
  r.watch(root.path(), "");
  Injector inj = make();
  inj.apply(bb.build("home", {{Kind::Create, "ln"}}));
  EXPECT_EQ(inj.counters().symlink_leaf, 1u);
  EXPECT_TRUE(r.take().size() >= 1u);  // the share's root was touched for the new entry
  Recorder r2;
  r2.watch(outside.path(), "out");
  inj.apply(bb.build("home", {{Kind::Modify, "ln"}}));
  EXPECT_TRUE(r2.take().empty());
}

TEST_P(InjectorTest, NeverOpensFifosOrDevices) {
  ASSERT_EQ(::mkfifo((root / "fifo").c_str(), 0644), 0);
  Recorder r;
  r.watch(root.path(), "");
  Injector inj = make();
  inj.apply(bb.build("home", {{Kind::Modify, "fifo"}}));  // would block forever if opened for writing
  EXPECT_EQ(inj.counters().special_skipped, 1u);
  EXPECT_FALSE(contains(r.take(), "/fifo:OPEN"));
}

TEST_P(InjectorTest, RefusesAnotherMountBelowTheRoot) {
  fs::create_directories(root / "mnt");
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::string verdict = "SKIP cannot create a mount namespace";
    if (::unshare(CLONE_NEWNS) == 0 && ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0 &&
        ::mount("tmpfs", (root / "mnt").c_str(), "tmpfs", 0, nullptr) == 0) {
      write_file(root / "mnt/f", "x");
      auto inj = Injector::create({Mount{"home", root.path()}}, InjectorOptions{.force_walk = GetParam()});
      BatchBuilder b;
      inj->apply(b.build("home", {{Kind::Modify, "mnt/f"}, {Kind::Modify, "mnt"}}));
      verdict = inj->counters().refused == 2 && inj->counters().file_touches == 0 ? "OK" : "TOUCHED";
    }
    (void)!::write(pipefd[1], verdict.data(), verdict.size());
    ::_exit(0);
  }
  ::close(pipefd[1]);
  char buf[128] = {};
  (void)!::read(pipefd[0], buf, sizeof buf - 1);
  ::close(pipefd[0]);
  ::waitpid(pid, nullptr, 0);
  const std::string got = buf;
  if (got.rfind("SKIP", 0) == 0) GTEST_SKIP() << got;
  EXPECT_EQ(got, "OK");
}

INSTANTIATE_TEST_SUITE_P(Confinement, InjectorTest, ::testing::Values(false, true),
                         [](const auto& param_info) { return param_info.param ? "Walk" : "Openat2"; });

TEST(Injector, ValidRelativePath) {
  EXPECT_TRUE(Injector::valid_relative_path(""));
  EXPECT_TRUE(Injector::valid_relative_path("a"));
  EXPECT_TRUE(Injector::valid_relative_path("a/b.c/..d/...e"));
  for (const char* bad : {"/", "/a", "a/", "a//b", ".", "..", "a/..", "../a", "a/./b"}) {
    EXPECT_FALSE(Injector::valid_relative_path(bad)) << bad;
  }
  EXPECT_FALSE(Injector::valid_relative_path(std::string(300, 'x')));
}

TEST(Injector, CreateFailsForAMissingMount) {
  EXPECT_FALSE(Injector::create({Mount{"s", "/nonexistent/vbridge"}}).ok());
}

// A FILE_EVENTS batch read at an offset into a socket buffer (after a one-byte message type, as the
// selftest's socket carries it) sits at an odd address; FlatBuffers must still read it from aligned memory
// (UBSan: "member call on misaligned address ... for type 'const struct Vector'" in the verifier).
TEST(ReadFileEvents, PayloadAtAnyOffsetIsReadFromAlignedMemory) {
  flatbuffers::FlatBufferBuilder b;
  std::vector<flatbuffers::Offset<wire::FileEvent>> events;
  for (const char* path : {"a", "dir/b", "dir/c"}) {
    events.push_back(wire::CreateFileEvent(b, Kind::Create, b.CreateString(path), 0, false, true, 42));
  }
  b.Finish(wire::CreateControl(
      b, wire::Message::FileEvents,
      wire::CreateFileEvents(b, b.CreateString("home"), b.CreateVector(events), 0x1122334455667788).Union()));
  std::vector<uint64_t> backing(b.GetSize() / sizeof(uint64_t) + 2);
  auto* base = reinterpret_cast<std::byte*>(backing.data());
  for (size_t offset = 0; offset < 8; ++offset) {
    std::memcpy(base + offset, b.GetBufferPointer(), b.GetSize());
    const std::span<const std::byte> payload(base + offset, b.GetSize());
    std::vector<uint64_t> storage;
    auto batch = read_file_events(payload, storage);
    ASSERT_TRUE(batch.ok()) << offset << ": " << batch.error().message;
    // Copied only when it had to be.
    EXPECT_EQ(storage.empty(), offset == 0) << offset;
    const auto seq_address = reinterpret_cast<uintptr_t>(
        reinterpret_cast<const flatbuffers::Table*>(*batch)->GetAddressOf(wire::FileEvents::VT_SEQ));
    EXPECT_EQ(seq_address % alignof(uint64_t), 0u) << offset;
    EXPECT_EQ((*batch)->seq(), 0x1122334455667788u) << offset;
    EXPECT_EQ((*batch)->share()->str(), "home") << offset;
    std::vector<std::string> paths;
    for (const auto* e : *(*batch)->events()) {
      paths.push_back(e->path()->str());
      EXPECT_EQ(e->changed_since_ns(), 42) << offset;
    }
    EXPECT_EQ(paths, (std::vector<std::string>{"a", "dir/b", "dir/c"})) << offset;
  }
}

TEST(ReadFileEvents, MalformedOrOtherMessagesAreErrors) {
  std::vector<uint64_t> storage;
  const std::string junk = "not a flatbuffer at all";
  auto bad = read_file_events(std::as_bytes(std::span(junk)), storage);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("malformed FILE_EVENTS"), std::string::npos) << bad.error().message;

  flatbuffers::FlatBufferBuilder b;
  b.Finish(wire::CreateControl(b, wire::Message::GoAway, wire::CreateGoAway(b).Union()));
  auto other =
      read_file_events({reinterpret_cast<const std::byte*>(b.GetBufferPointer()), b.GetSize()}, storage);
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.error().message.find("not FILE_EVENTS"), std::string::npos) << other.error().message;
}

}  // namespace
}  // namespace vbridge::file_events
