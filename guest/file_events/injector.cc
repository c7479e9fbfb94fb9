// How a host-side change becomes a guest inotify event
// ====================================================
//
// The guest kernel raises inotify events from its own VFS operations only, so the injector performs an
// operation on the guest's mount of the share. Measured on a bindfs mount in a private mount namespace
// (host = the backing folder), with inotifywait, chokidar 3/4, watchpack 2 and watchdog as guest watchers:
//
//   operation on the mount                 guest inotify           host inotify        safe with a writer?
//   chmod / chown to the current value     IN_ATTRIB               IN_ATTRIB           no: reverts a host
//                                                                                      chmod made meanwhile;
//                                                                                      chown clears setuid
//   utimensat(current atime, mtime)        IN_ATTRIB               IN_ATTRIB           no: rolls back the
//                                                                                      mtime of a write made
//                                                                                      meanwhile
//   utimensat(atime only)                  IN_ACCESS               -                   yes, but no watcher
//                                                                                      listens to IN_ACCESS
//   truncate to the current size           IN_MODIFY               IN_MODIFY           no: cuts an append
//                                                                                      made meanwhile; moves
//                                                                                      mtime
//   fallocate(KEEP_SIZE)                   EOPNOTSUPP (bindfs, 9p); IN_MODIFY where it works, which echoes on
//                                          the host as a content change
//   open(O_WRONLY) + close                 IN_OPEN, IN_CLOSE_WRITE IN_OPEN, IN_CLOSE_  yes: nothing changes,
//                                                                  WRITE               not even ctime
//   fsetxattr + fremovexattr user.*        IN_ATTRIB               IN_ATTRIB           yes: ctime only
//   the same on a directory                IN_ATTRIB|IN_ISDIR      IN_ATTRIB|IN_ISDIR  yes: ctime only
//   create + unlink a hidden entry         IN_CREATE, IN_DELETE    same                yes, but moves the
//                                          of the hidden name                          directory's mtime and
//                                                                                      watchers report it
//
// So a touch is: open the file for writing (never O_TRUNC, never a write) and set and remove a private
// `user.` xattr through that descriptor, then close. The guest sees IN_OPEN, IN_ATTRIB, IN_CLOSE_WRITE:
// node's fs.watch (libuv subscribes to IN_ATTRIB, not IN_CLOSE_WRITE) and so chokidar and watchpack see a
// change; `inotifywait -e close_write` loops, watchdog and notify-rs see a write. Contents, size and mtime
// are never written, so a host process appending to the same file at the same time loses nothing
// (tests/integration/test_file_events.py proves it); ctime moves, as for any xattr change. The open also
// makes the FUSE client drop cached attributes and pages, so a watcher that stats the file sees the new
// mtime. The xattr shows up on the host as IN_ATTRIB; the host watcher recognises that echo by the file's
// unchanged signature (host/file_watch/echo_filter.h). IN_OPEN/IN_CLOSE_WRITE are not in the host's mask.
//
// Names cannot be faked safely. IN_CREATE, IN_DELETE and IN_MOVED_* for a name come only from creating,
// removing or renaming that name on the shared folder (the FUSE server looks a name up before a create, so
// creating an existing name is just an open). Every way to do it races with a host process that re-creates
// the name at that moment: our unlink would delete its new file, a rename-away would hide it, a mkdir
// placeholder would make its open fail. So for create, delete and rename the injector touches the directory
// whose entries changed (IN_ATTRIB|IN_ISDIR, seen by the directory's own watch and, with the directory's
// name, by its parent's) and, for what exists now, the entry itself. Watchers that re-read a directory on any
// event in it — chokidar (nodemon, webpack-dev-server, vite) — report add / unlink / addDir / unlinkDir with
// the right names; watchers that trust the event's name (watchdog, watchpack for removals) learn that the
// directory changed but not which name went away.
//
// Nothing is opened that is not a regular file or a directory (a device node on a share must not be opened
// by the guest): the object is first reached with O_PATH | O_NOFOLLOW, checked with fstat, and reopened
// through /proc/self/fd, which reopens that very inode, so there is no window to swap it for something else.
#include "guest/file_events/injector.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include "protocol/log.h"

