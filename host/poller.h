// A file descriptor watched by the libuv loop. The host agent does its own nonblocking readv/writev on raw
// descriptors, so a frame's header and payload leave in one writev straight from pool memory, without a
// per-write request allocation; libuv is the reactor (uv_poll), the timers and the signals.
#pragma once

#include <uv.h>

#include <functional>

#include "host/fd.h"

namespace vbridge {

class Poller {
 public:
  // Called with UV_READABLE/UV_WRITABLE bits; a negative status is a poll error (treat as readable so the
  // read reports the real error).
  using Callback = std::function<void(int status, int events)>;

  Poller(uv_loop_t* loop, UniqueFd fd, Callback callback);
  ~Poller();
  Poller(const Poller&) = delete;
  Poller& operator=(const Poller&) = delete;

  int fd() const { return fd_.get(); }
  void want(bool readable, bool writable);
  bool wants_read() const { return (events_ & UV_READABLE) != 0; }
  bool wants_write() const { return (events_ & UV_WRITABLE) != 0; }
  // Stops watching and closes the descriptor; `done` runs once libuv has let go of the handle, after which
  // the Poller may be destroyed. Safe to call more than once.
  void close(std::function<void()> done);
  bool closing() const { return closing_; }

 private:
  static void on_poll(uv_poll_t* handle, int status, int events);

  UniqueFd fd_;
  Callback callback_;
  uv_poll_t* handle_;  // freed in the close callback: libuv owns it until then
  int events_ = 0;
  bool closing_ = false;
};

}  // namespace vbridge
