#include "protocol/mux.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cerrno>
#include <cstring>

namespace vbridge {

namespace {
constexpr size_t kMaxRstMessage = 512;
constexpr size_t kMaxHelloPayload = 1024;
constexpr uint64_t kMaxCredit = 1ull << 31;
constexpr uint32_t kCreditBeforeHello = 1024;  // the smallest window a HELLO may announce
constexpr size_t kMaxSpareFrames = 256;
}  // namespace

struct Mux::Stream {
  StreamId id = 0;
  StreamPhase phase = StreamPhase::kOpening;
  bool fin_queued = false;           // the application asked for shutdown_write
  bool fin_sent = false;             // our FIN frame is queued for the transport
  bool fin_received = false;         // the peer's FIN arrived
  bool in_ready = false;             // present in ready_
  uint64_t send_credit = 0;          // bytes the peer still lets us send
  uint64_t recv_window = 0;          // bytes the peer may still send us
  uint64_t recv_unacked = 0;         // consumed bytes not yet returned as credit
  std::deque<PendingBytes> pending;  // bytes queued by send()/send_piped(), not yet framed
  uint64_t pending_bytes = 0;

  // What the application was told about capacity; send_capacity() records it, hence mutable.
  mutable bool starved = false;     // send_capacity reached 0; on_writable is owed
  mutable bool in_starved = false;  // present in starved_
};

// Most calls ask for the stream the previous call found (send, then schedule it; a frame header, then its
// payload, then consume), so the last hit is kept. Stream objects do not move; reap() drops the entry.
inline Mux::Stream* Mux::find(StreamId id) const {
  Stream* s = cached_;
  if (s == nullptr || s->id != id) s = find_uncached(id);
  return s == nullptr || s->phase == StreamPhase::kClosed ? nullptr : s;
}

const char* stream_state_name(StreamState state) {
  switch (state) {
    case StreamState::kOpening: return "opening";
    case StreamState::kAccepting: return "accepting";
    case StreamState::kOpen: return "open";
    case StreamState::kHalfClosedLocal: return "half-closed(local)";
    case StreamState::kHalfClosedRemote: return "half-closed(remote)";
    case StreamState::kClosed: return "closed";
  }
  return "unknown";
}

Mux::Mux(Role role, MuxHandler& handler, MuxConfig config)
    : role_(role),
      handler_(handler),
      config_(std::move(config)),
      hunting_(config_.resync),
      next_local_id_(role == Role::kHost ? 1 : 2) {
  if (config_.shared != nullptr) {
    config_.features |= kFeatureSharedMemory;
    shared_generation_ = config_.shared->new_generation();
  }
  if (config_.serial_acceptor) {
    // Not a frame any version accepts: an old session on the other end ends with a protocol error.
    OutFrame& marker = queue_frame(FrameType::kData, 0, 0);
    marker.header.fill(std::byte{0xff});
    return;
  }
  if (config_.expect_token.empty()) queue_hello();
}

Mux::~Mux() = default;

void Mux::queue_hello() {
  Hello hello;
  hello.features = config_.features;
  hello.max_frame = config_.max_frame;
  hello.initial_window = config_.initial_window;
  hello.max_streams = config_.max_streams;
  hello.token = config_.hello_token;
  if (config_.shared != nullptr) hello.shared_region = config_.shared->nonce();
  const auto payload = encode_hello(hello);
  OutFrame& f = queue_frame(FrameType::kHello, 0, static_cast<uint32_t>(payload.size()));
  f.owned.assign(payload.begin(), payload.end());
}

// ---------------------------------------------------------------------------------------------------------
// Input

Status Mux::feed(const Slice& bytes) {
  if (failure_) return *failure_;
  if (!closed_.empty()) reap();
  const std::byte* p = bytes.data();
  const size_t n = bytes.size();
  size_t pos = 0;
  if (hunting_) {
    auto resume = hunt_hello(p, n);
    if (!resume) {
      fail(resume.error());
      return *failure_;
    }
    pos = *resume;
  }
  while (pos < n && !failure_) {
    if (!in_payload_) {
      const size_t take = std::min(kFrameHeaderSize - header_have_, n - pos);
      std::memcpy(header_buf_.data() + header_have_, p + pos, take);
      header_have_ += take;
      pos += take;
      if (header_have_ < kFrameHeaderSize) break;
      header_have_ = 0;
      if (Status st = on_frame_header(); !st) {
        fail(st.error());
        break;
      }
      ++counters_.frames_in;
      remaining_ = current_.length;
      in_payload_ = true;
      control_buf_.clear();
      if (remaining_ > 0) continue;
    } else {
      const size_t take = std::min(remaining_, n - pos);
      if (current_.type == FrameType::kData) {
        deliver_data(bytes.sub(pos, take));
      } else {
        control_buf_.insert(control_buf_.end(), p + pos, p + pos + take);
      }
      remaining_ -= take;
      pos += take;
      if (remaining_ > 0) continue;
    }
    // A whole frame is in.
    in_payload_ = false;
    if (current_.type != FrameType::kData) {
      if (Status st = on_frame_payload(control_buf_); !st) fail(st.error());
    }
  }
  if (failure_) return *failure_;
  return {};
}

// The HELLO signature: its fixed header (32-byte payload, stream 0, type HELLO) and the magic.
static std::array<std::byte, kFrameHeaderSize + 4> hello_signature() {
  std::array<std::byte, kFrameHeaderSize + 4> sig{};
  encode_header(FrameHeader{static_cast<uint32_t>(kHelloPayloadSize), 0, FrameType::kHello, 0}, sig.data());
  store_u32(sig.data() + kFrameHeaderSize, kHelloMagic);
  return sig;
}

Result<size_t> Mux::hunt_hello(const std::byte* p, size_t n) {
  static const auto sig = hello_signature();
  // Search the previous chunk's tail joined with this chunk's head, then this chunk alone.
  std::vector<std::byte> joined = hunt_tail_;
  joined.insert(joined.end(), p, p + std::min(n, sig.size() - 1));
  size_t end = 0;  // offset in this chunk just past the signature; 0 = not found
  if (auto it = std::search(joined.begin(), joined.end(), sig.begin(), sig.end()); it != joined.end()) {
    end = static_cast<size_t>(it - joined.begin()) + sig.size() - hunt_tail_.size();
  } else if (auto in = std::search(p, p + n, sig.begin(), sig.end()); in != p + n) {
    end = static_cast<size_t>(in - p) + sig.size();
  }
  if (end == 0) {
    hunt_skipped_ += n;
    counters_.resync_skipped += n;
    // Keep the last bytes in case the signature starts here and ends in the next chunk.
    std::vector<std::byte> all = std::move(hunt_tail_);
    all.insert(all.end(), p + (n > sig.size() ? n - sig.size() : 0), p + n);
    hunt_tail_.assign(all.end() - static_cast<ptrdiff_t>(std::min(all.size(), sig.size() - 1)), all.end());
    if (hunt_skipped_ > config_.max_resync_skip) {
      return Error{ErrorCode::kProtocol, 0,
                   fmt::format("no vbridge HELLO in the first {} bytes from the peer", hunt_skipped_)};
    }
    return n;
  }
  // Found: continue as if the header and the magic had just been parsed.
  if (end > sig.size()) counters_.resync_skipped += end - sig.size();
  hunting_ = false;
  hunt_tail_.clear();
  std::copy(sig.begin(), sig.begin() + kFrameHeaderSize, header_buf_.begin());
  current_ = FrameHeader{static_cast<uint32_t>(kHelloPayloadSize), 0, FrameType::kHello, 0};
  ++counters_.frames_in;
  in_payload_ = true;
  header_have_ = 0;
  control_buf_.assign(sig.begin() + kFrameHeaderSize, sig.end());
  remaining_ = kHelloPayloadSize - 4;
  return end;
}

Status Mux::on_frame_header() {
  if (!peer_) {
    // The first frame must be HELLO: anything else is another protocol on the line.
    const auto raw = decode_header(header_buf_.data());
    // An RST on stream 0 instead of HELLO: the acceptor refused our HELLO (encode_refusal).
    const bool refusal = raw.ok() && raw->type == FrameType::kRst && raw->stream_id == 0 &&
                         raw->length >= 4 && raw->length <= 4 + kMaxRstMessage;
    if (!refusal && (!raw.ok() || raw->type != FrameType::kHello || raw->length > kMaxHelloPayload ||
                     raw->stream_id != 0)) {
      return Error{ErrorCode::kProtocol, 0,
                   fmt::format("peer is not a vbridge agent (it sent \"{}\"); check the transport address",
                               printable_prefix(header_buf_))};
    }
    current_ = *raw;
    return {};
  }
  auto decoded = decode_header(header_buf_.data());
  if (!decoded) return decoded.error();
  const FrameHeader& h = *decoded;
  current_ = h;
  const auto bad = [&](const char* why) {
    return Error{ErrorCode::kProtocol, 0,
                 fmt::format("{} frame on stream {} with length {}: {}", frame_type_name(h.type), h.stream_id,
                             h.length, why)};
  };
  switch (h.type) {
    case FrameType::kHello: return bad("HELLO was already received");
    case FrameType::kData: {
      if (h.stream_id == 0) return bad("DATA needs a stream");
      if (h.length > config_.max_frame) return bad("larger than the announced max frame size");
      auto admitted = admit_data(FrameType::kData, h.stream_id, h.length);
      return admitted ? Status{} : Status{admitted.error()};
    }
    case FrameType::kDataRef:
      if (!shared_active_) return bad("no shared memory was agreed in HELLO");
      if (h.stream_id == 0 || h.length != kDataRefPayloadSize) return bad("needs a stream and 12 bytes");
      return {};
    case FrameType::kRelease:
      if (!shared_active_) return bad("no shared memory was agreed in HELLO");
      if (h.stream_id != 0 || h.length == 0 || h.length % 4 != 0 || h.length > 4 * kMaxReleaseLoans) {
        return bad("needs stream 0 and 1 to 4096 loans of 4 bytes");
      }
      return {};
    case FrameType::kControl:
      if (h.length > config_.max_control) return bad("larger than the control message limit");
      return {};
    case FrameType::kWindowUpdate:
      if (h.stream_id == 0 || h.length != 4) return bad("needs a stream and a 4-byte increment");
      return {};
    case FrameType::kFin:
      if (h.stream_id == 0 || h.length != 0) return bad("needs a stream and no payload");
      return {};
    case FrameType::kRst:
      if (h.stream_id == 0 || h.length < 4 || h.length > 4 + kMaxRstMessage) return bad("malformed RST");
      return {};
    case FrameType::kPing:
    case FrameType::kPong:
      if (h.stream_id != 0 || h.length != 8) return bad("needs stream 0 and an 8-byte token");
      return {};
  }
  return bad("unknown type");
}

Result<Mux::Stream*> Mux::admit_data(FrameType type, StreamId id, uint32_t length) {
  const auto bad = [&](const char* why) {
    return Error{
        ErrorCode::kProtocol, 0,
        fmt::format("{} frame on stream {} with length {}: {}", frame_type_name(type), id, length, why)};
  };
  Stream* s = find(id);
  if (s == nullptr) {
    const bool known = is_local_id(id) ? id < next_local_id_ : id <= last_peer_id_;
    if (!known) return bad("stream was never opened");
    return nullptr;  // raced a local reset
  }
  if (s->fin_received) {
    stream_error(*s, Error{ErrorCode::kProtocol, 0,
                           fmt::format("{} frame on stream {} with length {}: data after FIN",
                                       frame_type_name(type), id, length)});
    return nullptr;
  }
  if (length > s->recv_window) {
    stream_error(*s, Error{ErrorCode::kFlowControl, 0,
                           fmt::format("stream {} sent {} bytes with only {} bytes of credit", id, length,
                                       s->recv_window)});
    return nullptr;
  }
  s->recv_window -= length;
  return s;
}

Status Mux::handle_data_ref(StreamId id, std::span<const std::byte> payload) {
  const uint32_t loan = load_u32(payload.data());
  const uint32_t offset = load_u32(payload.data() + 4);
  const uint32_t length = load_u32(payload.data() + 8);
  const size_t half = config_.shared->peer_half().size();
  if (length == 0 || length > config_.max_frame || offset > half || length > half - offset) {
    return Error{ErrorCode::kProtocol, 0,
                 fmt::format("DATA_REF on stream {} names bytes [{}, +{}) outside the peer's {}-byte half of "
                             "the shared memory",
                             id, offset, length, half)};
  }
  // Borrowed first: the loan goes back when this Slice is dropped, also when the bytes are refused.
  Slice bytes = config_.shared->borrow(shared_generation_, loan, offset, length);
  auto admitted = admit_data(FrameType::kDataRef, id, length);
  if (!admitted) return admitted.error();
  if (*admitted == nullptr) {
    counters_.data_for_closed_stream += length;
    return {};
  }
  counters_.bytes_in += length;
  counters_.bytes_in_by_ref += length;
  handler_.on_data(id, std::move(bytes));
  return {};
}

void Mux::handle_release(std::span<const std::byte> payload) {
  for (size_t at = 0; at + 4 <= payload.size(); at += 4) {
    const uint32_t loan = load_u32(payload.data() + at);
    if (loan >= lent_.size() || lent_[loan].empty()) {
      ++counters_.unknown_releases;
      continue;
    }
    lent_[loan].reset();
    free_loans_.push_back(loan);
  }
}

uint32_t Mux::lend(Slice bytes) {
  if (free_loans_.empty()) {
    lent_.push_back(std::move(bytes));
    return static_cast<uint32_t>(lent_.size() - 1);
  }
  const uint32_t loan = free_loans_.back();
  free_loans_.pop_back();
  lent_[loan] = std::move(bytes);
  return loan;
}

// Our loans from the peer that were returned (their last Slice dropped) go back in RELEASE frames.
void Mux::queue_releases() {
  if (config_.shared == nullptr || !config_.shared->has_returned() || !peer_ || failure_) return;
  returning_.clear();
  config_.shared->take_returned(shared_generation_, returning_);
  for (size_t at = 0; at < returning_.size(); at += kMaxReleaseLoans) {
    const size_t n = std::min(kMaxReleaseLoans, returning_.size() - at);
    OutFrame& f = queue_frame(FrameType::kRelease, 0, static_cast<uint32_t>(4 * n));
    f.owned.resize(4 * n);
    for (size_t i = 0; i < n; ++i) store_u32(f.owned.data() + 4 * i, returning_[at + i]);
  }
}

void Mux::deliver_data(Slice piece) {
  Stream* s = find(current_.stream_id);
  if (s == nullptr) {
    counters_.data_for_closed_stream += piece.size();
    return;
  }
  counters_.bytes_in += piece.size();
  handler_.on_data(s->id, std::move(piece));
}

Status Mux::on_frame_payload(std::span<const std::byte> payload) {
  const FrameHeader& h = current_;
  switch (h.type) {
    case FrameType::kHello: {
      auto hello = decode_hello(payload);
      if (!hello) return hello.error();
      if (!config_.expect_token.empty() && !tokens_equal(hello->token, config_.expect_token)) {
        return Error{ErrorCode::kAuth, EACCES,
                     hello->token.empty() ? "bad token (the peer sent none)" : "bad token"};
      }
      hello->token.clear();
      peer_ = *hello;
      shared_active_ = config_.shared != nullptr && (peer_->features & kFeatureSharedMemory) != 0 &&
                       peer_->shared_region != 0 && peer_->shared_region == config_.shared->nonce();
      // The answer to the peer's HELLO.
      if (config_.serial_acceptor || !config_.expect_token.empty()) queue_hello();
      // Streams opened before the HELLO arrived started with the minimum credit; top them up.
      for (auto& [id, s] : streams_) s->send_credit += peer_->initial_window - kCreditBeforeHello;
      handler_.on_ready(*peer_);
      return {};
    }
    case FrameType::kData: return {};
    case FrameType::kDataRef: return handle_data_ref(h.stream_id, payload);
    case FrameType::kRelease: handle_release(payload); return {};
    case FrameType::kControl: return handle_control(h.stream_id, payload);
    case FrameType::kWindowUpdate: {
      Stream* s = find(h.stream_id);
      if (s == nullptr) return {};
      const uint32_t increment = load_u32(payload.data());
      if (increment == 0) {
        stream_error(
            *s, Error{ErrorCode::kProtocol, 0, fmt::format("WINDOW_UPDATE of 0 bytes on stream {}", s->id)});
        return {};
      }
      s->send_credit += increment;
      if (s->send_credit > kMaxCredit) {
        stream_error(*s, Error{ErrorCode::kFlowControl, 0, fmt::format("stream {} credit overflow", s->id)});
        return {};
      }
      update(*s);
      return {};
    }
    case FrameType::kFin: {
      Stream* s = find(h.stream_id);
      if (s == nullptr) return {};
      if (s->fin_received) {
        stream_error(*s, Error{ErrorCode::kProtocol, 0, fmt::format("second FIN on stream {}", s->id)});
        return {};
      }
      s->fin_received = true;
      handler_.on_fin(h.stream_id);
      // The handler may have ended the stream and flushed the transport, which reaps it: look it up again.
      if (Stream* again = find(h.stream_id)) update(*again);
      return {};
    }
    case FrameType::kRst: {
      if (!peer_) {
        return Error{ErrorCode::kAuth, 0,
                     "peer refused the handshake: " + printable_prefix(payload.subspan(4), kMaxRstMessage)};
      }
      Stream* s = find(h.stream_id);
      if (s == nullptr) return {};
      const uint32_t code = load_u32(payload.data());
      std::string message(reinterpret_cast<const char*>(payload.data() + 4), payload.size() - 4);
      ++counters_.streams_reset;
      Error error{ErrorCode::kReset, static_cast<int>(code), "peer reset the stream: " + message};
      close_stream(*s, &error);
      return {};
    }
    case FrameType::kPing: queue_small(FrameType::kPong, 0, payload); return {};
    case FrameType::kPong: handler_.on_pong(load_u64(payload.data())); return {};
  }
  return {};
}

Status Mux::handle_control(StreamId id, std::span<const std::byte> payload) {
  // FlatBuffers reads fields in place at their natural alignment (8 bytes for a ulong) and checks it only
  // relative to the buffer's start, so the buffer itself must start 8-byte aligned. control_buf_ is heap
  // memory, which is; a payload that is not is copied to aligned storage first.
  std::vector<uint64_t> aligned;
  if (reinterpret_cast<uintptr_t>(payload.data()) % alignof(uint64_t) != 0) {
    aligned.assign((payload.size() + sizeof(uint64_t) - 1) / sizeof(uint64_t), 0);
    std::memcpy(aligned.data(), payload.data(), payload.size());
    payload = std::as_bytes(std::span<const uint64_t>(aligned)).first(payload.size());
  }
  flatbuffers::Verifier verifier(reinterpret_cast<const uint8_t*>(payload.data()), payload.size(),
                                 /*max_depth=*/16, /*max_tables=*/200000);
  if (!wire::VerifyControlBuffer(verifier)) {
    return Error{ErrorCode::kProtocol, 0, fmt::format("malformed CONTROL message on stream {}", id)};
  }
  const wire::Control* control = wire::GetControl(payload.data());
  const auto type = control->message_type();
  // The verifier accepts a union type without its table; every message needs one.
  if (control->message() == nullptr) {
    return Error{ErrorCode::kProtocol, 0,
                 fmt::format("CONTROL message {} on stream {} has no body", wire::EnumNameMessage(type), id)};
  }
  if (id == 0) {
    switch (type) {
      case wire::Message::Ports:
      case wire::Message::FileEvents:
      case wire::Message::Stats: handler_.on_control(*control); return {};
      case wire::Message::GoAway: {
        remote_goaway_ = true;
        const auto* m = control->message_as_GoAway()->message();
        handler_.on_goaway(m != nullptr ? m->str() : std::string());
        return {};
      }
      default:
        return Error{ErrorCode::kProtocol, 0,
                     fmt::format("control message {} needs a stream", wire::EnumNameMessage(type))};
    }
  }
  switch (type) {
    case wire::Message::Open: return handle_open(id, control->message_as_Open());
    case wire::Message::OpenOk:
    case wire::Message::OpenFail: {
      Stream* s = find(id);
      if (s == nullptr) return {};
      if (s->phase != StreamPhase::kOpening) {
        return Error{ErrorCode::kProtocol, 0,
                     fmt::format("open answer for stream {} that is not opening", id)};
      }
      if (type == wire::Message::OpenOk) {
        s->phase = StreamPhase::kOpen;
        handler_.on_open_result(id, nullptr);
        if (Stream* again = find(id)) update(*again);
        return {};
      }
      const auto* fail_msg = control->message_as_OpenFail();
      Error error{ErrorCode::kRefused, fail_msg->errno_value(),
                  fail_msg->message() != nullptr ? fail_msg->message()->str() : std::string()};
      ++counters_.streams_refused;
      close_stream(*s, nullptr);
      handler_.on_open_result(id, &error);
      return {};
    }
    default:
      return Error{ErrorCode::kProtocol, 0,
                   fmt::format("control message {} is connection-level, got it on stream {}",
                               wire::EnumNameMessage(type), id)};
  }
}

Status Mux::handle_open(StreamId id, const wire::Open* open) {
  if (is_local_id(id) || id <= last_peer_id_) {
    return Error{ErrorCode::kProtocol, 0, fmt::format("OPEN with invalid stream id {}", id)};
  }
  if (open->target() == nullptr) return Error{ErrorCode::kProtocol, 0, "OPEN without a target"};
  last_peer_id_ = id;
  const auto refuse = [&](int err, const std::string& why) {
    flatbuffers::FlatBufferBuilder b(128);
    const auto msg = b.CreateString(why);
    b.Finish(wire::CreateControl(b, wire::Message::OpenFail, wire::CreateOpenFail(b, err, msg).Union()));
    queue_control(id, b);
    ++counters_.streams_refused;
  };
  if (local_goaway_) {
    refuse(ECONNREFUSED, "agent is shutting down");
    return {};
  }
  if (peer_streams_ >= config_.max_streams) {
    refuse(EMFILE, fmt::format("too many streams (limit {})", config_.max_streams));
    return {};
  }
  Stream& s = create_stream(id, StreamPhase::kAccepting);
  ++peer_streams_;
  ++counters_.streams_accepted;
  handler_.on_open(s.id, *open->target());
  return {};
}

// ---------------------------------------------------------------------------------------------------------
// Output

size_t Mux::prepare_output(std::span<iovec> out) {
  if (!closed_.empty()) reap();
  queue_releases();
  if (!ready_.empty() || !starved_.empty()) schedule();
  size_t n = 0;
  size_t skip = out_consumed_;
  for (const auto& frame : out_) {
    const OutFrame& f = *frame;
    if (n + 2 > out.size()) break;
    const auto add = [&](const std::byte* data, size_t len) {
      if (skip >= len) {
        skip -= len;
        return;
      }
      out[n++] = iovec{const_cast<std::byte*>(data + skip), len - skip};
      skip = 0;
    };
    add(f.header.data(), f.header.size());
    // Piped bytes cannot be named by an iovec: the caller splices them (piped_output) and comes back.
    if (f.piped != 0) break;
    if (!f.payload.empty()) add(f.payload.data(), f.payload.size());
    if (!f.owned.empty()) add(f.owned.data(), f.owned.size());
    if (f.small_size != 0) add(f.small.data(), f.small_size);
  }
  return n;
}

void Mux::consume_output(size_t n) {
  out_consumed_ += n;
  while (!out_.empty() && out_consumed_ >= out_.front()->size()) {
    OutFrame& f = *out_.front();
    out_consumed_ -= f.size();
    out_data_bytes_ -= f.payload.size() + f.piped;
    if (f.pipe != nullptr) f.pipe->filled -= f.piped;
    if (spare_frames_.size() < kMaxSpareFrames) {
      f.payload.reset();
      f.pipe.reset();
      f.piped = 0;
      f.owned = {};
      f.small_size = 0;
      spare_frames_.push_back(std::move(out_.front()));
    }
    out_.pop_front();
  }
  assert(!out_.empty() || out_consumed_ == 0);
}

bool Mux::has_output() {
  queue_releases();
  if (!ready_.empty() || !starved_.empty()) schedule();
  return !out_.empty();
}

Mux::OutFrame& Mux::queue_frame(FrameType type, StreamId id, uint32_t length) {
  if (spare_frames_.empty()) {
    out_.push_back(std::make_unique<OutFrame>());
  } else {
    out_.push_back(std::move(spare_frames_.back()));
    spare_frames_.pop_back();
  }
  OutFrame& f = *out_.back();
  encode_header(FrameHeader{length, id, type, 0}, f.header.data());
  ++counters_.frames_out;
  return f;
}

void Mux::queue_small(FrameType type, StreamId id, std::span<const std::byte> payload) {
  assert(payload.size() <= 8);
  OutFrame& f = queue_frame(type, id, static_cast<uint32_t>(payload.size()));
  std::copy(payload.begin(), payload.end(), f.small.begin());
  f.small_size = static_cast<uint8_t>(payload.size());
}

void Mux::queue_control(StreamId id, const flatbuffers::FlatBufferBuilder& built) {
  const auto* data = reinterpret_cast<const std::byte*>(built.GetBufferPointer());
  OutFrame& f = queue_frame(FrameType::kControl, id, built.GetSize());
  f.owned.assign(data, data + built.GetSize());
}

// The first `n` bytes of the stream's first pending memory bytes, dropping the entry once it is all taken.
Slice Mux::take_front(Stream& s, size_t n) {
  PendingBytes& head = s.pending.front();
  if (n < head.bytes.size()) {
    Slice front = head.bytes.sub(0, n);
    head.bytes.advance(n);
    return front;
  }
  Slice all = std::move(head.bytes);
  s.pending.pop_front();
  return all;
}

// Moves queued stream data into out_, round-robin, `quantum` bytes per stream per turn, until the
// transport has `output_watermark` bytes of DATA waiting.
void Mux::schedule() {
  if (!peer_) return;
  // Streams woken from the cap may send at once (their handler reads in the callback): serve them in the
  // same call, so output prepared right after a wake is not missing their frames.
  do {
    serve_ready();
  } while (wake_starved() && !ready_.empty() && out_data_bytes_ < config_.output_watermark);
}

void Mux::serve_ready() {
  const uint32_t frame_limit = std::min(config_.max_frame, peer_->max_frame);
  while (out_data_bytes_ < config_.output_watermark && !ready_.empty()) {
    const StreamId id = ready_.front();
    ready_.pop_front();
    Stream* s = find(id);
    if (s == nullptr) continue;
    s->in_ready = false;
    uint64_t budget = std::min<uint64_t>(config_.quantum, s->send_credit);
    while (budget > 0 && !s->pending.empty()) {
      PendingBytes& head = s->pending.front();
      // Bytes in shared memory (min_lent_bytes or more) leave as a 12-byte reference: they hold up nobody
      // on the transport, so the quantum does not cut them.
      const int64_t shared_offset =
          shared_active_ && head.pipe == nullptr && head.size() >= config_.min_lent_bytes
              ? config_.shared->local_offset(head.bytes)
              : -1;
      const size_t take =
          std::min<size_t>({head.size(), shared_offset >= 0 ? s->send_credit : budget, frame_limit});
      if (shared_offset >= 0) {
        OutFrame& f = queue_frame(FrameType::kDataRef, id, kDataRefPayloadSize);
        store_u32(f.small.data(), lend(take_front(*s, take)));
        store_u32(f.small.data() + 4, static_cast<uint32_t>(shared_offset));
        store_u32(f.small.data() + 8, static_cast<uint32_t>(take));
        f.small_size = kDataRefPayloadSize;
        counters_.bytes_out_by_ref += take;
      } else {
        OutFrame& f = queue_frame(FrameType::kData, id, static_cast<uint32_t>(take));
        if (head.pipe != nullptr) {
          f.pipe = head.pipe;
          f.piped = static_cast<uint32_t>(take);
          head.piped -= take;
          if (head.piped == 0) s->pending.pop_front();
        } else {
          f.payload = take_front(*s, take);
        }
        out_data_bytes_ += take;
      }
      budget -= std::min<uint64_t>(budget, take);
      s->send_credit -= take;
      s->pending_bytes -= take;
      buffered_ -= take;
      counters_.bytes_out += take;
    }
    update(*s);
  }
}

// Streams that ran dry on the connection-wide cap may read again once bytes moved on; true if any were.
bool Mux::wake_starved() {
  if (starved_.empty() || room_under_cap() < min_room_under_cap()) return false;
  std::vector<StreamId> again;
  again.swap(starved_);
  for (const StreamId id : again) {
    if (Stream* s = find(id)) {
      s->in_starved = false;
      update(*s);
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------------
// Application side

Result<StreamId> Mux::open(const wire::TargetT& target) {
  if (failure_) return *failure_;
  if (remote_goaway_ || local_goaway_) return Error{ErrorCode::kGoingAway, 0, "connection is draining"};
  if (peer_ && local_streams_ >= peer_->max_streams) {
    return Error{ErrorCode::kLimit, 0, fmt::format("peer allows at most {} streams", peer_->max_streams)};
  }
  if (next_local_id_ > 0xfffffff0u) return Error{ErrorCode::kLimit, 0, "stream ids exhausted; reconnect"};
  const StreamId id = next_local_id_;
  next_local_id_ += 2;
  create_stream(id, StreamPhase::kOpening);
  ++local_streams_;
  ++counters_.streams_opened;
  flatbuffers::FlatBufferBuilder b(128);
  const auto t = wire::Target::Pack(b, &target);
  b.Finish(wire::CreateControl(b, wire::Message::Open, wire::CreateOpen(b, t).Union()));
  queue_control(id, b);
  return id;
}

void Mux::accept(StreamId id) {
  Stream* s = find(id);
  if (s == nullptr || s->phase != StreamPhase::kAccepting) return;
  s->phase = StreamPhase::kOpen;
  flatbuffers::FlatBufferBuilder b(32);
  b.Finish(wire::CreateControl(b, wire::Message::OpenOk, wire::CreateOpenOk(b).Union()));
  queue_control(id, b);
  update(*s);
}

void Mux::reject(StreamId id, int errno_value, const std::string& message) {
  Stream* s = find(id);
  if (s == nullptr || s->phase != StreamPhase::kAccepting) return;
  flatbuffers::FlatBufferBuilder b(128);
  const auto msg = b.CreateString(message);
  b.Finish(
      wire::CreateControl(b, wire::Message::OpenFail, wire::CreateOpenFail(b, errno_value, msg).Union()));
  queue_control(id, b);
  ++counters_.streams_refused;
  close_stream(*s, nullptr);
}

bool Mux::send(StreamId id, Slice data) {
  const size_t n = data.size();
  return queue_pending(id, PendingBytes{std::move(data), nullptr, 0}, n);
}

bool Mux::send_piped(StreamId id, const std::shared_ptr<Pipe>& pipe, size_t n) {
  return queue_pending(id, PendingBytes{Slice{}, pipe, n}, n);
}

// Both kinds of bytes wait in one queue per stream, so their order is kept.
bool Mux::queue_pending(StreamId id, PendingBytes bytes, size_t n) {
  Stream* s = find(id);
  if (s == nullptr || !takes_bytes(*s)) return false;
  if (n == 0) return true;
  s->pending_bytes += n;
  buffered_ += n;
  // Consecutive reads into the same pipe make one entry: frames are cut from it in order either way.
  if (bytes.pipe != nullptr && !s->pending.empty() && s->pending.back().pipe == bytes.pipe) {
    s->pending.back().piped += n;
  } else {
    s->pending.push_back(std::move(bytes));
  }
  update(*s);
  return true;
}

std::optional<Mux::PipedOutput> Mux::piped_output() const {
  if (out_.empty()) return std::nullopt;
  const OutFrame& f = *out_.front();
  if (f.piped == 0 || out_consumed_ < kFrameHeaderSize) return std::nullopt;
  return PipedOutput{f.pipe.get(), f.size() - out_consumed_};
}

size_t Mux::send_capacity(StreamId id) const {
  const Stream* s = find(id);
  return s == nullptr ? 0 : capacity_of(*s);
}

bool Mux::fits(StreamId id, size_t n) const {
  const Stream* s = find(id);
  return s != nullptr && takes_bytes(*s) && s->pending_bytes + n <= s->send_credit && n <= room_under_cap();
}

size_t Mux::capacity_of(const Stream& s) const {
  if (!takes_bytes(s)) return 0;
  const uint64_t room = room_under_cap();
  if (s.pending_bytes >= s.send_credit || room < min_room_under_cap()) {
    note_starved(s);  // the application stops reading now, so it is owed on_writable
    return 0;
  }
  return static_cast<size_t>(std::min(s.send_credit - s.pending_bytes, room));
}

// Not before the application accepted the stream, nor after it half-closed it.
bool Mux::takes_bytes(const Stream& s) { return s.phase != StreamPhase::kAccepting && !s.fin_queued; }

uint64_t Mux::room_under_cap() const {
  return buffered_ < config_.max_buffered ? config_.max_buffered - buffered_ : 0;
}

// Streams stopped by the connection-wide cap read again only once a frame's worth of room is free. Reading
// into every sliver the moment one appears would make many small reads, each holding a whole read buffer.
uint64_t Mux::min_room_under_cap() const {
  return std::max<uint64_t>(1, std::min<uint64_t>(config_.max_buffered, config_.max_frame));
}

// Records that `s` ran out of capacity. Credit comes back with a WINDOW_UPDATE, which updates the stream;
// room under the connection-wide cap comes back when other streams' bytes move on, so a stream waiting for
// that is listed in starved_ for schedule() to wake.
void Mux::note_starved(const Stream& s) const {
  s.starved = true;
  if (!s.in_starved && s.send_credit > s.pending_bytes) {
    s.in_starved = true;
    starved_.push_back(s.id);
  }
}

void Mux::consume(StreamId id, size_t n) {
  Stream* s = find(id);
  if (s == nullptr || s->fin_received) return;
  s->recv_unacked += n;
  // Return credit in batches, so a bulk transfer costs one WINDOW_UPDATE per quarter window.
  if (s->recv_unacked >= config_.initial_window / 4) {
    std::array<std::byte, 4> inc{};
    store_u32(inc.data(), static_cast<uint32_t>(s->recv_unacked));
    s->recv_window += s->recv_unacked;
    s->recv_unacked = 0;
    queue_small(FrameType::kWindowUpdate, id, inc);
  }
}

void Mux::shutdown_write(StreamId id) {
  Stream* s = find(id);
  if (s == nullptr || s->fin_queued) return;
  s->fin_queued = true;
  update(*s);
}

void Mux::reset(StreamId id, const std::string& reason) {
  Stream* s = find(id);
  if (s == nullptr) return;
  queue_rst(id, reason);
  ++counters_.streams_reset;
  close_stream(*s, nullptr);
}

// The peer broke one stream's credit or FIN bookkeeping in a well-formed frame: that stream alone is reset
// on both sides (its bytes dropped, the peer told why); the framing is intact, so the others carry on.
void Mux::stream_error(Stream& s, const Error& error) {
  ++counters_.stream_errors;
  queue_rst(s.id, error.to_string());
  close_stream(s, &error);
}

void Mux::queue_rst(StreamId id, const std::string& reason) {
  const std::string message = reason.substr(0, kMaxRstMessage);
  OutFrame& f = queue_frame(FrameType::kRst, id, static_cast<uint32_t>(4 + message.size()));
  f.owned.resize(4 + message.size());
  store_u32(f.owned.data(), 0);
  std::memcpy(f.owned.data() + 4, message.data(), message.size());
}

void Mux::send_control(const flatbuffers::FlatBufferBuilder& built) { queue_control(0, built); }

void Mux::ping(uint64_t token) {
  std::array<std::byte, 8> payload{};
  store_u64(payload.data(), token);
  queue_small(FrameType::kPing, 0, payload);
}

void Mux::goaway(const std::string& message) {
  if (local_goaway_) return;
  local_goaway_ = true;
  flatbuffers::FlatBufferBuilder b(128);
  const auto msg = b.CreateString(message);
  b.Finish(wire::CreateControl(b, wire::Message::GoAway, wire::CreateGoAway(b, last_peer_id_, msg).Union()));
  queue_control(0, b);
}

std::optional<StreamState> Mux::stream_state(StreamId id) const {
  const Stream* s = find(id);
  if (s == nullptr) return std::nullopt;
  switch (s->phase) {
    case StreamPhase::kOpening: return StreamState::kOpening;
    case StreamPhase::kAccepting: return StreamState::kAccepting;
    case StreamPhase::kClosed: return StreamState::kClosed;
    case StreamPhase::kOpen: break;
  }
  if (s->fin_sent && s->fin_received) return StreamState::kClosed;
  if (s->fin_sent) return StreamState::kHalfClosedLocal;
  if (s->fin_received) return StreamState::kHalfClosedRemote;
  return StreamState::kOpen;
}

// ---------------------------------------------------------------------------------------------------------
// Stream table

Mux::Stream* Mux::find_uncached(StreamId id) const {
  const auto it = streams_.find(id);
  if (it == streams_.end()) return nullptr;
  return cached_ = it->second.get();
}

Mux::Stream& Mux::create_stream(StreamId id, StreamPhase phase) {
  auto s = std::make_unique<Stream>();
  s->id = id;
  s->phase = phase;
  // Before the peer's HELLO arrives we assume the smallest credit HELLO allows; it grows on arrival.
  s->send_credit = peer_ ? peer_->initial_window : kCreditBeforeHello;
  s->recv_window = config_.initial_window;
  Stream& ref = *s;
  if (cached_ != nullptr && cached_->id == id) cached_ = nullptr;
  streams_[id] = std::move(s);
  return ref;
}

void Mux::update(Stream& s) {
  if (s.phase == StreamPhase::kClosed) return;
  // Scheduling: a stream with data and credit waits in the round-robin ring.
  if (!s.pending.empty() && s.send_credit > 0 && !s.in_ready && s.phase != StreamPhase::kAccepting) {
    s.in_ready = true;
    ready_.push_back(s.id);
  }
  // Half-close: FIN follows the last queued byte.
  if (s.fin_queued && !s.fin_sent && s.pending.empty() && s.phase != StreamPhase::kAccepting) {
    s.fin_sent = true;
    queue_frame(FrameType::kFin, s.id, 0);
  }
  // Flow control: tell the application when it may read again.
  // capacity_of() notes a stream that ran out, so it runs first.
  if (!s.fin_queued && capacity_of(s) > 0 && s.starved) {
    s.starved = false;
    const StreamId id = s.id;
    handler_.on_writable(id);
    // As after on_fin: `s` may be gone. Start over on what is left.
    if (Stream* again = find(id)) update(*again);
    return;
  }
  if (s.phase == StreamPhase::kOpen && s.fin_sent && s.fin_received) {
    close_stream(s, nullptr);
    handler_.on_closed(s.id);
  }
}

// Marks a stream closed. With an error, the application hears of it through on_reset.
void Mux::close_stream(Stream& s, const Error* error) {
  if (s.phase == StreamPhase::kClosed) return;
  const bool local = is_local_id(s.id);
  s.phase = StreamPhase::kClosed;
  buffered_ -= s.pending_bytes;
  s.pending_bytes = 0;
  s.pending.clear();
  closed_.push_back(s.id);
  if (local) {
    --local_streams_;
  } else {
    --peer_streams_;
  }
  if (error != nullptr) handler_.on_reset(s.id, *error);
}

void Mux::reap() {
  cached_ = nullptr;
  for (const StreamId id : closed_) {
    const auto it = streams_.find(id);
    if (it != streams_.end() && it->second->phase == StreamPhase::kClosed) streams_.erase(it);
  }
  closed_.clear();
}

void Mux::fail(Error error) {
  if (!failure_) failure_ = std::move(error);
}

}  // namespace vbridge
