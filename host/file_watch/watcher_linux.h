// Recursive inotify watcher for Linux hosts.
//
// One inotify instance watches every directory of every share (inotify has no recursive mode). A directory
// that appears later is watched when its IN_CREATE / IN_MOVED_TO arrives and is then read, and whatever it
// already holds is reported as created: files made between the directory's creation and our watch are
// not missed. Directory renames inside a share re-key the watches below them; a directory moved out is
// forgotten. IN_Q_OVERFLOW (the kernel dropped events) turns into a rescan of every watched directory.
//
// fd() is an epoll descriptor over the inotify descriptor and a timerfd armed for the coalescing deadline.
#pragma once

#include <sys/inotify.h>

#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

#include "host/file_watch/watcher.h"

namespace vbridge::file_watch {

class InotifyWatcher final : public Watcher {
 public:
  static Result<std::unique_ptr<InotifyWatcher>> create(std::vector<Share> shares,
                                                        const WatcherOptions& options = {});
  ~InotifyWatcher() override;
  InotifyWatcher(const InotifyWatcher&) = delete;
  InotifyWatcher& operator=(const InotifyWatcher&) = delete;

  int fd() const override { return epoll_fd_; }
  std::vector<Batch> drain(size_t max_batches = SIZE_MAX) override;
  void rescan_all() override;
  WatcherCounters counters() const override;
  const std::string& last_error() const override { return last_error_; }

  // What to tell the user when inotify_add_watch fails with ENOSPC on `path`.
  static std::string watch_limit_message(const std::string& path);

  // The events a watched directory subscribes to. Not IN_OPEN / IN_CLOSE_*: writes show as IN_MODIFY, and
  // the guest injector's open-for-write must not echo back.
  static constexpr uint32_t kMask = IN_CREATE | IN_DELETE | IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM |
                                    IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_EXCL_UNLINK |
                                    IN_ONLYDIR | IN_DONT_FOLLOW;

 private:
  struct ShareState {
    Share share;
    Coalescer coalescer;
  };
  struct Dir {
    uint32_t share;
    std::string rel;  // "" for the share's root
  };
  struct PendingMove {
    uint32_t cookie;
    uint32_t share;
    std::string path;
    bool is_dir;
  };
  enum class Report : uint8_t { kNothing, kCreated, kRescan };

  InotifyWatcher(std::vector<Share> shares, const WatcherOptions& options);
  // Watches `rel` and every directory below it. kCreated reports every entry found as created (a new
  // directory's contents); kRescan reports every directory as needing a rescan (after an overflow).
  Status watch_tree(uint32_t share, const std::string& rel, Report report, Clock::time_point now);
  void handle(const struct inotify_event& ev, Clock::time_point now);
  void on_attrib(uint32_t share, const std::string& path, bool is_dir, Clock::time_point now);
  void settle_moves(Clock::time_point now);
  void rekey_watches(uint32_t share, const std::string& from, const std::string& to);
  void forget_watches(uint32_t share, const std::string& prefix);
  // Rescans of a directory that was rescanned before only go back to that earlier rescan.
  void narrow_rescans(uint32_t share, std::vector<FileChange>& changes);
  void expect_echoes(uint32_t share, const std::vector<FileChange>& changes, Clock::time_point now);
  void arm_timer(bool can_take);
  std::string full_path(uint32_t share, std::string_view rel) const;

  int inotify_fd_ = -1;
  int timer_fd_ = -1;
  int epoll_fd_ = -1;
  std::vector<ShareState> shares_;
  std::unordered_map<int, Dir> dirs_;  // by watch descriptor
  std::vector<PendingMove> moves_;     // IN_MOVED_FROM waiting for its IN_MOVED_TO
  std::deque<Batch> ready_;            // encoded, not yet taken by the caller (at most one take's worth)
  EchoFilter echo_;
  BatchLimits batch_limits_;
  uint64_t seq_ = 0;
  WatcherCounters counters_;
  std::string last_error_;
  bool limit_logged_ = false;
  int64_t queue_empty_rt_ns_ = 0;  // wall-clock time the inotify queue was last read empty
  // When a rescan of a directory was last handed out: entries changed before then were touched by it, so
  // the next rescan of that directory need not go further back. Bounded; forgetting is always safe.
  std::unordered_map<std::string, int64_t> last_rescan_rt_ns_;
};

}  // namespace vbridge::file_watch
