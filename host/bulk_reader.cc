#include "host/bulk_reader.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace vbridge {

BulkReader::BulkReader(uv_loop_t* loop) : async_(new uv_async_t) {
  uv_async_init(loop, async_, [](uv_async_t* h) { static_cast<BulkReader*>(h->data)->deliver(); });
  async_->data = this;
  worker_ = std::thread([this] { run(); });
}

BulkReader::~BulkReader() { close(); }

void BulkReader::close() {
  worker_stopped_ = true;
  {
    std::lock_guard lock(mu_);
    if (stop_) return;
    stop_ = true;
  }
  wake_.notify_one();
  worker_.join();
  for (const Request& r : requests_) ::close(r.fd);
  requests_.clear();
  results_.clear();
  in_flight_.clear();
  uv_close(reinterpret_cast<uv_handle_t*>(async_),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_async_t*>(h); });
}

uint64_t BulkReader::submit(int fd, Slice into, Done done) {
  if (worker_stopped_) return 0;
  const int dup = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return 0;
  const uint64_t token = next_token_++;
  Request request{token, dup, into.data(), into.size()};
  in_flight_[token] = InFlight{std::move(into), std::move(done)};
  {
    std::lock_guard lock(mu_);
    requests_.push_back(request);
  }
  wake_.notify_one();
  return token;
}

void BulkReader::forget(uint64_t token) {
  auto it = in_flight_.find(token);
  if (it != in_flight_.end()) it->second.done = nullptr;
}

void BulkReader::run() {
  std::unique_lock lock(mu_);
  for (;;) {
    wake_.wait(lock, [this] { return stop_ || !requests_.empty(); });
    if (stop_) return;
    const Request r = requests_.front();
    requests_.pop_front();
    lock.unlock();
    ssize_t n;
    do {
      n = ::read(r.fd, r.into, r.size);
    } while (n < 0 && errno == EINTR);
    const int error = n < 0 ? errno : 0;
    ::close(r.fd);
    lock.lock();
    results_.push_back({r.token, n, error});
    uv_async_send(async_);
  }
}

void BulkReader::deliver() {
  std::vector<Result> results;
  {
    std::lock_guard lock(mu_);
    results.swap(results_);
  }
  for (const Result& r : results) {
    auto it = in_flight_.find(r.token);
    if (it == in_flight_.end()) continue;
    InFlight done = std::move(it->second);
    in_flight_.erase(it);
    ++reads_;
    if (done.done) done.done(r.n > 0 ? done.into.sub(0, static_cast<size_t>(r.n)) : Slice{}, r.error);
  }
}

}  // namespace vbridge
