// One host connection: a fresh Mux over the transport, and the guest sockets its streams map to.
//
// Buffers, each with one owner at a time:
//   transport → guest: a transport read lands in a pool buffer (ReadBuffers) and goes to Mux::feed; DATA
//     payload arrives in on_data as Slices of that buffer, waits in the stream's WriteQueue and is written
//     to the guest socket from that memory; Mux::consume returns the credit once the write completed.
//   guest → transport: a guest socket read lands in a pool buffer and the same Slice goes to Mux::send; the
//     transport write is one gather write (SENDMSG, or WRITEV on a serial port) over Mux::prepare_output's
//     iovecs, one in flight at a time, followed by Mux::consume_output.
// A guest socket is read only while Mux::send_capacity > 0, so a slow host stream stops the guest reader
// instead of growing a queue; on_writable resumes it.
//
// UDP flows (one connected guest socket per host-side client flow) carry length-prefixed datagrams
// (protocol/datagram.h). Host → guest: records are reassembled and each datagram goes out with one send();
// guest → host: on readiness each datagram is received into the shared datagram arena 4 bytes past the
// write position, so the prefixed record is one Slice. A datagram the stream has no room for is dropped and
// counted, as a congested network would; nothing queues without bound.
//
// Streams opened by the guest (a client of a --reverse-unix socket) get even ids and are served by the same
// Conn machinery once opened.
//
// Lifetime: the kernel holds pointers into a session's buffers, iovecs and Mux output while operations are in
// flight, so a session is closed first (every operation cancelled) and destroyed only once finished().
#pragma once

#include <liburing.h>
#include <sys/socket.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "guest/port_watcher_linux.h"
#include "guest/read_buffers.h"
#include "guest/targets.h"
#include "guest/transport_linux.h"
#include "guest/uring_loop.h"
#include "guest/write_queue.h"
#include "protocol/interactive_clock.h"
#include "protocol/log.h"
#include "protocol/mux.h"

namespace vbridge::guest {

// Agent-wide counters; every failure path bumps one. Printed on exit.
struct GuestCounters {
  uint64_t host_connections = 0;  // host connections served
  uint64_t host_failures = 0;     // host connections ended by a protocol or transport error
  uint64_t peers_refused = 0;     // vsock peers other than the host; peers with a bad token
  uint64_t accept_errors = 0;     // accept on the transport listener failed
  uint64_t serial_errors = 0;     // reads on the serial port failed (not EOF)
  uint64_t streams_opened = 0;    // OPENs whose guest socket connected
  uint64_t open_denied = 0;       // OPENs refused by the target policy
  uint64_t dial_failed = 0;       // OPENs whose guest socket did not connect
  uint64_t stream_errors = 0;     // guest socket errors, or the host broke a stream's rules; it was reset
  uint64_t resets_from_host = 0;
  uint64_t streams_dropped = 0;   // streams cut because their host connection ended
  uint64_t bytes_from_guest = 0;  // read from guest sockets
  uint64_t bytes_to_guest = 0;    // written to guest sockets
  uint64_t transport_bytes_in = 0;
  uint64_t transport_bytes_out = 0;
  uint64_t transport_writes = 0;
  uint64_t frames_in = 0;  // summed over finished host connections
  uint64_t frames_out = 0;
  uint64_t datagrams_to_guest = 0;  // UDP datagrams sent to guest sockets
  uint64_t datagrams_from_guest = 0;
  uint64_t datagrams_dropped = 0;  // no room on the stream, or the guest socket refused them
  uint64_t port_scans = 0;
  uint64_t port_scan_errors = 0;
  uint64_t ports_messages = 0;   // PORTS control messages sent
  uint64_t reverse_opened = 0;   // guest clients of --reverse-unix sockets given a stream
  uint64_t reverse_refused = 0;  // ... turned away (no host, or the host refused the name)
  uint64_t bytes_compacted = 0;  // slow guest sockets' queued bytes moved out of shared read blocks
  uint64_t spliced_from_guest = 0;  // --splice: bytes_from_guest that went socket → pipe → transport uncopied
  uint64_t batched_writes = 0;      // bulk writes that waited to gather more of their transfer (hold_write)

