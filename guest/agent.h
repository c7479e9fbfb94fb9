// The guest agent: waits on the transport for the host, serves one host connection at a time (a newer one
// replaces an older one, since a host only reconnects when it lost the old connection), and on
// SIGTERM/SIGINT sends GOAWAY, lets streams drain briefly and exits.
//
// A new connection on a listening transport waits in `pending_` until its HELLO arrived (carrying the
// --token-file token on unix and TCP); only then does it replace the active one, so a local process without
// the token cannot take the bridge over. At most kMaxPending connections wait; a newer one pushes out the
// oldest.
//
// Each loop iteration: queue SQEs for whatever became ready (Session::flush), submit them all with one
// io_uring_submit_and_wait, then handle every completion through one switch (dispatch).
//
// Ports: while a host is connected, a TIMEOUT every `ports.interval` runs one NETLINK_SOCK_DIAG scan
// (PortWatcher) when the socket counts moved, and every 500 ms regardless; a change goes to the host as a
// PORTS diff, and each host connection starts with a full snapshot once its handshake is done.
// Reverse unix sockets (--reverse-unix) are listened on here for the agent's whole life; each client gets
// a guest-opened stream on the current host connection.
#pragma once

#include <sys/signalfd.h>
#include <sys/socket.h>

#include <chrono>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "guest/file_events/injector.h"
#include "guest/port_watcher_linux.h"
#include "guest/read_buffers.h"
#include "guest/session.h"
#include "guest/targets.h"
#include "guest/transport_linux.h"
#include "guest/uring_loop.h"
#include "protocol/address.h"
#include "protocol/buffer.h"
#include "protocol/mux.h"

namespace vbridge::guest {

struct PortWatchConfig {
  bool enabled = true;
  std::chrono::milliseconds interval{20};
  size_t max_per_message = 2000;  // listeners per PORTS message (~80 bytes each at most)
};

// --reverse-unix GUEST_PATH=NAME: the agent listens on guest_path; each client becomes a stream to the
// host's target `name` (which the host agent maps with --expose-unix NAME=HOST_PATH).
struct ReverseUnix {
  std::string guest_path;
  std::string name;
};
Result<ReverseUnix> parse_reverse_unix(std::string_view text);

struct AgentConfig {
  Address listen;
  TargetConfig targets;
  std::chrono::milliseconds drain_timeout{2000};
  bool buffer_rings = true;         // false: plain reads into per-read pool buffers
  bool splice = false;              // bulk transfers from guest sockets move by splice(2) (--splice)
  size_t buffer_size = 256 * 1024;  // one pool buffer; also the largest single read
  unsigned transport_ring_entries = 16;
  unsigned conn_ring_entries = 32;
  MuxConfig mux;
  SerialPaths serial_paths;
  PortWatchConfig ports;
  std::vector<ReverseUnix> reverse_unix;
  std::vector<file_events::Mount>
      shares;  // host folders mounted in the guest whose host-side changes are replayed here
  // The shared secret a host's HELLO must carry (--token-file); required on unix and TCP transports unless
  // --insecure-no-token. Not used on serial ports.
  std::string token;
  // --shm-file: the memory shared with the host agent; guest sockets are read into its guest half.
  std::shared_ptr<SharedMemory> shared;
};

class Agent final : private SessionHooks {
 public:
  // Opens the transport and the ring; blocks SIGTERM/SIGINT for this thread (they arrive via signalfd).
  static Result<std::unique_ptr<Agent>> create(AgentConfig config);
  ~Agent() override;
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Serves until SIGTERM/SIGINT; returns the process exit status.
  int run();
  const GuestCounters& counters() const { return counters_; }
  std::string counters_line() const;

 private:
  struct ReverseListener {
    ReverseUnix config;
    TransportEndpoint endpoint;
    bool accepting = false;
    bool retry_pending = false;  // a pause after a failed accept
    __kernel_timespec retry_ts{};
  };

