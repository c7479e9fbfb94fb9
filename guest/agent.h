// The guest agent: waits on the transport for the host, serves one host connection at a time (a newer one
// replaces an older one, since a host only reconnects when it lost the old connection), and on
// SIGTERM/SIGINT sends GOAWAY, lets streams drain briefly and exits.
//
// Each loop iteration: queue SQEs for whatever became ready (Session::flush), submit them all with one
// io_uring_submit_and_wait, then handle every completion through one switch (dispatch).
#pragma once

#include <sys/signalfd.h>
#include <sys/socket.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "guest/read_buffers.h"
#include "guest/session.h"
#include "guest/targets.h"
#include "guest/transport_linux.h"
#include "guest/uring_loop.h"
#include "protocol/address.h"
#include "protocol/buffer.h"
#include "protocol/mux.h"

namespace vbridge::guest {

struct AgentConfig {
  Address listen;
  TargetConfig targets;
  std::chrono::milliseconds drain_timeout{2000};
  bool buffer_rings = true;         // false: plain reads into per-read pool buffers
  size_t buffer_size = 256 * 1024;  // one pool buffer; also the largest single read
  unsigned transport_ring_entries = 16;
  unsigned conn_ring_entries = 32;
  MuxConfig mux;
  SerialPaths serial_paths;
};

class Agent {
 public:
  // Opens the transport and the ring; blocks SIGTERM/SIGINT for this thread (they arrive via signalfd).
  static Result<std::unique_ptr<Agent>> create(AgentConfig config);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Serves until SIGTERM/SIGINT; returns the process exit status.
  int run();
  const GuestCounters& counters() const { return counters_; }
  std::string counters_line() const;

 private:
  Agent(AgentConfig config, TargetPolicy targets, std::unique_ptr<UringLoop> loop, TransportEndpoint endpoint);
  Status setup();

  void dispatch(const io_uring_cqe& cqe);
  Session* session_for(uint32_t owner);
  void stray(const Tag& tag, const io_uring_cqe& cqe);

  void arm_waiting_ops();
  void arm_accept();
  void arm_serial_probe();
  void arm_retry(std::chrono::milliseconds delay);
  void arm_signal();
  void arm_timer(uint32_t which, std::chrono::milliseconds delay);

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

  AgentConfig config_;
  TargetPolicy targets_;
  BufferPool pool_;
  std::unique_ptr<UringLoop> loop_;
  TransportEndpoint endpoint_;
  std::unique_ptr<ReadBuffers> transport_buffers_;
  std::unique_ptr<ReadBuffers> conn_buffers_;
  GuestCounters counters_;
  std::unique_ptr<SessionEnv> env_;

  std::unique_ptr<Session> active_;
  std::vector<std::unique_ptr<Session>> retiring_;
  uint32_t last_owner_ = 0;

  // Operations the agent itself keeps in flight, with the memory the kernel writes into.
  bool accepting_ = false;
  sockaddr_storage peer_addr_{};
  socklen_t peer_len_ = 0;
  bool probing_ = false;  // serial: a read waiting for the host
  Slice probe_hold_;
  int last_probe_error_ = 0;   // log each kind of probe failure once per streak
  bool probe_saw_eof_ = false;
  bool retry_pending_ = false;  // a pause before re-arming accept or the serial probe
  __kernel_timespec retry_ts_{};
  int signal_fd_ = -1;
  signalfd_siginfo siginfo_{};
  bool signal_armed_ = false;

  // Shutdown
  bool stopping_ = false;       // a signal arrived: GOAWAY sent, streams draining
  bool closing_all_ = false;    // the drain ended: sessions are being closed
  bool drain_expired_ = false;
  bool hard_expired_ = false;
  __kernel_timespec timer_ts_[2]{};
};

}  // namespace vbridge::guest
