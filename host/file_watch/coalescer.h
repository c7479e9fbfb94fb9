// Per-path coalescing of file changes seen on the host, before they travel to the guest as FILE_EVENTS.
//
// Events for one path inside a window merge into the net change since the window opened: create+modify is a
// create, create+delete is nothing, delete+create is a create (the guest sees a new inode), a rename whose
// source was created in the same window (an editor's "write temp, rename over") is a create of the target.
// The window opens with the first event and closes `window` later, so no event waits longer than that;
// under sustained load it widens up to `max_window`, so storms merge more and send less.
//
// Memory is bounded by `max_paths` pending paths. An event that would exceed it collapses everything pending
// into "rescan this directory" entries for the parents; if even those exceed the bound, into one rescan of
// the share's root. Sans-I/O: time is passed in, nothing here touches the file system.
#pragma once

#include <flatbuffers/flatbuffers.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "protocol/control_generated.h"

namespace vbridge::file_watch {

using Clock = std::chrono::steady_clock;

struct CoalescerOptions {
  std::chrono::milliseconds window{8};
  std::chrono::milliseconds max_window{250};
  size_t max_paths = 16384;
  // A window that closes with at least this many changes doubles the next window; one with less than a
  // quarter of it halves it. Interactive edits stay far below; a checkout or an install widens it.
  size_t busy_changes = 64;
};

// One net change, as sent to the guest.
struct FileChange {
  wire::FileEventKind kind;
  std::string path;      // relative to the share's root; "" is the root
  std::string old_path;  // for kRename
  bool is_dir = false;
  bool rescan = false;   // kModify of a directory whose entries changed without itemized events
  int64_t since_ns = 0;  // with rescan: entries changed at or after this host wall-clock time; 0 = any

  bool operator==(const FileChange&) const = default;
};

struct CoalescerCounters {
  uint64_t events_in = 0;       // raw events fed in
  uint64_t changes_out = 0;     // net changes taken out
  uint64_t merged = 0;          // raw events absorbed by an already pending path
  uint64_t cancelled = 0;       // paths that came and went inside one window
  uint64_t collapses = 0;       // times pending paths collapsed into directory rescans
  uint64_t root_collapses = 0;  // times they collapsed into one rescan of the root
};

class Coalescer {
 public:
  explicit Coalescer(CoalescerOptions options = {});

  void created(std::string_view path, bool is_dir, Clock::time_point now);
  void modified(std::string_view path, Clock::time_point now);
  void attrib(std::string_view path, bool is_dir, Clock::time_point now);
  void deleted(std::string_view path, bool is_dir, Clock::time_point now);
  void renamed(std::string_view from, std::string_view to, bool is_dir, Clock::time_point now);
  // The entries of `dir` changed in ways not itemized (queue overflow, a directory moved in), at or after
  // `since_ns` (host wall clock; 0 = unknown).
  void rescan(std::string_view dir, Clock::time_point now, int64_t since_ns = 0);
  // Events fed from now on are of changes made at or after `since_ns` (host wall clock, the time the
  // caller last found its event queue empty). Rescans made by a collapse use the floor at the window's
  // start, so the guest only re-touches entries that changed in that window.
  void set_clock_floor(int64_t since_ns) { clock_floor_ = since_ns; }

  // When take() has something to return; nullopt when nothing is pending.
  std::optional<Clock::time_point> deadline() const;
  // The pending changes, in the order their paths first appeared, if the window has closed (or `force`).
  std::vector<FileChange> take(Clock::time_point now, bool force = false);

  size_t pending() const { return entries_.size(); }
  std::chrono::milliseconds current_window() const { return window_; }
  const CoalescerCounters& counters() const { return counters_; }

 private:
  enum Flag : uint8_t {
    kExistedBefore = 1,  // the path existed (or may have existed) when the window opened
    kExistsNow = 2,
    kModified = 4,
    kAttrib = 8,
    kRescan = 16,
    kReplaced = 32,  // deleted (or renamed over) and back within the window: a new inode
  };
  struct Entry {
    uint8_t flags = 0;
    bool is_dir = false;
    uint64_t order = 0;
    std::string renamed_from;  // set when this path is the target of a rename from a pre-existing path
    int64_t since_ns = 0;      // for kRescan
  };

  Entry* find(std::string_view path);
  // The entry for `path`, created with `fresh_flags` if absent. Null when the coalescer is collapsed and the
  // event was folded into a rescan instead.
  Entry* touch(std::string_view path, uint8_t fresh_flags, bool is_dir, Clock::time_point now);
  void on_created(std::string_view path, bool is_dir, Clock::time_point now);
  void on_deleted(std::string_view path, bool is_dir, Clock::time_point now);
  void open_window(Clock::time_point now);
  void collapse();
  void add_rescan(std::string_view dir, int64_t since_ns);

  CoalescerOptions options_;
  std::chrono::milliseconds window_;
  std::unordered_map<std::string, Entry> entries_;
  std::optional<Clock::time_point> window_end_;
  uint64_t next_order_ = 0;
  bool collapsed_ = false;  // pending paths became directory rescans; new events join them
  int64_t clock_floor_ = 0;
  int64_t window_floor_ = 0;  // clock_floor_ when the window opened
  CoalescerCounters counters_;
};

std::string_view parent_of(std::string_view path);

struct BatchLimits {
  size_t max_events = 1024;
  size_t max_bytes = 64 * 1024;  // well under the mux's 256 KiB frame limit
};

// Encodes changes as FILE_EVENTS control messages (finished wire::Control buffers), each within `limits`.
// `seq` is incremented once per message.
std::vector<flatbuffers::FlatBufferBuilder> encode_batches(std::string_view share,
                                                           const std::vector<FileChange>& changes,
                                                           uint64_t* seq, const BatchLimits& limits = {});

}  // namespace vbridge::file_watch
