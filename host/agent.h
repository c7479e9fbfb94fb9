// The host agent: keeps one transport session to the guest agent up (reconnecting with backoff), serves the
// host-side sockets (docker.sock, unix forwards) and a status socket.
#pragma once

#include <uv.h>

#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "host/bulk_reader.h"
#include "host/exposed_unix.h"
#include "host/file_watch/watcher.h"
#include "host/listener.h"
#include "host/port_forwards.h"
#include "host/session.h"
#include "host/socket_bridge.h"
#include "protocol/address.h"

namespace vbridge {

// A host unix socket whose connections become streams to a guest target.
struct UnixForward {
  std::string host_path;
  std::string guest_target;  // a name the guest agent knows ("docker") or an absolute guest socket path
  bool http_errors = false;  // the Docker API: failures are answered as HTTP errors
};

// A host port forwarded to a guest port from configuration (not following the guest).
struct StaticPortForward {
  wire::Proto proto = wire::Proto::Tcp;
  std::string host_address = "127.0.0.1";
  uint16_t host_port = 0;
  uint16_t guest_port = 0;
};

struct AgentConfig {
  Address transport;
  PortForwardConfig ports;
  std::vector<StaticPortForward> static_ports;
  std::string instance = "default";
  std::string status_path;
  std::vector<UnixForward> unix_forwards;
  std::vector<file_watch::Share> shares;            // host folders whose changes are replayed in the guest
  std::map<std::string, std::string> exposed_unix;  // NAME → host socket path the guest may open
  MuxConfig mux;                                    // mux.hello_token: the --token-file token sent in HELLO
  std::string token_file;                           // where the token came from, for error messages
  int connect_timeout_ms = 2000;
  int pending_timeout_ms = 5000;  // how long a client waits for the transport before an error
  bool splice = false;            // bulk transfers from host clients move by splice(2) (--splice)
  int keepalive_ms = 5000;        // PING period; 3 unanswered pings mean the guest is gone
  int max_backoff_ms = 500;
  // --shm-file: memory shared with the guest agent; client sockets are read into its host half.
  std::shared_ptr<SharedMemory> shared;
};

struct AgentCounters {
  uint64_t sessions = 0, reconnects = 0, dial_failures = 0, protocol_errors = 0, auth_failures = 0;
  uint64_t clients_accepted = 0, clients_failed = 0;
  uint64_t bytes_compacted = 0;  // slow readers' queued bytes copied out of shared read blocks
};

class Agent final : public SessionObserver, public BridgeOwner {
 public:
  Agent(uv_loop_t* loop, AgentConfig config);
  ~Agent() override;
  // Binds the listeners and starts dialing. Fails if a listener cannot be bound.
  Status start();
  // Stops accepting, says GOAWAY, and closes everything; the loop then ends.
  void stop();
  std::string status_json() const;

  // SessionObserver
  void on_session_ready(const Hello& peer) override;
  void on_session_lost(const Error& error) override;
  void on_control(const wire::Control& message) override;
  // A stream the guest opened (Session::on_open): a client of a guest --reverse-unix socket, for a host
  // socket exposed with --expose-unix. Returns its sink, or null after refusing it.
  StreamSink* on_stream_open(Session& session, StreamId id, const wire::Target& target) override;
  // BridgeOwner
  void bridge_done(SocketBridge* bridge) override;

 private:
  struct Pending {
    SocketBridge* bridge;
    std::chrono::steady_clock::time_point deadline;
  };

  void dial();
  void schedule_dial();
  void on_tick();
  void compact_slow_readers();
  void accept_client(UniqueFd client, BridgeOptions options);
  void serve_status(UniqueFd client);
  // Sends due FILE_EVENTS batches while the transport keeps up; otherwise lets the watcher merge them.
  void pump_file_events();
  void reap();
  void flush_returns();

  uv_loop_t* loop_;
  AgentConfig config_;
  BufferPool pool_;  // client reads: in shared memory when there is some
  ReadArena client_arena_;
  BufferPool transport_pool_;  // transport reads
  uv_idle_t returns_flush_{};  // sends RELEASE for loans returned outside a flush
  // Small blocks that slow readers' queued bytes move into (see compact_queue); declared before the bridges
  // that hold them.
  BufferPool compact_pool_;
  ReadArena compact_arena_;
  // Bulk client reads run on its worker while a small exchange is active (see BulkReader); declared after
  // the pools its reads fill and before the bridges that use it.
  InteractiveClock interactive_;
  std::unique_ptr<BulkReader> bulk_reader_;
  std::unique_ptr<Session> session_;
  std::vector<std::unique_ptr<Session>> dead_sessions_;  // destroyed outside their own callbacks
  bool ready_ = false;
  bool stopping_ = false;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::unique_ptr<PortForwards> ports_;
  std::unique_ptr<file_watch::Watcher> watcher_;
  std::unique_ptr<Poller> watch_poller_;
  std::unique_ptr<ExposedUnix> exposed_;
  std::unordered_map<SocketBridge*, std::unique_ptr<SocketBridge>> bridges_;
  std::vector<SocketBridge*> finished_;
  std::deque<Pending> pending_;
  uv_timer_t dial_timer_{};
  uv_timer_t tick_timer_{};
  uv_idle_t reaper_{};
  int backoff_ms_ = 0;
  std::chrono::steady_clock::time_point last_ping_;
  std::chrono::steady_clock::time_point connected_since_;
  std::chrono::steady_clock::time_point disconnected_since_;
  std::string last_error_;
  AgentCounters counters_;
};

}  // namespace vbridge