  std::string to_string() const;
};

class Session;

// What a session asks of the agent that owns it.
class SessionHooks {
 public:
  virtual ~SessionHooks() = default;
  // The host finished the handshake; the agent answers with a full PORTS snapshot (Session::send_ports).
  virtual void on_host_ready(Session& session) = 0;
  // The guest's listeners as last scanned, or null when ports are not watched. `rescan`: scan first (an
  // OPEN named a port the last scan did not show, e.g. a static forward's first client beat the poll).
  virtual const std::set<PortEntry>* guest_listeners(bool rescan) = 0;
  // The host sent a FILE_EVENTS batch: replay it on the guest's mounts of the shares.
  virtual void on_file_events(const wire::FileEvents& batch) = 0;
};

// What a session borrows from the agent; everything here outlives every session.
struct SessionEnv {
  UringLoop& loop;
  ReadBuffers& transport_buffers;
  ReadBuffers& conn_buffers;
  const TargetPolicy& targets;
  GuestCounters& counters;
  MuxConfig mux_config;
  SessionHooks& hooks;
  BufferPool& datagram_pool;  // blocks of at least kMaxDatagram + kDatagramPrefix bytes
  ReadArena& datagram_arena;  // UDP replies, read one at a time into its tail
  bool multishot = true;      // cleared for good when the kernel refuses multishot RECV
  bool splice = false;        // bulk transfers from guest sockets move by splice(2), not through memory
};

class Session final : public MuxHandler {
 public:
  // `fd` is the host connection; a kListener session owns it, a kSerial session only borrows the port.
  Session(SessionEnv& env, uint32_t owner, int fd, TransportKind kind, std::string peer);
  ~Session() override;
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  uint32_t owner() const { return owner_; }
  // Starts serving; `first` holds bytes already read from the transport (a serial probe that found the host).
  void start(Slice first);
  void on_completion(const Tag& tag, const io_uring_cqe& cqe);
  // Queues the SQEs for everything that became ready since the last call. Once per loop iteration.
  void flush();
  void goaway(const std::string& message);
  // Ends the host connection: guest sockets are closed and every operation in flight is cancelled.
  void close(const std::string& why, log::Level level);
  bool closing() const { return closing_; }
  // Closed and nothing in flight: the session may be destroyed.
  bool finished() const { return closing_ && inflight_ == 0; }
  // No streams and nothing left to send: a draining agent may stop now.
  bool drained();
  // Moves slow guest sockets' queued bytes out of shared read blocks; returns how many bytes moved.
  size_t compact_queues(ReadArena& arena);
  // When the loop must wake up even if nothing completes: the first batch being gathered is due (see
  // hold_write). Valid after flush().
  std::optional<std::chrono::steady_clock::time_point> write_deadline() const { return hold_deadline_; }
  const Mux& mux() const { return mux_; }
  // Serial only: the transport bytes this session failed on, for the next session to start from.
  Slice take_leftover() { return std::move(leftover_); }
  // The handshake completed and the session is not closing: streams may be opened, PORTS sent.
  bool host_ready() const { return !closing_ && mux_.ready(); }
  // Sends a PORTS diff (or snapshot), in parts of at most `max_listeners` listeners.
  void send_ports(const PortDiff& diff, size_t max_listeners);
  // Gives a connected guest client (of a --reverse-unix socket) a stream to host target `name`. Takes the fd.
  void open_reverse(int fd, const std::string& name, const std::string& guest_path);

  // MuxHandler
  void on_ready(const Hello& peer) override;
  void on_open(StreamId id, const wire::Target& target) override;
  void on_open_result(StreamId id, const Error* error) override;
  void on_data(StreamId id, Slice data) override;
  void on_fin(StreamId id) override;
  void on_reset(StreamId id, const Error& error) override;
  void on_writable(StreamId id) override;
  void on_closed(StreamId id) override;
  void on_control(const wire::Control& message) override;
  void on_goaway(const std::string& message) override;
  void on_pong(uint64_t) override {}

