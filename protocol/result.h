// Error and Result types shared by every layer. No exceptions cross event-loop callbacks: failures travel
// as values, and an error fails one stream or one connection, never the agent.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <variant>

namespace vbridge {

enum class ErrorCode : uint8_t {
  kProtocol,     // the peer broke the wire protocol (malformed frame, bad state transition)
  kVersion,      // the peer speaks another protocol version
  kFlowControl,  // the peer sent more than its window allowed
  kLimit,        // a configured bound was hit (streams, memory, frame size)
  kRefused,      // the peer refused a stream (OPEN_FAIL)
  kReset,        // the stream was reset
  kIo,           // a syscall failed; errno_value says which
  kGoingAway,    // the connection is draining
  kConfig,       // bad configuration
  kAuth,         // the peer's token did not match (or our token was refused)
};

const char* error_code_name(ErrorCode code);

struct Error {
  ErrorCode code;
  int errno_value = 0;
  std::string message;

  std::string to_string() const;
};

// A Result in the shape of std::expected (C++23), small enough for the hot path.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}      // NOLINT(google-explicit-constructor)
  Result(Error error) : v_(std::move(error)) {}  // NOLINT(google-explicit-constructor)
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  T& operator*() { return value(); }
  const T& operator*() const { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  const Error& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT(google-explicit-constructor)
  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const { return error_; }

 private:
  Error error_{ErrorCode::kProtocol, 0, {}};
  bool ok_ = true;
};

using Status = Result<void>;

}  // namespace vbridge
