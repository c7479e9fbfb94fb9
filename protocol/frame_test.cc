#include "protocol/frame.h"

#include <gtest/gtest.h>

namespace vbridge {
namespace {

TEST(Frame, HeaderRoundTripsLittleEndian) {
  HeaderBytes bytes{};
  encode_header(FrameHeader{0x01020304, 0x0a0b0c0d, FrameType::kWindowUpdate, 0x5}, bytes.data());
  EXPECT_EQ(bytes[0], std::byte{0x04});
  EXPECT_EQ(bytes[4], std::byte{0x0d});
  auto h = decode_header(bytes.data());
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->length, 0x01020304u);
  EXPECT_EQ(h->stream_id, 0x0a0b0c0du);
  EXPECT_EQ(h->type, FrameType::kWindowUpdate);
  EXPECT_EQ(h->flags, 5);
}

TEST(Frame, UnknownTypeAndReservedBytesAreRejected) {
  HeaderBytes bytes{};
  bytes[8] = std::byte{99};
  EXPECT_FALSE(decode_header(bytes.data()).ok());
  bytes[8] = std::byte{1};
  bytes[11] = std::byte{1};
  EXPECT_FALSE(decode_header(bytes.data()).ok());
}

TEST(Frame, HelloRoundTrips) {
  Hello in{kProtocolVersion, kFeaturePorts | kFeatureUdp, 65536, 1 << 20, 100};
  const auto bytes = encode_hello(in);
  auto out = decode_hello(bytes);
  ASSERT_TRUE(out.ok()) << out.error().to_string();
  EXPECT_EQ(out->features, in.features);
  EXPECT_EQ(out->max_frame, 65536u);
  EXPECT_EQ(out->initial_window, 1u << 20);
  EXPECT_EQ(out->max_streams, 100u);
}

TEST(Frame, HelloOfAnotherVersionNamesBothVersions) {
  Hello in{kProtocolVersion, 0, 65536, 1 << 20, 100};
  auto bytes = encode_hello(in);
  bytes[4] = std::byte{7};
  auto out = decode_hello(bytes);
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.error().code, ErrorCode::kVersion);
  EXPECT_NE(out.error().message.find("version 7"), std::string::npos);
  EXPECT_NE(out.error().message.find("version 1"), std::string::npos);
}

TEST(Frame, HelloWithoutMagicSaysPeerIsNotVbridge) {
  const std::string http = "GET / HTTP/1.1\r\n\r\n";
  auto out = decode_hello(std::as_bytes(std::span(http)));
  ASSERT_FALSE(out.ok());
  EXPECT_NE(out.error().message.find("not a vbridge agent"), std::string::npos);
  EXPECT_NE(out.error().message.find("GET / HTTP"), std::string::npos);
}

TEST(Frame, HelloCarriesTheToken) {
  Hello in{kProtocolVersion, 0, 65536, 1 << 20, 100};
  in.token = "0123456789abcdef";
  const auto bytes = encode_hello(in);
  EXPECT_EQ(bytes.size(), kHelloPayloadSize + 16);
  auto out = decode_hello(bytes);
  ASSERT_TRUE(out.ok()) << out.error().to_string();
  EXPECT_EQ(out->token, in.token);
  in.token = std::string(kMaxTokenSize + 1, 'x');
  EXPECT_FALSE(decode_hello(encode_hello(in)).ok());
}

TEST(Frame, TokensCompareByContentAndLength) {
  EXPECT_TRUE(tokens_equal("0123456789abcdef", "0123456789abcdef"));
  EXPECT_FALSE(tokens_equal("0123456789abcdef", "0123456789abcdeF"));
  EXPECT_FALSE(tokens_equal("0123456789abcdef", "0123456789abcde"));
  EXPECT_FALSE(tokens_equal("", "0123456789abcdef"));
}

}  // namespace
}  // namespace vbridge
