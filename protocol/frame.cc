#include "protocol/frame.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>

namespace vbridge {

const char* frame_type_name(FrameType type) {
  switch (type) {
    case FrameType::kHello: return "HELLO";
    case FrameType::kData: return "DATA";
    case FrameType::kControl: return "CONTROL";
    case FrameType::kWindowUpdate: return "WINDOW_UPDATE";
    case FrameType::kFin: return "FIN";
    case FrameType::kRst: return "RST";
    case FrameType::kPing: return "PING";
    case FrameType::kPong: return "PONG";
    case FrameType::kDataRef: return "DATA_REF";
    case FrameType::kRelease: return "RELEASE";
  }
  return "UNKNOWN";
}

void encode_header(const FrameHeader& header, std::byte* out) {
  store_u32(out, header.length);
  store_u32(out + 4, header.stream_id);
  out[8] = std::byte(header.type);
  out[9] = std::byte(header.flags);
  out[10] = std::byte{0};
  out[11] = std::byte{0};
}

Result<FrameHeader> decode_header(const std::byte* in) {
  FrameHeader h;
  h.length = load_u32(in);
  h.stream_id = load_u32(in + 4);
  const auto type = static_cast<uint8_t>(in[8]);
  if (type > kMaxFrameType) {
    return Error{ErrorCode::kProtocol, 0, fmt::format("unknown frame type {}", type)};
  }
  h.type = static_cast<FrameType>(type);
  h.flags = static_cast<uint8_t>(in[9]);
  if (in[10] != std::byte{0} || in[11] != std::byte{0}) {
    return Error{ErrorCode::kProtocol, 0, "reserved header bytes are not zero"};
  }
  return h;
}

std::vector<std::byte> encode_hello(const Hello& hello) {
  std::vector<std::byte> out(kHelloPayloadSize + hello.token.size());
  store_u32(out.data(), kHelloMagic);
  out[4] = std::byte(hello.version & 0xff);
  out[5] = std::byte(hello.version >> 8);
  store_u64(out.data() + 8, hello.features);
  store_u32(out.data() + 16, hello.max_frame);
  store_u32(out.data() + 20, hello.initial_window);
  store_u32(out.data() + 24, hello.max_streams);
  store_u32(out.data() + 28, hello.shared_region);
  std::memcpy(out.data() + kHelloPayloadSize, hello.token.data(), hello.token.size());
  return out;
}

std::vector<std::byte> encode_refusal(const std::string& message) {
  const std::string text = message.substr(0, 512);
  std::vector<std::byte> out(kFrameHeaderSize + 4 + text.size());
  encode_header(FrameHeader{static_cast<uint32_t>(4 + text.size()), 0, FrameType::kRst, 0}, out.data());
  store_u32(out.data() + kFrameHeaderSize, EACCES);
  std::memcpy(out.data() + kFrameHeaderSize + 4, text.data(), text.size());
  return out;
}

bool tokens_equal(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

Result<Hello> decode_hello(std::span<const std::byte> payload) {
  if (payload.size() < 8 || load_u32(payload.data()) != kHelloMagic) {
    return Error{ErrorCode::kProtocol, 0,
                 fmt::format("peer is not a vbridge agent (it sent \"{}\"); check the transport address",
                             printable_prefix(payload))};
  }
  Hello h;
  h.version = uint16_t(uint16_t(payload[4]) | (uint16_t(payload[5]) << 8));
  if (h.version != kProtocolVersion) {
    return Error{ErrorCode::kVersion, 0,
                 fmt::format("peer speaks protocol version {}, this agent speaks version {}; run the same "
                             "vbridge release on host and guest",
                             h.version, kProtocolVersion)};
  }
  if (payload.size() < kHelloPayloadSize || payload.size() > kHelloPayloadSize + kMaxTokenSize) {
    return Error{ErrorCode::kProtocol, 0,
                 fmt::format("HELLO payload is {} bytes, expected {} to {}", payload.size(),
                             kHelloPayloadSize, kHelloPayloadSize + kMaxTokenSize)};
  }
  h.features = load_u64(payload.data() + 8);
  h.max_frame = load_u32(payload.data() + 16);
  h.initial_window = load_u32(payload.data() + 20);
  h.max_streams = load_u32(payload.data() + 24);
  h.shared_region = load_u32(payload.data() + 28);
  h.token.assign(reinterpret_cast<const char*>(payload.data()) + kHelloPayloadSize,
                 payload.size() - kHelloPayloadSize);
  if (h.max_frame < 1024 || h.initial_window < 1024 || h.max_streams == 0) {
    return Error{ErrorCode::kProtocol, 0,
                 fmt::format("HELLO has unusable limits (max_frame {}, window {}, max_streams {})",
                             h.max_frame, h.initial_window, h.max_streams)};
  }
  return h;
}

std::string printable_prefix(std::span<const std::byte> bytes, size_t max) {
  std::string out;
  for (size_t i = 0; i < bytes.size() && i < max; ++i) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  return out;
}

}  // namespace vbridge
