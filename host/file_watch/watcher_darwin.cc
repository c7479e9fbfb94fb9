// macOS: FSEvents through libuv's recursive uv_fs_event. Built on macOS only (see CMakeLists.txt).
//
// FSEvents is recursive by itself and needs no per-directory watch, so there is no watch limit; it says
// "something about this path changed" (UV_RENAME: appeared, disappeared or was renamed; UV_CHANGE: contents
// or metadata) and the path's current state tells which: present after UV_RENAME is a create, absent is a
// delete. The same coalescer and echo filter as on Linux follow. Events arrive as libuv callbacks on the
// caller's loop; a pipe makes fd() readable when a coalescing window closes, so the agent drives this
// watcher exactly as it drives the Linux one.
#if defined(__APPLE__)

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <unordered_set>

#include "host/file_watch/watcher.h"
#include "protocol/log.h"

namespace vbridge::file_watch {
namespace {

class FsEventsWatcher final : public Watcher {
 public:
  FsEventsWatcher(uv_loop_t* loop, std::vector<Share> shares, const WatcherOptions& options)
      : loop_(loop), echo_(options.echo), batch_limits_(options.batch) {
    for (auto& s : shares) shares_.push_back(ShareState{std::move(s), Coalescer(options.coalescer), nullptr});
  }