  Agent(AgentConfig config, TargetPolicy targets, std::unique_ptr<UringLoop> loop,
        TransportEndpoint endpoint);
  Status setup();

  // SessionHooks
  void on_host_ready(Session& session) override;
  const std::set<PortEntry>* guest_listeners(bool rescan) override;
  void on_file_events(const wire::FileEvents& batch) override;

  void dispatch(const io_uring_cqe& cqe);
  Session* session_for(uint32_t owner);
  void stray(const Tag& tag, const io_uring_cqe& cqe);

  void arm_waiting_ops();
  void arm_accept();
  void arm_serial_probe();
  void arm_retry(std::chrono::milliseconds delay);
  void arm_signal();
  void arm_timer(uint32_t which, std::chrono::milliseconds delay);
  void arm_port_timer();
  void arm_reverse_accept(uint32_t index);

  // One scan; a change goes to the active host connection.
  void scan_ports();
  void on_reverse_accept(uint32_t index, int res);

  void on_accept(int res);
  void on_serial_probe(const io_uring_cqe& cqe);
  void on_signal(int res);

  void start_session(int fd, std::string peer, Slice first);
  void retire_active(const std::string& why, log::Level level);
  void collect_sessions();
  uint32_t next_owner();

  void begin_drain();
  // Advances shutdown; true once the agent may exit.
  bool shutdown_step();
  void compact_slow_readers();
  std::optional<std::chrono::nanoseconds> until_next_deadline() const;

  AgentConfig config_;
  TargetPolicy targets_;
  BufferPool pool_;       // transport reads and everything else
  BufferPool conn_pool_;  // guest socket reads: in shared memory when there is some
  std::unique_ptr<UringLoop> loop_;
  TransportEndpoint endpoint_;
  std::unique_ptr<ReadBuffers> transport_buffers_;
  std::unique_ptr<ReadBuffers> conn_buffers_;
  BufferPool datagram_pool_;
  ReadArena datagram_arena_;
  // Small blocks that slow guest sockets' queued bytes move into (see compact_slow_readers).
  BufferPool compact_pool_;
  ReadArena compact_arena_;
  std::chrono::steady_clock::time_point last_compaction_{};
  GuestCounters counters_;
  std::unique_ptr<SessionEnv> env_;

  std::unique_ptr<Session> active_;
  std::vector<std::unique_ptr<Session>> pending_;  // accepted, HELLO not yet received and checked
  std::vector<std::unique_ptr<Session>> retiring_;
  uint32_t last_owner_ = 0;

  // Operations the agent itself keeps in flight, with the memory the kernel writes into.
  bool accepting_ = false;
  sockaddr_storage peer_addr_{};
  socklen_t peer_len_ = 0;
  bool probing_ = false;  // serial: a read waiting for the host
  Slice probe_hold_;
  int last_probe_error_ = 0;  // log each kind of probe failure once per streak
  bool probe_saw_eof_ = false;
  bool retry_pending_ = false;  // a pause before re-arming accept or the serial probe
  __kernel_timespec retry_ts_{};
  int signal_fd_ = -1;
  signalfd_siginfo siginfo_{};
  bool signal_armed_ = false;

  std::unique_ptr<PortWatcher> watcher_;             // null with --no-ports
  std::unique_ptr<file_events::Injector> injector_;  // null without --share
  Slice serial_carry_;  // bytes a failed serial session stopped at; the next session starts from them
  bool port_timer_armed_ = false;
  __kernel_timespec port_ts_{};
  std::chrono::steady_clock::time_point last_scan_{};
  int last_scan_error_ = 0;  // log each kind of scan failure once per streak

  std::vector<ReverseListener> reverse_;

  // Shutdown
  bool stopping_ = false;     // a signal arrived: GOAWAY sent, streams draining
  bool closing_all_ = false;  // the drain ended: sessions are being closed
  bool drain_expired_ = false;
  bool hard_expired_ = false;
  __kernel_timespec timer_ts_[2]{};
};

}  // namespace vbridge::guest
