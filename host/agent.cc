#include "host/agent.h"

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "host/dialer.h"
#include "protocol/log.h"

namespace vbridge {

using Clock = std::chrono::steady_clock;

Agent::Agent(uv_loop_t* loop, AgentConfig config)
    : loop_(loop),
      config_(std::move(config)),
      pool_(1024 * 1024, 64, config_.shared.get()),
      client_arena_(pool_),
      transport_pool_(1024 * 1024, 16),
      compact_pool_(64 * 1024, 16),
      compact_arena_(compact_pool_, 4 * 1024) {
  uv_timer_init(loop_, &dial_timer_);
  uv_timer_init(loop_, &tick_timer_);
  uv_idle_init(loop_, &reaper_);
  uv_idle_init(loop_, &returns_flush_);
  dial_timer_.data = tick_timer_.data = reaper_.data = returns_flush_.data = this;
  config_.mux.shared = config_.shared.get();
  if (config_.shared) {
    // A loan returned outside a flush (a client reset, a compaction) still goes back soon.
    config_.shared->on_returned = [this] {
      uv_idle_start(&returns_flush_, [](uv_idle_t* h) { static_cast<Agent*>(h->data)->flush_returns(); });
    };
  }
  disconnected_since_ = Clock::now();
}

Agent::~Agent() {
  if (config_.shared) config_.shared->on_returned = nullptr;
}

Status Agent::start() {
  bulk_reader_ = std::make_unique<BulkReader>(loop_);
  for (const UnixForward& forward : config_.unix_forwards) {
    Address address{Address::Kind::kUnix, forward.host_path};
    BridgeOptions options;
    options.target.proto = wire::Proto::Unix;
    options.target.path = forward.guest_target;
    options.name = forward.guest_target;
    options.http_errors = forward.http_errors;
    auto listener = Listener::listen(
        loop_, address, [this, options](UniqueFd client) { accept_client(std::move(client), options); });
    if (!listener) return listener.error();
    log::info("listening on {} for guest target {}", forward.host_path, forward.guest_target);
    listeners_.push_back(std::move(*listener));
  }
  exposed_ = std::make_unique<ExposedUnix>(loop_, client_arena_, config_.exposed_unix);
  for (const auto& [name, path] : config_.exposed_unix)
    log::info("guest may open host socket {} as \"{}\"", path, name);
  ports_ = std::make_unique<PortForwards>(
      loop_, pool_, config_.ports,
      [this](UniqueFd client, BridgeOptions options) {
        accept_client(std::move(client), std::move(options));
      },
      [this]() -> Session* { return ready_ ? session_.get() : nullptr; });
  for (const StaticPortForward& f : config_.static_ports) {
    if (Status st = ports_->add_static(f.proto, f.host_address, f.host_port, f.guest_port); !st) return st;
  }
  if (!config_.shares.empty()) {
    auto watcher = file_watch::make_watcher(loop_, config_.shares);
    if (!watcher) return watcher.error();
    watcher_ = std::move(*watcher);
    // The watcher owns its descriptor; the Poller gets a duplicate to close.
    watch_poller_ = std::make_unique<Poller>(loop_, UniqueFd(::dup(watcher_->fd())),
                                             [this](int, int) { pump_file_events(); });
    watch_poller_->want(true, false);
    for (const auto& share : config_.shares) log::info("watching {} as share {}", share.root, share.name);
  }
  if (!config_.status_path.empty()) {
    auto listener = Listener::listen(loop_, Address{Address::Kind::kUnix, config_.status_path},
                                     [this](UniqueFd client) { serve_status(std::move(client)); });
    if (!listener) return listener.error();
    listeners_.push_back(std::move(*listener));
  }
  uv_timer_start(
      &tick_timer_, [](uv_timer_t* t) { static_cast<Agent*>(t->data)->on_tick(); }, 100, 100);
  dial();
  return {};
}

void Agent::stop() {
  if (stopping_) return;
  stopping_ = true;
  log::info("stopping: sessions={} clients={} reconnects={}", counters_.sessions, counters_.clients_accepted,
            counters_.reconnects);
  listeners_.clear();
  ports_.reset();
  watch_poller_.reset();
  watcher_.reset();
  if (session_) {
    session_->mux().goaway("host agent stopping");
    // The flush may find the guest gone, and on_session_lost then retires the session.
    session_->flush();
  }
  if (session_) session_->shutdown(Error{ErrorCode::kGoingAway, 0, "host agent stopping"});
  for (auto& p : pending_) p.bridge->fail_open(Error{ErrorCode::kGoingAway, 0, "host agent stopping"});
  pending_.clear();
  uv_timer_stop(&dial_timer_);
  uv_timer_stop(&tick_timer_);
  uv_close(reinterpret_cast<uv_handle_t*>(&dial_timer_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&tick_timer_), nullptr);
  if (config_.shared) config_.shared->on_returned = nullptr;
  if (bulk_reader_) bulk_reader_->close();
  uv_idle_stop(&returns_flush_);
  uv_close(reinterpret_cast<uv_handle_t*>(&returns_flush_), nullptr);
  uv_idle_start(&reaper_, [](uv_idle_t* h) { static_cast<Agent*>(h->data)->reap(); });
}

void Agent::dial() {
  if (stopping_ || session_) return;
  auto fd = dial_transport(config_.transport, config_.connect_timeout_ms);
  if (!fd) {
    ++counters_.dial_failures;
    const std::string message = fd.error().to_string();
    if (message != last_error_) {
      log::warn("guest agent at {} not reachable: {}; retrying", config_.transport.to_string(), message);
      last_error_ = message;
    }
    schedule_dial();
    return;
  }
  ++counters_.sessions;
  session_ = std::make_unique<Session>(loop_, std::move(*fd), transport_pool_, *this, config_.mux);
  last_ping_ = Clock::now();
}

void Agent::schedule_dial() {
  backoff_ms_ = backoff_ms_ == 0 ? 20 : std::min(backoff_ms_ * 2, config_.max_backoff_ms);
  uv_timer_start(
      &dial_timer_, [](uv_timer_t* t) { static_cast<Agent*>(t->data)->dial(); }, backoff_ms_, 0);
}

void Agent::on_session_ready(const Hello& peer) {
  ready_ = true;
  backoff_ms_ = 0;
  last_error_.clear();
  connected_since_ = Clock::now();
  log::info("connected to guest agent at {} (protocol {}, window {} KiB, max frame {} KiB)",
            config_.transport.to_string(), peer.version, peer.initial_window / 1024, peer.max_frame / 1024);
  if (const std::string note =
          shared_memory_note(config_.shared.get(), peer, session_->mux().shared_active());
      !note.empty()) {
    log::info("{}", note);
  }
  auto waiting = std::move(pending_);
  pending_.clear();
  for (auto& p : waiting) p.bridge->attach(*session_);
  if (watcher_) {
    if ((peer.features & kFeatureFileEvents) == 0) {
      log::warn("the guest agent replays no file events (start it with --share NAME=GUEST_PATH)");
    }
    watcher_->rescan_all();  // whatever changed while the guest was away
    pump_file_events();
  }
}

void Agent::on_session_lost(const Error& error) {
  if (error.code == ErrorCode::kProtocol || error.code == ErrorCode::kVersion) ++counters_.protocol_errors;
  if (error.code == ErrorCode::kAuth) {
    ++counters_.auth_failures;
    const std::string message =
        config_.token_file.empty()
            ? fmt::format(
                  "guest agent at {} refused this host agent ({}): it requires a token; pass "
                  "--token-file with the file the guest agent was given",
                  config_.transport.to_string(), error.message)
            : fmt::format(
                  "guest agent at {} refused the token of --token-file {} ({}): give both agents the "
                  "same token file",
                  config_.transport.to_string(), config_.token_file, error.message);
    // Retried with backoff like any other failure; said again only if it changes.
    if (message != last_error_) log::error("{}; retrying", message);
    last_error_ = message;
  } else {
    log::warn("lost the guest agent at {}: {}", config_.transport.to_string(), error.to_string());
  }
  ready_ = false;
  disconnected_since_ = Clock::now();
  ++counters_.reconnects;
  dead_sessions_.push_back(std::move(session_));
  uv_idle_start(&reaper_, [](uv_idle_t* h) { static_cast<Agent*>(h->data)->reap(); });
  if (!stopping_) schedule_dial();
}

void Agent::on_control(const wire::Control& message) {
  switch (message.message_type()) {
    case wire::Message::Ports:
      if (ports_) ports_->apply(*message.message_as_Ports());
      break;
    default: log::debug("control message {} from the guest", wire::EnumNameMessage(message.message_type()));
  }
}

StreamSink* Agent::on_stream_open(Session& session, StreamId id, const wire::Target& target) {
  if (stopping_ || !exposed_) {
    session.mux().reject(id, ECONNREFUSED, "host agent is stopping");
    return nullptr;
  }
  return exposed_->open(session, id, target);
}

void Agent::accept_client(UniqueFd client, BridgeOptions options) {
  if (stopping_) return;
  ++counters_.clients_accepted;
  options.splice = config_.splice;
  auto bridge =
      std::make_unique<SocketBridge>(loop_, std::move(client), client_arena_, *this, std::move(options));
  bridge->offload_to(bulk_reader_.get(), &interactive_);
  SocketBridge* raw = bridge.get();
  bridges_.emplace(raw, std::move(bridge));
  if (ready_ && session_) {
    raw->attach(*session_);
    return;
  }
  // Clients wait out a short reconnect; once the guest has been away longer, they hear so at once.
  const auto deadline = disconnected_since_ + std::chrono::milliseconds(config_.pending_timeout_ms);
  pending_.push_back({raw, std::max(deadline, Clock::now())});
  if (deadline <= Clock::now()) on_tick();
}

void Agent::bridge_done(SocketBridge* bridge) {
  finished_.push_back(bridge);
  uv_idle_start(&reaper_, [](uv_idle_t* h) { static_cast<Agent*>(h->data)->reap(); });
}

void Agent::reap() {
  uv_idle_stop(&reaper_);
  for (SocketBridge* b : finished_) bridges_.erase(b);
  finished_.clear();
  dead_sessions_.clear();
  if (stopping_ && bridges_.empty()) {
    uv_close(reinterpret_cast<uv_handle_t*>(&reaper_), nullptr);
  }
}

void Agent::flush_returns() {
  uv_idle_stop(&returns_flush_);
  if (session_ && !session_->lost()) session_->flush();
}

void Agent::pump_file_events() {
  if (!watcher_) return;
  constexpr uint64_t kMaxUnsent = 8ull << 20;
  const bool can_send = ready_ && session_ && !session_->lost() && session_->mux().peer() &&
                        (session_->mux().peer()->features & kFeatureFileEvents) != 0 &&
                        session_->mux().buffered_bytes() < kMaxUnsent;
  std::vector<file_watch::Batch> batches = watcher_->drain(can_send ? 16 : 0);
  if (batches.empty()) return;
  for (file_watch::Batch& b : batches) session_->mux().send_control(b.message);
  session_->flush();
}

// A slow reader's queued bytes pin the 1 MiB transport read blocks they arrived in, and with them other
// streams' bytes long since written. Once that pool holds more than this, such bytes move into small blocks,
// so memory follows what is actually queued (bounded by the windows) rather than the blocks it came in.
constexpr size_t kCompactAboveBytes = 32 << 20;

void Agent::compact_slow_readers() {
  if (transport_pool_.stats().in_use * transport_pool_.block_size() <= kCompactAboveBytes) return;
  size_t copied = 0;
  for (auto& [raw, bridge] : bridges_) copied += raw->compact(compact_arena_);
  if (copied == 0) return;
  counters_.bytes_compacted += copied;
  log::debug("moved {} queued bytes of slow readers out of shared read blocks ({} blocks in use)", copied,
             transport_pool_.stats().in_use);
}

void Agent::on_tick() {
  const auto now = Clock::now();
  compact_slow_readers();
  if (ports_) ports_->tick();
  pump_file_events();  // picks up batches held back while the transport was busy or down
  while (!pending_.empty() && pending_.front().deadline <= now) {
    ++counters_.clients_failed;
    SocketBridge* b = pending_.front().bridge;
    pending_.pop_front();
    b->fail_open(Error{
        ErrorCode::kIo, 0,
        fmt::format("guest agent at {} is not connected ({}); is the VM running?",
                    config_.transport.to_string(), last_error_.empty() ? "handshake pending" : last_error_)});
  }
  if (session_ && ready_ && now - last_ping_ >= std::chrono::milliseconds(config_.keepalive_ms)) {
    if (session_->pings_unanswered() >= 3) {
      session_->shutdown(Error{ErrorCode::kIo, ETIMEDOUT, "guest agent stopped answering pings"});
      on_session_lost(Error{ErrorCode::kIo, ETIMEDOUT, "guest agent stopped answering pings"});
      return;
    }
    session_->send_ping();
    last_ping_ = now;
  }
}

void Agent::serve_status(UniqueFd client) {
  const std::string text = status_json() + "\n";
  // Tiny and once per connection: a blocking write is fine.
  (void)!::write(client.get(), text.data(), text.size());
}

std::string Agent::status_json() const {
  nlohmann::json j;
  j["instance"] = config_.instance;
  j["transport"] = config_.transport.to_string();
  j["connected"] = ready_;
  if (ready_) {
    j["connected_seconds"] =
        std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - connected_since_).count();
  }
  j["last_error"] = last_error_;
  j["agent"] = {{"sessions", counters_.sessions},
                {"reconnects", counters_.reconnects},
                {"dial_failures", counters_.dial_failures},
                {"protocol_errors", counters_.protocol_errors},
                {"auth_failures", counters_.auth_failures},
                {"clients_accepted", counters_.clients_accepted},
                {"clients_failed", counters_.clients_failed},
                {"bytes_compacted", counters_.bytes_compacted},
                {"clients_open", bridges_.size()},
                {"clients_waiting", pending_.size()}};
  if (session_) {
    const MuxCounters& c = session_->mux().counters();
    j["mux"] = {{"streams", session_->mux().stream_count()},
                {"streams_opened", c.streams_opened},
                {"streams_refused", c.streams_refused},
                {"streams_reset", c.streams_reset},
                {"stream_errors", c.stream_errors},
                {"bytes_in", c.bytes_in},
                {"bytes_out", c.bytes_out},
                {"frames_in", c.frames_in},
                {"frames_out", c.frames_out}};
  }
  if (session_) {
    const MuxCounters& c = session_->mux().counters();
    j["shared_memory"] = {{"path", config_.shared ? config_.shared->path() : ""},
                          {"active", session_->mux().shared_active()},
                          {"bytes_out_by_ref", c.bytes_out_by_ref},
                          {"bytes_in_by_ref", c.bytes_in_by_ref},
                          {"loans_outstanding", session_->mux().loans_outstanding()},
                          {"borrowed_bytes", config_.shared ? config_.shared->borrowed_now() : 0},
                          {"blocks_in_use", pool_.stats().shared_in_use},
                          {"misses", pool_.stats().shared_misses}};
  }
  j["buffers"] = {{"live", pool_.stats().live + transport_pool_.stats().live},
                  {"in_use", pool_.stats().in_use + transport_pool_.stats().in_use},
                  {"bytes", pool_.stats().bytes_live + transport_pool_.stats().bytes_live},
                  {"compact_in_use", compact_pool_.stats().in_use},
                  {"compact_bytes", compact_pool_.stats().bytes_live}};
  nlohmann::json forwards = nlohmann::json::array();
  for (const UnixForward& f : config_.unix_forwards) {
    forwards.push_back({{"host", f.host_path}, {"guest", f.guest_target}});
  }
  j["forwards"] = forwards;
  j["ports"] = ports_ ? ports_->status() : nlohmann::json::array();
  if (watcher_) {
    const file_watch::WatcherCounters c = watcher_->counters();
    j["file_events"] = {{"shares", config_.shares.size()},
                        {"watches", c.watches},
                        {"raw_events", c.raw_events},
                        {"batches", c.batches},
                        {"changes", c.changes},
                        {"echoes_suppressed", c.echoes_suppressed},
                        {"overflows", c.overflows},
                        {"watch_errors", c.watch_errors},
                        {"pending_paths", c.pending_paths},
                        {"last_error", watcher_->last_error()}};
  }
  if (exposed_) j["exposed"] = exposed_->status();
  return j.dump();
}

}  // namespace vbridge
