#include "host/poller.h"

#include <cassert>

namespace vbridge {

namespace {
struct HandleBox {
  uv_poll_t handle;
  Poller* owner;
  std::function<void()> on_closed;
};
}  // namespace

Poller::Poller(uv_loop_t* loop, UniqueFd fd, Callback callback)
    : fd_(std::move(fd)), callback_(std::move(callback)) {
  auto* box = new HandleBox{};
  box->owner = this;
  handle_ = &box->handle;
  const int rc = uv_poll_init(loop, handle_, fd_.get());
  assert(rc == 0);
  (void)rc;
  handle_->data = box;
}

Poller::~Poller() {
  if (!closing_) close(nullptr);
}

void Poller::want(bool readable, bool writable) {
  if (closing_) return;
  const int events = (readable ? UV_READABLE : 0) | (writable ? UV_WRITABLE : 0);
  if (events == events_) return;
  events_ = events;
  if (events == 0) {
    uv_poll_stop(handle_);
  } else {
    uv_poll_start(handle_, events, &Poller::on_poll);
  }
}

void Poller::on_poll(uv_poll_t* handle, int status, int events) {
  auto* box = static_cast<HandleBox*>(handle->data);
  if (box->owner == nullptr) return;
  if (status < 0) events = UV_READABLE | UV_WRITABLE;
  box->owner->callback_(status, events);
}

void Poller::close(std::function<void()> done) {
  if (closing_) return;
  closing_ = true;
  auto* box = static_cast<HandleBox*>(handle_->data);
  box->owner = nullptr;
  box->on_closed = std::move(done);
  // uv_close stops the watch itself (one epoll_ctl); the descriptor may only be closed after that.
  const int fd = fd_.release();
  uv_close(reinterpret_cast<uv_handle_t*>(handle_), [](uv_handle_t* h) {
    auto* b = static_cast<HandleBox*>(h->data);
    if (b->on_closed) b->on_closed();
    delete b;
  });
  ::close(fd);
}

}  // namespace vbridge