 private:
  struct Conn;
  static constexpr size_t kTransportIov = 256;

  io_uring_sqe* transport_sqe(Op op);
  void arm_transport_read();
  void arm_transport_write();
  void write_transport_now();
  void on_transport_read(const io_uring_cqe& cqe);
  void on_transport_write(int res);
  void feed(const Slice& bytes);

  Conn* conn_for(StreamId id);
  Conn& new_conn(StreamId id, DialPlan plan);
  io_uring_sqe* conn_sqe(Conn& c, Op op);
  void dial(Conn& c);
  void dial_datagram(Conn& c);
  void on_dial(Conn& c, int res);
  void dial_failed(Conn& c, int err);
  void on_conn_read(Conn& c, const io_uring_cqe& cqe);
  void on_conn_pollin(Conn& c, int res);
  void on_datagrams_readable(Conn& c, int res);
  void send_datagrams(Conn& c, const Slice& records);
  void on_conn_write(Conn& c, int res);
  void on_conn_shutdown(Conn& c, int res);
  // The one place that decides what a guest connection does next; every change ends with mark().
  void sync(Conn& c);
  void mark(Conn& c);
  void arm_conn_read(Conn& c, size_t capacity);
  void arm_datagram_poll(Conn& c);
  void arm_conn_write(Conn& c);
  bool hold_write(Conn& c);
  void release_due_holds();
  void note_piece(Conn& c, size_t size);
  size_t bulk_receivers(std::chrono::steady_clock::time_point now);
  void arm_conn_shutdown(Conn& c);
  // Resets the stream towards the host with `message` and closes the guest socket.
  void fail_conn(Conn& c, const std::string& message);
  // Detaches from the stream and closes the guest socket once its operations are cancelled.
  void kill(Conn& c);
  void release(Conn& c);

  static MuxConfig mux_config_for(MuxConfig config, TransportKind kind);

  SessionEnv& env_;
  Slice leftover_;
  uint32_t owner_;
  int fd_;
  TransportKind kind_;
  std::string peer_;
  Mux mux_;
  bool closing_ = false;
  uint32_t inflight_ = 0;  // operations submitted and not completed (cancels excluded)

  // A small exchange seen lately sends bulk socket writes to io_uring's workers (IOSQE_ASYNC); not writes
  // to a socket whose reader lags, nor reads: a worker would wait there holding queued slices or a buffer.
  InteractiveClock interactive_;
  bool listeners_rescanned_ = false;  // an OPEN of this transport read already scanned the guest's ports

  std::vector<uint32_t> bulk_receivers_;  // slots given a bulk-sized piece lately; pruned when counted
  std::vector<uint32_t> held_;            // slots gathering a batch (hold_write); may hold stale ones
  std::optional<std::chrono::steady_clock::time_point> hold_deadline_;  // the earliest of their deadlines

  bool reading_ = false;  // a transport read (multishot or single) is armed
  bool multishot_armed_ = false;
  Slice read_hold_;  // plain mode: the buffer of the transport read in flight
  bool writing_ = false;
  bool transport_polling_ = false;  // the write in flight is a POLLOUT wait before a splice
  std::array<iovec, kTransportIov> iov_{};
  msghdr msg_{};

  std::vector<std::unique_ptr<Conn>> conns_;  // by slot; a slot is reused only when nothing is in flight
  std::vector<uint32_t> free_slots_;
  std::unordered_map<StreamId, uint32_t> by_stream_;  // streams the mux still has → slot
  std::vector<uint32_t> dirty_;                       // slots to sync() in the next flush()
  std::vector<uint32_t> dirty_work_;                  // the batch flush() is working through
};

}  // namespace vbridge::guest
