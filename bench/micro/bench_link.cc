#include "bench/micro/bench_link.h"

#include <sys/uio.h>

#include <cstdlib>
#include <cstring>

namespace vbridge::bench {

Link::Link(MuxConfig config, size_t rx_size)
    : pool(256 * 1024, 64),
      rx_pool(rx_size, 1),
      rx(rx_pool.acquire()),
      back(pool.acquire()),
      sender(Role::kHost, sender_handler, config),
      receiver(Role::kGuest, receiver_handler, config) {
  sender_handler.mux = &sender;
  receiver_handler.mux = &receiver;
  settle();
  stream = open();
}

Link::~Link() = default;

StreamId Link::open() {
  wire::TargetT target;
  target.proto = wire::Proto::Unix;
  target.path = "/bench";
  auto id = sender.open(target);
  if (!id) std::abort();
  settle();
  return *id;
}

size_t Link::move_once(Mux& from, Mux& to) {
  const Slice& buf = &to == &receiver ? rx : back;
  iovec iov[64];
  const size_t n = from.prepare_output(iov);
  size_t used = 0;
  for (size_t i = 0; i < n && used < buf.size(); ++i) {
    const size_t take = std::min(iov[i].iov_len, buf.size() - used);
    std::memcpy(buf.data() + used, iov[i].iov_base, take);
    used += take;
  }
  if (used == 0) return 0;
  if (!to.feed(buf.sub(0, used))) std::abort();
  from.consume_output(used);
  return used;
}

void Link::settle() {
  while (sender.has_output() || receiver.has_output()) {
    move(sender, receiver);
    move(receiver, sender);
  }
}

}  // namespace vbridge::bench
