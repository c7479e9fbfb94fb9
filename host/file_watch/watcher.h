// Watches the host folders shared into the VM and produces FILE_EVENTS batches for the guest.
//
// Loop-agnostic: fd() turns readable whenever drain() has work (file system events, or a coalescing window
// that closed), so a libuv loop polls it with uv_poll and calls drain() on readability. Each returned batch
// is a finished wire::Control holding a FileEvents message, ready for Mux::send_control().
//
// Linux: recursive inotify (watcher_linux.cc). macOS: FSEvents through libuv's recursive uv_fs_event
// (watcher_darwin.cc, built on macOS only).
#pragma once

#include <flatbuffers/flatbuffers.h>
#include <uv.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "host/file_watch/coalescer.h"
#include "host/file_watch/echo_filter.h"
#include "protocol/control_generated.h"
#include "protocol/result.h"

namespace vbridge::file_watch {

struct Share {
  std::string name;  // the name both agents' configurations give this folder
  std::string root;  // host path of the shared folder
};

struct WatcherOptions {
  CoalescerOptions coalescer;
  EchoFilterOptions echo;
  BatchLimits batch;
};

struct Batch {
  std::string share;
  size_t events = 0;
  uint64_t seq = 0;
  flatbuffers::FlatBufferBuilder message;  // finished wire::Control { FileEvents }
};

struct WatcherCounters {
  uint64_t raw_events = 0;  // events read from the kernel
  uint64_t batches = 0;
  uint64_t changes = 0;  // FileEvent entries sent
  uint64_t echoes_suppressed = 0;
  uint64_t overflows = 0;     // kernel queue overflows (each becomes a rescan of every share)
  uint64_t watches = 0;       // directories watched now
  uint64_t watch_errors = 0;  // directories that could not be watched (see last_error)
  uint64_t coalesce_collapses = 0;
  uint64_t pending_paths = 0;
  uint64_t window_ms = 0;  // current coalescing window
};

// Wraps one encoded FILE_EVENTS message of `share` as a Batch.
inline Batch make_batch(const std::string& share, flatbuffers::FlatBufferBuilder message) {
  Batch b;
  b.share = share;
  const auto* fe = flatbuffers::GetRoot<wire::Control>(message.GetBufferPointer())->message_as_FileEvents();
  b.seq = fe->seq();
  b.events = fe->events() != nullptr ? fe->events()->size() : 0;
  b.message = std::move(message);
  return b;
}

// Takes at most `max_batches` batches from the front of `ready`.
inline std::vector<Batch> take_batches(std::deque<Batch>& ready, size_t max_batches) {
  std::vector<Batch> out;
  while (!ready.empty() && out.size() < max_batches) {
    out.push_back(std::move(ready.front()));
    ready.pop_front();
  }
  return out;
}

class Watcher {
 public:
  virtual ~Watcher() = default;
  // Readable when drain() has something to do. Owned by the watcher.
  virtual int fd() const = 0;
  // Processes what is pending and returns at most `max_batches` of the batches due now (possibly none).
  // Never blocks. Backpressure: while the transport cannot take more (e.g. the mux has much unsent),
  // call drain(0): events are still read and merged — memory stays within the coalescer's bound, and a
  // flood becomes directory rescans instead of a kernel queue overflow — and fd() does not wake the loop
  // for due batches. Call drain() again when the transport can take more.
  virtual std::vector<Batch> drain(size_t max_batches = SIZE_MAX) = 0;
  // Queues a rescan of every share's root, e.g. after the transport reconnected and events were lost.
  virtual void rescan_all() = 0;
  virtual WatcherCounters counters() const = 0;
  // The last problem that did not stop the watcher (e.g. the watch limit), empty if none.
  virtual const std::string& last_error() const = 0;
};

// Creates the platform's watcher. `loop` is used on macOS only (FSEvents is delivered through libuv); Linux
// ignores it and may be given nullptr. A watch limit hit while watching the initial trees is an error.
Result<std::unique_ptr<Watcher>> make_watcher(uv_loop_t* loop, std::vector<Share> shares,
                                              const WatcherOptions& options = {});

}  // namespace vbridge::file_watch
