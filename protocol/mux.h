// The stream multiplexer: a sans-I/O state machine shared by both agents.
//
// Primer. One transport connection carries many streams. Each side first sends HELLO. A stream is opened
// with a CONTROL/Open frame on a fresh id (host odd, guest even) and answered with OpenOk or OpenFail; the
// opener may send data before the answer. DATA frames are limited by per-stream credit: a side may have at
// most `window` unacknowledged bytes in flight, and the receiver returns credit with WINDOW_UPDATE once the
// application has consumed the bytes. FIN closes one direction (shutdown(SHUT_WR) semantics); a stream ends
// when FIN went both ways, or at once on RST. GOAWAY stops new streams and lets the others drain.
//
// The caller feeds received bytes (feed) and asks for gather-write vectors (prepare_output/consume_output).
// Payload never gets copied: DATA received is handed to the handler as Slices of the buffers it was read
// into, and data sent leaves as iovecs pointing at the caller's Slices. Ready streams are served round-robin
// in quanta, so a small exchange is never queued behind a bulk one.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "protocol/buffer.h"
#include "protocol/control_generated.h"
#include "protocol/frame.h"
#include "protocol/pipe.h"
#include "protocol/result.h"
#include "protocol/shared_memory.h"

namespace vbridge {

enum class Role : uint8_t { kHost, kGuest };

struct MuxConfig {
  uint32_t max_frame = 256 * 1024;  // largest payload we accept, and the most we put in one DATA frame
  uint32_t initial_window = 4 * 1024 * 1024;
  uint32_t max_streams = 16384;
  uint32_t max_control = 1024 * 1024;      // largest CONTROL payload we accept
  uint32_t quantum = 64 * 1024;            // bytes a stream may send per scheduler turn
  uint32_t output_watermark = 256 * 1024;  // DATA bytes queued for the transport before the scheduler pauses
  // Connection-wide cap on bytes queued on streams for sending. Windows bound each stream; this bounds what
  // all of them together read ahead of a busy transport: a few ms of its throughput keep it busy, and every
  // byte beyond is memory and latency (a full 64 x 4 MiB of windows is half a second at 400 MB/s).
  uint64_t max_buffered = 16ull * 1024 * 1024;
  uint64_t features = 0;
  // Before the handshake, skip bytes until the peer's HELLO instead of failing on them. For byte pipes that
  // outlive either end (a virtio-serial port): a restarted peer finds stale frames of the old session first.
  bool resync = false;
  uint64_t max_resync_skip = 64ull * 1024 * 1024;
  // The accepting end of such a pipe (the guest on virtio-serial): send a restart marker first, so a peer
  // still inside an old session fails at once and reconnects, and send HELLO only in answer to the peer's,
  // so the HELLO reaches the peer's new session rather than the old one.
  bool serial_acceptor = false;
  // Token authentication (unix and TCP transports, --token-file). The connecting side sends `hello_token`
  // in its HELLO. An accepting side with `expect_token` sends its own HELLO only in answer to a HELLO that
  // carries the same token; any other HELLO fails the handshake with ErrorCode::kAuth, and the caller
  // answers with encode_refusal() before closing. A refusal is reported to the connecting side as kAuth.
  std::string hello_token;
  std::string expect_token;
  // Memory mapped by both agents (protocol/shared_memory.h), or null. When both HELLOs name the same region,
  // DATA whose bytes lie in this side's half leaves as a DATA_REF naming them, and the peer's DATA_REFs
  // arrive as Slices of the peer's half. It must outlive every Slice the mux hands out.
  SharedMemory* shared = nullptr;
  // Shared bytes smaller than this leave as plain DATA all the same. A loan costs the peer a RELEASE frame,
  // and for a small exchange that frame is a write and a wakeup of its own on both sides, where copying a
  // few KiB through the transport costs less than a microsecond.
  uint32_t min_lent_bytes = 16 * 1024;
};

// The lifecycle of one stream. Half-close is tracked by two flags beside it (fin_sent, fin_received).
enum class StreamPhase : uint8_t {
  kOpening,    // we sent OPEN and await OpenOk/OpenFail; data may already flow both ways
  kAccepting,  // the peer sent OPEN; the application has not accepted or rejected it yet
  kOpen,       // established
  kClosed,     // both FINs exchanged, refused, or reset; removed from the table right after
};

// A view of a stream's state, as tests and `vbridge status` see it.
enum class StreamState : uint8_t {
  kOpening,
  kAccepting,
  kOpen,
  kHalfClosedLocal,
  kHalfClosedRemote,
  kClosed
};
const char* stream_state_name(StreamState state);

struct MuxCounters {
  uint64_t frames_in = 0, frames_out = 0;
  uint64_t bytes_in = 0, bytes_out = 0;  // payload bytes of DATA frames
  uint64_t streams_opened = 0, streams_accepted = 0, streams_refused = 0, streams_reset = 0;
  uint64_t data_for_closed_stream = 0;                 // DATA that raced a local reset; dropped
  uint64_t resync_skipped = 0;                         // stale bytes skipped before the peer's HELLO
  uint64_t bytes_out_by_ref = 0, bytes_in_by_ref = 0;  // DATA bytes that went as DATA_REF (in bytes_out/in)
  uint64_t unknown_releases = 0;                       // RELEASEs of loans not outstanding; ignored
  uint64_t stream_errors = 0;  // streams the peer broke (credit, FIN) and we reset; the connection went on
};

// What the mux tells the application. Callbacks may call back into the Mux.
class MuxHandler {
 public:
  virtual ~MuxHandler() = default;
  // The handshake completed; `peer` is what the other side announced.
  virtual void on_ready(const Hello& peer) = 0;
  // The peer opened stream `id` towards `target`; answer with Mux::accept or Mux::reject (now or later).
  virtual void on_open(StreamId id, const wire::Target& target) = 0;
  // A stream we opened was accepted (error == nullptr) or refused.
  virtual void on_open_result(StreamId id, const Error* error) = 0;
  // Bytes for stream `id`. Call Mux::consume(id, n) once they are delivered, to return credit.
  virtual void on_data(StreamId id, Slice data) = 0;
  // The peer will send no more on `id` (half-close).
  virtual void on_fin(StreamId id) = 0;
  // The stream was reset by the peer or failed; it is gone after this call.
  virtual void on_reset(StreamId id, const Error& error) = 0;
  // Stream `id` has send capacity again after running out.
  virtual void on_writable(StreamId id) = 0;
  // Both directions finished cleanly; the stream is gone after this call.
  virtual void on_closed(StreamId id) = 0;
  // A connection-level control message (PORTS, FILE_EVENTS, STATS).
  virtual void on_control(const wire::Control& message) = 0;
  // The peer is going away: it will accept no new streams.
  virtual void on_goaway(const std::string& message) = 0;
  virtual void on_pong(uint64_t token) = 0;
};

class Mux {
 public:
  Mux(Role role, MuxHandler& handler, MuxConfig config = {});
  ~Mux();
  Mux(const Mux&) = delete;
  Mux& operator=(const Mux&) = delete;

