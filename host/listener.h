// A listening socket on the host: a unix path (mode 0600, peers must be our uid or root) or a TCP address.
#pragma once

#include <unistd.h>

#include <functional>
#include <memory>
#include <string>

#include "host/poller.h"
#include "protocol/address.h"

namespace vbridge {

class Listener {
 public:
  using AcceptFn = std::function<void(UniqueFd client)>;

  // Binds and listens. A stale unix socket (nobody accepting) is replaced; a live one is an error.
  static Result<std::unique_ptr<Listener>> listen(uv_loop_t* loop, const Address& address,
                                                  AcceptFn on_accept);
  ~Listener();

  const Address& address() const { return address_; }
  uint64_t rejected_peers() const { return rejected_peers_; }

 private:
  Listener(uv_loop_t* loop, UniqueFd fd, Address address, AcceptFn on_accept);
  void accept_all();

  Address address_;
  AcceptFn on_accept_;
  Poller poller_;
  uint64_t rejected_peers_ = 0;
  const uid_t own_uid_ = ::getuid();  // asked once: the check runs for every connection
};

}  // namespace vbridge
