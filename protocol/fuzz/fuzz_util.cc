#include "protocol/fuzz/fuzz_util.h"

#include <sanitizer/asan_interface.h>

#include <cstring>
#include <string_view>

namespace vbridge::fuzz {

std::span<const std::byte> ByteReader::bytes(size_t n) {
  if (n > remaining()) n = remaining();
  const auto* p = reinterpret_cast<const std::byte*>(data_ + pos_);
  pos_ += n;
  return {p, n};
}

Slice GuardedFeed::slice(std::span<const std::byte> bytes) {
  FUZZ_CHECK(bytes.size() <= kMax);
  BufferPool& pool = bytes.size() <= small_.block_size()    ? small_
                     : bytes.size() <= medium_.block_size() ? medium_
                                                            : large_;
  Slice whole = pool.acquire();
  ASAN_UNPOISON_MEMORY_REGION(whole.data(), whole.size());  // a reused buffer is still poisoned
  const size_t head = whole.size() - bytes.size();
  if (!bytes.empty()) std::memcpy(whole.data() + head, bytes.data(), bytes.size());
  ASAN_POISON_MEMORY_REGION(whole.data(), head);
  return whole.sub(head, bytes.size());
}

namespace {

uint64_t mix(uint64_t h, uint64_t v) { return (h ^ v) * 0x100000001B3ull; }

uint64_t mix(uint64_t h, const flatbuffers::String* s) {
  if (s == nullptr) return mix(h, 0xFFFF);
  const std::string_view view = s->string_view();
  h = mix(h, view.size());
  for (const char c : view) h = mix(h, static_cast<unsigned char>(c));
  return h;
}

uint64_t walk_target(uint64_t h, const wire::Target* t) {
  if (t == nullptr) return mix(h, 1);
  h = mix(h, static_cast<uint8_t>(t->proto()));
  h = mix(h, static_cast<uint8_t>(t->family()));
  h = mix(h, t->port());
  h = mix(h, t->path());
  h = mix(h, t->host());
  h = mix(h, std::string_view(wire::EnumNameProto(t->proto())).size());
  return mix(h, std::string_view(wire::EnumNameFamily(t->family())).size());
}

uint64_t walk_listeners(uint64_t h, const flatbuffers::Vector<flatbuffers::Offset<wire::Listener>>* v) {
  if (v == nullptr) return mix(h, 2);
  h = mix(h, v->size());
  for (const wire::Listener* l : *v) {
    if (l == nullptr) continue;
    h = mix(h, static_cast<uint8_t>(l->proto()));
    h = mix(h, static_cast<uint8_t>(l->family()));
    h = mix(h, l->address());
    h = mix(h, l->port());
  }
  return h;
}

}  // namespace

uint64_t walk_control(const wire::Control& control) {
  uint64_t h = 0xCBF29CE484222325ull;
  const wire::Message type = control.message_type();
  h = mix(h, static_cast<uint8_t>(type));
  h = mix(h, std::string_view(wire::EnumNameMessage(type)).size());
  switch (type) {
    case wire::Message::NONE: break;
    case wire::Message::Open:
      if (const auto* m = control.message_as_Open()) h = walk_target(h, m->target());
      break;
    case wire::Message::OpenOk: break;
    case wire::Message::OpenFail:
      if (const auto* m = control.message_as_OpenFail()) {
        h = mix(h, static_cast<uint32_t>(m->errno_value()));
        h = mix(h, m->message());
      }
      break;
    case wire::Message::Ports:
      if (const auto* m = control.message_as_Ports()) {
        h = walk_listeners(h, m->added());
        h = walk_listeners(h, m->removed());
        h = mix(h, m->full());
      }
      break;
    case wire::Message::FileEvents:
      if (const auto* m = control.message_as_FileEvents()) {
        h = mix(h, m->share());
        h = mix(h, m->seq());
        if (const auto* events = m->events()) {
          h = mix(h, events->size());
          for (const wire::FileEvent* e : *events) {
            if (e == nullptr) continue;
            h = mix(h, static_cast<uint8_t>(e->kind()));
            h = mix(h, std::string_view(wire::EnumNameFileEventKind(e->kind())).size());
            h = mix(h, e->path());
            h = mix(h, e->old_path());
            h = mix(h, e->is_dir());
            h = mix(h, e->rescan());
          }
        }
      }
      break;
    case wire::Message::Stats:
      if (const auto* m = control.message_as_Stats()) {
        if (const auto* counters = m->counters()) {
          for (const wire::Counter* c : *counters) {
            if (c == nullptr) continue;
            h = mix(h, c->name());
            h = mix(h, c->value());
          }
        }
      }
      break;
    case wire::Message::GoAway:
      if (const auto* m = control.message_as_GoAway()) {
        h = mix(h, m->last_stream_id());
        h = mix(h, m->message());
      }
      break;
  }
  return h;
}

}  // namespace vbridge::fuzz
