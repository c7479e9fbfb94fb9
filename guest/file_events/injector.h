// Makes the guest kernel report host-side changes of a shared folder to inotify watchers in the guest.
//
// virtiofs, 9p and sshfs (and bindfs in the tests) do not tell the guest's inotify about changes made on the
// host. The host agent sends FILE_EVENTS; apply() turns each event into cheap metadata operations on the
// guest's mount of the share that raise the matching events without changing any file's contents, size or
// mtime. The choice of operations, and what they can and cannot express, is explained in injector.cc.
//
// Paths are confined to the share's guest mount: "..", ".", empty components, absolute paths, intermediate
// symlinks and other mounts below the root are refused and counted; a symlink as the final component is
// never followed.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "protocol/control_generated.h"
#include "protocol/result.h"

namespace vbridge::file_events {

struct Mount {
  std::string share;       // the name the host uses for the folder
  std::string guest_path;  // where the guest mounts it
};

struct InjectorOptions {
  // Set and removed at once on touched files and directories; never left behind.
  std::string xattr_name = "user.vbridge.touch";
  // A rescan touches at most this many entries of one directory (the directory itself always).
  size_t max_rescan_entries = 4096;
  // Confine paths with the O_NOFOLLOW walk even where openat2 exists (to test that path).
  bool force_walk = false;
};

struct InjectorCounters {
  uint64_t batches = 0;
  uint64_t events = 0;
  uint64_t file_touches = 0;     // regular files touched
  uint64_t dir_touches = 0;      // directories touched
  uint64_t refused = 0;          // events refused: bad path, escaping symlink, other mount, unknown share
  uint64_t unknown_share = 0;    // (part of refused)
  uint64_t gone = 0;             // the path no longer exists in the guest's view: nothing to touch
  uint64_t symlink_leaf = 0;     // the path is a symlink: only its directory was touched
  uint64_t special_skipped = 0;  // fifos, sockets, devices: never opened
  uint64_t read_only_opens =
      0;  // could not open for writing (read-only file, busy executable): no IN_CLOSE_WRITE
  uint64_t xattr_unsupported = 0;  // the share refuses user xattrs: no IN_ATTRIB for that touch
  uint64_t rescan_unchanged = 0;   // entries a rescan left alone: not changed since the time it gave
  uint64_t errors = 0;             // any other failed syscall
};

class Injector {
 public:
  // Opens every mount's root. Fails if one cannot be opened as a directory.
  static Result<Injector> create(const std::vector<Mount>& mounts, InjectorOptions options = {});
  Injector(Injector&& other) noexcept;
  Injector& operator=(Injector&& other) noexcept;
  Injector(const Injector&) = delete;
  Injector& operator=(const Injector&) = delete;
  ~Injector();

  // Applies one FILE_EVENTS batch synchronously. Each event costs a handful of metadata syscalls on the
  // mount; the touches of one directory are merged within a batch. Never throws; failures are counted.
  void apply(const wire::FileEvents& batch);
  // The same in slices, for a loop that must not stall: applies events from index *next on until the
  // batch is done (returns true) or `budget` has passed (returns false; call again with the same batch,
  // whose buffer must stay alive, and the same *next). Start each batch with *next == 0.
  bool apply_for(const wire::FileEvents& batch, size_t* next, std::chrono::microseconds budget);

  const InjectorCounters& counters() const { return counters_; }
  // True when openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV) confines lookups; false when
  // the kernel lacks it and a component-by-component O_NOFOLLOW walk does.
  bool uses_openat2() const { return have_openat2_; }

  // Whether `path` is acceptable at all: relative, no "", "." or ".." components, no NUL, not too long.
  // "" (the root) is acceptable.
  static bool valid_relative_path(std::string_view path);

 private:
  struct Root {
    std::string share;
    std::string guest_path;
    int fd = -1;  // O_PATH | O_DIRECTORY
    uint64_t dev = 0;
  };
  enum class Touch : uint8_t { kTarget, kDirectory };

  Injector(std::vector<Root> roots, InjectorOptions options, bool have_openat2);
  const Root* find_root(std::string_view share) const;
  // An O_PATH descriptor for `rel` beneath the root, never following symlinks. -errno on failure.
  int resolve(const Root& root, std::string_view rel, int flags) const;
  // `since_ns` > 0: a rescan touches only entries whose ctime is at or after it.
  void touch_path(const Root& root, std::string_view rel, bool rescan, int64_t since_ns = 0);
  void touch_dir(const Root& root, std::string_view rel);
  // Touches the object behind an O_PATH descriptor (a regular file or a directory).
  void touch_opened(const Root& root, int path_fd, std::string_view rel_for_log);
  void touch_entries(const Root& root, int dir_fd, int64_t since_ns);
  void pulse_xattr(int fd);
  void count_resolve_error(int err, std::string_view rel);

  std::vector<Root> roots_;
  InjectorOptions options_;
  bool have_openat2_ = false;
  InjectorCounters counters_;
  // Paths touched while applying the current batch (directories and files), so each is touched once.
  std::unordered_set<std::string> touched_;
  bool refused_in_event_ = false;
};

// Verifies a CONTROL payload (a wire::Control) carrying FILE_EVENTS and returns the batch. FlatBuffers reads
// fields in place at their natural alignment (8 bytes for `seq`) and checks alignment only relative to the
// buffer's start, so the buffer itself must start 8-byte aligned. A payload that does not (bytes read at an
// offset into a socket buffer, say) is copied into `storage` and the batch points there; an aligned one is
// not copied and the batch points into `payload`. The batch lives as long as whichever it points into.
Result<const wire::FileEvents*> read_file_events(std::span<const std::byte> payload,
                                                 std::vector<uint64_t>& storage);

}  // namespace vbridge::file_events
