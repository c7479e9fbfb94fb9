// Recognises the host-side echo of what the guest's injector does.
//
// To make the guest kernel report a change, the injector sets and removes a private xattr on the changed
// file and on its directory (see guest/file_events/injector.cc). Through the shared folder that is a real
// metadata change, so the host sees IN_ATTRIB for those paths a moment later; forwarding it would make the
// guest touch the file again, forever. The injector's other operations (open for write + close) raise only
// IN_OPEN/IN_CLOSE_WRITE, which the host watcher does not subscribe to.
//
// When the host sends a change it records what the guest will touch — the path and its directory — with
// their stat signature (mode, owner, link count, size, mtime; not ctime, which the xattr moves; for a
// directory mode and owner only, as entries coming and going move the rest). An
// IN_ATTRIB whose path is expected and whose signature is unchanged is the echo and is dropped; a real
// chmod/chown/touch changes the signature and goes through. Expectations live `ttl` and are bounded: past
// `max_paths` they widen to "anything under this directory whose mtime differs from its ctime" (metadata-only
// changes), past `max_trees` to the whole share. So memory stays bounded and no echo escapes while
// expected; what is lost is a host-side xattr-only change of a path the guest was just told about.
#pragma once

#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>

#include "host/file_watch/coalescer.h"

namespace vbridge::file_watch {

struct Signature {
  uint32_t mode = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint64_t nlink = 0;
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;  // not compared: the echo moves it

  static Signature of(const struct stat& st);
  // For a directory only its own metadata counts: its mtime, size and link count move with every entry
  // created or removed in it (which inotify reports as IN_CREATE/IN_DELETE, not IN_ATTRIB).
  bool same_content_and_metadata(const Signature& o) const {
    if (mode != o.mode || uid != o.uid || gid != o.gid) return false;
    if (S_ISDIR(mode)) return true;
    return nlink == o.nlink && size == o.size && mtime_ns == o.mtime_ns;
  }
};

struct EchoFilterOptions {
  std::chrono::milliseconds ttl{10000};
  size_t max_paths = 16384;
  size_t max_trees = 1024;
};

struct EchoFilterCounters {
  uint64_t expected = 0;
  uint64_t suppressed = 0;
  uint64_t widened = 0;       // a path expectation became a directory one (max_paths)
  uint64_t root_widened = 0;  // the whole share became expected (max_trees)
};

class EchoFilter {
 public:
  explicit EchoFilter(EchoFilterOptions options = {});

  // The guest will touch `path`, which now has signature `sig`.
  void expect(std::string_view path, const Signature& sig, Clock::time_point now);
  // The guest will touch `dir` and its direct entries (a rescan).
  void expect_tree(std::string_view dir, Clock::time_point now);
  // True if an IN_ATTRIB on `path` (current signature `sig`) is the guest's echo.
  bool is_echo(std::string_view path, const Signature& sig, Clock::time_point now);

  size_t size() const { return paths_.size() + trees_.size(); }
  const EchoFilterCounters& counters() const { return counters_; }

 private:
  struct PathEntry {
    Signature sig;
    Clock::time_point until;
  };
  void sweep(Clock::time_point now);

  EchoFilterOptions options_;
  std::unordered_map<std::string, PathEntry> paths_;
  std::unordered_map<std::string, Clock::time_point> trees_;
  Clock::time_point root_until_{};
  Clock::time_point next_sweep_{};
  EchoFilterCounters counters_;
};

}  // namespace vbridge::file_watch