  ~FsEventsWatcher() override {
    // libuv frees handles only after their close callbacks have run on the loop: hand them over.
    for (auto& s : shares_) {
      if (s.handle != nullptr) {
        s.handle->data = nullptr;
        uv_close(reinterpret_cast<uv_handle_t*>(s.handle),
                 [](uv_handle_t* h) { delete reinterpret_cast<uv_fs_event_t*>(h); });
      }
    }
    if (timer_ != nullptr) {
      timer_->data = nullptr;
      uv_close(reinterpret_cast<uv_handle_t*>(timer_),
               [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    }
    for (int fd : pipe_) {
      if (fd >= 0) ::close(fd);
    }
  }

  Status start() {
    if (loop_ == nullptr)
      return Error{ErrorCode::kConfig, 0, "the macOS file watcher needs the agent's uv loop"};
    if (::pipe(pipe_) != 0) return Error{ErrorCode::kIo, errno, "pipe"};
    for (int fd : pipe_) {
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
      ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    timer_ = new uv_timer_t;
    uv_timer_init(loop_, timer_);
    timer_->data = this;
    for (auto& s : shares_) {
      s.handle = new uv_fs_event_t;
      uv_fs_event_init(loop_, s.handle);
      s.handle->data = this;
      const int rc = uv_fs_event_start(s.handle, &FsEventsWatcher::on_event, s.share.root.c_str(),
                                       UV_FS_EVENT_RECURSIVE);
      if (rc != 0) {
        return Error{ErrorCode::kIo, -rc, fmt::format("watching {}: {}", s.share.root, uv_strerror(rc))};
      }
    }
    return {};
  }

  int fd() const override { return pipe_[0]; }

  std::vector<Batch> drain(size_t max_batches) override {
    char sink[64];
    while (::read(pipe_[0], sink, sizeof sink) > 0) {
    }
    const auto now = Clock::now();
    if (max_batches > 0 && ready_.empty()) {
      for (auto& s : shares_) {
        std::vector<FileChange> changes = s.coalescer.take(now);
        if (changes.empty()) continue;
        expect_echoes(s, changes, now);
        counters_.changes += changes.size();
        for (auto& m : encode_batches(s.share.name, changes, &seq_, batch_limits_)) {
          ready_.push_back(make_batch(s.share.name, std::move(m)));
        }
      }
    }
    std::vector<Batch> out = take_batches(ready_, max_batches);
    counters_.batches += out.size();
    can_take_ = max_batches > 0;
    arm();
    return out;
  }

  void rescan_all() override {
    const auto now = Clock::now();
    for (auto& s : shares_) s.coalescer.rescan("", now);
    arm();
  }

  WatcherCounters counters() const override {
    WatcherCounters c = counters_;
    for (const auto& s : shares_) {
      c.coalesce_collapses += s.coalescer.counters().collapses + s.coalescer.counters().root_collapses;
      c.pending_paths += s.coalescer.pending();
      c.window_ms = std::max<uint64_t>(c.window_ms, s.coalescer.current_window().count());
    }
    c.watches = shares_.size();
    return c;
  }

  const std::string& last_error() const override { return last_error_; }

 private:
  struct ShareState {
    Share share;
    Coalescer coalescer;
    uv_fs_event_t* handle;
  };

  static void on_event(uv_fs_event_t* handle, const char* filename, int events, int status) {
    auto* self = static_cast<FsEventsWatcher*>(handle->data);
    if (self == nullptr) return;
    for (auto& s : self->shares_) {
      if (s.handle == handle) self->on_share_event(s, filename, events, status);
    }
  }

  static void on_timer(uv_timer_t* timer) {
    auto* self = static_cast<FsEventsWatcher*>(timer->data);
    if (self != nullptr) self->wake();
  }

  void on_share_event(ShareState& s, const char* filename, int events, int status) {
    ++counters_.raw_events;
    const auto now = Clock::now();
    if (status < 0 || filename == nullptr) {
      // FSEvents dropped events or could not say where: look at everything again.
      ++counters_.overflows;
      s.coalescer.rescan("", now);
      arm();
      return;
    }
    std::string rel = filename;
    while (!rel.empty() && rel.front() == '/') rel.erase(0, 1);
    while (!rel.empty() && rel.back() == '/') rel.pop_back();
    const std::string full = rel.empty() ? s.share.root : s.share.root + "/" + rel;
    struct stat st {};
    const bool exists = ::lstat(full.c_str(), &st) == 0;
    const bool is_dir = exists && S_ISDIR(st.st_mode);
    if (!exists) {
      s.coalescer.deleted(rel, false, now);
    } else if (events & UV_RENAME) {
      s.coalescer.created(rel, is_dir, now);
    } else if (echo_.is_echo(rel, Signature::of(st), now)) {
      ++counters_.echoes_suppressed;
    } else if (is_dir) {
      s.coalescer.attrib(rel, true, now);
    } else {
      s.coalescer.modified(rel, now);
    }
    arm();
  }

  void expect_echoes(const ShareState& s, const std::vector<FileChange>& changes, Clock::time_point now) {
    std::unordered_set<std::string_view> done;
    auto expect = [&](std::string_view rel) {
      if (!done.insert(rel).second) return;
      const std::string full = rel.empty() ? s.share.root : s.share.root + "/" + std::string(rel);
      struct stat st {};
      if (::lstat(full.c_str(), &st) == 0) echo_.expect(rel, Signature::of(st), now);
    };
    for (const FileChange& c : changes) {
      if (c.rescan) {
        echo_.expect_tree(c.path, now);
        continue;
      }
      if (c.kind != wire::FileEventKind::Delete) expect(c.path);
      if (c.kind != wire::FileEventKind::Modify && c.kind != wire::FileEventKind::Attrib)
        expect(parent_of(c.path));
      if (c.kind == wire::FileEventKind::Rename) expect(parent_of(c.old_path));
    }
  }

  // Wakes the consumer when the earliest coalescing window closes (or at once if batches are ready).
  void arm() {
    if (!can_take_) return;
    std::optional<Clock::time_point> earliest;
    if (!ready_.empty()) earliest = Clock::now();
    for (const auto& s : shares_) {
      if (auto d = s.coalescer.deadline(); d && (!earliest || *d < *earliest)) earliest = d;
    }
    if (!earliest) {
      uv_timer_stop(timer_);
      return;
    }
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(*earliest - Clock::now()).count();
    uv_timer_start(timer_, &FsEventsWatcher::on_timer, static_cast<uint64_t>(std::max<int64_t>(ms, 0)), 0);
  }

  void wake() {
    const char b = 1;
    (void)!::write(pipe_[1], &b, 1);
  }

  uv_loop_t* loop_;
  std::vector<ShareState> shares_;
  uv_timer_t* timer_ = nullptr;
  int pipe_[2] = {-1, -1};
  std::deque<Batch> ready_;
  EchoFilter echo_;
  BatchLimits batch_limits_;
  uint64_t seq_ = 0;
  bool can_take_ = true;
  WatcherCounters counters_;
  std::string last_error_;
};

}  // namespace

Result<std::unique_ptr<Watcher>> make_watcher(uv_loop_t* loop, std::vector<Share> shares,
                                              const WatcherOptions& options) {
  std::unordered_set<std::string> names;
  for (auto& s : shares) {
    if (s.name.empty() || !names.insert(s.name).second) {
      return Error{ErrorCode::kConfig, 0, fmt::format("share name '{}' is empty or repeated", s.name)};
    }
    char resolved[PATH_MAX];
    if (::realpath(s.root.c_str(), resolved) == nullptr) {
      return Error{ErrorCode::kConfig, errno,
                   fmt::format("shared folder {}: {}", s.root, std::strerror(errno))};
    }
    s.root = resolved;  // FSEvents reports /private/tmp for /tmp
  }
  auto w = std::make_unique<FsEventsWatcher>(loop, std::move(shares), options);
  if (Status st = w->start(); !st) return st.error();
  return std::unique_ptr<Watcher>(std::move(w));
}

}  // namespace vbridge::file_watch

#endif  // __APPLE__
