// Host unit tests: a libuv loop of their own, drained and closed when the test ends.
#pragma once

#include <uv.h>

namespace vbridge::testing {

struct Loop {
  uv_loop_t loop{};
  Loop() { uv_loop_init(&loop); }
  ~Loop() {
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
  }
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;
  // Runs the loop until `done` holds (each turn waits for an event).
  template <typename F>
  void run_until(F done) {
    while (!done()) uv_run(&loop, UV_RUN_ONCE);
  }
};

}  // namespace vbridge::testing
