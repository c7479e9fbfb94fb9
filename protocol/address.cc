#include "protocol/address.h"

#include <fmt/format.h>

#include <charconv>

namespace vbridge {
namespace {

bool parse_u32(std::string_view text, uint32_t max, uint32_t* out) {
  if (text.empty()) return false;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), *out);
  return ec == std::errc() && end == text.data() + text.size() && *out <= max;
}

Error bad(std::string_view text, std::string_view why) {
  return Error{ErrorCode::kConfig, 0,
               fmt::format("bad address \"{}\": {}; expected unix:/path, tcp:HOST:PORT, vsock:CID:PORT, "
                           "hvsock:/path:PORT or serial:NAME",
                           text, why)};
}

}  // namespace

std::string Address::to_string() const {
  switch (kind) {
    case Kind::kUnix: return "unix:" + path;
    case Kind::kTcp:
      return path.find(':') != std::string::npos ? fmt::format("tcp:[{}]:{}", path, port)
                                                 : fmt::format("tcp:{}:{}", path, port);
    case Kind::kVsock: return fmt::format("vsock:{}:{}", cid, port);
    case Kind::kHybridVsock: return fmt::format("hvsock:{}:{}", path, port);
    case Kind::kSerial: return "serial:" + path;
  }
  return "?";
}

Result<Address> parse_address(std::string_view text) {
  const size_t colon = text.find(':');
  if (colon == std::string_view::npos) return bad(text, "no scheme");
  const std::string_view scheme = text.substr(0, colon);
  const std::string_view rest = text.substr(colon + 1);
  Address a;
  if (scheme == "unix") {
    if (rest.empty()) return bad(text, "empty path");
    if (rest.size() > 107) return bad(text, "unix socket paths are limited to 107 bytes");
    a.kind = Address::Kind::kUnix;
    a.path = rest;
    return a;
  }
  if (scheme == "serial") {
    if (rest.empty()) return bad(text, "empty port name");
    a.kind = Address::Kind::kSerial;
    a.path = rest;
    return a;
  }
  const size_t last = rest.rfind(':');
  if (scheme == "vsock" && last == std::string_view::npos) {
    a.kind = Address::Kind::kVsock;
    if (!parse_u32(rest, 0xffffffffu, &a.port)) return bad(text, "bad port");
    return a;
  }
  if (last == std::string_view::npos) return bad(text, "missing :PORT");
  std::string_view host = rest.substr(0, last);
  const std::string_view port = rest.substr(last + 1);
  if (scheme == "tcp") {
    a.kind = Address::Kind::kTcp;
    if (!parse_u32(port, 65535, &a.port)) return bad(text, "bad port");
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    if (host.empty()) return bad(text, "empty host");
    a.path = host;
    return a;
  }
  if (scheme == "vsock") {
    a.kind = Address::Kind::kVsock;
    if (!host.empty() && !parse_u32(host, 0xffffffffu, &a.cid)) return bad(text, "bad CID");
    if (!parse_u32(port, 0xffffffffu, &a.port)) return bad(text, "bad port");
    return a;
  }
  if (scheme == "hvsock") {
    a.kind = Address::Kind::kHybridVsock;
    if (host.empty()) return bad(text, "empty socket path");
    if (!parse_u32(port, 0xffffffffu, &a.port)) return bad(text, "bad port");
    a.path = host;
    return a;
  }
  return bad(text, fmt::format("unknown scheme \"{}\"", scheme));
}

}  // namespace vbridge
