// Host unix sockets the guest may reach: `vbridge-host --expose-unix NAME=/host/path.sock` answers the guest
// agent's streams to target NAME (opened for clients of its `--reverse-unix /guest/path.sock=NAME`) by
// connecting to /host/path.sock. Names not listed are refused with EACCES, so the guest reaches no other host
// socket. Each connection joins the host socket to the stream as SocketBridge does for host-opened streams:
// bytes move from the memory they arrived in, half-close travels both ways, an error ends this one only.
#pragma once

#include <uv.h>

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "host/session.h"

namespace vbridge {

// Parses "NAME=/host/path.sock" as given to --expose-unix.
Result<std::pair<std::string, std::string>> parse_expose_unix(std::string_view text);

class ExposedUnix {
 public:
  ExposedUnix(uv_loop_t* loop, ReadArena& arena, std::map<std::string, std::string> names);
  ~ExposedUnix();

  // The guest opened stream `id` towards `target`. Connects the host socket and accepts the stream,
  // returning the sink for its events; or rejects it (unknown name, connect failed) and returns null.
  StreamSink* open(Session& session, StreamId id, const wire::Target& target);
  size_t connections() const { return conns_.size(); }
  nlohmann::json status() const;

 private:
  class Conn;
  void done(Conn* conn);

  uv_loop_t* loop_;
  ReadArena& arena_;
  std::map<std::string, std::string> names_;  // NAME → host socket path
  std::unordered_map<Conn*, std::unique_ptr<Conn>> conns_;
  uint64_t opened_ = 0, refused_ = 0;
};

}  // namespace vbridge