  // ---- transport side ----
  // Feeds bytes received from the transport, in any split. A returned error is fatal for the connection:
  // log it and close the transport. A well-formed frame that breaks one stream's credit or FIN rules is
  // not: that stream is reset on both sides (on_reset names the violation) and the others go on.
  Status feed(const Slice& bytes);
  // Fills `out` with gather-write vectors for what is ready to send; returns how many were filled.
  // The memory stays valid until consume_output() covers it.
  size_t prepare_output(std::span<iovec> out);
  // `n` bytes of the prepared output were written to the transport.
  void consume_output(size_t n);
  bool has_output();
  // True after the handshake completed.
  bool ready() const { return peer_.has_value(); }

  // ---- application side ----
  // Opens a stream to `target` on the peer. Fails if the peer is going away or streams are exhausted.
  Result<StreamId> open(const wire::TargetT& target);
  void accept(StreamId id);
  void reject(StreamId id, int errno_value, const std::string& message);
  // Queues bytes on a stream. Returns false (and drops nothing) if the stream cannot send any more.
  bool send(StreamId id, Slice data);
  // Queues `n` bytes the caller has spliced into `pipe` (this stream's own pipe): they leave the pipe for
  // the transport by splice, never through memory. Mixes freely with send(); the order is kept.
  bool send_piped(StreamId id, const std::shared_ptr<Pipe>& pipe, size_t n);
  // When the next output bytes are piped payload, prepare_output() stops before them and this names the
  // pipe and how many of its bytes come next: splice them to the transport and report them through
  // consume_output() as usual.
  struct PipedOutput {
    Pipe* pipe;
    size_t size;
  };
  std::optional<PipedOutput> piped_output() const;
  // How many more bytes send() should be given now: credit left minus bytes already queued, bounded by
  // the connection-wide cap. The application reads its socket only while this is positive.
  size_t send_capacity(StreamId id) const;
  // Whether `n` more bytes fit on `id` now, within its credit and the connection-wide cap. For datagrams,
  // sent whole or dropped: they may take the last sliver under the cap that send_capacity() holds back from
  // byte streams. Owes no on_writable.
  bool fits(StreamId id, size_t n) const;
  // `n` bytes received on `id` were delivered; returns credit to the peer.
  void consume(StreamId id, size_t n);
  // Half-closes our direction once queued data is out.
  void shutdown_write(StreamId id);
  // Aborts a stream in both directions; queued data is dropped.
  void reset(StreamId id, const std::string& reason);
  void send_control(const flatbuffers::FlatBufferBuilder& built);
  void ping(uint64_t token);
  // Announces that no new streams will be accepted; existing ones drain.
  void goaway(const std::string& message);
  bool draining() const { return local_goaway_ || remote_goaway_; }

