#include "protocol/mux_test_util.h"

#include <cstring>
#include <stdexcept>

namespace vbridge::testing {

std::string RecordingHandler::data_of(StreamId id) const {
  std::string out;
  for (const Event& e : events) {
    if (e.kind == "data" && e.id == id) out += e.text;
  }
  return out;
}

size_t RecordingHandler::count(const std::string& kind) const {
  size_t n = 0;
  for (const Event& e : events) n += e.kind == kind;
  return n;
}

void RecordingHandler::on_open(StreamId id, const wire::Target& target) {
  events.push_back({"open", id, target.path() ? target.path()->str() : ""});
  if (auto_accept) mux->accept(id);
}

void RecordingHandler::on_data(StreamId id, Slice data) {
  events.push_back({"data", id, std::string(reinterpret_cast<const char*>(data.data()), data.size())});
  if (auto_consume) mux->consume(id, data.size());
  if (keep != nullptr) keep->push_back(std::move(data));
}

Slice to_slice(BufferPool& pool, std::string_view bytes) {
  if (bytes.size() > pool.block_size()) throw std::length_error("chunk larger than pool block");
  Slice s = pool.acquire();
  std::memcpy(s.data(), bytes.data(), bytes.size());
  return s.sub(0, bytes.size());
}

Slice text_slice(BufferPool& pool, std::string_view text) { return to_slice(pool, text); }

size_t pump(Mux& from, Mux& to, BufferPool& pool, size_t chunk, Status* status) {
  chunk = std::min(chunk, pool.block_size());
  size_t moved = 0;
  iovec iov[64];
  while (true) {
    const size_t n = from.prepare_output(iov);
    if (n == 0) break;
    Slice buf = pool.acquire();
    size_t used = 0;
    for (size_t i = 0; i < n; ++i) {
      size_t off = 0;
      while (off < iov[i].iov_len) {
        const size_t take = std::min(iov[i].iov_len - off, chunk - used);
        std::memcpy(buf.data() + used, static_cast<std::byte*>(iov[i].iov_base) + off, take);
        used += take;
        off += take;
        if (used == chunk) {
          Status st = to.feed(buf.sub(0, used));
          if (!st && status) *status = st;
          if (!st) return moved;
          moved += used;
          from.consume_output(used);
          buf = pool.acquire();
          used = 0;
          // Earlier iovecs may be invalid after consume_output; restart from the new front.
          goto next_round;
        }
      }
    }
    if (used > 0) {
      Status st = to.feed(buf.sub(0, used));
      if (!st && status) *status = st;
      if (!st) return moved;
      moved += used;
      from.consume_output(used);
    }
  next_round:;
  }
  return moved;
}

std::string drain(Mux& from) {
  std::string out;
  iovec iov[64];
  while (size_t n = from.prepare_output(iov)) {
    size_t total = 0;
    for (size_t i = 0; i < n; ++i) {
      out.append(static_cast<const char*>(iov[i].iov_base), iov[i].iov_len);
      total += iov[i].iov_len;
    }
    from.consume_output(total);
  }
  return out;
}

Pair::Pair(MuxConfig config)
    : host(Role::kHost, host_handler, config), guest(Role::kGuest, guest_handler, config) {
  host_handler.mux = &host;
  guest_handler.mux = &guest;
}

void Pair::settle(size_t chunk) {
  while (pump(host, guest, pool, chunk) + pump(guest, host, pool, chunk) > 0) {
  }
}

wire::TargetT unix_target(const std::string& path) {
  wire::TargetT t;
  t.proto = wire::Proto::Unix;
  t.path = path;
  return t;
}

}  // namespace vbridge::testing
