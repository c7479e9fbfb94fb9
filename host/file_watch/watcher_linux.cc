#include "host/file_watch/watcher_linux.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <unordered_set>

#include "protocol/log.h"

namespace vbridge::file_watch {
namespace {

constexpr size_t kReadBuffer = 64 * 1024;
constexpr int kMaxReadsPerDrain = 32;  // then yield to the loop; the epoll fd stays readable
// Slack between "the queue was empty at T" and the ctime the file system stamps on a later change: coarse
// file system timestamps and wall-clock steps.
constexpr int64_t kClockSlackNs = 2'000'000'000;
constexpr size_t kMaxRescanMemory = 4096;

int64_t realtime_ns() {
  struct timespec ts {};
  clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

Error io_error(const std::string& what, int err = errno) {
  return Error{ErrorCode::kIo, err, fmt::format("{}: {}", what, std::strerror(err))};
}

std::string join(std::string_view dir, std::string_view name) {
  if (dir.empty()) return std::string(name);
  std::string out;
  out.reserve(dir.size() + 1 + name.size());
  out.append(dir).push_back('/');
  out.append(name);
  return out;
}

std::string read_sysctl(const char* path) {
  std::ifstream in(path);
  std::string value;
  if (!(in >> value)) return "unknown";
  return value;
}

bool is_under(std::string_view path, std::string_view prefix) {
  if (prefix.empty()) return true;
  return path.size() >= prefix.size() && path.compare(0, prefix.size(), prefix) == 0 &&
         (path.size() == prefix.size() || path[prefix.size()] == '/');
}

}  // namespace

std::string InotifyWatcher::watch_limit_message(const std::string& path) {
  const std::string current = read_sysctl("/proc/sys/fs/inotify/max_user_watches");
  unsigned long long now = 0;
  try {
    now = std::stoull(current);
  } catch (...) {
  }
  const unsigned long long suggest = std::max(now * 2, 524288ULL);
  return fmt::format(
      "inotify watch limit reached while watching {}: fs.inotify.max_user_watches is {} "
      "(/proc/sys/fs/inotify/max_user_watches) and every watched directory takes one; raise it with "
      "`sudo sysctl -w fs.inotify.max_user_watches={}` (make it permanent with a line "
      "`fs.inotify.max_user_watches={}` in /etc/sysctl.d/90-vbridge.conf; inside a user namespace the "
      "limit is /proc/sys/user/max_inotify_watches)",
      path, current, suggest, suggest);
}

Result<std::unique_ptr<Watcher>> make_watcher(uv_loop_t* /*loop*/, std::vector<Share> shares,
                                              const WatcherOptions& options) {
  auto w = InotifyWatcher::create(std::move(shares), options);
  if (!w) return w.error();
  return std::unique_ptr<Watcher>(std::move(*w));
}

InotifyWatcher::InotifyWatcher(std::vector<Share> shares, const WatcherOptions& options)
    : echo_(options.echo), batch_limits_(options.batch) {
  shares_.reserve(shares.size());
  for (auto& s : shares) shares_.push_back(ShareState{std::move(s), Coalescer(options.coalescer)});
}

InotifyWatcher::~InotifyWatcher() {
  for (int fd : {epoll_fd_, timer_fd_, inotify_fd_}) {
    if (fd >= 0) ::close(fd);
  }
}

Result<std::unique_ptr<InotifyWatcher>> InotifyWatcher::create(std::vector<Share> shares,
                                                               const WatcherOptions& options) {
  std::unordered_set<std::string> names;
  for (auto& s : shares) {
    if (s.name.empty() || !names.insert(s.name).second) {
      return Error{ErrorCode::kConfig, 0, fmt::format("share name '{}' is empty or repeated", s.name)};
    }
    char resolved[PATH_MAX];
    if (::realpath(s.root.c_str(), resolved) == nullptr) {
      return io_error(fmt::format("shared folder {} ({})", s.root, s.name));
    }
    s.root = resolved;
    struct stat st {};
    if (::stat(s.root.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      return Error{ErrorCode::kConfig, ENOTDIR, fmt::format("shared folder {} is not a directory", s.root)};
    }
  }
  std::unique_ptr<InotifyWatcher> w(new InotifyWatcher(std::move(shares), options));
  w->inotify_fd_ = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (w->inotify_fd_ < 0) {
    if (errno == EMFILE) {
      return Error{ErrorCode::kLimit, EMFILE,
                   fmt::format("inotify instance limit reached: fs.inotify.max_user_instances is {} "
                               "(/proc/sys/fs/inotify/max_user_instances); raise it with "
                               "`sudo sysctl -w fs.inotify.max_user_instances=1024`",
                               read_sysctl("/proc/sys/fs/inotify/max_user_instances"))};
    }
    return io_error("inotify_init1");
  }
  w->timer_fd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (w->timer_fd_ < 0) return io_error("timerfd_create");
  w->epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (w->epoll_fd_ < 0) return io_error("epoll_create1");
  for (int fd : {w->inotify_fd_, w->timer_fd_}) {
    struct epoll_event ev {};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (::epoll_ctl(w->epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) return io_error("epoll_ctl");
  }
  const auto now = Clock::now();
  w->queue_empty_rt_ns_ = realtime_ns();
  for (uint32_t i = 0; i < w->shares_.size(); ++i) {
    if (Status st = w->watch_tree(i, "", Report::kNothing, now); !st) return st.error();
  }
  log::info("file watch: {} directories watched in {} shares", w->dirs_.size(), w->shares_.size());
  return w;
}

std::string InotifyWatcher::full_path(uint32_t share, std::string_view rel) const {
  const std::string& root = shares_[share].share.root;
  if (rel.empty()) return root;
  return join(root, rel);
}

Status InotifyWatcher::watch_tree(uint32_t share, const std::string& rel, Report report,
                                  Clock::time_point now) {
  Coalescer& co = shares_[share].coalescer;
  std::vector<std::string> stack{rel};
  while (!stack.empty()) {
    std::string dir = std::move(stack.back());
    stack.pop_back();
    const std::string full = full_path(share, dir);
    const int wd = ::inotify_add_watch(inotify_fd_, full.c_str(), kMask);
    if (wd < 0) {
      const int err = errno;
      if (err == ENOENT || err == ENOTDIR) continue;  // gone already; its parent reports that
      ++counters_.watch_errors;
      if (err == ENOSPC) {
        last_error_ = watch_limit_message(full);
        if (!limit_logged_) log::error("file watch: {}", last_error_);
        limit_logged_ = true;
        // Its parent still reports the directory itself; tell the guest to look at it once.
        if (report != Report::kNothing) co.rescan(dir, now);
        return Error{ErrorCode::kLimit, ENOSPC, last_error_};
      }
      last_error_ = fmt::format("cannot watch {}: {}", full, std::strerror(err));
      log::warn("file watch: {}", last_error_);
      continue;
    }
    dirs_[wd] = Dir{share, dir};
    // After an overflow: the lost events were queued after the queue was last seen empty.
    if (report == Report::kRescan)
      co.rescan(dir, now, std::max<int64_t>(queue_empty_rt_ns_ - kClockSlackNs, 1));

    const int dfd = ::open(full.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) continue;
    DIR* d = ::fdopendir(dfd);
    if (d == nullptr) {
      ::close(dfd);
      continue;
    }
    while (struct dirent* e = ::readdir(d)) {
      const std::string_view name(e->d_name);
      if (name == "." || name == "..") continue;
      bool is_dir = e->d_type == DT_DIR;
      if (e->d_type == DT_UNKNOWN) {
        struct stat st {};
        is_dir = ::fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
      }
      std::string child = join(dir, name);
      if (report == Report::kCreated) co.created(child, is_dir, now);
      if (is_dir) stack.push_back(std::move(child));
    }
    ::closedir(d);
  }
  return {};
}

void InotifyWatcher::rekey_watches(uint32_t share, const std::string& from, const std::string& to) {
  for (auto& [wd, d] : dirs_) {
    if (d.share == share && is_under(d.rel, from)) d.rel = to + d.rel.substr(from.size());
  }
}

void InotifyWatcher::forget_watches(uint32_t share, const std::string& prefix) {
  for (auto it = dirs_.begin(); it != dirs_.end();) {
    if (it->second.share == share && is_under(it->second.rel, prefix)) {
      ::inotify_rm_watch(inotify_fd_, it->first);
      it = dirs_.erase(it);
    } else {
      ++it;
    }
  }
}

void InotifyWatcher::on_attrib(uint32_t share, const std::string& path, bool is_dir, Clock::time_point now) {
  struct stat st {};
  if (::lstat(full_path(share, path).c_str(), &st) != 0) return;  // gone: IN_DELETE follows
  if (echo_.is_echo(path, Signature::of(st), now)) {
    ++counters_.echoes_suppressed;
    return;
  }
  shares_[share].coalescer.attrib(path, is_dir, now);
}

void InotifyWatcher::handle(const struct inotify_event& ev, Clock::time_point now) {
  ++counters_.raw_events;
  if (ev.mask & IN_Q_OVERFLOW) {
    ++counters_.overflows;
    log::warn("file watch: the kernel's inotify queue overflowed; rescanning every shared folder");
    for (uint32_t i = 0; i < shares_.size(); ++i) (void)watch_tree(i, "", Report::kRescan, now);
    return;
  }
  auto it = dirs_.find(ev.wd);
  if (it == dirs_.end()) return;  // a watch we already forgot
  if (ev.mask & IN_IGNORED) {
    dirs_.erase(it);
    return;
  }
  const uint32_t share = it->second.share;
  const std::string dir = it->second.rel;  // copy: watch_tree may rehash dirs_
  const bool is_dir = (ev.mask & IN_ISDIR) != 0;
  Coalescer& co = shares_[share].coalescer;

  if (ev.len == 0 || ev.name[0] == '\0') {
    // Events on the watched directory itself; its parent's watch reports them by name, except for a root.
    if (!dir.empty()) return;
    if (ev.mask & (IN_DELETE_SELF | IN_MOVE_SELF)) {
      last_error_ = fmt::format("shared folder {} was removed or moved", shares_[share].share.root);
      log::error("file watch: {}", last_error_);
    } else if (ev.mask & IN_ATTRIB) {
      on_attrib(share, dir, true, now);
    }
    return;
  }

  std::string path = join(dir, ev.name);
  if (ev.mask & IN_CREATE) {
    co.created(path, is_dir, now);
    if (is_dir) (void)watch_tree(share, path, Report::kCreated, now);
  } else if (ev.mask & IN_MODIFY) {
    co.modified(path, now);
  } else if (ev.mask & IN_ATTRIB) {
    on_attrib(share, path, is_dir, now);
  } else if (ev.mask & IN_DELETE) {
    co.deleted(path, is_dir, now);
  } else if (ev.mask & IN_MOVED_FROM) {
    moves_.push_back(PendingMove{ev.cookie, share, std::move(path), is_dir});
  } else if (ev.mask & IN_MOVED_TO) {
    auto m = std::find_if(moves_.begin(), moves_.end(),
                          [&](const PendingMove& p) { return p.cookie == ev.cookie; });
    if (m != moves_.end() && m->share == share) {
      co.renamed(m->path, path, is_dir, now);
      if (is_dir) rekey_watches(share, m->path, path);
      moves_.erase(m);
      return;
    }
    if (m != moves_.end()) {  // from another share
      shares_[m->share].coalescer.deleted(m->path, m->is_dir, now);
      if (m->is_dir) forget_watches(m->share, m->path);
      moves_.erase(m);
    }
    co.created(path, is_dir, now);
    if (is_dir) (void)watch_tree(share, path, Report::kCreated, now);
  }
}

void InotifyWatcher::settle_moves(Clock::time_point now) {
  // Moved out of every share: a delete. (A pair split across two drains also lands here, and then shows up
  // as a delete plus a create, which is still the right final state.)
  for (auto& m : moves_) {
    shares_[m.share].coalescer.deleted(m.path, m.is_dir, now);
    if (m.is_dir) forget_watches(m.share, m.path);
  }
  moves_.clear();
}

void InotifyWatcher::narrow_rescans(uint32_t share, std::vector<FileChange>& changes) {
  const int64_t now_rt = realtime_ns();
  for (FileChange& c : changes) {
    if (!c.rescan || c.since_ns == 0) continue;  // 0: nothing is known, the guest looks at everything
    std::string key = fmt::format("{}\n{}", share, c.path);
    auto it = last_rescan_rt_ns_.find(key);
    if (it != last_rescan_rt_ns_.end()) c.since_ns = std::max(c.since_ns, it->second - kClockSlackNs);
    if (last_rescan_rt_ns_.size() >= kMaxRescanMemory && it == last_rescan_rt_ns_.end())
      last_rescan_rt_ns_.clear();
    last_rescan_rt_ns_[std::move(key)] = now_rt;
  }
}

void InotifyWatcher::expect_echoes(uint32_t share, const std::vector<FileChange>& changes,
                                   Clock::time_point now) {
  // What the injector touches for each change (guest/file_events/injector.cc): the path itself unless it is
  // gone, and the directories whose entries changed. A rescan touches a directory and its entries.
  std::unordered_set<std::string_view> done;
  auto expect = [&](std::string_view rel) {
    if (!done.insert(rel).second) return;
    struct stat st {};
    if (::lstat(full_path(share, rel).c_str(), &st) == 0) echo_.expect(rel, Signature::of(st), now);
  };
  for (const FileChange& c : changes) {
    if (c.rescan) {
      echo_.expect_tree(c.path, now);
      continue;
    }
    if (c.kind != wire::FileEventKind::Delete) expect(c.path);
    if (c.kind == wire::FileEventKind::Create || c.kind == wire::FileEventKind::Delete ||
        c.kind == wire::FileEventKind::Rename) {
      expect(parent_of(c.path));
    }
    if (c.kind == wire::FileEventKind::Rename) expect(parent_of(c.old_path));
  }
}

void InotifyWatcher::arm_timer(bool can_take) {
  std::optional<Clock::time_point> earliest;
  if (can_take) {
    if (!ready_.empty()) earliest = Clock::now();
    for (const auto& s : shares_) {
      if (auto d = s.coalescer.deadline(); d && (!earliest || *d < *earliest)) earliest = d;
    }
  }
  struct itimerspec its {};
  if (earliest) {
    // steady_clock is CLOCK_MONOTONIC here; an absolute deadline already past fires at once.
    const auto ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(earliest->time_since_epoch()).count();
    its.it_value.tv_sec = std::max<int64_t>(ns / 1'000'000'000, 0);
    its.it_value.tv_nsec = ns % 1'000'000'000;
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
  }
  ::timerfd_settime(timer_fd_, TFD_TIMER_ABSTIME, &its, nullptr);
}

std::vector<Batch> InotifyWatcher::drain(size_t max_batches) {
  uint64_t expirations = 0;
  (void)!::read(timer_fd_, &expirations, sizeof expirations);

  // Whatever is queued now happened after the queue was last seen empty.
  for (auto& s : shares_)
    s.coalescer.set_clock_floor(std::max<int64_t>(queue_empty_rt_ns_ - kClockSlackNs, 1));
  alignas(struct inotify_event) static thread_local std::array<char, kReadBuffer> buf;
  for (int reads = 0; reads < kMaxReadsPerDrain; ++reads) {
    const int64_t before_read = realtime_ns();
    const ssize_t n = ::read(inotify_fd_, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        queue_empty_rt_ns_ = before_read;
      } else {
        log::warn("file watch: read inotify: {}", std::strerror(errno));
      }
      break;
    }
    if (n == 0) break;
    const auto now = Clock::now();
    for (ssize_t off = 0; off + static_cast<ssize_t>(sizeof(struct inotify_event)) <= n;) {
      const auto* ev = reinterpret_cast<const struct inotify_event*>(buf.data() + off);
      handle(*ev, now);
      off += static_cast<ssize_t>(sizeof(struct inotify_event) + ev->len);
    }
  }
  const auto now = Clock::now();
  settle_moves(now);

  // Take from the coalescers only when everything taken before has been handed out, so what waits is
  // bounded by the coalescers' own limit.
  if (max_batches > 0 && ready_.empty()) {
    for (uint32_t i = 0; i < shares_.size(); ++i) {
      std::vector<FileChange> changes = shares_[i].coalescer.take(now);
      if (changes.empty()) continue;
      narrow_rescans(i, changes);
      expect_echoes(i, changes, now);
      counters_.changes += changes.size();
      for (auto& m : encode_batches(shares_[i].share.name, changes, &seq_, batch_limits_)) {
        ready_.push_back(make_batch(shares_[i].share.name, std::move(m)));
      }
    }
  }
  std::vector<Batch> out = take_batches(ready_, max_batches);
  counters_.batches += out.size();
  arm_timer(max_batches > 0);
  return out;
}

void InotifyWatcher::rescan_all() {
  const auto now = Clock::now();
  for (auto& s : shares_) s.coalescer.rescan("", now);
  arm_timer(true);
}

WatcherCounters InotifyWatcher::counters() const {
  WatcherCounters c = counters_;
  c.watches = dirs_.size();
  c.echoes_suppressed = counters_.echoes_suppressed;
  for (const auto& s : shares_) {
    c.coalesce_collapses += s.coalescer.counters().collapses + s.coalescer.counters().root_collapses;
    c.pending_paths += s.coalescer.pending();
    c.window_ms = std::max<uint64_t>(c.window_ms, s.coalescer.current_window().count());
  }
  return c;
}

}  // namespace vbridge::file_watch