  bool has_stream(StreamId id) const { return streams_.count(id) != 0; }
  std::optional<StreamState> stream_state(StreamId id) const;
  size_t stream_count() const { return local_streams_ + peer_streams_; }
  const MuxCounters& counters() const { return counters_; }
  uint64_t buffered_bytes() const { return buffered_; }
  const std::optional<Hello>& peer() const { return peer_; }
  const std::optional<Error>& failure() const { return failure_; }
  // Both sides map the same shared memory: stream bytes in it travel by reference.
  bool shared_active() const { return shared_active_; }
  // Loans the peer has not returned yet.
  size_t loans_outstanding() const { return lent_.size() - free_loans_.size(); }

 private:
  struct Stream;
  struct OutFrame {
    HeaderBytes header;
    Slice payload;               // DATA payload: the sender's bytes
    std::shared_ptr<Pipe> pipe;  // ... or `piped` bytes waiting in this pipe
    uint32_t piped = 0;
    std::vector<std::byte> owned;     // CONTROL and RST payloads, built by the mux
    std::array<std::byte, 12> small;  // WINDOW_UPDATE, PING, PONG and DATA_REF payloads, without allocating
    uint8_t small_size = 0;
    size_t size() const { return kFrameHeaderSize + payload.size() + piped + owned.size() + small_size; }
  };
  // Bytes a stream queued: in memory, or `piped` bytes in a pipe.
  struct PendingBytes {
    Slice bytes;
    std::shared_ptr<Pipe> pipe;
    size_t piped = 0;
    size_t size() const { return pipe != nullptr ? piped : bytes.size(); }
  };