#ifndef SYS_openat2
#define SYS_openat2 437
#endif

namespace vbridge::file_events {
namespace {

constexpr uint64_t kResolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;

int openat2_beneath(int dirfd, const char* path, uint64_t flags) {
  struct open_how how {};
  how.flags = flags;
  how.resolve = kResolve;
  for (int attempt = 0;; ++attempt) {
    const long fd = ::syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    if (fd >= 0) return static_cast<int>(fd);
    // EAGAIN: a concurrent rename somewhere on the system made the kernel refuse a lookup it could not
    // prove safe; it asks for a retry.
    if ((errno == EAGAIN || errno == EINTR) && attempt < 4) continue;
    return -errno;
  }
}

std::string_view parent_of(std::string_view path) {
  const size_t slash = path.rfind('/');
  return slash == std::string_view::npos ? std::string_view() : path.substr(0, slash);
}

// A peer-supplied string, safe to log.
std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 200)) out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  if (s.size() > 200) out += "...";
  return out;
}

int reopen(int path_fd, int flags) {
  char proc[64];
  std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", path_fd);
  const int fd = ::open(proc, flags | O_CLOEXEC | O_NOCTTY);
  return fd >= 0 ? fd : -errno;
}

}  // namespace

bool Injector::valid_relative_path(std::string_view path) {
  if (path.empty()) return true;
  if (path.size() >= PATH_MAX || path.front() == '/' || path.find('\0') != std::string_view::npos)
    return false;
  size_t start = 0;
  for (;;) {
    const size_t slash = path.find('/', start);
    const std::string_view comp =
        path.substr(start, slash == std::string_view::npos ? path.npos : slash - start);
    if (comp.empty() || comp == "." || comp == ".." || comp.size() > NAME_MAX) return false;
    if (slash == std::string_view::npos) return true;
    start = slash + 1;
  }
}

Result<Injector> Injector::create(const std::vector<Mount>& mounts, InjectorOptions options) {
  std::vector<Root> roots;
  auto close_all = [&roots] {
    for (auto& r : roots) ::close(r.fd);
  };
  for (const Mount& m : mounts) {
    const int fd = ::open(m.guest_path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      close_all();
      return Error{ErrorCode::kConfig, err,
                   fmt::format("mount {} of share {}: {}", m.guest_path, m.share, std::strerror(err))};
    }
    struct stat st {};
    ::fstat(fd, &st);
    roots.push_back(Root{m.share, m.guest_path, fd, static_cast<uint64_t>(st.st_dev)});
  }
  bool have_openat2 = !options.force_walk;
  if (have_openat2 && !roots.empty()) {
    const int probe = openat2_beneath(roots[0].fd, ".", O_PATH | O_CLOEXEC);
    // ENOSYS: kernel before 5.6; EPERM: a seccomp profile that predates openat2.
    if (probe == -ENOSYS || probe == -EPERM) {
      have_openat2 = false;
      log::info("file events: openat2 unavailable; confining paths with an O_NOFOLLOW walk");
    } else if (probe >= 0) {
      ::close(probe);
    }
  }
  return Injector(std::move(roots), std::move(options), have_openat2);
}

Injector::Injector(std::vector<Root> roots, InjectorOptions options, bool have_openat2)
    : roots_(std::move(roots)), options_(std::move(options)), have_openat2_(have_openat2) {}

Injector::Injector(Injector&& other) noexcept
    : roots_(std::exchange(other.roots_, {})),
      options_(std::move(other.options_)),
      have_openat2_(other.have_openat2_),
      counters_(other.counters_) {}

Injector& Injector::operator=(Injector&& other) noexcept {
  if (this != &other) {
    std::swap(roots_, other.roots_);
    options_ = std::move(other.options_);
    have_openat2_ = other.have_openat2_;
    counters_ = other.counters_;
  }
  return *this;
}

