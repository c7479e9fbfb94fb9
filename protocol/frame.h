// Wire format of one frame: a fixed 12-byte little-endian header, then `length` payload bytes.
//
//   u32 length | u32 stream_id | u8 type | u8 flags | u16 reserved (0)
//
// DATA payload is raw stream bytes. CONTROL payload is a FlatBuffers `vbridge.wire.Control`. The first frame
// each side sends is HELLO on stream 0; its header and the first 8 payload bytes (magic, version) stay the
// same in every protocol version, so a mismatch can always be named.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/result.h"

namespace vbridge {

using StreamId = uint32_t;

inline constexpr size_t kFrameHeaderSize = 12;
inline constexpr uint32_t kHelloMagic = 0x47524256;  // "VBRG" little-endian
inline constexpr uint16_t kProtocolVersion = 1;

enum class FrameType : uint8_t {
  kHello = 0,
  kData = 1,
  kControl = 2,
  kWindowUpdate = 3,
  kFin = 4,
  kRst = 5,
  kPing = 6,
  kPong = 7,
  // Stream bytes that lie in the sender's half of the shared memory (protocol/shared_memory.h), named
  // instead of sent: u32 loan | u32 offset in the sender's half | u32 length. Counts against credit like
  // DATA.
  kDataRef = 8,
  // Stream 0: loans (u32 each) whose bytes the receiver no longer uses; the sender may reuse the memory.
  kRelease = 9,
};
inline constexpr uint8_t kMaxFrameType = 9;
inline constexpr size_t kDataRefPayloadSize = 12;
inline constexpr size_t kMaxReleaseLoans = 4096;
const char* frame_type_name(FrameType type);

// Feature bits announced in HELLO; a feature is on when both sides announce it.
enum Feature : uint64_t {
  kFeaturePorts = 1u << 0,
  kFeatureFileEvents = 1u << 1,
  kFeatureUdp = 1u << 2,
  kFeatureSharedMemory = 1u << 3,  // with equal Hello::shared_region on both sides
};

struct FrameHeader {
  uint32_t length = 0;
  StreamId stream_id = 0;
  FrameType type = FrameType::kData;
  uint8_t flags = 0;
};

using HeaderBytes = std::array<std::byte, kFrameHeaderSize>;

void encode_header(const FrameHeader& header, std::byte* out);
// Decodes a header; fails on an unknown type or a non-zero reserved field.
Result<FrameHeader> decode_header(const std::byte* in);

struct Hello {
  uint16_t version = kProtocolVersion;
  uint64_t features = 0;
  uint32_t max_frame = 0;       // largest payload this side accepts
  uint32_t initial_window = 0;  // credit each new stream starts with, in bytes
  uint32_t max_streams = 0;     // concurrent streams this side accepts
  uint32_t shared_region = 0;   // the nonce of the shared memory this side mapped; 0: none
  // The shared secret of --token-file (unix and TCP transports): the bytes after the fixed 32, empty when
  // none. The host sends it; a guest that requires one answers only a HELLO carrying the same token.
  std::string token;
};
inline constexpr size_t kHelloPayloadSize = 32;
inline constexpr size_t kMinTokenSize = 16;
inline constexpr size_t kMaxTokenSize = 256;

// A token-protected acceptor refuses a HELLO by answering with an RST on stream 0 (u32 code | message)
// instead of its own HELLO; the connecting side reports it as ErrorCode::kAuth.
std::vector<std::byte> encode_refusal(const std::string& message);

// 32 bytes, followed by the token if there is one.
std::vector<std::byte> encode_hello(const Hello& hello);
Result<Hello> decode_hello(std::span<const std::byte> payload);

inline void store_u32(std::byte* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out[i] = std::byte(v >> (8 * i));
}
inline void store_u64(std::byte* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = std::byte(v >> (8 * i));
}
inline uint32_t load_u32(const std::byte* in) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(in[i]) << (8 * i);
  return v;
}
inline uint64_t load_u64(const std::byte* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(in[i]) << (8 * i);
  return v;
}

// Compares two tokens in time that depends only on their lengths.
bool tokens_equal(std::string_view a, std::string_view b);

// Printable rendering of the first bytes a peer sent, for "this is not a vbridge peer" errors.
std::string printable_prefix(std::span<const std::byte> bytes, size_t max = 16);

}  // namespace vbridge