  Status on_frame_header();
  // In resync mode: consumes bytes up to the end of the peer's HELLO signature; returns where parsing goes
  // on.
  Result<size_t> hunt_hello(const std::byte* p, size_t n);
  Status on_frame_payload(std::span<const std::byte> payload);
  Status handle_control(StreamId id, std::span<const std::byte> payload);
  Status handle_open(StreamId id, const wire::Open* open);
  void deliver_data(Slice piece);
  // Checks a DATA or DATA_REF of `length` bytes on stream `id` and takes its credit. Null with success:
  // the bytes are dropped, because the stream raced a local reset or because they broke its credit or
  // came after its FIN (the stream is then reset, see stream_error).
  Result<Stream*> admit_data(FrameType type, StreamId id, uint32_t length);
  Status handle_data_ref(StreamId id, std::span<const std::byte> payload);
  void handle_release(std::span<const std::byte> payload);
  uint32_t lend(Slice bytes);
  Slice take_front(Stream& s, size_t n);
  void queue_releases();
  bool queue_pending(StreamId id, PendingBytes bytes, size_t n);
  Stream* find(StreamId id) const;
  Stream* find_uncached(StreamId id) const;
  Stream& create_stream(StreamId id, StreamPhase phase);
  // Re-syncs one stream after any change: scheduling, FIN emission, removal.
  void update(Stream& s);
  size_t capacity_of(const Stream& s) const;
  static bool takes_bytes(const Stream& s);
  uint64_t room_under_cap() const;
  uint64_t min_room_under_cap() const;
  void note_starved(const Stream& s) const;
  void close_stream(Stream& s, const Error* error);
  void stream_error(Stream& s, const Error& error);
  void queue_rst(StreamId id, const std::string& reason);
  void fail(Error error);
  OutFrame& queue_frame(FrameType type, StreamId id, uint32_t length);
  void queue_small(FrameType type, StreamId id, std::span<const std::byte> payload);
  void reap();
  void queue_hello();
  void queue_control(StreamId id, const flatbuffers::FlatBufferBuilder& built);
  void schedule();
  void serve_ready();   // ready streams' bytes into frames, up to the output watermark
  bool wake_starved();  // streams stopped by the cap read again once there is room; true if any
  bool is_local_id(StreamId id) const { return (id & 1u) == (role_ == Role::kHost ? 1u : 0u); }

  Role role_;
  MuxHandler& handler_;
  MuxConfig config_;
  std::optional<Hello> peer_;
  std::optional<Error> failure_;

  // Decoder state: a header is collected into header_buf_, then `remaining_` payload bytes follow.
  HeaderBytes header_buf_{};
  size_t header_have_ = 0;
  FrameHeader current_{};
  size_t remaining_ = 0;
  bool in_payload_ = false;
  std::vector<std::byte> control_buf_;  // non-DATA payload being collected
  std::vector<std::byte> hunt_tail_;    // resync: the last bytes of the previous chunk, for a split signature
  bool hunting_ = false;
  uint64_t hunt_skipped_ = 0;

  std::unordered_map<StreamId, std::unique_ptr<Stream>> streams_;
  mutable Stream* cached_ = nullptr;       // the stream find() returned last (see find)
  std::vector<StreamId> closed_;           // closed streams, erased outside callbacks (see reap)
  uint32_t local_streams_ = 0;             // live streams we opened, against the peer's max_streams
  uint32_t peer_streams_ = 0;              // live streams the peer opened, against our max_streams
  mutable std::vector<StreamId> starved_;  // streams out of capacity because of max_buffered (note_starved)
  std::deque<StreamId> ready_;             // streams with queued data and credit, in round-robin order
  StreamId next_local_id_;
  StreamId last_peer_id_ = 0;
  bool local_goaway_ = false;
  bool remote_goaway_ = false;

  // Frames for the transport, oldest first. A frame does not move while queued (prepare_output hands out
  // pointers into it); sent frames are kept for reuse, so queueing one does not allocate.
  std::deque<std::unique_ptr<OutFrame>> out_;
  std::vector<std::unique_ptr<OutFrame>> spare_frames_;
  size_t out_data_bytes_ = 0;  // DATA payload bytes sitting in out_
  size_t out_consumed_ = 0;    // bytes of out_.front() already written
  uint64_t buffered_ = 0;      // bytes queued on streams, not yet moved to out_
  MuxCounters counters_;

  // Shared memory: on when both HELLOs named the same region.
  bool shared_active_ = false;
  uint32_t shared_generation_ = 0;    // this connection's loans, among the region's borrowed buffers
  std::vector<Slice> lent_;           // by loan: bytes the peer reads in place until it returns them
  std::vector<uint32_t> free_loans_;  // unused entries of lent_
  std::vector<uint32_t> returning_;   // loans the peer lent us that we are done with
};

}  // namespace vbridge