Injector::~Injector() {
  for (auto& r : roots_) ::close(r.fd);
}

const Injector::Root* Injector::find_root(std::string_view share) const {
  for (const auto& r : roots_) {
    if (r.share == share) return &r;
  }
  return nullptr;
}

int Injector::resolve(const Root& root, std::string_view rel, int flags) const {
  const std::string path = rel.empty() ? std::string(".") : std::string(rel);
  if (have_openat2_)
    return openat2_beneath(root.fd, path.c_str(), static_cast<uint64_t>(flags | O_NOFOLLOW | O_CLOEXEC));

  // Without openat2: one component at a time, never following a symlink, never leaving the root's mount.
  // Components were checked by valid_relative_path, so there is no ".." to climb out with.
  int cur = ::openat(root.fd, ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (cur < 0) return -errno;
  size_t start = 0;
  for (;;) {
    const size_t slash = path.find('/', start);
    const std::string comp =
        path.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    const bool last = slash == std::string::npos;
    const int next =
        ::openat(cur, comp.c_str(), (last ? flags : O_PATH | O_DIRECTORY) | O_NOFOLLOW | O_CLOEXEC);
    int err = next < 0 ? errno : 0;
    if (next < 0 && err == ENOTDIR) {
      struct stat st {};
      if (::fstatat(cur, comp.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode)) err = ELOOP;
    }
    ::close(cur);
    if (next < 0) return -err;
    struct stat st {};
    if (::fstat(next, &st) != 0 || (!S_ISLNK(st.st_mode) && static_cast<uint64_t>(st.st_dev) != root.dev)) {
      ::close(next);
      return -EXDEV;
    }
    if (last) return next;
    cur = next;
    start = slash + 1;
  }
}

void Injector::count_resolve_error(int err, std::string_view rel) {
  switch (err) {
    case ENOENT:
    case ENOTDIR:
    case ESTALE:         // a FUSE mount's way of saying the same while the host removes it
      ++counters_.gone;  // changed again since the host looked: a later event covers it
      return;
    case ELOOP:
    case EXDEV:
      refused_in_event_ = true;
      log::warn("file events: refused {} (it leads through a symlink or into another mount)", printable(rel));
      return;
    default:
      ++counters_.errors;
      log::debug("file events: cannot open {}: {}", printable(rel), std::strerror(err));
  }
}

void Injector::pulse_xattr(int fd) {
  if (::fsetxattr(fd, options_.xattr_name.c_str(), "", 0, 0) != 0) {
    const int err = errno;
    if (err == ENOTSUP || err == EPERM || err == EACCES || err == ENOSPC || err == EDQUOT) {
      ++counters_.xattr_unsupported;
    } else if (err == ENOENT || err == ESTALE) {
      ++counters_.gone;  // removed on the host after we opened it (path-based FUSE servers notice)
    } else {
      ++counters_.errors;
      log::debug("file events: cannot set an xattr: {}", std::strerror(err));
    }
    return;
  }
  if (::fremovexattr(fd, options_.xattr_name.c_str()) != 0) {
    if (errno == ENOENT || errno == ESTALE) {
      ++counters_.gone;
    } else if (errno != ENODATA) {
      ++counters_.errors;
      log::debug("file events: cannot remove an xattr: {}", std::strerror(errno));
    }
  }
}

void Injector::touch_opened(const Root& root, int path_fd, std::string_view rel_for_log) {
  struct stat st {};
  if (::fstat(path_fd, &st) != 0) {
    // Removed on the host between our open and this stat (a FUSE mount asks the host again).
    if (errno == ENOENT || errno == ESTALE) {
      ++counters_.gone;
    } else {
      ++counters_.errors;
      log::debug("file events: cannot stat {}: {}", printable(rel_for_log), std::strerror(errno));
    }
    return;
  }
  if (S_ISLNK(st.st_mode)) {
    ++counters_.symlink_leaf;
    return;
  }
  if (static_cast<uint64_t>(st.st_dev) != root.dev) {
    refused_in_event_ = true;
    log::warn("file events: refused {} (another mount)", printable(rel_for_log));
    return;
  }
  int fd = -1;
  if (S_ISDIR(st.st_mode)) {
    fd = reopen(path_fd, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) ++counters_.dir_touches;
  } else if (S_ISREG(st.st_mode)) {
    // O_NONBLOCK: a host-side lease must not make us wait for its break.
    fd = reopen(path_fd, O_WRONLY | O_NONBLOCK);
    if (fd < 0) {
      // Read-only file, executable being run (ETXTBSY), lease (EWOULDBLOCK), read-only share: an open for
      // reading still gives IN_OPEN and lets the xattr give IN_ATTRIB.
      fd = reopen(path_fd, O_RDONLY | O_NONBLOCK);
      if (fd >= 0) ++counters_.read_only_opens;
    }
    if (fd >= 0) ++counters_.file_touches;
  } else {
    ++counters_.special_skipped;
    return;
  }
  if (fd < 0) {
    count_resolve_error(-fd, rel_for_log);
    return;
  }
  pulse_xattr(fd);
  ::close(fd);
}

void Injector::touch_dir(const Root& root, std::string_view rel) {
  if (!touched_.emplace(rel).second) return;
  const int fd = resolve(root, rel, O_RDONLY | O_DIRECTORY);
  if (fd < 0) {
    count_resolve_error(-fd, rel);
    return;
  }
  ++counters_.dir_touches;
  pulse_xattr(fd);
  ::close(fd);
}

void Injector::touch_entries(const Root& root, int dir_fd, int64_t since_ns) {
  const int dup_fd = ::openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dup_fd < 0) return;
  DIR* d = ::fdopendir(dup_fd);
  if (d == nullptr) {
    ::close(dup_fd);
    return;
  }
  size_t n = 0;
  while (struct dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
    if (++n > options_.max_rescan_entries) break;
    if (since_ns > 0) {
      // Fresh attributes from the server, not the FUSE client's cache: the change may be a moment old.
      struct statx stx {};
      if (::statx(dir_fd, e->d_name, AT_SYMLINK_NOFOLLOW | AT_STATX_FORCE_SYNC, STATX_CTIME, &stx) == 0 &&
          (stx.stx_mask & STATX_CTIME) != 0 &&
          int64_t{stx.stx_ctime.tv_sec} * 1'000'000'000 + stx.stx_ctime.tv_nsec < since_ns) {
        ++counters_.rescan_unchanged;
        continue;
      }
    }
    // One component from the directory itself, not followed if it is a symlink.
    const int pfd = ::openat(dir_fd, e->d_name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (pfd < 0) continue;
    touch_opened(root, pfd, e->d_name);
    ::close(pfd);
  }
  ::closedir(d);
}

void Injector::touch_path(const Root& root, std::string_view rel, bool rescan, int64_t since_ns) {
  if (rescan) {
    const int fd = resolve(root, rel, O_RDONLY | O_DIRECTORY);
    if (fd < 0) {
      count_resolve_error(-fd, rel);
      return;
    }
    if (touched_.emplace(rel).second) {
      ++counters_.dir_touches;
      pulse_xattr(fd);
    }
    touch_entries(root, fd, since_ns);
    ::close(fd);
    return;
  }
  if (touched_.count(std::string(rel)) != 0) return;
  const int pfd = resolve(root, rel, O_PATH);
  if (pfd < 0) {
    count_resolve_error(-pfd, rel);
    return;
  }
  touched_.emplace(rel);
  touch_opened(root, pfd, rel);
  ::close(pfd);
}

void Injector::apply(const wire::FileEvents& batch) {
  size_t next = 0;
  (void)apply_for(batch, &next, std::chrono::microseconds::max());
}

bool Injector::apply_for(const wire::FileEvents& batch, size_t* next, std::chrono::microseconds budget) {
  const auto* events = batch.events();
  const size_t n = events != nullptr ? events->size() : 0;
  if (*next == 0) {
    ++counters_.batches;
    touched_.clear();
  }
  const std::string_view share = batch.share() != nullptr ? batch.share()->string_view() : std::string_view();
  const Root* root = find_root(share);
  if (root == nullptr) {
    counters_.events += n - std::min(*next, n);
    counters_.refused += n - std::min(*next, n);
    counters_.unknown_share += n - std::min(*next, n);
    log::warn("file events: batch {} for unknown share '{}' ({} events) refused", batch.seq(),
              printable(share), n);
    *next = n;
    return true;
  }
  const bool bounded = budget != std::chrono::microseconds::max();
  const auto deadline =
      bounded ? std::chrono::steady_clock::now() + budget : std::chrono::steady_clock::time_point::max();
  const size_t first = *next;
  for (size_t& i = *next; i < n;) {
    // Checked every eight events, and only after some progress in this call.
    if (bounded && i != first && ((i - first) & 7) == 0 && std::chrono::steady_clock::now() >= deadline) {
      return false;
    }
    const wire::FileEvent* e = events->Get(i++);
    ++counters_.events;
    refused_in_event_ = false;
    const std::string_view path = e->path() != nullptr ? e->path()->string_view() : std::string_view();
    const std::string_view old_path =
        e->old_path() != nullptr ? e->old_path()->string_view() : std::string_view();
    if (!valid_relative_path(path) || !valid_relative_path(old_path)) {
      ++counters_.refused;
      log::warn("file events: refused path '{}' (old '{}') in share {}", printable(path), printable(old_path),
                printable(share));
      continue;
    }
    switch (e->kind()) {
      case wire::FileEventKind::Create:
        if (!path.empty()) touch_dir(*root, parent_of(path));
        touch_path(*root, path, false);
        break;
      case wire::FileEventKind::Modify: touch_path(*root, path, e->rescan(), e->changed_since_ns()); break;
      case wire::FileEventKind::Attrib: touch_path(*root, path, false); break;
      case wire::FileEventKind::Delete:
        if (!path.empty()) touch_dir(*root, parent_of(path));
        break;
      case wire::FileEventKind::Rename:
        if (!old_path.empty()) touch_dir(*root, parent_of(old_path));
        if (!path.empty()) touch_dir(*root, parent_of(path));
        touch_path(*root, path, false);
        break;
      default:  // a kind from a newer host: touching the path and its directory is always harmless
        if (!path.empty()) touch_dir(*root, parent_of(path));
        touch_path(*root, path, false);
        break;
    }
    if (refused_in_event_) ++counters_.refused;
  }
  return true;
}

Result<const wire::FileEvents*> read_file_events(std::span<const std::byte> payload,
                                                 std::vector<uint64_t>& storage) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(payload.data());
  if (reinterpret_cast<uintptr_t>(bytes) % alignof(uint64_t) != 0) {
    storage.assign((payload.size() + sizeof(uint64_t) - 1) / sizeof(uint64_t), 0);
    std::memcpy(storage.data(), payload.data(), payload.size());
    bytes = reinterpret_cast<const uint8_t*>(storage.data());
  }
  flatbuffers::Verifier verifier(bytes, payload.size(), /*max_depth=*/16, /*max_tables=*/200000);
  if (!wire::VerifyControlBuffer(verifier)) {
    return Error{
        ErrorCode::kProtocol, 0,
        fmt::format("malformed FILE_EVENTS message ({} bytes); the sender is not a vbridge host agent "
                    "of this version",
                    payload.size())};
  }
  const auto* batch = wire::GetControl(bytes)->message_as_FileEvents();
  if (batch == nullptr) {
    return Error{ErrorCode::kProtocol, 0, "CONTROL message is not FILE_EVENTS or has no body"};
  }
  return batch;
}

}  // namespace vbridge::file_events
