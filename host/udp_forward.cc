#include "host/udp_forward.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <sys/socket.h>

#include <cstring>

#include "protocol/log.h"

namespace vbridge {

using Clock = std::chrono::steady_clock;
constexpr size_t kMaxFlows = 4096;

class UdpForward::Flow final : public StreamSink {
 public:
  Flow(UdpForward& owner, std::string key, const sockaddr_storage& peer, socklen_t peer_len)
      : owner_(owner), key_(std::move(key)), peer_(peer), peer_len_(peer_len), assembler_(owner.pool_) {}
  ~Flow() override {
    if (session_ != nullptr && live_) {
      session_->detach(id_);
      session_->mux().reset(id_, "UDP flow idle");
      session_->flush();
    }
  }

  bool open(Session& session) {
    auto id = session.open(owner_.target_, this);
    if (!id) return false;
    session_ = &session;
    id_ = *id;
    live_ = true;
    return true;
  }

  // Queues one datagram (its Slice includes the 4-byte prefix); false if it does not fit right now. The
  // caller flushes the session once per batch.
  bool send(Slice framed) {
    if (!live_ || !session_->mux().fits(id_, framed.size())) return false;
    session_->mux().send(id_, std::move(framed));
    last_active_ = Clock::now();
    return true;
  }

  Clock::time_point last_active() const { return last_active_; }

  void on_open_result(const Error* error) override {
    if (error == nullptr) return;
    live_ = false;
    ++owner_.counters_.flows_refused;
    if (error->message != owner_.last_refusal_) {
      log::warn("UDP flow to guest port {} refused: {}", owner_.target_.port, error->to_string());
      owner_.last_refusal_ = error->message;
    }
    owner_.drop_flow(key_);  // freed later, not on this call stack
  }
  void on_data(Slice data) override {
    last_active_ = Clock::now();
    const size_t n = data.size();
    const Status st = assembler_.feed(data, [this](const Slice& d) { owner_.reply(peer_, peer_len_, d); });
    if (live_) {
      session_->mux().consume(id_, n);
      session_->flush();
    }
    if (!st) {
      log::warn("UDP flow: {}", st.error().to_string());
      owner_.drop_flow(key_);
    }
  }
  void on_fin() override {}
  void on_reset(const Error&) override {
    live_ = false;
    owner_.drop_flow(key_);
  }
  void on_writable() override {}
  void on_closed() override {
    live_ = false;
    owner_.drop_flow(key_);
  }

 private:
  UdpForward& owner_;
  std::string key_;
  sockaddr_storage peer_;
  socklen_t peer_len_;
  DatagramAssembler assembler_;
  Session* session_ = nullptr;
  StreamId id_ = 0;
  bool live_ = false;
  Clock::time_point last_active_ = Clock::now();
};

UdpForward::UdpForward(uv_loop_t* loop, UniqueFd socket, wire::TargetT target, BufferPool& pool,
                       SessionFn session, std::chrono::milliseconds idle_timeout)
    : poller_(loop, std::move(socket), [this](int, int) { on_readable(); }),
      target_(std::move(target)),
      pool_(pool),
      arena_(pool, kMaxDatagram + kDatagramPrefix),
      session_(std::move(session)),
      idle_timeout_(idle_timeout) {
  poller_.want(true, false);
}

UdpForward::~UdpForward() = default;

void UdpForward::on_readable() {
  Session* flushed = nullptr;
  for (int i = 0; i < 64; ++i) {
    std::span<std::byte> space = arena_.writable();
    sockaddr_storage from{};
    socklen_t from_len = sizeof from;
    // The datagram lands after room for its length prefix, so the framed record is one Slice.
    const ssize_t n = ::recvfrom(poller_.fd(), space.data() + kDatagramPrefix, kMaxDatagram, MSG_DONTWAIT,
                                 reinterpret_cast<sockaddr*>(&from), &from_len);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      continue;  // an ICMP error for an earlier reply: nothing to do
    }
    ++counters_.datagrams_in;
    encode_datagram_prefix(space.data(), static_cast<uint32_t>(n));
    Slice framed = arena_.commit(kDatagramPrefix + static_cast<size_t>(n));
    Session* session = session_();
    if (session == nullptr) {
      ++counters_.dropped;
      continue;
    }
    std::string key(reinterpret_cast<const char*>(&from), from_len);
    auto it = flows_.find(key);
    if (it == flows_.end()) {
      if (flows_.size() >= kMaxFlows) {
        ++counters_.dropped;
        continue;
      }
      auto flow = std::make_unique<Flow>(*this, key, from, from_len);
      if (!flow->open(*session)) {
        ++counters_.dropped;
        continue;
      }
      ++counters_.flows_opened;
      flushed = session;  // the OPEN leaves with this batch even if the datagram does not
      it = flows_.emplace(key, std::move(flow)).first;
    }
    if (it->second->send(std::move(framed))) {
      flushed = session;
    } else {
      ++counters_.dropped;
    }
  }
  if (flushed != nullptr) flushed->flush();
}

void UdpForward::reply(const sockaddr_storage& to, socklen_t len, const Slice& datagram) {
  if (::sendto(poller_.fd(), datagram.data(), datagram.size(), MSG_DONTWAIT,
               reinterpret_cast<const sockaddr*>(&to), len) < 0) {
    ++counters_.dropped;
    return;
  }
  ++counters_.datagrams_out;
}

void UdpForward::drop_flow(const std::string& key) {
  // The flow may be on the call stack: it is freed on the next expire_idle pass, not here.
  auto it = flows_.find(key);
  if (it == flows_.end()) return;
  graveyard_.push_back(std::move(it->second));
  flows_.erase(it);
}

void UdpForward::expire_idle() {
  graveyard_.clear();
  const auto now = Clock::now();
  for (auto it = flows_.begin(); it != flows_.end();) {
    if (now - it->second->last_active() > idle_timeout_) {
      ++counters_.flows_expired;
      it = flows_.erase(it);
    } else {
      ++it;
    }
  }
}

Result<UniqueFd> bind_udp(const std::string& host, uint16_t port) {
  sockaddr_storage ss{};
  socklen_t len = 0;
  int family = AF_INET;
  if (host.find(':') != std::string::npos) {
    auto* sa = reinterpret_cast<sockaddr_in6*>(&ss);
    sa->sin6_family = AF_INET6;
    sa->sin6_port = htons(port);
    if (inet_pton(AF_INET6, host.c_str(), &sa->sin6_addr) != 1)
      return Error{ErrorCode::kConfig, 0, "bad address " + host};
    family = AF_INET6;
    len = sizeof *sa;
  } else {
    auto* sa = reinterpret_cast<sockaddr_in*>(&ss);
    sa->sin_family = AF_INET;
    sa->sin_port = htons(port);
    if (inet_pton(AF_INET, host.c_str(), &sa->sin_addr) != 1)
      return Error{ErrorCode::kConfig, 0, "bad address " + host};
    family = AF_INET;
    len = sizeof *sa;
  }
  UniqueFd fd(::socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return errno_error("socket(UDP)");
  const int one = 1;
  if (family == AF_INET6) ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  const int buf = 4 << 20;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    return errno_error(fmt::format("bind udp {}:{}", host, port));
  }
  return fd;
}

}  // namespace vbridge
