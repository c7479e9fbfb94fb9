// Reads of bulk transfers on a worker thread, so the event loop stays free while someone waits for a small
// answer. A relay that copies a bulk stream in its own loop is busy all the time, and a busy thread is
// woken late: a round trip beside the bulk stream then waits for the scheduler, not for its bytes. With the
// copy on the worker the loop mostly sleeps, and a small exchange is served as soon as it arrives.
//
// The worker reads from its own duplicate of the socket into memory the loop reserved, so a bridge may go
// away while its read is in flight: the reservation and the duplicate live until the result is back.
#pragma once

#include <uv.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "protocol/buffer.h"
#include "protocol/interactive_clock.h"

namespace vbridge {

class BulkReader {
 public:
  // Runs on the loop when the read finished: `bytes` holds what was read (empty at EOF or on error),
  // `error` an errno value or 0.
  using Done = std::function<void(Slice bytes, int error)>;
  explicit BulkReader(uv_loop_t* loop);
  ~BulkReader();
  BulkReader(const BulkReader&) = delete;
  BulkReader& operator=(const BulkReader&) = delete;

  // Reads at most into.size() bytes from `fd` into `into` on the worker, then calls `done`. Returns a
  // token for forget(), or 0 (nothing queued) if the descriptor cannot be duplicated.
  uint64_t submit(int fd, Slice into, Done done);
  // The caller of submit() is going away: its `done` is not called (the read itself still finishes).
  void forget(uint64_t token);
  // Stops the worker (after the read in progress) and closes the loop handle; results not yet delivered
  // are dropped. Call before the loop ends.
  void close();
  uint64_t reads() const { return reads_; }

 private:
  struct Request {
    uint64_t token;
    int fd;  // the duplicate, closed by the worker
    std::byte* into;
    size_t size;
  };
  struct Result {
    uint64_t token;
    ssize_t n;
    int error;
  };

  void run();
  void deliver();

  struct InFlight {
    Slice into;  // the memory the worker writes, kept until the result is back
    Done done;
  };
  uv_async_t* async_;                                 // freed in its close callback
  std::unordered_map<uint64_t, InFlight> in_flight_;  // loop only
  uint64_t next_token_ = 1;
  bool worker_stopped_ = false;  // loop only: close() was called
  uint64_t reads_ = 0;

  std::mutex mu_;  // guards the fields below
  std::condition_variable wake_;
  std::deque<Request> requests_;
  std::vector<Result> results_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace vbridge
